"""One value type for an image on a physical grid.

Every path into and out of the engine goes through :class:`Volume`: an array indexed
``[i, j, k]`` plus the 4x4 matrix that maps voxel indices ``(i, j, k, 1)`` to RAS
millimetres, which is what Slicer calls IJKToRAS and what NIfTI and MONAI call the
affine. The conversion between RAS (Slicer, NIfTI, MONAI) and LPS (ITK, DICOM, NRRD
``left-posterior-superior``) happens here and nowhere else.

Slicer's ``arrayFromVolume`` returns axes ``K, J, I``: use :meth:`Volume.from_kji` and
:meth:`Volume.kji` at that boundary.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

#: Flips x and y: RAS <-> LPS. It is its own inverse.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass(frozen=True, eq=False)
class Volume:
    """A 3D scalar image and its geometry.

    Attributes:
        array: voxel values, shape ``(I, J, K)``; ``array[i, j, k]`` is the voxel at index
            ``(i, j, k)``.
        ijk_to_ras: float64 4x4 matrix mapping ``(i, j, k, 1)`` to RAS millimetres.
    """

    array: np.ndarray
    ijk_to_ras: np.ndarray

    def __post_init__(self) -> None:
        m = np.array(self.ijk_to_ras, dtype=np.float64)
        if m.shape != (4, 4):
            raise ValueError(f"ijk_to_ras must be 4x4, got {m.shape}")
        object.__setattr__(self, "ijk_to_ras", m)
        if np.asarray(self.array).ndim != 3:
            raise ValueError(f"a Volume is 3D, got an array of shape {np.shape(self.array)}")

    # ---- geometry -----------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.array.shape)  # type: ignore[return-value]

    @property
    def spacing(self) -> np.ndarray:
        """Voxel size along i, j, k in millimetres (lengths of the matrix columns)."""
        return np.linalg.norm(self.ijk_to_ras[:3, :3], axis=0)

    @property
    def ijk_to_lps(self) -> np.ndarray:
        return LPS_TO_RAS @ self.ijk_to_ras

    def same_grid(self, other: "Volume", atol: float = 1e-5) -> bool:
        """True when both volumes have the same shape and voxel-to-world matrix (to atol mm)."""
        return self.shape == other.shape and bool(np.allclose(self.ijk_to_ras, other.ijk_to_ras, rtol=0, atol=atol))

    def with_array(self, array: np.ndarray) -> "Volume":
        """A volume on the same grid with other voxel values (same shape required)."""
        if tuple(array.shape) != self.shape:
            raise ValueError(f"array shape {array.shape} does not match the grid {self.shape}")
        return Volume(array, self.ijk_to_ras)

    # ---- LPS (ITK, DICOM, NRRD) ---------------------------------------------------
    @classmethod
    def from_lps(cls, array: np.ndarray, ijk_to_lps: np.ndarray) -> "Volume":
        return cls(array, LPS_TO_RAS @ np.asarray(ijk_to_lps, dtype=np.float64))

    @classmethod
    def from_itk_geometry(cls, array_ijk: np.ndarray, origin, spacing, direction) -> "Volume":
        """From ITK's origin, spacing and direction (all in LPS) and an ``[i, j, k]`` array."""
        d = np.asarray(direction, dtype=np.float64).reshape(3, 3)
        m = np.eye(4)
        m[:3, :3] = d * np.asarray(spacing, dtype=np.float64)[np.newaxis, :]
        m[:3, 3] = np.asarray(origin, dtype=np.float64)
        return cls.from_lps(array_ijk, m)

    def itk_geometry(self) -> tuple[tuple[float, ...], tuple[float, ...], tuple[float, ...]]:
        """(origin, spacing, direction) in LPS as ITK wants them.

        Raises ValueError for a sheared matrix, which ITK cannot represent.
        """
        m = self.ijk_to_lps
        spacing = np.linalg.norm(m[:3, :3], axis=0)
        direction = m[:3, :3] / spacing[np.newaxis, :]
        if not np.allclose(direction.T @ direction, np.eye(3), atol=1e-4):
            raise ValueError("the voxel axes are not perpendicular (sheared grid); ITK formats cannot store it")
        return tuple(m[:3, 3]), tuple(spacing), tuple(direction.ravel())

    # ---- Slicer's K, J, I arrays --------------------------------------------------
    @classmethod
    def from_kji(cls, array_kji: np.ndarray, ijk_to_ras: np.ndarray) -> "Volume":
        """From an array indexed ``[k, j, i]`` (slicer.util.arrayFromVolume, SimpleITK)."""
        return cls(np.asarray(array_kji).transpose(2, 1, 0), ijk_to_ras)

    def kji(self) -> np.ndarray:
        """The voxels indexed ``[k, j, i]`` (a view, not a copy)."""
        return self.array.transpose(2, 1, 0)

    # ---- points ------------------------------------------------------------------------
    def ijk_to_world(self, ijk: np.ndarray) -> np.ndarray:
        """RAS millimetres of voxel indices, shape ``(N, 3)`` -> ``(N, 3)``."""
        ijk = np.atleast_2d(np.asarray(ijk, dtype=np.float64))
        return ijk @ self.ijk_to_ras[:3, :3].T + self.ijk_to_ras[:3, 3]

    def world_to_ijk(self, ras: np.ndarray) -> np.ndarray:
        """Continuous voxel indices of RAS points, shape ``(N, 3)`` -> ``(N, 3)``."""
        ras = np.atleast_2d(np.asarray(ras, dtype=np.float64))
        inv = np.linalg.inv(self.ijk_to_ras)
        return ras @ inv[:3, :3].T + inv[:3, 3]


def shift_affine(affine: np.ndarray, start: Sequence[int]) -> np.ndarray:
    """The affine of a sub-grid starting at voxel ``start``."""
    out = np.array(affine, dtype=np.float64, copy=True)
    out[:3, 3] = out[:3, :3] @ np.asarray(start, dtype=np.float64) + out[:3, 3]
    return out


# ----------------------------------------------------------------------------------------
# warm engine
# ----------------------------------------------------------------------------------------


def check_volume(vol: Volume, source: str) -> None:
    """Reject images a model cannot segment, with a one-line
    :class:`~SwinUNETRSegmentLib.errors.UserError` that says why and what to do: no voxels,
    a single voxel or slice, non-numeric or non-finite voxels, no valid voxel-to-world
    matrix. ``source`` names the image in the message (a file name, "the volume")."""
    from SwinUNETRSegmentLib.errors import UserError

    shape = vol.shape
    dims = " x ".join(str(s) for s in shape)
    if int(np.prod(shape)) == 0:
        raise UserError(f"{source} is empty (size {dims}); give a scan with voxels in it")
    if all(s == 1 for s in shape):
        raise UserError(f"{source} has a single voxel; give a 3D scan")
    if any(s == 1 for s in shape):
        raise UserError(f"{source} is a 2D image (one slice) ({dims}); give a single 3D scalar scan")
    if vol.array.dtype.kind not in "biuf":
        raise UserError(f"{source} has voxels of type {vol.array.dtype}; give a scan with real-valued voxels")
    if vol.array.dtype.kind == "f":
        # a few planes at a time: no full-size boolean copy of a large scan
        bad = sum(int(np.count_nonzero(~np.isfinite(vol.array[i : i + 8]))) for i in range(0, shape[0], 8))
        if bad:
            raise UserError(
                f"{source} has {bad} NaN or Inf voxels; fill them (e.g. with the background value) and try again"
            )
    if not np.all(np.isfinite(vol.ijk_to_ras)) or abs(np.linalg.det(vol.ijk_to_ras[:3, :3])) < 1e-12:
        raise UserError(f"{source} has no valid voxel-to-world matrix (zero or undefined spacing); fix its header")
