"""DICOMweb against a real Orthanc (Debian's orphanc + orthanc-dicomweb, started here).

Orthanc runs in a network namespace of its own (only its loopback, nothing else can reach
it), with a throw-away storage folder and configuration; a small relay in this file is the
only way in, listening on 127.0.0.1. A second relay port cuts every answer after 1 MB: a
server that goes away in the middle of a download. Skipped with the reason when Orthanc is
not installed (``.ci/run`` installs it as root) or the namespace cannot be made.

The relay is ``python test_dicom_support.py serve CONFIG PORTFILE ORTHANC INNER_PORT CUT``.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ORTHANC = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
INNER_PORT = 8042  # inside the namespace: nothing else is there
CUT_AFTER = 1_000_000
USER, PASSWORD = "alice", "wonderland-7"
STUDY = "1.2.826.0.1.3680043.10.1234.1"
REAL_SERIES = STUDY + ".1"
SMALL_SERIES = STUDY + ".2"


# ---------------------------------------------------------------------------------------
# the server fixture
# ---------------------------------------------------------------------------------------
def _config(folder: Path) -> Path:
    (folder / "db").mkdir()
    config = {
        "Name": "swinunetr-test", "StorageDirectory": str(folder / "db"), "IndexDirectory": str(folder / "db"),
        "HttpPort": INNER_PORT, "DicomServerEnabled": False, "RemoteAccessAllowed": True,
        "AuthenticationEnabled": True, "RegisteredUsers": {USER: PASSWORD}, "Plugins": [PLUGIN],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": False, "Ssl": False,
                     "StudiesMetadata": "Full", "SeriesMetadata": "Full"},
        "HttpCompressionEnabled": False, "SaveJobs": False, "StableAge": 1,
    }
    path = folder / "orthanc.json"
    path.write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    """(url, url of the relay that cuts answers): a fresh Orthanc with DICOMweb, authentication on."""
    import requests

    if not (Path(ORTHANC).exists() and Path(PLUGIN).exists()):
        pytest.skip("Orthanc with its DICOMweb plugin is not installed (apt-get install orthanc orthanc-dicomweb)")
    folder = tmp_path_factory.mktemp("orthanc")
    config = _config(folder)
    port_file = folder / "ports"
    support = Path(__file__).with_name("test_dicom_support.py")
    relay = subprocess.Popen([sys.executable, str(support), "serve", str(config), str(port_file), ORTHANC,
                              str(INNER_PORT), str(CUT_AFTER)],
                             stdin=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        for _ in range(300):
            if port_file.exists() or relay.poll() is not None:
                break
            time.sleep(0.1)
        if not port_file.exists():
            reason = relay.stderr.read().decode(errors="replace").strip() if relay.poll() is not None else "timeout"
            pytest.skip(f"cannot start Orthanc in a network namespace of its own: {reason}")
        port, cut = port_file.read_text().split()
        url = f"http://127.0.0.1:{port}/dicom-web"
        for _ in range(300):
            try:
                if requests.get(f"http://127.0.0.1:{port}/system", auth=(USER, PASSWORD), timeout=2).ok:
                    break
            except requests.RequestException:
                pass
            time.sleep(0.1)
        else:
            pytest.skip(f"Orthanc did not start: {(folder / 'orthanc.log').read_text(errors='replace')[-300:]}")
        yield url, f"http://127.0.0.1:{cut}/dicom-web"
    finally:
        relay.stdin.close()
        try:
            relay.wait(20)
        except subprocess.TimeoutExpired:
            relay.kill()
            relay.wait(10)
        relay.stderr.close()


@pytest.fixture(scope="module")
def auth_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("auth") / "pacs.auth"
    path.write_text(f"{USER}:{PASSWORD}\n")
    path.chmod(0o600)
    return path


def _with_uids(datasets, series_uid: str, number: int) -> list:
    """The series as a PACS holds it: Study/Series/SOP UIDs filled (the real example has them empty)."""
    out = []
    for ds in datasets:
        ds.SOPInstanceUID = str(ds.get("SOPInstanceUID") or "") or ds.file_meta.MediaStorageSOPInstanceUID
        ds.SOPClassUID = str(ds.get("SOPClassUID") or "") or ds.file_meta.MediaStorageSOPClassUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SeriesNumber = STUDY, series_uid, number
        ds.FrameOfReferenceUID = str(ds.get("FrameOfReferenceUID") or "") or f"{STUDY}.9{number}"
        ds.PatientID, ds.PatientName = "SWINUNETR-TEST", "Test^Phantom"
        out.append(ds)
    return out


@pytest.fixture(scope="module")
def pacs(orthanc, auth_file, reference_files, tmp_path_factory):
    """Orthanc holding one study: the real JPEG 2000 CT and a small synthetic CT series."""
    import pydicom
    from conftest import make_affine
    from helpers import write_dicom_series
    from test_dicom_support import organ_volume

    from SwinUNETRSegmentLib.fileio import dicomweb
    from SwinUNETRSegmentLib.geometry import Volume

    url, cut = orthanc
    client = dicomweb.connect(url, auth_file)
    real = [pydicom.dcmread(p) for p in sorted((reference_files / "example_ct_dicom").iterdir())]
    ct, _ = organ_volume(Volume(np.zeros((40, 36, 12), np.int16), make_affine((1.5, 1.5, 2.5))))
    small_folder = write_dicom_series(ct, tmp_path_factory.mktemp("small") / "s", series_uid=SMALL_SERIES)
    small = [pydicom.dcmread(p) for p in sorted(small_folder.iterdir())]
    client.store_instances(_with_uids(real, REAL_SERIES, 1))
    client.store_instances(_with_uids(small, SMALL_SERIES, 2))
    return url, cut, client


def _run(capsys, argv):
    from SwinUNETRSegmentLib.cli import main

    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def _one_line_error(rc, err, *fragments):
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err
    for f in fragments:
        assert f in lines[0], (f, lines[0])


def _segs(client) -> list[dict]:
    return client.search_for_series(STUDY, search_filters={"Modality": "SEG"})


# ---------------------------------------------------------------------------------------
# credentials (no server)
# ---------------------------------------------------------------------------------------
def test_credentials_from_a_file_or_the_environment_never_the_url(tmp_path):
    from SwinUNETRSegmentLib.errors import UserError
    from SwinUNETRSegmentLib.fileio import dicomweb

    f = tmp_path / "a"
    for text, want in (("Bearer abc.def\n", ("bearer", "abc.def")), ("u:p:q", ("basic", ("u", "p:q"))),
                       ("Basic u:p", ("basic", ("u", "p"))), ("\n tok123 \n", ("bearer", "tok123"))):
        f.write_text(text)
        auth = dicomweb.read_auth(f, environ={})
        got = ("basic", auth) if isinstance(auth, tuple) else ("bearer", auth.token)
        assert got == want, text
    assert dicomweb.read_auth(None, environ={dicomweb.ENV_TOKEN: "t"}).token == "t"
    assert dicomweb.read_auth(None, environ={dicomweb.ENV_USER: "u", dicomweb.ENV_PASSWORD: "p"}) == ("u", "p")
    f.write_text("Bearer zz")
    assert dicomweb.read_auth(None, environ={dicomweb.ENV_AUTH_FILE: str(f)}).token == "zz"
    assert dicomweb.read_auth(None, environ={}) is None
    with pytest.raises(UserError, match="holds a password"):
        dicomweb.connect("http://u:secret@127.0.0.1:1/dicom-web", environ={})
    f.write_text("")
    with pytest.raises(UserError, match="is empty"):
        dicomweb.read_auth(f, environ={})


def test_command_line_refuses_what_it_cannot_do(capsys, tmp_path):
    rc, _, err = _run(capsys, ["--pacs", "http://127.0.0.1:9/dicom-web", "--study", "1.2", "--model", "demo"])
    _one_line_error(rc, err, "--store")
    rc, _, err = _run(capsys, ["--pacs", "http://127.0.0.1:9/dicom-web", "--series", "1.2", "--store"])
    _one_line_error(rc, err, "needs --study")
    rc, _, err = _run(capsys, ["--pacs", "http://127.0.0.1:9/dicom-web", "--study", "1", "--series", "2",
                               "--store", "--model", "demo"])
    _one_line_error(rc, err, "lost the connection", "127.0.0.1:9")


# ---------------------------------------------------------------------------------------
# against Orthanc
# ---------------------------------------------------------------------------------------
@pytest.fixture()
def standins(monkeypatch):
    """The CLI's segmenter replaced by stand-ins; the list holds each one made (one per model load)."""
    from test_dicom_support import StandIn

    from SwinUNETRSegmentLib.cli import segment

    made = []

    def make(args, card, weights):
        made.append(StandIn(card, weights))
        return made[-1]

    monkeypatch.setattr(segment, "_segmenter", make)
    return made


def _stored_seg(client, tmp_path, referencing: str, model: str):
    """The one SEG in the study that references ``referencing``, made by ``model``, as a file."""
    import pydicom

    from SwinUNETRSegmentLib.fileio.dicomseg import seg_references

    found = []
    for item in _segs(client):
        for ds in client.retrieve_series(STUDY, item["0020000E"]["Value"][0]):
            series, algorithms = seg_references(ds)
            if referencing in series and model in {a[0] for a in algorithms}:
                found.append(ds)
    assert len(found) == 1
    path = tmp_path / f"stored-{len(list(tmp_path.iterdir()))}.dcm"
    pydicom.dcmwrite(path, found[0], enforce_file_format=True)
    return found[0], path


def test_segment_store_query_back_then_the_study_and_a_query_do_nothing_twice(capsys, tmp_path, pacs, auth_file,
                                                                               standins):
    """The real JPEG 2000 CT over DICOMweb: the SEG Orthanc stores and indexes under the study is
    valid and holds the engine's labels voxel for voxel; reruns (the series, the study, a QIDO
    query) segment only what no SEG of the model references yet, with one model load."""
    from test_dicom_support import StandIn, dciodvfy_errors

    from SwinUNETRSegmentLib.fileio import dicomweb
    from SwinUNETRSegmentLib.fileio.dicomseg import read_dicom_seg_labels
    from SwinUNETRSegmentLib.models.cards import load_card

    url, _cut, client = pacs
    before = len(_segs(client))
    local = tmp_path / "r.dcm"
    base = ["--pacs", url, "--pacs-auth", auth_file, "--store", "--model", "demo"]
    one = [*base, "--study", STUDY, "--series", REAL_SERIES]
    rc, out, err = _run(capsys, [*one, "-o", local])
    assert rc == 0, err
    assert "stored on the server" in err and out.split() == [str(local)]
    assert len(_segs(client)) == before + 1
    stored, path = _stored_seg(client, tmp_path, REAL_SERIES, "demo")
    assert stored.StudyInstanceUID == STUDY and stored.Modality == "SEG"
    assert dciodvfy_errors(path) == []
    card = load_card("demo")
    volume, _info = dicomweb.fetch_series(client, STUDY, REAL_SERIES)
    engine = StandIn(card).segment(volume).labels
    assert np.array_equal(read_dicom_seg_labels(path, card, volume), engine.array)
    assert np.array_equal(read_dicom_seg_labels(local, card, volume), engine.array)

    rc, _out, err = _run(capsys, one)  # the same series again: skipped
    assert rc == 0 and "skipped" in err and len(standins) == 1, err
    out_dir = tmp_path / "segs"
    out_dir.mkdir()
    rc, _out, err = _run(capsys, [*base, "--study", STUDY, "-o", out_dir])  # every CT series of the study
    assert rc == 0, err
    assert len(standins) == 2 and standins[-1].calls == 1  # one model load; only the series not done yet
    assert [p.name for p in out_dir.iterdir()] == [f"{SMALL_SERIES}.dcm"]
    assert len(_segs(client)) == before + 2
    _stored_seg(client, tmp_path, SMALL_SERIES, "demo")
    rc, _out, err = _run(capsys, [*base, "--query", "PatientID=SWINUNETR-TEST"])  # all done: no model load
    assert rc == 0 and err.count("skipped") == 2 and len(standins) == 2, err
    assert len(_segs(client)) == before + 2


@pytest.mark.slow
def test_real_engine_over_dicomweb(capsys, tmp_path, pacs, auth_file, tiny_card_file, tiny_checkpoint):
    """The engine itself (a tiny card) over DICOMweb: what Orthanc stores equals its labels."""
    from test_dicom_support import dciodvfy_errors

    from SwinUNETRSegmentLib.fileio import dicomweb
    from SwinUNETRSegmentLib.fileio.dicomseg import read_dicom_seg_labels
    from SwinUNETRSegmentLib.inference.engine import Segmenter
    from SwinUNETRSegmentLib.models.cards import load_card

    url, _cut, client = pacs
    argv = ["--pacs", url, "--pacs-auth", auth_file, "--study", STUDY, "--series", REAL_SERIES, "--store",
            "--card", tiny_card_file, "--checkpoint", tiny_checkpoint, "--device", "cpu", "-q"]
    rc, _out, err = _run(capsys, argv)
    assert rc == 0, err
    _stored, path = _stored_seg(client, tmp_path, REAL_SERIES, "btcv-tiny-test")
    assert dciodvfy_errors(path) == []
    volume, _info = dicomweb.fetch_series(client, STUDY, REAL_SERIES)
    card = load_card(tiny_card_file)
    engine = Segmenter(card, tiny_checkpoint, device="cpu").segment(volume).labels
    assert np.array_equal(read_dicom_seg_labels(path, card, volume), engine.array)
    rc, _out, err = _run(capsys, argv)
    assert rc == 0 and err == ""
    _stored_seg(client, tmp_path, REAL_SERIES, "btcv-tiny-test")  # still one


def test_wrong_password(capsys, pacs, tmp_path):
    url = pacs[0]
    bad = tmp_path / "bad"
    bad.write_text(f"{USER}:nope")
    rc, _, err = _run(capsys, ["--pacs", url, "--pacs-auth", bad, "--study", STUDY, "--series", REAL_SERIES,
                               "--store", "--model", "demo"])
    _one_line_error(rc, err, "refused the credentials (HTTP 401)")


def test_unknown_series(capsys, pacs, auth_file):
    url = pacs[0]
    rc, _, err = _run(capsys, ["--pacs", url, "--pacs-auth", auth_file, "--study", STUDY, "--series", "1.2.3.4.5",
                               "--store", "--model", "demo", "--overwrite"])
    _one_line_error(rc, err, "series 1.2.3.4.5 of study", "is not on the DICOMweb server")


def test_server_goes_away_mid_fetch(capsys, pacs, auth_file, tmp_path, standins):
    _url, cut, client = pacs
    before = len(_segs(client))
    out = tmp_path / "r.dcm"
    rc, _, err = _run(capsys, ["--pacs", cut, "--pacs-auth", auth_file, "--study", STUDY, "--series", REAL_SERIES,
                               "--store", "--model", "demo", "--overwrite", "-o", out])
    _one_line_error(rc, err, "while retrieving series")
    assert not out.exists() and len(_segs(client)) == before
