"""After the way back: connected-component clean-up of the labels, as the model card says.

A card may declare (``"postprocessing"``)::

    {"keep_largest_component": true,      # or a list of label names; true = every label
     "min_component_mm3": 500}            # drop smaller components of every label

and the engine applies it to the uint8 labels on the input grid: for each label it looks
only inside that label's bounding box (``scipy.ndimage.find_objects`` of the label map,
one pass for all labels), labels the connected components there (26-connectivity) and
turns the voxels of the components it drops into background. Memory is one boolean and
one int32 array of a label's box at a time, never a full-resolution copy per class.

Written with scipy rather than MONAI's ``KeepLargestConnectedComponent`` because MONAI's
transform works on a one-hot (or per-class) tensor of the whole volume and needs
scikit-image or cuCIM for its labelling; the answer is the same (largest component by
voxel count, ties to the first found).
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
        cancel: called between labels; raises to stop.

    Returns:
        for the record: components and voxels removed.
    """
    from scipy import ndimage

    removed = {"components_removed": 0, "voxels_removed": 0}
    if not post.active:
        return removed
    min_voxels = int(np.ceil(post.min_component_mm3 / voxel_mm3)) if post.min_component_mm3 > 0 else 0
    structure = np.ones((3, 3, 3), dtype=bool)
    boxes = ndimage.find_objects(labels)
    for index, box in enumerate(boxes):
        value = index + 1
        if box is None or (value not in post.keep_largest and min_voxels == 0):
            continue
        if cancel is not None:
            cancel()
        sub = labels[box]
        mask = sub == value
        comps, n = ndimage.label(mask, structure=structure)
        if n == 0:
            continue
        sizes = np.bincount(comps.ravel())
        sizes[0] = 0
        keep = sizes >= max(min_voxels, 1)
        if value in post.keep_largest:
            largest = int(np.argmax(sizes))
            keep[:] = False
            keep[largest] = sizes[largest] >= max(min_voxels, 1)
        keep[0] = False
        drop = mask & ~keep[comps]
        count = int(np.count_nonzero(drop))
        if count:
            sub[drop] = 0
            removed["voxels_removed"] += count
            removed["components_removed"] += int(n - np.count_nonzero(keep))
    return removed
