"""The cached shifted-window attention (SwinUNETRSegmentLib/window_attention.py): the same
output as MONAI's fused attention bit for bit, nothing left behind after a run, training
untouched."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import tiny_card
from test_fastpath import body_volume

from SwinUNETRSegmentLib.inference.cpu.window_attention import cached_window_attention
from SwinUNETRSegmentLib.inference.engine import Segmenter
from SwinUNETRSegmentLib.inference.network import use_fused_attention
from SwinUNETRSegmentLib.inference.options import FastPath
from SwinUNETRSegmentLib.models.swin_unet import SwinUnet


def swinunetr(dtype=torch.float32, feature_size=12):
    from monai.networks.nets import SwinUNETR

    torch.manual_seed(0)
    net = SwinUNETR(in_channels=1, out_channels=14, feature_size=feature_size).eval().to(dtype)
    use_fused_attention(net, True)
    return net


def window(batch: int, size: int = 64, dtype=torch.float32):
    return torch.rand((batch, 1, size, size, size), generator=torch.Generator().manual_seed(batch)).to(dtype)


@pytest.mark.parametrize(
    "dtype", [torch.float32, pytest.param(torch.bfloat16, marks=pytest.mark.slow)], ids=["float32", "bfloat16"]
)
def test_cached_attention_gives_monais_output_bit_for_bit(dtype):
    """64^3 windows (stage 1: 64 shifted windows of 343 tokens), 1 and 3 per call (the
    shift mask broadcast over the call's windows), in the dtypes the engine runs in: exactly
    MONAI's fused attention."""
    net = swinunetr(dtype)
    with torch.inference_mode():
        for batch in (1, 3):
            x = window(batch, dtype=dtype)
            monai = net(x)
            for by_mask in (True, False) if dtype == torch.bfloat16 else (True,):  # both: the slow tier
                with cached_window_attention(net, by_mask=by_mask) as n:
                    assert n == 8  # 4 stages x 2 blocks
                    first = net(x)
                    again = net(x)  # served from the cache
                assert torch.equal(first, monai) and torch.equal(again, monai), f"{batch} windows, {by_mask}"


def test_attention_by_mask_plane_gives_monais_output():
    """The OpenVINO conversion's attention (``by_mask``: shifted blocks per group of windows
    sharing a mask plane, at most 8 groups) equals MONAI's fused attention, on 1 and 3
    windows per call and a window grid that is not a multiple of the window (96^3 at stage
    1: 48^3 tokens in 7^3 windows, padded)."""
    from SwinUNETRSegmentLib.inference.cpu import window_attention

    net = swinunetr()
    planes = []
    real = window_attention._groups_by_mask

    def counting(module, mask, n, dtype):
        groups = real(module, mask, n, dtype)
        planes.append(len(groups[0]))
        return groups

    window_attention._groups_by_mask = counting
    try:
        with torch.inference_mode():
            for batch, size in ((3, 64), (1, 96)):
                x = window(batch, size)
                monai = net(x)
                with cached_window_attention(net, by_mask=True):
                    out = net(x)
                assert float((out - monai).abs().max()) < 1e-5, f"{batch} x {size}^3"
                assert (out.argmax(1) == monai.argmax(1)).float().mean() > 0.9999
    finally:
        window_attention._groups_by_mask = real
    assert planes and max(planes) <= 8 and min(planes) >= 2  # shifted blocks only, grouped


def test_nothing_is_left_behind_and_runs_nest():
    """After the run the modules are MONAI's again (no instance forward, no cached tensors),
    also when two networks' runs nest; MONAI's module-level compute_mask is never replaced,
    so other SwinUNETRs in the process are untouched while a run is open."""
    from monai.networks.nets import swin_unetr

    original = swin_unetr.compute_mask
    a, b = swinunetr(), SwinUnet(in_channels=1, out_channels=3, feature_size=12).eval()
    use_fused_attention(b, True)
    with torch.inference_mode(), cached_window_attention(a) as na:
        with cached_window_attention(b) as nb:
            assert na == 8 and nb > 0
            assert swin_unetr.compute_mask is original
            b(window(1))
        assert swin_unetr.compute_mask is original
        a(window(1))
    assert swin_unetr.compute_mask is original
    for net in (a, b):
        for m in net.modules():
            assert not {"forward", "_swinunetr_segment_biases", "_swinunetr_segment_masks"} & set(m.__dict__)


@pytest.mark.slow
def test_plain_attention_and_training_are_untouched():
    """Without fused attention nothing is switched; with autograd on, MONAI's own forward
    runs (same output, gradients flow)."""
    net = swinunetr()
    use_fused_attention(net, False)
    with cached_window_attention(net) as n:
        assert n == 0
    use_fused_attention(net, True)
    x = window(1)
    ref = net(x).detach()  # autograd on: MONAI's plain attention
    with cached_window_attention(net):
        out = net(x)
        out.sum().backward()
    assert torch.equal(out.detach(), ref)
    assert all(p.grad is not None for p in net.parameters() if p.requires_grad)


def test_engine_labels_unchanged_by_the_cached_attention(tiny_checkpoint):
    """Through the engine (float32, two windows per call): the same labels with the cache
    on and off, and the stats say how many attention modules it served."""
    card = tiny_card(spacing=(4.0, 4.0, 4.0))
    vol, _, _ = body_volume(("3mm", (3.0, 3.0, 3.0), np.eye(3), (0.0, 0.0, 0.0)), fov_mm=120.0)
    on = Segmenter(card, tiny_checkpoint, device="cpu", fast=FastPath(precision="float32", cpu_batch=2)).segment(vol)
    off = Segmenter(
        card, tiny_checkpoint, device="cpu", fast=FastPath(precision="float32", cpu_batch=2, cached_attention=False)
    ).segment(vol)
    assert on.stats["attention_cached"] == 8 and off.stats["attention_cached"] == 0
    assert np.array_equal(on.labels.array, off.labels.array)


def test_a_shifted_layer_keeps_its_mask_planes_not_monais_mask():
    """Memory of a run: with attention by mask plane, each shifted Swin layer holds its mask's
    few distinct ``(n, n)`` planes through the segmentation, not MONAI's ``(windows, n, n)``
    float32 mask (161 MB at stage 1 of a 96^3 window, for every window of the run); MONAI's
    whole mask is still there for MONAI's own attention (``full``), value for value."""
    from monai.networks.nets.swin_unetr import compute_mask

    from SwinUNETRSegmentLib.inference.cpu.window_attention import MaskPlanes

    net = swinunetr()
    with torch.inference_mode(), cached_window_attention(net, by_mask=True):
        net(window(1, 96))
        held = [v for m in net.modules() for v in getattr(m, "_swinunetr_segment_masks", {}).values()]
        assert held and all(isinstance(v, MaskPlanes) for v in held)
        stage1 = max(held, key=lambda planes: planes.shape[0])
        assert stage1.shape == (343, 343, 343)  # 48^3 tokens padded to 49^3: 7^3 windows of 7^3
        kept = sum(p.numel() * p.element_size() for _, p in stage1.groups)
        assert len(stage1.groups) <= 8 and kept <= 8 * 343 * 343 * 4  # at most 3.8 MB, not 161
        assert torch.equal(stage1.full(), compute_mask([49, 49, 49], (7, 7, 7), (3, 3, 3), torch.device("cpu")))
