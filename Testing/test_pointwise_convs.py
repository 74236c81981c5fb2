"""1x1x1 and kernel-equals-stride transposed 3D convolutions as matrix products
(SwinUNETRSegmentLib/pointwise_convs.py): the same outputs as torch's convolutions, only
the modules whose arithmetic is a channel product switched, nothing left behind."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import tiny_card
from test_fastpath import body_volume
from torch import nn

from SwinUNETRSegmentLib.inference.cpu.pointwise_convs import pointwise_as_matmul
from SwinUNETRSegmentLib.inference.engine import Segmenter
from SwinUNETRSegmentLib.inference.options import FastPath


def close(a, b, dtype):
    """Equal up to one rounding step of ``dtype`` (a product's blocking may sum in another order)."""
    tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
    return (
        a.shape == b.shape
        and a.dtype == b.dtype
        and (a.float() - b.float()).abs().max().item() <= tol * max(1.0, b.abs().max().item())
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize(
    "layer",
    [
        nn.Conv3d(24, 12, 1, bias=False),
        nn.Conv3d(12, 5, 1, bias=True),
        nn.Conv3d(1, 12, 1),
        nn.ConvTranspose3d(24, 12, 2, stride=2, bias=False),
        nn.ConvTranspose3d(6, 4, 2, stride=2, bias=True),
        nn.ConvTranspose3d(6, 4, (1, 2, 3), stride=(1, 2, 3)),
    ],
    ids=["1x1-24-12", "1x1-bias", "1x1-from-1", "up2", "up2-bias", "up-anisotropic"],
)
def test_switched_layers_give_the_convolutions_output(layer, dtype):
    torch.manual_seed(0)
    layer = layer.eval().to(dtype)
    x = torch.randn(2, layer.in_channels, 9, 10, 11).to(dtype)
    with torch.inference_mode():
        want = layer(x)
        with pointwise_as_matmul(layer) as n:
            got = layer(x)
    assert n == 1 and close(got, want, dtype)
    assert "forward" not in layer.__dict__  # the module's own forward again


def test_only_channel_products_are_switched_and_autograd_falls_back():
    """Padded, strided, grouped or 3x3x3 convolutions keep torch's forward; with autograd
    on, a switched layer calls torch's own (gradients flow); so does a non-contiguous input."""
    keep = nn.Sequential(
        nn.Conv3d(4, 4, 3, padding=1),
        nn.Conv3d(4, 4, 1, stride=2),
        nn.Conv3d(4, 4, 1, groups=2),
        nn.Conv3d(4, 4, 1, padding=1),
        nn.ConvTranspose3d(4, 4, 3, stride=2),
        nn.Conv2d(4, 4, 1),
    )
    with pointwise_as_matmul(keep) as n:
        assert n == 0
    layer = nn.Conv3d(4, 3, 1)
    x = torch.randn(1, 4, 5, 6, 7)
    with pointwise_as_matmul(layer):
        layer(x).sum().backward()
        with torch.inference_mode():
            strided = x.transpose(2, 4)
            assert torch.allclose(
                layer(strided), torch.nn.functional.conv3d(strided, layer.weight, layer.bias), atol=1e-6
            )
    assert layer.weight.grad is not None


@pytest.mark.slow
def test_engine_labels_unchanged_by_the_channel_products(tiny_checkpoint):
    """The real network through the engine (float32): the same labels with the switch on
    and off; the stats say how many layers it switched (a SwinUNETR has 12)."""
    card = tiny_card(spacing=(4.0, 4.0, 4.0))
    vol, _, _ = body_volume(("3mm", (3.0, 3.0, 3.0), np.eye(3), (0.0, 0.0, 0.0)), fov_mm=120.0)
    on = Segmenter(card, tiny_checkpoint, device="cpu", fast=FastPath(precision="float32")).segment(vol)
    off = Segmenter(
        card, tiny_checkpoint, device="cpu", fast=FastPath(precision="float32", pointwise_matmul=False)
    ).segment(vol)
    assert on.stats["pointwise_matmul"] == 12 and off.stats["pointwise_matmul"] == 0
    assert np.array_equal(on.labels.array, off.labels.array)
