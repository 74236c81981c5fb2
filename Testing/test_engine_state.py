"""The engine checks what it is given and leaves the process as it found it.

Each test here failed before the redesign: an unchecked volume went through
``Segmenter.segment``; bfloat16 weights were used on CPUs that only emulate bfloat16;
torch's thread count, MONAI's attention flags and a caller's network were left changed;
every torchrun process took all the cores; physical cores were counted on Linux only.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import make_affine, tiny_card
from test_fastpath import ThresholdNet, body_volume, oracle_card

from SwinUNETRSegmentLib.errors import UserError
from SwinUNETRSegmentLib.geometry import Volume
from SwinUNETRSegmentLib.inference import devices, network
from SwinUNETRSegmentLib.inference.engine import Segmenter
from SwinUNETRSegmentLib.inference.options import FastPath


# ---- the volume is checked, from Python too ------------------------------------------------
def _with(array):
    return Volume(array, make_affine((1.0, 1.0, 1.0)))


@pytest.mark.parametrize(
    "array, message",
    [
        (np.full((8, 8, 8), np.nan, np.float32), "512 NaN or Inf voxels"),
        (np.where(np.eye(8, dtype=bool)[..., None], np.inf, 0.0).repeat(8, 2).astype(np.float32), "NaN or Inf"),
        (np.zeros((8, 8, 1), np.int16), "2D image"),
        (np.zeros((1, 1, 1), np.int16), "single voxel"),
        (np.zeros((0, 8, 8), np.int16), "empty"),
        (np.zeros((8, 8, 8), np.complex64), "real-valued voxels"),
    ],
    ids=["nan", "inf", "one-slice", "one-voxel", "empty", "complex"],
)
def test_segment_rejects_a_volume_it_cannot_segment(array, message):
    net = ThresholdNet()
    seg = Segmenter(oracle_card(), network=net, device="cpu")
    with pytest.raises(UserError, match=message) as err:
        seg.segment(_with(array))
    assert "\n" not in str(err.value) and net.calls == 0


def test_segment_rejects_a_degenerate_matrix():
    vol = Volume(np.zeros((8, 8, 8), np.int16), np.diag([1.0, 0.0, 1.0, 1.0]))
    with pytest.raises(UserError, match="no valid voxel-to-world matrix"):
        Segmenter(oracle_card(), network=ThresholdNet(), device="cpu").segment(vol)


# ---- bfloat16 only where the CPU has it ----------------------------------------------------
def test_no_bfloat16_weights_on_a_cpu_that_emulates_it(monkeypatch, tiny_checkpoint):
    """Asked for bfloat16 on a CPU without native bfloat16 (AVX2 laptops): float32 weights
    under bfloat16 autocast, never bfloat16 weights."""
    from SwinUNETRSegmentLib.models.checkpoint import load_model

    if not devices.cpu_has_native_bf16():
        # a CPU that really emulates it: test_fastpath's bfloat16 run asserts the same there,
        # and an emulated bfloat16 window costs ~28 s of the quick tier
        pytest.skip("this CPU emulates bfloat16: test_bfloat16_labels_within_tolerance_of_float32 checks it")
    monkeypatch.setattr(devices, "_BF16_CPU", False)
    card = tiny_card(spacing=(4.0, 4.0, 4.0))
    vol, _, _ = body_volume(("3mm", (3.0, 3.0, 3.0), np.eye(3), (0.0, 0.0, 0.0)), fov_mm=120.0)
    res = Segmenter(
        card, network=load_model(card, tiny_checkpoint), device="cpu", fast=FastPath(precision="bfloat16")
    ).segment(vol)
    assert res.stats["weights"] == "float32" and res.stats["precision"] == "bfloat16"
    auto = Segmenter(card, network=load_model(card, tiny_checkpoint), device="cpu").segment(vol)
    assert auto.stats["weights"] == "float32" and auto.stats["precision"] == "float32"


def test_torch_held_to_avx2_is_not_native_bfloat16():
    """ATEN_CPU_CAPABILITY=avx2 keeps torch's kernels to AVX2: bfloat16 is emulated there
    whatever the CPU's flags say."""
    code = "from SwinUNETRSegmentLib.inference.devices import cpu_has_native_bf16 as f; print(f())"
    env = dict(os.environ, ATEN_CPU_CAPABILITY="avx2")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


# ---- nothing process-wide or of the caller's is left changed -------------------------------
def test_thread_count_is_restored_after_a_run():
    vol, _, _ = body_volume(("1mm", (1.0, 1.0, 1.0), np.eye(3), (0.0, 0.0, 0.0)))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        res = Segmenter(oracle_card(), network=ThresholdNet(), device="cpu", fast=FastPath(threads=2)).segment(vol)
        assert res.stats["threads"] == 2
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_a_callers_network_is_left_as_it_was(tiny_checkpoint):
    """Attention flags, train/eval modes, device and dtype of a network handed in are the
    caller's again after the run (the engine used the fused attention inside it)."""
    from SwinUNETRSegmentLib.models.checkpoint import load_model

    card = tiny_card(spacing=(4.0, 4.0, 4.0))
    theirs = load_model(card, tiny_checkpoint)
    network.use_fused_attention(theirs, False)
    theirs.train()
    vol, _, _ = body_volume(("3mm", (3.0, 3.0, 3.0), np.eye(3), (0.0, 0.0, 0.0)), fov_mm=120.0)
    seen = []
    attention = next(m for m in theirs.modules() if hasattr(m, "use_flash_attention"))
    hook = attention.register_forward_pre_hook(lambda m, a: seen.append((m.use_flash_attention, m.training)))
    try:
        Segmenter(card, network=theirs, device="cpu", fast=FastPath(precision="float32")).segment(vol)
    finally:
        hook.remove()
    assert seen and all(flash and not training for flash, training in seen)  # used fused, in eval mode
    assert not any(m.use_flash_attention for m in theirs.modules() if hasattr(m, "use_flash_attention"))
    assert all(m.training for m in theirs.modules())
    assert next(theirs.parameters()).dtype == torch.float32


# ---- threads under torchrun and on other systems -------------------------------------------
def test_torchrun_processes_share_the_cores(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    monkeypatch.setattr(devices, "physical_cores", lambda: 8)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert devices.threads_for("auto") == 2
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "16")
    assert devices.threads_for("auto") == 1
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert devices.threads_for("auto") == 8
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert devices.threads_for("auto") is None  # the user's setting wins


def test_physical_cores_on_macos_and_windows(monkeypatch):
    monkeypatch.setattr(devices.os.path, "isdir", lambda p: False)
    monkeypatch.setattr(devices.platform, "system", lambda: "Darwin")

    class Done:
        stdout = "6\n"

    monkeypatch.setattr(devices.subprocess, "run", lambda *a, **k: Done())
    assert devices.physical_cores() == 6
    monkeypatch.setattr(devices.platform, "system", lambda: "Windows")
    psutil = type(sys)("psutil")
    psutil.cpu_count = lambda logical=True: 4 if not logical else 8
    monkeypatch.setitem(sys.modules, "psutil", psutil)
    assert devices.physical_cores() == 4


# ---- no whole-volume copies on the way in -------------------------------------------------
def test_the_cache_key_and_the_checks_copy_no_volume():
    """A Slicer volume's array arrives as a [k, j, i] array seen as [i, j, k] (Fortran
    order): hashing it for the warm-engine cache and checking its voxels allocate a small
    fraction of its size (they used to copy it whole)."""
    import tracemalloc

    from SwinUNETRSegmentLib.geometry import check_volume
    from SwinUNETRSegmentLib.inference.windows import volume_key

    kji = np.random.default_rng(0).random((60, 128, 128), dtype=np.float32)
    vol = Volume.from_kji(kji, make_affine((1.0, 1.0, 2.0)))
    assert not vol.array.flags.c_contiguous
    tracemalloc.start()
    try:
        key = volume_key(vol.array, vol.ijk_to_ras, "x")
        check_volume(vol, "the volume")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < kji.nbytes / 10, f"{peak} bytes allocated for a {kji.nbytes}-byte volume"
    # the same voxels in C order are the same volume to the cache only if laid out alike,
    # and an edit changes the key
    assert volume_key(vol.array, vol.ijk_to_ras, "x") == key
    kji[0, 0, 0] += 1
    assert volume_key(vol.array, vol.ijk_to_ras, "x") != key


def test_engine_and_stand_in_are_segmenters():
    """The Slicer side relies on SegmenterProtocol: the engine and the torch-free stand-in
    both have it."""
    from SwinUNETRSegmentLib.inference.api import SegmenterProtocol
    from SwinUNETRSegmentSlicer.testing import ThresholdSegmenter

    assert isinstance(Segmenter(oracle_card(), network=ThresholdNet(), device="cpu"), SegmenterProtocol)
    assert isinstance(ThresholdSegmenter(), SegmenterProtocol)
    assert not isinstance(object(), SegmenterProtocol)
