"""The engine service against a real server process on 127.0.0.1 (started and stopped here):
the real example CT through the tiny test card, by upload and by path, through the client
and through the command line's --server; cancel, a full queue, and every bad input, each
one line (the slow tier, test_service_slow.py, has the rest).

The helpers (:func:`service_home`, :func:`start_server`) serve the other service tests too.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import requests
from conftest import tiny_card

from SwinUNETRSegmentLib.errors import CancelledError
from SwinUNETRSegmentLib.geometry import Volume
from SwinUNETRSegmentLib.service.client import Client, ServiceError
from SwinUNETRSegmentLib.service.protocol import OPTIONS_HEADER, JobOptions, encode_nrrd

LAUNCH = "import sys; from SwinUNETRSegmentLib.cli import main; sys.exit(main(sys.argv[1:]))"
#: seconds any wait of these tests may take before it fails (a loaded 2-core CI is slow)
PATIENCE = 240.0


# ----------------------------------------------------------------------------------------
# helpers shared by the service tests
# ----------------------------------------------------------------------------------------
def make_home(root: Path, checkpoint: Path) -> Path:
    """A catalog home holding model 'tiny' (the tiny test card, its weights installed)."""
    from SwinUNETRSegmentLib.fileio.atomic import file_digest
    from SwinUNETRSegmentLib.models import catalog

    home = root / "home"
    old = os.environ.get("SWINUNETR_SEGMENT_HOME")
    os.environ["SWINUNETR_SEGMENT_HOME"] = str(home)
    try:
        card = dataclasses.replace(tiny_card(), name="tiny", checkpoint={"sha256": file_digest(checkpoint)})
        catalog.add_card_data(card.to_json())
        catalog.install_file("tiny", checkpoint)
    finally:
        if old is None:
            os.environ.pop("SWINUNETR_SEGMENT_HOME")
        else:
            os.environ["SWINUNETR_SEGMENT_HOME"] = old
    return home


def home_card(home: Path):
    """The card the server reads for 'tiny', and its weights."""
    from SwinUNETRSegmentLib.models.cards import load_card

    return load_card(home / "cards" / "tiny.json"), home / "models" / "tiny" / "model.pt"


@dataclasses.dataclass
class Server:
    process: subprocess.Popen
    url: str
    token_file: Path
    log: Path

    @property
    def token(self) -> str:
        return [ln for ln in self.token_file.read_text().splitlines() if ln and not ln.startswith("#")][0]

    def client(self, **kwargs) -> Client:
        return Client(self.url, self.token, **kwargs)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def rss(self) -> int:
        """Resident memory of the server process, bytes (Linux)."""
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS")


def start_server(home: Path, *args: str, token_file: Path | None = None) -> Server:
    """``swinunetr-segment serve`` on 127.0.0.1 and a free port, as its own process."""
    from SwinUNETRSegmentLib.inference.memory import allocator_env

    tag = uuid.uuid4().hex[:8]
    ready, log = home.parent / f"ready-{tag}.json", home.parent / f"server-{tag}.log"
    token_file = token_file or home.parent / f"token-{tag}"
    # on PyTorch unless a test asks otherwise: its labels are compared with in-process runs
    backend = [] if "--backend" in args else ["--backend", "torch"]
    cmd = [sys.executable, "-c", LAUNCH, "serve", "--host", "127.0.0.1", "--port", "0", "--token-file",
           str(token_file), "--ready-file", str(ready), *backend, *args]
    env = allocator_env({**os.environ, "SWINUNETR_SEGMENT_HOME": str(home)})
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + PATIENCE
    while not ready.is_file():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"the server did not start: {log.read_text()[-2000:]}")
        time.sleep(0.05)
    return Server(proc, json.loads(ready.read_text())["url"], token_file, log)


def wait_for(poll, until, what: str, patience: float = PATIENCE):
    """``poll()`` until ``until(value)``; bounded."""
    deadline = time.monotonic() + patience
    while True:
        value = poll()
        if until(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}; last: {value}")
        time.sleep(0.05)


def long_volume(ct: Volume) -> Volume:
    """The example CT three times end to end: nine windows of the tiny card at overlap 0.75."""
    return Volume(np.concatenate([ct.array] * 3, axis=0), ct.ijk_to_ras)


def without_date(data: bytes) -> bytes:
    """A .seg.nrrd without pynrrd's line giving the time it was written."""
    return b"\n".join(ln for ln in data.split(b"\n") if not ln.startswith(b"# on "))


# ----------------------------------------------------------------------------------------
# fixtures
# ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def home(tmp_path_factory, tiny_checkpoint) -> Path:
    return make_home(tmp_path_factory.mktemp("service"), tiny_checkpoint)


@pytest.fixture(scope="module")
def server(home):
    s = start_server(home, "--max-queue", "1", "--max-upload-mb", "24")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def example_ct_path(reference_files) -> Path:
    return reference_files / "example_ct.nii.gz"


@pytest.fixture(scope="module")
def example_ct(example_ct_path) -> Volume:
    from SwinUNETRSegmentLib.fileio.read import read_volume

    return read_volume(example_ct_path)[0]


@pytest.fixture(scope="module")
def in_process(home, example_ct):
    """The in-process run of model 'tiny' on the example CT (the engine, no service)."""
    from SwinUNETRSegmentLib.inference.engine import Segmenter
    from SwinUNETRSegmentLib.inference.options import FastPath

    card, weights = home_card(home)
    return Segmenter(card, weights, device="auto", fast=FastPath(backend="torch")).segment(example_ct)


# ----------------------------------------------------------------------------------------
# tests
# ----------------------------------------------------------------------------------------
def test_health_is_open_every_other_route_needs_the_token(server):
    assert requests.get(server.url + "/health", timeout=30).json()["status"] == "ok"
    for headers, word in (({}, "missing token"), ({"Authorization": "Bearer " + "x" * 43}, "wrong token"),
                          ({"Authorization": "Basic " + server.token}, "wrong token")):
        r = requests.get(server.url + "/models", headers=headers, timeout=30)
        assert r.status_code == 401 and r.headers["WWW-Authenticate"].startswith("Bearer")
        assert word in r.json()["detail"] and "\n" not in r.json()["detail"]
    with pytest.raises(ServiceError, match="wrong token") as err:
        Client(server.url, "y" * 43).models()
    assert err.value.status == 401
    assert server.token_file.stat().st_mode & 0o777 == 0o600  # made by the server on first start
    models = {m["name"]: m for m in server.client().models()}
    assert models["tiny"]["weights_present"] and models["tiny"]["served"]
    assert models["tiny"]["checksum"]["algorithm"] == "sha256" and len(models["tiny"]["checksum"]["value"]) == 64


def test_upload_progress_rises_to_done_and_labels_equal_in_process(server, example_ct, in_process):
    reports = []
    res = server.client().segment(example_ct.array, example_ct.ijk_to_ras, options=JobOptions(model="tiny"),
                                  progress=reports.append)
    fractions = [p.fraction for p in reports]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0, reports
    assert any(p.stage == "inference" and p.total >= 1 for p in reports)
    assert res.labels.dtype == np.uint8 and res.labels.shape == example_ct.shape
    assert np.array_equal(res.labels, in_process.labels.array)  # byte for byte
    assert np.array_equal(res.ijk_to_ras, example_ct.ijk_to_ras)
    assert res.present == in_process.present_labels()
    assert [s["value"] for s in res.segments] == [lab.value for lab in in_process.card.labels]


def test_path_job_and_seg_nrrd_bytes(server, example_ct_path, in_process, tmp_path):
    from SwinUNETRSegmentLib.fileio.segnrrd import write_seg_nrrd

    client = server.client()
    job = client.submit(path=example_ct_path, options=JobOptions(model="tiny"))
    wait_for(job.poll, lambda st: st.state in ("done", "failed"), "the path job")
    assert job.status.state == "done", job.status.error
    seg = job.seg_nrrd(keep=True)
    assert np.array_equal(job.result().labels, in_process.labels.array)
    with pytest.raises(ServiceError, match="no job"):  # fetched: dropped
        job.poll()
    write_seg_nrrd(tmp_path / "local.seg.nrrd", in_process.labels, in_process.card.labels)
    assert without_date(seg) == without_date((tmp_path / "local.seg.nrrd").read_bytes())


def test_cli_with_server_writes_the_files_of_a_local_run(server, example_ct_path, in_process, tmp_path, capsys):
    from SwinUNETRSegmentLib.cli import main
    from SwinUNETRSegmentLib.fileio.write import write_segmentation

    local = tmp_path / "local"
    local.mkdir()
    write_segmentation(local / "ct.seg.nrrd", in_process.labels, in_process.card.labels)
    write_segmentation(local / "ct.nii.gz", in_process.labels, in_process.card.labels)
    out = tmp_path / "remote"
    out.mkdir()
    base = ["-i", str(example_ct_path), "--model", "tiny", "--server", server.url, "--token-file",
            str(server.token_file)]
    assert main(base + ["-o", str(out / "ct.seg.nrrd"), "-o", str(out / "ct.nii.gz")]) == 0
    assert without_date((out / "ct.seg.nrrd").read_bytes()) == without_date((local / "ct.seg.nrrd").read_bytes())
    for name in ("ct.nii.gz", "ct.csv"):
        assert (out / name).read_bytes() == (local / name).read_bytes(), name
    capsys.readouterr()
    wrong = tmp_path / "wrong-token"
    wrong.write_text("z" * 43 + "\n")
    cases = [(["--token-file", str(wrong)], "wrong token"), (["--model", "nope"], "unknown model 'nope'"),
             (["--server", "http://127.0.0.1:9"], "cannot reach")]
    for extra, fragment in cases:
        argv = base + ["-o", str(out / "x.seg.nrrd")] + extra
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and fragment in err and "Traceback" not in err, err
        assert not (out / "x.seg.nrrd").exists()


def test_cancel_acts_within_one_window_and_a_full_queue_says_when_to_retry(server, example_ct):
    client, vol = server.client(), long_volume(example_ct)
    options = JobOptions(model="tiny", overlap=0.75)
    first = client.submit(vol.array, vol.ijk_to_ras, options=options)
    wait_for(first.poll, lambda st: st.state == "running" and st.done >= 1, "the first window")
    second = client.submit(vol.array, vol.ijk_to_ras, options=options)  # waits: one device, one job at a time
    assert wait_for(second.poll, lambda st: st.state != "submitting", "the second job").state == "queued"
    assert second.status.position == 0
    third = client.submit(vol.array, vol.ijk_to_ras, options=options)
    with pytest.raises(ServiceError, match="busy") as err:
        wait_for(third.poll, lambda st: False, "the third job's refusal")
    assert err.value.status == 503
    r = requests.post(server.url + "/jobs/upload", data=encode_nrrd(vol.array[:8], vol.ijk_to_ras, 0),
                      headers={"Authorization": f"Bearer {server.token}", OPTIONS_HEADER: options.to_header()},
                      timeout=60)
    assert r.status_code == 503 and int(r.headers["Retry-After"]) >= 1
    second.cancel()
    assert second.poll().state == "cancelled"  # a queued job ends at once
    t0 = time.monotonic()
    at_cancel = first.cancel().done  # the windows done when the server took the cancel
    end = wait_for(first.poll, lambda st: st.state != "running", "the cancel")
    assert end.state == "cancelled" and end.done <= at_cancel + 1 < end.total, end
    assert time.monotonic() - t0 < PATIENCE / 4
    with pytest.raises(ServiceError, match="cancelled") as err:
        first.result()
    assert err.value.status == 409
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(CancelledError):  # the blocking client's cancel
        client.segment(vol.array, vol.ijk_to_ras, options=options, cancel=cancel)


def test_bad_inputs_each_get_one_line_and_their_status(server, example_ct, example_ct_path):
    client = server.client()
    auth = {"Authorization": f"Bearer {server.token}"}

    def refused(array, ijk, options=None):
        with pytest.raises(ServiceError) as err:
            job = client.submit(array, ijk, options=options or JobOptions(model="tiny"))
            wait_for(job.poll, lambda st: False, "a refusal")
        assert "\n" not in str(err.value)
        return err.value

    err = refused(example_ct.array, example_ct.ijk_to_ras, JobOptions(model="nope"))
    assert err.status == 404 and "unknown model 'nope'" in str(err) and "tiny" in str(err)
    nan = example_ct.array.astype(np.float32)
    nan[1, 2, 3] = np.nan
    err = refused(nan, example_ct.ijk_to_ras)
    from SwinUNETRSegmentLib.errors import UserError
    from SwinUNETRSegmentLib.geometry import check_volume

    with pytest.raises(UserError) as engine:
        check_volume(Volume(nan, example_ct.ijk_to_ras), "the volume")  # what the engine says in-process
    assert err.status == 422 and str(err) == str(engine.value)
    err = refused(np.zeros((40, 30, 1), np.int16), np.eye(4))
    assert err.status == 422 and "2D image" in str(err)
    err = refused(np.zeros((200, 200, 200), np.int32), np.eye(4))  # 32 MB raw (loopback)
    assert err.status == 413 and "limit of 24 MB" in str(err)  # refused by the client before sending
    r = requests.post(server.url + "/jobs/upload", data=b"\0" * (25 << 20), headers=auth, timeout=60)
    assert r.status_code == 413 and "over this server's limit" in r.json()["detail"]
    r = requests.post(server.url + "/jobs/upload", data=b"NRRD0004\ntype: short\n\n....", headers=auth, timeout=60)
    assert r.status_code == 422 and "no volume NRRD" in r.json()["detail"]
    with _raw(server) as sock:  # an upload that claims more than the limit is refused before it is sent
        sock.sendall(f"POST /jobs/upload HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {server.token}\r\n"
                     f"Content-Length: {100 << 20}\r\n\r\n".encode())
        assert sock.recv(200).startswith(b"HTTP/1.1 413")
    r = requests.post(server.url + "/jobs", json={"path": str(example_ct_path.with_name("missing.nii.gz"))},
                      headers=auth, timeout=60)
    assert r.status_code == 422 and r.json()["detail"].startswith("input not found")
    r = requests.post(server.url + "/jobs", json={"path": str(example_ct_path), "options": {"overlap": 1.5}},
                      headers=auth, timeout=60)
    assert r.status_code == 422 and "overlap" in r.json()["detail"]
    r = requests.get(server.url + "/jobs/nosuchjob", headers=auth, timeout=60)
    assert r.status_code == 404
    assert requests.get(server.url + "/health", timeout=30).status_code == 200  # still serving


@contextlib.contextmanager
def _raw(server):
    host, port = server.url.rsplit("/", 1)[1].split(":")
    sock = socket.create_connection((host, int(port)), timeout=60)
    try:
        yield sock
    finally:
        sock.close()
