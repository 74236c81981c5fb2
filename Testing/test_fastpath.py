"""The fast path gives the plain path's labels, only cheaper.

Each piece of :class:`FastPath` is checked on the same input and grid against the plain
path: windows of pure air are not sent to the network and change nothing; the crop to the
body changes nothing for a network that looks only at each voxel; the slab-by-slab
probability resampling gives exactly the labels of MONAI's bilinear Invertd + argmax (the
reference's post-processing); bfloat16 stays within a stated tolerance; the out-of-memory
fallbacks happen in order; a second run of an unchanged volume skips preprocessing; the
geometry stays exact on every test grid.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import GRIDS, make_affine, tiny_card

from SwinUNETRSegmentLib.errors import CancelledError, UserError
from SwinUNETRSegmentLib.geometry import Volume
from SwinUNETRSegmentLib.inference import engine as engine_module
from SwinUNETRSegmentLib.inference import resample as resample_module
from SwinUNETRSegmentLib.inference.devices import (
    Plan,
    autocast_dtype,
    configure_threads,
    cpu_has_native_bf16,
    inference_plans,
    physical_cores,
    run_with_fallback,
)
from SwinUNETRSegmentLib.inference.engine import Segmenter
from SwinUNETRSegmentLib.inference.network import cpu_windows_per_call, is_swin, use_fused_attention
from SwinUNETRSegmentLib.inference.options import FastPath
from SwinUNETRSegmentLib.inference.resample import resample_argmax, resample_probabilities
from SwinUNETRSegmentLib.inference.windows import air_window_starts, body_box, count_windows, scan_interval

LIVER, SPLEEN = 6, 1
AIR_HU = -1000
#: the plain path with the reference's way back to the input grid: the baseline the
#: window-level pieces are compared with
PLAIN_PROB = FastPath.plain().but(resample="probabilities")


class ThresholdNet(torch.nn.Module):
    """Voxel by voxel: 'spleen' above 0.85, 'liver' above 0.4 (after the intensity window),
    else background. Counts the windows it is given."""

    def __init__(self, classes: int = 14):
        super().__init__()
        self.classes = classes
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.windows = 0
        self.calls = 0

    def scores(self, v):
        out = torch.full((v.shape[0], self.classes) + tuple(v.shape[1:]), -4.0, device=v.device)
        out[:, 0] = 4.0 * (0.4 - v)
        out[:, LIVER] = 4.0 * torch.minimum(v - 0.4, 0.85 - v)
        out[:, SPLEEN] = 4.0 * (v - 0.85)
        return out

    def forward(self, x):
        self.calls += 1
        self.windows += x.shape[0]
        return self.scores(x[:, 0])


class SmoothNet(ThresholdNet):
    """ThresholdNet after a 5-voxel box blur with zero padding: its answer near a window's
    edge depends on where the window is (as a real network's does)."""

    def forward(self, x):
        self.calls += 1
        self.windows += x.shape[0]
        v = torch.nn.functional.avg_pool3d(x, 5, stride=1, padding=2, count_include_pad=True)
        return self.scores(v[:, 0])


def oracle_card(spacing=(2.0, 2.0, 2.0), roi=16):
    """Small windows (16^3, overlap 0.25) so that a small volume has windows of pure air."""
    return tiny_card(spacing=tuple(float(s) for s in spacing), roi_size=(roi,) * 3, overlap=0.25, sw_batch_size=2)


def body_volume(grid, fov_mm: float = 80.0) -> tuple[Volume, np.ndarray, np.ndarray]:
    """Air filling an ``fov_mm`` cube around an ellipsoid 'body' (-50 HU, radii 13 to 15 mm)
    that holds a 'liver' box (100 HU, 0.65 after the window) and a 'spleen' box (250 HU,
    1.0). Returns (volume, liver mask, spleen mask)."""
    spacing, direction, origin = grid[1:]
    sp = np.asarray(spacing, float)
    shape = tuple(int(round(fov_mm / s)) for s in sp)
    mm = (np.indices(shape).astype(float) - ((np.array(shape) - 1) / 2.0)[:, None, None, None]) * sp[
        :, None, None, None
    ]
    body = ((mm[0] / 15.0) ** 2 + (mm[1] / 14.0) ** 2 + (mm[2] / 13.0) ** 2) <= 1.0
    liver = (np.abs(mm[0] + 4.0) <= 4.0) & (np.abs(mm[1]) <= 5.0) & (np.abs(mm[2]) <= 5.0)
    spleen = (np.abs(mm[0] - 6.5) <= 3.0) & (np.abs(mm[1] - 1.0) <= 4.0) & (np.abs(mm[2]) <= 4.0)
    arr = np.full(shape, AIR_HU, np.int16)
    arr[body] = -50
    arr[liver] = 100
    arr[spleen] = 250
    return Volume(arr, make_affine(spacing, direction, origin)), liver, spleen


def ras_spacing(vol: Volume) -> tuple[float, float, float]:
    import nibabel.orientations as nio

    axis = nio.io_orientation(vol.ijk_to_ras)[:, 0].astype(int)
    sp = np.empty(3)
    sp[axis] = vol.spacing
    return tuple(float(s) for s in sp)


ids = [g[0] for g in GRIDS]


# ---- windows of pure air ------------------------------------------------------------------
@pytest.mark.parametrize("grid", GRIDS, ids=ids)
def test_air_windows_are_not_run_and_change_nothing(grid):
    vol, _, _ = body_volume(grid)
    card = oracle_card((1.6, 1.6, 1.6))
    plain_net, fast_net = SmoothNet(), SmoothNet()
    plain = Segmenter(card, network=plain_net, device="cpu", fast=PLAIN_PROB).segment(vol)
    reports = []
    seg = Segmenter(card, network=fast_net, device="cpu", fast=PLAIN_PROB.but(skip_air=True))
    fast = seg.segment(vol, progress=reports.append)
    st = fast.stats
    assert st["windows_air"] > 0 and st["windows_run"] < st["windows_total"]
    # Every non-air window once, plus the one all-air window whose answer is then reused.
    assert fast_net.windows == st["windows_run"] + 1
    assert plain_net.windows == st["windows_total"]
    np.testing.assert_array_equal(fast.labels.array, plain.labels.array)
    # Progress still counts every window, air or not.
    windows = [p for p in reports if p.stage == "inference"]
    assert [p.done for p in windows] == list(range(st["windows_total"] + 1))
    assert windows[-1].message == f"window {st['windows_total']} of {st['windows_total']}"
    # The air answer is kept: a second run sends only the body's windows.
    before = fast_net.windows
    seg.segment(vol)
    assert fast_net.windows - before == st["windows_run"]


def test_window_at_the_intensity_floor_is_not_air():
    """Voxels exactly at a_min (not below it) are tissue at the window's edge: run them."""
    vol = Volume(np.full((30, 30, 30), -175, np.int16), np.diag([2.0, 2.0, 2.0, 1.0]))
    net = ThresholdNet()
    res = Segmenter(oracle_card(), network=net, device="cpu").segment(vol)
    assert res.stats["windows_air"] == 0 and net.windows == res.stats["windows_total"]


def test_all_air_volume_runs_one_window():
    vol = Volume(np.full((40, 40, 40), AIR_HU, np.int16), np.diag([2.0, 2.0, 2.0, 1.0]))
    net = ThresholdNet()
    res = Segmenter(oracle_card(), network=net, device="cpu").segment(vol)
    assert net.windows == 1 and res.stats["windows_run"] == 0
    assert not res.labels.array.any()


# ---- crop to the body ----------------------------------------------------------------------
@pytest.mark.parametrize("grid", GRIDS, ids=ids)
def test_crop_to_body_changes_nothing_for_a_voxelwise_network(grid):
    vol, liver, spleen = body_volume(grid)
    card = oracle_card((1.6, 1.6, 1.6))
    plain_net, net = ThresholdNet(), ThresholdNet()
    plain = Segmenter(card, network=plain_net, device="cpu", fast=PLAIN_PROB).segment(vol)
    res = Segmenter(card, network=net, device="cpu", fast=PLAIN_PROB.but(crop_to_body=True)).segment(vol)
    assert res.stats["crop"] is not None
    assert res.stats["windows_total"] < res.stats["windows_full_image"] == plain_net.windows
    assert net.windows == res.stats["windows_total"]
    np.testing.assert_array_equal(res.labels.array, plain.labels.array)
    assert (res.labels.array == LIVER).sum() > 0.8 * liver.sum()


def test_body_box_snaps_to_the_window_grid():
    air = torch.ones((200, 150, 100), dtype=torch.bool)
    air[70:130, 40:90, 10:60] = False
    box = body_box(air, (64, 64, 64), 0.5)
    assert [(s.start, s.stop) for s in box] == [(64, 130), (32, 96), (0, 64)]
    # Whole image or no body: no box.
    assert body_box(torch.zeros((80, 80, 80), dtype=torch.bool), (64, 64, 64), 0.5) is None
    assert body_box(torch.ones((80, 80, 80), dtype=torch.bool), (64, 64, 64), 0.5) is None
    # A box that saves no window is not worth moving the windows for (the real example CT:
    # its body fills the field of view but for a few air planes at the back).
    air = torch.ones((122, 101, 112), dtype=torch.bool)
    air[:, :97, :] = False
    assert body_box(air, (64, 64, 64), 0.25) is None


def test_air_window_starts_match_a_direct_check():
    from monai.data.utils import dense_patch_slices

    g = torch.Generator().manual_seed(1)
    air = torch.rand((70, 50, 20), generator=g) > 0.002  # mostly air, a few body voxels
    roi = (32, 32, 32)
    starts = air_window_starts(air, roi, 0.5, pad_is_air=True)
    padded = torch.ones((70, 50, 32), dtype=torch.bool)
    padded[:, :, 6:26] = air  # MONAI pads 12 before and after along the short axis
    size = list(padded.shape)
    direct = {
        tuple(s.start for s in sl)
        for sl in dense_patch_slices(size, list(roi), scan_interval(size, roi, 0.5))
        if bool(padded[sl].all())
    }
    assert starts == direct
    assert air_window_starts(air, roi, 0.5, pad_is_air=False) == set()


# ---- back to the input grid ----------------------------------------------------------------
def _smooth_probs(shape, classes=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    low = torch.rand((classes, 4, 4, 4), generator=g)
    up = torch.nn.functional.interpolate(low[None], size=tuple(shape), mode="trilinear", align_corners=True)[0]
    return torch.softmax(up * 8, 0)


def _invertd_case(grid, shape=(37, 29, 23)):
    """(input volume, model-space image, probabilities there, the labels of the reference's
    Invertd(bilinear) + argmax on the input grid) for a test grid."""
    from monai.data import MetaTensor
    from monai.transforms import Compose, Invertd, Orientationd, Spacingd

    spacing, direction, origin = grid[1:]
    vol = Volume(np.zeros(shape, np.float32), make_affine(spacing, direction, origin))
    pre = Compose(
        [Orientationd(keys="image", axcodes="RAS"), Spacingd(keys="image", pixdim=(1.7, 2.1, 1.3), mode="bilinear")]
    )
    data = pre({"image": MetaTensor(torch.zeros((1,) + shape), affine=torch.as_tensor(vol.ijk_to_ras))})
    img = data["image"]
    probs = _smooth_probs(img.shape[1:])
    pred = MetaTensor(probs.clone(), affine=img.affine)
    pred.applied_operations = img.applied_operations
    data["pred"] = pred
    inverted = Invertd(keys="pred", transform=pre, orig_keys="image", nearest_interp=False)(data)["pred"]
    assert np.allclose(inverted.affine.numpy(), vol.ijk_to_ras)
    return vol, img, probs, inverted.argmax(0).numpy().astype(np.uint8)


@pytest.mark.parametrize("grid", GRIDS, ids=ids)
def test_probability_resampling_equals_monai_invertd(grid):
    """Slab by slab gives exactly the labels of the reference's Invertd(bilinear) + argmax."""
    vol, img, probs, reference = _invertd_case(grid)
    ours = resample_probabilities(probs, img.affine.numpy(), vol.shape, vol.ijk_to_ras, slab_voxels=700)
    np.testing.assert_array_equal(ours, reference)


@pytest.mark.parametrize("grid", GRIDS, ids=ids)
def test_boundary_resampling_equals_monai_invertd(grid):
    """resample="boundaries" (labels travel, probabilities only where the eight neighbours
    disagree) gives the labels of the reference's Invertd(bilinear) + argmax on every grid,
    from logits rather than probabilities."""
    vol, img, probs, reference = _invertd_case(grid)
    logits = torch.log(probs) + 3.0  # any per-voxel shift: softmax undoes it
    ours = resample_argmax(logits, img.affine.numpy(), vol.shape, vol.ijk_to_ras, slab_voxels=700)
    assert len(np.unique(reference)) > 3  # boundaries to get right, not one label everywhere
    mismatch = int((ours != reference).sum())
    assert mismatch <= max(1, reference.size // 20000), f"{mismatch} voxels differ"  # float rounding at exact ties only


@pytest.mark.parametrize("dense", [0.0, 1.0], ids=["every-slab-interpolated", "boundary-voxels-only"])
@pytest.mark.parametrize("outside", ["border", "background"])
def test_boundary_resampling_equals_probability_resampling(outside, dense, monkeypatch):
    """Against the slab-by-slab probability resampling on a rotated, finer grid that reaches
    beyond model space (both ways of treating the outside) and with noisy logits, where
    nearly every cell holds a boundary; both ways a slab can go (boundary voxels only, or
    every voxel interpolated when boundaries are dense)."""
    monkeypatch.setattr(resample_module, "DENSE_BOUNDARIES", dense)
    g = torch.Generator().manual_seed(3)
    for logits in (torch.log(_smooth_probs((19, 17, 13), classes=5)), torch.randn((4, 9, 8, 7), generator=g)):
        src = make_affine((2.5, 2.0, 3.0), np.eye(3), (4.0, -3.0, 2.0))
        c, s_ = np.cos(0.4), np.sin(0.4)
        dst = make_affine((0.9, 1.1, 1.3), np.array([[c, -s_, 0], [s_, c, 0], [0, 0, 1.0]]), (-6.0, -8.0, -5.0))
        shape = (70, 60, 50)
        expected = resample_probabilities(torch.softmax(logits, 0), src, shape, dst, outside=outside)
        ours = resample_argmax(logits, src, shape, dst, outside=outside, slab_voxels=5000)
        assert (ours != expected).sum() <= 2
        assert len(np.unique(expected)) == logits.shape[0]


@pytest.mark.parametrize("grid", GRIDS, ids=ids)
def test_every_voxel_interpolated_axis_by_axis_equals_monai_invertd(grid, monkeypatch):
    """Where boundaries are dense (an untrained network's noise) every voxel of a slab is
    interpolated, axis by axis since the grids' axes correspond (Orientation and Spacing permute,
    flip and scale them, oblique scans included): the reference's Invertd(bilinear) + argmax
    labels on every grid kind."""
    vol, img, probs, reference = _invertd_case(grid)
    monkeypatch.setattr(resample_module, "DENSE_BOUNDARIES", 0.0)
    calls = []
    separable = resample_module._separable_argmax
    monkeypatch.setattr(resample_module, "_separable_argmax", lambda *a: calls.append(1) or separable(*a))
    ours = resample_argmax(torch.log(probs) - 1.0, img.affine.numpy(), vol.shape, vol.ijk_to_ras, slab_voxels=700)
    assert calls  # the axis-by-axis way ran
    mismatch = int((ours != reference).sum())
    assert mismatch <= max(1, reference.size // 20000), f"{mismatch} voxels differ"  # float rounding at exact ties only


@pytest.mark.parametrize("outside", ["border", "background"])
def test_axis_by_axis_interpolation_equals_grid_sample_beyond_model_space_and_on_noise(outside, monkeypatch):
    """Permuted, flipped, finer input axes reaching beyond model space, and noisy logits: the
    axis-by-axis interpolation gives grid_sample's labels (MONAI's SpatialResample) both ways of
    treating the outside."""
    monkeypatch.setattr(resample_module, "DENSE_BOUNDARIES", 0.0)
    g = torch.Generator().manual_seed(5)
    src = make_affine((2.5, 2.0, 3.0), np.eye(3), (4.0, -3.0, 2.0))
    dst = make_affine((0.9, 1.1, 1.3), np.array([[0, -1.0, 0], [0, 0, 1.0], [-1.0, 0, 0]]), (30.0, -8.0, 40.0))
    shape = (70, 60, 50)
    for logits in (torch.log(_smooth_probs((19, 17, 13), classes=5)), torch.randn((4, 9, 8, 7), generator=g)):
        assert resample_module._axis_aligned(np.linalg.solve(src, dst)) is not None
        expected = resample_probabilities(torch.softmax(logits, 0), src, shape, dst, outside=outside)
        ours = resample_argmax(logits, src, shape, dst, outside=outside, slab_voxels=5000)
        assert (ours != expected).sum() <= 2
        assert len(np.unique(expected)) == logits.shape[0]


def test_probability_resampling_outside_a_crop_is_background():
    probs = torch.zeros((3, 10, 10, 10))
    probs[2] = 1.0
    src = np.diag([2.0, 2.0, 2.0, 1.0])
    src[:3, 3] = 20.0  # the crop covers 20..38 mm
    dst = np.eye(4)
    labels = resample_probabilities(probs, src, (60, 60, 60), dst, outside="background")
    inside = np.zeros((60, 60, 60), bool)
    inside[20:39, 20:39, 20:39] = True
    assert (labels[inside] == 2).all()
    assert (labels[18:41, 18:41, 18:41] == 2).sum() <= 23**3
    assert (labels[:17] == 0).all() and (labels[42:] == 0).all()


@pytest.mark.parametrize("grid", [GRIDS[0], GRIDS[5]], ids=[GRIDS[0][0], GRIDS[5][0]])
def test_nearest_labels_way_back_with_the_crop_equals_the_plain_path(grid):
    """resample="labels" (argmax in model space, nearest neighbour back) over the body's box
    gives the plain path's labels: outside the box is background either way."""
    vol, liver, _ = body_volume(grid)
    card = oracle_card((2.3, 1.9, 2.6))
    plain = Segmenter(card, network=ThresholdNet(), device="cpu", fast=FastPath.plain()).segment(vol).labels.array
    res = Segmenter(
        card, network=ThresholdNet(), device="cpu", fast=FastPath(resample="labels", crop_to_body=True)
    ).segment(vol)
    assert res.stats["crop"] is not None
    np.testing.assert_array_equal(res.labels.array, plain)
    m = plain == LIVER
    assert 2 * (m & liver).sum() / (m.sum() + liver.sum()) > 0.7


# ---- precision and threads -----------------------------------------------------------------
def test_autocast_choice():
    cpu, cuda, mps = torch.device("cpu"), torch.device("cuda"), torch.device("mps")
    assert autocast_dtype(cpu, "float32") is None
    assert autocast_dtype(cpu, "bfloat16") == torch.bfloat16
    assert autocast_dtype(cuda, "auto") == torch.float16
    assert autocast_dtype(mps, "auto") is None
    assert autocast_dtype(cpu, "auto") == (torch.bfloat16 if cpu_has_native_bf16() else None)
    with pytest.raises(UserError, match="precision"):
        FastPath(precision="float8")
    with pytest.raises(UserError, match="resample"):
        FastPath(resample="cubic")
    with pytest.raises(UserError, match="threads"):
        FastPath(threads=0)


def test_bfloat16_labels_within_tolerance_of_float32(tiny_checkpoint):
    """The real network (feature_size 12, seeded random weights: small margins between
    classes, the hard case): bfloat16 autocast changes at most 2 % of the labels."""
    card = tiny_card(spacing=(4.0, 4.0, 4.0))
    vol, _, _ = body_volume(("3mm", (3.0, 3.0, 3.0), np.eye(3), (0.0, 0.0, 0.0)), fov_mm=120.0)
    f32 = Segmenter(card, tiny_checkpoint, device="cpu", fast=FastPath(precision="float32")).segment(vol)
    bf16 = Segmenter(card, tiny_checkpoint, device="cpu", fast=FastPath(precision="bfloat16")).segment(vol)
    assert bf16.stats["precision"] == "bfloat16" and f32.stats["precision"] == "float32"
    assert (f32.labels.array == bf16.labels.array).mean() >= 0.98
    # where bfloat16 is emulated (AVX2 laptops) the weights stay float32 under autocast
    # (test_engine_state checks the same by pretending on a CPU that has it natively)
    assert bf16.stats["weights"] == ("bfloat16" if cpu_has_native_bf16() else "float32")


def test_half_stitching_keeps_the_labels_and_leaves_the_exact_path_alone(tiny_checkpoint):
    """The real network (seeded random weights: the hard case, margins between classes are
    small) stitched in float16, which halves the run's largest array: at most 0.1 % of the
    labels change against a float32 buffer; precision float32 (the reference's answer)
    stitches in float32."""
    card = tiny_card(spacing=(4.0, 4.0, 4.0))
    vol, _, _ = body_volume(("3mm", (3.0, 3.0, 3.0), np.eye(3), (0.0, 0.0, 0.0)), fov_mm=120.0)
    fast = FastPath(backend="torch")  # bfloat16 weights where native: no autocast, which keeps float32
    half = Segmenter(card, tiny_checkpoint, device="cpu", fast=fast.but(precision="float32")).segment(vol)
    assert half.stats["stitching"] == "float32"  # the exact path
    f32 = Segmenter(card, tiny_checkpoint, device="cpu", fast=fast.but(half_stitching=False)).segment(vol)
    half = Segmenter(card, tiny_checkpoint, device="cpu", fast=fast).segment(vol)
    assert half.stats["stitching"] == "float16" and f32.stats["stitching"] == "float32"
    assert half.labels.shape == vol.shape and np.array_equal(half.labels.ijk_to_ras, vol.ijk_to_ras)
    assert (f32.labels.array == half.labels.array).mean() >= 0.999


@pytest.mark.slow
def test_bfloat16_weights_and_autocast_agree_and_a_callers_network_is_left_alone(tiny_checkpoint):
    """With bfloat16 the SwinUNETR runs with bfloat16 weights (no autocast) on CPUs that
    have it: labels within 2 % of float32 like autocast, and a network the caller handed in
    keeps its float32 weights (the engine casts a copy)."""
    from SwinUNETRSegmentLib.models.checkpoint import load_model

    card = tiny_card(spacing=(4.0, 4.0, 4.0))
    vol, _, _ = body_volume(("3mm", (3.0, 3.0, 3.0), np.eye(3), (0.0, 0.0, 0.0)), fov_mm=120.0)
    theirs = load_model(card, tiny_checkpoint)
    f32 = Segmenter(card, network=theirs, device="cpu", fast=FastPath(precision="float32")).segment(vol)
    weights = Segmenter(card, network=theirs, device="cpu", fast=FastPath(precision="bfloat16")).segment(vol)
    amp = Segmenter(
        card, network=theirs, device="cpu", fast=FastPath(precision="bfloat16", bf16_weights=False)
    ).segment(vol)
    assert next(theirs.parameters()).dtype == torch.float32
    assert f32.stats["weights"] == "float32" and amp.stats["weights"] == "float32"
    assert weights.stats["weights"] == ("bfloat16" if cpu_has_native_bf16() else "float32")
    assert (f32.labels.array == weights.labels.array).mean() >= 0.98
    assert (f32.labels.array == amp.labels.array).mean() >= 0.98


def test_fused_window_attention_gives_the_same_output(tiny_checkpoint):
    """MONAI's window attention through scaled_dot_product_attention: switched on in every
    Swin block, same logits as the plain attention to float rounding, shifted windows
    (masks) included."""
    from SwinUNETRSegmentLib.models.checkpoint import load_model

    net = load_model(tiny_card(), tiny_checkpoint).eval()
    x = torch.rand((1, 1, 64, 64, 64), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        assert use_fused_attention(net, False) == 8  # 4 stages x 2 blocks
        plain = net(x)
        assert use_fused_attention(net, True) == 8
        fused = net(x)
    assert (fused - plain).abs().max().item() < 1e-4
    assert not is_swin(ThresholdNet()) and is_swin(net)


def test_threads_from_physical_cores(monkeypatch):
    n = physical_cores()
    assert 1 <= n <= (os.cpu_count() or 1)
    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
        assert configure_threads("auto") == n
        assert configure_threads(1) == 1
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        assert configure_threads("auto") == 1  # the user's setting wins
        assert configure_threads(None) == torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


# ---- windows per call on the CPU ------------------------------------------------------------
def test_cpu_windows_per_call():
    assert cpu_windows_per_call(None) == 1  # auto: one window's activations at a time
    assert cpu_windows_per_call(3) == 3  # what the caller asks
    with pytest.raises(UserError, match="cpu_batch"):
        FastPath(cpu_batch=0)


def test_batched_windows_give_the_same_labels_and_progress_per_window():
    vol, _, _ = body_volume(GRIDS[3])
    card = oracle_card((1.5, 1.5, 1.5))
    one, three = SmoothNet(), SmoothNet()
    a = Segmenter(card, network=one, device="cpu", fast=FastPath(cpu_batch=1)).segment(vol)
    reports = []
    b = Segmenter(card, network=three, device="cpu", fast=FastPath(cpu_batch=3)).segment(vol, progress=reports.append)
    np.testing.assert_array_equal(a.labels.array, b.labels.array)
    assert b.stats["windows_per_call"] == 3 and three.windows == one.windows and three.calls < one.calls
    assert [p.done for p in reports if p.stage == "inference"] == list(range(b.stats["windows_total"] + 1))


def test_cancel_acts_inside_a_call_of_several_windows():
    """With several windows per call, cancel is checked between the network's blocks."""
    vol, _, _ = body_volume(GRIDS[0])
    cancel = threading.Event()

    class Stage(torch.nn.Module):
        def __init__(self, net, first):
            super().__init__()
            self.net, self.first, self.calls = net, first, 0

        def forward(self, x):
            self.calls += 1
            if self.first and self.calls == 2:
                cancel.set()  # the user presses Cancel during the second call's first block
            return x if self.first else self.net(x)

    class TwoBlocks(torch.nn.Module):
        def __init__(self):
            super().__init__()
            inner = ThresholdNet()
            self.block1, self.block2 = Stage(inner, True), Stage(inner, False)

        def forward(self, x):
            return self.block2(self.block1(x))

    net = TwoBlocks()
    seg = Segmenter(oracle_card((1.2, 1.2, 1.2)), network=net, device="cpu", fast=FastPath(cpu_batch=4))
    with pytest.raises(CancelledError):
        seg.segment(vol, cancel=cancel)
    assert net.block1.calls == 2 and net.block2.calls == 1
    # The hooks are gone afterwards, and the engine still works.
    assert not net.block1._forward_pre_hooks and not net.block2._forward_pre_hooks
    cancel.clear()
    assert seg.segment(vol, cancel=cancel).labels.shape == vol.shape


# ---- out of GPU memory ---------------------------------------------------------------------
def _oom():
    err = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError
    return err("CUDA out of memory. Tried to allocate 2.00 GiB")


def test_fallback_ladder_order():
    # "auto": MONAI's SlidingWindowInfererAdapt stitches on the GPU and moves to the CPU itself
    assert inference_plans(torch.device("cuda:0"), 4) == [Plan("auto", 4), Plan("cpu", 2), Plan("cpu", 1)]
    assert inference_plans(torch.device("cuda:0"), 4, gpu_stitching=False) == [
        Plan("cpu", 4),
        Plan("cpu", 2),
        Plan("cpu", 1),
    ]
    assert inference_plans(torch.device("cuda:0"), 1) == [Plan("auto", 1)]
    assert inference_plans(torch.device("cpu"), 4) == [Plan("cpu", 4)]


def test_fallbacks_happen_in_order_with_a_log_line(caplog):
    tried, emptied = [], []

    def attempt(plan):
        tried.append(plan)
        if len(tried) < 3:
            raise _oom()
        return "ok"

    plans = [Plan("cuda:0", 4), *inference_plans(torch.device("cuda:0"), 4, gpu_stitching=False)]
    with caplog.at_level(logging.WARNING, logger="SwinUNETRSegmentLib.inference.devices"):
        assert run_with_fallback(plans, attempt, empty_cache=lambda: emptied.append(1)) == "ok"
    assert tried == plans[:3]
    assert len(emptied) == 2
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "out of GPU memory with stitching on the GPU, 4 windows per call; "
        "retrying with stitching on the CPU, 4 windows per call",
        "out of GPU memory with stitching on the CPU, 4 windows per call; "
        "retrying with stitching on the CPU, 2 windows per call",
    ]


def test_fallback_gives_up_with_advice_and_passes_other_errors():
    def always(plan):
        raise _oom()

    with pytest.raises(
        UserError, match="out of GPU memory even with stitching on the CPU, 1 window per call.*device cpu"
    ):
        run_with_fallback(inference_plans(torch.device("cuda:0"), 2), always)

    def broken(plan):
        raise ValueError("not memory")

    with pytest.raises(ValueError, match="not memory"):
        run_with_fallback(inference_plans(torch.device("cuda:0"), 2), broken)


def test_engine_retries_after_out_of_memory(monkeypatch, caplog):
    """A network that runs out of memory on its first call: the engine retries with the
    next plan and the labels are those of an undisturbed run."""
    vol, _, _ = body_volume(GRIDS[0])
    card = oracle_card()
    expected = Segmenter(card, network=ThresholdNet(), device="cpu").segment(vol).labels.array

    class FlakyNet(ThresholdNet):
        def forward(self, x):
            if self.calls == 0:
                self.calls += 1
                raise _oom()
            return super().forward(x)

    monkeypatch.setattr(engine_module, "inference_plans", lambda device, b, gpu=True: [Plan("cpu", 2), Plan("cpu", 1)])
    reports = []
    with caplog.at_level(logging.WARNING, logger="SwinUNETRSegmentLib.inference.devices"):
        res = Segmenter(card, network=FlakyNet(), device="cpu").segment(vol, progress=reports.append)
    np.testing.assert_array_equal(res.labels.array, expected)
    assert any("retrying with stitching on the CPU, 1 window per call" in r.getMessage() for r in caplog.records)
    dones = [p.done for p in reports if p.stage == "inference"]
    assert dones[0] == 0 and dones.count(0) == 2 and dones[-1] == res.stats["windows_total"]


# ---- the warm engine -----------------------------------------------------------------------
def test_second_run_of_an_unchanged_volume_skips_preprocessing(monkeypatch):
    vol, _, _ = body_volume(GRIDS[2])
    net = ThresholdNet()
    seg = Segmenter(oracle_card(), network=net, device="cpu")
    spaced = []
    real = engine_module.prepare
    monkeypatch.setattr(engine_module, "prepare", lambda *a: spaced.append(1) or real(*a))
    first = seg.segment(vol)
    second = seg.segment(vol)
    assert len(spaced) == 1 and second.stats["preprocess_cached"] and not first.stats["preprocess_cached"]
    np.testing.assert_array_equal(first.labels.array, second.labels.array)
    # Same voxels in another array object: still the cache (the key is the content).
    copy = Volume(vol.array.copy(), vol.ijk_to_ras.copy())
    assert seg.segment(copy).stats["preprocess_cached"] and len(spaced) == 1
    # Edited in place (a Slicer volume node's array is): preprocessed again, new labels.
    vol.array[vol.array == 100] = 250
    third = seg.segment(vol)
    assert len(spaced) == 2 and not third.stats["preprocess_cached"]
    assert (third.labels.array == SPLEEN).sum() > (first.labels.array == SPLEEN).sum()
    # Another grid for the same voxels is another volume.
    moved = Volume(vol.array, make_affine((2.0, 2.0, 2.0), np.eye(3), (1.0, 0.0, 0.0)))
    assert not seg.segment(moved).stats["preprocess_cached"]


def test_a_warm_engine_asked_for_float32_does_not_reuse_the_float32_resampled_scan():
    """A warm engine's cached model-space scan was resampled in float32 (the default): a later
    run with precision float32, whose labels are the reference's exactly, resamples again in
    MONAI's float64 and gives a fresh float32 engine's labels."""
    vol, _, _ = body_volume(GRIDS[5])
    seg = Segmenter(oracle_card((1.5, 1.5, 2.0)), network=ThresholdNet(), device="cpu")
    seg.segment(vol)
    seg.fast = seg.fast.but(precision="float32")
    again = seg.segment(vol)
    assert not again.stats["preprocess_cached"]
    fresh = Segmenter(oracle_card((1.5, 1.5, 2.0)), network=ThresholdNet(), device="cpu",
                      fast=FastPath(precision="float32"))
    assert np.array_equal(seg._prepared[1].image, fresh.prepare(vol)[0].image)
    np.testing.assert_array_equal(again.labels.array, fresh.segment(vol).labels.array)


def test_cache_can_be_switched_off(monkeypatch):
    vol, _, _ = body_volume(GRIDS[0])
    seg = Segmenter(oracle_card(), network=ThresholdNet(), device="cpu", fast=FastPath(cache_preprocessed=False))
    seg.segment(vol)
    assert not seg.segment(vol).stats["preprocess_cached"]


# ---- geometry, progress and cancel with everything on ----------------------------------------
@pytest.mark.parametrize("grid", GRIDS, ids=ids)
def test_labels_exact_on_every_grid_with_the_fast_path(grid):
    """Model spacing equal to the input's: air skipped, body cropped, probabilities
    interpolated, and every voxel still comes back exactly."""
    vol, liver, spleen = body_volume(grid)
    net = ThresholdNet()
    res = Segmenter(oracle_card(ras_spacing(vol)), network=net, device="cpu", fast=FastPath(crop_to_body=True)).segment(
        vol
    )
    assert res.stats["crop"] is not None
    assert res.labels.shape == vol.shape and np.array_equal(res.labels.ijk_to_ras, vol.ijk_to_ras)
    expected = np.zeros(vol.shape, np.uint8)
    expected[liver] = LIVER
    expected[spleen] = SPLEEN
    np.testing.assert_array_equal(res.labels.array, expected)


def test_cancel_stops_within_one_window_with_air_skipping():
    vol, _, _ = body_volume(GRIDS[0])
    cancel = threading.Event()

    class Net(ThresholdNet):
        def forward(self, x):
            if self.windows == 2:
                cancel.set()
            return super().forward(x)

    net = Net()
    seg = Segmenter(oracle_card((1.2, 1.2, 1.2)), network=net, device="cpu")
    with pytest.raises(CancelledError):
        seg.segment(vol, cancel=cancel)
    assert net.windows == 3
    cancel.clear()
    assert seg.segment(vol, cancel=cancel).labels.shape == vol.shape


def test_count_windows_over_the_crop():
    vol, _, _ = body_volume(GRIDS[1])
    net = ThresholdNet()
    seg = Segmenter(
        oracle_card((1.0, 1.0, 1.0)), network=net, device="cpu", fast=FastPath(skip_air=False, crop_to_body=True)
    )
    res = seg.segment(vol)
    box = res.stats["crop"]
    assert net.windows == res.stats["windows_total"] == count_windows([b - a for a, b in box], (16, 16, 16), 0.25)
    assert res.stats["windows_full_image"] == count_windows(seg.preprocess(vol).shape[1:], (16, 16, 16), 0.25)


# ---- the benchmark (for people, not CI) ------------------------------------------------------
@pytest.mark.benchmark
def test_benchmark_quick_runs():
    bench = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_cpu.py"
    out = subprocess.run(
        [sys.executable, str(bench), "--quick", "--inputs", "quick"], capture_output=True, text=True, timeout=3600
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "reference" in out.stdout and "engine" in out.stdout


@pytest.mark.benchmark
def test_the_prepared_gpu_benchmark_runs_its_steps_on_the_cpu(tmp_path):
    """benchmarks/bench_gpu.py, the command a session with a lent GPU runs first (issue 16, item 5),
    goes through its steps on the CPU (--dry-run): the three pipelines, then the ladder's table."""
    bench = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_gpu.py"
    out = subprocess.run([sys.executable, str(bench), "--dry-run", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=3600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    report = json.loads((tmp_path / "gpu.json").read_text())
    assert set(report["bench"]["results"][0]["pipelines"]) >= {"reference", "engine", "exact"}
    assert 0.9 < report["float16_against_float32"]["mean_dice"] <= 1.0  # the default's labels against float32's
    assert report["ladder"][0]["cap_mb"] is None and "error" not in report["ladder"][0]
    text = (tmp_path / "gpu.md").read_text()
    assert "| none |" in text and "against exact (float32)" in text


@pytest.mark.parametrize("grid", GRIDS, ids=[g[0] for g in GRIDS])
def test_float32_resampling_keeps_the_grid_and_the_intensities_and_float32_precision_keeps_monais(grid):
    """The fast path resamples the scan to the model's grid in float32 (FastPath.float32_resampling):
    on every grid the model-space image has the float64 resampling's shape and affine exactly
    and its intensities to within 1e-5 of the window (a few thousandths of a HU); precision
    float32 (the reference's labels exactly) still resamples as MONAI's default does, in float64."""
    from monai import transforms as T

    from SwinUNETRSegmentLib.inference.preprocess import AXIS_LABELS, to_metatensor
    from SwinUNETRSegmentLib.inference.windows import prepare

    vol, _, _ = body_volume(grid)
    card = oracle_card((1.5, 1.5, 2.0))
    base = FastPath(skip_air=False)
    fast = prepare(card, vol, base, 0.25)
    exact = prepare(card, vol, base.but(precision="float32"), 0.25)
    assert tuple(fast.image.shape) == tuple(exact.image.shape)
    np.testing.assert_array_equal(fast.affine, exact.affine)
    diff = np.abs(np.asarray(fast.image, np.float64) - np.asarray(exact.image, np.float64))
    assert 0 < diff.max() < 1e-5  # float32 arithmetic did run, and changed the intensities by rounding only
    monai = to_metatensor(vol, np.float32)
    for t in (T.Orientation(axcodes=card.orientation, labels=AXIS_LABELS), T.Spacing(pixdim=card.spacing,
              mode=card.interpolation), T.ScaleIntensityRange(**card.intensity)):
        monai = t(monai)
    np.testing.assert_array_equal(np.asarray(exact.image), np.asarray(monai))
    np.testing.assert_array_equal(exact.affine, np.asarray(monai.affine, np.float64))
