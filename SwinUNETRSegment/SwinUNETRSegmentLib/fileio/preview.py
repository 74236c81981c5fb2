"""A PNG for quality control: three orthogonal slices with the segments overlaid.

The slices pass through the largest segmented structures (the axial, coronal and
sagittal planes holding the most labelled voxels), shown in radiological convention
(patient's right on the image's left, anterior and superior up) with the voxel aspect
ratio respected, and a legend of the segments present.

Colours are the model card's where they can be told apart; where two segments shown
together are too close (CIE76 colour difference below :data:`MIN_COLOR_DISTANCE`, as
liver and stomach, or both kidneys, are in Slicer's anatomy colours), the later one gets
the colour of a fixed palette farthest from every colour already shown, and the legend
shows the colours drawn. The segmentation files keep the card's colours.

The label volume is read in its own dtype (uint8 from the engine), a slab at a time:
the planes' labelled-voxel counts and the values present come from running sums over
slabs, and colours from a lookup table indexed by the three slices' labels, so that no
full-size copy or mask of the volume is made.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from SwinUNETRSegmentLib.fileio.atomic import atomic_path
from SwinUNETRSegmentLib.geometry import Volume
from SwinUNETRSegmentLib.models.cards import LabelInfo

__all__ = ["render_preview", "write_preview"]

#: voxels per slab when the label volume is summed (bounds the temporary arrays)
_SLAB_VOXELS = 1 << 18

#: segments whose colours differ less than this (CIE76 delta E in CIELAB) get another colour
MIN_COLOR_DISTANCE = 25.0

#: colours to choose from when two segments' colours are too close: well-separated hues
#: at two lightnesses
_PALETTE = (
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
    (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255),
    (170, 110, 40), (255, 250, 200), (128, 0, 0), (170, 255, 195), (128, 128, 0), (255, 215, 180),
    (0, 0, 128), (128, 128, 128),
)


def _lab(rgb) -> np.ndarray:
    """sRGB (0..255) to CIELAB (D65), rows of colours."""
    c = np.asarray(rgb, dtype=np.float64).reshape(-1, 3) / 255.0
    c = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    xyz = c @ np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]]).T
    xyz /= np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.stack([116 * f[:, 1] - 16, 500 * (f[:, 0] - f[:, 1]), 200 * (f[:, 1] - f[:, 2])], axis=1)


def display_colors(table: Sequence[LabelInfo], sizes: Sequence[int] | None = None) -> dict[int, tuple[int, int, int]]:
    """The colour to draw each label of ``table`` (the segments shown together) with.

    Labels are taken largest first (``sizes``: voxels per label, in ``table``'s order; the
    table's order when None), so the most visible keep their card colours: each keeps its
    own where it differs enough from those taken before it, else gets the palette colour
    farthest from every colour already in use."""
    used: list[tuple[int, int, int]] = []
    out: dict[int, tuple[int, int, int]] = {}
    order = range(len(table)) if sizes is None else sorted(range(len(table)), key=lambda n: -int(sizes[n]))
    for t in (table[n] for n in order):
        color = tuple(int(c) for c in t.color)
        if used and float(np.min(np.linalg.norm(_lab(used) - _lab(color), axis=1))) < MIN_COLOR_DISTANCE:
            candidates = [c for c in _PALETTE if c not in used]
            if candidates:
                distances = np.linalg.norm(_lab(candidates)[:, None, :] - _lab(used)[None, :, :], axis=2).min(axis=1)
                color = candidates[int(np.argmax(distances))]
        out[t.value] = color  # type: ignore[assignment]
        used.append(color)  # type: ignore[arg-type]
    return out


def _to_ras_axes(vol: Volume) -> tuple[np.ndarray, np.ndarray]:
    """Permute and flip the array so its axes run closest to R, A, S (display only)."""
    import nibabel.orientations as nio

    ornt = nio.io_orientation(vol.ijk_to_ras)
    arr = nio.apply_orientation(vol.array, ornt)
    spacing = vol.spacing[ornt[:, 0].astype(int).argsort()]
    return arr, spacing


def _window(image: np.ndarray, modality: str) -> np.ndarray:
    if modality.upper() == "CT":
        lo, hi = -160.0, 240.0  # abdominal soft-tissue window
    else:
        lo, hi = np.percentile(image, [1, 99]) if image.size else (0.0, 1.0)
        if hi <= lo:
            hi = lo + 1.0
    return (np.clip((image.astype(np.float32) - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8)


def _panel(gray: np.ndarray, lab: np.ndarray, colors: np.ndarray, aspect: tuple[float, float], alpha: float = 0.45):
    """gray, lab: 2D (rows, cols); aspect: mm per row, mm per column."""
    from PIL import Image

    rgb = np.repeat(gray[..., None], 3, axis=2).astype(np.float32)
    mask = lab > 0
    if mask.any():
        rgb[mask] = (1 - alpha) * rgb[mask] + alpha * colors[lab[mask]]
    img = Image.fromarray(rgb.clip(0, 255).astype(np.uint8))
    rows, cols = gray.shape
    scale = 1.0 / min(aspect)
    size = (max(1, int(round(cols * aspect[1] * scale))), max(1, int(round(rows * aspect[0] * scale))))
    return img.resize(size, Image.NEAREST)


def _label_sums(lab: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
    """Labelled (> 0) voxels in each plane along each axis of a 3D label array, and voxels
    of each value ``0..max`` (negative values count as 0), summed a slab at a time."""
    planes = [np.zeros(n, np.int64) for n in lab.shape]
    values = np.zeros(1, np.int64)
    step = max(1, _SLAB_VOXELS // max(1, lab.shape[1] * lab.shape[2]))
    for start in range(0, lab.shape[0], step):
        slab = lab[start:start + step]
        fg = slab > 0
        planes[0][start:start + slab.shape[0]] = fg.sum(axis=(1, 2))
        planes[1] += fg.sum(axis=(0, 2))
        planes[2] += fg.sum(axis=(0, 1))
        flat = slab.reshape(-1)
        part = np.bincount(flat if slab.dtype.kind in "bu" else np.maximum(flat, 0))
        if len(part) > len(values):
            part[: len(values)] += values
            values = part
        else:
            values[: len(part)] += part
    return planes, values


def render_preview(image: Volume, labels: Volume, table: Sequence[LabelInfo], modality: str = "CT", height: int = 320):
    """A PIL image: axial, coronal and sagittal slices with segments, and a legend.

    ``image`` and ``labels`` share one grid; ``labels`` holds the values of ``table``
    (any integer dtype; 0 and negative values are not drawn).
    """
    from PIL import Image, ImageDraw

    img, spacing = _to_ras_axes(image)
    lab, _ = _to_ras_axes(labels)
    if lab.dtype.kind not in "bui":
        lab = lab.astype(np.int64)
    plane_counts, value_counts = _label_sums(lab)
    labelled = bool(value_counts[1:].any())
    present = [t for t in table if 0 <= t.value < len(value_counts) and value_counts[t.value]] if labelled else []
    shown = display_colors(present, [int(value_counts[t.value]) for t in present])
    colors = np.zeros((max([t.value for t in table] + [len(value_counts) - 1]) + 1, 3), dtype=np.float32)
    for t in table:
        colors[t.value] = shown.get(t.value, t.color)
    # Planes with the most labelled voxels; the middle where nothing is labelled.
    idx = [int(c.argmax()) if c.any() else img.shape[axis] // 2 for axis, c in enumerate(plane_counts)]
    x, y, z = idx
    sx, sy, sz = spacing
    # Radiological display: rows top->bottom = anterior->posterior (axial) or superior->inferior,
    # columns left->right = patient's right->left (axial, coronal), anterior->posterior (sagittal).
    views = [
        (img[::-1, ::-1, z].T, lab[::-1, ::-1, z].T, (sy, sx)),   # axial: rows A->P, cols R->L
        (img[::-1, y, ::-1].T, lab[::-1, y, ::-1].T, (sz, sx)),   # coronal: rows S->I, cols R->L
        (img[x, ::-1, ::-1].T, lab[x, ::-1, ::-1].T, (sz, sy)),   # sagittal: rows S->I, cols A->P
    ]
    panels = []
    for g, l_, aspect in views:
        p = _panel(_window(g, modality), l_, colors, aspect)
        w = max(1, int(round(p.width * height / p.height)))
        panels.append(p.resize((w, height), Image.NEAREST))
    legend_h = 16 * ((len(present) + 2) // 3) + 8 if present else 24
    width = sum(p.width for p in panels) + 4 * (len(panels) + 1)
    out = Image.new("RGB", (width, height + 8 + legend_h), (0, 0, 0))
    xo = 4
    for p in panels:
        out.paste(p, (xo, 4))
        xo += p.width + 4
    draw = ImageDraw.Draw(out)
    if not present:
        draw.text((6, height + 10), "no segments found", fill=(255, 255, 255))
    col_w = max(1, width // 3)
    for n, t in enumerate(present):
        cx, cy = 6 + (n % 3) * col_w, height + 10 + 16 * (n // 3)
        draw.rectangle([cx, cy + 2, cx + 10, cy + 12], fill=shown[t.value])
        draw.text((cx + 14, cy), t.name, fill=(255, 255, 255))
    return out


def write_preview(path: str | Path, image: Volume, labels: Volume, table: Sequence[LabelInfo],
                  modality: str = "CT") -> Path:
    """Write :func:`render_preview` as a PNG through :func:`~SwinUNETRSegmentLib.fileio.atomic.atomic_path`."""
    pic = render_preview(image, labels, table, modality)
    with atomic_path(path) as tmp:
        pic.save(str(tmp), format="PNG")
    return Path(path)
