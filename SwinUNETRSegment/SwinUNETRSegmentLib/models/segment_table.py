"""A card's labels as the segments of a segmentation: the one segment table.

Both writers of segments use it: the ``.seg.nrrd`` writer
(:func:`SwinUNETRSegmentLib.fileio.segnrrd.segments_for`, every label of the card) and the
Slicer module (``SwinUNETRSegmentSlicer.segments``, only the labels a run found).

A Slicer segment carries a name, a colour (0..1 floats) and a terminology entry: a string
in the format of ``vtkSlicerTerminologiesModuleLogic::SerializeTerminologyEntry`` stored in
the segment tag ``vtkSegment::GetTerminologyEntryTagName()`` ("TerminologyEntry")::

    context~category scheme^value^meaning~type~type modifier~anatomic context~region~region modifier

which is also what slicerio writes into ``.seg.nrrd`` files. Needs numpy only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Optional, Sequence, Union

import numpy as np

from SwinUNETRSegmentLib.models.cards import LabelInfo, ModelCard

__all__ = ["SegmentSpec", "segment_table", "present_values", "label_counts", "terminology_string"]

_EMPTY_CODE = ("", "", "")


@dataclass(frozen=True)
class SegmentSpec:
    """How one label becomes a segment.

    Attributes:
        value: the label value in the run's label map.
        name: segment name.
        color: RGB in 0..1, as ``vtkSegment::SetColor`` takes it (the card's 0..255 / 255,
            rounded to 6 decimals).
        terminology: the serialized terminology entry (SNOMED CT codes).
        entry: the same terminology as the dict slicerio writes as the segment's
            ``TerminologyEntry`` tag.
    """

    value: int
    name: str
    color: tuple[float, float, float]
    terminology: str
    entry: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def of(cls, label: LabelInfo) -> "SegmentSpec":
        return cls(int(label.value), label.name, label.color_float, terminology_string(label), label.terminology())


def terminology_string(label: LabelInfo) -> str:
    """The label's terminology entry serialized as Slicer stores it on a segment."""
    t = label.terminology()

    def code(key: str) -> str:
        return "^".join(t.get(key) or _EMPTY_CODE)

    return "~".join([
        t.get("contextName", ""), code("category"), code("type"), code("typeModifier"),
        t.get("anatomicContextName", ""), code("anatomicRegion"), code("anatomicRegionModifier"),
    ])


def label_counts(labels: np.ndarray, chunk: int = 1 << 20) -> np.ndarray:
    """Voxels of each value in an unsigned integer label array (any shape, any strides):
    ``counts[v]`` for ``v`` in ``0..max``.

    Counted ``chunk`` voxels at a time along the first axis, so that no copy of the whole
    array is made (``np.bincount`` converts its input to ``intp``, 8 bytes a voxel).
    """
    arr = np.asarray(labels)
    if arr.dtype.kind not in "bu":
        raise TypeError(f"label_counts needs an unsigned integer array, got {arr.dtype}")
    if arr.ndim == 0:
        arr = arr.reshape(1)
    counts = np.zeros(1, np.int64)
    step = max(1, chunk // max(1, int(np.prod(arr.shape[1:]))))
    for start in range(0, arr.shape[0], step):
        part = np.bincount(arr[start:start + step].reshape(-1))
        if len(part) > len(counts):
            part[: len(counts)] += counts
            counts = part
        else:
            counts[: len(part)] += part
    return counts


def present_values(labels: np.ndarray) -> list[int]:
    """Nonzero label values that occur in ``labels`` (any shape), ascending."""
    arr = np.asarray(labels)
    if arr.dtype.kind in "bu":
        return [int(v) for v in np.flatnonzero(label_counts(arr)) if v != 0]
    return [int(v) for v in np.unique(arr) if v != 0]


def segment_table(labels: Union[ModelCard, Sequence[LabelInfo]],
                  values: Optional[Iterable[int]] = None) -> list[SegmentSpec]:
    """The segments of a card's labels, in the card's order.

    Args:
        labels: a model card, or its label table (``card.labels``).
        values: when given, only the labels with these values (e.g.
            ``present_values(label_array)``: the labels a run found); values the card does
            not name are skipped. When None, every label of the card.
    """
    table = labels.labels if isinstance(labels, ModelCard) else labels
    wanted = None if values is None else {int(v) for v in values}
    return [SegmentSpec.of(lab) for lab in table if wanted is None or lab.value in wanted]
