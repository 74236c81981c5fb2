"""Enhanced multi-frame DICOM in, DICOM SEG out, and DICOM SEG as training labels.

A multi-frame image (every slice a frame of one file) is made from a single-frame series by
highdicom's legacy converter: a Legacy Converted Enhanced CT (shared orientation, a rescale
intercept, frames in shuffled order; once more RLE-compressed) and an Enhanced MR
(orientation per frame, frames in reverse slice order), all oblique and anisotropic. The
multi-frame file must read back as the single-frame series does, voxel for voxel on the same
grid; the command line segments it with the tiny test model into a SEG (BINARY, LABELMAP for
the MR) that dciodvfy accepts, that references the source frame each SEG frame lies on, and
whose labels are the engine's; inconsistent frames are one line and exit code 2. Last, a
SEG the command line wrote trains a model end to end.
"""

from __future__ import annotations

import json

import numpy as np
import pydicom
import pytest
from conftest import GRIDS, grid_volume, tiny_card
from helpers import physical_match, write_dicom_series
from test_dicom_support import dciodvfy_errors

from SwinUNETRSegmentLib.cli import main
from SwinUNETRSegmentLib.errors import UserError
from SwinUNETRSegmentLib.fileio.dicomseg import read_dicom_seg_labels, seg_references
from SwinUNETRSegmentLib.fileio.read import read_volume
from SwinUNETRSegmentLib.geometry import Volume
from SwinUNETRSegmentLib.training.labels import read_label

STUDY = "1.2.826.0.1.3680043.2.1125.15.0"
SERIES = "1.2.826.0.1.3680043.2.1125.15.1"
MULTIFRAME_SERIES = "1.2.826.0.1.3680043.2.1125.15.2"
FRAME_OF_REFERENCE = "1.2.826.0.1.3680043.2.1125.15.3"
MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"
ENHANCED_MR = "1.2.840.10008.5.1.4.1.1.4.1"
GRID = {g[0]: g[1:] for g in GRIDS}
KINDS = ["ct-legacy-converted", "ct-rle", "mr-enhanced"]
RLE_LOSSLESS = "1.2.840.10008.1.2.5"


def _files(folder):
    return sorted(folder.glob("*.dcm"))


def make_series(tmp_path, kind: str, shape=(26, 22, 14)):
    """(truth volume, single-frame series folder): oblique, anisotropic; the CT stored with a
    rescale intercept of -1024 (the values read back are the truth's)."""
    spacing, direction, origin = GRID["oblique" if kind.startswith("ct") else "oblique-flipped"]
    vol = grid_volume(spacing, direction, origin, shape=shape, seed=15)
    folder = write_dicom_series(vol, tmp_path / f"{kind}-series", series_uid=SERIES, modality=kind[:2].upper())
    for f in _files(folder):
        ds = pydicom.dcmread(f)
        ds.StudyInstanceUID, ds.FrameOfReferenceUID = STUDY, FRAME_OF_REFERENCE
        ds.PatientID, ds.PatientName, ds.SeriesNumber = "MF15", "Multi^Frame", 7
        if kind.startswith("ct"):
            ds.RescaleSlope, ds.RescaleIntercept = "1", "-1024"
            ds.PixelData = (ds.pixel_array.astype(np.int32) + 1024).astype(np.int16).tobytes()
        else:
            ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = MR_IMAGE
        ds.save_as(f)
    return vol, folder


def make_multiframe(series_folder, folder, kind: str):
    """One multi-frame file of the series (see the module docstring), alone in ``folder``."""
    import highdicom as hd

    singles = [pydicom.dcmread(f) for f in _files(series_folder)]
    along = [float(np.asarray(ds.ImagePositionPatient, float) @ np.cross(*np.reshape(
        np.asarray(ds.ImageOrientationPatient, float), (2, 3)))) for ds in singles]
    singles = [singles[i] for i in np.argsort(along)]
    if kind.startswith("ct"):
        singles = [singles[i] for i in np.random.default_rng(1).permutation(len(singles))]
        cls = hd.legacy.LegacyConvertedEnhancedCTImage
    else:
        singles = singles[::-1]
        cls = hd.legacy.LegacyConvertedEnhancedMRImage
    mf = cls(singles, series_instance_uid=MULTIFRAME_SERIES, series_number=8,
             sop_instance_uid=MULTIFRAME_SERIES + ".1", instance_number=1, include_dimension_index=False,
             transfer_syntax_uid=RLE_LOSSLESS if kind == "ct-rle" else None)
    if not kind.startswith("ct"):  # an Enhanced MR that names the orientation in every frame
        shared = mf.SharedFunctionalGroupsSequence[0]
        for item in mf.PerFrameFunctionalGroupsSequence:
            item.PlaneOrientationSequence = shared.PlaneOrientationSequence
        del shared.PlaneOrientationSequence
        mf.SOPClassUID = mf.file_meta.MediaStorageSOPClassUID = ENHANCED_MR
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "multiframe.dcm"
    mf.save_as(path)
    return path


@pytest.fixture(params=KINDS)
def multiframe(request, tmp_path):
    """(kind, truth volume, single-frame series folder, multi-frame file)."""
    vol, series = make_series(tmp_path, request.param)
    return request.param, vol, series, make_multiframe(series, tmp_path / f"{request.param}-mf", request.param)


def _run(capsys, argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def _frame_positions(path):
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return ds, np.array([[float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient]
                         for item in ds.PerFrameFunctionalGroupsSequence])


def test_multiframe_reads_as_its_single_frame_series(multiframe):
    """Voxel for voxel and the same ijk_to_ras as the series; every frame's own position lies on
    a k-plane of the grid; the truth's voxels at the truth's places; highdicom's own geometry of
    the file spans the same grid."""
    import highdicom as hd

    kind, truth, series_folder, path = multiframe
    series, _ = read_volume(series_folder)
    vol, info = read_volume(path.parent)
    assert vol.shape == series.shape and np.allclose(vol.ijk_to_ras, series.ijk_to_ras, atol=1e-4)
    assert np.array_equal(vol.array, series.array) and physical_match(vol, truth)
    assert info.modality == kind[:2].upper() and info.extra["frames"] == truth.shape[2]
    assert len(info.dicom) == 1 and info.dicom[0].SOPInstanceUID == MULTIFRAME_SERIES + ".1"
    _ds, positions = _frame_positions(path)
    ijk = (np.linalg.inv(vol.ijk_to_lps) @ np.c_[positions, np.ones(len(positions))].T)[:3].T
    assert np.allclose(ijk[:, :2], 0, atol=1e-4)  # each frame's first voxel is (0, 0, k)
    assert sorted(np.round(ijk[:, 2]).astype(int).tolist()) == list(range(vol.shape[2]))
    assert np.allclose(ijk[:, 2], np.round(ijk[:, 2]), atol=1e-4)
    geometry = hd.imread(str(path)).get_volume_geometry()
    corners = np.array([[i, j, k, 1] for i in (0, 1) for j in (0, 1) for k in (0, 1)], float)

    def box(affine, shape):  # the 8 corner voxel centres, LPS
        return (corners * np.r_[np.asarray(shape) - 1, 1]) @ np.asarray(affine).T

    theirs, ours = box(geometry.affine, geometry.spatial_shape), box(vol.ijk_to_lps, vol.shape)
    assert sorted(geometry.spatial_shape) == sorted(vol.shape)
    assert np.linalg.norm(theirs[:, None, :3] - ours[None, :, :3], axis=2).min(axis=1).max() < 1e-3


def test_command_line_seg_of_a_multiframe_image(multiframe, capsys, tmp_path, tiny_card_file, tiny_checkpoint):
    """The tiny model segments the multi-frame image; its SEG passes dciodvfy, reads back in
    highdicom, holds the engine's labels on the source grid, and each SEG frame references the
    source frame it lies on."""
    import highdicom as hd
    import nibabel as nib

    _kind, _truth, _series, path = multiframe
    out, nii = tmp_path / "mf-seg.dcm", tmp_path / "mf.nii.gz"
    kind = "labelmap" if _kind.startswith("mr") else "binary"
    rc, _, err = _run(capsys, ["-i", path.parent, "-o", out, "-o", nii, "--card", tiny_card_file,
                               "--checkpoint", tiny_checkpoint, "--device", "cpu", "--backend", "torch", "-q",
                               "--dicom-seg-type", kind])
    assert rc == 0, err
    source, _ = read_volume(path.parent)
    img = nib.load(nii)
    engine = Volume(np.asarray(img.dataobj), img.affine)
    assert engine.same_grid(source, atol=1e-4) and engine.array.any()
    assert dciodvfy_errors(out) == []
    seg = hd.seg.segread(str(out))
    assert seg.segmentation_type.value == kind.upper()
    card = tiny_card()
    assert np.array_equal(read_dicom_seg_labels(out, card, source), engine.array)
    assert np.array_equal(read_label(out, card, source), engine.array)  # as a training label too
    src, positions = _frame_positions(path)
    assert seg_references(seg)[0] == {MULTIFRAME_SERIES}
    refs = seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence
    assert [(r.ReferencedSOPClassUID, r.ReferencedSOPInstanceUID) for r in refs] == [
        (src.SOPClassUID, src.SOPInstanceUID)]
    assert seg.FrameOfReferenceUID == FRAME_OF_REFERENCE and seg.StudyInstanceUID == STUDY
    for frame in seg.PerFrameFunctionalGroupsSequence:
        where = np.array([float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient])
        ref = frame.DerivationImageSequence[0].SourceImageSequence[0]
        assert ref.ReferencedSOPInstanceUID == src.SOPInstanceUID
        assert np.allclose(positions[int(ref.ReferencedFrameNumber) - 1], where, atol=1e-3)


def test_a_multiframe_file_is_an_input_of_its_own(multiframe, capsys, tmp_path, tiny_card_file, tiny_checkpoint):
    """``-i file.dcm``: the one file reads as its folder does and gets its own SEG; a single
    slice or a SEG given as a file says what to give instead, in one line, exit 2."""
    _kind, _truth, series_folder, path = multiframe
    from_file, info = read_volume(path)
    from_folder, _ = read_volume(path.parent)
    assert np.array_equal(from_file.array, from_folder.array)
    assert np.allclose(from_file.ijk_to_ras, from_folder.ijk_to_ras, atol=1e-6)
    assert info.extra["frames"] == from_file.shape[2] and len(info.dicom) == 1
    out = tmp_path / "from-file.dcm"
    rc, _, err = _run(capsys, ["-i", path, "-o", out, "--card", tiny_card_file, "--checkpoint", tiny_checkpoint,
                               "--device", "cpu", "--backend", "torch", "-q"])
    assert rc == 0, err
    assert dciodvfy_errors(out) == []
    assert np.array_equal(read_dicom_seg_labels(out, tiny_card(), from_file), read_label(out, tiny_card(), from_file))
    for wrong, says in ((_files(series_folder)[0], "single DICOM slice; give the folder"), (out, "")):
        rc, _, err = _run(capsys, ["-i", wrong, "-o", tmp_path / f"x-{wrong.stem}.nii.gz", "--card", tiny_card_file,
                                   "--checkpoint", tiny_checkpoint, "--device", "cpu", "-q"])
        assert rc == 2 and len(err.strip().splitlines()) == 1 and says in err, err
        assert "Traceback" not in err and not (tmp_path / f"x-{wrong.stem}.nii.gz").exists()


def _edit(path, change) -> None:
    ds = pydicom.dcmread(path)
    change(ds)
    ds.save_as(path)


def _two_orientations(ds):
    shared = ds.SharedFunctionalGroupsSequence[0]
    for n, item in enumerate(ds.PerFrameFunctionalGroupsSequence):
        item.PlaneOrientationSequence = pydicom.Sequence([pydicom.Dataset()])
        item.PlaneOrientationSequence[0].ImageOrientationPatient = (
            [1, 0, 0, 0, 0, -1] if n < 3 else list(shared.PlaneOrientationSequence[0].ImageOrientationPatient))
    del shared.PlaneOrientationSequence


def _one_position(ds):
    frames = ds.PerFrameFunctionalGroupsSequence
    frames[1].PlanePositionSequence = frames[0].PlanePositionSequence


def _gap(ds):
    """The frames past the middle of the stack one step further on: one frame missing."""
    normal = np.cross(*np.reshape(np.asarray(
        ds.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0].ImageOrientationPatient, float), (2, 3)))
    items = [item.PlanePositionSequence[0] for item in ds.PerFrameFunctionalGroupsSequence]
    along = np.array([np.asarray(item.ImagePositionPatient, float) @ normal for item in items])
    step = float(np.median(np.diff(np.sort(along))))
    for item, a in zip(items, along):
        if a > np.median(along):
            moved = np.asarray(item.ImagePositionPatient, float) + step * normal
            item.ImagePositionPatient = [f"{v:.6f}" for v in moved]


def _no_positions(ds):
    for item in ds.PerFrameFunctionalGroupsSequence:
        del item.PlanePositionSequence


INCONSISTENT = {  # what is done to the CT multi-frame file, what the line says
    "two-orientations": (_two_orientations, "holds frames in 2 orientations (11 + 3 frames"),
    "two-at-one-position": (_one_position, "2 frames of the multi-frame DICOM image multiframe.dcm in"),
    "missing-frame": (_gap, "is missing 1 frame (a gap of 4.60 mm after frame 7 of 14,"),
    "no-positions": (_no_positions, "frame 1 of the multi-frame DICOM image multiframe.dcm in"),
}


@pytest.mark.parametrize("case", list(INCONSISTENT))
def test_inconsistent_frames_are_one_line_and_exit_2(case, capsys, tmp_path):
    _vol, series = make_series(tmp_path, "ct")
    path = make_multiframe(series, tmp_path / "mf", "ct")
    change, says = INCONSISTENT[case]
    _edit(path, change)
    with pytest.raises(UserError, match="multi-frame DICOM image"):
        read_volume(path.parent)
    out = tmp_path / "r.dcm"
    rc, _, err = _run(capsys, ["-i", path.parent, "-o", out, "--model", "demo"])
    assert rc == 2 and len(err.strip().splitlines()) == 1 and says in err, err
    assert not out.exists()


def test_multiframe_mixed_with_single_frames_is_one_line(tmp_path):
    _vol, series = make_series(tmp_path, "ct")
    path = make_multiframe(series, tmp_path / "mf", "ct")
    single = pydicom.dcmread(_files(series)[0])
    single.SeriesInstanceUID = MULTIFRAME_SERIES  # the same series as the multi-frame file
    single.save_as(path.parent / "single.dcm")
    with pytest.raises(UserError, match="mixes 1 multi-frame image with 1 other instance; put each multi-frame file"):
        read_volume(path.parent)


# ---------------------------------------------------------------------------------------
# a DICOM SEG as a training label, end to end
# ---------------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_seg_the_command_line_wrote_trains_a_model(capsys, tmp_path, tiny_card_file, tiny_checkpoint):
    """Segment a series with the tiny model into a SEG and a label map, train one step on the
    SEG through a datalist; the labels training reads from the SEG are the label map."""
    import nibabel as nib

    from SwinUNETRSegmentLib.training.supervised import LoadPaird

    _vol, series = make_series(tmp_path, "ct", shape=(30, 26, 16))
    seg, nii = tmp_path / "labels.dcm", tmp_path / "labels.nii.gz"
    rc, _, err = _run(capsys, ["-i", series, "-o", seg, "-o", nii, "--card", tiny_card_file,
                               "--checkpoint", tiny_checkpoint, "--device", "cpu", "--backend", "torch", "-q"])
    assert rc == 0, err
    made = np.asarray(nib.load(nii).dataobj)
    assert len(np.unique(made)) > 1
    image, _ = read_volume(series)
    card = tiny_card()
    assert np.array_equal(read_label(seg, card, image), made)
    pair = LoadPaird(card)({"image": str(series), "label": str(seg)})
    assert np.array_equal(np.asarray(pair["label"][0]), made)

    (tmp_path / "data.json").write_text(json.dumps({"training": [{"image": series.name, "label": seg.name}]}))
    run = tmp_path / "run"
    rc, _, err = _run(capsys, ["train", "--data", tmp_path / "data.json", "--card", tiny_card_file, "--out", run,
                               "--epochs", "1", "--steps-per-epoch", "1", "--crop", "64", "64", "64",
                               "--num-samples", "1", "--device", "cpu", "--name", "tiny-from-seg"])
    assert rc == 0, err
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in log] == [1] and np.isfinite(log[0]["loss"])
    trained = json.loads((run / "card.json").read_text())
    assert trained["name"] == "tiny-from-seg" and trained["training"]["data"][0]["label"] == seg.name
    assert (run / "best.pt").is_file()
