"""The model catalog: named models, each a card and a checkpoint verified by checksum.

- Built-in cards ship in the package (``cards/*.json``); a card whose checkpoint says
  ``"bundled": FILE`` has its weights in the package too (``weights/FILE``), usable offline.
- Cards a user adds live in ``<home>/cards/``; downloaded or hand-installed weights in
  ``<home>/models/<name>/model.pt``. ``<home>`` is the per-user data folder
  (platformdirs), or ``SWINUNETR_SEGMENT_HOME`` (e.g. a shared folder on an offline
  hospital network).
- A checkpoint becomes usable only after its checksum (SHA256, or the MD5 its publisher
  gives) matches the card. Downloads stream into a temporary file beside the target,
  resume after a dropped connection, and leave nothing behind when they fail.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable, Optional

from SwinUNETRSegmentLib.models.cards import BUILTIN_CARD_DIR, ModelCard, builtin_card_names, load_card
from SwinUNETRSegmentLib.errors import UserError

BUNDLED_WEIGHTS_DIR = Path(__file__).with_name("weights")

#: The model used when none is named: the bundled demonstration model when present.
DEFAULT_MODEL = "demo" if (BUILTIN_CARD_DIR / "demo.json").is_file() else "btcv"


def home_dir() -> Path:
    env = os.environ.get("SWINUNETR_SEGMENT_HOME")
    if env:
        return Path(env)
    import platformdirs

    return Path(platformdirs.user_data_dir("swinunetr-segment", appauthor=False))


def models_dir() -> Path:
    return home_dir() / "models"


def user_cards_dir() -> Path:
    return home_dir() / "cards"


def model_names() -> list[str]:
    user = sorted(p.stem for p in user_cards_dir().glob("*.json")) if user_cards_dir().is_dir() else []
    return sorted(set(builtin_card_names()) | set(user))


def card_of(name: str) -> ModelCard:
    user = user_cards_dir() / f"{name}.json"
    if user.is_file():
        return load_card(user)
    if name in builtin_card_names():
        return load_card(name)
    raise UserError(f"unknown model '{name}'; known models: {', '.join(model_names())}")


def installed_path(card: ModelCard) -> Path:
    """Where this model's weights are (or would be) on this machine."""
    bundled = card.checkpoint.get("bundled")
    if bundled:
        return BUNDLED_WEIGHTS_DIR / bundled
    return models_dir() / card.name / "model.pt"


def is_installed(card: ModelCard) -> bool:
    return installed_path(card).is_file()


def resolve_model(name: str) -> tuple[ModelCard, Path]:
    """The card and the verified weights file of catalog model ``name``."""
    card = card_of(name)
    weights = installed_path(card)
    if not weights.is_file():
        url = card.checkpoint.get("url", "")
        hint = f"run `swinunetr-segment models download {name}`" if url else "get the weights from the model's publisher"
        raise UserError(
            f"the weights of model '{name}' are not on this machine; {hint}, or `swinunetr-segment models install {name} FILE` "
            f"for a file you copied by hand, or run with --card {name} --checkpoint FILE"
        )
    if card.checkpoint.get("bundled"):
        verify_checksum(weights, card)  # a package file changed on disk is not run
    return card, weights


# --------------------------------------------------------------------------------------
# checksums
# --------------------------------------------------------------------------------------
def expected_checksum(card: ModelCard, sha256: Optional[str] = None) -> tuple[str, str]:
    """(algorithm, hex digest) the card's publisher gives for the checkpoint, or the SHA256
    the user vouches for (``--sha256``) where the publisher gives none."""
    given = card.checkpoint.get("sha256")
    if sha256:
        sha256 = sha256.strip().lower()
        if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
            raise UserError(f"--sha256 {sha256} is not a SHA256 (64 hexadecimal digits)")
        if given and given.lower() != sha256:
            raise UserError(f"--sha256 differs from the SHA256 model card '{card.name}' gives ({given}); the card's is used")
        return "sha256", sha256
    for algo in ("sha256", "md5"):
        value = card.checkpoint.get(algo)
        if value:
            return algo, str(value).lower()
    raise UserError(f"model card '{card.name}' gives no sha256 or md5 of its checkpoint (its publisher gives none); "
                    "pass --sha256 HASH of a copy you trust, a file cannot be used unverified")


def file_digest(path: Path, algo: str, chunk: int = 1 << 20) -> str:
    h = hashlib.new(algo)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def verify_checksum(path: Path, card: ModelCard, sha256: Optional[str] = None) -> None:
    algo, want = expected_checksum(card, sha256)
    got = file_digest(path, algo)
    if got != want:
        raise UserError(
            f"{Path(path).name} is not the checkpoint model card '{card.name}' names: its {algo} is {got}, the card expects {want}; "
            "the file is damaged or not the published one"
        )


# --------------------------------------------------------------------------------------
# install, download, remove
# --------------------------------------------------------------------------------------
def install_file(name: str, source: str | Path, sha256: Optional[str] = None) -> Path:
    """Verify a weights file the user copied by hand and install it for model ``name``."""
    card = card_of(name)
    src = Path(source)
    if not src.is_file():
        raise UserError(f"file not found: {source}")
    target = installed_path(card)
    if card.checkpoint.get("bundled"):
        raise UserError(f"model '{name}' ships with its weights; nothing to install")
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".model.pt.", suffix=".part", dir=str(target.parent))
    os.close(fd)
    try:
        shutil.copyfile(src, tmp)
        verify_checksum(Path(tmp), card, sha256)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def download(name: str, progress: Optional[Callable[[int, Optional[int]], None]] = None, url: Optional[str] = None,
             retries: int = 3, timeout: float = 30.0, sha256: Optional[str] = None) -> Path:
    """Download model ``name``'s checkpoint into the cache and verify it; a cache hit returns at once.

    ``progress(bytes_done, bytes_total_or_None)`` is called as data arrives. A dropped
    connection is resumed (HTTP Range) up to ``retries`` times; on any failure, or a
    checksum mismatch, the partial file is deleted and a UserError says why.
    """
    card = card_of(name)
    url = url or card.checkpoint.get("url")
    if not url:
        raise UserError(f"model card '{name}' names no download URL; install the weights with `models install {name} FILE`")
    algo, want = expected_checksum(card, sha256)
    target = installed_path(card)
    if target.is_file():
        if file_digest(target, algo) == want:
            return target
        target.unlink()  # damaged: fetch again
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=".model.pt.", suffix=".part", dir=str(target.parent))
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        _fetch(url, tmp, progress, retries, timeout)
        got = file_digest(tmp, algo)
        if got != want:
            raise UserError(
                f"refusing the download of '{name}' from {url}: its {algo} is {got} but the card expects {want}; "
                "the file was damaged or tampered with on the way (check any proxy), nothing was installed"
            )
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return target


def _fetch(url: str, dest: Path, progress, retries: int, timeout: float) -> None:
    done, total, attempt = 0, None, 0
    while True:
        req = urllib.request.Request(url, headers={"User-Agent": "swinunetr-segment"})
        if done:
            req.add_header("Range", f"bytes={done}-")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:  # honours HTTP(S)_PROXY
                if done and resp.status != 206:  # server ignored Range: start over
                    done = 0
                length = resp.headers.get("Content-Length")
                if length is not None:
                    total = done + int(length)
                with open(dest, "r+b" if done else "wb") as f:
                    f.seek(done)
                    f.truncate()
                    while True:
                        block = resp.read(1 << 16)
                        if not block:
                            break
                        f.write(block)
                        done += len(block)
                        if progress:
                            progress(done, total)
            if total is not None and done < total:
                raise ConnectionError(f"connection closed after {done} of {total} bytes")
            return
        except urllib.error.HTTPError as exc:
            raise UserError(f"download from {url} failed: HTTP {exc.code} {exc.reason}") from None
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as exc:
            attempt += 1
            if attempt > retries:
                reason = getattr(exc, "reason", exc)
                raise UserError(f"download from {url} failed after {retries} retries ({reason}); check the network or proxy "
                                "(HTTPS_PROXY), or copy the file by hand and use `models install`") from None
            time.sleep(min(2.0 ** attempt * 0.1, 5.0))


def remove(name: str) -> Optional[Path]:
    card = card_of(name)
    if card.checkpoint.get("bundled"):
        raise UserError(f"model '{name}' ships with the package; it cannot be removed")
    path = installed_path(card)
    if path.is_file():
        path.unlink()
        return path
    return None


def add_card(path: str | Path) -> ModelCard:
    """Validate a card JSON file and add it to the user's catalog."""
    card = load_card(path)
    if card.name in builtin_card_names():
        raise UserError(f"'{card.name}' is a built-in model; give your card another name")
    user_cards_dir().mkdir(parents=True, exist_ok=True)
    target = user_cards_dir() / f"{card.name}.json"
    tmp = target.with_name(f".{target.name}.part")
    tmp.write_text(Path(path).read_text(encoding="utf-8"), encoding="utf-8")
    os.replace(tmp, target)
    return card
