"""The way back: network output in model space to labels on the input's exact grid.

The step-by-step inverse of :mod:`.preprocess`: MONAI's ``SpatialResample`` between the
model-space affine (orientation and spacing applied) and the input's IJK-to-RAS, so the
labels come back with the input's exact shape and matrix. Three ways, as
:class:`~.options.FastPath` ``resample`` chooses:

* ``"boundaries"`` (default): the labels of ``"probabilities"``, computed from a uint8
  label map, with probabilities interpolated only at voxels on a boundary
  (:func:`resample_argmax`);
* ``"probabilities"``: softmax probabilities interpolated linearly slab by slab, then
  argmax: what the reference's bilinear ``Invertd`` + argmax computes
  (:func:`resample_probabilities`);
* ``"labels"``: argmax in model space, nearest neighbour back (:func:`resample_labels`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Optional

import numpy as np

from SwinUNETRSegmentLib.geometry import Volume, shift_affine

__all__ = [
    "resample_labels",
    "to_input_grid",
    "softmax_inplace",
    "resample_probabilities",
    "resample_argmax",
    "channel_argmax",
    "DENSE_BOUNDARIES",
]

log = logging.getLogger(__name__)


def resample_labels(src, dst: Volume, src_affine: Optional[np.ndarray] = None, outside: str = "border") -> np.ndarray:
    """Labels of ``src`` (a Volume, or an array with ``src_affine``) on ``dst``'s voxels.

    Nearest neighbour, with MONAI's SpatialResample between the two IJK-to-RAS matrices.
    Voxels of ``dst`` beyond ``src`` take the nearest edge label (``outside="border"``, for
    model space that covers the input up to a sliver) or background (``"zeros"``, for a
    label map cropped to its segments). Returns uint8 of ``dst.shape``.
    """
    import torch
    from monai.data import MetaTensor
    from monai.transforms import SpatialResample

    if isinstance(src, Volume):
        array, src_affine = src.array, src.ijk_to_ras
    else:
        array = src
    img = MetaTensor(
        torch.as_tensor(np.asarray(array), dtype=torch.float32)[None],
        affine=torch.as_tensor(np.asarray(src_affine), dtype=torch.float64),
    )
    back = SpatialResample(mode="nearest", padding_mode=outside, dtype=torch.float64)(
        img, dst_affine=torch.as_tensor(dst.ijk_to_ras, dtype=torch.float64), spatial_size=dst.shape
    )
    return np.asarray(back.as_tensor()[0].round().to(torch.uint8).numpy())


def to_input_grid(
    logits,
    model_affine: np.ndarray,
    volume: Volume,
    mode: str,
    outside: str,
    slab_voxels: int,
    cancel: Optional[Callable[[], None]] = None,
) -> np.ndarray:
    """uint8 labels on ``volume``'s grid from stitched ``(1, C, X, Y, Z)`` logits whose
    voxel-to-RAS matrix is ``model_affine``.

    Args:
        mode: "boundaries", "probabilities" or "labels" (see the module docstring).
        outside: "border" (model space covers the input: the nearest edge value) or
            "background" (model space was cropped to the body: background beyond it).
        slab_voxels: input voxels resampled per slab (bounds the memory).
        cancel: called between slabs; raises to stop.

    On CUDA, running out of memory here retries the resampling on the CPU.
    """
    import torch

    from SwinUNETRSegmentLib.inference.devices import is_out_of_memory

    if mode == "labels":
        labels_model = logits.argmax(dim=1).to(torch.uint8).cpu()
        return resample_labels(
            labels_model[0].numpy(),
            volume,
            src_affine=model_affine,
            outside="border" if outside == "border" else "zeros",
        )
    if mode == "boundaries":
        way = resample_argmax
    else:
        softmax_inplace(logits)
        way = resample_probabilities

    def run(scores):
        return way(scores, model_affine, volume.shape, volume.ijk_to_ras, outside=outside, slab_voxels=slab_voxels,
                   cancel=cancel)

    if logits.device.type != "cuda":
        return run(logits[0])
    try:
        return run(logits[0])
    except Exception as exc:
        if not is_out_of_memory(exc):
            raise
        torch.cuda.empty_cache()
        log.warning("out of GPU memory resampling to the input grid; resampling on the CPU")
        return run(logits[0].cpu())


def softmax_inplace(logits, chunk: int = 8) -> None:
    """Softmax over channels of a ``(1, C, X, Y, Z)`` tensor, in place, a few slices at a time."""
    import torch

    for z0 in range(0, logits.shape[-1], chunk):
        part = logits[..., z0 : z0 + chunk]
        part.copy_(torch.softmax(part, dim=1))


def resample_probabilities(
    probs,
    src_affine: np.ndarray,
    dst_shape: Sequence[int],
    dst_affine: np.ndarray,
    outside: str = "border",
    slab_voxels: int = 1 << 20,
    out: Optional[np.ndarray] = None,
    cancel: Optional[Callable[[], None]] = None,
    softmax: bool = False,
) -> np.ndarray:
    """Labels on the input grid from model-space class probabilities, slab by slab.

    Each slab of the destination (a few planes along its first axis) takes the part of
    ``probs`` it needs (its bounding box in model space plus one voxel), interpolates all
    channels linearly there with MONAI's SpatialResample and keeps only the argmax: the
    same numbers as resampling the whole probability volume first (the reference's
    bilinear Invertd) without ever holding it.

    Args:
        probs: ``(C, X, Y, Z)`` float tensor of probabilities (any device).
        src_affine: its voxel-to-RAS 4x4.
        dst_shape, dst_affine: the input grid.
        outside: "border" (the nearest edge value, as Spacing's inverse) or "background"
            (class 0 with probability 1 beyond ``probs``: for a crop of model space whose
            surroundings are air).
        slab_voxels: destination voxels per slab.
        out: optional uint8 array of ``dst_shape`` to write into.
        cancel: called between slabs; raises to stop.
        softmax: ``probs`` are logits: take the softmax of each slab's part first.

    Returns:
        uint8 labels of ``dst_shape``.
    """
    import torch
    from monai.data import MetaTensor
    from monai.transforms import SpatialResample

    dst_shape = tuple(int(s) for s in dst_shape)
    labels = np.empty(dst_shape, np.uint8) if out is None else out
    src_shape = np.array(probs.shape[1:])
    to_src = np.linalg.solve(np.asarray(src_affine, np.float64), np.asarray(dst_affine, np.float64))
    plane = int(np.prod(dst_shape[1:]))
    step = max(1, int(slab_voxels) // max(plane, 1))
    if outside not in ("border", "background"):
        raise ValueError(f"outside must be 'border' or 'background', got {outside!r}")
    resample = SpatialResample(
        mode="bilinear", padding_mode="border" if outside == "border" else "zeros", dtype=torch.float32
    )
    for i0 in range(0, dst_shape[0], step):
        if cancel is not None:
            cancel()
        i1 = min(i0 + step, dst_shape[0])
        corners = np.array(
            [[i, j, k, 1.0] for i in (i0, i1 - 1) for j in (0, dst_shape[1] - 1) for k in (0, dst_shape[2] - 1)]
        )
        pts = (corners @ to_src.T)[:, :3]
        lo = np.clip(np.floor(pts.min(0)).astype(int) - 1, 0, src_shape - 1)
        hi = np.clip(np.ceil(pts.max(0)).astype(int) + 2, lo + 1, src_shape)
        sub = probs[:, lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
        sub = torch.softmax(sub.float(), dim=0) if softmax else sub.float()
        src = MetaTensor(sub, affine=torch.as_tensor(shift_affine(src_affine, lo)))
        slab = resample(
            src,
            dst_affine=torch.as_tensor(shift_affine(dst_affine, (i0, 0, 0))),
            spatial_size=(i1 - i0,) + dst_shape[1:],
        )
        p = slab.as_tensor()
        if outside == "background":
            # Zero padding dropped the weight of the neighbours beyond the crop; it is
            # background's: the probabilities of a voxel still sum to one.
            p[0] += 1.0 - p.sum(dim=0)
        labels[i0:i1] = p.argmax(dim=0).to(torch.uint8).cpu().numpy()
    return labels


def _cell_labels(labels, outside: str):
    """For each cell of model space (the 2 x 2 x 2 voxels around a point between voxel
    centres) the label its eight corners share, or 255 where they differ.

    The label map is first padded the way the resampling pads: one copy of the last plane
    after each axis ("border": a clamped coordinate lands on the edge voxel), or one plane
    of background on both sides ("background")."""
    import torch

    lab = labels
    if outside == "border":
        lab = torch.nn.functional.pad(lab[None, None].float(), (0, 1, 0, 1, 0, 1), mode="replicate")[0, 0].to(
            torch.uint8
        )
    else:
        lab = torch.nn.functional.pad(lab, (1, 2, 1, 2, 1, 2), value=0)
    first = lab[:-1, :-1, :-1]
    same = torch.ones_like(first, dtype=torch.bool)
    for dx in (0, 1):
        for dy in (0, 1):
            for dz in (0, 1):
                if dx or dy or dz:
                    same &= lab[dx : dx + first.shape[0], dy : dy + first.shape[1], dz : dz + first.shape[2]] == first
    cells = torch.where(same, first, torch.full_like(first, 255))
    return cells.contiguous()


#: above this share of boundary voxels in a slab, resample_argmax interpolates the whole slab
DENSE_BOUNDARIES = 0.2


def resample_argmax(
    logits,
    src_affine: np.ndarray,
    dst_shape: Sequence[int],
    dst_affine: np.ndarray,
    outside: str = "border",
    slab_voxels: int = 1 << 22,
    out: Optional[np.ndarray] = None,
    cancel: Optional[Callable[[], None]] = None,
) -> np.ndarray:
    """The labels of :func:`resample_probabilities` (linear probabilities, then argmax), with
    labels doing the travelling and probabilities computed only where a boundary lies.

    Written by hand because no library does this: linear interpolation mixes the eight
    model-space voxels around a point with weights that sum to one, so where all eight have
    the same argmax label that label also wins the mix (a convex combination keeps every
    ``p_L >= p_c``). Each input voxel therefore looks up its cell's shared label in a uint8
    map; only voxels whose cell straddles a boundary (a few percent) interpolate the
    softmax of the 14 channels at their eight corners. Same labels as the reference's
    ``Invertd`` + argmax up to float rounding at exact ties, in a fraction of the time and
    with no full-resolution float copy at all.

    Args:
        logits: ``(C, X, Y, Z)`` float tensor of the stitched network output (not softmaxed).
        src_affine, dst_shape, dst_affine, outside, slab_voxels, out, cancel: as
            :func:`resample_probabilities`.
    """
    import torch

    if outside not in ("border", "background"):
        raise ValueError(f"outside must be 'border' or 'background', got {outside!r}")
    dst_shape = tuple(int(s) for s in dst_shape)
    labels_out = np.empty(dst_shape, np.uint8) if out is None else out
    n_classes = int(logits.shape[0])
    if n_classes >= 255:  # 255 marks a boundary cell
        probs = torch.softmax(logits.float(), dim=0)
        return resample_probabilities(
            probs, src_affine, dst_shape, dst_affine, outside, slab_voxels, labels_out, cancel
        )
    device = logits.device
    src_shape = [int(s) for s in logits.shape[1:]]
    model_labels = channel_argmax(logits)
    cells = _cell_labels(model_labels, outside)
    del model_labels
    cell_shape = cells.shape
    cells_flat = cells.reshape(-1)
    shift = 0.0 if outside == "border" else 1.0  # padded coordinates
    # the padded label map's extent: coordinates are clamped into it
    top = [float(n - 1) if outside == "border" else float(n + 1) for n in src_shape]

    xform = np.linalg.solve(np.asarray(src_affine, np.float64), np.asarray(dst_affine, np.float64))
    a = torch.as_tensor(xform[:3, :3], dtype=torch.float64)
    plane = dst_shape[1] * dst_shape[2]
    step = max(1, int(slab_voxels) // max(plane, 1))
    perm = _axis_aligned(xform)
    sub_step = max(1, step // 4)  # the axis-by-axis interpolation holds about three slabs of all channels
    j = torch.arange(dst_shape[1], dtype=torch.float64, device=device)
    k = torch.arange(dst_shape[2], dtype=torch.float64, device=device)
    # the in-plane part of each coordinate once, float64 then float32 (MONAI's grid is float32)
    jk = [(a[d, 1].item() * j[:, None] + a[d, 2].item() * k[None, :] + xform[d, 3] + shift) for d in range(3)]
    for i0 in range(0, dst_shape[0], step):
        if cancel is not None:
            cancel()
        i1 = min(i0 + step, dst_shape[0])
        i = torch.arange(i0, i1, dtype=torch.float64, device=device)
        coords, base, frac = [], [], []
        for d in range(3):
            c = (a[d, 0].item() * i[:, None, None] + jk[d][None]).to(torch.float32).clamp_(0.0, top[d])
            b = c.floor()
            f = c - b
            b = b.to(torch.int64).clamp_(max=cell_shape[d] - 1)
            coords.append(c)
            base.append(b)
            frac.append(f)
        flat = (base[0] * cell_shape[1] + base[1]) * cell_shape[2] + base[2]
        lab = cells_flat[flat]
        edge = lab == 255
        if float(edge.float().mean()) > DENSE_BOUNDARIES:
            # Boundaries nearly everywhere (an untrained network's noise): interpolating every
            # channel of the slab is then cheaper than gathering corners voxel by voxel; axis by
            # axis where the grids' axes correspond (always, from Spacing), else grid_sample.
            del coords, base, frac, flat, lab, edge
            if perm is not None:
                for r0 in range(i0, i1, sub_step):
                    r1 = min(r0 + sub_step, i1)
                    part = _separable_argmax(logits, xform, perm, (r0, r1), dst_shape, outside)
                    labels_out[r0:r1] = part.cpu().numpy()
                continue
            resample_probabilities(
                logits,
                src_affine,
                (i1 - i0,) + dst_shape[1:],
                shift_affine(dst_affine, (i0, 0, 0)),
                outside=outside,
                slab_voxels=slab_voxels,
                out=labels_out[i0:i1],
                softmax=True,
            )
            continue
        if bool(edge.any()):
            lab[edge] = _interpolated_argmax(
                logits, [b[edge] - int(shift) for b in base], [f[edge] for f in frac], src_shape, outside
            )
        labels_out[i0:i1] = lab.cpu().numpy()
        del coords, base, frac, flat, lab, edge
    return labels_out


def _axis_aligned(xform: np.ndarray) -> Optional[list[int]]:
    """For each model-space axis, the input axis whose index alone sets its coordinate under
    the input-voxel-to-model-voxel matrix ``xform``; None where it mixes axes. MONAI's
    Orientation and Spacing permute, flip and scale a scan's voxel axes, so the two grids'
    axes correspond even for an oblique scan."""
    a = np.abs(np.asarray(xform, np.float64)[:3, :3])
    perm = [int(e) for e in a.argmax(axis=1)]
    if sorted(perm) != [0, 1, 2]:
        return None
    off = a.copy()
    off[range(3), perm] = 0.0
    return perm if off.max() <= 1e-9 * a.max() else None


def _separable_argmax(logits, xform: np.ndarray, perm: list[int], rows: tuple[int, int], dst_shape, outside: str):
    """uint8 labels of input rows ``rows[0]:rows[1]`` (along its first axis): the argmax of the
    softmax interpolated linearly, as :func:`resample_probabilities` computes it, one axis at a
    time. Written by hand because where the grids' axes correspond trilinear weights are a
    product of one weight per axis, and three 1-D passes over the slab's block of model space
    cost a fraction of ``grid_sample``'s eight-corner gather per voxel and channel (the
    512 x 512 x 300 CT's untrained-network labels: benchmarks/README.md, session 14)."""
    import torch

    device = logits.device
    src_shape = [int(n) for n in logits.shape[1:]]
    lows, highs, corners, weights = [], [], [], []
    for d in range(3):
        e = perm[d]
        n = src_shape[d]
        idx = torch.arange(rows[0], rows[1]) if e == 0 else torch.arange(int(dst_shape[e]))
        c = (float(xform[d, e]) * idx.to(torch.float64) + float(xform[d, 3])).to(torch.float32)
        # clamped where corners beyond the image follow ``outside`` (_linear_corners)
        c = c.clamp_(0.0, float(n - 1)) if outside == "border" else c.clamp_(-1.0, float(n))
        b = c.floor()
        q0, q1, w0, w1 = _linear_corners(b.to(torch.int64), c - b, n, outside)
        lo, hi = int(torch.minimum(q0, q1).min()), int(torch.maximum(q0, q1).max()) + 1
        lows.append(lo)
        highs.append(hi)
        corners.append(((q0 - lo).to(device), (q1 - lo).to(device)))
        weights.append((w0.to(device), w1.to(device)))
    block = logits[:, lows[0] : highs[0], lows[1] : highs[1], lows[2] : highs[2]].float()
    p = torch.softmax(block, dim=0)
    del block
    # the axis that grows the least first: the passes' intermediate arrays stay small
    for d in sorted(range(3), key=lambda d: len(corners[d][0]) / (highs[d] - lows[d])):
        shape = [1] * 4
        shape[1 + d] = -1
        (q0, q1), (w0, w1) = corners[d], weights[d]
        mixed = p.index_select(1 + d, q0).mul_(w0.view(shape))
        mixed.addcmul_(p.index_select(1 + d, q1), w1.view(shape))
        p = mixed
    if outside != "border":
        p[0] += 1.0 - p.sum(dim=0)
    to_input = [1 + perm.index(e) for e in range(3)]
    return channel_argmax(p.permute(0, *to_input))


def channel_argmax(scores):
    """uint8 argmax over the first axis of ``(C, ...)``, the first class winning ties like
    ``torch.argmax``. One running maximum over the channels: cheaper on the CPU than
    ``argmax(dim=0)``, whose reduction strides across channel planes."""
    import torch

    best = scores[0].clone()
    out = torch.zeros(scores.shape[1:], dtype=torch.uint8, device=scores.device)
    for c in range(1, scores.shape[0]):
        better = scores[c] > best
        out.masked_fill_(better, c)
        torch.maximum(best, scores[c], out=best)
    return out


def _linear_corners(b, f, n: int, outside: str):
    """Along one axis of a linear interpolation: the corners below and above each point and their
    weights, from the lower corner's index ``b`` (int64; -1 or beyond ``n - 1`` where the point
    lies beyond the image) and the fraction ``f`` towards the upper one. "border": the corners
    clamped into the image (its edge value beyond it, as grid_sample's border padding);
    "background": corners beyond the image weigh nothing, and the caller hands their weight to the
    background. The corners come back clamped into the image either way, so they can index it."""
    q1 = b + 1
    if outside == "border":
        return b.clamp(0, n - 1), q1.clamp_(0, n - 1), 1.0 - f, f
    w0 = (1.0 - f) * ((b >= 0) & (b < n))
    w1 = f * ((q1 >= 0) & (q1 < n))
    return b.clamp(0, n - 1), q1.clamp_(0, n - 1), w0, w1


def _interpolated_argmax(logits, base, frac, src_shape, outside: str):
    """argmax of the linearly interpolated softmax at the given points (the lower corner's index
    ``base`` and the fraction ``frac`` per axis), corners beyond the image per ``outside``."""
    import torch

    n_classes = logits.shape[0]
    flat_logits = logits.reshape(n_classes, -1)
    strides = (src_shape[1] * src_shape[2], src_shape[2], 1)
    # per axis and corner side (0: below, 1: above): weight and flat-index term
    weight, term = [], []
    for d in range(3):
        q0, q1, w0, w1 = _linear_corners(base[d], frac[d], src_shape[d], outside)
        weight.append((w0, w1))
        term.append((q0 * strides[d], q1 * strides[d]))
    mixed = None
    for dx in (0, 1):
        for dy in (0, 1):
            wxy = weight[0][dx] * weight[1][dy]
            txy = term[0][dx] + term[1][dy]
            for dz in (0, 1):
                p = torch.softmax(flat_logits.index_select(1, txy + term[2][dz]).float(), dim=0)
                p *= (wxy * weight[2][dz])[None]
                mixed = p if mixed is None else mixed.add_(p)
    if outside != "border":  # beyond the image: background with probability one
        mixed[0] += 1.0 - mixed.sum(dim=0)
    return channel_argmax(mixed)
