"""Training on real CT, with NIfTI pseudo-labels and with a Slicer .seg.nrrd."""

from __future__ import annotations
from SwinUNETRSegmentLib.fileio.read import read_volume

import json

import numpy as np
import pytest
from conftest import tiny_card
from SwinUNETRSegmentLib.fileio import segnrrd as slicerio

from SwinUNETRSegmentLib.training import supervised as training
from SwinUNETRSegmentLib.models.cards import load_card
from SwinUNETRSegmentLib.errors import UserError
from SwinUNETRSegmentLib.geometry import Volume
from SwinUNETRSegmentLib.fileio.sampledata import TOTALSEG_TO_BTCV

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
    got = training.read_label(path, BTCV, ct)
    assert got.shape == ct.shape
    crop = (slice(10, 100), slice(5, 90), slice(20, 100))
    expected = np.zeros(ct.shape, np.uint8)
    expected[crop] = labels.array[crop]
    # Matched by SNOMED code although every name was edited; the tumour is left out.
    np.testing.assert_array_equal(got, expected)


def test_segment_matching_by_code_then_name():
    segs = [
        {"id": "a", "name": "whatever", "terminology": {"type": ["SCT", "64033007", "Kidney"], "typeModifier": ["SCT", "7771000", "Left"]}},
        {"id": "b", "name": "Liver"},
        {"id": "c", "name": "tumour", "terminology": {"type": ["SCT", "4147007", "Mass"]}},
    ]
    assert training.match_segments(segs, BTCV.labels) == {"a": 3, "b": 6}


def test_unmatched_segmentation_is_a_clear_error(tmp_path):
    ref = slicerio.SAMPLE_DATA_DIR / "Segmentation.seg.nrrd"  # chest: ribs, spine, lungs
    grid = Volume(np.zeros((4, 4, 4), np.int16), np.eye(4))
    with pytest.raises(UserError, match="no segment of Segmentation.seg.nrrd .*ribs.* matches a label of card 'btcv'"):
        training.read_label(ref, BTCV, grid)


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
            "--epochs", "2", "--steps-per-epoch", "3", "--crop", "64", "64", "64", "--num-samples", "1", "--lr", "2e-3",
            "--name", "tiny-trained"]
    assert main([str(a) for a in argv]) == 0, capsys.readouterr().err
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in log] == [1, 2]
    assert log[-1]["loss"] < log[0]["loss"]
    trained = json.loads((out / "card.json").read_text())
    assert trained["name"] == "tiny-trained" and trained["training"]["data"][0]["label"] == "corrected.seg.nrrd"
    assert set(trained["training"]["dice"]) <= {lab.name for lab in BTCV.labels}

    # The engine runs the trained card and its checkpoint, on the input's grid.
    seg_out = tmp_path / "ct.seg.nrrd"
    assert main(["-i", str(ct), "-o", str(seg_out), "--card", str(out / "card.json"), "--checkpoint", str(out / "best.pt"),
                 "--device", "cpu", "-q"]) == 0
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
    import argparse

    import torch
    from monai.data import MetaTensor

    card = tiny_card()
    _, rand = training.transforms(card, (64, 64, 64), 4, flip_prob=flip, rot90_prob=0.0)
    x = torch.arange(96)[:, None, None].expand(96, 80, 72)
    sample = {"image": MetaTensor((x.float() / 96.0)[None]), "label": MetaTensor((x // 8).to(torch.uint8)[None])}
    for crop in rand(sample):
        along_x = crop["label"].as_tensor()[0, :, 0, 0].int()
        steps = along_x[1:] - along_x[:-1]
        assert bool((steps >= 0).all()) if flip == 0.0 else bool((steps <= 0).all())
    with pytest.raises(UserError, match="--flip-prob"):
        bad = argparse.Namespace(flip_prob=1.5, rot90_prob=0.0)
        training._check_augmentation(bad)


def test_cosine_schedule_depends_on_the_epoch_alone():
    """--schedule cosine: the learning rate comes from the epoch number only, so a resumed
    run continues the same curve; constant stays at --lr."""
    import argparse

    args = argparse.Namespace(lr=1e-3, epochs=10, schedule="cosine")
    rates = [training._learning_rate(args, e) for e in range(1, 11)]
    assert rates[0] == pytest.approx(1e-3) and rates[5] == pytest.approx(0.5e-3)
    assert all(a > b for a, b in zip(rates, rates[1:])) and rates[-1] > 0
    args.schedule = "constant"
    assert training._learning_rate(args, 7) == 1e-3


def test_background_weight_centres_more_crops_on_background():
    """--background-weight W: crops centred on background W times as often as on each label
    (seen by where the crops' centres fall); zero or less is refused."""
    import argparse

    import torch
    from monai.data import MetaTensor

    card = tiny_card()
    label = torch.zeros((1, 256, 64, 64), dtype=torch.uint8)
    label[0, 220:240, 20:40, 20:40] = 6  # one organ at one end; background everywhere else
    sample = {"image": MetaTensor(torch.rand((1, 256, 64, 64))), "label": MetaTensor(label)}
    with_organ = {}
    for weight in (1.0, 20.0):
        _, rand = training.transforms(card, (64, 64, 64), 60, flip_prob=0.0, rot90_prob=0.0, background_weight=weight)
        rand.set_random_state(0)
        with_organ[weight] = np.mean([bool((c["label"].as_tensor() == 6).any()) for c in rand(sample)])
    # weight 1: half the crops on the organ; weight 20: 1 in 21, plus background crops near it
    assert with_organ[1.0] > 0.5 and with_organ[20.0] < with_organ[1.0] - 0.2, with_organ
    with pytest.raises(UserError, match="--background-weight"):
        training._check_augmentation(argparse.Namespace(flip_prob=0.0, rot90_prob=0.0, background_weight=0.0))
