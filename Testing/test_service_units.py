"""The engine service's pieces without a server process: the NRRD codec, the job options,
the tokens (the file, the constant-time check), the serve command's refusals, the job
queue with a stand-in engine, and the client importing in a Python that has only what
3D Slicer 5.10 ships."""

from __future__ import annotations

import contextlib
import gzip
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import make_affine, rotation

from SwinUNETRSegmentLib.errors import CancelledError, UserError
from SwinUNETRSegmentLib.geometry import Volume
from SwinUNETRSegmentLib.inference.api import SegmentationResult
from SwinUNETRSegmentLib.progress import Progress
from SwinUNETRSegmentLib.service import auth, protocol
from SwinUNETRSegmentLib.service.protocol import (
    JobOptions,
    NrrdDecoder,
    NrrdError,
    NrrdTooLarge,
    decode_nrrd,
    encode_nrrd,
)

REPO = Path(__file__).resolve().parents[1]
OBLIQUE = make_affine((1.1, 1.7, 2.3), rotation(0.3, -0.2, 0.5), (-33.3, 21.7, 1 / 3))


# ---- the NRRD codec ---------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["uint8", "int16", ">i2", "uint16", "int32", "float32", "float64", "int64"])
@pytest.mark.parametrize("level", [0, 1])
def test_nrrd_round_trip_is_exact_fed_in_any_pieces(dtype, level):
    a = np.random.default_rng(1).integers(-500, 500, (7, 5, 3)).astype(dtype)
    data = encode_nrrd(a, OBLIQUE, level)
    d = NrrdDecoder()
    for i in range(0, len(data), 11):
        d.feed(data[i:i + 11])
    b, m = d.finish()
    assert np.array_equal(a, b) and np.array_equal(m, OBLIQUE)  # the matrix bit for bit
    assert b.flags.f_contiguous and b.flags.writeable and b.dtype.byteorder in "=|<"


def test_nrrd_gzip_members_and_other_readers(tmp_path, monkeypatch):
    import nrrd
    import SimpleITK as sitk

    a = np.arange(30 * 20 * 10, dtype=np.int16).reshape(30, 20, 10)
    (tmp_path / "one.nrrd").write_bytes(encode_nrrd(a, OBLIQUE, 1))  # one gzip member: pynrrd reads it
    arr, header = nrrd.read(str(tmp_path / "one.nrrd"))
    assert np.array_equal(arr, a) and header["space"] == "right-anterior-superior"
    monkeypatch.setattr(protocol, "_MEMBER", 100)  # many gzip members, compressed on threads
    data = encode_nrrd(a, OBLIQUE, 1)
    assert data.count(b"\x1f\x8b\x08") >= 100 and np.array_equal(decode_nrrd(data)[0], a)
    (tmp_path / "v.nrrd").write_bytes(data)
    img = sitk.ReadImage(str(tmp_path / "v.nrrd"))  # ITK (Slicer's reader) reads every member, same grid
    assert np.array_equal(sitk.GetArrayFromImage(img).transpose(2, 1, 0), a)
    assert np.allclose(Volume.from_itk_geometry(a, img.GetOrigin(), img.GetSpacing(), img.GetDirection()).ijk_to_ras,
                       OBLIQUE)
    nrrd.write(str(tmp_path / "lps.nrrd"), a, {"space": "left-posterior-superior", "encoding": "gzip",
                                               "space directions": np.diag([1.0, 2.0, 3.0]), "space origin": [4, 5, 6]})
    b, m = decode_nrrd((tmp_path / "lps.nrrd").read_bytes())
    assert np.array_equal(b, a) and np.array_equal(m, np.diag([-1.0, -2.0, 3.0, 1.0]) + np.c_[np.zeros((4, 3)),
                                                                                                [-4, -5, 6, 0]])


def test_nrrd_refusals():
    good = encode_nrrd(np.zeros((4, 4, 4), np.int16), np.eye(4), 1)
    with pytest.raises(NrrdError, match="truncated"):
        decode_nrrd(good[:-5])
    with pytest.raises(NrrdError, match="more voxel data"):
        decode_nrrd(encode_nrrd(np.zeros((4, 4, 4), np.int16), np.eye(4), 0) + b"xx")
    with pytest.raises(NrrdTooLarge, match="limit"):  # from the header, before any voxel
        decode_nrrd(good, max_voxel_bytes=100)
    bomb = good.split(b"\n\n")[0].replace(b"sizes: 4 4 4", b"sizes: 4 4 2") + b"\n\n" + gzip.compress(bytes(128))
    with pytest.raises(NrrdError, match="more voxel data"):  # decompresses no more than the header says
        decode_nrrd(bomb)
    for text, match in ((b"hello\n\n", "not an NRRD"), (b"NRRD0004\ntype: short\ndimension: 4\n\n", "dimension"),
                        (b"NRRD0004\ntype: block\n\n", "type"), (b"NRRD0004\ndata file: x.raw\n\n", "detached")):
        with pytest.raises(NrrdError, match=match):
            decode_nrrd(text)
    with pytest.raises(ValueError):
        encode_nrrd(np.zeros((2, 2), np.uint8), np.eye(4))


# ---- job options ------------------------------------------------------------------------
@pytest.mark.parametrize("options, match", [
    ({"overlap": 1.0}, "overlap"), ({"overlap": "0.5"}, "overlap"), ({"precision": "int8"}, "precision"),
    ({"sw_batch_size": 0}, "sw-batch-size"), ({"box": [[0, 0], [1, 1]]}, "box"), ({"box": [[0, 0, float("nan")],
                                                                                         [1, 1, 1]]}, "box"),
    ({"colour": 1}, "unknown option"), ({"model": ""}, "model"), ("x", "JSON object"),
])
def test_job_options_refused(options, match):
    with pytest.raises(UserError, match=match):
        JobOptions.from_dict(options)


def test_job_options_round_trip_through_the_header():
    o = JobOptions(model="tiny", device="cpu", overlap=0.5, precision="float32", sw_batch_size=2,
                   box=((3, -1, 2), (0, 4, 5)))
    assert o.box == ((0.0, -1.0, 2.0), (3.0, 4.0, 5.0))
    assert JobOptions.from_header(o.to_header()) == o and JobOptions.from_header(None) == JobOptions()
    with pytest.raises(UserError, match="not JSON"):
        JobOptions.from_header("{")


# ---- tokens -----------------------------------------------------------------------------
def test_token_file_made_private_once_and_kept(tmp_path):
    path, made = auth.ensure_token_file(tmp_path / "sub" / "token")
    assert made and path.stat().st_mode & 0o777 == 0o600 and auth.private(path)
    token = auth.read_tokens(path)[0][1]
    assert len(token) >= 40
    assert auth.ensure_token_file(path) == (path, False) and auth.read_tokens(path)[0][1] == token
    for text, match in (("short\n", "at least 16"), ("# nothing\n", "holds no token"),
                        ("a b c\n", "a name and a token")):
        (tmp_path / "bad").write_text(text)
        with pytest.raises(UserError, match=match):
            auth.read_tokens(tmp_path / "bad")


def test_token_check_is_constant_time_and_reloads(tmp_path, monkeypatch):
    path = tmp_path / "tokens"
    path.write_text("alice " + "a" * 43 + "\n" + "b" * 43 + "  # bob\n")
    store = auth.TokenStore(path)
    calls = []
    real = auth.hmac.compare_digest
    monkeypatch.setattr(auth.hmac, "compare_digest", lambda x, y: calls.append((x, y)) or real(x, y))
    assert store.check("a" * 43) == "alice" and store.check("b" * 43) == "token-2"
    assert store.check("a" * 42 + "c") is None and store.check("") is None and store.check("é" * 43) is None
    assert store.check(None) is None
    # every presented token went through hmac.compare_digest against every token, a match
    # included: no early exit, no == on a secret
    assert len(calls) == 2 * 5 and all(isinstance(x, bytes) for pair in calls for x in pair)
    source = Path(auth.__file__).read_text()
    assert "compare_digest(candidate, token)" in source and "candidate ==" not in source
    time.sleep(0.01)
    path.write_text("carol " + "c" * 43 + "\n")  # revoked and added without a restart
    assert store.check("a" * 43) is None and store.check("c" * 43) == "carol"


def test_serve_refuses_what_it_must_before_listening(tmp_path, capsys, monkeypatch):
    from SwinUNETRSegmentLib.cli import main

    monkeypatch.setenv("SWINUNETR_SEGMENT_HOME", str(tmp_path))
    cases = [(["--host", "0.0.0.0", "--no-token"], "refusing to serve 0.0.0.0 without a token"),
             (["--tls-cert", str(tmp_path / "c.pem")], "both --tls-cert and --tls-key"),
             (["--tls-cert", str(tmp_path / "c.pem"), "--tls-key", str(tmp_path / "k.pem")], "TLS file not found"),
             (["--models", "nope"], "unknown model 'nope'"), (["--max-queue", "-1"], "--max-queue"),
             (["--token-file", str(tmp_path / "empty")], "holds no token")]
    (tmp_path / "empty").write_text("")
    for argv, fragment in cases:
        assert main(["serve", *argv]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and fragment in err, err


# ---- the job queue with a stand-in engine ------------------------------------------------
class StandIn:
    """A window of ``seconds`` per voxel along i; labels: voxels above 0."""

    def __init__(self, card, seconds=0.05):
        self.card, self.seconds, self.overlap, self.sw_batch_size = card, seconds, 0.25, 1

    def segment(self, volume, progress=None, cancel=None):
        windows = volume.shape[0]
        for w in range(windows):
            if cancel is not None and cancel.is_set():
                raise CancelledError("segmentation cancelled")
            time.sleep(self.seconds)
            progress(Progress("inference", 0.1 + 0.8 * (w + 1) / windows, None, "", w + 1, windows))
        labels = (volume.array > 0).astype(np.uint8)
        return SegmentationResult(Volume(labels, volume.ijk_to_ras.copy()), self.card, "cpu", {"total": 0.0}, {})


@pytest.fixture()
def manager(tmp_path, tiny_checkpoint, monkeypatch):
    from test_service import make_home

    from SwinUNETRSegmentLib.service.jobs import JobManager

    monkeypatch.setenv("SWINUNETR_SEGMENT_HOME", str(make_home(tmp_path, tiny_checkpoint)))
    m = JobManager(None, max_queue=1, lease_s=0.6, result_ttl_s=0.8,
                   segmenter_factory=lambda card, *a: StandIn(card, seconds=0.1))
    yield m
    m.close()


def _until(check, what):
    deadline = time.monotonic() + 60
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


def test_jobs_run_one_after_the_other_and_the_queue_is_bounded(manager):
    from SwinUNETRSegmentLib.service.jobs import Busy, UnknownModel

    vol = Volume(np.arange(-30, 30, dtype=np.int16).reshape(5, 4, 3), OBLIQUE)
    a = manager.submit("u", JobOptions(model="tiny"), vol)
    _until(lambda: a.state == "running", "the first job to start")
    b = manager.submit("u", JobOptions(model="tiny"), vol)
    with pytest.raises(Busy, match="try again in about") as busy:
        manager.submit("u", JobOptions(model="tiny"), vol)
    assert busy.value.retry_after >= 5
    with pytest.raises(UnknownModel, match="this server's models: .*tiny"):
        manager.submit("u", JobOptions(model="nope"), vol)
    with pytest.raises(KeyError):
        manager.get("someone else", a.id)  # a job is its owner's
    stop = threading.Event()

    def keep_polling():  # the lease is renewed by polls
        while not stop.is_set():
            for j in (a, b):
                with contextlib.suppress(KeyError):
                    manager.get("u", j.id)
            time.sleep(0.05)

    poller = threading.Thread(target=keep_polling)
    poller.start()
    try:
        _until(lambda: b.state == "done", "both jobs")
    finally:
        stop.set()
        poller.join()
    assert a.state == "done" and b.started >= a.finished  # one device: one job at a time
    labels = manager.take("u", b.id)
    assert np.array_equal(labels.array, vol.array > 0) and b.id not in {j.id for j in manager.jobs()}
    _until(lambda: a.id not in {j.id for j in manager.jobs()}, "the unfetched job's ttl")


def test_a_job_nobody_polls_is_cancelled(manager):
    vol = Volume(np.ones((50, 4, 3), np.int16), np.eye(4))  # 5 s of windows; the lease is 0.6 s
    job = manager.submit("u", JobOptions(model="tiny"), vol)
    _until(lambda: job.state == "cancelled", "the lease")
    assert "client went away" in job.error and job.done < 50


def test_a_box_segments_its_voxels_only(manager):
    from SwinUNETRSegmentLib.service.jobs import crop_to_box

    vol = Volume(np.ones((20, 10, 8), np.int16), make_affine((2.0, 1.0, 3.0), np.eye(3), (10.0, 0.0, 0.0)))
    sub, where = crop_to_box(vol, ((13.9, 2.0, -1.0), (20.1, 7.0, 9.0)))
    assert where == (slice(2, 6), slice(2, 8), slice(0, 4)) and sub.shape == (4, 6, 4)
    assert np.allclose(sub.ijk_to_world([0, 0, 0]), vol.ijk_to_world([2, 2, 0]))
    with pytest.raises(UserError, match="fewer than 2 voxels"):
        crop_to_box(vol, ((500, 500, 500), (600, 600, 600)))
    job = manager.submit("u", JobOptions(model="tiny", box=((13.9, 2.0, -1.0), (20.1, 7.0, 9.0))), vol)
    _until(lambda: manager.get("u", job.id).state == "done", "the box job")  # polled: its lease renewed
    expected = np.zeros(vol.shape, np.uint8)
    expected[where] = 1
    assert np.array_equal(manager.take("u", job.id).array, expected) and job.result["box"] == [[2, 6], [2, 8], [0, 4]]


# ---- the client in Slicer's Python ------------------------------------------------------
#: Slicer 5.10's Python packages (../shared/data/slicer-5.10-python.txt), import names
SLICER_PACKAGES = {"SimpleITK", "vtk", "vtkmodules", "qt", "ctk", "slicer", "deprecated", "git", "github", "jwt",
                   "nacl", "certifi", "cffi", "chardet", "charset_normalizer", "couchdb", "cryptography",
                   "dicomweb_client", "gitdb", "idna", "numpy", "packaging", "PIL", "pip", "pycparser", "pydicom",
                   "pyparsing", "dateutil", "requests", "retrying", "scipy", "setuptools", "six", "smmap",
                   "typing_extensions", "urllib3", "wheel", "wrapt", "_cffi_backend"}

BLOCKER = r"""
import importlib.abc, sys
allowed = set(sys.stdlib_module_names) | set(sys.argv[1].split(",")) | {"SwinUNETRSegmentLib"}
class SlicerPython(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        top = name.partition(".")[0]
        if top not in allowed and not top.startswith("__editable__"):
            raise ImportError(f"{top} is not in Slicer 5.10's Python")
sys.meta_path.insert(0, SlicerPython())
before = set(sys.modules)
import SwinUNETRSegmentLib.service.client as client
from SwinUNETRSegmentLib.service.client import Client, LocalEngine, local_engine
import SwinUNETRSegmentLib.service.local
for name in ("torch", "monai", "fastapi", "nibabel", "nrrd"):
    try:
        __import__(name)
        raise SystemExit(f"{name} was importable: the blocker does not work")
    except ImportError:
        pass
print(" ".join(sorted({m.partition(".")[0] for m in set(sys.modules) - before})))
"""


def test_client_imports_with_only_slicers_packages():
    listed = REPO.parent / "shared" / "data" / "slicer-5.10-python.txt"
    if listed.is_file():  # the list of record, where the checkout has it: every package in it is known here
        names = {ln.split("==")[0].split("#")[0].strip() for ln in listed.read_text().splitlines()
                 if "==" in ln and not ln.startswith(("#", "python=="))}
        renamed = {"Deprecated": "deprecated", "GitPython": "git", "PyGithub": "github", "PyJWT": "jwt",
                   "PyNaCl": "nacl", "charset-normalizer": "charset_normalizer", "dicomweb-client": "dicomweb_client",
                   "pillow": "PIL", "python-dateutil": "dateutil"}
        assert {renamed.get(n, n) for n in names} <= SLICER_PACKAGES
    out = subprocess.run([sys.executable, "-c", BLOCKER, ",".join(sorted(SLICER_PACKAGES))], capture_output=True,
                         text=True, timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    loaded = set(out.stdout.split())
    assert {"requests", "numpy", "SwinUNETRSegmentLib"} <= loaded
    assert not loaded & {"torch", "monai", "fastapi", "uvicorn", "nibabel", "nrrd", "slicerio", "platformdirs"}


# ---- the local engine's address, without waiting ------------------------------------------
def test_local_engine_endpoint_is_none_while_it_starts_then_its_url_and_token(tmp_path):
    """What the Slicer side reads instead of the engine's files: never waits, None until the
    child listens, then a URL and token the child accepts; EngineStopped with the reason once
    it is gone (killed) or was stopped."""
    import requests

    from SwinUNETRSegmentLib.service.client import EngineStopped, LocalEngine

    engine = LocalEngine(python=sys.executable, env={"SWINUNETR_SEGMENT_HOME": str(tmp_path / "home")})
    with pytest.raises(EngineStopped, match="not running"):
        engine.endpoint()
    try:
        engine.start()
        answers, deadline = [], time.monotonic() + 120
        while not answers or answers[-1] is None:
            assert time.monotonic() < deadline, f"no endpoint; engine log: {engine.log_path.read_text()[-2000:]}"
            t0 = time.perf_counter()
            answers.append(engine.endpoint())
            assert time.perf_counter() - t0 < 0.05, "endpoint() waited"
            time.sleep(0.02)
        assert answers[0] is None  # the child's Python had not even started
        url, token = answers[-1]
        assert url.startswith("http://127.0.0.1:") and len(token) >= 32
        r = requests.get(url + "/models", headers={"Authorization": f"Bearer {token}"}, timeout=30)
        assert r.status_code == 200 and isinstance(r.json(), list)
        assert requests.get(url + "/models", headers={"Authorization": "Bearer x" + token}, timeout=30).status_code \
            == 401
        engine.process.kill()
        engine.process.wait(30)
        with pytest.raises(EngineStopped, match="killed by SIGKILL"):
            engine.endpoint()
    finally:
        engine.stop()
    with pytest.raises(EngineStopped, match="not running"):
        engine.endpoint()
