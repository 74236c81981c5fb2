"""The command line: real CT in, a Slicer segmentation on the same grid out; every bad
input gets one actionable line, exit code 2, no traceback and no output file."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import grid_volume, make_affine
from helpers import write_dicom_series, write_nifti

from SwinUNETRSegmentLib.cli import main
from SwinUNETRSegmentLib.fileio.read import read_volume
from SwinUNETRSegmentLib.geometry import Volume

CLI = str(Path(sys.executable).with_name("swinunetr-segment"))


@pytest.fixture()
def good_scan(tmp_path) -> Path:
    return write_nifti(grid_volume((6.0, 6.0, 6.0), np.eye(3), (0, 0, 0), shape=(12, 10, 8)), tmp_path / "scan.nii.gz")


def run_main(capsys, argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_user_error(rc, err, *fragments, outputs=()):
    assert rc == 2, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert lines[0].startswith("swinunetr-segment: error: ")
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    for o in outputs:
        assert not Path(o).exists(), f"{o} was written"
        assert not list(Path(o).parent.glob(f".{Path(o).name}*")), "temporary file left"


@pytest.fixture()
def model_args(tiny_card_file, tiny_checkpoint):
    return ["--card", tiny_card_file, "--checkpoint", tiny_checkpoint, "--device", "cpu"]


# ---------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------
def test_missing_input(capsys, tmp_path, model_args):
    out = tmp_path / "o.seg.nrrd"
    rc, _, err = run_main(capsys, ["-i", tmp_path / "nope.nii.gz", "-o", out, *model_args])
    assert_user_error(rc, err, "input not found", "nope.nii.gz", outputs=[out])


def test_folder_without_dicom(capsys, tmp_path, model_args):
    folder = tmp_path / "notdicom"
    folder.mkdir()
    (folder / "readme.txt").write_text("hello")
    out = tmp_path / "o.seg.nrrd"
    rc, _, err = run_main(capsys, ["-i", folder, "-o", out, *model_args])
    assert_user_error(rc, err, "no DICOM series", outputs=[out])


def test_folder_with_two_series_names_them(capsys, tmp_path, model_args):
    folder = tmp_path / "two"
    vol = grid_volume((1.0, 1.0, 2.0), np.eye(3), (0, 0, 0), shape=(8, 8, 4))
    write_dicom_series(vol, folder, series_uid="1.2.3.4.5.1", description="arterial")
    write_dicom_series(vol, folder, series_uid="1.2.3.4.5.2", description="venous")
    out = tmp_path / "o.seg.nrrd"
    rc, _, err = run_main(capsys, ["-i", folder, "-o", out, *model_args])
    assert_user_error(rc, err, "2 DICOM series", "1.2.3.4.5.1", "1.2.3.4.5.2", "--series", outputs=[out])


def test_two_series_choose_one(capsys, tmp_path):
    folder = tmp_path / "two"
    a = grid_volume((1.0, 1.0, 2.0), np.eye(3), (0, 0, 0), shape=(8, 8, 4), seed=1)
    b = grid_volume((1.0, 1.0, 2.0), np.eye(3), (0, 0, 0), shape=(8, 8, 4), seed=2)
    write_dicom_series(a, folder, series_uid="1.2.3.4.5.1")
    write_dicom_series(b, folder, series_uid="1.2.3.4.5.2")
    vol, _ = read_volume(folder, series_uid="1.2.3.4.5.2")
    np.testing.assert_array_equal(vol.array, b.array)


def test_series_in_a_subfolder_is_found(tmp_path):
    vol = grid_volume((0.8, 0.8, 3.0), np.eye(3), (1, 2, 3), shape=(8, 9, 5))
    write_dicom_series(vol, tmp_path / "export" / "PAT1" / "ST1" / "SE3", modality="MR")
    back, info = read_volume(tmp_path / "export")
    np.testing.assert_array_equal(back.array, vol.array)
    assert info.modality == "MR"


def test_progress_bar_only_on_a_terminal(monkeypatch):
    from SwinUNETRSegmentLib.cli.segment import progress_printer

    class Pipe:
        def isatty(self):
            return False

    monkeypatch.setattr(sys, "stderr", Pipe())
    callback, close = progress_printer(quiet=False)
    assert callback is None
    callback, close = progress_printer(quiet=True)
    assert callback is None


def _write_nifti_array(path, arr, affine=None):
    import nibabel as nib

    nib.save(nib.Nifti1Image(arr, np.eye(4) if affine is None else affine), str(path))
    return path


def test_2d_image(capsys, tmp_path, model_args):
    import SimpleITK as sitk

    out = tmp_path / "o.seg.nrrd"
    p = _write_nifti_array(tmp_path / "slice.nii.gz", np.zeros((32, 32), np.int16))
    rc, _, err = run_main(capsys, ["-i", p, "-o", out, *model_args])
    assert_user_error(rc, err, "2D image", outputs=[out])
    p = tmp_path / "slice.mha"
    sitk.WriteImage(sitk.Image(32, 32, sitk.sitkInt16), str(p))
    rc, _, err = run_main(capsys, ["-i", p, "-o", out, *model_args])
    assert_user_error(rc, err, "2D image", outputs=[out])
    p = _write_nifti_array(tmp_path / "one_slice.nii.gz", np.zeros((32, 32, 1), np.int16))
    rc, _, err = run_main(capsys, ["-i", p, "-o", out, *model_args])
    assert_user_error(rc, err, "2D image (one slice)", outputs=[out])


def test_4d_image(capsys, tmp_path, model_args):
    out = tmp_path / "o.seg.nrrd"
    p = _write_nifti_array(tmp_path / "fmri.nii.gz", np.zeros((8, 8, 8, 3), np.int16))
    rc, _, err = run_main(capsys, ["-i", p, "-o", out, *model_args])
    assert_user_error(rc, err, "4D image", "8 x 8 x 8 x 3", outputs=[out])


def test_rgb_image(capsys, tmp_path, model_args):
    import SimpleITK as sitk

    out = tmp_path / "o.seg.nrrd"
    rgb = np.zeros((6, 6, 6), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    p = _write_nifti_array(tmp_path / "rgb.nii.gz", rgb)
    rc, _, err = run_main(capsys, ["-i", p, "-o", out, *model_args])
    assert_user_error(rc, err, "multi-component", outputs=[out])
    p = tmp_path / "rgb.mha"
    sitk.WriteImage(sitk.Image([6, 6, 6], sitk.sitkVectorUInt8, 3), str(p))
    rc, _, err = run_main(capsys, ["-i", p, "-o", out, *model_args])
    assert_user_error(rc, err, "multi-component", outputs=[out])


def test_empty_and_one_voxel_images(capsys, tmp_path, model_args):
    import nrrd

    out = tmp_path / "o.seg.nrrd"
    p = _write_nifti_array(tmp_path / "one.nii.gz", np.zeros((1, 1, 1), np.int16))
    rc, _, err = run_main(capsys, ["-i", p, "-o", out, *model_args])
    assert_user_error(rc, err, "single voxel", outputs=[out])
    p = tmp_path / "empty.nrrd"
    nrrd.write(str(p), np.zeros((0, 4, 4), np.int16))
    rc, _, err = run_main(capsys, ["-i", p, "-o", out, *model_args])
    assert rc == 2 and "Traceback" not in err and not out.exists(), err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_or_inf_voxels(capsys, tmp_path, model_args, bad):
    arr = np.zeros((8, 8, 8), np.float32)
    arr[2, 3, 4] = bad
    arr[5, 5, 5] = bad
    p = _write_nifti_array(tmp_path / "nan.nii.gz", arr)
    out = tmp_path / "o.seg.nrrd"
    rc, _, err = run_main(capsys, ["-i", p, "-o", out, *model_args])
    assert_user_error(rc, err, "2 NaN or Inf voxels", outputs=[out])


def test_truncated_nifti(capsys, tmp_path, model_args, good_scan):
    data = good_scan.read_bytes()
    p = tmp_path / "cut.nii.gz"
    p.write_bytes(data[: len(data) // 2])
    out = tmp_path / "o.seg.nrrd"
    rc, _, err = run_main(capsys, ["-i", p, "-o", out, *model_args])
    assert_user_error(rc, err, "cut.nii.gz", "truncated or corrupt", outputs=[out])


def test_unsupported_file_type(capsys, tmp_path, model_args):
    p = tmp_path / "scan.jpg"
    p.write_bytes(b"\xff\xd8\xff")
    out = tmp_path / "o.seg.nrrd"
    rc, _, err = run_main(capsys, ["-i", p, "-o", out, *model_args])
    assert_user_error(rc, err, "unsupported file type", outputs=[out])


def test_unknown_model_lists_known(capsys, tmp_path, good_scan):
    out = tmp_path / "o.seg.nrrd"
    rc, _, err = run_main(capsys, ["-i", good_scan, "-o", out, "--model", "totally-unknown"])
    assert_user_error(rc, err, "unknown model 'totally-unknown'", "known models:", "btcv", outputs=[out])


def test_model_without_weights_says_how_to_get_them(capsys, tmp_path, good_scan, monkeypatch):
    monkeypatch.setenv("SWINUNETR_SEGMENT_HOME", str(tmp_path / "home"))
    out = tmp_path / "o.seg.nrrd"
    rc, _, err = run_main(capsys, ["-i", good_scan, "-o", out, "--model", "btcv"])
    assert_user_error(rc, err, "weights of model 'btcv' are not on this machine", "--checkpoint", outputs=[out])


def test_checkpoint_that_does_not_fit_the_card(capsys, tmp_path, good_scan, tiny_checkpoint):
    out = tmp_path / "o.seg.nrrd"
    rc, _, err = run_main(capsys, ["-i", good_scan, "-o", out, "--card", "btcv", "--checkpoint", tiny_checkpoint,
                                   "--device", "cpu"])
    assert_user_error(rc, err, "does not fit model card 'btcv'", outputs=[out])


def test_card_without_checkpoint(capsys, tmp_path, good_scan):
    out = tmp_path / "o.seg.nrrd"
    rc, _, err = run_main(capsys, ["-i", good_scan, "-o", out, "--card", "btcv"])
    assert_user_error(rc, err, "needs --checkpoint", outputs=[out])


def test_output_in_missing_folder(capsys, tmp_path, good_scan, model_args):
    out = tmp_path / "nowhere" / "o.seg.nrrd"
    rc, _, err = run_main(capsys, ["-i", good_scan, "-o", out, *model_args])
    assert_user_error(rc, err, "output folder does not exist", outputs=[out])


def test_output_in_read_only_folder(capsys, tmp_path, good_scan, model_args):
    folder = tmp_path / "ro"
    folder.mkdir()
    if os.geteuid() == 0:
        # chmod does not stop root; the immutable attribute does.
        if shutil.which("chattr") is None \
                or subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode != 0:
            pytest.skip("running as root where chattr +i is unavailable: cannot make a read-only folder")
        undo = ["chattr", "-i", str(folder)]
    else:
        folder.chmod(0o555)
        undo = None
    try:
        out = folder / "o.seg.nrrd"
        rc, _, err = run_main(capsys, ["-i", good_scan, "-o", out, *model_args])
        assert_user_error(rc, err, "cannot write to folder", outputs=[out])
        assert list(folder.iterdir()) == []
    finally:
        if undo:
            subprocess.run(undo, check=True)
        else:
            folder.chmod(0o755)


def test_existing_output_needs_overwrite(capsys, tmp_path, good_scan, model_args, fake_segmenter):
    out = tmp_path / "o.seg.nrrd"
    out.write_text("a clinician's earlier result")
    rc, _, err = run_main(capsys, ["-i", good_scan, "-o", out, *model_args])
    assert_user_error(rc, err, "already exists", "--overwrite")
    assert out.read_text() == "a clinician's earlier result"
    # The colour table beside a NIfTI output is protected the same way.
    (tmp_path / "l.csv").write_text("keep me")
    rc, _, err = run_main(capsys, ["-i", good_scan, "-o", tmp_path / "l.nii.gz", *model_args])
    assert_user_error(rc, err, "l.csv already exists")
    fake_segmenter()
    rc, _, err = run_main(capsys, ["-i", good_scan, "-o", out, "--overwrite", "-q", *model_args])
    assert rc == 0, err
    assert out.read_bytes().startswith(b"NRRD")


def test_bad_output_type_and_options(capsys, tmp_path, good_scan, model_args):
    rc, _, err = run_main(capsys, ["-i", good_scan, "-o", tmp_path / "o.png", *model_args])
    assert_user_error(rc, err, ".seg.nrrd")
    rc, _, err = run_main(capsys, ["-i", good_scan, "-o", tmp_path / "o.seg.nrrd", "--overlap", "1.2", *model_args])
    assert_user_error(rc, err, "--overlap")
    rc, _, err = run_main(capsys, ["-i", good_scan])
    assert_user_error(rc, err, "-o/--output")
    rc, _, err = run_main(capsys, ["-i", good_scan, "-o", tmp_path / "o.seg.nrrd", "--device", "cuda:7",
                                   "--card", "btcv",
                                   "--checkpoint", model_args[3]])
    if rc != 0:
        assert_user_error(rc, err, "cuda:7")


# ---------------------------------------------------------------------------------------
# working runs
# ---------------------------------------------------------------------------------------
def test_synthetic_oblique_scan_all_outputs(capsys, tmp_path, model_args):
    """Every output lands on the input grid; the preview is a picture."""
    from PIL import Image

    spacing, direction, origin = (5.0, 4.0, 7.0), np.array([[0.0, 1, 0], [-1, 0, 0], [0, 0, 1]]), (10, -20, 30)
    arr = np.full((30, 26, 14), -1000, np.int16)
    arr[5:25, 4:20, 3:11] = 60
    vol = Volume(arr, make_affine(spacing, direction, origin))
    scan = write_nifti(vol, tmp_path / "scan.nii.gz")
    outs = [tmp_path / "r.seg.nrrd", tmp_path / "r.nii.gz"]
    png = tmp_path / "r.png"
    rc, out, err = run_main(capsys, ["-i", scan, "-o", outs[0], "-o", outs[1], "--preview", png, *model_args])
    assert rc == 0, err
    assert out.split() == [str(outs[0]), str(outs[1]), str(tmp_path / "r.csv"), str(png)]
    for o in outs:
        back, _ = read_volume(o)
        assert back.shape == vol.shape
        np.testing.assert_allclose(back.ijk_to_ras, vol.ijk_to_ras, atol=1e-5)
    with Image.open(png) as im:
        assert im.format == "PNG" and im.width > 100 and im.height > 100


@pytest.mark.slow
def test_precision_float32_gives_the_same_labels_as_the_engine_in_float32(capsys, tmp_path, model_args):
    """--precision float32 is the reference-exact setting: the CLI's label map equals the
    engine's float32 answer voxel for voxel; a precision it does not know is refused."""
    from SwinUNETRSegmentLib.inference.engine import Segmenter
    from SwinUNETRSegmentLib.inference.options import FastPath
    from SwinUNETRSegmentLib.models.cards import load_card

    arr = np.full((40, 36, 20), -1000, np.int16)
    arr[6:34, 5:30, 3:17] = 60
    arr[12:22, 10:20, 6:12] = 200
    vol = Volume(arr, make_affine((4.0, 4.0, 6.0)))
    scan = write_nifti(vol, tmp_path / "scan.nii.gz")
    out = tmp_path / "f32.nii.gz"
    rc, _, err = run_main(capsys, ["-i", scan, "-o", out, "--precision", "float32", *model_args])
    assert rc == 0, err
    back, _ = read_volume(out)
    card = load_card(model_args[1])
    direct = Segmenter(card, model_args[3], device="cpu", fast=FastPath(precision="float32")).segment(vol)
    np.testing.assert_array_equal(back.array, direct.labels.array)
    rc, _, err = run_main(capsys, ["-i", scan, "-o", tmp_path / "x.nii.gz", "--precision", "float8", *model_args])
    assert rc == 2 and "--precision" in err and "float32" in err and "Traceback" not in err


@pytest.mark.slow
@pytest.mark.network
def test_real_ct_nifti_end_to_end(tmp_path, reference_files, tiny_card_file, tiny_checkpoint):
    """The console script on the real example CT: output grid == input grid, Slicer names and colours."""
    import nibabel as nib

    from SwinUNETRSegmentLib.fileio import segnrrd as slicerio
    from SwinUNETRSegmentLib.models.cards import card_from_dict

    ct = reference_files / "example_ct.nii.gz"
    out, png = tmp_path / "ct.seg.nrrd", tmp_path / "ct.png"
    proc = subprocess.run([CLI, "-i", ct, "-o", out, "--preview", png, "--card", tiny_card_file,
                           "--checkpoint", tiny_checkpoint, "--device", "cpu"],
                          capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [str(out), str(png)]
    seg = slicerio.read_segmentation(str(out))
    ref = nib.load(str(ct))
    assert seg["voxels"].shape == ref.shape
    ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ np.asarray(seg["ijkToLPS"])
    np.testing.assert_allclose(ras, ref.affine, rtol=0, atol=1e-5)
    card = card_from_dict(__import__("json").loads(tiny_card_file.read_text()))
    assert [s["name"] for s in seg["segments"]] == [lab.name for lab in card.labels]
    for s, lab in zip(seg["segments"], card.labels):
        np.testing.assert_allclose(s["color"], np.array(lab.color) / 255, atol=1e-5)
    assert png.stat().st_size > 1000


@pytest.mark.slow
@pytest.mark.network
def test_real_ct_dicom_jpeg2000_end_to_end(tmp_path, reference_files, tiny_card_file, tiny_checkpoint):
    """The real JPEG 2000 DICOM series (blank UIDs): output on the series' own grid."""
    import SimpleITK as sitk

    from SwinUNETRSegmentLib.fileio import segnrrd as slicerio

    folder = reference_files / "example_ct_dicom"
    out = tmp_path / "dcm.seg.nrrd"
    nii = tmp_path / "dcm.nii.gz"
    proc = subprocess.run([CLI, "-i", folder, "-o", out, "-o", nii, "--card", tiny_card_file,
                           "--checkpoint", tiny_checkpoint, "--device", "cpu"],
                          capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=600)
    assert proc.returncode == 0, proc.stderr
    r = sitk.ImageSeriesReader()
    r.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder)))
    img = r.Execute()
    assert img.GetSize() == (512, 512, 20)
    seg = slicerio.read_segmentation(str(out))
    assert seg["voxels"].shape == img.GetSize()
    lps = np.asarray(seg["ijkToLPS"])
    np.testing.assert_allclose(lps[:3, 3], img.GetOrigin(), atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(lps[:3, :3], axis=0), img.GetSpacing(), atol=1e-5)
    # The NIfTI written beside it agrees with TotalSegmentator's own label map of this series
    # (written by another tool, with its rows in the other order) on every physical point.
    import nibabel as nib
    from helpers import physical_match

    ours, _ = read_volume(nii)
    theirs = nib.load(str(reference_files / "example_seg_dicom.nii.gz"))
    grid_of_theirs = Volume(np.zeros(theirs.shape, np.uint8), theirs.affine)
    assert physical_match(ours.with_array(np.zeros(ours.shape, np.uint8)), grid_of_theirs)


@pytest.mark.slow
def test_folder_of_scans_to_a_folder(capsys, tmp_path, model_args):
    """Batch mode: every scan of a folder (files and DICOM series folders), one model load,
    a bad scan reported and skipped, exit code 2 at the end."""
    scans, out = tmp_path / "scans", tmp_path / "results"
    scans.mkdir()
    out.mkdir()
    a = grid_volume((6.0, 6.0, 6.0), np.eye(3), (0, 0, 0), shape=(12, 10, 8), seed=1)
    b = grid_volume((5.0, 6.0, 7.0), np.diag([-1.0, 1.0, 1.0]), (9, 8, 7), shape=(10, 12, 9), seed=2)
    write_nifti(a, scans / "a.nii.gz")
    write_dicom_series(b, scans / "b_series")
    _write_nifti_array(scans / "flat.nii.gz", np.zeros((8, 8), np.int16))
    (scans / "notes.txt").write_text("not a scan")
    rc, stdout, err = run_main(capsys, ["-i", scans, "-o", out, "-q", *model_args])
    assert rc == 2
    assert "flat.nii.gz" in err and "2D image" in err and "1 of 3 scans failed" in err and "Traceback" not in err
    assert sorted(p.name for p in out.iterdir()) == ["a.seg.nrrd", "b_series.seg.nrrd"]
    for name, src in (("a", scans / "a.nii.gz"), ("b_series", scans / "b_series")):
        back, _ = read_volume(out / f"{name}.seg.nrrd")
        assert back.same_grid(read_volume(src)[0])


# ---------------------------------------------------------------------------------------
# Ctrl-C: the line says what had been written
# ---------------------------------------------------------------------------------------
class _Result:
    def __init__(self, labels, card):
        self.labels, self.card, self.device, self.timings = labels, card, "cpu", {"total": 0.0}

    def present_labels(self):
        return sorted(int(v) for v in np.unique(self.labels.array) if v)


class _FakeSegmenter:
    """Stands in for the network (labels a box); Ctrl-C arrives during call ``interrupt_on``."""

    def __init__(self, card, interrupt_on=None):
        self.card, self.interrupt_on, self.calls = card, interrupt_on, 0

    def segment(self, volume, progress=None, cancel=None):
        self.calls += 1
        if self.calls == self.interrupt_on:
            raise KeyboardInterrupt
        lab = np.zeros(volume.shape, np.uint8)
        lab[1:4, 1:4, 1:4] = 1
        return _Result(volume.with_array(lab), self.card)


@pytest.fixture()
def fake_segmenter(monkeypatch):
    from SwinUNETRSegmentLib.cli import segment

    made = {}

    def install(interrupt_on=None):
        def make(args, card, weights):
            made["segmenter"] = _FakeSegmenter(card, interrupt_on)
            return made["segmenter"]

        monkeypatch.setattr(segment, "_segmenter", make)
        return made

    return install


def _no_temporary_files(folder: Path) -> bool:
    return not [p for p in folder.rglob("*") if ".part" in p.name or p.name.startswith(".swinunetr")]


def test_cancel_between_outputs_names_the_output_already_written(capsys, tmp_path, good_scan, model_args,
                                                                 fake_segmenter, monkeypatch):
    from SwinUNETRSegmentLib.cli import segment

    fake_segmenter()
    calls = []
    real = segment.write_segmentation

    def write_then_interrupt(path, labels, table):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(path, labels, table)

    monkeypatch.setattr(segment, "write_segmentation", write_then_interrupt)
    first, second, png = tmp_path / "a.seg.nrrd", tmp_path / "b.nii.gz", tmp_path / "p.png"
    rc, out, err = run_main(capsys, ["-i", good_scan, "-o", first, "-o", second, "--preview", png, "-q", *model_args])
    assert rc == 130 and out == ""
    assert err.splitlines() == [f"swinunetr-segment: cancelled; written before the cancel: {first}; "
                                "nothing else was written"]
    assert first.is_file() and not second.exists() and not (tmp_path / "b.csv").exists() and not png.exists()
    assert _no_temporary_files(tmp_path)


def test_cancel_before_any_output_says_nothing_was_written(capsys, tmp_path, good_scan, model_args, fake_segmenter):
    fake_segmenter(interrupt_on=1)
    out = tmp_path / "a.seg.nrrd"
    rc, _, err = run_main(capsys, ["-i", good_scan, "-o", out, "-q", *model_args])
    assert rc == 130
    assert err.splitlines() == ["swinunetr-segment: cancelled; nothing was written"]
    assert not out.exists() and _no_temporary_files(tmp_path)


def test_cancel_in_a_batch_names_the_scans_already_written(capsys, tmp_path, model_args, fake_segmenter):
    scans, results = tmp_path / "scans", tmp_path / "results"
    scans.mkdir()
    results.mkdir()
    for n, name in enumerate(("a", "b", "c")):
        scan = grid_volume((6.0, 6.0, 6.0), np.eye(3), (0, 0, 0), shape=(8, 7, 6), seed=n)
        write_nifti(scan, scans / f"{name}.nii.gz")
    made = fake_segmenter(interrupt_on=3)
    rc, out, err = run_main(capsys, ["-i", scans, "-o", results, "--preview", "x.png", "-q", *model_args])
    assert rc == 130 and out == "" and made["segmenter"].calls == 3
    done = [results / "a.seg.nrrd", results / "a.png", results / "b.seg.nrrd", results / "b.png"]
    names = ", ".join(map(str, done))
    assert err.splitlines() == [f"swinunetr-segment: cancelled; written before the cancel: {names}; "
                                "nothing else was written"]
    assert sorted(results.iterdir()) == sorted(done)
    assert _no_temporary_files(results)


def test_cancelled_message_names_at_most_ten_files():
    from SwinUNETRSegmentLib.cli.app import cancelled_message

    files = [Path(f"/out/{n}.seg.nrrd") for n in range(12)]
    message = cancelled_message(files)
    assert message.startswith("cancelled; written before the cancel: /out/0.seg.nrrd, ")
    assert "/out/9.seg.nrrd and 2 more; nothing else was written" in message and "/out/10.seg.nrrd" not in message
    assert cancelled_message([]) == "cancelled; nothing was written"
    assert cancelled_message(None) == "cancelled"
