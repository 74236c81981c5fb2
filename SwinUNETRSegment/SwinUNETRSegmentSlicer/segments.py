"""The segment table of a run and the label array it imports, without Slicer.

A Slicer segment carries a name, a colour (0..1 floats) and a terminology entry: a
string in the format of ``vtkSlicerTerminologiesModuleLogic::SerializeTerminologyEntry``
stored in the segment tag ``vtkSegment::GetTerminologyEntryTagName()``
("TerminologyEntry")::

    context~category scheme^value^meaning~type~type modifier~anatomic context~region~region modifier

which is also what slicerio writes into ``.seg.nrrd`` files.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import numpy as np

from SwinUNETRSegmentLib.models.cards import LabelInfo, ModelCard
from SwinUNETRSegmentLib.merge import mask_stamp

_EMPTY_CODE = ("", "", "")


@dataclass(frozen=True)
class SegmentSpec:
    """How one label becomes a Slicer segment.

    Attributes:
        value: the label value in the run's label map.
        name: segment name.
        color: RGB in 0..1, as ``vtkSegment::SetColor`` takes it.
        terminology: the serialized terminology entry (SNOMED CT codes).
    """

    value: int
    name: str
    color: tuple[float, float, float]
    terminology: str


def terminology_string(label: LabelInfo) -> str:
    """The label's terminology entry serialized as Slicer stores it on a segment."""
    t = label.terminology()

    def code(key: str) -> str:
        return "^".join(t.get(key) or _EMPTY_CODE)

    return "~".join([
        t.get("contextName", ""), code("category"), code("type"), code("typeModifier"),
        t.get("anatomicContextName", ""), code("anatomicRegion"), code("anatomicRegionModifier"),
    ])


def segment_specs(card: ModelCard, values: Iterable[int]) -> list[SegmentSpec]:
    """The segments for label ``values`` of ``card``, in the card's order; unknown values are skipped."""
    wanted = {int(v) for v in values}
    return [SegmentSpec(lab.value, lab.name, lab.color_float, terminology_string(lab)) for lab in card.labels if lab.value in wanted]


def present_values(labels: np.ndarray) -> list[int]:
    """Nonzero label values that occur in ``labels``, ascending."""
    return [int(v) for v in np.unique(labels) if v != 0]


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
