"""DICOM geometry checks on series the tests build: what cannot be one evenly spaced stack
is one line that says what to do (and exit code 2 from the command line); a localizer or a
second copy of an instance mixed into the series is left out, and the volume is the same."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from conftest import make_affine, rotation
from helpers import write_dicom_series

from SwinUNETRSegmentLib.cli import main
from SwinUNETRSegmentLib.errors import UserError
from SwinUNETRSegmentLib.fileio.read import read_volume
from SwinUNETRSegmentLib.geometry import Volume

UID = "1.2.826.0.1.3680043.2.1125.3.1"


def _series(tmp_path: Path, direction=None, name="s", shape=(12, 10, 9)) -> tuple[Volume, Path]:
    direction = np.eye(3) if direction is None else direction
    rng = np.random.default_rng(0)
    vol = Volume(rng.integers(-1000, 1000, size=shape).astype(np.int16),
                 make_affine((1.5, 1.25, 2.0), direction, (-20.0, 10.0, 30.0)))
    return vol, write_dicom_series(vol, tmp_path / name, series_uid=UID)


def _files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.dcm"))


def _edit(path: Path, **values) -> None:
    ds = pydicom.dcmread(path)
    for key, value in values.items():
        setattr(ds, key, value)
    ds.save_as(path)


def _shift(path: Path, delta_lps) -> None:
    ds = pydicom.dcmread(path)
    ds.ImagePositionPatient = [f"{float(a) + d:.6f}" for a, d in zip(ds.ImagePositionPatient, delta_lps)]
    ds.save_as(path)


def _error(folder: Path) -> str:
    with pytest.raises(UserError) as info:
        read_volume(folder)
    text = str(info.value)
    assert "\n" not in text
    return text


def test_clean_series_in_any_file_order_reads_back(tmp_path):
    vol, folder = _series(tmp_path, direction=rotation(0.2, -0.1, 0.3))
    for n, f in enumerate(_files(folder)):  # names no longer in slice order
        f.rename(folder / f"x{(n * 7) % 9}_{n}.dcm")
    back, info = read_volume(folder)
    assert back.same_grid(vol, atol=1e-4) and np.array_equal(back.array, vol.array)
    assert len(info.dicom) == 9 and info.extra["dropped"] == []
    along = [float(np.asarray(ds.ImagePositionPatient, float) @ vol.ijk_to_lps[:3, 2]) for ds in info.dicom]
    assert along == sorted(along)  # the headers a SEG references, in slice order


def test_missing_slice(tmp_path):
    _vol, folder = _series(tmp_path)
    _files(folder)[4].unlink()
    msg = _error(folder)
    assert "missing 1 slice" in msg and "4.00 mm after slice 4 of 8" in msg and "copy the missing files" in msg


def test_uneven_spacing(tmp_path):
    _vol, folder = _series(tmp_path)
    for f in _files(folder)[5:]:
        _shift(f, (0.0, 0.0, 0.7))
    msg = _error(folder)
    assert "uneven slice spacing (2.00 to 2.70 mm)" in msg and "resample it to even spacing" in msg


def test_gantry_tilt(tmp_path):
    _vol, folder = _series(tmp_path)
    for k, f in enumerate(_files(folder)):
        _shift(f, (0.0, 0.35 * k, 0.0))  # each slice moves 0.35 mm along y: 10 degrees at 2 mm
    msg = _error(folder)
    assert "gantry tilt of 9.9 degrees" in msg and "resample it to a regular grid" in msg


def test_two_orientations(tmp_path):
    _vol, folder = _series(tmp_path)
    _v2, other = _series(tmp_path, direction=np.array([[1.0, 0, 0], [0, 0, 1], [0, -1, 0]]), name="coronal")
    for n, f in enumerate(_files(other)[:3]):
        shutil.copy(f, folder / f"coronal_{f.name}")
        _edit(folder / f"coronal_{f.name}", SOPInstanceUID=f"{UID}.{50 + n}")
    msg = _error(folder)
    assert "2 orientations (9 + 3 slices" in msg and "one orientation in a folder of their own" in msg


def test_localizer_is_left_out(tmp_path):
    vol, folder = _series(tmp_path)
    _v2, other = _series(tmp_path, direction=np.array([[1.0, 0, 0], [0, 0, 1], [0, -1, 0]]), name="scout")
    scout = folder / "scout.dcm"
    shutil.copy(_files(other)[0], scout)
    _edit(scout, ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"], SOPInstanceUID=UID + ".99")
    back, info = read_volume(folder)
    assert back.same_grid(vol, atol=1e-4) and np.array_equal(back.array, vol.array)
    assert info.extra["dropped"] == ["1 localizer image"] and len(info.dicom) == 9


def test_only_localizers(tmp_path):
    _vol, folder = _series(tmp_path, shape=(12, 10, 3))
    for f in _files(folder):
        _edit(f, ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"])
    assert "only localizer" in _error(folder)


def test_second_copy_of_an_instance_is_left_out_two_at_one_position_are_not(tmp_path):
    vol, folder = _series(tmp_path)
    shutil.copy(_files(folder)[3], folder / "copy.dcm")
    back, info = read_volume(folder)
    assert np.array_equal(back.array, vol.array) and info.extra["dropped"] == ["1 second copies of an instance"]
    _edit(folder / "copy.dcm", SOPInstanceUID=UID + ".77")  # another acquisition at the same place
    assert "2 slices of the DICOM series" in _error(folder) and "lie at one position" in _error(folder)


def test_mixed_image_sizes(tmp_path):
    _vol, folder = _series(tmp_path)
    _v2, other = _series(tmp_path, name="small", shape=(8, 10, 9))
    shutil.copy(_files(other)[0], folder / "small.dcm")
    _edit(folder / "small.dcm", SOPInstanceUID=UID + ".55")
    assert "different sizes (10 x 8, 10 x 12)" in _error(folder)


def test_no_position(tmp_path):
    _vol, folder = _series(tmp_path)
    ds = pydicom.dcmread(_files(folder)[2])
    del ds.ImagePositionPatient
    ds.save_as(_files(folder)[2])
    assert "has no valid ImagePositionPatient" in _error(folder)


def test_command_line_says_it_in_one_line(tmp_path, capsys):
    _vol, folder = _series(tmp_path)
    _files(folder)[4].unlink()
    out = tmp_path / "r.seg.nrrd"
    rc = main(["-i", str(folder), "-o", str(out), "--model", "demo"])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "missing 1 slice" in err, err
    assert not out.exists()
