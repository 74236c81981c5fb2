"""The quality-control PNG: the same bytes as the preview has always made, without a
full-size copy of the label volume."""

from __future__ import annotations

import io
import tracemalloc

import numpy as np
import pytest
from conftest import make_affine, rotation, tiny_card

from SwinUNETRSegmentLib.fileio.preview import MIN_COLOR_DISTANCE, _lab, display_colors, render_preview, write_preview
from SwinUNETRSegmentLib.geometry import Volume


# ---------------------------------------------------------------------------------------
# The preview as it was made before it worked on the uint8 labels (an int64 copy of the
# label volume and one mask per label); kept here as the reference for the bytes, with
# the one change made since: segments too close in colour are drawn in display_colors'.
# ---------------------------------------------------------------------------------------
def _reference_to_ras_axes(vol):
    import nibabel.orientations as nio

    ornt = nio.io_orientation(vol.ijk_to_ras)
    arr = nio.apply_orientation(vol.array, ornt)
    spacing = vol.spacing[ornt[:, 0].astype(int).argsort()]
    return arr, spacing


def _reference_window(image, modality):
    if modality.upper() == "CT":
        lo, hi = -160.0, 240.0
    else:
        lo, hi = np.percentile(image, [1, 99]) if image.size else (0.0, 1.0)
        if hi <= lo:
            hi = lo + 1.0
    return (np.clip((image.astype(np.float32) - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8)


def _reference_panel(gray, lab, colors, aspect, alpha=0.45):
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


def _reference_render(image, labels, table, modality="CT", height=320):
    from PIL import Image, ImageDraw

    img, spacing = _reference_to_ras_axes(image)
    lab, _ = _reference_to_ras_axes(labels)
    lab = lab.astype(np.int64)
    fg = lab > 0
    present = [t for t in table if np.any(lab == t.value)] if fg.any() else []
    shown = display_colors(present, [int(np.count_nonzero(lab == t.value)) for t in present])
    colors = np.zeros((max([t.value for t in table] + [int(lab.max())]) + 1, 3), dtype=np.float32)
    for t in table:
        colors[t.value] = shown.get(t.value, t.color)
    idx = []
    for axis in range(3):
        counts = fg.sum(axis=tuple(a for a in range(3) if a != axis))
        idx.append(int(counts.argmax()) if counts.any() else img.shape[axis] // 2)
    x, y, z = idx
    sx, sy, sz = spacing
    views = [
        (img[::-1, ::-1, z].T, lab[::-1, ::-1, z].T, (sy, sx)),
        (img[::-1, y, ::-1].T, lab[::-1, y, ::-1].T, (sz, sx)),
        (img[x, ::-1, ::-1].T, lab[x, ::-1, ::-1].T, (sz, sy)),
    ]
    panels = []
    for g, l_, aspect in views:
        p = _reference_panel(_reference_window(g, modality), l_, colors, aspect)
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


def _png(picture) -> bytes:
    buf = io.BytesIO()
    picture.save(buf, format="PNG")
    return buf.getvalue()


def _scan(shape, affine, seed=0):
    rng = np.random.default_rng(seed)
    image = Volume(rng.integers(-1000, 1000, shape).astype(np.int16), affine)
    lab = np.zeros(shape, np.uint8)
    x, y, z = shape
    lab[x // 8: x // 2, y // 6: y - 3, 2: z // 2] = 1
    lab[x // 2: x - 4, y // 4: y // 2, z // 2: z - 1] = 6
    lab[x // 2: x // 2 + 3, 1:4, 3: z - 2] = 13
    lab[1:3, 1:3, 1:3] = 3
    return image, lab


PERMUTED = np.array([[0.0, 0, 1], [1, 0, 0], [0, -1, 0]])
CASES = [  # (name, shape, affine, modality, edit of the labels)
    ("ct-flipped", (40, 36, 24), make_affine((1.5, 0.8, 3.0), np.diag([-1.0, 1, 1]), (3, 4, 5)), "CT", None),
    ("mr-oblique", (30, 28, 20), make_affine((1.1, 1.7, 2.3), rotation(0.3, -0.2, 0.5), (1, 2, 3)), "MR", None),
    ("permuted", (26, 30, 18), make_affine((2.5, 1.0, 1.5), PERMUTED), "CT", None),
    ("nothing-found", (20, 22, 16), make_affine((2.0, 2.0, 2.0)), "CT", lambda lab: lab * 0),
    ("value-not-in-card", (24, 24, 12), make_affine((1.0, 1.0, 2.5)), "CT", lambda lab: np.where(lab == 6, 20, lab)),
    ("int16-labels", (24, 20, 14), make_affine((1.0, 1.2, 2.0)), "CT", lambda lab: lab.astype(np.int16)),
]


@pytest.mark.parametrize("name, shape, affine, modality, edit", CASES, ids=[c[0] for c in CASES])
def test_preview_png_is_byte_for_byte_the_one_made_before(tmp_path, name, shape, affine, modality, edit):
    image, lab = _scan(shape, affine)
    if edit is not None:
        lab = edit(lab)
    labels = image.with_array(lab)
    table = tiny_card().labels
    expected = _png(_reference_render(image, labels, table, modality))
    assert _png(render_preview(image, labels, table, modality)) == expected
    out = write_preview(tmp_path / "p.png", image, labels, table, modality)
    assert out.read_bytes() == expected


def test_preview_allocates_far_less_than_an_int64_copy_of_the_labels():
    """A 256 x 256 x 200 label volume (13 MB of uint8; an int64 copy is 105 MB)."""
    shape = (256, 256, 200)
    image = Volume(np.full(shape, -500, np.int16), make_affine((0.8, 0.8, 1.5), np.diag([-1.0, -1, 1])))
    lab = np.zeros(shape, np.uint8)
    lab[40:200, 50:180, 20:150] = 6
    lab[100:140, 60:90, 30:60] = 1
    lab[10:20, 10:20, 10:20] = 13
    labels = image.with_array(lab)
    table = tiny_card().labels
    small = Volume(np.zeros((8, 8, 8), np.int16), np.eye(4))
    render_preview(small, small.with_array(np.ones((8, 8, 8), np.uint8)), table)  # imports happen outside the count
    tracemalloc.start()
    try:
        render_preview(image, labels, table)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    int64_copy = lab.size * 8
    assert peak < int64_copy / 10, f"peak {peak / 1e6:.1f} MB, an int64 copy is {int64_copy / 1e6:.0f} MB"


def test_segments_too_close_in_colour_are_drawn_apart_and_the_legend_follows():
    """Liver and stomach, and both kidneys, have nearly the same colour in Slicer's anatomy
    list: the larger keeps its colour, the smaller gets a distinguishable one, the legend's
    swatch is the colour drawn; distinct colours are left alone."""
    from SwinUNETRSegmentLib.models.cards import load_card

    card = load_card("demo")
    by_name = {t.name: t for t in card.labels}
    names = ["liver", "stomach", "right kidney", "left kidney", "spleen", "inferior vena cava"]
    table = [by_name[n] for n in names]
    sizes = [1000, 300, 200, 190, 400, 50]
    shown = display_colors(table, sizes)
    assert shown[by_name["liver"].value] == by_name["liver"].color
    assert shown[by_name["spleen"].value] == by_name["spleen"].color
    assert shown[by_name["inferior vena cava"].value] == by_name["inferior vena cava"].color
    assert shown[by_name["stomach"].value] != by_name["stomach"].color
    assert shown[by_name["left kidney"].value] != shown[by_name["right kidney"].value]
    colours = list(shown.values())
    lab = _lab(colours)
    gaps = [np.linalg.norm(lab[i] - lab[j]) for i in range(len(lab)) for j in range(i)]
    assert min(gaps) >= MIN_COLOR_DISTANCE
    # the legend: the swatch of each segment is the colour it is drawn in
    image = Volume(np.zeros((30, 30, 12), np.int16), make_affine((1.0, 1.0, 3.0)))
    labels = np.zeros((30, 30, 12), np.uint8)
    labels[2:20, 2:28, 2:10] = by_name["liver"].value
    labels[22:28, 2:10, 2:10] = by_name["stomach"].value
    picture = np.asarray(render_preview(image, image.with_array(labels), card.labels))
    legend = picture[320 + 8:]
    stomach_colour = display_colors([by_name["liver"], by_name["stomach"]], [100, 10])[by_name["stomach"].value]
    assert (legend == np.array(stomach_colour, np.uint8)).all(axis=-1).any()
