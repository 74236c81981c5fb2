"""Writers of synthetic input scans in every format the engine reads (test-side only)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from SwinUNETRSegmentLib.geometry import LPS_TO_RAS, Volume


def write_nifti(vol: Volume, path: Path) -> Path:
    import nibabel as nib

    img = nib.Nifti1Image(vol.array, vol.ijk_to_ras)
    img.header.set_qform(vol.ijk_to_ras, code=1)
    img.header.set_sform(vol.ijk_to_ras, code=1)
    nib.save(img, str(path))
    return path


def to_sitk(vol: Volume):
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(np.ascontiguousarray(vol.kji()))
    origin, spacing, direction = vol.itk_geometry()
    img.SetOrigin(origin)
    img.SetSpacing(spacing)
    img.SetDirection(direction)
    return img


def write_itk(vol: Volume, path: Path) -> Path:
    import SimpleITK as sitk

    sitk.WriteImage(to_sitk(vol), str(path))
    return path


def write_nrrd_ras(vol: Volume, path: Path) -> Path:
    """An NRRD whose header uses 'right-anterior-superior' space (as some tools write)."""
    import nrrd

    header = {
        "space": "right-anterior-superior",
        "space directions": vol.ijk_to_ras[:3, :3].T,
        "space origin": vol.ijk_to_ras[:3, 3],
        "kinds": ["domain"] * 3,
    }
    nrrd.write(str(path), vol.array, header, index_order="F")
    return path


def write_dicom_series(
    vol: Volume,
    folder: Path,
    series_uid: str = "1.2.826.0.1.3680043.2.1125.1.1",
    description: str = "synthetic",
    modality: str = "CT",
) -> Path:
    """One DICOM file per k-slice with the geometry tags ITK/GDCM read back."""
    import SimpleITK as sitk

    folder.mkdir(parents=True, exist_ok=True)
    lps = vol.ijk_to_lps
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    direction = lps[:3, :3] / spacing
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    image = to_sitk(vol)
    for k in range(vol.shape[2]):
        sl = image[:, :, k]
        pos = lps[:3, :3] @ np.array([0.0, 0.0, k]) + lps[:3, 3]
        tags = {
            "0008|0060": modality,
            "0008|103e": description,
            "0020|000d": "1.2.826.0.1.3680043.2.1125.1.0",
            "0020|000e": series_uid,
            "0008|0018": f"{series_uid}.{k + 1}",
            "0008|0016": "1.2.840.10008.5.1.4.1.1.2",
            "0020|0013": str(k + 1),
            "0020|0032": "\\".join(f"{v:.6f}" for v in pos),
            "0020|0037": "\\".join(f"{v:.8f}" for v in np.concatenate([direction[:, 0], direction[:, 1]])),
            "0028|0030": f"{spacing[1]:.6f}\\{spacing[0]:.6f}",
            "0018|0050": f"{spacing[2]:.6f}",
        }
        for key, value in tags.items():
            sl.SetMetaData(key, value)
        writer.SetFileName(str(folder / f"s{series_uid.rsplit('.', 1)[-1]}_{k:03d}.dcm"))
        writer.Execute(sl)
    return folder


def physical_match(a: Volume, b: Volume, atol: float = 1e-4) -> bool:
    """True when a and b hold the same voxel values at the same physical points
    (their grids may differ by a permutation or flip of axes)."""
    m = np.linalg.inv(b.ijk_to_ras) @ a.ijk_to_ras  # index in a -> index in b
    r = m[:3, :3]
    rounded = np.round(r)
    if not np.allclose(r, rounded, atol=1e-6) or not np.allclose(m[:3, 3], np.round(m[:3, 3]), atol=atol):
        return False
    ia = np.indices(a.shape).reshape(3, -1)
    ib = (rounded @ ia + np.round(m[:3, 3])[:, None]).astype(int)
    if any((ib[d].min() < 0 or ib[d].max() >= b.shape[d]) for d in range(3)):
        return False
    return bool(np.array_equal(a.array.reshape(-1), b.array[ib[0], ib[1], ib[2]]))


__all__ = ["write_nifti", "write_itk", "write_nrrd_ras", "write_dicom_series", "physical_match", "LPS_TO_RAS"]
