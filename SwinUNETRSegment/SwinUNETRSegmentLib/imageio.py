"""Reading scans and writing segmentations, always through :class:`~.geometry.Volume`.

Readers: NIfTI (.nii, .nii.gz) with nibabel, whose affine is the file's own RAS matrix;
NRRD (.nrrd, .nhdr), MetaImage (.mha, .mhd) and DICOM series folders with SimpleITK,
whose LPS geometry is converted once, in :meth:`Volume.from_itk_geometry`. SimpleITK's
GDCM reader decodes compressed DICOM (JPEG, JPEG 2000, RLE) without extra packages.

Writers: ``.seg.nrrd`` with slicerio (what Slicer's Segmentations module reads:
names, colours, terminology), NIfTI label maps with a Slicer colour-table CSV beside
them. Every write goes to a temporary file in the target folder and is renamed into
place only when complete, so a failed or interrupted run leaves no partial file.
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from .cards import LabelInfo
from .errors import UserError
from .geometry import Volume

NIFTI_SUFFIXES = (".nii", ".nii.gz")
ITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")
SEG_SUFFIXES = (".seg.nrrd",)
LABELMAP_SUFFIXES = NIFTI_SUFFIXES


@dataclass
class ScanInfo:
    """What was read besides the voxels: where from, and what the header says."""

    source: str
    modality: str = ""
    description: str = ""
    extra: dict = field(default_factory=dict)


def _lower_name(path: Path | str) -> str:
    return Path(path).name.lower()


def has_suffix(path: Path | str, suffixes: Sequence[str]) -> bool:
    name = _lower_name(path)
    return any(name.endswith(s) for s in suffixes)


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
    if p.is_dir():
        vol, info = _read_dicom_folder(p, series_uid)
    elif has_suffix(p, NIFTI_SUFFIXES):
        vol, info = _read_nifti(p)
    elif has_suffix(p, ITK_SUFFIXES):
        vol, info = _read_itk(p)
    else:
        raise UserError(
            f"cannot read {p.name}: unsupported file type; give a NIfTI (.nii, .nii.gz), NRRD (.nrrd, .nhdr), "
            "MetaImage (.mha, .mhd) file or a folder holding one DICOM series"
        )
    check_volume(vol, str(path))
    return vol, info


def _shape_error(source: str, shape: Sequence[int], what: str) -> UserError:
    dims = " x ".join(str(s) for s in shape)
    return UserError(f"{source} is {what} ({dims}); give a single 3D scalar scan")


def check_volume(vol: Volume, source: str) -> None:
    """Reject images the model cannot segment, with a message that says why."""
    shape = vol.shape
    if int(np.prod(shape)) == 0:
        raise UserError(f"{source} is empty (size {' x '.join(map(str, shape))}); give a scan with voxels in it")
    if all(s == 1 for s in shape):
        raise UserError(f"{source} has a single voxel; give a 3D scan")
    if any(s == 1 for s in shape):
        raise _shape_error(source, shape, "a 2D image (one slice)")
    if vol.array.dtype.kind not in "biuf":
        raise UserError(f"{source} has voxels of type {vol.array.dtype}; give a scan with real-valued voxels")
    if vol.array.dtype.kind == "f":
        bad = int(np.count_nonzero(~np.isfinite(vol.array)))
        if bad:
            raise UserError(f"{source} has {bad} NaN or Inf voxels; fill them (e.g. with the background value) and try again")
    if not np.all(np.isfinite(vol.ijk_to_ras)) or abs(np.linalg.det(vol.ijk_to_ras[:3, :3])) < 1e-12:
        raise UserError(f"{source} has no valid voxel-to-world matrix (zero or undefined spacing); fix its header")


def _read_nifti(p: Path) -> tuple[Volume, ScanInfo]:
    import nibabel as nib

    try:
        img = nib.load(str(p))
    except Exception as exc:  # nibabel raises many types for a bad header
        raise UserError(f"cannot read {p.name} as NIfTI ({_one_line(exc)}); check that the file is complete and not corrupt") from None
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
        raise UserError(f"cannot read the voxels of {p.name}: the file is truncated or corrupt ({_one_line(exc)}); copy it again") from None
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
        raise UserError(f"cannot read {p.name} ({_itk_reason(exc)}); check that the file and any data file it names are complete") from None
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
        raise UserError(f"no DICOM series found in folder {folder} or its subfolders; give a folder of DICOM files or an image file")
    if series_uid is not None:
        chosen = [s for s in series if s[1] == series_uid]
        if not chosen:
            raise UserError(f"series {series_uid} is not in {folder}; series there: {'; '.join(_describe_series(series))}")
        where, uid = chosen[0]
    elif len(series) > 1:
        raise UserError(
            f"folder {folder} holds {len(series)} DICOM series: {'; '.join(_describe_series(series))}; "
            "choose one with --series UID or move it to a folder of its own"
        )
    else:
        where, uid = series[0]
    files = list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(where), uid))
    r = sitk.ImageSeriesReader()
    r.SetFileNames(files)
    try:
        image = r.Execute()
    except RuntimeError as exc:
        raise UserError(f"cannot read the DICOM series in {where} ({_itk_reason(exc)}); check that its files are complete") from None
    if image.GetDimension() == 3 and image.GetSize()[2] == 1 and len(files) == 1:
        raise UserError(f"the DICOM series in {where} has a single slice (a 2D image); give a 3D series")
    modality, description = _dicom_tags(files[0], ("0008|0060", "0008|103e"))
    vol = _itk_image_to_volume(image, str(where))
    return vol, ScanInfo(source=str(where), modality=modality, description=description, extra={"series_uid": uid, "files": len(files)})


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


# --------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------
@contextlib.contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``target`` with the same suffixes; rename it into
    place when the block completes, delete it if the block fails."""
    target = Path(target)
    name = target.name
    suffix = next((s for s in (".seg.nrrd", ".nii.gz") if name.lower().endswith(s)), target.suffix)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=f".part{suffix}", dir=str(target.parent))
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, target)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp_path.unlink()
        raise


def check_output_path(path: str | Path, overwrite: bool = False, suffixes: Sequence[str] | None = None) -> Path:
    """Fail before any work is done if ``path`` cannot be written."""
    p = Path(path)
    if suffixes is not None and not has_suffix(p, suffixes):
        raise UserError(f"cannot write {p.name}: give an output ending in {', '.join(suffixes)}")
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise UserError(f"output folder does not exist: {parent}; create it first or choose another output path")
    if p.is_dir():
        raise UserError(f"output {p} is a folder; give a file name")
    if p.exists() and not overwrite:
        raise UserError(f"output {p} already exists; pass --overwrite to replace it or choose another name")
    try:
        fd, probe = tempfile.mkstemp(prefix=".swinunetr-write-test.", dir=str(parent))
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise UserError(f"cannot write to folder {parent} ({exc.strerror or exc}); choose a folder you can write to") from None
    return p


def label_table_path(labelmap_path: str | Path) -> Path:
    """``ct.nii.gz`` -> ``ct.csv``: the colour table written beside a NIfTI label map."""
    p = Path(labelmap_path)
    name = p.name
    for s in NIFTI_SUFFIXES[::-1]:
        if name.lower().endswith(s):
            return p.with_name(name[: -len(s)] + ".csv")
    return p.with_name(name + ".csv")


def segments_for(labels: Sequence[LabelInfo], label_array: np.ndarray) -> list[dict]:
    """slicerio segment dicts (name, colour, terminology, label value, extent) for ``labels``."""
    present = _extents(label_array, [lab.value for lab in labels])
    segments = []
    for lab in labels:
        segments.append({
            "id": f"Segment_{lab.value}",
            "name": lab.name,
            "color": list(lab.color_float),
            "labelValue": int(lab.value),
            "layer": 0,
            "extent": present.get(lab.value, [0, -1, 0, -1, 0, -1]),
            "terminology": lab.terminology(),
            "nameAutoGenerated": False,
            "colorAutoGenerated": False,
        })
    return segments


def _extents(label_array: np.ndarray, values: Sequence[int]) -> dict[int, list[int]]:
    """Bounding box ``[i0, i1, j0, j1, k0, k1]`` of each label value present.

    SimpleITK's label statistics do this in one pass without a mask per label.
    """
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(np.ascontiguousarray(label_array.transpose(2, 1, 0)))
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(img)
    present = set(stats.GetLabels())
    out: dict[int, list[int]] = {}
    for v in values:
        if int(v) in present:
            x, y, z, sx, sy, sz = stats.GetBoundingBox(int(v))
            out[int(v)] = [x, x + sx - 1, y, y + sy - 1, z, z + sz - 1]
    return out


def write_seg_nrrd(path: str | Path, labels: Volume, table: Sequence[LabelInfo]) -> None:
    """Write a Slicer segmentation file (``.seg.nrrd``) with one segment per entry of ``table``."""
    from . import segio

    arr = np.asarray(labels.array)
    if arr.dtype != np.uint8 and int(arr.max(initial=0)) < 256:
        arr = arr.astype(np.uint8)
    segmentation = {
        "voxels": arr,
        "ijkToLPS": labels.ijk_to_lps,
        "segments": segments_for(table, arr),
        "containedRepresentationNames": ["Binary labelmap"],
        "masterRepresentation": "Binary labelmap",
        "referenceImageExtentOffset": [0, 0, 0],
    }
    with atomic_path(path) as tmp:
        segio.write_segmentation(str(tmp), segmentation, compression_level=1)


def write_labelmap_nifti(path: str | Path, labels: Volume, table: Sequence[LabelInfo]) -> Path:
    """Write a NIfTI label map and, beside it, the label table as a Slicer colour table CSV.

    Returns the path of the CSV.
    """
    import nibabel as nib

    arr = np.asarray(labels.array)
    if arr.dtype != np.uint8 and int(arr.max(initial=0)) < 256:
        arr = arr.astype(np.uint8)
    img = nib.Nifti1Image(arr, labels.ijk_to_ras)
    img.header.set_qform(labels.ijk_to_ras, code=1)
    img.header.set_sform(labels.ijk_to_ras, code=1)
    img.header.set_intent("label")
    img.header.set_xyzt_units("mm", "sec")
    csv_path = label_table_path(path)
    with atomic_path(path) as tmp, atomic_path(csv_path) as tmp_csv:
        nib.save(img, str(tmp))
        tmp_csv.write_text(label_table_csv(table), encoding="utf-8")
    return csv_path


def label_table_csv(table: Sequence[LabelInfo]) -> str:
    """The label table in Slicer's colour-table CSV layout (with terminology columns)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow([
        "LabelValue", "Name", "Color_R", "Color_G", "Color_B", "Color_A",
        "Category_CodingScheme", "Category_CodeValue", "Category_CodeMeaning",
        "Type_CodingScheme", "Type_CodeValue", "Type_CodeMeaning",
        "TypeModifier_CodingScheme", "TypeModifier_CodeValue", "TypeModifier_CodeMeaning",
        "Region_CodingScheme", "Region_CodeValue", "Region_CodeMeaning",
        "RegionModifier_CodingScheme", "RegionModifier_CodeValue", "RegionModifier_CodeMeaning",
    ])
    for lab in table:
        mod = lab.type_modifier.as_list() if lab.type_modifier else ["", "", ""]
        w.writerow([lab.value, lab.name, *lab.color, 255, *lab.category.as_list(), *lab.type.as_list(), *mod, "", "", "", "", "", ""])
    return buf.getvalue()


def write_segmentation(path: str | Path, labels: Volume, table: Sequence[LabelInfo]) -> list[Path]:
    """Write ``labels`` in the format the file name asks for; returns every file written."""
    if has_suffix(path, SEG_SUFFIXES):
        write_seg_nrrd(path, labels, table)
        return [Path(path)]
    if has_suffix(path, LABELMAP_SUFFIXES):
        return [Path(path), write_labelmap_nifti(path, labels, table)]
    raise UserError(f"cannot write {Path(path).name}: give an output ending in .seg.nrrd, .nii or .nii.gz")


OUTPUT_SUFFIXES = SEG_SUFFIXES + LABELMAP_SUFFIXES
