"""Every reader and writer keeps the voxels and the voxel-to-world matrix (to 1e-5 mm),
on oblique, flipped, anisotropic and non-RAS grids."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import GRIDS, grid_volume, make_affine
from helpers import physical_match, write_dicom_series, write_itk, write_nifti, write_nrrd_ras

from SwinUNETRSegmentLib.fileio.read import _itk_image_to_volume, read_volume
from SwinUNETRSegmentLib.fileio.write import write_segmentation
from SwinUNETRSegmentLib.geometry import Volume
from SwinUNETRSegmentLib.models.cards import load_card

ATOL = 1e-5
GRID_IDS = [g[0] for g in GRIDS]


def assert_same(vol: Volume, back: Volume):
    assert back.shape == vol.shape
    np.testing.assert_allclose(back.ijk_to_ras, vol.ijk_to_ras, rtol=0, atol=ATOL)
    np.testing.assert_array_equal(back.array, vol.array)


@pytest.mark.parametrize("grid", GRIDS, ids=GRID_IDS)
@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_nifti_round_trip(tmp_path, grid, suffix):
    vol = grid_volume(*grid[1:])
    back, _ = read_volume(write_nifti(vol, tmp_path / f"scan{suffix}"))
    assert_same(vol, back)


@pytest.mark.parametrize("grid", GRIDS, ids=GRID_IDS)
@pytest.mark.parametrize("suffix", [".nrrd", ".nhdr", ".mha", ".mhd"])
def test_itk_formats_round_trip(tmp_path, grid, suffix):
    vol = grid_volume(*grid[1:])
    back, _ = read_volume(write_itk(vol, tmp_path / f"scan{suffix}"))
    assert_same(vol, back)


@pytest.mark.parametrize("grid", GRIDS, ids=GRID_IDS)
def test_nrrd_in_ras_space_is_converted(tmp_path, grid):
    vol = grid_volume(*grid[1:])
    back, _ = read_volume(write_nrrd_ras(vol, tmp_path / "ras.nrrd"))
    assert_same(vol, back)


@pytest.mark.parametrize("grid", GRIDS, ids=GRID_IDS)
def test_dicom_series_round_trip(tmp_path, grid):
    vol = grid_volume(*grid[1:], shape=(20, 16, 7))
    back, info = read_volume(write_dicom_series(vol, tmp_path / "series"))
    assert info.modality == "CT"
    if np.linalg.det(vol.ijk_to_ras[:3, :3]) * np.linalg.det(np.diag([-1.0, -1.0, 1.0])) > 0:
        # A right-handed LPS grid: DICOM stores it exactly as it is.
        assert_same(vol, back)
    else:
        # DICOM cannot store a left-handed grid: the slices come back in the other order,
        # each voxel still at its physical point.
        assert physical_match(vol, back)


def test_same_physical_point_in_every_format(tmp_path):
    """One bright voxel at a known RAS point is found at that point in every format."""
    spacing, direction, origin = GRIDS[5][1:]
    arr = np.zeros((15, 12, 9), np.int16)
    arr[11, 3, 6] = 1000
    vol = Volume(arr, make_affine(spacing, direction, origin))
    point = vol.ijk_to_world([11, 3, 6])[0]
    paths = [
        write_nifti(vol, tmp_path / "a.nii.gz"),
        write_itk(vol, tmp_path / "a.nrrd"),
        write_itk(vol, tmp_path / "a.mha"),
        write_nrrd_ras(vol, tmp_path / "b.nrrd"),
        write_dicom_series(vol, tmp_path / "dcm"),
    ]
    for path in paths:
        back, _ = read_volume(path)
        ijk = np.unravel_index(int(np.argmax(back.array)), back.shape)
        np.testing.assert_allclose(back.ijk_to_world(ijk)[0], point, atol=ATOL, err_msg=str(path))
        np.testing.assert_allclose(back.world_to_ijk(point)[0], ijk, atol=1e-6, err_msg=str(path))


@pytest.mark.parametrize("grid", GRIDS, ids=GRID_IDS)
def test_seg_nrrd_written_and_read_back_on_the_same_points(tmp_path, grid):
    import SimpleITK as sitk

    from SwinUNETRSegmentLib.fileio import segnrrd as slicerio

    card = load_card("btcv")
    rng = np.random.default_rng(1)
    labels = Volume(rng.integers(0, 14, size=(21, 18, 11)).astype(np.uint8), make_affine(*grid[1:]))
    out = tmp_path / "labels.seg.nrrd"
    assert write_segmentation(out, labels, card.labels) == [out]

    seg = slicerio.read_segmentation(str(out))
    np.testing.assert_allclose(np.asarray(seg["ijkToLPS"]), labels.ijk_to_lps, rtol=0, atol=ATOL)
    np.testing.assert_array_equal(seg["voxels"], labels.array)
    # ITK (what Slicer reads .seg.nrrd with) puts every voxel at the same physical point.
    back = _itk_image_to_volume(sitk.ReadImage(str(out)), str(out))
    assert_same(labels, back)
    # Segment table as Slicer shows it.
    names = [s["name"] for s in seg["segments"]]
    assert names == [lab.name for lab in card.labels]
    for s, lab in zip(seg["segments"], card.labels):
        assert s["labelValue"] == lab.value
        np.testing.assert_allclose(s["color"], np.array(lab.color) / 255.0, atol=1e-5)
        assert s["terminology"]["type"][1] == lab.type.value
        present = np.argwhere(labels.array == lab.value)
        if len(present):
            lo, hi = present.min(axis=0), present.max(axis=0)
            assert s["extent"] == [int(lo[0]), int(hi[0]), int(lo[1]), int(hi[1]), int(lo[2]), int(hi[2])]
    assert not list(tmp_path.glob(".*part*")), "temporary files left behind"


def test_seg_nrrd_header_matches_what_slicer_writes(tmp_path):
    """Same fields as slicerio's data/Segmentation.seg.nrrd (written by Slicer)."""
    import nrrd

    from SwinUNETRSegmentLib.fileio import segnrrd as slicerio

    ref_path = slicerio.SAMPLE_DATA_DIR / "Segmentation.seg.nrrd"
    ref = nrrd.read_header(str(ref_path))
    card = load_card("btcv")
    labels = Volume(np.zeros((8, 8, 8), np.uint8), np.eye(4))
    labels.array[2:4, 2:5, 3:6] = 6
    out = tmp_path / "x.seg.nrrd"
    write_segmentation(out, labels, card.labels)
    ours = nrrd.read_header(str(out))
    assert ours["space"] == ref["space"] == "left-posterior-superior"
    assert {ours["type"], ref["type"]} <= {"uint8", "unsigned char", "uchar"}  # NRRD synonyms
    for key in ("Segment0_ID", "Segment0_Name", "Segment0_Color", "Segment0_LabelValue", "Segment0_Layer",
                "Segment0_Extent", "Segment0_Tags", "Segmentation_MasterRepresentation"):
        assert key in ref and key in ours, key
    tag = ours["Segment5_Tags"]
    assert ours["Segment5_Name"] == "liver"
    assert ("TerminologyEntry:Segmentation category and type - 3D Slicer General Anatomy list"
            "~SCT^123037004^Anatomical Structure~SCT^10200004^Liver~^^~") in tag
    assert ours["Segment5_Extent"] == "2 3 2 4 3 5"
    right_kidney = slicerio.segment_from_name(slicerio.read_segmentation(str(out)), "right kidney")
    assert right_kidney["terminology"]["typeModifier"] == ["SCT", "24028007", "Right"]


@pytest.mark.parametrize("grid", GRIDS, ids=GRID_IDS)
def test_nifti_labelmap_with_table(tmp_path, grid):
    import csv

    import nibabel as nib
    import SimpleITK as sitk

    card = load_card("btcv")
    labels = Volume(np.random.default_rng(2).integers(0, 14, size=(9, 10, 11)).astype(np.uint8), make_affine(*grid[1:]))
    out = tmp_path / "labels.nii.gz"
    written = write_segmentation(out, labels, card.labels)
    assert written == [out, tmp_path / "labels.csv"]
    img = nib.load(str(out))
    np.testing.assert_allclose(img.affine, labels.ijk_to_ras, rtol=0, atol=ATOL)
    np.testing.assert_array_equal(np.asarray(img.dataobj), labels.array)
    assert img.get_data_dtype() == np.uint8
    # ITK's NIfTI reader (Slicer's) agrees on the geometry.
    back = _itk_image_to_volume(sitk.ReadImage(str(out)), str(out))
    assert_same(labels, back)
    rows = list(csv.DictReader(open(tmp_path / "labels.csv")))
    assert [r["Name"] for r in rows] == [lab.name for lab in card.labels]
    assert rows[0]["Type_CodeValue"] == "78961009" and rows[0]["LabelValue"] == "1"


def test_kji_views_match_slicer_array_order():
    vol = grid_volume(*GRIDS[1][1:])
    kji = vol.kji()
    assert kji.shape == vol.shape[::-1]
    assert kji[3, 2, 1] == vol.array[1, 2, 3]
    again = Volume.from_kji(kji, vol.ijk_to_ras)
    np.testing.assert_array_equal(again.array, vol.array)


def test_lps_conversion_happens_once():
    vol = grid_volume(*GRIDS[5][1:])
    origin, spacing, direction = vol.itk_geometry()
    again = Volume.from_itk_geometry(vol.array, origin, spacing, direction)
    np.testing.assert_allclose(again.ijk_to_ras, vol.ijk_to_ras, atol=1e-12)
    np.testing.assert_allclose(vol.ijk_to_lps[:2], -vol.ijk_to_ras[:2], atol=1e-12)


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    from SwinUNETRSegmentLib.fileio import segnrrd as slicerio

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(slicerio, "write_segmentation", broken)  # the writer imageio calls
    labels = Volume(np.ones((4, 4, 4), np.uint8), np.eye(4))
    with pytest.raises(OSError):
        write_segmentation(tmp_path / "x.seg.nrrd", labels, load_card("btcv").labels)
    assert list(tmp_path.iterdir()) == []
