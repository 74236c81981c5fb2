"""Catalog and downloads against a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import dataclasses
import hashlib
import http.server
import json
import os
import re
import stat
import threading
from pathlib import Path

import pytest

from SwinUNETRSegmentLib.cli import main
from SwinUNETRSegmentLib.errors import UserError
from SwinUNETRSegmentLib.models import catalog
from SwinUNETRSegmentLib.models.cards import load_card

PAYLOAD = bytes(range(256)) * 4096  # 1 MiB "checkpoint"


class Handler(http.server.BaseHTTPRequestHandler):
    """/good: the file; /tampered: one byte changed; /drop: always cut midway;
    /drop-once: cut midway once, then honours Range."""

    drops = {"count": 0}

    def log_message(self, *args):
        pass

    def do_GET(self):
        data = PAYLOAD
        if self.path == "/tampered":
            data = PAYLOAD[:1000] + b"X" + PAYLOAD[1001:]
        start = 0
        rng = self.headers.get("Range")
        if rng and self.path == "/drop-once":
            start = int(rng.split("=")[1].split("-")[0])
        if self.path not in ("/good", "/tampered", "/drop", "/drop-once"):
            self.send_error(404)
            return
        self.send_response(206 if start else 200)
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        cut = self.path == "/drop" or (self.path == "/drop-once" and Handler.drops["count"] == 0)
        if cut:
            Handler.drops["count"] += 1
            self.wfile.write(data[start:start + len(data) // 3])
            self.wfile.flush()
            self.connection.shutdown(2)
            return
        self.wfile.write(data[start:])


@pytest.fixture()
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    Handler.drops["count"] = 0
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


@pytest.fixture()
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("SWINUNETR_SEGMENT_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def add_test_card(tmp_path, url, sha256=None, md5=None, name="served"):
    data = load_card("btcv").to_json()
    data["name"] = name
    data["checkpoint"] = {"url": url}
    if sha256:
        data["checkpoint"]["sha256"] = sha256
    if md5:
        data["checkpoint"]["md5"] = md5
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(data))
    return catalog.add_card(path)


def leftovers(home: Path) -> list[Path]:
    return [p for p in home.rglob("*") if p.is_file() and ".part" in p.name]


def test_good_download_verifies_caches_and_hits(tmp_path, home, server):
    add_test_card(tmp_path, f"{server}/good", sha256=hashlib.sha256(PAYLOAD).hexdigest())
    seen = []
    path = catalog.download("served", progress=lambda d, t: seen.append((d, t)))
    assert path.read_bytes() == PAYLOAD
    assert seen[-1] == (len(PAYLOAD), len(PAYLOAD))
    mtime = path.stat().st_mtime_ns
    # Second download: a cache hit, no request needed (the server is gone).
    assert catalog.download("served", url="http://127.0.0.1:9/never") == path
    assert path.stat().st_mtime_ns == mtime
    card, weights = catalog.resolve_model("served")
    assert weights == path and card.name == "served"


def test_publisher_md5_is_checked(tmp_path, home, server):
    add_test_card(tmp_path, f"{server}/good", md5=hashlib.md5(PAYLOAD).hexdigest())
    assert catalog.download("served").read_bytes() == PAYLOAD


def test_tampered_download_is_refused_and_leaves_nothing(tmp_path, home, server):
    add_test_card(tmp_path, f"{server}/tampered", sha256=hashlib.sha256(PAYLOAD).hexdigest())
    with pytest.raises(UserError, match="refusing the download of 'served'.*sha256"):
        catalog.download("served")
    assert not catalog.is_installed(catalog.card_of("served"))
    assert leftovers(home) == []


def test_connection_dropped_midway_leaves_nothing(tmp_path, home, server):
    add_test_card(tmp_path, f"{server}/drop", sha256=hashlib.sha256(PAYLOAD).hexdigest())
    with pytest.raises(UserError, match="failed after 2 retries"):
        catalog.download("served", retries=2)
    assert not catalog.is_installed(catalog.card_of("served"))
    assert leftovers(home) == []


def test_dropped_connection_resumes(tmp_path, home, server):
    add_test_card(tmp_path, f"{server}/drop-once", sha256=hashlib.sha256(PAYLOAD).hexdigest())
    assert catalog.download("served").read_bytes() == PAYLOAD
    assert Handler.drops["count"] == 1


def test_install_verifies_a_hand_copied_file(tmp_path, home):
    add_test_card(tmp_path, "http://unused.invalid/x", sha256=hashlib.sha256(PAYLOAD).hexdigest())
    good, bad = tmp_path / "good.pt", tmp_path / "bad.pt"
    good.write_bytes(PAYLOAD)
    bad.write_bytes(PAYLOAD[:-1] + b"!")
    with pytest.raises(UserError, match="not the checkpoint model card 'served' names"):
        catalog.install_file("served", bad)
    assert leftovers(home) == [] and not catalog.is_installed(catalog.card_of("served"))
    assert catalog.install_file("served", good).read_bytes() == PAYLOAD
    assert catalog.remove("served") is not None
    assert not catalog.is_installed(catalog.card_of("served"))


def test_models_command_line(tmp_path, home, server, capsys):
    add_test_card(tmp_path, f"{server}/tampered", sha256=hashlib.sha256(PAYLOAD).hexdigest())
    assert main(["models", "list"]) == 0
    out = capsys.readouterr().out
    assert "btcv" in out and "served" in out and "not installed" in out
    assert main(["models", "info", "btcv"]) == 0
    out = capsys.readouterr().out
    assert "liver" in out and "50dd67a01b28a1d5487fd9ac27e682fb" in out
    assert main(["models", "download", "served"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "refusing the download" in err
    assert main(["models", "download", "served", "--url", f"{server}/good"]) == 0
    assert main(["models", "info", "nonexistent"]) == 2
    assert "known models" in capsys.readouterr().err


def test_card_without_checksum_cannot_be_downloaded(tmp_path, home, server):
    add_test_card(tmp_path, f"{server}/good")
    with pytest.raises(UserError, match="gives no sha256 or md5"):
        catalog.download("served")


def test_publisher_without_checksum_needs_one_the_user_trusts(tmp_path, home, server):
    add_test_card(tmp_path, f"{server}/good")
    good = hashlib.sha256(PAYLOAD).hexdigest()
    with pytest.raises(UserError, match="pass --sha256"):
        catalog.download("served")
    with pytest.raises(UserError, match="refusing the download"):
        catalog.download("served", sha256="0" * 64)
    assert leftovers(home) == []
    assert catalog.download("served", sha256=good).read_bytes() == PAYLOAD


def test_research_contributions_cards_are_documented():
    for name, fs in (("swin-unetr-btcv-base", 48), ("swin-unetr-btcv-small", 24), ("swin-unetr-btcv-tiny", 12)):
        card = catalog.card_of(name)
        assert card.network_args["feature_size"] == fs
        assert card.checkpoint["url"].startswith("https://github.com/Project-MONAI/MONAI-extra-test-data/")
        assert card.license and card.citation and len(card.labels) == 13


# ---------------------------------------------------------------------------------------
# the catalog's files get the umask's mode (not the 0600 of a temporary file)
# ---------------------------------------------------------------------------------------
def _mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("mask", [0o022, 0o002], ids=oct)
def test_installed_downloaded_and_added_files_get_the_umask_s_mode(tmp_path, home, server, mask):
    good = hashlib.sha256(PAYLOAD).hexdigest()
    copied = tmp_path / "copied.pt"
    copied.write_bytes(PAYLOAD)
    old = os.umask(mask)
    try:
        add_test_card(tmp_path, f"{server}/good", sha256=good, name="fetched")
        add_test_card(tmp_path, "http://unused.invalid/x", sha256=good, name="copied")
        downloaded = catalog.download("fetched")
        installed = catalog.install_file("copied", copied)
    finally:
        os.umask(old)
    files = [downloaded, installed, catalog.user_cards_dir() / "fetched.json", catalog.user_cards_dir() / "copied.json"]
    for p in files:
        assert _mode(p) == 0o666 & ~mask, f"{p}: {oct(_mode(p))} under umask {oct(mask)}"
    assert leftovers(home) == []


# ---------------------------------------------------------------------------------------
# a model's name becomes catalog paths: only usable names are taken
# ---------------------------------------------------------------------------------------
def _files_outside(root: Path, inside: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and inside not in p.parents]


def test_models_add_refuses_a_card_named_to_escape_the_catalog(tmp_path, monkeypatch, capsys):
    root = tmp_path / "root"
    home = root / "a" / "b" / "home"
    monkeypatch.setenv("SWINUNETR_SEGMENT_HOME", str(home))
    data = load_card("btcv").to_json()
    data["name"] = "../../evil"
    card = tmp_path / "evil.json"
    card.write_text(json.dumps(data))
    assert main(["models", "add", str(card)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'../../evil' is not a usable model name" in err and "Traceback" not in err
    assert _files_outside(root, home) == [] and not home.exists()
    with pytest.raises(UserError, match="not a usable model name"):
        catalog.add_card(card)


@pytest.mark.parametrize("name", ["../x", "a/b", "..", "a..b", ".hidden", "", "x" * 65, "with space", "c:\\x"])
def test_names_that_are_no_usable_model_name_are_refused_wherever_they_become_paths(tmp_path, home, name):
    from SwinUNETRSegmentLib.models.cards import card_from_dict, is_model_name

    assert not is_model_name(name)
    data = load_card("btcv").to_json()
    data["name"] = name
    with pytest.raises(UserError, match="not a usable model name"):
        card_from_dict(data)
    with pytest.raises(UserError, match=f"unknown model '{re.escape(name)}'"):
        catalog.card_of(name)
    unchecked = dataclasses.replace(load_card("btcv"), name=name)  # a card built in code, not read
    with pytest.raises(UserError, match="not a usable model name"):
        catalog.installed_path(unchecked)


def test_a_user_card_may_not_point_its_bundled_weights_outside_the_package(tmp_path, home):
    data = load_card("btcv").to_json()
    data["name"] = "sneaky"
    data["checkpoint"] = {"bundled": "../../../../etc/passwd", "sha256": "0" * 64}
    path = tmp_path / "sneaky.json"
    path.write_text(json.dumps(data))
    catalog.add_card(path)
    with pytest.raises(UserError, match="'bundled' must be a file name"):
        catalog.resolve_model("sneaky")
