"""The two views of each sub-volume that the proxy tasks learn from (Tang et al., CVPR 2022).

Each view is a rotation by k*90 degrees about the axial axis (k is the rotation task's
label) followed by random cut-outs (noise, or another sub-volume's voxels) for the
network to inpaint. Every draw comes from the ``generator`` given, so a seeded generator
gives the same views.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from SwinUNETRSegmentLib.errors import UserError

__all__ = ["ROTATIONS", "axial_plane", "rotate_axial", "random_cutout", "make_views"]

#: Number of rotation classes: 0, 90, 180 and 270 degrees about the axial axis.
ROTATIONS = 4


def axial_plane(orientation: str = "RAS") -> tuple[int, int]:
    """The two spatial axes (0..2) spanning the axial plane of arrays in ``orientation``
    (the axes that are not S/I): rotating in them rotates about the axial axis."""
    code = orientation.upper()
    axial = [n for n, c in enumerate(code) if c in "SI"]
    if len(code) != 3 or len(axial) != 1:
        raise UserError(f"orientation '{orientation}' has no single superior/inferior axis; "
                        "use codes such as RAS or LPS")
    return tuple(n for n in range(3) if n != axial[0])  # type: ignore[return-value]


def rotate_axial(
    x: torch.Tensor,
    k: torch.Tensor | None = None,
    plane: tuple[int, int] = (0, 1),
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate each volume of a batch by k*90 degrees in ``plane``.

    Args:
        x: (B, C, X, Y, Z) volumes; the two sizes in ``plane`` must be equal.
        k: (B,) integers 0..3, or None to draw them uniformly.
        plane: the spatial axes (0..2) of the rotation plane, e.g. :func:`axial_plane`.
        generator: CPU random generator for ``k``.

    Returns:
        (rotated (B, C, X, Y, Z), k (B,) int64 on x's device): the rotation task's input and labels.
    """
    dims = (plane[0] + 2, plane[1] + 2)
    if x.shape[dims[0]] != x.shape[dims[1]]:
        raise ValueError(f"rotation plane {plane} of a {tuple(x.shape)} batch is not square")
    if k is None:
        k = torch.randint(0, ROTATIONS, (x.shape[0],), generator=generator)
    k = torch.as_tensor(k, dtype=torch.int64).reshape(-1)
    if k.numel() != x.shape[0]:
        raise ValueError(f"{k.numel()} rotations for a batch of {x.shape[0]}")
    turn = (dims[0] - 1, dims[1] - 1)
    out = torch.stack([torch.rot90(x[i], int(k[i]) % ROTATIONS, dims=turn) for i in range(x.shape[0])])
    return out, k.to(x.device)


def _random_boxes(shape: Sequence[int], fraction: float, max_block: float, min_block: float,
                  generator: torch.Generator | None) -> list[tuple[slice, slice, slice]]:
    """Boxes in a volume of ``shape`` until their total size reaches ``fraction`` of it."""
    def draw(high: int) -> int:
        return int(torch.randint(0, max(high, 1), (1,), generator=generator))

    lo = [max(1, round(s * min_block)) for s in shape]
    hi = [max(lo[n] + 1, round(s * max_block) + 1) for n, s in enumerate(shape)]
    target = fraction * float(np.prod(shape))
    boxes, covered = [], 0
    while covered < target and len(boxes) < 1000:
        size = [lo[n] + draw(hi[n] - lo[n]) for n in range(3)]
        start = [draw(shape[n] - size[n] + 1) for n in range(3)]
        boxes.append(tuple(slice(start[n], start[n] + size[n]) for n in range(3)))
        covered += int(np.prod(size))
    return boxes  # type: ignore[return-value]


def random_cutout(
    x: torch.Tensor,
    max_fraction: float = 0.3,
    max_block: float = 0.25,
    min_block: float = 0.05,
    swap_probability: float = 0.5,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut random boxes out of each volume, for the network to inpaint.

    Each volume loses up to ``max_fraction`` of its voxels (a fraction drawn uniformly) in
    boxes of ``min_block`` to ``max_block`` of each side, filled with uniform noise in the
    volume's intensity range; with ``swap_probability`` as many more voxels are replaced
    by the voxels of another volume of the batch at the same place.

    Args:
        x: (B, C, X, Y, Z) volumes (not modified).
        generator: CPU random generator.

    Returns:
        (cut (B, C, X, Y, Z), mask (B, 1, X, Y, Z) bool: True where voxels were replaced).
    """
    out = x.detach().clone()
    mask = torch.zeros((x.shape[0], 1, *x.shape[2:]), dtype=torch.bool, device=x.device)
    shape = tuple(int(s) for s in x.shape[2:])

    def uniform() -> float:
        return float(torch.rand((), generator=generator))

    for i in range(x.shape[0]):
        lo, hi = float(x[i].min()), float(x[i].max())
        for box in _random_boxes(shape, uniform() * max_fraction, max_block, min_block, generator):
            size = [s.stop - s.start for s in box]
            noise = torch.rand((x.shape[1], *size), generator=generator) * (hi - lo) + lo
            out[(i, slice(None), *box)] = noise.to(device=x.device, dtype=x.dtype)
            mask[(i, slice(None), *box)] = True
        if x.shape[0] > 1 and uniform() < swap_probability:
            other = (i + 1 + int(torch.randint(0, x.shape[0] - 1, (1,), generator=generator))) % x.shape[0]
            for box in _random_boxes(shape, uniform() * max_fraction, max_block, min_block, generator):
                out[(i, slice(None), *box)] = x[(other, slice(None), *box)]
                mask[(i, slice(None), *box)] = True
    return out, mask


def make_views(x: torch.Tensor, plane: tuple[int, int] = (0, 1), generator: torch.Generator | None = None,
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two augmented views of each sub-volume of a batch.

    Args:
        x: (B, C, X, Y, Z) sub-volumes.

    Returns:
        (inputs (2B, C, X, Y, Z): rotated and cut; k (2B,): the rotations; targets
        (2B, C, X, Y, Z): rotated, uncut; masks (2B, 1, X, Y, Z): the cut-out voxels).
        Views ``i`` and ``B + i`` come from sub-volume ``i``.
    """
    r1, k1 = rotate_axial(x, plane=plane, generator=generator)
    r2, k2 = rotate_axial(x, plane=plane, generator=generator)
    c1, m1 = random_cutout(r1, generator=generator)
    c2, m2 = random_cutout(r2, generator=generator)
    return torch.cat([c1, c2]), torch.cat([k1, k2]), torch.cat([r1, r2]), torch.cat([m1, m2])

