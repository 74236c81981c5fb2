"""A DICOM series' headers, and the geometry checks every DICOM input goes through.

The voxels are decoded by SimpleITK (:mod:`.read`); this module reads the headers with
pydicom (no pixel data) and decides which files make up the volume and in what order:

- localizer (scout) images that share the series UID (``ImageType`` says LOCALIZER) are
  left out, as are second copies of the same instance (same SOPInstanceUID);
- the rest must be one stack: one image size, one orientation, slice positions on a line
  perpendicular to the slices (no gantry tilt), evenly spaced (no missing slice). Anything
  else is a one-line :class:`UserError` that says what to do.

The kept headers travel with the volume (``ScanInfo.dicom``) so that a DICOM SEG can
reference the instances it segments (:mod:`.dicomseg`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from SwinUNETRSegmentLib.errors import UserError

__all__ = ["DicomSeries", "read_headers", "check_series", "is_localizer", "slice_normal"]

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
    if len(kept) < 2 or any(int(ds.get("NumberOfFrames") or 1) > 1 for ds in kept):
        # one multi-frame file: its geometry is per frame, left to the reader
        return DicomSeries([getattr(ds, "filename", "") for ds in kept], list(kept), dropped)

    sizes = {(int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)) for ds in kept}
    if len(sizes) > 1:
        listed = ", ".join(f"{r} x {c}" for r, c in sorted(sizes))
        raise UserError(f"the DICOM series in {where} mixes images of different sizes ({listed}); "
                        "put the slices of one size in a folder of their own")
    orientations = [_vector(ds, "ImageOrientationPatient", 6, where) for ds in kept]
    groups: list[tuple[np.ndarray, int]] = []
    for o in orientations:
        for n, (ref, count) in enumerate(groups):
            if np.max(np.abs(o - ref)) < _ORIENTATION_TOL:
                groups[n] = (ref, count + 1)
                break
        else:
            groups.append((o, 1))
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
    _check_spacing(positions, along, normal, where)
    return DicomSeries([getattr(ds, "filename", "") for ds in kept], kept, dropped)


def _check_spacing(positions: np.ndarray, along: np.ndarray, normal: np.ndarray, where: str) -> None:
    gaps = np.diff(along)
    step = float(np.median(gaps))
    tol = max(_ABS_TOL_MM, _REL_TOL * abs(step))
    same = int(np.count_nonzero(gaps < tol))
    if same:
        raise UserError(f"{same + 1} slices of the DICOM series in {where} lie at one position (several phases, "
                        "echoes or acquisitions in one series); put the slices of one acquisition in a folder "
                        "of their own")
    extent = positions[-1] - positions[0]
    normal_extent = float(extent @ normal)
    in_plane = float(np.linalg.norm(extent - normal_extent * normal))
    tilt = math.degrees(math.atan2(in_plane, abs(normal_extent)))
    if tilt > _TILT_DEGREES:
        raise UserError(f"the DICOM series in {where} was acquired with a gantry tilt of {tilt:.1f} degrees (the "
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
        raise UserError(f"the DICOM series in {where} is missing {missing} slice{'s' if missing > 1 else ''} "
                        f"(a gap of {gaps[first]:.2f} mm after slice {first + 1} of {len(along)}, where the others are "
                        f"{small:.2f} mm apart); copy the missing files into the folder, or export the series again")
    raise UserError(f"the DICOM series in {where} has uneven slice spacing ({small:.2f} to {float(gaps.max()):.2f} mm);"
                    " resample it to even spacing first (3D Slicer: load it with DICOM acquisition geometry "
                    "regularization, harden the transform, save as .nrrd) and segment that")
