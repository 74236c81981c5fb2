"""What ITK, GDCM and MetaIO print on the process's stderr never comes before the CLI's
one-line error: a folder without DICOM, or a file ITK cannot read, gives exactly one
line and exit code 2 (run as a separate process: the C-level stderr is what a user sees)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from SwinUNETRSegmentLib.fileio.read import native_stderr_held

MAIN = "import sys; from SwinUNETRSegmentLib.cli import main; sys.exit(main())"


def _run_cli(tmp_path, source):
    weights = tmp_path / "weights.pt"
    weights.write_bytes(b"not read: the scan is read first")
    cmd = [sys.executable, "-c", MAIN, "-i", str(source), "-o", str(tmp_path / "out.seg.nrrd"),
           "--card", "btcv", "--checkpoint", str(weights), "--device", "cpu"]
    return subprocess.run(cmd, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=120,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})


def _empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    return tmp_path / "empty"


def _junk_folder(tmp_path):
    folder = tmp_path / "junk"
    folder.mkdir()
    (folder / "readme.txt").write_text("not a scan")
    (folder / "IM0001.dcm").write_bytes(os.urandom(4096))
    (folder / "IM0002").write_bytes(b"DICM" + os.urandom(600))
    return folder


def _metaimage_without_data(tmp_path):
    header = tmp_path / "scan.mhd"
    header.write_text("ObjectType = Image\nNDims = 3\nDimSize = 4 4 4\nElementType = MET_SHORT\n"
                      "ElementDataFile = missing.raw\n")
    return header


@pytest.mark.parametrize("make, message", [
    (_empty_folder, "no DICOM series found"),
    (_junk_folder, "no DICOM series found"),
    (_metaimage_without_data, "cannot read scan.mhd"),
], ids=["empty-folder", "non-dicom-junk", "metaimage-without-data"])
def test_unreadable_input_gives_exactly_one_line_on_stderr(tmp_path, make, message):
    proc = _run_cli(tmp_path, make(tmp_path))
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("swinunetr-segment: error: ") and message in lines[0], lines[0]
    assert not (tmp_path / "out.seg.nrrd").exists()


def test_native_stderr_is_shown_after_a_read_that_completes_and_dropped_after_one_that_fails(capfd):
    with native_stderr_held():
        os.write(2, b"native warning of a good read\n")
    assert capfd.readouterr().err == "native warning of a good read\n"
    with pytest.raises(RuntimeError), native_stderr_held():
        os.write(2, b"native noise before an error\n")
        raise RuntimeError("the read failed")
    assert capfd.readouterr().err == ""
    os.write(2, b"after\n")
    assert capfd.readouterr().err == "after\n"
