"""Supervised training: labels from label maps and Slicer .seg.nrrd, the transforms, the
learning-rate schedule, validation Dice, and two epochs on real CT (slow)."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch
from conftest import tiny_card
from monai.data import MetaTensor

from SwinUNETRSegmentLib.errors import UserError
from SwinUNETRSegmentLib.fileio import segnrrd as slicerio
from SwinUNETRSegmentLib.fileio.read import read_volume
from SwinUNETRSegmentLib.fileio.sampledata import TOTALSEG_TO_BTCV
from SwinUNETRSegmentLib.geometry import Volume
from SwinUNETRSegmentLib.models.cards import load_card
from SwinUNETRSegmentLib.training import labels as training_labels
from SwinUNETRSegmentLib.training import supervised
from SwinUNETRSegmentLib.training.common import epoch_learning_rate
from SwinUNETRSegmentLib.training.metrics import average_scores, dice_per_label, mean_dice

BTCV = load_card("btcv")


def pseudo_labels(reference_files) -> Volume:
    """example_ct's TotalSegmentator labels as BTCV values."""
    ts, _ = read_volume(reference_files / "example_seg_fast_force_split.nii.gz")
    lut = np.zeros(256, np.uint8)
    for k, v in TOTALSEG_TO_BTCV.items():
        lut[k] = v
    return ts.with_array(lut[ts.array.astype(np.int64)])


def write_slicer_seg(labels: Volume, path, crop=(slice(10, 100), slice(5, 90), slice(20, 100))):
    """A .seg.nrrd as Slicer saves one after editing: cropped to the segments' extent, names
    edited by hand (terminology kept), a segment the card does not know (a tumour)."""
    arr = labels.array[crop]
    offset = np.array([s.start for s in crop], float)
    m = labels.ijk_to_ras.copy()
    m[:3, 3] = labels.ijk_to_world(offset)[0]
    cropped = Volume(np.ascontiguousarray(arr), m)
    seg = slicerio.create_segmentation(cropped.shape, cropped.ijk_to_lps)
    for lab in BTCV.labels:
        mask = arr == lab.value
        if mask.any():
            slicerio.add_segment(seg, mask, {"id": f"S{lab.value}", "name": f"{lab.name.title()} (corrected)",
                                             "color": list(lab.color_float), "terminology": lab.terminology()})
    tumour = np.zeros(arr.shape, bool)
    tumour[40:45, 40:45, 40:45] = True
    slicerio.add_segment(seg, tumour, {"id": "T", "name": "tumour"})
    slicerio.write_segmentation(str(path), seg)
    return cropped


@pytest.mark.network
def test_slicer_segmentation_labels_land_on_the_image_grid(tmp_path, reference_files):
    ct, _ = read_volume(reference_files / "example_ct.nii.gz")
    labels = pseudo_labels(reference_files)
    path = tmp_path / "corrected.seg.nrrd"
    write_slicer_seg(labels, path)
    got = training_labels.read_label(path, BTCV, ct)
    assert got.shape == ct.shape
    crop = (slice(10, 100), slice(5, 90), slice(20, 100))
    expected = np.zeros(ct.shape, np.uint8)
    expected[crop] = labels.array[crop]
    # Matched by SNOMED code although every name was edited; the tumour is left out.
    np.testing.assert_array_equal(got, expected)


def test_segment_matching_by_code_then_name():
    segs = [
        {"id": "a", "name": "whatever",
         "terminology": {"type": ["SCT", "64033007", "Kidney"], "typeModifier": ["SCT", "7771000", "Left"]}},
        {"id": "b", "name": "Liver"},
        {"id": "c", "name": "tumour", "terminology": {"type": ["SCT", "4147007", "Mass"]}},
    ]
    assert training_labels.match_segments(segs, BTCV.labels) == {"a": 3, "b": 6}


def test_unmatched_segmentation_is_a_clear_error(tmp_path):
    ref = slicerio.SAMPLE_DATA_DIR / "Segmentation.seg.nrrd"  # chest: ribs, spine, lungs
    grid = Volume(np.zeros((4, 4, 4), np.int16), np.eye(4))
    with pytest.raises(UserError, match="no segment of Segmentation.seg.nrrd .*ribs.* matches a label of card 'btcv'"):
        training_labels.read_label(ref, BTCV, grid)


@pytest.mark.slow
@pytest.mark.network
def test_two_epochs_lower_the_loss_and_the_engine_loads_the_result(tmp_path, reference_files, capsys):
    from SwinUNETRSegmentLib.cli import main

    ct = reference_files / "example_ct.nii.gz"
    write_slicer_seg(pseudo_labels(reference_files), tmp_path / "corrected.seg.nrrd")
    (tmp_path / "map.json").write_text(json.dumps({str(k): v for k, v in TOTALSEG_TO_BTCV.items()}))
    # One scan with NIfTI pseudo-labels (translated by --label-map), the same scan as corrected in Slicer.
    datalist = {"training": [{"image": str(ct), "label": "corrected.seg.nrrd"}],
                "validation": [{"image": str(ct), "label": "corrected.seg.nrrd"}]}
    (tmp_path / "data.json").write_text(json.dumps(datalist))
    (tmp_path / "card.json").write_text(json.dumps(tiny_card(overlap=0.0).to_json()))
    out = tmp_path / "run"
    argv = ["train", "--data", tmp_path / "data.json", "--card", tmp_path / "card.json", "--out", out,
            "--epochs", "2", "--steps-per-epoch", "3", "--crop", "64", "64", "64", "--num-samples", "1",
            "--lr", "2e-3", "--name", "tiny-trained"]
    assert main([str(a) for a in argv]) == 0, capsys.readouterr().err
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in log] == [1, 2]
    assert log[-1]["loss"] < log[0]["loss"]
    trained = json.loads((out / "card.json").read_text())
    assert trained["name"] == "tiny-trained" and trained["training"]["data"][0]["label"] == "corrected.seg.nrrd"
    assert set(trained["training"]["dice"]) <= {lab.name for lab in BTCV.labels}

    # The engine runs the trained card and its checkpoint, on the input's grid.
    seg_out = tmp_path / "ct.seg.nrrd"
    assert main(["-i", str(ct), "-o", str(seg_out), "--card", str(out / "card.json"),
                 "--checkpoint", str(out / "best.pt"), "--device", "cpu", "-q"]) == 0
    back, _ = read_volume(seg_out)
    src, _ = read_volume(ct)
    assert back.same_grid(src)

    # Running the same command again resumes (nothing left to do at epoch 2 of 2).
    assert main([str(a) for a in argv]) == 0
    assert "resuming from" in capsys.readouterr().out
    assert len((out / "log.jsonl").read_text().splitlines()) == 2


@pytest.mark.parametrize("flip", [0.0, 1.0])
def test_flip_probability_zero_keeps_left_and_right(flip):
    """--flip-prob 0 --rot90-prob 0: every crop keeps the scan's left-right order (a flip
    would make a left kidney look like a right one); --flip-prob 1 reverses it."""
    card = tiny_card()
    _, rand = supervised.transforms(card, (64, 64, 64), 4, flip_prob=flip, rot90_prob=0.0)
    x = torch.arange(96)[:, None, None].expand(96, 80, 72)
    sample = {"image": MetaTensor((x.float() / 96.0)[None]), "label": MetaTensor((x // 8).to(torch.uint8)[None])}
    for crop in rand(sample):
        along_x = crop["label"].as_tensor()[0, :, 0, 0].int()
        steps = along_x[1:] - along_x[:-1]
        assert bool((steps >= 0).all()) if flip == 0.0 else bool((steps <= 0).all())
    with pytest.raises(UserError, match="--flip-prob"):
        bad = argparse.Namespace(flip_prob=1.5, rot90_prob=0.0)
        supervised.check_augmentation(bad)


def test_cosine_schedule_depends_on_the_epoch_alone():
    """--schedule cosine: the learning rate comes from the epoch number only, so a resumed
    run continues the same curve; constant stays at --lr."""
    rates = [epoch_learning_rate(1e-3, e, 10, "cosine") for e in range(1, 11)]
    assert rates[0] == pytest.approx(1e-3) and rates[5] == pytest.approx(0.5e-3)
    assert all(a > b for a, b in zip(rates, rates[1:])) and rates[-1] > 0
    assert epoch_learning_rate(1e-3, 7, 10, "constant") == 1e-3


def test_background_weight_centres_more_crops_on_background():
    """--background-weight W: crops centred on background W times as often as on each label
    (seen by where the crops' centres fall); zero or less is refused."""
    card = tiny_card()
    label = torch.zeros((1, 256, 64, 64), dtype=torch.uint8)
    label[0, 220:240, 20:40, 20:40] = 6  # one organ at one end; background everywhere else
    sample = {"image": MetaTensor(torch.rand((1, 256, 64, 64))), "label": MetaTensor(label)}
    with_organ = {}
    for weight in (1.0, 20.0):
        _, rand = supervised.transforms(card, (64, 64, 64), 60, flip_prob=0.0, rot90_prob=0.0, background_weight=weight)
        rand.set_random_state(0)
        with_organ[weight] = np.mean([bool((c["label"].as_tensor() == 6).any()) for c in rand(sample)])
    # weight 1: half the crops on the organ; weight 20: 1 in 21, plus background crops near it
    assert with_organ[1.0] > 0.5 and with_organ[20.0] < with_organ[1.0] - 0.2, with_organ
    with pytest.raises(UserError, match="--background-weight"):
        supervised.check_augmentation(argparse.Namespace(flip_prob=0.0, rot90_prob=0.0, background_weight=0.0))


def test_model_space_is_the_inference_recipe(tmp_path):
    """The training transforms put a pair in model space exactly as MONAI's Orientation,
    Spacing (the card's interpolation for the image, nearest for the labels) and
    ScaleIntensityRange do, in that order, and keep the labels uint8."""
    from conftest import make_affine, rotation
    from helpers import write_nifti
    from monai import transforms as T

    card = tiny_card()
    affine = make_affine((4.0, 5.0, 7.0), rotation(0.2, -0.1, 0.3) @ np.diag([-1.0, 1.0, 1.0]), (10.0, -5.0, 3.0))
    rng = np.random.default_rng(0)
    image = Volume(rng.integers(-300, 400, size=(21, 18, 15)).astype(np.int16), affine)
    lab = np.zeros(image.shape, np.uint8)
    lab[3:12, 4:10, 2:9], lab[12:19, 9:16, 7:13] = 1, 6
    write_nifti(image, tmp_path / "ct.nii.gz")
    write_nifti(image.with_array(lab), tmp_path / "lab.nii.gz")
    fixed, _ = supervised.transforms(card, (64, 64, 64), 1, train=False)
    got = fixed({"image": str(tmp_path / "ct.nii.gz"), "label": str(tmp_path / "lab.nii.gz")})
    written = read_volume(tmp_path / "ct.nii.gz")[0].ijk_to_ras  # the affine as NIfTI stores it

    it = card.intensity
    ref = T.Compose([
        T.Orientationd(keys=["image", "label"], axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S"))),
        T.Spacingd(keys=["image", "label"], pixdim=card.spacing, mode=(card.interpolation, "nearest")),
        T.ScaleIntensityRanged(keys="image", a_min=it["a_min"], a_max=it["a_max"], b_min=it["b_min"],
                               b_max=it["b_max"], clip=True),
    ])({"image": MetaTensor(torch.from_numpy(image.array.astype(np.float32))[None], affine=torch.tensor(written)),
        "label": MetaTensor(torch.from_numpy(lab)[None], affine=torch.tensor(written))})
    torch.testing.assert_close(got["image"].as_tensor(), ref["image"].as_tensor(), rtol=0, atol=0)
    assert got["label"].dtype == torch.uint8
    np.testing.assert_array_equal(got["label"].as_tensor().numpy(), ref["label"].as_tensor().numpy())
    np.testing.assert_allclose(got["image"].affine.numpy(), ref["image"].affine.numpy())
    assert set(np.unique(got["label"].as_tensor().numpy())) == {0, 1, 6}


def test_an_organ_the_model_invents_lowers_the_validation_dice():
    """A label absent from the truth but predicted scores Dice 0 and counts in the mean that
    chooses best.pt; a label absent from both is not scored."""
    truth = np.zeros((16, 16, 16), np.uint8)
    truth[2:8, 2:8, 2:8] = 1  # spleen
    truth[9:15, 9:15, 9:15] = 6  # liver
    faithful = truth.copy()
    inventive = truth.copy()
    inventive[0:2, 12:16, 0:4] = 3  # a left kidney that is not there
    assert dice_per_label(faithful, truth, BTCV.labels) == {"spleen": 1.0, "liver": 1.0}
    invented = dice_per_label(inventive, truth, BTCV.labels)
    assert invented == {"spleen": 1.0, "liver": 1.0, "left kidney": 0.0}
    assert mean_dice(invented) < mean_dice(dice_per_label(faithful, truth, BTCV.labels)) == 1.0
    half = truth.copy()
    half[2:5] = 0
    assert dice_per_label(half, truth, BTCV.labels)["spleen"] == pytest.approx(2 * 108 / (108 + 216))
    # Over scans: each label's mean over the scans that score it.
    assert average_scores([{"spleen": 1.0}, {"spleen": 0.5, "liver": 0.0}]) == {"spleen": 0.75, "liver": 0.0}
    assert mean_dice({}) == 0.0
