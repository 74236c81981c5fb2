"""After the way back: connected-component clean-up of the labels, as the model card says.

A card may declare (``"postprocessing"``)::

    {"keep_largest_component": true,      # or a list of label names; true = every label
     "min_component_mm3": 500}            # drop smaller components of every label

and the engine applies it to the uint8 labels on the input grid: the connected components
of every label at once (26-connectivity, one pass of ``cc3d.connected_components`` over the
labels' bounding box), their sizes (one ``bincount``), and the voxels of the components it
drops turned into background. Memory is one component map (2 or 4 bytes a voxel of the box) and
one boolean array, whatever the number of labels: never a copy per class.

Written with connected-components-3d (cc3d, multi-label in one pass) rather than MONAI's
``KeepLargestConnectedComponent``, which works on a one-hot (or per-class) tensor of the
whole volume and needs scikit-image or cuCIM for its labelling, or scipy's ``ndimage.label``,
one label at a time (the engine's until session 14: 20.6 s on the 512 x 512 x 300 CT's
labels of an untrained network, benchmarks/README.md). The answer is the same: the largest
component by voxel count, ties to the one found first in the array's order.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from SwinUNETRSegmentLib.errors import UserError

__all__ = ["PostProcessing", "clean_labels"]


@dataclass(frozen=True)
class PostProcessing:
    """What a card asks for after the way back.

    Attributes:
        keep_largest: label values whose largest connected component alone is kept
            (single-organ structures); empty for none.
        min_component_mm3: components smaller than this (in mm^3) are dropped from every
            label; 0 for none.
    """

    keep_largest: frozenset = frozenset()
    min_component_mm3: float = 0.0

    @property
    def active(self) -> bool:
        return bool(self.keep_largest) or self.min_component_mm3 > 0

    @classmethod
    def from_card(cls, card) -> PostProcessing:
        """From ``card.postprocessing`` (a dict, possibly empty), checked against its labels."""
        spec: dict[str, Any] = dict(getattr(card, "postprocessing", None) or {})
        unknown = set(spec) - {"keep_largest_component", "min_component_mm3"}
        if unknown:
            raise UserError(
                f"model card '{card.name}': unknown postprocessing keys {sorted(unknown)}; "
                "use keep_largest_component and min_component_mm3"
            )
        keep = spec.get("keep_largest_component", False)
        by_name = {lab.name: lab.value for lab in card.labels}
        if keep is True:
            values = frozenset(by_name.values())
        elif keep in (False, None):
            values = frozenset()
        elif isinstance(keep, list) and all(isinstance(n, str) for n in keep):
            missing = [n for n in keep if n not in by_name]
            if missing:
                raise UserError(
                    f"model card '{card.name}': postprocessing names labels it does not have: {', '.join(missing)}"
                )
            values = frozenset(by_name[n] for n in keep)
        else:
            raise UserError(
                f"model card '{card.name}': keep_largest_component must be true, false or a list of label names"
            )
        try:
            minimum = float(spec.get("min_component_mm3", 0.0))
        except (TypeError, ValueError):
            minimum = -1.0
        if not minimum >= 0:
            raise UserError(f"model card '{card.name}': min_component_mm3 must be a number >= 0")
        return cls(values, minimum)


def clean_labels(
    labels: np.ndarray, voxel_mm3: float, post: PostProcessing, cancel: Optional[Callable[[], None]] = None
) -> dict[str, int]:
    """Apply ``post`` to ``labels`` (uint8, any 3D grid) in place.

    Args:
        labels: the label map; dropped components become 0.
        voxel_mm3: the volume of one voxel (``|det|`` of the grid's 3x3 matrix).
        post: what to keep.
        cancel: called before and after the labelling; raises to stop.

    Returns:
        for the record: components and voxels removed.
    """
    import cc3d

    removed = {"components_removed": 0, "voxels_removed": 0}
    if not post.active:
        return removed
    min_voxels = max(int(np.ceil(post.min_component_mm3 / voxel_mm3)) if post.min_component_mm3 > 0 else 0, 1)
    box = _labelled_box(labels)
    if box is None:
        return removed
    if cancel is not None:
        cancel()
    sub = labels[box]
    comps, n = cc3d.connected_components(sub, connectivity=26, return_N=True)
    if cancel is not None:
        cancel()
    # Each component's size and label, slab by slab: numpy indexes and counts with 8-byte
    # integers, so a whole-box pass would hold 8 bytes a voxel more than the map itself.
    sizes = np.zeros(n + 1, np.int64)
    value = np.zeros(n + 1, labels.dtype)
    for slab in _slabs(sub.shape):
        sizes += np.bincount(comps[slab].reshape(-1), minlength=n + 1)
        value[comps[slab]] = sub[slab]  # each component is of one label
    drop = sizes < min_voxels
    for v in np.intersect1d(value[1:], list(post.keep_largest)):  # the asked labels present
        ids = np.flatnonzero(value == v)  # value[0] is the background's, never an asked label
        biggest = ids[sizes[ids] == sizes[ids].max()]
        keep = biggest[0] if len(biggest) == 1 else _first_found(comps, biggest)
        drop[ids[ids != keep]] = True
    drop[0] = False  # the background is never touched
    if drop.any():
        for slab in _slabs(sub.shape):
            sub[slab][drop[comps[slab]]] = 0
        removed["voxels_removed"] = int(sizes[drop].sum())
        removed["components_removed"] = int(np.count_nonzero(drop))
    return removed


def _slabs(shape: tuple[int, ...], voxels: int = 1 << 20):
    """Slices along the first axis of about ``voxels`` voxels each, in the array's C order."""
    step = max(1, voxels // max(1, int(np.prod(shape[1:]))))
    for start in range(0, shape[0], step):
        yield slice(start, min(start + step, shape[0]))


def _labelled_box(labels: np.ndarray) -> Optional[tuple[slice, ...]]:
    """The bounding box of the labels' voxels (not background), or None where there are none:
    the component map covers only it (a trained network's organs fill a part of the scan)."""
    box = []
    for axis in range(labels.ndim):
        others = tuple(a for a in range(labels.ndim) if a != axis)
        hit = np.flatnonzero(labels.any(axis=others))
        if hit.size == 0:
            return None
        box.append(slice(int(hit[0]), int(hit[-1]) + 1))
    return tuple(box)


def _first_found(comps: np.ndarray, ids: np.ndarray) -> int:
    """Of components ``ids`` (a tie for the largest), the one whose first voxel comes first in
    C order: the tie rule of the label-by-label clean-up, whatever order cc3d numbers in."""
    for slab in _slabs(comps.shape):
        hit = np.isin(comps[slab], ids)
        if hit.any():
            return int(comps[slab].reshape(-1)[np.argmax(hit.reshape(-1))])
    raise AssertionError("a component with no voxel")
