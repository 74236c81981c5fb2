"""Shifted-window attention at inference without rebuilding its bias on every call.

MONAI's ``WindowAttention`` with ``use_flash_attention`` (``scaled_dot_product_attention``)
rebuilds, on every forward, the additive bias of a shifted block: the relative position
bias plus the shift mask, both reshaped to ``(batch * windows, heads, n, n)``; and each
``BasicLayer`` recomputes the shift mask (``compute_mask``) on every forward. In stage 1
of a 96^3 window that is a ``(343 * batch, heads, 343, 343)`` float32 tensor, added,
expanded, copied and cast per call, although its values never change while the weights
and the window size stay the same (benchmarks/README.md has what that costs).

No library caches them, so this module does, for the duration of one segmentation:

* each Swin layer of the network keeps its shift mask per (grid, window, shift, device)
  instead of calling MONAI's ``compute_mask`` on every forward (MONAI's module-level
  function is left alone: other networks in the process are not touched);
* each window attention keeps its combined bias of ``windows * heads`` planes in the
  activations' dtype, and hands it to ``scaled_dot_product_attention`` once for all the
  batch's windows (the batch becomes a broadcast dimension of the mask instead of a copy).

The arithmetic is MONAI's: the same float32 sum of the bias and the mask, cast to the
activations' dtype, the same fused attention kernel (tests compare the outputs with
MONAI's own path). Training, autograd and the non-fused path are untouched: the cached
forward hands those back to MONAI's.

``by_mask`` (the default) goes one step further: a shift mask has at most eight distinct
planes (a window is or is not the last along each axis), so the windows are grouped by
plane and each group calls the fused attention with one ``(heads, n, n)`` bias, instead of
one call with the ``(windows * heads, n, n)`` sum. Each window's arithmetic is unchanged
(PyTorch's output is equal bit for bit); what goes is that sum: 354 MB in bfloat16 and 710 MB
in float32 at feature size 48 on 96^3 windows, which OpenVINO's CPU plugin also folded into
constants of the converted network (a 977-MB compiled blob for 277 MB of weights; 347 MB
grouped). The layer then keeps only those planes (:class:`MaskPlanes`), not MONAI's
``(windows, n, n)`` float32 mask itself (161 MB at stage 1 of a 96^3 window), which it would
otherwise hold through every window of the segmentation. ``by_mask=False`` keeps the single
call with the summed bias.
"""

from __future__ import annotations

import contextlib
import types
from typing import Iterator

#: Combined biases kept per attention module (one per window grid and dtype in practice).
_MAX_BIASES = 4


def _memoised_layer_forward(self, x):
    """MONAI's ``BasicLayer.forward`` for 5D input with its shift mask built once per
    (grid, window, shift, device) and kept on the layer, not rebuilt on every call.

    Written out here because MONAI builds the mask inside ``BasicLayer.forward`` through
    its module-level ``compute_mask``, with no hook to reuse it; patching that function
    would change it for every other SwinUNETR in the process. Anything but the 5D,
    attention-masked case goes to MONAI's own forward."""
    import numpy as np
    from einops import rearrange
    from monai.networks.nets import swin_unetr

    if x.dim() != 5 or getattr(self, "use_hyena", False):
        return type(self).forward(self, x)
    b, _c, d, h, w = x.shape
    window_size, shift_size = swin_unetr.get_window_size((d, h, w), self.window_size, self.shift_size)
    x = rearrange(x, "b c d h w -> b d h w c")
    dims = tuple(int(np.ceil(s / ws)) * ws for s, ws in zip((d, h, w), window_size))
    key = (dims, tuple(window_size), tuple(shift_size), str(x.device))
    masks = self._swinunetr_segment_masks
    if key not in masks:
        mask = swin_unetr.compute_mask(list(dims), window_size, shift_size, x.device)
        masks[key] = MaskPlanes(mask) if self._swinunetr_segment_by_mask else mask
        del mask
    attn_mask = masks[key]
    for blk in self.blocks:
        x = blk(x, attn_mask)
    x = x.view(b, d, h, w, -1)
    if self.downsample is not None:
        x = self.downsample(x)
    return rearrange(x, "b d h w c -> b c d h w")


class MaskPlanes:
    """A shift mask as its distinct planes: what a memoised Swin layer hands its blocks, and
    they their window attentions, in place of MONAI's ``(windows, n, n)`` mask when the
    attention goes by mask plane.

    Attributes:
        shape: the mask's shape, ``(windows, n, n)``.
        groups: ``[(windows, plane)]``: the indices (a long tensor) of the windows sharing
            ``plane``, an ``(n, n)`` float32 tensor of MONAI's values (0 or -100).
        order: the permutation that puts the groups' concatenated windows back in window order.
    """

    def __init__(self, mask):
        import numpy as np
        import torch

        self.shape = tuple(mask.shape)
        nw, n = self.shape[0], self.shape[1]
        flat = mask.detach().float().cpu().numpy().reshape(nw, -1)  # a view of a float32 CPU mask
        # grouped by the planes' bytes (np.unique(axis=0) sorts 40 M values per block: seconds)
        members: dict[bytes, list[int]] = {}
        for w, p in enumerate(flat):
            members.setdefault(p.tobytes(), []).append(w)
        self.groups = [
            (torch.tensor(windows, device=mask.device),
             torch.from_numpy(flat[windows[0]].reshape(n, n).copy()).to(mask.device))
            for windows in members.values()
        ]
        order = np.argsort(np.concatenate(list(members.values())), kind="stable")
        self.order = torch.from_numpy(order).to(mask.device)

    def full(self):
        """MONAI's ``(windows, n, n)`` mask again (for MONAI's own attention, which needs it)."""
        import torch

        first = self.groups[0][1]
        out = torch.empty(self.shape, dtype=first.dtype, device=first.device)
        for windows, plane in self.groups:
            out[windows] = plane
        return out


def _full_mask(mask):
    return mask.full() if isinstance(mask, MaskPlanes) else mask


def _relative_bias(module, n: int):
    """MONAI's relative position bias of ``n`` tokens, ``(heads, n, n)`` in the table's dtype."""
    index = module.relative_position_index[:n, :n].reshape(-1)
    return module.relative_position_bias_table[index].reshape(n, n, -1).permute(2, 0, 1)


def _combined_bias(module, mask, n: int, dtype):
    """``(heads, n, n)`` without a mask, ``(windows * heads, n, n)`` with one: the relative
    position bias plus the shift mask, summed in float32 as MONAI does, in ``dtype``."""
    import torch

    table = module.relative_position_bias_table
    key = (
        n,
        dtype,
        table.device,
        table.data_ptr(),
        table._version,
        None if mask is None else (tuple(mask.shape), mask.data_ptr(), mask.dtype),
    )
    cache = module._swinunetr_segment_biases
    bias = cache.get(key)
    if bias is None:
        rel = _relative_bias(module, n)
        if mask is None:
            bias = rel.to(dtype).contiguous()
        else:
            nw = mask.shape[0]
            bias = (rel[None].to(torch.promote_types(rel.dtype, mask.dtype)) + mask[:, None]).to(dtype)
            bias = bias.reshape(nw * rel.shape[0], n, n).contiguous()
        if len(cache) >= _MAX_BIASES:
            cache.clear()
        cache[key] = bias
    return bias


def _groups_by_mask(module, mask, n: int, dtype):
    """The windows of a shift mask grouped by their mask plane: ``([(windows, bias)], order)``
    with ``windows`` the indices of one group, ``bias`` its ``(1, heads, n, n)`` relative
    position bias plus that plane (float32 sum as MONAI's, in ``dtype``), and ``order`` the
    permutation that puts the groups' concatenated windows back in window order. ``mask``:
    a :class:`MaskPlanes` (what a memoised layer hands over) or MONAI's mask tensor.

    The grouping reads the mask's values (numpy), so under ``torch.jit.trace`` the indices
    and planes are constants of the graph, not ops on it."""
    import torch

    table = module.relative_position_bias_table
    # a MaskPlanes is its own key (held by it, so never another's); a tensor by its storage
    which = mask if isinstance(mask, MaskPlanes) else (tuple(mask.shape), mask.data_ptr(), mask.dtype)
    key = ("groups", n, dtype, table.device, table.data_ptr(), table._version, which)
    cache = module._swinunetr_segment_biases
    found = cache.get(key)
    if found is None:
        planes = mask if isinstance(mask, MaskPlanes) else MaskPlanes(mask)
        rel = _relative_bias(module, n)
        rel = rel.to(torch.promote_types(rel.dtype, planes.groups[0][1].dtype))
        groups = [(index, (rel + plane.to(rel.dtype))[None].to(dtype).contiguous()) for index, plane in planes.groups]
        found = (groups, planes.order)
        if len(cache) >= _MAX_BIASES:
            cache.clear()
        cache[key] = found
    return found


def _attention_by_mask(self, q, k, v, mask):
    """Fused attention of a shifted block, one call per group of windows that share a mask
    plane (:func:`_groups_by_mask`); ``q``, ``k``, ``v``: ``(images * windows, heads, n, d)``."""
    import torch

    b, heads, n, d = q.shape
    nw = mask.shape[0]
    groups, order = _groups_by_mask(self, mask, n, q.dtype)
    q, k, v = (t.reshape(b // nw, nw, heads, n, d) for t in (q, k, v))
    outs = []
    for windows, bias in groups:
        qi, ki, vi = (t.index_select(1, windows).reshape(-1, heads, n, d) for t in (q, k, v))
        out = torch.nn.functional.scaled_dot_product_attention(
            qi, ki, vi, attn_mask=bias, dropout_p=0.0, scale=self.scale
        )
        outs.append(out.reshape(b // nw, -1, heads, n, d))
    return torch.cat(outs, 1).index_select(1, order).reshape(b, heads, n, d)


def _cached_forward(self, x, mask):
    """``WindowAttention.forward`` at inference with the cached bias (see the module doc)."""
    import torch

    if not self.use_flash_attention or torch.is_grad_enabled() or torch.jit.is_scripting():
        return type(self).forward(self, x, _full_mask(mask))
    b, n, c = x.shape
    heads = self.num_heads
    d = c // heads
    qkv = self.qkv(x).reshape(b, n, 3, heads, d).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]  # (b, heads, n, d)
    if mask is not None and self._swinunetr_segment_by_mask:
        out = _attention_by_mask(self, q, k, v, mask).transpose(1, 2).reshape(b, n, c)
        return self.proj_drop(self.proj(out))
    mask = _full_mask(mask)
    bias = _combined_bias(self, mask, n, q.dtype)
    if mask is None:
        out = torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=bias[None], dropout_p=0.0, scale=self.scale
        )
    else:
        # Windows come batch-major (index = image * windows + window), so viewing the batch
        # as (images, windows * heads) lines every window up with its bias plane and lets
        # the mask broadcast over the images.
        groups = b // mask.shape[0]
        q, k, v = (t.reshape(groups, -1, n, d) for t in (q, k, v))
        out = torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=bias[None], dropout_p=0.0, scale=self.scale
        )
        out = out.reshape(b, heads, n, d)
    out = out.transpose(1, 2).reshape(b, n, c)
    return self.proj_drop(self.proj(out))


def _attention_modules(network):
    return [
        m
        for m in network.modules()
        if hasattr(m, "use_flash_attention") and hasattr(m, "relative_position_bias_table") and hasattr(m, "qkv")
    ]


def _basic_layers(network):
    from monai.networks.nets import swin_unetr

    return [m for m in network.modules() if isinstance(m, swin_unetr.BasicLayer)]


@contextlib.contextmanager
def cached_window_attention(network, enabled: bool = True, by_mask: bool = True) -> Iterator[int]:
    """While open, ``network``'s MONAI window attentions that use the fused kernel run with
    a cached bias, and its Swin layers with a memoised shift mask; yields how many attention
    modules that is. ``by_mask``: shifted blocks attend per group of windows sharing a mask
    plane (see the module doc). Only this network's modules change, and only until exit; everything
    cached is freed then (a warm engine keeps no attention tensors between runs)."""
    modules = (
        [m for m in _attention_modules(network) if m.use_flash_attention] if enabled and network is not None else []
    )
    if not modules:
        yield 0
        return
    layers = _basic_layers(network)
    for m in modules:
        m._swinunetr_segment_biases = {}
        m._swinunetr_segment_by_mask = bool(by_mask)
        m.forward = types.MethodType(_cached_forward, m)
    for layer in layers:
        layer._swinunetr_segment_masks = {}
        layer._swinunetr_segment_by_mask = bool(by_mask)
        layer.forward = types.MethodType(_memoised_layer_forward, layer)
    try:
        yield len(modules)
    finally:
        for m in modules:
            m.__dict__.pop("forward", None)
            m.__dict__.pop("_swinunetr_segment_biases", None)
            m.__dict__.pop("_swinunetr_segment_by_mask", None)
        for layer in layers:
            layer.__dict__.pop("forward", None)
            layer.__dict__.pop("_swinunetr_segment_masks", None)
            layer.__dict__.pop("_swinunetr_segment_by_mask", None)
