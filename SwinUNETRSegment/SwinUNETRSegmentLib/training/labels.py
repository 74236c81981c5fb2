"""Training labels: label maps, Slicer segmentations and DICOM SEG as the card's label values.

Labels are label maps (NIfTI, NRRD...) whose values are the card's (or translated to them
by a ``--label-map``), or Slicer ``.seg.nrrd`` files, whose segments are matched to the
card's labels by SNOMED code (type and modifier) or, failing that, by name, so that
segmentations clinicians corrected in Slicer become training data; or DICOM SEG ``.dcm``
files (from a PACS, Slicer or this engine), matched the same way
(:func:`~SwinUNETRSegmentLib.fileio.dicomseg.read_dicom_seg_labels`). A label grid that
differs from its image's (Slicer crops ``.seg.nrrd`` to the segments' extent) is
resampled onto the image's voxels by nearest neighbour, background outside.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from SwinUNETRSegmentLib.errors import UserError
from SwinUNETRSegmentLib.fileio.read import has_suffix, read_volume
from SwinUNETRSegmentLib.geometry import Volume
from SwinUNETRSegmentLib.models.cards import LabelInfo, ModelCard

__all__ = ["match_segments", "read_label", "load_label_map"]


def _label_key(lab_type: Sequence[str], modifier: Optional[Sequence[str]]) -> tuple:
    return (str(lab_type[0]).upper(), str(lab_type[1]), None if not modifier or not modifier[1] else str(modifier[1]))


def match_segments(segments: Sequence[dict], labels: Sequence[LabelInfo]) -> dict[str, int]:
    """Segment id -> card label value, by SNOMED type (+ modifier) code, else by name.

    Args:
        segments: slicerio's segment dictionaries (``id``, ``name``, ``terminology``).
        labels: the card's labels.

    Segments that match no label (e.g. a tumour a clinician added) are left out.
    """
    by_code = {_label_key(lab.type.as_list(), lab.type_modifier.as_list() if lab.type_modifier else None): lab.value
               for lab in labels}
    by_name = {lab.name.strip().lower(): lab.value for lab in labels}
    out: dict[str, int] = {}
    for seg in segments:
        term = seg.get("terminology") or {}
        value = None
        if term.get("type") and len(term["type"]) >= 2 and term["type"][1]:
            value = by_code.get(_label_key(term["type"], term.get("typeModifier")))
        if value is None:
            value = by_name.get(str(seg.get("name", "")).strip().lower())
        if value is not None:
            out[seg["id"]] = value
    return out


def load_label_map(path: Optional[str | Path]) -> Optional[dict[int, int]]:
    """``--label-map``: a JSON object {source value: card value}, or None without a path."""
    if not path:
        return None
    try:
        return {int(k): int(v) for k, v in json.loads(Path(path).read_text()).items()}
    except (OSError, ValueError, AttributeError) as exc:
        raise UserError(f"--label-map {path} must be a JSON object of integer values ({exc})") from None


def _segmentation_labels(p: Path, card: ModelCard) -> Volume:
    from SwinUNETRSegmentLib.fileio import segnrrd as slicerio

    try:
        seg = slicerio.read_segmentation(str(p))
    except Exception as exc:
        raise UserError(f"cannot read segmentation {p.name} ({' '.join(str(exc).split())[:160]})") from None
    matched = match_segments(seg["segments"], card.labels)
    if not matched:
        names = ", ".join(s.get("name", "?") for s in seg["segments"])
        raise UserError(f"no segment of {p.name} ({names}) matches a label of card '{card.name}' by SNOMED code "
                        "or name")
    voxels = np.asarray(seg["voxels"])
    arr = np.zeros(voxels.shape[-3:], np.uint8)
    for s in seg["segments"]:
        if s["id"] in matched:
            arr[slicerio.segment_mask(seg, s)] = matched[s["id"]]
    return Volume.from_lps(arr, np.asarray(seg["ijkToLPS"], dtype=float))


def _label_map(p: Path, card: ModelCard, label_map: Optional[dict[int, int]]) -> Volume:
    vol, _ = read_volume(p)
    arr = np.asarray(vol.array)
    if label_map is not None:
        lut = np.zeros(int(max(arr.max(initial=0), max(label_map, default=0))) + 1, np.uint8)
        for k, v in label_map.items():
            lut[int(k)] = int(v)
        arr = lut[np.clip(arr, 0, len(lut) - 1).astype(np.int64)]
    valid = {lab.value for lab in card.labels} | {0}
    bad = sorted(set(np.unique(arr).tolist()) - valid)
    if bad:
        raise UserError(f"label map {p.name} has values {bad[:8]} that are not labels of card '{card.name}'; "
                        "give --label-map to translate them")
    return Volume(arr.astype(np.uint8), vol.ijk_to_ras)


def read_label(path: str | Path, card: ModelCard, grid: Volume, label_map: Optional[dict[int, int]] = None,
               ) -> np.ndarray:
    """The labels of ``path`` as card label values (uint8, ``grid.shape``) on ``grid``'s voxels.

    Args:
        path: a label map, a Slicer ``.seg.nrrd`` (segments matched by :func:`match_segments`), or a
            DICOM SEG ``.dcm`` (:func:`~SwinUNETRSegmentLib.fileio.dicomseg.read_dicom_seg_labels`).
        card: the model card whose label values the result holds.
        grid: the image the labels belong to.
        label_map: {source value: card value} for a label map with other values (unlisted
            values become background).

    Raises:
        UserError: a segmentation without any segment of the card, or a label map with
            values that are not the card's.
    """
    from SwinUNETRSegmentLib.inference.resample import resample_labels

    p = Path(path)
    if has_suffix(p, (".dcm",)):  # a DICOM SEG: segments matched by SNOMED code, put on the grid by highdicom
        from SwinUNETRSegmentLib.fileio.dicomseg import read_dicom_seg_labels
        return read_dicom_seg_labels(p, card, grid)
    src = _segmentation_labels(p, card) if has_suffix(p, (".seg.nrrd",)) else _label_map(p, card, label_map)
    if src.same_grid(grid):
        return src.array.astype(np.uint8)
    return resample_labels(src, grid, outside="zeros")
