"""The sliding windows in model space: MONAI's window grid, the windows that hold only air,
the body's box, the prepared model-space volume they run over, and the predictor that
runs them (air windows answered from a cache, progress and cancel per window).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from SwinUNETRSegmentLib.geometry import Volume, shift_affine
from SwinUNETRSegmentLib.inference.options import FastPath
from SwinUNETRSegmentLib.inference.preprocess import (
    air_floor,
    air_is_constant,
    geometric_transforms,
    intensity_transform,
    to_metatensor,
)
from SwinUNETRSegmentLib.models.cards import ModelCard

__all__ = [
    "scan_interval",
    "count_windows",
    "monai_padding",
    "air_window_starts",
    "body_box",
    "volume_key",
    "Prepared",
    "prepare",
    "WindowPredictor",
]


# ----------------------------------------------------------------------------------------
# windows: the grid MONAI uses, air windows, the body's box
# ----------------------------------------------------------------------------------------
def scan_interval(image_size: Sequence[int], roi_size: Sequence[int], overlap: float) -> list[int]:
    """MONAI's step between windows (monai.inferers.utils._get_scan_interval) on an image
    already padded up to the window size."""
    return [int(r) if int(r) == int(s) else max(int(int(r) * (1 - overlap)), 1) for s, r in zip(image_size, roi_size)]


def count_windows(image_size: Sequence[int], roi_size: Sequence[int], overlap: float) -> int:
    """How many windows MONAI's sliding-window inferer runs over an image of ``image_size``
    (padded up to the window size first, as monai.inferers.utils does)."""
    from monai.data.utils import dense_patch_slices

    size = [max(int(s), int(r)) for s, r in zip(image_size, roi_size)]
    return len(dense_patch_slices(size, list(roi_size), scan_interval(size, roi_size, overlap)))


def monai_padding(shape: Sequence[int], roi_size: Sequence[int]) -> list[tuple[int, int]]:
    """(before, after) padding per axis that sliding_window_inference adds to a small image."""
    out = []
    for s, r in zip(shape, roi_size):
        diff = max(int(r) - int(s), 0)
        out.append((diff // 2, diff - diff // 2))
    return out


def air_window_starts(air, roi_size: Sequence[int], overlap: float, pad_is_air: bool) -> set[tuple[int, ...]]:
    """Start corners (in MONAI's padded coordinates) of the windows that hold only air.

    Args:
        air: bool tensor ``(X, Y, Z)``, True where the model-space voxel is below the
            intensity window (it becomes exactly ``b_min``).
        pad_is_air: whether MONAI's constant padding (0) equals ``b_min``.
    """
    import torch
    from monai.data.utils import dense_patch_slices

    pads = monai_padding(air.shape, roi_size)
    if any(p for pair in pads for p in pair):
        flat = [p for pair in reversed(pads) for p in pair]
        air = torch.nn.functional.pad(air[None, None].to(torch.uint8), flat, value=int(pad_is_air))[0, 0].bool()
    size = list(air.shape)
    interval = scan_interval(size, roi_size, overlap)
    # One pass of cumulative sums instead of one .all() per window: a window is air when
    # its count of non-air voxels is zero.
    body = (~air).to(torch.int32)
    cs = torch.nn.functional.pad(body.cumsum(0).cumsum(1).cumsum(2), (1, 0, 1, 0, 1, 0))
    out = set()
    for sl in dense_patch_slices(size, list(roi_size), interval):
        (x0, x1), (y0, y1), (z0, z1) = ((s.start, s.stop) for s in sl)
        n = (
            cs[x1, y1, z1]
            - cs[x0, y1, z1]
            - cs[x1, y0, z1]
            - cs[x1, y1, z0]
            + cs[x0, y0, z1]
            + cs[x0, y1, z0]
            + cs[x1, y0, z0]
            - cs[x0, y0, z0]
        )
        if int(n) == 0:
            out.add((x0, y0, z0))
    return out


def body_box(air, roi_size: Sequence[int], overlap: float) -> Optional[tuple[slice, slice, slice]]:
    """The part of model space the windows must cover: the bounding box of the non-air
    voxels, each start snapped down to the uncropped image's window grid, at least one
    window long. None when the box is the whole image, saves no window (moving windows
    changes a network's answer for nothing), or there is no body at all."""
    import torch

    shape = list(air.shape)
    body = ~air
    if not bool(body.any()):
        return None
    interval = scan_interval([max(s, r) for s, r in zip(shape, roi_size)], roi_size, overlap)
    box = []
    for axis in range(3):
        b, c = (a for a in range(3) if a != axis)
        hits = torch.nonzero(body.any(dim=c).any(dim=b)).flatten()
        lo, hi = int(hits.min()), int(hits.max()) + 1
        start = (lo // interval[axis]) * interval[axis]
        roi = int(roi_size[axis])
        stop = max(hi, min(start + roi, shape[axis]))
        if stop - start < roi:
            start = max(0, stop - roi)
        box.append(slice(start, stop))
    if all(s.start == 0 and s.stop == n for s, n in zip(box, shape)):
        return None
    if count_windows([s.stop - s.start for s in box], roi_size, overlap) >= count_windows(shape, roi_size, overlap):
        return None  # no window saved: keep every window where the reference puts it
    return tuple(box)  # type: ignore[return-value]


def volume_key(array: np.ndarray, ijk_to_ras: np.ndarray, *extra: Any) -> str:
    """A hash of the voxels, their dtype and shape, the grid, and ``extra`` settings.

    Hashing every voxel is what makes the cache safe when the same array object is edited
    in place between two runs. The voxels are read where they lie: a C- or Fortran-ordered
    array (a Slicer volume's ``[k, j, i]`` array seen as ``[i, j, k]``) is hashed without a
    copy, any other layout one plane at a time."""
    h = hashlib.blake2b(digest_size=20)
    arr = np.asarray(array)
    if arr.flags.c_contiguous:
        order, flat = "C", arr
    elif arr.T.flags.c_contiguous:
        order, flat = "F", arr.T
    else:
        order, flat = "planes", None
    h.update(str((arr.dtype.str, arr.shape, order)).encode())
    h.update(np.ascontiguousarray(ijk_to_ras, dtype=np.float64).tobytes())
    h.update(repr(extra).encode())
    if flat is not None:
        h.update(memoryview(flat).cast("B"))
    else:
        for plane in arr:
            h.update(np.ascontiguousarray(plane).tobytes())
    return h.hexdigest()


@dataclass
class Prepared:
    """A volume in model space, ready for the windows.

    Attributes:
        image: ``(1, X, Y, Z)`` float32 tensor (the crop, when cropped), intensity-scaled.
        affine: its voxel-to-RAS 4x4 (float64 numpy).
        full_shape: model-space shape before cropping.
        full_affine: model-space affine before cropping.
        box: the crop (slices of the full model space) or None.
        air_starts: start corners of the windows that hold only air.
    """

    image: Any
    affine: np.ndarray
    full_shape: tuple[int, int, int]
    full_affine: np.ndarray
    box: Optional[tuple[slice, slice, slice]] = None
    air_starts: set = field(default_factory=set)


def resampling_dtype(fast: FastPath):
    """What ``Spacing`` computes in for ``fast``: float32 with ``float32_resampling`` unless the
    precision is float32 (whose labels are the reference's exactly), else MONAI's float64."""
    return np.float32 if fast.float32_resampling and fast.precision != "float32" else np.float64


def prepare(card: ModelCard, volume: Volume, fast: FastPath, overlap: float) -> Prepared:
    """``volume`` in the card's model space (:mod:`.preprocess`), with its air windows and,
    when ``fast.crop_to_body``, cropped to the body's box before the intensity window."""
    img = to_metatensor(volume, np.float32)
    for t in geometric_transforms(card, dtype=resampling_dtype(fast)):
        img = t(img)
    full_affine = img.affine.numpy().astype(np.float64)
    full_shape = tuple(int(s) for s in img.shape[1:])
    use_air = (fast.skip_air or fast.crop_to_body) and air_is_constant(card)
    air = box = None
    if use_air:
        air = img.as_tensor()[0] < air_floor(card)
        if fast.crop_to_body:
            box = body_box(air, card.roi_size, overlap)
    if box is not None:
        img = img[(slice(None),) + box]
        air = air[box]
    affine = full_affine if box is None else shift_affine(full_affine, [s.start for s in box])
    img = intensity_transform(card)(img)
    air_starts: set = set()
    if use_air and fast.skip_air:
        pad_is_air = float(card.intensity["b_min"]) == 0.0  # MONAI pads windows with 0
        air_starts = air_window_starts(air, card.roi_size, overlap, pad_is_air)
    return Prepared(img.as_tensor().contiguous(), affine, full_shape, full_affine, box, air_starts)


class WindowPredictor:
    """The ``predictor`` MONAI's sliding-window inferer calls with a batch of windows and
    their coordinates (``with_coord=True``).

    Windows whose start corner is in ``air_starts`` get ``air_output`` (the network's answer
    for a window of pure air, computed once) instead of a network call; cancel is checked
    before each call; every window, air or not, is reported to ``on_window(done)``. A pass
    that starts again at the first window (MONAI's adaptive inferer retrying on the CPU
    after the GPU ran out of memory) counts from zero again.

    Args:
        network: ``(B, 1, X, Y, Z)`` -> ``(B, C, X, Y, Z)`` logits.
        dtype: the dtype the network's weights are in (windows are cast to it).
        air_starts: start corners of air windows, in MONAI's padded coordinates.
        air_output: callable returning the ``(1, C, X, Y, Z)`` float answer for an air window.
        check_cancel: raises to stop.
        on_window: called with the number of windows done so far in this pass.
    """

    def __init__(
        self,
        network,
        dtype,
        air_starts: set,
        air_output: Callable[[], Any],
        check_cancel: Callable[[], None],
        on_window: Callable[[int], None],
    ):
        self.network, self.dtype, self.air_starts = network, dtype, air_starts
        self.air_output, self.check_cancel, self.on_window = air_output, check_cancel, on_window
        self.done = 0

    def __call__(self, batch, coords):
        import torch

        starts = [tuple(s.start for s in c[2:]) for c in coords]
        if any(all(v == 0 for v in s) for s in starts):
            self.done = 0
        is_air = [s in self.air_starts for s in starts]
        run = [n for n, a in enumerate(is_air) if not a]
        self.check_cancel()
        result = None
        if run:
            result = self.network((batch if len(run) == len(is_air) else batch[run]).to(self.dtype)).float()
        if result is not None and len(run) == len(is_air):
            out = result
        else:
            air = self.air_output().to(batch.device)
            parts, r = [], 0
            for a in is_air:
                if a:
                    parts.append(air)
                else:
                    parts.append(result[r : r + 1])
                    r += 1
            out = torch.cat(parts)
        for _ in is_air:
            self.done += 1
            self.on_window(self.done)
        return out
