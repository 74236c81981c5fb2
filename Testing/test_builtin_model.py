"""The built-in demonstration model: ships with the package, verified, and as good on the
real example CT as its card says."""

from __future__ import annotations

import numpy as np
import pytest

from SwinUNETRSegmentLib.errors import UserError
from SwinUNETRSegmentLib.fileio.atomic import file_digest
from SwinUNETRSegmentLib.fileio.read import read_volume
from SwinUNETRSegmentLib.fileio.sampledata import TOTALSEG_TO_BTCV
from SwinUNETRSegmentLib.inference.engine import Segmenter
from SwinUNETRSegmentLib.models import catalog
from SwinUNETRSegmentLib.training.metrics import dice_per_label, mean_dice


def test_default_model_is_bundled_small_and_verified():
    assert catalog.DEFAULT_MODEL == "demo"
    card, weights = catalog.resolve_model("demo")
    assert weights.stat().st_size <= 20 * 1024 * 1024
    assert card.checkpoint["sha256"] == file_digest(weights, "sha256")
    assert 12 <= card.network_args["feature_size"] <= 24
    t = card.training
    assert t["command"].startswith("swinunetr-segment train") and "seed" in t and t["data"]
    assert all(len(d["image_sha256"]) == 64 for d in t["data"])
    assert "not for clinical use" in card.title


def test_tampered_bundled_weights_are_not_run(tmp_path, monkeypatch):
    card = catalog.card_of("demo")
    fake = tmp_path / "weights"
    fake.mkdir()
    (fake / card.checkpoint["bundled"]).write_bytes(b"not the published weights")
    monkeypatch.setattr(catalog, "BUNDLED_WEIGHTS_DIR", fake)
    with pytest.raises(UserError, match="is not the checkpoint model card 'demo' names"):
        catalog.resolve_model("demo")


@pytest.mark.slow
@pytest.mark.network
def test_reaches_the_dice_in_its_card_on_the_example_ct(reference_files):
    card, weights = catalog.resolve_model("demo")
    ct, _ = read_volume(reference_files / "example_ct.nii.gz")
    ts, _ = read_volume(reference_files / "example_seg_fast_force_split.nii.gz")
    lut = np.zeros(256, np.uint8)
    for k, v in TOTALSEG_TO_BTCV.items():
        lut[k] = v
    truth = lut[ts.array.astype(np.int64)]
    result = Segmenter(card, weights, device="cpu").segment(ct)
    assert result.labels.same_grid(ct)
    dice = dice_per_label(result.labels.array, truth, card.labels)
    mean = mean_dice(dice)
    assert mean >= card.training["mean_dice"] - 0.02, (mean, dice)
    # Every organ the card reports a Dice for is within 0.05 of it.
    for organ, expected in card.training["dice"].items():
        assert dice.get(organ, 0.0) >= expected - 0.05, (organ, expected, dice)
    assert dice["liver"] > 0.85 and dice["spleen"] > 0.7, dice
    # The organs lie where the organs are: the centre of the liver is within 15 mm of the
    # pseudo-label's, the spleen's within 30 mm (a few islands elsewhere pull it), and the
    # liver is on the patient's right of the spleen (RAS: larger x), never mirrored.
    def centre(mask):
        ijk = np.argwhere(mask).mean(axis=0)
        return ct.ijk_to_ras[:3, :3] @ ijk + ct.ijk_to_ras[:3, 3]

    names = {lab.name: lab.value for lab in card.labels}
    for organ, tolerance in (("liver", 15.0), ("spleen", 30.0)):
        ours, theirs = centre(result.labels.array == names[organ]), centre(truth == names[organ])
        assert np.linalg.norm(ours - theirs) < tolerance, (organ, ours, theirs)
    assert centre(result.labels.array == names["liver"])[0] > centre(result.labels.array == names["spleen"])[0]


@pytest.mark.network
def test_the_demo_training_inputs_are_written_as_its_card_records(tmp_path, reference_files):
    """`write_demo_datalist` recreates what the recorded training command reads: the three
    image/label pairs whose SHA256s the card holds, the label map, and a weightless base card
    of the same network."""
    from SwinUNETRSegmentLib.fileio import sampledata
    from SwinUNETRSegmentLib.models.cards import load_card
    from SwinUNETRSegmentLib.training.common import load_datalist

    datalist, label_map = sampledata.write_demo_datalist(tmp_path, cache=reference_files.parents[2])
    train, _ = load_datalist(str(datalist))
    recorded = catalog.card_of("demo").training["data"]
    assert [file_digest(item["label"]) for item in train] == [d["label_sha256"] for d in recorded]
    assert [file_digest(item["image"]) for item in train] == [d["image_sha256"] for d in recorded]
    base = load_card(str(tmp_path / "base_card.json"))
    assert base.checkpoint == {} and base.network_args == catalog.card_of("demo").network_args
    assert {int(k): v for k, v in __import__("json").loads(label_map.read_text()).items()} == TOTALSEG_TO_BTCV


@pytest.mark.slow
@pytest.mark.network
def test_through_the_command_line_kidneys_are_on_their_sides_and_the_pelvis_is_clean(reference_files):
    """What a user sees with `./dev demo` (benchmarks/demo_model.py, the command line on the
    example CT): both kidneys found, each on its own side and with Dice >= 0.7, as many
    structures as the card says, and no component over 1 cm^3 below the pelvic brim."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from demo_model import measure

    card = catalog.card_of("demo")
    r = measure(reference_files / "example_ct.nii.gz", reference_files / "example_seg_fast_force_split.nii.gz",
                ["--model", "demo"], card)
    assert r["kidneys_on_their_sides"] is True
    assert r["dice"]["right kidney"] >= 0.7 and r["dice"]["left kidney"] >= 0.7, r["dice"]
    assert len(r["found"]) >= len(card.training["found"]), r["found"]
    assert r["pelvic_brim_z_mm"] is not None and r["components_over_1cm3_below_pelvic_brim"] == []
