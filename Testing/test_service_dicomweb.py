"""DICOMweb jobs of the engine service against a real Orthanc and a real server process: the
server fetches a series from a PACS its operator configured (``serve --pacs URL --pacs-auth
FILE``), segments it, and stores the DICOM SEG in the series' study; the client gets the
labels back as for any job. Orthanc is test_dicomweb.py's fixture (skipped with the reason
where Orthanc is not installed); the server and the model 'tiny' are test_service.py's.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import requests
import test_dicomweb
from test_dicomweb import REAL_SERIES, SMALL_SERIES, STUDY, _segs
from test_service import PATIENCE, home_card, make_home, start_server, wait_for

from SwinUNETRSegmentLib.errors import CancelledError
from SwinUNETRSegmentLib.service.client import ServiceError
from SwinUNETRSegmentLib.service.pacs import DicomwebSeries
from SwinUNETRSegmentLib.service.protocol import JobOptions

TINY = JobOptions(model="tiny")
#: test_dicomweb.py's fixtures, used here as they are: a fresh Orthanc (and its study) for this module
orthanc, auth_file, pacs = test_dicomweb.orthanc, test_dicomweb.auth_file, test_dicomweb.pacs


@pytest.fixture(scope="module")
def home(tmp_path_factory, tiny_checkpoint):
    return make_home(tmp_path_factory.mktemp("service-dicomweb"), tiny_checkpoint)


@pytest.fixture(scope="module")
def server(home, pacs, auth_file):
    s = start_server(home, "--pacs", pacs[0] + "/", "--pacs-auth", str(auth_file), "--max-queue", "2")
    yield s
    s.stop()


def _post(server, body: dict) -> requests.Response:
    return requests.post(server.url + "/jobs/dicomweb", json=body, timeout=60,
                         headers={"Authorization": f"Bearer {server.token}"})


def _stored(pacs_client, uid: str, tmp_path):
    """The instance ``uid`` as Orthanc stores it in the study (one), and as a file."""
    import pydicom

    found = pacs_client.search_for_instances(STUDY, search_filters={"SOPInstanceUID": uid})
    assert len(found) == 1, found
    ds = pacs_client.retrieve_instance(STUDY, found[0]["0020000E"]["Value"][0], uid)
    path = tmp_path / f"stored-{uid}.dcm"
    pydicom.dcmwrite(path, ds, enforce_file_format=True)
    return ds, path


def _one_line(text: str, *fragments: str) -> None:
    assert text and "\n" not in text and "Traceback" not in text, text
    for f in fragments:
        assert f in text, (f, text)


@pytest.mark.parametrize("series", [SMALL_SERIES, pytest.param(REAL_SERIES, marks=pytest.mark.slow)],
                         ids=["synthetic", "example-ct"])
def test_the_server_fetches_segments_and_stores_labels_equal_the_command_lines(series, server, home, pacs, auth_file,
                                                                                tmp_path, monkeypatch, capsys):
    """A series in Orthanc (the small synthetic one; in the slow tier the real example CT, JPEG 2000):
    a DICOMweb job's labels equal, voxel for voxel, what the command line makes of the same series
    over DICOMweb; its SEG is stored in the series' study and holds the same labels."""
    from SwinUNETRSegmentLib.cli import main
    from SwinUNETRSegmentLib.fileio import dicomweb
    from SwinUNETRSegmentLib.fileio.dicomseg import read_dicom_seg_labels
    from SwinUNETRSegmentLib.fileio.read import read_volume

    url, _cut, pacs_client = pacs
    monkeypatch.setenv("SWINUNETR_SEGMENT_HOME", str(home))
    monkeypatch.setenv(dicomweb.ENV_AUTH_FILE, str(auth_file))  # the command line's credentials
    cli_out = tmp_path / "cli.nii.gz"
    rc = main(["--pacs", url, "--study", STUDY, "--series", series, "-o", str(cli_out), "--model", "tiny",
               "--overwrite", "-q"])
    assert rc == 0, capsys.readouterr().err
    cli_labels = read_volume(cli_out)[0].array

    before = len(_segs(pacs_client))
    reports = []
    res = server.client().segment(options=TINY, dicomweb=DicomwebSeries(url, STUDY, series, store=True),
                                  progress=reports.append)
    assert res.labels.dtype == np.uint8 and np.array_equal(res.labels, cli_labels)  # voxel for voxel
    volume, info = dicomweb.fetch_series(pacs_client, STUDY, series)
    assert np.array_equal(res.ijk_to_ras, volume.ijk_to_ras)  # on the series' grid, bit for bit
    assert res.present == sorted(int(v) for v in np.unique(cli_labels) if v)
    fractions = [p.fraction for p in reports]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0, reports
    if series == REAL_SERIES:  # long enough to be seen by a poll every 0.1 s
        assert any(p.stage == "reading" and f"of {len(info.dicom)} instances" in p.message for p in reports), reports
    assert any(p.stage == "inference" for p in reports)
    assert res.timings["fetch"] > 0

    assert res.dicomweb["stored"] is True and res.dicomweb["series"] == series
    assert len(_segs(pacs_client)) == before + 1
    stored, path = _stored(pacs_client, res.dicomweb["seg_uid"], tmp_path)
    assert stored.Modality == "SEG" and stored.StudyInstanceUID == STUDY
    assert stored.ReferencedSeriesSequence[0].SeriesInstanceUID == series
    card, _ = home_card(home)
    assert np.array_equal(read_dicom_seg_labels(path, card, volume), res.labels)


def test_the_command_line_has_the_server_fetch_and_store(server, pacs, auth_file, tmp_path, monkeypatch,
                                                         capsys):
    """``--pacs ... --server``: no PACS credentials here; the server fetches, segments and stores, and
    -o writes the labels and the stored SEG here."""
    import pydicom

    from SwinUNETRSegmentLib.cli import main
    from SwinUNETRSegmentLib.fileio import dicomweb
    from SwinUNETRSegmentLib.fileio.read import read_volume

    url, _cut, pacs_client = pacs
    for name in (dicomweb.ENV_AUTH_FILE, dicomweb.ENV_TOKEN, dicomweb.ENV_USER):
        monkeypatch.delenv(name, raising=False)
    seg_out, labels_out = tmp_path / "small.dcm", tmp_path / "small.nii.gz"
    base = ["--pacs", url, "--study", STUDY, "--series", SMALL_SERIES, "--model", "tiny", "--server", server.url,
            "--token-file", str(server.token_file)]
    before = len(_segs(pacs_client))
    rc = main([*base, "--store", "-o", str(seg_out), "-o", str(labels_out), "--overwrite"])  # a SEG of tiny exists
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "stored on the server" in err and len(_segs(pacs_client)) == before + 1
    mine = pydicom.dcmread(seg_out)
    stored, _path = _stored(pacs_client, mine.SOPInstanceUID, tmp_path)
    assert stored.Modality == "SEG" and stored.ReferencedSeriesSequence[0].SeriesInstanceUID == SMALL_SERIES
    local = dicomweb.fetch_series(pacs_client, STUDY, SMALL_SERIES)[0]
    assert read_volume(labels_out)[0].shape == local.shape
    for extra, fragment in ((["--pacs-auth", str(auth_file)], "own credentials"),
                            (["--series", "x"], "series must be a DICOM UID")):
        argv = [*base, "--store", *extra]
        assert main(argv) == 2
        _one_line(capsys.readouterr().err.strip(), fragment)
    assert len(_segs(pacs_client)) == before + 1
    # a rerun does no work twice: the server finds the SEG it stored and does nothing
    again = tmp_path / "again.nii.gz"
    assert main([*base, "--store", "-o", str(again)]) == 0
    assert "skipped" in capsys.readouterr().err and not again.exists()
    assert len(_segs(pacs_client)) == before + 1


def test_a_job_that_asks_to_skip_a_segmented_series_does_nothing(server, pacs):
    """``skip_existing``: a SEG of the same model and weights references the series (the first
    test stored one), so the job ends done with no labels and nothing stored; asking for its
    labels says why; without the flag the same series is segmented again."""
    url, _cut, pacs_client = pacs
    client = server.client()
    res = client.segment(options=TINY, dicomweb=DicomwebSeries(url, STUDY, SMALL_SERIES, skip_existing=True))
    assert res.labels is None and res.dicomweb["skipped"] is True and res.dicomweb["stored"] is False
    before = len(_segs(pacs_client))
    job = client.submit(options=TINY, dicomweb=DicomwebSeries(url, STUDY, SMALL_SERIES, store=True,
                                                              skip_existing=True))
    wait_for(job.poll, lambda st: st.state == "done", what="the skipped job")
    with pytest.raises(ServiceError, match="was skipped: a DICOM SEG of model 'tiny' already references"):
        job.result()
    assert len(_segs(pacs_client)) == before
    redo = client.segment(options=TINY, dicomweb=DicomwebSeries(url, STUDY, SMALL_SERIES))
    assert redo.labels is not None and redo.dicomweb["skipped"] is False
    body = {"pacs": url, "study": STUDY, "series": SMALL_SERIES, "skip_existing": "yes", "options": TINY.to_dict()}
    r = _post(server, body)
    assert r.status_code == 422 and "skip_existing must be true or false" in r.text


def test_a_pacs_the_server_is_not_configured_for_is_refused_with_one_line(server, pacs, tmp_path, capsys):
    from SwinUNETRSegmentLib.cli import main

    url = pacs[0]
    for argv, fragment in ((["--pacs-auth", "f"], "goes after the --pacs URL"),
                           (["--pacs", url, "--pacs-auth", str(tmp_path / "missing")], "cannot read the DICOMweb"),
                           (["--pacs", url, "--pacs", url + "/"], "given twice"),
                           (["--pacs", "http://u:p@pacs.example.org/dicom-web"], "holds a password")):
        assert main(["serve", "--port", "0", *argv]) == 2  # refused before it listens
        _one_line(capsys.readouterr().err.strip(), fragment)
    r = _post(server, {"pacs": "http://127.0.0.1:9/dicom-web", "study": STUDY, "series": SMALL_SERIES})
    assert r.status_code == 400
    _one_line(r.json()["detail"], "not configured to reach the PACS http://127.0.0.1:9/dicom-web", url,
              "serve --pacs URL --pacs-auth FILE")
    with pytest.raises(ServiceError, match="not configured") as err:
        server.client().segment(dicomweb=DicomwebSeries("https://pacs.elsewhere.org/dicom-web", STUDY, SMALL_SERIES),
                                options=TINY)
    assert err.value.status == 400
    secret = url.replace("http://", "http://alice:wonderland-7@")
    r = _post(server, {"pacs": secret, "study": STUDY, "series": SMALL_SERIES})
    assert r.status_code == 422 and "wonderland" not in r.text
    _one_line(r.json()["detail"], "holds a user name or password")
    for body, fragment in (({"pacs": url, "study": STUDY}, "needs series"),
                           ({"pacs": url, "study": STUDY, "series": "1.2.x"}, "series must be a DICOM UID"),
                           ({"pacs": url, "study": STUDY, "series": SMALL_SERIES, "store": True,
                             "output_type": "labels"}, "give output_type dicom-seg"),
                           ({"pacs": url, "study": STUDY, "series": SMALL_SERIES, "password": "x"}, "unknown field"),
                           ({"pacs": url, "study": STUDY, "series": SMALL_SERIES, "options": {"model": "nope"}},
                            "unknown model 'nope'")):
        r = _post(server, body)
        assert r.status_code in (404, 422), r.text
        _one_line(r.json()["detail"], fragment)
    info = server.client().info()
    assert info["pacs"] == [url]  # as the operator gave it, trailing slash left off


def test_an_unknown_series_fails_the_job_with_one_line(server, pacs):
    url = pacs[0]
    with pytest.raises(ServiceError) as err:
        server.client().segment(options=TINY, dicomweb=DicomwebSeries(url, STUDY, "1.2.3.4.5", store=True))
    assert err.value.status == 422
    _one_line(str(err.value), "series 1.2.3.4.5 of study", "is not on the DICOMweb server")


def test_labels_only_no_seg_is_made_and_cancel_stops_a_job_fetching_or_running(server, pacs):
    url, _cut, pacs_client = pacs
    before = len(_segs(pacs_client))
    client = server.client()
    res = client.segment(options=TINY, dicomweb=DicomwebSeries(url, STUDY, SMALL_SERIES, output_type="labels"))
    assert res.dicomweb["seg_uid"] is None and res.dicomweb["stored"] is False and res.labels.ndim == 3

    job = client.submit(options=TINY, dicomweb=DicomwebSeries(url, STUDY, REAL_SERIES, store=True))
    wait_for(lambda: job.submitted, bool, "the submission")
    job.cancel()  # while it fetches the series, or waits for the device: it ends at once
    assert job.poll().state == "cancelled"

    slow = JobOptions(model="tiny", overlap=0.75)
    job = client.submit(options=slow, dicomweb=DicomwebSeries(url, STUDY, REAL_SERIES, store=True))
    st = wait_for(job.poll, lambda st: st.state != "submitting" and (st.state != "queued" and st.done >= 1
                                                                      or st.state in ("done", "failed")),
                  "the first window")
    assert st.state == "running", st
    at_cancel = job.cancel().done
    end = wait_for(job.poll, lambda st: st.state != "running", "the cancel", PATIENCE)
    assert end.state == "cancelled" and end.done <= at_cancel + 1 < end.total, end
    with pytest.raises(ServiceError, match="cancelled") as err:
        job.result()
    assert err.value.status == 409
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(CancelledError):
        client.segment(options=TINY, dicomweb=DicomwebSeries(url, STUDY, SMALL_SERIES, store=True), cancel=cancel)
    assert len(_segs(pacs_client)) == before  # nothing cancelled was stored
