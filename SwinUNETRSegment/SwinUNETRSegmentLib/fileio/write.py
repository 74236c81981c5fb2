"""Writing segmentations: ``.seg.nrrd`` (:mod:`.segnrrd`) or a NIfTI label map with a Slicer
colour-table CSV beside it; outputs are checked before any work is done.
"""

from __future__ import annotations

import csv
import io
import os
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np

from SwinUNETRSegmentLib.errors import UserError
from SwinUNETRSegmentLib.fileio.atomic import atomic_path
from SwinUNETRSegmentLib.fileio.read import NIFTI_SUFFIXES, has_suffix
from SwinUNETRSegmentLib.fileio.segnrrd import write_seg_nrrd
from SwinUNETRSegmentLib.geometry import Volume
from SwinUNETRSegmentLib.models.cards import LabelInfo

__all__ = ["SEG_SUFFIXES", "LABELMAP_SUFFIXES", "OUTPUT_SUFFIXES", "check_output_path", "label_table_path",
           "write_labelmap_nifti", "label_table_csv", "write_segmentation"]

#: a Slicer segmentation file
SEG_SUFFIXES = (".seg.nrrd",)
#: a NIfTI label map (with a colour-table CSV beside it)
LABELMAP_SUFFIXES = NIFTI_SUFFIXES
#: every segmentation output
OUTPUT_SUFFIXES = SEG_SUFFIXES + LABELMAP_SUFFIXES


def check_output_path(path: str | Path, overwrite: bool = False, suffixes: Sequence[str] | None = None) -> Path:
    """Fail before any work is done if ``path`` cannot be written (a probe file is made
    and deleted in its folder); returns ``path`` as a Path."""
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
        raise UserError(f"cannot write to folder {parent} ({exc.strerror or exc}); "
                        "choose a folder you can write to") from None
    return p


def label_table_path(labelmap_path: str | Path) -> Path:
    """``ct.nii.gz`` -> ``ct.csv``: the colour table written beside a NIfTI label map."""
    p = Path(labelmap_path)
    name = p.name
    for s in NIFTI_SUFFIXES[::-1]:
        if name.lower().endswith(s):
            return p.with_name(name[: -len(s)] + ".csv")
    return p.with_name(name + ".csv")


def write_labelmap_nifti(path: str | Path, labels: Volume, table: Sequence[LabelInfo]) -> Path:
    """Write a NIfTI label map and, beside it, the label table as a Slicer colour table CSV,
    both through :func:`~SwinUNETRSegmentLib.fileio.atomic.atomic_path`.

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
        w.writerow([lab.value, lab.name, *lab.color, 255, *lab.category.as_list(), *lab.type.as_list(), *mod,
                    "", "", "", "", "", ""])
    return buf.getvalue()


def write_segmentation(path: str | Path, labels: Volume, table: Sequence[LabelInfo]) -> list[Path]:
    """Write ``labels`` in the format the file name asks for; returns every file written."""
    if has_suffix(path, SEG_SUFFIXES):
        write_seg_nrrd(path, labels, table)
        return [Path(path)]
    if has_suffix(path, LABELMAP_SUFFIXES):
        return [Path(path), write_labelmap_nifti(path, labels, table)]
    raise UserError(f"cannot write {Path(path).name}: give an output ending in .seg.nrrd, .nii or .nii.gz")

