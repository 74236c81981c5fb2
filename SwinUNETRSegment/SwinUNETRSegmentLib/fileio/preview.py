"""A PNG for quality control: three orthogonal slices with the segments overlaid.

The slices pass through the largest segmented structures (the axial, coronal and
sagittal planes holding the most labelled voxels), shown in radiological convention
(patient's right on the image's left, anterior and superior up) with the voxel aspect
ratio respected, and a legend of the segments present.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from SwinUNETRSegmentLib.models.cards import LabelInfo
from SwinUNETRSegmentLib.geometry import Volume
from SwinUNETRSegmentLib.fileio.atomic import atomic_path


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


def render_preview(image: Volume, labels: Volume, table: Sequence[LabelInfo], modality: str = "CT", height: int = 320):
    """A PIL image: axial, coronal and sagittal slices with segments, and a legend."""
    from PIL import Image, ImageDraw

    img, spacing = _to_ras_axes(image)
    lab, _ = _to_ras_axes(labels)
    lab = lab.astype(np.int64)
    colors = np.zeros((max([t.value for t in table] + [int(lab.max())]) + 1, 3), dtype=np.float32)
    for t in table:
        colors[t.value] = t.color
    fg = lab > 0
    # Planes with the most labelled voxels; the middle where nothing is labelled.
    idx = []
    for axis in range(3):
        counts = fg.sum(axis=tuple(a for a in range(3) if a != axis))
        idx.append(int(counts.argmax()) if counts.any() else img.shape[axis] // 2)
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
    present = [t for t in table if np.any(lab == t.value)] if fg.any() else []
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
        draw.rectangle([cx, cy + 2, cx + 10, cy + 12], fill=tuple(int(c) for c in t.color))
        draw.text((cx + 14, cy), t.name, fill=(255, 255, 255))
    return out


def write_preview(path: str | Path, image: Volume, labels: Volume, table: Sequence[LabelInfo], modality: str = "CT") -> Path:
    pic = render_preview(image, labels, table, modality)
    with atomic_path(path) as tmp:
        pic.save(str(tmp), format="PNG")
    return Path(path)
