"""Benchmark inputs and weights, made once into a cache folder.

Every input is the same real CT (``example_ct.nii.gz`` of the totalsegmentator 2.18.0
source archive, abdomen, 3 mm, 122 x 101 x 112), so the body is the same and only the grid
and the field of view change:

``native``    the file as it is (3 mm, field of view 366 x 303 x 336 mm);
``padded``    the same voxels with air (-1024 HU) around them: a field of view 2 x wider in
              R and A and 1.5 x longer in S (12 x the volume, the same body);
``clinical``  the CT resampled (linear) to a clinical grid: 512 x 512 x 300 voxels of
              0.8 x 0.8 x 1.5 mm (410 x 410 x 450 mm, stored L-P-S like a scanner's NIfTI),
              air where the original has no voxels;
``quick``     a 180 x 150 x 90 mm block of the CT around the liver, for smoke runs;
``quick-padded``  that block with air around it (2 x the field of view in R and A).

The weights for timing are a seeded random SwinUNETR checkpoint (timing does not depend on
the values); agreement needs trained weights (``--checkpoint``/``--card``).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "SwinUNETRSegment"))

AIR_HU = -1024
INPUT_NAMES = ("native", "padded", "clinical", "thick", "quick", "quick-padded")


def cache_dir() -> Path:
    return Path(os.environ.get("SWINUNETR_BENCH_CACHE", Path.home() / ".cache" / "swinunetr-segment-bench"))


def _example_ct() -> Path:
    if os.environ.get("SWINUNETR_BENCH_EXAMPLE_CT"):  # a copy carried to a machine without network (bench_gpu.py)
        return Path(os.environ["SWINUNETR_BENCH_EXAMPLE_CT"])
    from SwinUNETRSegmentLib.fileio.sampledata import reference_files

    test_cache = os.environ.get("SWINUNETR_TEST_CACHE", str(Path.home() / ".cache" / "swinunetr-segment-tests"))
    if (Path(test_cache) / "totalsegmentator-2.18.0").is_dir():
        return reference_files(Path(test_cache)) / "example_ct.nii.gz"
    return reference_files() / "example_ct.nii.gz"


def _save(array: np.ndarray, affine: np.ndarray, path: Path) -> Path:
    import nibabel as nib

    img = nib.Nifti1Image(array.astype(np.int16), affine)
    img.header.set_qform(affine, code=1)
    img.header.set_sform(affine, code=1)
    tmp = path.with_name(path.name + ".part.nii.gz")
    nib.save(img, str(tmp))
    tmp.replace(path)
    return path


def _pad(array: np.ndarray, affine: np.ndarray, before, after) -> tuple[np.ndarray, np.ndarray]:
    out = np.pad(array, list(zip(before, after)), constant_values=AIR_HU)
    shifted = affine.copy()
    shifted[:3, 3] = affine[:3, :3] @ (-np.asarray(before, float)) + affine[:3, 3]
    return out, shifted


def clinical_grid(src_affine: np.ndarray, src_shape, shape=(512, 512, 300), spacing=(0.8, 0.8, 1.5)) -> np.ndarray:
    """An L-P-S ordered grid of ``shape`` x ``spacing`` centred on the source's centre."""
    centre = src_affine[:3, :3] @ ((np.asarray(src_shape) - 1) / 2.0) + src_affine[:3, 3]
    m = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
    m[:3, 3] = centre - m[:3, :3] @ ((np.asarray(shape) - 1) / 2.0)
    return m


def _resample_to(array: np.ndarray, affine: np.ndarray, dst_affine: np.ndarray, shape) -> np.ndarray:
    """Linear resampling with MONAI, air outside the source, slab by slab (bounded memory)."""
    import torch
    from monai.data import MetaTensor
    from monai.transforms import SpatialResample

    src = MetaTensor(torch.as_tensor(array.astype(np.float32) - AIR_HU)[None], affine=torch.as_tensor(affine))
    out = np.empty(shape, np.int16)
    step = 20
    for k0 in range(0, shape[2], step):
        k1 = min(k0 + step, shape[2])
        slab = dst_affine.copy()
        slab[:3, 3] = dst_affine[:3, :3] @ np.array([0.0, 0.0, k0]) + dst_affine[:3, 3]
        res = SpatialResample(mode="bilinear", padding_mode="zeros", dtype=torch.float32)(
            src, dst_affine=torch.as_tensor(slab), spatial_size=(shape[0], shape[1], k1 - k0)
        )
        out[:, :, k0:k1] = np.round(res.as_tensor()[0].numpy() + AIR_HU).astype(np.int16)
    return out


def make_input(name: str, cache: Path | None = None) -> Path:
    """The path of benchmark input ``name`` (see the module docstring), made on first use."""
    import nibabel as nib

    if name not in INPUT_NAMES:
        raise ValueError(f"unknown input '{name}'; known: {', '.join(INPUT_NAMES)}")
    src = _example_ct()
    if name == "native":
        return src
    cache = Path(cache or cache_dir())
    cache.mkdir(parents=True, exist_ok=True)
    path = cache / f"ct-{name}.nii.gz"
    if path.exists():
        return path
    img = nib.load(str(src))
    arr = np.asarray(img.dataobj).astype(np.int16)
    aff = img.affine.copy()
    if name == "padded":
        x, y, z = arr.shape
        arr, aff = _pad(arr, aff, (x // 2, y // 2, z // 4), (x - x // 2, y - y // 2, z // 2 - z // 4))
    elif name == "clinical":
        dst = clinical_grid(aff, arr.shape)
        arr, aff = _resample_to(arr, aff, dst, (512, 512, 300)), dst
    elif name == "thick":  # the grid of the hold-out chest CT: 5-mm slices
        dst = clinical_grid(aff, arr.shape, (512, 512, 61), (0.63, 0.63, 5.0))
        arr, aff = _resample_to(arr, aff, dst, (512, 512, 61)), dst
    elif name in ("quick", "quick-padded"):
        arr, aff = _crop_quick(arr, aff)
        if name == "quick-padded":
            x, y, _ = arr.shape
            arr, aff = _pad(arr, aff, (x // 2, y // 2, 0), (x - x // 2, y - y // 2, 0))
    return _save(arr, aff, path)


def _crop_quick(arr: np.ndarray, aff: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """60 x 50 x 30 voxels (180 x 150 x 90 mm) of the upper abdomen: liver, spleen, kidneys,
    stomach, pancreas, aorta and both adrenals (indices of this scan)."""
    lo = np.array([30, 20, 82])
    hi = np.minimum(lo + np.array([60, 50, 30]), arr.shape)
    out = arr[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
    m = aff.copy()
    m[:3, 3] = aff[:3, :3] @ lo + aff[:3, 3]
    return np.ascontiguousarray(out), m


def random_checkpoint(feature_size: int, cache: Path | None = None, seed: int = 0) -> tuple[Path, Path]:
    """(card JSON, checkpoint) of the btcv card with ``feature_size`` and seeded random weights."""
    import dataclasses
    import json

    import torch

    from SwinUNETRSegmentLib.models.cards import load_card
    from SwinUNETRSegmentLib.models.networks import build_network

    cache = Path(cache or cache_dir())
    cache.mkdir(parents=True, exist_ok=True)
    card = load_card("btcv")
    card = dataclasses.replace(
        card,
        name=f"btcv-random-fs{feature_size}",
        network_args={**card.network_args, "feature_size": int(feature_size)},
    )
    card_path = cache / f"btcv-random-fs{feature_size}.json"
    ckpt = cache / f"btcv-random-fs{feature_size}-seed{seed}.pt"
    if not card_path.exists():
        card_path.write_text(json.dumps(card.to_json(), indent=1))
    if not ckpt.exists():
        torch.manual_seed(seed)
        net = build_network(card)
        tmp = ckpt.with_suffix(".part")
        torch.save(net.state_dict(), tmp)
        tmp.replace(ckpt)
    return card_path, ckpt


if __name__ == "__main__":
    for n in sys.argv[1:] or INPUT_NAMES:
        p = make_input(n)
        import nibabel as nib

        im = nib.load(str(p))
        print(n, p, im.shape, tuple(round(float(z), 3) for z in im.header.get_zooms()))
