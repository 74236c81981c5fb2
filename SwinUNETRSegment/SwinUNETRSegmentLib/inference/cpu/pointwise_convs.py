"""Pointwise 3D convolutions as matrix products on the CPU, at inference.

A SwinUNETR's full-resolution decoder holds four convolutions that mix channels only:
the residual 1x1x1 convolutions of ``encoder1`` and ``decoder1``, the 1x1x1 output
convolution, and the 2x2x2 stride-2 transposed convolutions that upsample each decoder
stage. On a CPU, PyTorch hands them to oneDNN, whose NCDHW path reorders the activations
into a blocked layout and back around every call; at 96^3 that costs more than the
arithmetic. Written as one matrix product over the channels (plus, for the transposed
convolution, one permute that interleaves the 2x2x2 outputs), they are the same sums,
with outputs equal bit for bit in bfloat16 and float32 (the gain per layer is in
benchmarks/README.md). No library
offers this for Conv3d (``torch.nn.Linear`` is the same product but wants channels last),
hence these few lines.

Only modules whose arithmetic is exactly a channel product are switched: groups 1, no
padding or dilation, stride 1 for a 1x1x1 convolution, stride equal to the kernel for a
transposed one, contiguous CPU input, no autograd. Anything else calls the module's own
forward. The switch lasts while :func:`pointwise_as_matmul` is open.
"""

from __future__ import annotations

import contextlib
import types
from typing import Iterator


def _pointwise_forward(self, x):
    import torch

    if torch.is_grad_enabled() or x.device.type != "cpu" or not x.is_contiguous() or x.dim() != 5:
        return type(self).forward(self, x)
    n, c = x.shape[:2]
    spatial = x.shape[2:]
    w = self.weight.reshape(self.out_channels, c)
    flat = x.reshape(n, c, -1)
    if self.bias is None:
        # bmm, not matmul: matmul folds the batch into the rows of one product and
        # transposes around it (two extra copies of the activations)
        y = torch.bmm(w.expand(n, -1, -1), flat)
    else:  # the bias inside the product: one rounding, as the convolution does
        y = torch.baddbmm(self.bias.view(1, -1, 1).expand(n, -1, flat.shape[2]), w.expand(n, -1, -1), flat)
    return y.view(n, self.out_channels, *spatial)


def _upsample_forward(self, x, output_size=None):
    import torch

    if (
        output_size is not None
        or torch.is_grad_enabled()
        or x.device.type != "cpu"
        or not x.is_contiguous()
        or x.dim() != 5
    ):
        return type(self).forward(self, x, output_size)
    n, c, d, h, w = x.shape
    kd, kh, kw = self.kernel_size
    out = self.out_channels
    k = kd * kh * kw
    weight = self.weight.reshape(c, out * k).t()  # (out * k, c): row o * k + a * kh * kw + b * kw + e
    flat = x.reshape(n, c, d * h * w)
    if self.bias is None:
        y = torch.bmm(weight.expand(n, -1, -1), flat)
    else:
        bias = self.bias.repeat_interleave(k).view(1, -1, 1).expand(n, -1, flat.shape[2])
        y = torch.baddbmm(bias, weight.expand(n, -1, -1), flat)
    # (n, out, kd, kh, kw, d, h, w) -> (n, out, d, kd, h, kh, w, kw): each input voxel's
    # k outputs land in its kd x kh x kw block of the upsampled grid.
    y = y.view(n, out, kd, kh, kw, d, h, w).permute(0, 1, 5, 2, 6, 3, 7, 4)
    return y.reshape(n, out, d * kd, h * kh, w * kw)


def _is_pointwise(m) -> bool:
    from torch import nn

    return (
        type(m) is nn.Conv3d
        and tuple(m.kernel_size) == (1, 1, 1)
        and tuple(m.stride) == (1, 1, 1)
        and m.groups == 1
        and m.padding_mode == "zeros"
        and tuple(m.padding) == (0, 0, 0)
    )


def _is_upsampling(m) -> bool:
    from torch import nn

    return (
        type(m) is nn.ConvTranspose3d
        and tuple(m.kernel_size) == tuple(m.stride)
        and m.groups == 1
        and tuple(m.padding) == (0, 0, 0)
        and tuple(m.output_padding) == (0, 0, 0)
        and tuple(m.dilation) == (1, 1, 1)
    )


@contextlib.contextmanager
def pointwise_as_matmul(network, enabled: bool = True) -> Iterator[int]:
    """While open, ``network``'s pointwise and kernel-equals-stride transposed 3D
    convolutions run as matrix products on CPU tensors at inference; yields how many
    modules were switched. The modules are left as they were on exit."""
    switched = []
    if enabled and network is not None:
        for m in network.modules():
            if _is_pointwise(m):
                m.forward = types.MethodType(_pointwise_forward, m)
            elif _is_upsampling(m):
                m.forward = types.MethodType(_upsample_forward, m)
            else:
                continue
            switched.append(m)
    try:
        yield len(switched)
    finally:
        for m in switched:
            m.__dict__.pop("forward", None)
