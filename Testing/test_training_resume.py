"""A resumed training is the run it continues: the same random draws per (seed, epoch,
rank), each torchrun rank its own augmentation stream, and a rerun with other settings
refused in one line.

The quick cases train a one-layer stand-in for the network on tiny synthetic scans (what
they test is the loop's bookkeeping, not SwinUNETR); the slow case trains the tiny card's
SwinUNETR itself.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_affine, tiny_card
from helpers import write_nifti

from SwinUNETRSegmentLib.cli.train import main as train_main
from SwinUNETRSegmentLib.errors import UserError
from SwinUNETRSegmentLib.geometry import Volume
from SwinUNETRSegmentLib.training import supervised
from SwinUNETRSegmentLib.training.common import epoch_seed, seed_epoch


def synthetic_pair(seed: int, shape=(30, 28, 26)) -> tuple[Volume, Volume]:
    """A CT-like scan at the tiny card's 6 mm spacing with a spleen (1) and a left kidney (3) box."""
    rng = np.random.default_rng(seed)
    affine = make_affine((6.0, 6.0, 6.0), origin=(seed * 3.0, -20.0, 5.0))
    image = rng.integers(-200, 260, size=shape).astype(np.int16)
    label = np.zeros(shape, np.uint8)
    label[4:12, 5:14, 3:11] = 1
    label[15:27, 10:24, 12:22] = 3
    image[label == 3] += 60
    return Volume(image, affine), Volume(label, affine)


def small_card():
    """The tiny card with its first three labels (spleen, right and left kidney)."""
    card = tiny_card(overlap=0.0)
    return dataclasses.replace(card, labels=card.labels[:3], network_args={**card.network_args, "out_channels": 4})


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """Folder with data.json (two synthetic pairs) and card.json (the tiny card, three labels)."""
    folder = tmp_path_factory.mktemp("resume")
    items = []
    for n in range(2):
        image, label = synthetic_pair(n)
        write_nifti(image, folder / f"ct{n}.nii.gz")
        write_nifti(label, folder / f"lab{n}.nii.gz")
        items.append({"image": f"ct{n}.nii.gz", "label": f"lab{n}.nii.gz"})
    (folder / "data.json").write_text(json.dumps({"training": items}))
    (folder / "card.json").write_text(json.dumps(small_card().to_json()))
    return folder


@pytest.fixture
def stand_in_network(monkeypatch):
    """One 3x3x3 convolution in place of the card's SwinUNETR (seeded like it: after set_determinism)."""
    monkeypatch.setattr(supervised, "build_network", lambda card: torch.nn.Conv3d(1, card.num_classes, 3, padding=1))


def argv(data: Path, out: Path, epochs: int, *extra, card: Path | None = None) -> list[str]:
    return [str(a) for a in ["--data", data / "data.json", "--card", card or data / "card.json", "--out", out,
                             "--epochs", epochs, "--steps-per-epoch", 1, "--crop", 64, 64, 64, "--num-samples", 2,
                             "--lr", 1e-2, "--device", "cpu", *extra]]


def losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "log.jsonl").read_text().splitlines()]


def resumed_equals_straight(data: Path, tmp_path: Path, epochs: int, card: Path | None = None) -> None:
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert train_main(argv(data, straight, epochs, "--val-every", epochs, card=card)) == 0
    assert train_main(argv(data, split, epochs // 2, "--val-every", 1, card=card)) == 0
    # --epochs, --val-every and --max-minutes may change on a resume.
    assert train_main(argv(data, split, epochs, "--val-every", epochs, "--max-minutes", 60, card=card)) == 0
    assert len(losses(split)) == epochs
    np.testing.assert_allclose(losses(split), losses(straight), rtol=1e-5, atol=0)
    a = torch.load(straight / "last.pt", weights_only=True)["model"]
    b = torch.load(split / "last.pt", weights_only=True)["model"]
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6)


def test_resumed_run_gives_the_losses_of_an_uninterrupted_run(data, tmp_path, stand_in_network, capsys):
    resumed_equals_straight(data, tmp_path, 2)
    assert "resuming from" in capsys.readouterr().out


@pytest.mark.slow
def test_resumed_swinunetr_run_gives_the_losses_of_an_uninterrupted_run(data, tmp_path):
    card = small_card()
    card = dataclasses.replace(card, network_args={**card.network_args, "window_size": 4})  # same modules, faster
    (tmp_path / "card.json").write_text(json.dumps(card.to_json()))
    resumed_equals_straight(data, tmp_path, 2, tmp_path / "card.json")


def test_each_rank_and_epoch_draws_its_own_crops():
    """seed_epoch reaches the random transforms (set_random_state): one stream per (seed,
    epoch, rank), the same stream again for the same triple."""
    _, rand = supervised.transforms(small_card(), (64, 64, 64), 2)
    image, label = synthetic_pair(0, shape=(80, 72, 70))
    sample = {"image": torch.from_numpy(image.array.astype(np.float32))[None],
              "label": torch.from_numpy(label.array)[None]}

    def crops(epoch: int, rank: int) -> torch.Tensor:
        seed_epoch(0, epoch, rank, [rand])
        return torch.stack([c["image"].as_tensor() for c in rand(dict(sample))])

    rank0, rank1 = crops(1, 0), crops(1, 1)
    assert not torch.equal(rank0, rank1)
    assert not torch.equal(rank0, crops(2, 0))
    assert torch.equal(rank0, crops(1, 0))
    seeds = {epoch_seed(0, e, r) for e in range(1, 50) for r in range(8)}
    assert len(seeds) == 49 * 8  # no two (epoch, rank) pairs share a seed (seed + epoch + 1000 * rank did)
    with pytest.raises(UserError, match="--seed -1"):
        epoch_seed(-1, 1, 0)


@pytest.fixture(scope="module")
def one_epoch(data, tmp_path_factory) -> Path:
    """A run of one epoch, to resume."""
    mp = pytest.MonkeyPatch()
    mp.setattr(supervised, "build_network", lambda card: torch.nn.Conv3d(1, card.num_classes, 3, padding=1))
    out = tmp_path_factory.mktemp("one") / "run"
    try:
        assert train_main(argv(data, out, 1)) == 0
    finally:
        mp.undo()
    return out


def _other_card(data: Path) -> Path:
    card = json.loads((data / "card.json").read_text())
    card["preprocessing"]["intensity"]["a_max"] = 300.0
    path = data / "other_card.json"
    path.write_text(json.dumps(card))
    return path


def _other_data(data: Path) -> Path:
    path = data / "other_data.json"
    path.write_text(json.dumps({"training": json.loads((data / "data.json").read_text())["training"][:1]}))
    return path


def _label_map(data: Path) -> Path:
    path = data / "map.json"
    path.write_text(json.dumps({"1": 1, "3": 3}))
    return path


@pytest.mark.parametrize("option, value, message", [
    ("--crop", ["96", "96", "96"], "--crop 64 64 64, not 96 96 96"),
    ("--lr", ["1e-3"], "--lr 0.01, not 0.001"),
    ("--num-samples", ["1"], "--num-samples 2, not 1"),
    ("--seed", ["1"], "--seed 0, not 1"),
    ("--schedule", ["cosine"], "--schedule constant, not cosine"),
    ("--flip-prob", ["0"], "--flip-prob 0.2, not 0.0"),
    ("--rot90-prob", ["0.5"], "--rot90-prob 0.2, not 0.5"),
    ("--background-weight", ["2"], "--background-weight 1.0, not 2.0"),
    ("--weight-decay", ["0.1"], "--weight-decay 1e-05, not 0.1"),
    ("--steps-per-epoch", ["3"], "--steps-per-epoch 1, not 3"),
    ("--card", _other_card, r"another --card \(its content differs\)"),
    ("--data", _other_data, r"another --data \(its content differs\)"),
    ("--label-map", _label_map, r"another --label-map \(its content differs\)"),
])
def test_resume_with_other_settings_is_refused_in_one_line(data, one_epoch, option, value, message):
    values = [str(value(data))] if callable(value) else value
    args = argv(data, one_epoch, 2)
    if option in args:
        i = args.index(option) + 1
        args[i:i + len(values)] = values
    else:
        args += [option, *values]
    with pytest.raises(UserError, match=message) as err:
        train_main(args)
    text = str(err.value)
    assert "\n" not in text and "another --out" in text and str(one_epoch / "last.pt") in text
    assert len(losses(one_epoch)) == 1  # nothing was trained


def test_resume_may_change_epochs_validation_time_and_device(data, one_epoch, stand_in_network, capsys):
    """--epochs (here: already done), --val-every, --max-minutes, --device, --name do not block."""
    assert train_main(argv(data, one_epoch, 1, "--val-every", 5, "--max-minutes", 3, "--name", "x")) == 0
    assert "resuming from" in capsys.readouterr().out
    assert len(losses(one_epoch)) == 1


def test_checkpoint_of_an_older_version_resumes_without_comparison(data, one_epoch, tmp_path, stand_in_network,
                                                                   capsys):
    import shutil

    out = tmp_path / "old"
    shutil.copytree(one_epoch, out)
    ckpt = torch.load(out / "last.pt", weights_only=True)
    del ckpt["settings"]
    torch.save(ckpt, out / "last.pt")
    assert train_main(argv(data, out, 1, "--lr", "1e-3")) == 0
    assert "records no settings" in capsys.readouterr().out


def test_a_run_records_its_card_and_becomes_a_builtin_model(data, one_epoch, tmp_path, monkeypatch):
    """card.json names the data by checksum and the run's Dice; publish_builtin copies best.pt
    into the package's weights and writes a card that names its SHA256."""
    from SwinUNETRSegmentLib.fileio.atomic import file_digest
    from SwinUNETRSegmentLib.models import cards, catalog

    trained = json.loads((one_epoch / "card.json").read_text())
    assert trained["checkpoint"]["sha256"] == file_digest(one_epoch / "best.pt")
    t = trained["training"]
    assert t["command"].startswith("swinunetr-segment train --data ") and t["seed"] == 0 and t["epoch"] == 1
    assert [d["image_sha256"] for d in t["data"]] == [file_digest(data / f"ct{n}.nii.gz") for n in range(2)]
    assert set(t["dice"]) <= {"spleen", "right kidney", "left kidney"} and 0 <= t["mean_dice"] <= 1

    monkeypatch.setattr(cards, "BUILTIN_CARD_DIR", tmp_path / "cards")
    monkeypatch.setattr(catalog, "BUNDLED_WEIGHTS_DIR", tmp_path / "weights")
    (tmp_path / "cards").mkdir()
    card, weights = supervised.publish_builtin(one_epoch, "tiny")
    assert card == tmp_path / "cards" / "tiny.json" and weights == tmp_path / "weights" / "tiny.pt"
    assert weights.read_bytes() == (one_epoch / "best.pt").read_bytes()
    published = json.loads(card.read_text())
    assert published["name"] == "tiny" and published["checkpoint"] == {"bundled": "tiny.pt",
                                                                       "sha256": file_digest(weights)}
