"""A DICOM series' headers, and the geometry checks every DICOM input goes through.

The voxels are decoded by SimpleITK (:mod:`.read`); this module reads the headers with
pydicom (no pixel data) and decides which files make up the volume and in what order:

- localizer (scout) images that share the series UID (``ImageType`` says LOCALIZER) are
  left out, as are second copies of the same instance (same SOPInstanceUID);
- the rest must be one stack: one image size, one orientation, slice positions on a line
  perpendicular to the slices (no gantry tilt), evenly spaced (no missing slice). Anything
  else is a one-line :class:`UserError` that says what to do.

One enhanced multi-frame image (Enhanced CT / MR, their Legacy Converted forms: every slice
a frame of one file) passes the same checks frame by frame (:func:`check_multiframe`): each
frame's position from its PerFrameFunctionalGroupsSequence, its orientation and pixel
spacing from there or from the SharedFunctionalGroupsSequence.

The kept headers travel with the volume (``ScanInfo.dicom``) so that a DICOM SEG can
reference the instances it segments (:mod:`.dicomseg`).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from SwinUNETRSegmentLib.errors import UserError

__all__ = ["DicomSeries", "FrameStack", "read_headers", "check_series", "check_multiframe", "is_multiframe",
           "share_frame_geometry", "is_localizer", "slice_normal"]

#: positions and spacings are compared to this many millimetres, or this fraction of the spacing
_ABS_TOL_MM = 0.02
_REL_TOL = 0.01
#: slices stacked more than this many degrees off their normal are a gantry tilt
_TILT_DEGREES = 0.1
#: direction cosines that differ by less than this are one orientation
_ORIENTATION_TOL = 1e-3


@dataclass
class DicomSeries:
    """The instances that make up one volume, sorted along the slice normal.

    Attributes:
        files: the files, in slice order (increasing position along ``row x column``).
        datasets: their headers (pydicom datasets without pixel data), same order.
        dropped: what was left out and why (``"2 localizer images"``), for a message.
    """

    files: list[str]
    datasets: list
    dropped: list[str]


def read_headers(files: Sequence[str | Path]) -> list:
    """The headers of ``files`` (pydicom datasets without pixel data); unreadable files skipped."""
    import pydicom

    out = []
    for f in files:
        try:
            ds = pydicom.dcmread(str(f), stop_before_pixels=True)
        except Exception:  # GDCM listed it, pydicom cannot parse it: ITK reports it if it matters
            continue
        ds.filename = str(f)
        out.append(ds)
    return out


def is_localizer(ds) -> bool:
    """Whether a header is a localizer (scout, topogram): ``ImageType`` value 3 says LOCALIZER."""
    image_type = [str(v).upper() for v in (ds.get("ImageType") or [])]
    return "LOCALIZER" in image_type[2:3] or "LOCALIZER" in image_type


def slice_normal(orientation: Sequence[float]) -> np.ndarray:
    """The unit normal ``row x column`` of an ImageOrientationPatient (LPS)."""
    o = np.asarray(orientation, dtype=np.float64)
    n = np.cross(o[:3], o[3:6])
    return n / np.linalg.norm(n)


def _vector(ds, keyword: str, size: int, where: str) -> np.ndarray:
    value = ds.get(keyword)
    try:
        arr = np.asarray([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        arr = np.zeros(0)
    if arr.shape != (size,) or not np.all(np.isfinite(arr)):
        name = Path(getattr(ds, "filename", "") or "a slice").name
        raise UserError(f"{name} in {where} has no valid {keyword}; the series cannot be placed in space: "
                        "export it again from the scanner or PACS with its geometry tags")
    return arr


def check_series(datasets: Sequence, where: str) -> DicomSeries:
    """The files of one volume from the headers of one series, in slice order.

    Args:
        datasets: headers of the series' files (see :func:`read_headers`), any order.
        where: names the series in messages (its folder, or its UID on a server).

    Raises:
        UserError: the series is not one evenly spaced stack of parallel slices (several
            orientations or image sizes, gantry tilt, a missing slice, uneven spacing,
            two slices at one position, only localizers).
    """
    dropped: list[str] = []
    scouts = [ds for ds in datasets if is_localizer(ds)]
    kept = [ds for ds in datasets if not is_localizer(ds)]
    if scouts and not kept:
        raise UserError(f"the DICOM series in {where} holds only localizer (scout) images; "
                        "give the series of the CT itself")
    if scouts:
        dropped.append(f"{len(scouts)} localizer image{'s' if len(scouts) > 1 else ''}")
    seen: dict[tuple, object] = {}
    for ds in kept:
        meta = getattr(ds, "file_meta", None)
        uid = str(ds.get("SOPInstanceUID") or "") or str(getattr(meta, "MediaStorageSOPInstanceUID", ""))
        where_ = (str(ds.get("ImagePositionPatient")), str(ds.get("ImageOrientationPatient")))
        seen.setdefault((uid or getattr(ds, "filename", str(id(ds))), where_), ds)  # the same instance, twice
    if len(seen) < len(kept):
        dropped.append(f"{len(kept) - len(seen)} second copies of an instance")
        kept = list(seen.values())
    frames = [ds for ds in kept if is_multiframe(ds)]
    if frames and len(kept) > 1:
        raise UserError(f"the DICOM series in {where} mixes {len(frames)} multi-frame image"
                        f"{'s' if len(frames) > 1 else ''} with {len(kept) - len(frames)} other instance"
                        f"{'s' if len(kept) - len(frames) != 1 else ''}; put each multi-frame file in a folder of its "
                        "own")
    if len(kept) < 2:
        # one file: a multi-frame image is placed frame by frame (check_multiframe), by the reader
        return DicomSeries([getattr(ds, "filename", "") for ds in kept], list(kept), dropped)

    sizes = {(int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)) for ds in kept}
    if len(sizes) > 1:
        listed = ", ".join(f"{r} x {c}" for r, c in sorted(sizes))
        raise UserError(f"the DICOM series in {where} mixes images of different sizes ({listed}); "
                        "put the slices of one size in a folder of their own")
    orientations = [_vector(ds, "ImageOrientationPatient", 6, where) for ds in kept]
    groups = _groups(orientations, _ORIENTATION_TOL)
    if len(groups) > 1:
        counts = " + ".join(str(c) for c in sorted((c for _o, c in groups), reverse=True))
        raise UserError(f"the DICOM series in {where} holds slices in {len(groups)} orientations ({counts} slices: "
                        "reformats or a localizer mixed in); put the slices of one orientation in a folder of their "
                        "own (or choose them with --series if they have their own SeriesInstanceUID)")

    normal = slice_normal(orientations[0])
    positions = np.stack([_vector(ds, "ImagePositionPatient", 3, where) for ds in kept])
    along = positions @ normal
    order = np.argsort(along, kind="stable")
    kept = [kept[i] for i in order]
    positions, along = positions[order], along[order]
    _check_spacing(positions, along, normal, _series_words(where))
    return DicomSeries([getattr(ds, "filename", "") for ds in kept], kept, dropped)


def _groups(vectors: Sequence[np.ndarray], tol: float) -> list[tuple[np.ndarray, int]]:
    """(value, count) of each group of vectors equal to ``tol``, in order of first appearance."""
    groups: list[tuple[np.ndarray, int]] = []
    for v in vectors:
        for n, (ref, count) in enumerate(groups):
            if v.shape == ref.shape and np.max(np.abs(v - ref)) < tol:
                groups[n] = (ref, count + 1)
                break
        else:
            groups.append((v, 1))
    return groups


@dataclass(frozen=True)
class _Words:
    """How a message names the stack: a series of files, or the frames of one file."""

    subject: str  # "the DICOM series in /x"
    unit: str  # "slice" or "frame"
    same_fix: str  # what to do when several lie at one position
    missing_fix: str  # what to do about a missing one


def _series_words(where: str) -> _Words:
    return _Words(f"the DICOM series in {where}", "slice", "put the slices of one acquisition in a folder of their own",
                  "copy the missing files into the folder, or export the series again")


def _check_spacing(positions: np.ndarray, along: np.ndarray, normal: np.ndarray, words: _Words) -> None:
    where, unit = words.subject, words.unit
    gaps = np.diff(along)
    step = float(np.median(gaps))
    tol = max(_ABS_TOL_MM, _REL_TOL * abs(step))
    same = int(np.count_nonzero(gaps < tol))
    if same:
        series = "series" if unit == "slice" else "file"
        raise UserError(f"{same + 1} {unit}s of {where} lie at one position (several phases, echoes or acquisitions "
                        f"in one {series}); {words.same_fix}")
    extent = positions[-1] - positions[0]
    normal_extent = float(extent @ normal)
    in_plane = float(np.linalg.norm(extent - normal_extent * normal))
    tilt = math.degrees(math.atan2(in_plane, abs(normal_extent)))
    if tilt > _TILT_DEGREES:
        raise UserError(f"{where} was acquired with a gantry tilt of {tilt:.1f} degrees (the "
                        "slices are sheared); resample it to a regular grid first (3D Slicer: load it with DICOM "
                        "acquisition geometry regularization, harden the transform, save as .nrrd) and segment that")
    small = float(gaps.min())
    if abs(float(gaps.max()) - small) <= tol:
        return
    ratios = gaps / small
    whole = np.abs(ratios - np.round(ratios)) * small <= tol
    if np.all(whole):
        missing = int(np.round(ratios).sum() - len(gaps))
        first = int(np.argmax(np.round(ratios) > 1))
        raise UserError(f"{where} is missing {missing} {unit}{'s' if missing > 1 else ''} "
                        f"(a gap of {gaps[first]:.2f} mm after {unit} {first + 1} of {len(along)}, where the others "
                        f"are {small:.2f} mm apart); {words.missing_fix}")
    raise UserError(f"{where} has uneven {unit} spacing ({small:.2f} to {float(gaps.max()):.2f} mm);"
                    " resample it to even spacing first (3D Slicer: load it with DICOM acquisition geometry "
                    "regularization, harden the transform, save as .nrrd) and segment that")


# --------------------------------------------------------------------------------------
# one multi-frame image
# --------------------------------------------------------------------------------------
def is_multiframe(ds) -> bool:
    """Whether a header is a multi-frame image (NumberOfFrames over 1)."""
    try:
        return int(ds.get("NumberOfFrames") or 1) > 1
    except (TypeError, ValueError):
        return False


@dataclass
class FrameStack:
    """The frames of one multi-frame image as one evenly spaced stack.

    Attributes:
        order: zero-based frame indices in slice order (increasing along ``row x column``).
        orientation: the frames' ImageOrientationPatient (6 direction cosines, LPS).
        pixel_spacing: the frames' PixelSpacing (between rows, between columns), mm.
        positions: the frames' ImagePositionPatient in slice order, shape (frames, 3).
        ijk_to_lps: voxel (column i, row j, frame k in slice order) to LPS millimetres.
    """

    order: list[int]
    orientation: np.ndarray
    pixel_spacing: np.ndarray
    positions: np.ndarray
    ijk_to_lps: np.ndarray


def _frame_value(ds, index: int, sequence: str, keyword: str, top_level: bool):
    """``keyword`` of frame ``index``: in its PerFrameFunctionalGroupsSequence item's ``sequence``,
    else the SharedFunctionalGroupsSequence's, else (``top_level``) the dataset's own."""
    for key, n in (("PerFrameFunctionalGroupsSequence", index), ("SharedFunctionalGroupsSequence", 0)):
        groups = ds.get(key)
        if groups and len(groups) > n and groups[n].get(sequence):
            value = groups[n].get(sequence)[0].get(keyword)
            if value is not None:
                return value
    return ds.get(keyword) if top_level else None


def _frame_vector(ds, index: int, sequence: str, keyword: str, size: int, subject: str, top_level: bool) -> np.ndarray:
    value = _frame_value(ds, index, sequence, keyword, top_level)
    try:
        arr = np.asarray([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        arr = np.zeros(0)
    if arr.shape != (size,) or not np.all(np.isfinite(arr)):
        raise UserError(f"frame {index + 1} of {subject} has no valid {keyword} (in its {sequence}); the frames "
                        "cannot be placed in space: export the series again with its geometry, or as single-frame "
                        "images")
    return arr


def check_multiframe(ds, where: str) -> FrameStack:
    """The frames of one multi-frame image (its header, see :func:`read_headers`) as a stack.

    Every frame is placed by its PlanePositionSequence (per frame) and PlaneOrientationSequence
    and PixelMeasuresSequence (per frame or shared); the frames then go through the checks of a
    series (:func:`check_series`): one orientation, one pixel spacing, no tilt, even spacing.

    Raises:
        UserError: the frames cannot be placed, or are not one evenly spaced stack (several
            orientations, phases or echoes at one position, a missing frame, uneven spacing).
    """
    name = Path(getattr(ds, "filename", "") or "").name
    subject = f"the multi-frame DICOM image {name + ' ' if name else ''}in {where}"
    frames = int(ds.get("NumberOfFrames") or 1)
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    if frames < 2:
        raise UserError(f"{subject} has a single frame (a 2D image); give a 3D series")
    if not per_frame:
        raise UserError(f"{subject} has no per-frame geometry (PerFrameFunctionalGroupsSequence), so its {frames} "
                        "frames cannot be placed in space; give an enhanced CT or MR image, or a series of "
                        "single-frame images")
    if len(per_frame) != frames:
        raise UserError(f"{subject} has {frames} frames but {len(per_frame)} PerFrameFunctionalGroupsSequence items; "
                        "the file is damaged or incomplete: export it again")
    orientations = [_frame_vector(ds, n, "PlaneOrientationSequence", "ImageOrientationPatient", 6, subject, True)
                    for n in range(frames)]
    groups = _groups(orientations, _ORIENTATION_TOL)
    if len(groups) > 1:
        counts = " + ".join(str(c) for c in sorted((c for _o, c in groups), reverse=True))
        raise UserError(f"{subject} holds frames in {len(groups)} orientations ({counts} frames: several stacks or "
                        "reformats in one file); export each stack as a series of its own (or as single-frame images)")
    spacings = [_frame_vector(ds, n, "PixelMeasuresSequence", "PixelSpacing", 2, subject, True) for n in range(frames)]
    sizes = _groups(spacings, 1e-3)
    if len(sizes) > 1:
        listed = ", ".join(f"{s[0]:g} x {s[1]:g} mm" for s, _c in sizes)
        raise UserError(f"{subject} holds frames of {len(sizes)} pixel spacings ({listed}); export each stack as a "
                        "series of its own (or as single-frame images)")
    positions = np.stack([_frame_vector(ds, n, "PlanePositionSequence", "ImagePositionPatient", 3, subject, False)
                          for n in range(frames)])
    normal = slice_normal(orientations[0])
    along = positions @ normal
    order = np.argsort(along, kind="stable")
    positions, along = positions[order], along[order]
    _check_spacing(positions, along, normal, _Words(
        subject, "frame", "export one phase or echo as a series of its own (or as single-frame images)",
        "export the series again"))
    o, spacing = orientations[0], spacings[0]
    m = np.eye(4)
    m[:3, 0] = o[:3] * spacing[1]  # i: along a row (the column index), PixelSpacing[1] apart
    m[:3, 1] = o[3:] * spacing[0]  # j: down a column (the row index), PixelSpacing[0] apart
    m[:3, 2] = normal * (along[-1] - along[0]) / (frames - 1)
    m[:3, 3] = positions[0]
    return FrameStack([int(i) for i in order], o, spacing, positions, m)


def share_frame_geometry(ds) -> None:
    """Move a multi-frame header's PlaneOrientationSequence and PixelMeasuresSequence to its
    SharedFunctionalGroupsSequence (the first frame's) where only its frames have them (in
    place: on a copy that a DICOM SEG references; highdicom reads them from the shared group).
    :func:`check_multiframe` has found them equal in every frame."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence as DicomSequence

    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    if not per_frame:
        return
    if not ds.get("SharedFunctionalGroupsSequence"):
        ds.SharedFunctionalGroupsSequence = DicomSequence([Dataset()])
    shared = ds.SharedFunctionalGroupsSequence[0]
    for keyword in ("PlaneOrientationSequence", "PixelMeasuresSequence"):
        if not shared.get(keyword) and per_frame[0].get(keyword):
            setattr(shared, keyword, copy.deepcopy(per_frame[0].get(keyword)))
            for item in per_frame:  # a functional group is shared or per frame, not both
                if keyword in item:
                    del item[keyword]
