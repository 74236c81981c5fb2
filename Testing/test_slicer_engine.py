"""Inference through the engine service as Slicer's process does it: the panel's QTimer calls
EngineRun.tick(), which never waits (each tick is measured against a slow fake server: under
50 ms while the server takes seconds to answer), no thread is started in the caller's
process, cancel stops the job on the server, and the real local engine (the built-in demo
model in `swinunetr-segment serve` as a child process) segments a small volume whose labels
then go into a real MRML segmentation node (slicer-core) voxel for voxel."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from test_slicer_support import MODULE_DIR, frozen_gc

from SwinUNETRSegmentLib.errors import UserError
from SwinUNETRSegmentLib.geometry import Volume
from SwinUNETRSegmentLib.models.cards import load_card
from SwinUNETRSegmentLib.service.protocol import JobOptions, NrrdDecoder, encode_nrrd
from SwinUNETRSegmentSlicer import enginerun
from SwinUNETRSegmentSlicer.enginerun import (
    CANCELLED,
    DONE,
    ERROR,
    INFO,
    PROGRESS,
    EngineRun,
    RemoteEndpoint,
    nrrd_header,
)
from SwinUNETRSegmentSlicer.testing import expected_labels_kji, synthetic_scan

TOKEN = "secret-token"


class FakeEngine:
    """The service's routes, answering each request only after ``delay`` seconds."""

    def __init__(self, delay: float = 0.0, windows: int = 3, tls=None, process: bool = False):
        """``process``: serve from a child process, so that the server's own work (decoding,
        thresholding tens of MB) does not hold this process's interpreter lock while ticks
        are measured; its state (jobs, cancelled) then stays in the child."""
        self.delay, self.windows, self.process = delay, windows, process
        self.jobs: dict[str, dict] = {}
        self.cancelled: list[str] = []
        self.uploads = 0
        engine = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def reply(self, status, body, kind="application/json"):
                data = json.dumps(body).encode() if kind == "application/json" else body
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(data)))
                self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(data)

            def body(self) -> bytes:
                if "chunked" in self.headers.get("Transfer-Encoding", ""):
                    out = bytearray()
                    while True:
                        size = int(self.rfile.readline().split(b";")[0], 16)
                        if size == 0:
                            self.rfile.readline()
                            return bytes(out)
                        out += self.rfile.read(size)
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length", 0)))

            def do_GET(self):
                time.sleep(engine.delay)
                if self.path == "/health":
                    return self.reply(200, {"status": "ok", "service": "swinunetr-segment", "api": 1})
                if self.headers.get("Authorization") != f"Bearer {TOKEN}":
                    return self.reply(401, {"detail": "wrong token"})
                if self.path == "/info":
                    return self.reply(200, {"max_upload_mb": 1024, "devices": [{"device": "cpu", "name": "CPU"}]})
                parts = self.path.split("/")
                job = engine.jobs.get(parts[2]) if len(parts) > 2 else None
                if job is None:
                    return self.reply(404, {"detail": "no such job"})
                if len(parts) == 4 and parts[3].startswith("labels"):
                    return self.reply(200, encode_nrrd(job["labels"], job["ijk_to_ras"], 1), "application/x-nrrd")
                job["polls"] += 1
                done = min(job["polls"], engine.windows)
                state = "cancelled" if job["id"] in engine.cancelled else (
                    "done" if job["polls"] > engine.windows else "running")
                return self.reply(200, {"id": job["id"], "state": state, "stage": "inference",
                                        "message": f"window {done} of {engine.windows}",
                                        "fraction": done / (engine.windows + 1), "done": done,
                                        "total": engine.windows, "result": job["result"]})

            def do_POST(self):
                data = self.body()
                time.sleep(engine.delay)
                if self.path == "/jobs/upload":
                    engine.uploads += 1
                    decoder = NrrdDecoder()
                    decoder.feed(data)
                    array, ijk_to_ras = decoder.finish()
                    labels = expected_labels_kji(array.transpose(2, 1, 0)).transpose(2, 1, 0)
                    job_id = f"job{len(engine.jobs) + 1}"
                    engine.jobs[job_id] = {"id": job_id, "labels": labels, "ijk_to_ras": ijk_to_ras, "polls": 0,
                                           "options": json.loads(self.headers["X-SwinUNETR-Options"]),
                                           "result": {"card": load_card("btcv").to_json(), "device": "cpu"}}
                    return self.reply(202, {"id": job_id, "state": "queued", "stage": "queued", "message": "queued"})
                if self.path.endswith("/cancel"):
                    engine.cancelled.append(self.path.split("/")[2])
                    return self.reply(200, {"id": self.path.split("/")[2], "state": "cancelled"})
                return self.reply(404, {"detail": "Not Found"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        if tls is not None:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        scheme = "https" if tls is not None else "http"
        self.url = f"{scheme}://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        if self.process:  # a fresh interpreter (a fork would copy this process's heap page by page as it runs)
            import subprocess
            import sys

            code = ("import sys; sys.path.insert(0, sys.argv[1]); import test_slicer_engine as t; "
                    "e = t.FakeEngine(delay=float(sys.argv[2]), windows=int(sys.argv[3])); "
                    "print(e.url, flush=True); e.server.serve_forever()")
            self.child = subprocess.Popen([sys.executable, "-c", code, str(Path(__file__).parent), str(self.delay),
                                           str(self.windows)], stdout=subprocess.PIPE, text=True)
            self.server.server_close()
            self.url = self.child.stdout.readline().strip()
        else:
            self.thread.start()
        return self

    def __exit__(self, *exc):
        if self.process:
            self.child.terminate()
            self.child.wait(10)
            return
        self.server.shutdown()
        self.server.server_close()


class Timer:
    """What the panel's QTimer does: tick every ``interval`` s, each tick measured (with the
    objects already alive out of the garbage collector's way: ``frozen_gc``)."""

    def __init__(self, run: EngineRun, interval: float = 0.01):
        self.run, self.interval, self.longest, self.events, self.ticks = run, interval, 0.0, [], 0
        self.slowest = None  # the run's state during the longest tick

    def until_final(self, timeout: float = 60.0, after=None):
        with frozen_gc():
            return self._until_final(timeout, after)

    def _until_final(self, timeout, after):
        deadline = time.monotonic() + timeout
        while not self.run.finished and time.monotonic() < deadline:
            t0, state = time.perf_counter(), self.run._state
            self.events += self.run.tick()
            took = time.perf_counter() - t0
            if took > self.longest:
                self.longest, self.slowest = took, state
            self.ticks += 1
            if after is not None and after(self):
                after = None
            time.sleep(self.interval)
        assert self.run.finished, "the run did not finish"
        return self.events


def scan():
    arr, ijk_to_ras = synthetic_scan()
    return arr, ijk_to_ras, expected_labels_kji(arr)


def test_no_tick_waits_for_a_slow_server_and_the_labels_arrive_on_the_input_grid():
    arr, ijk_to_ras, expected = scan()
    with FakeEngine(delay=0.4) as engine:
        before = set(threading.enumerate())
        run = EngineRun(RemoteEndpoint(engine.url, TOKEN), arr, ijk_to_ras, JobOptions(model="btcv"),
                        poll_interval=0.05)
        timer = Timer(run)
        events = timer.until_final()
        started = [t for t in set(threading.enumerate()) - before if "process_request" not in t.name]
        assert not started, f"the run started threads in the caller's process: {started}"
    assert timer.longest < 0.05, f"a tick took {timer.longest * 1000:.0f} ms"
    assert timer.ticks > 100  # the server took seconds; the caller kept running meanwhile
    kinds = [e.kind for e in events]
    assert kinds[-1] == DONE and kinds.count(DONE) == 1 and INFO in kinds
    windows = [e.value.message for e in events if e.kind == PROGRESS and e.value.stage == "inference"]
    assert windows[-1] == "window 3 of 3"
    result = events[-1].value.segmentation(ijk_to_ras)
    assert result.labels.same_grid(Volume.from_kji(arr, ijk_to_ras))
    np.testing.assert_array_equal(result.labels.kji(), expected)
    assert result.card.name == "btcv" and engine.jobs["job1"]["options"]["model"] == "btcv"



class StartingEngine:
    """What LocalEndpoint may use of the service's LocalEngine: ``alive``, ``start()`` and
    ``endpoint()`` (None for the first few calls, as while the child starts). No files."""

    def __init__(self, url: str, starting_calls: int = 5):
        self.url, self.left, self.started, self.calls = url, starting_calls, 0, 0

    alive = property(lambda self: self.started > 0)

    def start(self) -> None:
        self.started += 1

    def endpoint(self):
        self.calls += 1
        self.left -= 1
        return None if self.left >= 0 else (self.url, TOKEN)


def test_the_local_endpoint_takes_the_engine_s_address_from_its_endpoint_method_only():
    arr, ijk_to_ras, expected = scan()
    with FakeEngine() as server:
        engine = StartingEngine(server.url)
        run = EngineRun(enginerun.LocalEndpoint(engine), arr, ijk_to_ras, JobOptions(model="btcv"),
                        poll_interval=0.01)
        timer = Timer(run)
        events = timer.until_final()
    assert events[-1].kind == DONE, events[-1].value
    assert engine.started == 1 and engine.calls >= 6  # asked again on later ticks while it started
    assert timer.longest < 0.05
    np.testing.assert_array_equal(events[-1].value.segmentation(ijk_to_ras).labels.kji(), expected)
    readers = [f.name for f in (MODULE_DIR / "SwinUNETRSegmentSlicer").glob("*.py")
               if any(word in f.read_text(encoding="utf-8") for word in ("ready.json", "log_path", '"token"'))]
    assert readers == [], "the Slicer side reads the engine's files; use LocalEngine.endpoint()"

def test_a_large_upload_is_sent_a_piece_per_tick(monkeypatch):
    """gzip to a server, compressed a piece at a time: no tick compresses the whole volume."""
    monkeypatch.setattr(enginerun, "UPLOAD_PIECE", 1 << 16)
    rng = np.random.default_rng(0)
    arr = rng.integers(-1000, 1000, (60, 128, 128), dtype=np.int16)  # 2 MB that does not compress
    with FakeEngine(windows=1, process=True) as engine:
        run = EngineRun(RemoteEndpoint(engine.url, TOKEN), arr, np.eye(4), JobOptions(), poll_interval=0.01)
        timer = Timer(run, interval=0.0)
        events = timer.until_final()
    assert events[-1].kind == DONE, events[-1].value
    assert timer.longest < 0.05, f"a tick took {timer.longest * 1000:.0f} ms"
    assert any(e.kind == PROGRESS and e.value.stage == "uploading" for e in events)


def test_cancel_while_the_server_runs_the_job_stops_it_there_and_nothing_comes_back():
    arr, ijk_to_ras, _ = scan()
    with FakeEngine(delay=0.05, windows=1000) as engine:
        run = EngineRun(RemoteEndpoint(engine.url, TOKEN), arr, ijk_to_ras, JobOptions(), poll_interval=0.02)
        timer = Timer(run)
        events = timer.until_final(after=lambda t: run.job_id is not None and (run.cancel() or True))
        t0 = time.monotonic()
        while run.busy and time.monotonic() - t0 < 10:  # the cancel request goes out on later ticks
            run.tick()
            time.sleep(0.01)
        assert engine.cancelled == ["job1"]
    assert events[-1].kind == CANCELLED and DONE not in [e.kind for e in events]
    assert timer.longest < 0.05


def test_cancel_during_the_upload_makes_no_job():
    arr = np.zeros((200, 256, 256), np.int16)  # 26 MB: many ticks to send
    with FakeEngine() as engine:
        run = EngineRun(RemoteEndpoint(engine.url, TOKEN), arr, np.eye(4), JobOptions())
        timer = Timer(run, interval=0.0)
        events = timer.until_final(after=lambda t: run._state == "uploading" and (run.cancel() or True))
        time.sleep(0.2)
    assert events[-1].kind == CANCELLED
    assert engine.jobs == {}


def test_a_wrong_token_and_an_unreachable_server_are_one_line_errors():
    arr, ijk_to_ras, _ = scan()
    with FakeEngine() as engine:
        events = Timer(EngineRun(RemoteEndpoint(engine.url, "wrong"), arr, ijk_to_ras, JobOptions())).until_final()
    assert events[-1].kind == ERROR and isinstance(events[-1].value, UserError)
    assert "wrong token" in str(events[-1].value)
    url = engine.url  # the server is gone now
    events = Timer(EngineRun(RemoteEndpoint(url, TOKEN), arr, ijk_to_ras, JobOptions())).until_final()
    assert events[-1].kind == ERROR and "cannot reach the engine" in str(events[-1].value)
    assert "Connection refused" in str(events[-1].value)


def test_the_upload_header_is_the_service_s_own_format():
    arr, ijk_to_ras, _ = scan()
    ours = nrrd_header(arr.shape, arr.dtype, ijk_to_ras, gzip=False)
    theirs = encode_nrrd(arr.transpose(2, 1, 0), ijk_to_ras, level=0)
    assert theirs.startswith(ours) and theirs[len(ours):] == arr.tobytes()


def test_labels_on_another_grid_are_refused():
    arr, ijk_to_ras, expected = scan()
    shifted = ijk_to_ras.copy()
    shifted[0, 3] += 1.0
    result = enginerun.EngineResult(expected.transpose(2, 1, 0), shifted, {"card": load_card("btcv").to_json()})
    with pytest.raises(UserError, match="another grid"):
        result.segmentation(ijk_to_ras)


def test_a_server_over_https_is_checked_against_its_ca(tmp_path):
    import ssl

    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(context)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    arr, ijk_to_ras, expected = scan()
    with FakeEngine(tls=context) as engine:
        events = Timer(EngineRun(RemoteEndpoint(engine.url, TOKEN, verify=str(ca_file)), arr, ijk_to_ras,
                                 JobOptions(), poll_interval=0.02)).until_final()
        assert events[-1].kind == DONE, events[-1].value
        np.testing.assert_array_equal(events[-1].value.segmentation(ijk_to_ras).labels.kji(), expected)
        refused = Timer(EngineRun(RemoteEndpoint(engine.url, TOKEN, verify=True), arr, ijk_to_ras,
                                  JobOptions())).until_final()
    assert refused[-1].kind == ERROR and "TLS with" in str(refused[-1].value)
    assert "REQUESTS_CA_BUNDLE" in str(refused[-1].value)


def test_a_large_result_is_decoded_a_piece_per_tick():
    """Labels that are mostly background compress a thousandfold: no tick inflates them all at once."""
    arr = np.zeros((160, 512, 512), np.uint8)  # 42 MB of voxels, 42 MB of labels back
    arr[40:120, 100:400, 100:400] = 120
    with FakeEngine(windows=1, process=True) as engine:
        run = EngineRun(RemoteEndpoint(engine.url, TOKEN), arr, np.eye(4), JobOptions(), poll_interval=0.01)
        timer = Timer(run, interval=0.0)
        events = timer.until_final(timeout=120)
    assert events[-1].kind == DONE, events[-1].value
    assert timer.longest < 0.05, f"a tick took {timer.longest * 1000:.0f} ms ({timer.slowest})"
    labels = events[-1].value.segmentation(np.eye(4)).labels.kji()
    np.testing.assert_array_equal(labels, expected_labels_kji(arr))
