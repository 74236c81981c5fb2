"""The panel's logic between clicks (SwinUNETRSegmentSlicer.controller, .download, .models):
the progress bar never restarts after a weights download, Apply does nothing while the
packages install, a scan goes to a server only after one yes per server, the engine is let
go on cleanup() and when "Keep the model loaded" is off, the weights download runs in a
child process the timer follows, models whose publisher gives no checksum are not offered
for download, and when "Run on" is a server the model list is the one a real
`swinunetr-segment serve` answers (its served models and their cards), asked without waiting."""

from __future__ import annotations

import hashlib
import http.server
import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from test_slicer_support import frozen_gc

from SwinUNETRSegmentLib.models.cards import load_card
from SwinUNETRSegmentLib.progress import Progress
from SwinUNETRSegmentLib.service.protocol import JobOptions
from SwinUNETRSegmentSlicer import controller as ctl
from SwinUNETRSegmentSlicer import models, panel
from SwinUNETRSegmentSlicer.download import WeightsDownload
from SwinUNETRSegmentSlicer.enginerun import CANCELLED, DONE, ERROR, PROGRESS, JobEvent


class Scripted:
    """A download or engine run that reports the given events, one list per tick."""

    def __init__(self, *ticks):
        self.ticks, self.cancelled, self.busy, self.elapsed = list(ticks), False, False, 1.0

    def tick(self, budget=0.02):
        return self.ticks.pop(0) if self.ticks else []

    def cancel(self):
        self.cancelled = True


def progress(stage, fraction):
    return JobEvent(PROGRESS, Progress(stage, fraction, None, stage))


class FakeEngine:
    def __init__(self):
        self.stopped = 0

    def stop(self):
        self.stopped += 1


def drive(c, monkeypatch, run):
    """Start a run whose engine part is ``run``; returns every percent the bar showed."""
    monkeypatch.setattr(ctl, "EngineRun", lambda *args, **kwargs: run)
    shown, events = [], []
    assert c.start(np.zeros((2, 2, 2), np.int16), np.eye(4), JobOptions(), downloadModel="btcv")
    for _ in range(20):
        for event in c.tick():
            events.append(event)
            shown.append(c.percent)
        if not c.running:
            break
    return shown, events


def test_the_bar_goes_on_from_the_download_to_the_engine_and_never_back(monkeypatch):
    download = Scripted([progress("downloading weights", 0.5)], [progress("downloading weights", 1.0)],
                        [JobEvent(DONE, "btcv")])
    run = Scripted([progress("starting engine", 0.0)], [progress("loading model", 0.03)],
                   [progress("inference", 0.5)], [progress("inference", 0.2)], [JobEvent(DONE, "result")])
    c = ctl.Controller(localEngine=lambda create=True: FakeEngine(), download=lambda model: download)
    shown, events = drive(c, monkeypatch, run)
    assert shown == sorted(shown), shown  # never restarts at 0 when the engine part begins
    assert shown[:2] == [15, 30] and shown[2] >= 30 and shown[-1] == 100
    assert events[-1].kind == DONE and not c.running


def test_apply_while_the_packages_install_installs_nothing_twice():
    c = ctl.Controller(localEngine=lambda create=True: None)
    installs = []

    def install():
        installs.append(1)
        # pip_install and PyTorchUtils pump the event loop for every line: the user clicks Apply again
        assert not c.canApply
        assert c.install(install) is False
        assert not c.start(np.zeros((1, 1, 1)), np.eye(4), JobOptions())
        return True

    assert c.install(install) is True and installs == [1] and c.canApply


def test_a_scan_goes_to_a_server_only_after_a_yes_for_that_server():
    settings = {}
    consent = ctl.ServerConsent(settings)
    assert consent.needed("https://gpu.hospital.example:8443")
    consent.approve("https://GPU.hospital.example:8443/")
    assert not consent.needed("https://gpu.hospital.example:8443")
    assert consent.needed("https://other.example:8443") and consent.needed("http://gpu.hospital.example:8443")
    assert not consent.needed("http://127.0.0.1:8765")  # this computer: nothing leaves it
    assert ctl.ServerConsent(settings).needed("https://gpu.hospital.example") is True  # port 443 is another one


def test_cleanup_cancels_the_run_and_stops_the_local_engine(monkeypatch):
    engine = FakeEngine()
    run = Scripted(*([[progress("inference", 0.1)]] * 50))
    monkeypatch.setattr(ctl, "EngineRun", lambda *args, **kwargs: run)
    c = ctl.Controller(localEngine=lambda create=True: engine if create or engine else None)
    assert c.start(np.zeros((2, 2, 2)), np.eye(4), JobOptions())
    c.tick()
    c.cleanup()  # what the widget's cleanup() calls on a module reload
    assert run.cancelled and engine.stopped == 1 and not c.running


def test_keep_the_model_loaded_off_stops_the_engine_after_the_run(monkeypatch):
    engine = FakeEngine()
    for keep, stops in ((True, 0), (False, 1)):
        run = Scripted([JobEvent(DONE, "result")])
        monkeypatch.setattr(ctl, "EngineRun", lambda *args, run=run, **kwargs: run)
        c = ctl.Controller(localEngine=lambda create=True: engine)
        engine.stopped = 0
        c.start(np.zeros((2, 2, 2)), np.eye(4), JobOptions(), keepLoaded=keep)
        assert c.tick()[-1].kind == DONE
        assert engine.stopped == stops


def test_a_result_after_cancel_is_reported_cancelled(monkeypatch):
    run = Scripted([progress("inference", 0.5)], [JobEvent(DONE, "labels")])
    monkeypatch.setattr(ctl, "EngineRun", lambda *args, **kwargs: run)
    c = ctl.Controller(localEngine=lambda create=True: FakeEngine())
    c.start(np.zeros((2, 2, 2)), np.eye(4), JobOptions())
    c.tick()
    c.cancel()
    assert [e.kind for e in c.tick()] == [CANCELLED]


# ---- the models offered and their weights --------------------------------------------------------
def test_models_without_a_publisher_checksum_are_not_offered_for_download(tmp_path, monkeypatch):
    monkeypatch.setenv("SWINUNETR_SEGMENT_HOME", str(tmp_path))
    offered = dict(models.offered_models())
    assert {"demo", "btcv"} <= set(offered)
    for name in ("swin-unetr-btcv-base", "swin-unetr-btcv-small", "swin-unetr-btcv-tiny"):
        card = load_card(name)
        assert card.checkpoint.get("url") and not models.publisher_checksum(card)
        assert name not in offered and models.weights_url(card) is None
    assert models.weights_url(load_card("btcv")) == load_card("btcv").checkpoint["url"]
    assert models.weights_url(load_card("demo")) is None  # bundled
    assert models.default_model(list(offered.items())) == "demo"
    # weights installed by hand (from a copy the user trusts): then it is offered, with nothing to download
    weights = tmp_path / "models" / "swin-unetr-btcv-tiny" / "model.pt"
    weights.parent.mkdir(parents=True)
    weights.write_bytes(b"installed")
    assert "swin-unetr-btcv-tiny" in dict(models.offered_models())
    assert models.weights_url(load_card("swin-unetr-btcv-tiny")) is None


def test_engine_devices_come_from_its_info():
    info = {"devices": [{"device": "cuda:0", "name": "NVIDIA H200"}, {"device": "cpu", "name": "CPU"}]}
    assert panel.device_choices(panel.engine_devices(info))[0] == ("auto", "Automatic (GPU 0: NVIDIA H200)")
    assert panel.engine_devices({}) is None and panel.device_choices(None) == [("auto", "Automatic")]


@pytest.fixture
def weights_server(tmp_path):
    payload = b"weights" * 200_000
    (tmp_path / "www").mkdir()
    (tmp_path / "www" / "model.pt").write_bytes(payload)

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(tmp_path / "www"), **kwargs)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/model.pt", payload
    server.shutdown()
    server.server_close()


def user_card(home: Path, name: str, url: str, sha256: str) -> None:
    data = load_card("btcv").to_json()
    data["name"] = name
    data["checkpoint"] = {"url": url, "sha256": sha256}
    (home / "cards").mkdir(parents=True, exist_ok=True)
    (home / "cards" / f"{name}.json").write_text(json.dumps(data))


def follow(download, timeout=60):
    events, longest, deadline = [], 0.0, time.monotonic() + timeout
    with frozen_gc():
        while not download.finished and time.monotonic() < deadline:
            t0 = time.perf_counter()
            events += download.tick()
            longest = max(longest, time.perf_counter() - t0)
            time.sleep(0.01)
    events += download.tick()
    return events, longest


def test_weights_download_in_a_child_process_followed_by_the_timer(tmp_path, weights_server):
    url, payload = weights_server
    home = tmp_path / "home"
    user_card(home, "mine", url, hashlib.sha256(payload).hexdigest())
    events, longest = follow(WeightsDownload("mine", env={"SWINUNETR_SEGMENT_HOME": str(home)}))
    assert events[-1].kind == DONE, events[-1].value
    assert longest < 0.05
    assert (home / "models" / "mine" / "model.pt").read_bytes() == payload
    shown = [panel.progress_text(e.value) for e in events if e.kind == PROGRESS]
    assert shown and shown[-1].startswith("Downloading the model's weights: 1 of 1 MB")


def test_a_tampered_download_is_an_error_and_leaves_nothing(tmp_path, weights_server):
    url, _ = weights_server
    home = tmp_path / "home"
    user_card(home, "mine", url, "0" * 64)
    events, _ = follow(WeightsDownload("mine", env={"SWINUNETR_SEGMENT_HOME": str(home)}))
    assert events[-1].kind == ERROR and "the card expects" in str(events[-1].value)
    assert not list((home / "models").rglob("*.pt"))


# ---- a server's model list -------------------------------------------------------------------
def serve_tiny(tmp_path_factory, tiny_checkpoint):
    """A real `swinunetr-segment serve` (test_service's) serving only 'tiny', a model this
    computer's catalog lacks: (server, its card of 'tiny'); a generator for a fixture."""
    from test_service import home_card, make_home, start_server

    home = make_home(tmp_path_factory.mktemp("model-server"), tiny_checkpoint)
    server = start_server(home, "--models", "tiny")
    yield server, home_card(home)[0]
    server.stop()


@pytest.fixture(scope="module")
def model_server(tmp_path_factory, tiny_checkpoint):
    yield from serve_tiny(tmp_path_factory, tiny_checkpoint)


def list_models(c: ctl.Controller, where, timeout: float = 60.0):
    """Tick ``c`` as the panel's timer does until it stops; every event and the longest tick."""
    c.listModels(where)
    events, longest, deadline = [], 0.0, time.monotonic() + timeout
    with frozen_gc():
        while c.busy and time.monotonic() < deadline:
            t0 = time.perf_counter()
            events += c.tick()
            longest = max(longest, time.perf_counter() - t0)
            time.sleep(0.01)
    assert not c.busy, "the model list did not come"
    return events, longest


def test_the_model_list_of_a_server_is_the_server_s_own(model_server, tmp_path, monkeypatch):
    server, card = model_server
    monkeypatch.setenv("SWINUNETR_SEGMENT_HOME", str(tmp_path / "here"))
    assert "tiny" not in dict(models.offered_models())  # so the list below can only come from the server
    catalog = {m["name"]: m for m in server.client().models()}
    assert catalog["tiny"]["served"] and not catalog["btcv"]["served"]  # the server knows more than it serves
    events, longest = list_models(ctl.Controller(localEngine=lambda create=True: None),
                                  ctl.Where(server.url, server.token))
    assert [e.kind for e in events] == [ctl.MODELS] and longest < 0.05
    answer = events[0].value
    assert answer.error is None and answer.server == server.url and answer.leftOut == ()
    assert [name for name, _ in answer.models] == ["tiny"]
    assert answer.models[0][1].to_json() == card.to_json()  # the server's card, labels and all
    assert panel.model_choices(answer.models) == [("tiny", card.title, panel.model_tooltip(card))]


def test_a_server_s_model_list_that_cannot_be_had_is_one_line(model_server):
    server, _ = model_server
    c = ctl.Controller(localEngine=lambda create=True: None)
    (wrong,), _ = list_models(c, ctl.Where(server.url, "x" * 43))
    assert wrong.kind == ctl.MODELS and wrong.value.models == ()
    assert wrong.value.error.startswith("cannot list the server's models: wrong token")
    url = f"http://127.0.0.1:{free_port()}"
    (gone,), _ = list_models(c, ctl.Where(url, "token"))
    assert "cannot reach the engine at " + url in gone.value.error and "Connection refused" in gone.value.error
    (bad,), _ = list_models(c, ctl.Where("gpu.example:8443", "token"))
    assert "is not http(s)://HOST:PORT" in bad.value.error
    for answer in (wrong, gone, bad):
        assert "\n" not in answer.value.error


def test_a_new_question_or_this_computer_drops_the_one_on_its_way(model_server):
    server, _ = model_server
    c = ctl.Controller(localEngine=lambda create=True: None)
    c.listModels(ctl.Where(server.url, server.token))
    assert c.busy
    c.listModels(ctl.THIS_COMPUTER)  # "Run on" went back to this computer before the answer
    assert not c.busy and c.tick() == []
    c.listModels(ctl.Where(server.url, "x" * 43))  # a wrong token, then the right one before the answer
    events, _ = list_models(c, ctl.Where(server.url, server.token))
    assert len(events) == 1 and events[0].value.error is None
    assert [name for name, _ in events[0].value.models] == ["tiny"]


def test_server_fields_keep_one_token_per_server_and_say_where_a_run_goes():
    store = {}
    servers = ctl.ServerSettings(store)
    servers.setToken("https://GPU.example:8443/", " secret ")
    assert servers.token("https://gpu.example:8443") == "secret" and servers.token("https://other:8443") == ""
    assert store == {"SwinUNETRSegment/ServerTokens/https://gpu.example:8443": "secret"}  # the key the panel used
    assert servers.where("server", " https://gpu.example:8443 ") == ctl.Where("https://gpu.example:8443", "secret")
    assert servers.where("server", "https://other:8443") == ctl.Where("https://other:8443", None)
    assert servers.where("local", "https://gpu.example:8443") == ctl.THIS_COMPUTER
    assert servers.where("server", "  ") == ctl.THIS_COMPUTER
    assert servers.consent.needed("https://gpu.example:8443")


def test_tokens_live_in_a_file_only_the_user_can_read_not_in_slicers_settings(tmp_path, caplog):
    store = {"SwinUNETRSegment/ServerTokens/https://old.example:443": "from-an-earlier-version",
             "SwinUNETRSegment/ApprovedServers/https://old.example:443": "yes"}
    tokens = ctl.TokenFile(tmp_path / "SwinUNETRSegment" / "server-tokens.json")
    servers = ctl.ServerSettings(store, tokens)
    servers.setToken("https://GPU.example:8443/", " secret ")
    assert servers.where("server", "https://gpu.example:8443") == ctl.Where("https://gpu.example:8443", "secret")
    # an earlier version's token moves out of the settings; the yes stays there
    assert servers.token("https://old.example") == "from-an-earlier-version"
    assert store == {"SwinUNETRSegment/ApprovedServers/https://old.example:443": "yes"}
    assert "secret" not in repr(store)
    assert (tokens.path.stat().st_mode & 0o777) == 0o600
    assert [p.name for p in tokens.path.parent.iterdir()] == ["server-tokens.json"]  # no temporary left
    again = ctl.ServerSettings({}, ctl.TokenFile(tokens.path))  # Slicer restarted
    assert again.token("https://gpu.example:8443") == "secret"
    again.setToken("https://gpu.example:8443", "")  # cleared: gone from the file
    assert again.token("https://gpu.example:8443") == "" and "gpu" not in tokens.path.read_text()
    tokens.path.write_text("{not json")  # a damaged file: no tokens, one log line, asked again
    assert again.token("https://old.example") == ""
    assert "cannot read the server tokens" in caplog.text


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
