"""The way in: a volume into the model's space, as its card says.

One recipe, MONAI's transforms, shared by inference (:mod:`.engine`), supervised training
and self-supervised pretraining (:mod:`SwinUNETRSegmentLib.training`), so that a model sees
at inference exactly what it was trained on:

1. ``Orientation`` to the card's axis codes (RAS for the built-in cards);
2. ``Spacing`` to the card's voxel size (the card's interpolation for images, nearest
   neighbour for label maps);
3. ``ScaleIntensityRange`` from the card's intensity window to ``[b_min, b_max]``.

:mod:`.resample` is the way back, step by step its inverse.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from SwinUNETRSegmentLib.geometry import Volume
from SwinUNETRSegmentLib.models.cards import ModelCard

__all__ = [
    "AXIS_LABELS",
    "to_metatensor",
    "geometric_transforms",
    "intensity_transform",
    "model_space_transforms",
    "to_model_space",
    "air_floor",
    "air_is_constant",
]

#: MONAI's names for the ends of each axis, so that "RAS" means what Slicer and NIfTI mean
AXIS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))


def to_metatensor(volume: Volume, dtype=None):
    """``(1, I, J, K)`` MetaTensor of the volume's voxels with its IJK-to-RAS as affine.

    Args:
        volume: the scan.
        dtype: numpy dtype of the voxels (float32 for images); the array is shared, not
            copied, when it already has this dtype and is contiguous.
    """
    import torch
    from monai.data import MetaTensor

    array = np.ascontiguousarray(volume.array, dtype=np.float32 if dtype is None else dtype)
    return MetaTensor(torch.from_numpy(array)[None], affine=torch.as_tensor(volume.ijk_to_ras, dtype=torch.float64))


def geometric_transforms(card: ModelCard, keys: Sequence[str] | None = None, label_keys: Sequence[str] = (),
                         dtype=np.float64) -> list:
    """``Orientation`` and ``Spacing`` to the card's grid.

    Args:
        card: the model card.
        keys: None for array transforms on one image; else the dictionary keys to move
            (MONAI's ``...d`` transforms).
        label_keys: those of ``keys`` that hold label maps (resampled by nearest neighbour).
        dtype: what ``Spacing`` computes in for one image (MONAI's default, float64, or
            float32: ``FastPath.float32_resampling``).
    """
    from monai import transforms as T

    if keys is None:
        return [
            T.Orientation(axcodes=card.orientation, labels=AXIS_LABELS),
            T.Spacing(pixdim=card.spacing, mode=card.interpolation, dtype=dtype),
        ]
    keys = list(keys)
    modes = ["nearest" if k in label_keys else card.interpolation for k in keys]
    return [
        T.Orientationd(keys=keys, axcodes=card.orientation, labels=AXIS_LABELS),
        T.Spacingd(keys=keys, pixdim=card.spacing, mode=modes),
    ]


def intensity_transform(card: ModelCard, key: str | None = None):
    """``ScaleIntensityRange`` of the card's window (the dictionary version for ``key``)."""
    from monai import transforms as T

    it = card.intensity
    args = dict(
        a_min=it["a_min"], a_max=it["a_max"], b_min=it["b_min"], b_max=it["b_max"], clip=bool(it.get("clip", True))
    )
    return T.ScaleIntensityRange(**args) if key is None else T.ScaleIntensityRanged(keys=key, **args)


def model_space_transforms(card: ModelCard, image_key: str | None = None, label_keys: Sequence[str] = ()) -> list:
    """The whole recipe: geometry for the image (and label maps), then the intensity window
    for the image. ``image_key=None`` gives array transforms for a single image."""
    keys = None if image_key is None else [image_key, *label_keys]
    return geometric_transforms(card, keys, label_keys) + [intensity_transform(card, image_key)]


def to_model_space(card: ModelCard, volume: Volume):
    """The whole volume in model space: a ``(1, X, Y, Z)`` float32 MetaTensor whose affine
    is its voxel-to-RAS matrix there."""
    img = to_metatensor(volume, np.float32)
    for t in model_space_transforms(card):
        img = t(img)
    return img


def air_is_constant(card: ModelCard) -> bool:
    """Voxels below the window become one constant (``b_min``) only when the window clips
    and maps upwards."""
    it = card.intensity
    return bool(it.get("clip", True)) and it["b_max"] > it["b_min"]


def air_floor(card: ModelCard) -> float:
    """Intensity (before scaling) below which a voxel is air: the window's lower end with a
    margin of 1 % of its width, so that such voxels clip to exactly ``b_min`` whatever
    rounding the resampling left on values at the window's edge."""
    it = card.intensity
    return float(it["a_min"]) - 0.01 * (float(it["a_max"]) - float(it["a_min"]))
