"""Every output file gets the mode a plain ``open(path, "w")`` gives it (0o666 less the
umask), not the 0600 of the temporary file it was written as: colleagues can read a
segmentation written into a shared folder. The catalog's files: tests/test_catalog.py."""

from __future__ import annotations

import contextlib
import os
import stat

import numpy as np
import pytest
from conftest import make_affine, tiny_card

from SwinUNETRSegmentLib.fileio.preview import write_preview
from SwinUNETRSegmentLib.fileio.write import write_segmentation
from SwinUNETRSegmentLib.geometry import Volume

UMASKS = [0o022, 0o002]


@contextlib.contextmanager
def umask(mask: int):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("mask", UMASKS, ids=oct)
def test_segmentations_and_preview_get_the_umask_s_mode(tmp_path, mask):
    image = Volume(np.full((12, 10, 8), -100, np.int16), make_affine((2.0, 2.0, 3.0)))
    lab = np.zeros((12, 10, 8), np.uint8)
    lab[2:8, 3:7, 2:6] = 6
    labels = image.with_array(lab)
    table = tiny_card().labels
    with umask(mask):
        written = write_segmentation(tmp_path / "r.seg.nrrd", labels, table)
        written += write_segmentation(tmp_path / "r.nii.gz", labels, table)
        written.append(write_preview(tmp_path / "r.png", image, labels, table))
    assert sorted(p.name for p in written) == ["r.csv", "r.nii.gz", "r.png", "r.seg.nrrd"]
    for p in written:
        assert mode(p) == 0o666 & ~mask, f"{p.name}: {oct(mode(p))} under umask {oct(mask)}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.csv", "r.nii.gz", "r.png", "r.seg.nrrd"]
