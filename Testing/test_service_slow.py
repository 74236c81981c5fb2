"""The engine service, slow tier: two clients at once, 20 jobs in a row (the server's memory),
TLS with a certificate made here, the local engine process (killed mid-job, restarted,
ended with its parent), a client that stops polling, a box, an upload cut off."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest
from test_service import PATIENCE, home_card, long_volume, make_home, start_server, wait_for, without_date

from SwinUNETRSegmentLib.geometry import Volume
from SwinUNETRSegmentLib.service.client import Client, EngineStopped, ServiceError
from SwinUNETRSegmentLib.service.local import LocalEngine
from SwinUNETRSegmentLib.service.protocol import JobOptions

pytestmark = pytest.mark.slow

TINY = JobOptions(model="tiny")


@pytest.fixture(scope="module")
def home(tmp_path_factory, tiny_checkpoint):
    return make_home(tmp_path_factory.mktemp("service-slow"), tiny_checkpoint)


@pytest.fixture(scope="module")
def server(home):
    s = start_server(home, "--lease-s", "3")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def example_ct_path(reference_files):
    return reference_files / "example_ct.nii.gz"


@pytest.fixture(scope="module")
def example_ct(example_ct_path):
    from SwinUNETRSegmentLib.fileio.read import read_volume

    return read_volume(example_ct_path)[0]


@pytest.fixture(scope="module")
def segmenter(home):
    from SwinUNETRSegmentLib.inference.engine import Segmenter
    from SwinUNETRSegmentLib.inference.options import FastPath

    card, weights = home_card(home)
    return Segmenter(card, weights, device="auto", fast=FastPath(backend="torch"))


@pytest.fixture(scope="module")
def in_process(segmenter, example_ct):
    return segmenter.segment(example_ct)


def run_job(client: Client, vol: Volume, options: JobOptions = TINY):
    """(the job's last status, its result), polling."""
    job = client.submit(vol.array, vol.ijk_to_ras, options=options)
    status = wait_for(job.poll, lambda st: st.state in ("done", "failed", "cancelled"), "the job")
    assert status.state == "done", status.error
    return status, job.result()


def test_two_clients_at_once_are_served_one_after_the_other(server, example_ct, in_process):
    out = {}

    def client(name):
        out[name] = run_job(server.client(), example_ct)

    threads = [threading.Thread(target=client, args=(n,)) for n in "ab"]
    for t in threads:
        t.start()
    for t in threads:
        t.join(PATIENCE)
    (first, a), (second, b) = sorted(out.values(), key=lambda sr: sr[0].started)
    assert second.started >= first.finished  # one device: one job at a time, the other waited
    assert np.array_equal(a.labels, in_process.labels.array) and np.array_equal(b.labels, in_process.labels.array)


def test_twenty_jobs_in_a_row_hold_the_servers_memory(server, example_ct, in_process):
    client, sizes = server.client(), []
    for n in range(20):
        _, res = run_job(client, example_ct)
        assert np.array_equal(res.labels, in_process.labels.array), n
        time.sleep(0.2)
        sizes.append(server.rss())
    assert max(sizes[2:]) <= sizes[1] * 1.05, [f"{s / 2**20:.0f} MiB" for s in sizes]


def test_a_client_that_stops_polling_has_its_job_cancelled(server, example_ct):
    vol = Volume(np.concatenate([example_ct.array] * 6, axis=0), example_ct.ijk_to_ras)  # 39 windows
    job = server.client().submit(vol.array, vol.ijk_to_ras, options=JobOptions(model="tiny", overlap=0.875))
    wait_for(job.poll, lambda st: st.state == "running", "the job to start")
    time.sleep(3 + 2)  # the lease (3 s), then the reaper's round; no poll meanwhile
    st = wait_for(job.poll, lambda st: st.state != "running", "the job to stop")
    assert st.state == "cancelled" and "client went away" in st.error and st.done < st.total, st


def test_an_upload_cut_off_makes_no_job_and_the_server_goes_on(server, example_ct, in_process):
    host, port = server.url.rsplit("/", 1)[1].split(":")
    with socket.create_connection((host, int(port)), timeout=60) as sock:
        sock.sendall(f"POST /jobs/upload HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {server.token}\r\n"
                     f"Content-Length: {10 << 20}\r\n\r\n".encode() + b"NRRD0004\n" + bytes(1 << 20))
    _, res = run_job(server.client(), example_ct)
    assert np.array_equal(res.labels, in_process.labels.array)


def test_a_box_segments_what_the_engine_does_on_the_box(server, example_ct, segmenter):
    from SwinUNETRSegmentLib.service.jobs import crop_to_box

    lo = example_ct.ijk_to_world([10, 10, 20])[0]
    hi = example_ct.ijk_to_world([100, 90, 100])[0]
    box = (tuple(lo), tuple(hi))
    _, res = run_job(server.client(), example_ct, JobOptions(model="tiny", box=box))
    crop, where = crop_to_box(example_ct, box)
    expected = np.zeros(example_ct.shape, np.uint8)
    expected[where] = segmenter.segment(crop).labels.array
    assert np.array_equal(res.labels, expected) and not res.labels[:where[0].start].any()


def test_tls_with_a_certificate_made_here(home, tmp_path, example_ct, example_ct_path, in_process, capsys,
                                          monkeypatch):
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "server.pem"))
    cert.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    server = start_server(home, "--tls-cert", str(tmp_path / "server.pem"), "--tls-key", str(tmp_path / "key.pem"))
    try:
        assert server.url.startswith("https://127.0.0.1:")
        _, res = run_job(server.client(verify=str(tmp_path / "ca.pem")), example_ct)
        assert np.array_equal(res.labels, in_process.labels.array)
        with pytest.raises(ServiceError, match="TLS with .* failed .*certificate verify failed.*REQUESTS_CA_BUNDLE"):
            server.client().health()  # a certificate no CA of the system signed
        with pytest.raises(ServiceError) as err:
            Client(server.url.replace("https", "http"), server.token).health()
        assert "\n" not in str(err.value)
        from SwinUNETRSegmentLib.cli import main
        from SwinUNETRSegmentLib.fileio.write import write_segmentation

        monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(tmp_path / "ca.pem"))
        argv = ["-i", str(example_ct_path), "-o", str(tmp_path / "remote.seg.nrrd"), "--model", "tiny", "--server",
                server.url, "--token-file", str(server.token_file)]
        assert main(argv) == 0, capsys.readouterr().err
        write_segmentation(tmp_path / "local.seg.nrrd", in_process.labels, in_process.card.labels)
        assert without_date((tmp_path / "remote.seg.nrrd").read_bytes()) == \
            without_date((tmp_path / "local.seg.nrrd").read_bytes())
    finally:
        server.stop()


def test_local_engine_killed_mid_job_restarts_and_ends_with_its_parent(home, example_ct, in_process, tmp_path):
    # on PyTorch, as the in-process run it is compared with voxel for voxel (the engine
    # process would otherwise convert the model for OpenVINO on its first job)
    engine = LocalEngine(args=["--backend", "torch"], env={"SWINUNETR_SEGMENT_HOME": str(home)})
    try:
        client = engine.client()
        first_pid = engine.process.pid
        vol = long_volume(example_ct)
        job = client.submit(vol.array, vol.ijk_to_ras, options=JobOptions(model="tiny", overlap=0.75))
        wait_for(job.poll, lambda st: st.state == "running" and st.done >= 1, "the job's first window")
        engine.process.kill()
        with pytest.raises(EngineStopped) as err:
            wait_for(job.poll, lambda st: False, "the client to notice")
        assert str(err.value) == "the engine process stopped (killed by SIGKILL); the next run starts a new one"
        res = engine.client().segment(example_ct.array, example_ct.ijk_to_ras, options=TINY)  # a new process
        assert engine.process.pid != first_pid and np.array_equal(res.labels, in_process.labels.array)
    finally:
        engine.stop()
    assert not engine.alive
    # a parent that dies without cleaning up (no atexit): its engine notices the closed pipe and ends
    script = textwrap.dedent(f"""
        import os, sys
        from SwinUNETRSegmentLib.service.client import local_engine
        engine = local_engine(env={{"SWINUNETR_SEGMENT_HOME": {str(home)!r}}})
        engine.client()
        print(engine.process.pid, flush=True)
        os._exit(0)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=PATIENCE)
    pid = int(out.stdout.split()[0])
    deadline = time.monotonic() + 60
    while _running(pid):
        assert time.monotonic() < deadline, "the engine outlived its parent"
        time.sleep(0.1)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = f"/proc/{pid}/status"
    return not (os.path.exists(status) and "State:\tZ" in open(status).read())
