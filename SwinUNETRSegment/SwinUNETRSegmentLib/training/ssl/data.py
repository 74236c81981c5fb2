"""Unlabeled scans for pretraining: which files, and the sub-volumes drawn from them.

Scans are the "image" of each "training" item of a Decathlon datalist, or every scan in a
folder. Each is put in the card's model space (the recipe of
:mod:`SwinUNETRSegmentLib.inference.preprocess`), trimmed to the body and padded to the
crop; random ``crop``^3 sub-volumes are drawn from it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from SwinUNETRSegmentLib.errors import UserError
from SwinUNETRSegmentLib.fileio.read import ITK_SUFFIXES, NIFTI_SUFFIXES, has_suffix
from SwinUNETRSegmentLib.fileio.write import SEG_SUFFIXES
from SwinUNETRSegmentLib.models.cards import ModelCard

__all__ = ["list_images", "LoadScand", "transforms"]


def list_images(data: str | Path) -> list[str]:
    """Scans to pretrain on: the "image" of each "training" item of a Decathlon datalist
    (paths relative to the JSON file; labels are not needed), or every scan in a folder
    (NIfTI, NRRD, MetaImage files; subfolders are DICOM series; segmentations are left out)."""
    p = Path(data)
    if p.is_file():
        try:
            content = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise UserError(f"datalist {p} is not readable JSON ({exc})") from None
        items = content.get("training") if isinstance(content, dict) else None
        if not isinstance(items, list) or not items:
            raise UserError(f"datalist {p} needs a non-empty 'training' list of {{\"image\": ...}} "
                            "(labels are not needed)")
        out = []
        for n, item in enumerate(items):
            image = item.get("image") if isinstance(item, dict) else item
            if not isinstance(image, str):
                raise UserError(f"datalist {p}: training[{n}] needs an 'image' path")
            q = Path(image) if Path(image).is_absolute() else p.parent / image
            if not q.exists():
                raise UserError(f"datalist {p}: training[{n}] image not found: {q}")
            out.append(str(q))
        return out
    if p.is_dir():
        suffixes = NIFTI_SUFFIXES + ITK_SUFFIXES
        out = []
        for q in sorted(p.iterdir()):
            if q.name.startswith("."):
                continue
            if q.is_file() and has_suffix(q, suffixes) and not has_suffix(q, SEG_SUFFIXES):
                out.append(str(q))
            elif q.is_dir():
                out.append(str(q))  # a DICOM series (read_volume says so if it is not one)
        if not out:
            raise UserError(f"no scans in folder {p}; give NIfTI/NRRD/MetaImage files or DICOM series folders, "
                            "or a datalist JSON")
        return out
    raise UserError(f"--data {data} not found; give a Decathlon datalist JSON or a folder of scans")


class LoadScand:
    """MONAI-style dictionary transform: {"image": path} -> {"image": MetaTensor (1, I, J, K)}
    (float32, its IJK-to-RAS as affine, the path as ``filename_or_obj``)."""

    def __call__(self, item: dict) -> dict:
        from SwinUNETRSegmentLib.fileio.read import read_volume
        from SwinUNETRSegmentLib.inference.preprocess import to_metatensor

        vol, _ = read_volume(item["image"])
        image = to_metatensor(vol, np.float32)
        image.meta["filename_or_obj"] = str(item["image"])
        return {"image": image}


def transforms(card: ModelCard, crop: int):
    """(deterministic part, random crop): MONAI transforms putting a scan in the card's
    model space (orientation, spacing, intensity window), trimmed to the body (voxels above
    2 % of the intensity range), padded to the crop, then one random ``crop``^3 sub-volume
    (1, crop, crop, crop)."""
    from monai import transforms as T

    from SwinUNETRSegmentLib.inference.preprocess import model_space_transforms

    it = card.intensity
    threshold = float(it["b_min"]) + 0.02 * (float(it["b_max"]) - float(it["b_min"]))
    fixed = T.Compose([
        LoadScand(),
        *model_space_transforms(card, "image"),
        T.CropForegroundd(keys="image", source_key="image", select_fn=lambda a: a > threshold, allow_smaller=True),
        T.SpatialPadd(keys="image", spatial_size=[crop] * 3),
    ])
    rand = T.RandSpatialCropd(keys="image", roi_size=[crop] * 3, random_size=False)
    return fixed, rand
