"""DICOM SEG, both ways, through highdicom.

Writing (:func:`write_dicom_seg`, :func:`build_dicom_seg`): one segment per label the run
found, each with the card's SNOMED CT category and type (and the left/right modifier of a
paired organ inside the type's code item, where DICOM puts it), the label's name and colour
(CIELab), and an ``AlgorithmIdentificationSequence`` (family "Artificial Intelligence",
the model's name, and a version that names the weights). The SEG references the instances
of the source series. Its geometry is the label volume's own voxel-to-patient matrix,
handed to highdicom as a ``highdicom.Volume`` and matched to the source series' stack by
highdicom (``Volume.match_geometry``: permutes and flips, never resamples), so that each
frame lies on a source slice; no axis is flipped here. ``BINARY`` (one bit-packed frame per
segment and slice) by default, ``LABELMAP`` (one frame per slice) on request.

Reading (:func:`read_dicom_seg_labels`): a SEG's segments matched to a card's labels by
SNOMED code (type and modifier; else the segment label as the label name), put on a grid
as a uint8 label array: for training labels.

A source that is one enhanced multi-frame image (:func:`.dicom.check_multiframe`) is referenced
frame by frame (each SEG frame names the source frame it lies on, ReferencedFrameNumber).

Source series whose Study, Series or SOP Instance UIDs are empty (anonymised exports) get
them filled in a copy of their headers: SOP UIDs from the file meta, the others derived
deterministically from the instances (:func:`prepare_sources`), so a rerun gives the same.
"""

from __future__ import annotations

import copy
import importlib.metadata
import re
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from SwinUNETRSegmentLib.errors import UserError
from SwinUNETRSegmentLib.fileio.atomic import atomic_path, file_digest
from SwinUNETRSegmentLib.fileio.dicom import check_multiframe, is_multiframe, share_frame_geometry
from SwinUNETRSegmentLib.geometry import Volume
from SwinUNETRSegmentLib.models.cards import LabelInfo, ModelCard
from SwinUNETRSegmentLib.models.segment_table import present_values

__all__ = ["DICOM_SEG_SUFFIXES", "SEGMENTATION_TYPES", "Algorithm", "algorithm_of", "prepare_sources",
           "build_dicom_seg", "write_dicom_seg", "seg_references", "read_dicom_seg_labels", "match_segments"]

DICOM_SEG_SUFFIXES = (".dcm",)
#: ``--dicom-seg-type``: BINARY (one frame per segment and slice) or LABELMAP (one frame per slice)
SEGMENTATION_TYPES = ("binary", "labelmap")
MANUFACTURER = "SwinUNETR Segment"
SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
LABELMAP_SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.7"


def _package_version() -> str:
    try:
        return importlib.metadata.version("swinunetr-segment")
    except importlib.metadata.PackageNotFoundError:
        return "0"


@dataclass(frozen=True)
class Algorithm:
    """What made a SEG: ``AlgorithmName`` and ``AlgorithmVersion`` of its segments."""

    name: str
    version: str


def algorithm_of(card: ModelCard, weights: str | Path | None = None) -> Algorithm:
    """The model's name, and a version naming its weights (``sha256:`` and 16 hex digits of
    the checkpoint file, else of the card's recorded checksum), so that SEGs of other
    weights under the same card name are told apart."""
    digest = file_digest(weights)[:16] if weights is not None and Path(weights).is_file() else ""
    digest = digest or str(card.checkpoint.get("sha256") or "")[:16]
    return Algorithm(card.name[:64], f"sha256:{digest}" if digest else f"swinunetr-segment {_package_version()}")


def _uid(value) -> str:
    return str(value or "").strip().rstrip("\x00").strip()


def _derived_uid(*parts: str) -> str:
    """A valid UID from a name-based UUID of ``parts``: the same on every run."""
    return f"2.25.{uuid.uuid5(uuid.NAMESPACE_OID, '|'.join(parts)).int}"


def prepare_sources(datasets: Sequence, repair_invalid_uids: bool = True) -> tuple[list, list[str]]:
    """Copies of the source headers a SEG can reference, and notes on what was filled in.

    Empty SOPClassUID / SOPInstanceUID come from each file's meta information; an empty
    StudyInstanceUID, SeriesInstanceUID or FrameOfReferenceUID is derived (``2.25.`` and a
    name-based UUID of the instances' UIDs), the same for every instance and on every run.
    With ``repair_invalid_uids``, a UID that breaks the DICOM UID syntax (leading zeros,
    letters, over 64 characters), which the SEG would otherwise inherit and fail validation
    with, is replaced the same way (derived from the original, so consistently); a DICOMweb
    job keeps the server's UIDs instead, so that the SEG joins its study there.
    """
    if not datasets:
        raise UserError("a DICOM SEG needs the DICOM series it segments; give a DICOM folder or a --pacs series")
    out, notes = [], []
    for ds in datasets:
        c = copy.deepcopy(ds)
        meta = getattr(ds, "file_meta", None)
        for kw in ("SOPInstanceUID", "SOPClassUID"):
            meta_kw = "MediaStorage" + kw
            if not _uid(c.get(kw)) and meta is not None and _uid(meta.get(meta_kw)):
                setattr(c, kw, _uid(meta.get(meta_kw)))
        if is_multiframe(c):
            share_frame_geometry(c)
        if not _uid(c.get("SOPInstanceUID")):
            raise UserError(f"{Path(getattr(ds, 'filename', '') or 'an instance').name} has no SOPInstanceUID; "
                            "a DICOM SEG cannot reference it: export the series again with its UIDs")
        out.append(c)
    if repair_invalid_uids:
        _repair_uids(out, notes)
    seed = sorted(_uid(c.SOPInstanceUID) for c in out)
    for kw in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID"):
        values = {_uid(c.get(kw)) for c in out}
        if values == {""}:
            derived = _derived_uid(kw, *seed)
            for c in out:
                setattr(c, kw, derived)
            notes.append(f"the source series has no {kw}; the SEG uses {derived}, derived from its instances")
        elif len(values) > 1:
            raise UserError(f"the source instances have {len(values)} different {kw}s; "
                            "segment one series at a time")
    _fix_slice_spacing(out, notes)
    return out, notes


_UID_SYNTAX = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")


def _repair_uids(sources: list, notes: list[str]) -> None:
    for kw in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID", "SOPInstanceUID"):
        bad = 0
        for ds in sources:
            value = _uid(ds.get(kw))
            if value and (len(value) > 64 or not _UID_SYNTAX.fullmatch(value)):
                setattr(ds, kw, _derived_uid(kw, value))
                bad += 1
        if bad:
            notes.append(f"{bad} source {kw}{'s are' if bad > 1 else ' is'} not a valid DICOM UID; the SEG refers "
                         "to the instances by UIDs derived from them")


def _fix_slice_spacing(sources: list, notes: list[str]) -> None:
    """highdicom copies the source's SpacingBetweenSlices into the SEG's pixel measures: where
    it disagrees with the spacing of the slice positions, the copies get the measured one."""
    if len(sources) < 2 or any(is_multiframe(ds) for ds in sources):
        return
    try:
        normal = np.cross(*np.reshape(np.asarray(sources[0].ImageOrientationPatient, float), (2, 3)))
        along = np.sort([float(np.asarray(ds.ImagePositionPatient, float) @ normal) for ds in sources])
    except (AttributeError, TypeError, ValueError):
        return
    step = float(np.median(np.diff(along)))
    stated = sources[0].get("SpacingBetweenSlices")
    if step > 0 and stated not in (None, "") and abs(float(stated) - step) > 0.01 * step:
        for ds in sources:
            ds.SpacingBetweenSlices = f"{step:.6g}"
        notes.append(f"the source's SpacingBetweenSlices ({float(stated):g} mm) is not the spacing of its slice "
                     f"positions; the SEG records {step:.6g} mm")


def _concept(code):
    from highdicom.sr import CodedConcept

    return CodedConcept(value=code.value, scheme_designator=code.scheme, meaning=code.meaning)


def _description(number: int, label: LabelInfo, algorithm: Algorithm):
    import highdicom as hd
    from pydicom.sr.codedict import codes

    desc = hd.seg.SegmentDescription(
        segment_number=number,
        segment_label=label.name[:64],
        segmented_property_category=_concept(label.category),
        segmented_property_type=_concept(label.type),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=hd.AlgorithmIdentificationSequence(
            name=algorithm.name, family=codes.cid7162.ArtificialIntelligence, version=algorithm.version[:64]),
        display_color=hd.color.CIELabColor.from_rgb(*label.color),
    )
    if label.type_modifier is not None:  # (0062,0011) lives inside the type's code item
        desc.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [
            _concept(label.type_modifier)]
    return desc


def _source_geometry(sources: Sequence):
    """The source stack as a highdicom VolumeGeometry, its frames ordered as highdicom orders
    a series (``get_series_volume_positions``), or a multi-frame image's frames in slice order
    (:func:`.dicom.check_multiframe`); None for a stack highdicom does not take for a volume."""
    import highdicom as hd
    from highdicom.spatial import get_series_volume_positions

    first = sources[0]
    if len(sources) == 1 and is_multiframe(first):
        stack = check_multiframe(first, "the source image")
        return hd.VolumeGeometry(stack.ijk_to_lps, (int(first.Columns), int(first.Rows), len(stack.order)),
                                 coordinate_system="PATIENT", frame_of_reference_uid=_uid(first.get(
                                     "FrameOfReferenceUID")) or None).permute_spatial_axes([2, 1, 0])
    if len(sources) < 2 or is_multiframe(first):
        return None
    spacing, positions = get_series_volume_positions(sources, orientation_tol=1e-3)
    if spacing is None or positions is None:
        return None
    first = sources[positions.index(0)]
    return hd.VolumeGeometry.from_attributes(
        image_position=[float(v) for v in first.ImagePositionPatient],
        image_orientation=[float(v) for v in first.ImageOrientationPatient],
        rows=int(first.Rows), columns=int(first.Columns),
        pixel_spacing=[float(v) for v in first.PixelSpacing], spacing_between_slices=spacing,
        number_of_frames=len(sources), coordinate_system="PATIENT",
        frame_of_reference_uid=_uid(first.get("FrameOfReferenceUID")) or None)


def build_dicom_seg(labels: Volume, card: ModelCard, sources: Sequence, algorithm: Algorithm,
                    segmentation_type: str = "binary", series_number: int | None = None):
    """The ``highdicom.seg.Segmentation`` of a run.

    Args:
        labels: the label map on the source series' grid (uint8 values of ``card.labels``).
        card: the model card (segment names, colours, codes).
        sources: the source series' headers, sorted along the slice normal, as
            :func:`prepare_sources` returns them.
        algorithm: what :func:`algorithm_of` returns.
        segmentation_type: "binary" or "labelmap".
        series_number: the SEG's SeriesNumber (default: the source's + 1000).

    Raises:
        UserError: no label of the card was found (a SEG needs at least one segment).
    """
    import highdicom as hd

    kind = str(segmentation_type).lower()
    if kind not in SEGMENTATION_TYPES:
        raise UserError(f"DICOM SEG type '{segmentation_type}' is not known; "
                        f"use one of {', '.join(SEGMENTATION_TYPES)}")
    known = {lab.value: lab for lab in card.labels}
    values = [v for v in present_values(labels.array) if v in known]
    if not values:
        raise UserError(f"model '{card.name}' found none of its {len(card.labels)} structures in this scan; "
                        "no DICOM SEG was written (a SEG needs at least one segment)")
    lut = np.zeros(max(256, int(np.asarray(labels.array).max()) + 1), np.uint8)
    lut[values] = np.arange(1, len(values) + 1, dtype=np.uint8)
    first = sources[0]
    volume = hd.Volume(lut[np.asarray(labels.array)], labels.ijk_to_lps, coordinate_system="PATIENT",
                       frame_of_reference_uid=_uid(first.get("FrameOfReferenceUID")) or None)
    geometry = _source_geometry(sources)
    try:  # frames on the source slices: a permutation and flips, done by highdicom
        if geometry is None:
            raise RuntimeError("no source stack")
        volume = volume.match_geometry(geometry, tol=1e-3)
    except RuntimeError:  # another grid: slices (k) as frames, each placed by its own position
        volume = volume.permute_spatial_axes([2, 1, 0])
    number = series_number if series_number is not None else int(first.get("SeriesNumber") or 0) % 100000 + 1000
    seg = hd.seg.Segmentation(
        source_images=list(sources),
        pixel_array=volume,
        segmentation_type=kind.upper(),
        segment_descriptions=[_description(n, known[v], algorithm) for n, v in enumerate(values, 1)],
        series_instance_uid=hd.UID(),
        series_number=number,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=f"swinunetr-segment {card.name}"[:64],
        software_versions=_package_version(),
        device_serial_number="1",
        content_label="SWINUNETR",
        content_description=f"{card.name} segmentation"[:64],
        series_description=f"SwinUNETR {card.name}"[:64],
    )
    return seg


def write_dicom_seg(path: str | Path, labels: Volume, card: ModelCard, datasets: Sequence,
                    algorithm: Algorithm | None = None, segmentation_type: str = "binary") -> Path:
    """Write the DICOM SEG of ``labels`` (see :func:`build_dicom_seg`) atomically; ``datasets``
    are the source series' headers (``ScanInfo.dicom``)."""
    sources, _notes = prepare_sources(datasets)
    seg = build_dicom_seg(labels, card, sources, algorithm or algorithm_of(card), segmentation_type)
    with atomic_path(path) as tmp:
        seg.save_as(str(tmp), enforce_file_format=True)
    return Path(path)


def seg_references(ds) -> tuple[set[str], set[tuple[str, str]]]:
    """(SeriesInstanceUIDs a SEG references, the (name, version) of its segments' algorithms),
    from a SEG dataset or its metadata (a WADO-RS metadata dataset has no pixels)."""
    series = {_uid(item.get("SeriesInstanceUID")) for item in ds.get("ReferencedSeriesSequence") or []}
    for frame in ds.get("PerFrameFunctionalGroupsSequence") or []:  # a few writers reference per frame only
        for der in frame.get("DerivationImageSequence") or []:
            for src in der.get("SourceImageSequence") or []:
                series.discard("")
                if src.get("ReferencedSeriesInstanceUID"):
                    series.add(_uid(src.ReferencedSeriesInstanceUID))
    algorithms = set()
    for seg in ds.get("SegmentSequence") or []:
        for alg in seg.get("SegmentationAlgorithmIdentificationSequence") or []:
            algorithms.add((str(alg.get("AlgorithmName") or ""), str(alg.get("AlgorithmVersion") or "")))
    return series - {""}, algorithms


def _codes(item) -> tuple[str, str]:
    return (str(item.get("CodingSchemeDesignator") or ""), str(item.get("CodeValue") or ""))


def match_segments(seg, card: ModelCard) -> dict[int, int]:
    """{segment number: card label value} for the segments of a SEG that name a card label:
    the same SNOMED type code and modifier; else the same type when the card has one label
    of that type and it has no modifier; else the segment label equal to the label name."""
    out = {}
    for item in seg.SegmentSequence:
        types = item.get("SegmentedPropertyTypeCodeSequence") or []
        code = _codes(types[0]) if types else ("", "")
        mods = (types[0].get("SegmentedPropertyTypeModifierCodeSequence") or []) if types else []
        mod = _codes(mods[0]) if mods else None
        same_type = [lab for lab in card.labels if (lab.type.scheme, lab.type.value) == code]
        exact = [lab for lab in same_type if (None if lab.type_modifier is None else
                                              (lab.type_modifier.scheme, lab.type_modifier.value)) == mod]
        named = [lab for lab in card.labels if lab.name.lower() == str(item.get("SegmentLabel") or "").lower()]
        if exact:
            out[int(item.SegmentNumber)] = exact[0].value
        elif len(same_type) == 1 and same_type[0].type_modifier is None:
            out[int(item.SegmentNumber)] = same_type[0].value
        elif named:
            out[int(item.SegmentNumber)] = named[0].value
    return out


def read_dicom_seg_labels(path: str | Path, card: ModelCard, grid: Volume) -> np.ndarray:
    """A DICOM SEG as a uint8 label array on ``grid`` (shape ``grid.shape``, values of
    ``card.labels``; segments that name no card label are left out, background 0).

    The SEG's frames are matched to the grid by highdicom (permutes, flips, pads, crops);
    where the grids differ otherwise, each grid voxel takes the segment at its nearest SEG
    voxel. Where segments overlap, the later segment wins.

    Raises:
        UserError: the file is not a readable DICOM SEG, or no segment names a card label.
    """
    import highdicom as hd

    try:
        seg = hd.seg.segread(str(path))
    except Exception as exc:
        raise UserError(f"cannot read {Path(path).name} as a DICOM SEG ({' '.join(str(exc).split())[:160]}); "
                        "give a DICOM Segmentation file") from None
    matched = match_segments(seg, card)
    if not matched:
        names = ", ".join(str(s.get("SegmentLabel")) for s in seg.SegmentSequence)
        raise UserError(f"no segment of {Path(path).name} ({names}) matches a label of card '{card.name}' by SNOMED "
                        "code or name; check that the SEG and the card describe the same structures")
    numbers = sorted(matched)
    try:
        vol = seg.get_volume(segment_numbers=numbers, combine_segments=False, dtype=np.uint8)
    except (RuntimeError, ValueError) as exc:
        raise UserError(f"{Path(path).name} is not a regular 3D stack of frames ({' '.join(str(exc).split())[:160]}); "
                        "give a SEG of a volume") from None
    target = hd.VolumeGeometry(grid.ijk_to_lps, grid.shape, coordinate_system="PATIENT")
    out = np.zeros(grid.shape, np.uint8)
    try:
        on_grid = vol.match_geometry(target).array
    except RuntimeError:
        on_grid = _nearest(vol.array, vol.affine, grid)
    for channel, number in enumerate(numbers):
        out[on_grid[..., channel] > 0] = matched[number]
    return out


def _nearest(array: np.ndarray, affine: np.ndarray, grid: Volume) -> np.ndarray:
    """``array`` ([slice, row, column, channel], voxel-to-LPS ``affine``) sampled at the
    grid's voxel centres, nearest voxel, zero outside; one k-plane of the grid at a time."""
    to_src = np.linalg.inv(affine) @ grid.ijk_to_lps
    out = np.zeros(grid.shape + array.shape[3:], array.dtype)
    ii, jj = np.meshgrid(np.arange(grid.shape[0]), np.arange(grid.shape[1]), indexing="ij")
    for k in range(grid.shape[2]):
        ijk = np.stack([ii, jj, np.full_like(ii, k), np.ones_like(ii)], axis=-1).reshape(-1, 4)
        idx = np.rint(ijk @ to_src.T)[:, :3].astype(np.int64)
        ok = np.all((idx >= 0) & (idx < np.asarray(array.shape[:3])), axis=1)
        plane = np.zeros((idx.shape[0],) + array.shape[3:], array.dtype)
        plane[ok] = array[idx[ok, 0], idx[ok, 1], idx[ok, 2]]
        out[:, :, k] = plane.reshape(grid.shape[:2] + array.shape[3:])
    return out
