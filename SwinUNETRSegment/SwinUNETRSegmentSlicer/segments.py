"""The segment table of a run and the label array it imports, without Slicer.

The table itself (:class:`SegmentSpec`: value, name, colour, serialized terminology) is the
engine's, :mod:`SwinUNETRSegmentLib.models.segment_table`, which the ``.seg.nrrd`` writer
uses too; a run writes segments only for the labels it found (:func:`segment_specs`).
"""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import numpy as np

from SwinUNETRSegmentLib.merge import mask_stamp
from SwinUNETRSegmentLib.models.cards import ModelCard
from SwinUNETRSegmentLib.models.segment_table import SegmentSpec, present_values, segment_table, terminology_string

__all__ = ["SegmentSpec", "terminology_string", "segment_specs", "present_values", "labels_for_import",
           "segment_id_slots", "stamps_by_value"]


def segment_specs(card: ModelCard, values: Iterable[int]) -> list[SegmentSpec]:
    """The segments for label ``values`` of ``card``, in the card's order; unknown values are skipped."""
    return segment_table(card, values)


def labels_for_import(labels: np.ndarray, values: Iterable[int]) -> np.ndarray:
    """``labels`` with every value not in ``values`` set to 0 (uint8, same shape).

    A labelmap imported into a segmentation becomes a shared layer; voxels of a value no
    segment claims would linger in it and show up in the next segment that takes that
    value. So only the values the run writes stay.
    """
    keep = np.isin(labels, np.asarray(sorted({int(v) for v in values}), dtype=np.int64))
    return np.where(keep, labels, 0).astype(np.uint8)


def segment_id_slots(assignments: Mapping[int, str]) -> list[str]:
    """Segment IDs by label value for ``ImportLabelmapToSegmentationNode(..., updatedSegmentIDs)``.

    That call maps label value ``v`` to entry ``v - 1`` and skips empty entries, so
    ``{1: "spleen", 3: "liver"}`` gives ``["spleen", "", "liver"]``.
    """
    if not assignments:
        return []
    if min(assignments) < 1:
        raise ValueError("label values start at 1")
    slots = [""] * max(assignments)
    for value, segment_id in assignments.items():
        slots[value - 1] = segment_id
    return slots


def stamps_by_value(labels: np.ndarray, values: Sequence[int]) -> dict[int, str]:
    """The edit stamp of each value's mask, as the next run will recompute it from Slicer.

    ``labels`` must be in the axis order Slicer exports (``[k, j, i]``, as
    ``slicer.util.arrayFromSegmentBinaryLabelmap`` returns it on the input volume's grid).
    """
    return {int(v): mask_stamp(labels == v) for v in values}
