"""Reading scans into :class:`~SwinUNETRSegmentLib.geometry.Volume`.

NIfTI (.nii, .nii.gz) with nibabel, whose affine is the file's own RAS matrix; NRRD (.nrrd,
.nhdr), MetaImage (.mha, .mhd) and DICOM series folders with SimpleITK, whose LPS geometry
is converted once, in :meth:`Volume.from_itk_geometry`. SimpleITK's GDCM reader decodes
compressed DICOM (JPEG, JPEG 2000, RLE) without extra packages. A DICOM series first passes
the geometry checks of :mod:`.dicom` (localizers left out; several orientations, gantry tilt,
missing slices, uneven spacing refused), which also decide the slice order; its headers come
back in ``ScanInfo.dicom`` for a DICOM SEG. A folder holding one enhanced multi-frame image
(Enhanced CT / MR, Legacy Converted Enhanced) is placed frame by frame from its functional
groups (:func:`.dicom.check_multiframe`: the same checks) and its frames decoded by highdicom
(pydicom's decoders, the modality rescale of each frame applied), stacked in slice order.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from SwinUNETRSegmentLib.errors import UserError
from SwinUNETRSegmentLib.fileio.dicom import check_multiframe, check_series, is_multiframe, read_headers
from SwinUNETRSegmentLib.geometry import Volume, check_volume

__all__ = ["NIFTI_SUFFIXES", "ITK_SUFFIXES", "ScanInfo", "has_suffix", "read_volume", "check_volume",
           "native_stderr_held"]

NIFTI_SUFFIXES = (".nii", ".nii.gz")
ITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")
DICOM_SUFFIXES = (".dcm", ".dicom")

_STDERR_LOCK = threading.RLock()


@dataclass
class ScanInfo:
    """What was read besides the voxels: where from, and what the header says."""

    source: str
    modality: str = ""
    description: str = ""
    extra: dict = field(default_factory=dict)
    #: a DICOM series' headers (pydicom datasets, no pixel data) in slice order: what a DICOM SEG references
    dicom: list = field(default_factory=list, repr=False)


def _lower_name(path: Path | str) -> str:
    return Path(path).name.lower()


def has_suffix(path: Path | str, suffixes: Sequence[str]) -> bool:
    name = _lower_name(path)
    return any(name.endswith(s) for s in suffixes)


@contextlib.contextmanager
def native_stderr_held() -> Iterator[None]:
    """Hold back what native code (ITK, GDCM, MetaIO) prints on the process's stderr
    (file descriptor 2) during the block: printed after the block when it completes,
    dropped when it raises, so that a failed read shows only its one-line UserError
    instead of ITK's multi-line ``WARNING: In .../itkGDCMSeriesFileNames.cxx`` first.

    Where descriptor 2 cannot be redirected (no console), the block runs as it is.
    """
    with _STDERR_LOCK:
        try:
            if sys.stderr is not None:
                sys.stderr.flush()
            saved = os.dup(2)
        except (OSError, ValueError, AttributeError):
            yield
            return
        held = tempfile.TemporaryFile()
        completed = False
        try:
            os.dup2(held.fileno(), 2)
            try:
                yield
                completed = True
            finally:
                with contextlib.suppress(OSError, ValueError, AttributeError):
                    if sys.stderr is not None:
                        sys.stderr.flush()
                os.dup2(saved, 2)
            if completed:
                held.seek(0)
                text = held.read()
                if text:
                    os.write(2, text)
        finally:
            os.close(saved)
            held.close()


# --------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------
def read_volume(path: str | Path, series_uid: str | None = None) -> tuple[Volume, ScanInfo]:
    """Read a scan into a validated :class:`Volume`.

    Args:
        path: a NIfTI, NRRD or MetaImage file, or a folder holding one DICOM series.
        series_uid: for a folder with several series, the SeriesInstanceUID to read.

    Raises:
        UserError: the path is missing, unreadable, not a 3D scalar image, or has
            NaN/Inf voxels; the message says what to do.
    """
    p = Path(path)
    if not p.exists():
        raise UserError(f"input not found: {path}; check the path")
    if not (p.is_dir() or has_suffix(p, NIFTI_SUFFIXES + ITK_SUFFIXES + DICOM_SUFFIXES)):
        raise UserError(
            f"cannot read {p.name}: unsupported file type; give a NIfTI (.nii, .nii.gz), NRRD (.nrrd, .nhdr), "
            "MetaImage (.mha, .mhd) file, a multi-frame DICOM file (.dcm) or a folder holding one DICOM series"
        )
    with native_stderr_held():
        if p.is_dir():
            vol, info = _read_dicom_folder(p, series_uid)
        elif has_suffix(p, DICOM_SUFFIXES):
            vol, info = _read_dicom_file(p)
        elif has_suffix(p, NIFTI_SUFFIXES):
            vol, info = _read_nifti(p)
        else:
            vol, info = _read_itk(p)
        check_volume(vol, str(path))
    return vol, info


def _shape_error(source: str, shape: Sequence[int], what: str) -> UserError:
    dims = " x ".join(str(s) for s in shape)
    return UserError(f"{source} is {what} ({dims}); give a single 3D scalar scan")


def _read_nifti(p: Path) -> tuple[Volume, ScanInfo]:
    import nibabel as nib

    try:
        img = nib.load(str(p))
    except Exception as exc:  # nibabel raises many types for a bad header
        raise UserError(f"cannot read {p.name} as NIfTI ({_one_line(exc)}); "
                        "check that the file is complete and not corrupt") from None
    shape = tuple(int(s) for s in img.shape)
    dtype = img.get_data_dtype()
    if dtype.names is not None or len(shape) == 5:
        raise _shape_error(str(p), shape, "a multi-component (RGB or vector) image")
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) < 3:
        raise _shape_error(str(p), shape, "a 2D image")
    if len(shape) > 3:
        raise _shape_error(str(p), shape, f"a {len(shape)}D image")
    try:
        # dataobj applies the file's scaling and keeps the smallest dtype that holds it.
        data = np.asanyarray(img.dataobj)
    except Exception as exc:
        raise UserError(f"cannot read the voxels of {p.name}: the file is truncated or corrupt ({_one_line(exc)}); "
                        "copy it again") from None
    data = np.asarray(data).reshape(shape)
    return Volume(data, img.affine), ScanInfo(source=str(p))


def _itk_image_to_volume(image, source: str) -> Volume:
    import SimpleITK as sitk

    dim = image.GetDimension()
    size = image.GetSize()
    if image.GetNumberOfComponentsPerPixel() > 1:
        raise _shape_error(source, size, "a multi-component (RGB or vector) image")
    if dim == 4 and size[3] == 1:
        image = image[:, :, :, 0]
        dim, size = 3, size[:3]
    if dim == 2:
        raise _shape_error(source, size, "a 2D image")
    if dim != 3:
        raise _shape_error(source, size, f"a {dim}D image")
    arr = sitk.GetArrayViewFromImage(image)  # [k, j, i]
    arr = np.ascontiguousarray(arr.transpose(2, 1, 0))
    return Volume.from_itk_geometry(arr, image.GetOrigin(), image.GetSpacing(), image.GetDirection())


def _read_itk(p: Path) -> tuple[Volume, ScanInfo]:
    import SimpleITK as sitk

    try:
        image = sitk.ReadImage(str(p))
    except RuntimeError as exc:
        raise UserError(f"cannot read {p.name} ({_itk_reason(exc)}); "
                        "check that the file and any data file it names are complete") from None
    return _itk_image_to_volume(image, str(p)), ScanInfo(source=str(p))


def _find_series(folder: Path, max_depth: int = 4) -> list[tuple[Path, str]]:
    """(folder, SeriesInstanceUID) of every series in ``folder``, else in its subfolders
    (exports often nest a series a few folders down)."""
    import SimpleITK as sitk

    ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    if ids:
        return [(folder, uid) for uid in ids]
    found = []
    base_depth = len(folder.parts)
    for root, dirs, _files in os.walk(folder):
        dirs.sort()
        if len(Path(root).parts) - base_depth >= max_depth:
            dirs[:] = []
        for d in dirs:
            sub = Path(root) / d
            found += [(sub, uid) for uid in sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(sub))]
    return found


def _read_dicom_folder(folder: Path, series_uid: str | None) -> tuple[Volume, ScanInfo]:
    import SimpleITK as sitk

    series = _find_series(folder)
    if not series:
        raise UserError(f"no DICOM series found in folder {folder} or its subfolders; "
                        "give a folder of DICOM files or an image file")
    if series_uid is not None:
        chosen = [s for s in series if s[1] == series_uid]
        if not chosen:
            raise UserError(f"series {series_uid} is not in {folder}; "
                            f"series there: {'; '.join(_describe_series(series))}")
        where, uid = chosen[0]
    elif len(series) > 1:
        raise UserError(
            f"folder {folder} holds {len(series)} DICOM series: {'; '.join(_describe_series(series))}; "
            "choose one with --series UID or move it to a folder of its own"
        )
    else:
        where, uid = series[0]
    files = list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(where), uid))
    series = check_series(read_headers(files), str(where))  # geometry checks; localizers left out
    if series.files and all(series.files):
        files = series.files
    if len(series.datasets) == 1 and is_multiframe(series.datasets[0]):
        header = series.datasets[0]
        vol = _read_multiframe(files[0], header, str(where))
        return vol, ScanInfo(source=str(where), modality=str(header.get("Modality") or "").strip(),
                             description=str(header.get("SeriesDescription") or "").strip(),
                             extra={"series_uid": uid, "files": 1, "frames": vol.shape[2], "dropped": series.dropped},
                             dicom=series.datasets)
    r = sitk.ImageSeriesReader()
    r.SetFileNames(files)
    try:
        image = r.Execute()
    except RuntimeError as exc:
        raise UserError(f"cannot read the DICOM series in {where} ({_itk_reason(exc)}); "
                        "check that its files are complete") from None
    if image.GetDimension() == 3 and image.GetSize()[2] == 1 and len(files) == 1:
        raise UserError(f"the DICOM series in {where} has a single slice (a 2D image); give a 3D series")
    modality, description = _dicom_tags(files[0], ("0008|0060", "0008|103e"))
    vol = _itk_image_to_volume(image, str(where))
    return vol, ScanInfo(source=str(where), modality=modality, description=description,
                         extra={"series_uid": uid, "files": len(files), "dropped": series.dropped},
                         dicom=series.datasets)


def _read_dicom_file(p: Path) -> tuple[Volume, ScanInfo]:
    """One DICOM file that is a whole volume: an enhanced (multi-frame) CT or MR image. A
    single slice is not a volume: its folder is."""
    headers = read_headers([p])
    if not headers:
        raise UserError(f"cannot read {p.name}: not a DICOM file, or a damaged one; check the file")
    header = headers[0]
    if not is_multiframe(header):
        raise UserError(f"{p.name} is a single DICOM slice; give the folder that holds its whole series")
    series = check_series(headers, str(p))  # a SEG, a report or a localizer is refused here
    vol = _read_multiframe(str(p), header, str(p))
    return vol, ScanInfo(source=str(p), modality=str(header.get("Modality") or "").strip(),
                         description=str(header.get("SeriesDescription") or "").strip(),
                         extra={"series_uid": str(header.get("SeriesInstanceUID") or ""), "files": 1,
                                "frames": vol.shape[2], "dropped": series.dropped},
                         dicom=series.datasets)


def _read_multiframe(filename: str, header, where: str) -> Volume:
    """One multi-frame image: the frames in slice order (:func:`.dicom.check_multiframe`, which
    also gives the geometry), decoded by highdicom with the modality rescale applied and no
    display transform (VOI, presentation LUT), as i = column, j = row, k = frame."""
    import pydicom

    try:
        import highdicom as hd
    except ImportError:
        raise UserError(f"the DICOM folder {where} holds a multi-frame image, and reading one needs highdicom, which "
                        "this Python lacks: pip install highdicom (or segment it with the command line)") from None
    stack = check_multiframe(header, where)
    shape = (int(header.get("Columns") or 0), int(header.get("Rows") or 0), len(stack.order))
    if int(header.get("SamplesPerPixel") or 1) > 1:
        raise _shape_error(where, shape, "a multi-component (RGB or vector) image")
    try:
        ds = pydicom.dcmread(filename)
        image = hd.Image.from_dataset(ds, copy=False)
        numbers = [n + 1 for n in stack.order]
        options = dict(apply_real_world_transform=False, apply_voi_transform=False, apply_presentation_lut=False,
                       apply_palette_color_lut=False, apply_icc_profile=False)
        try:
            frames = image.get_frames(numbers, dtype=_frame_dtype(ds), **options)
        except ValueError:  # the rescale does not fit the integer type: floats, as highdicom computes them
            frames = image.get_frames(numbers, dtype=np.float32, **options)
    except Exception as exc:  # pydicom and highdicom raise many types for a damaged or undecodable file
        raise UserError(f"cannot read the frames of {Path(filename).name} in {where} ({_one_line(exc)}); check that "
                        "the file is complete, or export it again uncompressed") from None
    frames = np.asarray(frames)
    if frames.shape != (shape[2], shape[1], shape[0]):
        raise _shape_error(where, frames.shape[::-1], "not a stack of 2D scalar frames")
    return Volume.from_lps(np.ascontiguousarray(frames.transpose(2, 1, 0)), stack.ijk_to_lps)


def _frame_dtype(ds) -> np.dtype:
    """The smallest of uint8, int16, uint16, int32 that holds every stored value (BitsStored) after
    each frame's rescale slope and intercept (shared, per frame or top level), when they are
    whole numbers; else float32 (also for float pixel data and modality LUTs)."""
    if "FloatPixelData" in ds or "DoubleFloatPixelData" in ds or "ModalityLUTSequence" in ds:
        return np.dtype(np.float32)
    rescales = set()
    for key in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        for group in ds.get(key) or []:
            for item in group.get("PixelValueTransformationSequence") or []:
                if "ModalityLUTSequence" in item:
                    return np.dtype(np.float32)
                rescales.add((float(item.get("RescaleSlope") or 1), float(item.get("RescaleIntercept") or 0)))
    rescales = rescales or {(float(ds.get("RescaleSlope") or 1), float(ds.get("RescaleIntercept") or 0))}
    bits = int(ds.get("BitsStored") or ds.get("BitsAllocated") or 16)
    signed = int(ds.get("PixelRepresentation") or 0) == 1
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2 ** bits - 1)
    if not all(a.is_integer() and b.is_integer() for a, b in rescales):
        return np.dtype(np.float32)
    ends = [v for a, b in rescales for v in (a * lo + b, a * hi + b)]
    for dtype in (np.uint8, np.int16, np.uint16, np.int32):
        info = np.iinfo(dtype)
        if info.min <= min(ends) and max(ends) <= info.max:
            return np.dtype(dtype)
    return np.dtype(np.float32)


def _dicom_tags(filename: str, tags: Sequence[str]) -> list[str]:
    import SimpleITK as sitk

    r = sitk.ImageFileReader()
    r.SetFileName(filename)
    try:
        r.ReadImageInformation()
    except RuntimeError:
        return ["" for _ in tags]
    return [r.GetMetaData(t).strip() if r.HasMetaDataKey(t) else "" for t in tags]


def _describe_series(series: Sequence[tuple[Path, str]]) -> list[str]:
    import SimpleITK as sitk

    out = []
    for where, uid in series:
        files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(where), uid)
        modality, desc = _dicom_tags(files[0], ("0008|0060", "0008|103e")) if files else ("", "")
        label = " ".join(x for x in (modality, f"'{desc}'" if desc else "") if x)
        out.append(f"{uid or '(no UID)'} ({label + ', ' if label else ''}{len(files)} files)")
    return out


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:200]


def _itk_reason(exc: BaseException) -> str:
    # ITK messages span lines and name source files; keep the description.
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    for ln in lines:
        if ln.lower().startswith("description:"):
            return ln.split(":", 1)[1].strip()[:200]
    for ln in reversed(lines):
        if not ln.startswith(("sitk::", "itk::", "/")):
            return ln[:200]
    return "unreadable file"
