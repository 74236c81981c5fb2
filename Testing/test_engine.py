"""The engine: labels land on the input's voxels, progress and cancel work, the model
is loaded once."""

from __future__ import annotations

import dataclasses
import threading

import numpy as np
import pytest
import torch
from conftest import GRIDS, make_affine, tiny_card

from SwinUNETRSegmentLib.errors import CancelledError, UserError
from SwinUNETRSegmentLib.geometry import Volume
from SwinUNETRSegmentLib.inference.devices import resolve_device
from SwinUNETRSegmentLib.inference.engine import Segmenter
from SwinUNETRSegmentLib.inference.options import FastPath
from SwinUNETRSegmentLib.inference.windows import count_windows
from SwinUNETRSegmentLib.models import checkpoint as ckpt

LIVER = 6


class ThresholdNet(torch.nn.Module):
    """A stand-in network whose answer is known: voxels brighter than 0.5 (after the card's
    intensity scaling) are 'liver', the rest background. Counts its calls."""

    def __init__(self, classes: int = 14, label: int = LIVER):
        super().__init__()
        self.classes, self.label = classes, label
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.calls = 0
        self.windows = 0

    def forward(self, x):
        self.calls += 1
        self.windows += x.shape[0]
        out = torch.full((x.shape[0], self.classes) + tuple(x.shape[2:]), -10.0)
        out[:, 0] = 0.5 - x[:, 0]
        out[:, self.label] = x[:, 0] - 0.5
        return out


def oracle_card(spacing=(2.0, 2.0, 2.0)):
    return tiny_card(spacing=tuple(spacing), roi_size=(32, 32, 32), overlap=0.25, sw_batch_size=2)


def box_volume(grid, shape=(40, 36, 30)) -> tuple[Volume, np.ndarray]:
    spacing, direction, origin = grid[1:]
    # -175 and 250 HU scale to 0 and 1: the threshold (0.5) lies midway, so resampling
    # moves neither edge of the box more than the other.
    arr = np.full(shape, -175, np.int16)
    box = np.zeros(shape, bool)
    box[9:31, 8:27, 7:22] = True
    arr[box] = 250
    return Volume(arr, make_affine(spacing, direction, origin)), box


def ras_spacing(vol: Volume) -> tuple[float, float, float]:
    """The input's voxel sizes in the order of the axes closest to R, A, S."""
    import nibabel.orientations as nio

    axis = nio.io_orientation(vol.ijk_to_ras)[:, 0].astype(int)  # RAS axis of each voxel axis
    sp = np.empty(3)
    sp[axis] = vol.spacing
    return tuple(float(s) for s in sp)


@pytest.mark.parametrize("grid", GRIDS, ids=[g[0] for g in GRIDS])
def test_labels_exact_on_input_grid_when_model_spacing_matches(grid):
    """Reoriented to RAS and back with no change of voxel size: every voxel must come back
    exactly (an off-by-one or a flip anywhere in the path fails here)."""
    vol, box = box_volume(grid)
    seg = Segmenter(oracle_card(ras_spacing(vol)), network=ThresholdNet(), device="cpu")
    res = seg.segment(vol)
    assert res.labels.shape == vol.shape
    assert np.array_equal(res.labels.ijk_to_ras, vol.ijk_to_ras)
    assert res.labels.array.dtype == np.uint8
    np.testing.assert_array_equal(res.labels.array, np.where(box, LIVER, 0))


def _centroid_mm(vol: Volume, mask: np.ndarray) -> np.ndarray:
    return vol.ijk_to_world(np.argwhere(mask).mean(axis=0))[0]


@pytest.mark.parametrize("grid", GRIDS, ids=[g[0] for g in GRIDS])
def test_labels_line_up_after_resampling(grid):
    """Through a different model spacing and back: same place, same size, never mirrored."""
    vol, box = box_volume(grid)
    model_spacing = np.array([2.2, 1.9, 2.6])
    seg = Segmenter(oracle_card(model_spacing), network=ThresholdNet(), device="cpu")
    res = seg.segment(vol)
    assert res.labels.shape == vol.shape and np.array_equal(res.labels.ijk_to_ras, vol.ijk_to_ras)
    got = res.labels.array == LIVER
    dice = 2 * np.logical_and(got, box).sum() / (got.sum() + box.sum())
    assert dice > 0.9, dice
    # Nearest-neighbour labels move an edge by at most half a model voxel.
    shift = np.linalg.norm(_centroid_mm(vol, got) - _centroid_mm(vol, box))
    assert shift < 0.5 * np.linalg.norm(model_spacing), shift


def test_asymmetric_object_is_not_mirrored():
    """An L-shaped object: a flip of any axis would move its centroid by many mm."""
    grid = GRIDS[6]  # oblique and left-handed
    spacing, direction, origin = grid[1:]
    arr = np.full((40, 36, 30), -1000, np.int16)
    arr[5:35, 5:12, 5:12] = 200
    arr[5:12, 5:30, 5:12] = 200
    arr[5:12, 5:12, 5:25] = 200
    vol = Volume(arr, make_affine(spacing, direction, origin))
    res = Segmenter(oracle_card((1.7, 1.7, 1.7)), network=ThresholdNet(), device="cpu").segment(vol)
    truth = arr > 0
    got = res.labels.array == LIVER
    assert np.linalg.norm(_centroid_mm(vol, got) - _centroid_mm(vol, truth)) < 1.0
    assert 2 * np.logical_and(got, truth).sum() / (got.sum() + truth.sum()) > 0.85


def test_progress_reports_every_window_and_time_left():
    vol, _ = box_volume(GRIDS[0])
    net = ThresholdNet()
    card = oracle_card((1.0, 1.0, 1.0))
    reports = []
    res = Segmenter(card, network=net, device="cpu").segment(vol, progress=reports.append)
    windows = [p for p in reports if p.stage == "inference"]
    assert windows[-1].done == windows[-1].total == net.windows
    assert [p.done for p in windows] == list(range(0, net.windows + 1))
    fractions = [p.fraction for p in reports]
    assert fractions == sorted(fractions) and 0 <= fractions[0] and fractions[-1] <= 1
    assert all(p.seconds_left is not None and p.seconds_left >= 0 for p in windows[1:])
    assert windows[-1].message == f"window {net.windows} of {net.windows}"
    assert res.timings["inference"] > 0


def test_count_windows_matches_monai():
    net = ThresholdNet()
    vol, _ = box_volume(GRIDS[1])
    card = oracle_card((0.5, 0.5, 0.5))
    seg = Segmenter(card, network=net, device="cpu")
    img = seg.preprocess(vol)
    seg.segment(vol)
    assert net.windows == count_windows(img.shape[1:], card.roi_size, card.overlap)


def test_cancel_from_another_thread_stops_within_a_window():
    vol, _ = box_volume(GRIDS[0])
    cancel = threading.Event()

    class SlowNet(ThresholdNet):
        def forward(self, x):
            if self.windows == 1 and self.calls == 1:
                cancel.set()  # the user presses Cancel while window 2 runs
            return super().forward(x)

    net = SlowNet()
    seg = Segmenter(oracle_card((1.0, 1.0, 1.0)), network=net, device="cpu")
    with pytest.raises(CancelledError):
        seg.segment(vol, cancel=cancel)
    assert net.windows == 2
    # The engine is still usable afterwards.
    cancel.clear()
    net.calls = 99
    assert seg.segment(vol, cancel=cancel).labels.shape == vol.shape


def test_cancel_from_a_real_thread():
    vol, _ = box_volume(GRIDS[0])
    cancel = threading.Event()
    started = threading.Event()

    class Net(ThresholdNet):
        def forward(self, x):
            started.set()
            threading.Event().wait(0.05)
            return super().forward(x)

    net = Net()
    seg = Segmenter(oracle_card((0.8, 0.8, 0.8)), network=net, device="cpu")
    errors = []

    def work():
        try:
            seg.segment(vol, cancel=cancel)
        except CancelledError as exc:
            errors.append(exc)

    t = threading.Thread(target=work)
    t.start()
    assert started.wait(10)
    cancel.set()
    seen = net.windows
    t.join(10)
    assert not t.is_alive() and errors
    assert net.windows <= seen + 1


def test_model_loaded_once_and_reused(monkeypatch, tiny_checkpoint):
    loads = []
    real = ckpt.load_model

    def counting(card, path):
        loads.append(path)
        return real(card, path)

    monkeypatch.setattr(ckpt, "load_model", counting)
    card = tiny_card()
    seg = Segmenter(card, tiny_checkpoint, device="cpu")
    a = Volume(np.zeros((20, 20, 20), np.int16), np.diag([6.0, 6.0, 6.0, 1.0]))
    b = Volume(np.full((25, 20, 15), 100, np.int16), np.diag([-5.0, 6.0, 7.0, 1.0]))
    assert seg.segment(a).labels.shape == a.shape
    assert seg.segment(b).labels.shape == b.shape
    assert len(loads) == 1


def test_device_choice():
    assert resolve_device("auto").type in ("cuda", "mps", "cpu")
    assert resolve_device("cpu").type == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="not available"):
            resolve_device("cuda")
    with pytest.raises(UserError, match="unknown device"):
        resolve_device("tpu-banana")


def test_bad_overlap_and_batch():
    with pytest.raises(UserError, match="overlap"):
        Segmenter(oracle_card(), network=ThresholdNet(), overlap=1.0)
    with pytest.raises(UserError, match="sw-batch-size"):
        Segmenter(oracle_card(), network=ThresholdNet(), sw_batch_size=0)


@pytest.mark.slow
def test_real_swinunetr_keeps_the_grid(tiny_checkpoint):
    """The real network (feature_size 12) on an oblique, anisotropic grid: the input's grid
    exactly, and in float32 the labels of the plain path (MONAI's attention, every window)
    with the same way back."""
    card = dataclasses.replace(tiny_card(), spacing=(5.0, 5.0, 5.0))
    vol = Volume(
        np.random.default_rng(0).integers(-200, 300, (50, 40, 12)).astype(np.int16),
        make_affine((1.3, 1.1, 4.0), GRIDS[5][2], (10.0, 20.0, 30.0)),
    )
    res = Segmenter(card, tiny_checkpoint, device="cpu", fast=FastPath(precision="float32")).segment(vol)
    assert res.labels.shape == vol.shape
    assert np.array_equal(res.labels.ijk_to_ras, vol.ijk_to_ras)
    plain = Segmenter(card, tiny_checkpoint, device="cpu", fast=FastPath.plain().but(resample="boundaries")).segment(
        vol
    )
    assert (res.labels.array == plain.labels.array).mean() > 0.99
