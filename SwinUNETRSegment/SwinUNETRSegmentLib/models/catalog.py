"""The model catalog: named models, each a card and a checkpoint verified by checksum.

- Built-in cards ship in the package (``cards/*.json``); a card whose checkpoint says
  ``"bundled": FILE`` has its weights in the package too (``weights/FILE``), usable offline.
- Cards a user adds live in ``<home>/cards/``; downloaded or hand-installed weights in
  ``<home>/models/<name>/model.pt``. ``<home>`` is the per-user data folder (platformdirs'
  folder, found with the standard library), or ``SWINUNETR_SEGMENT_HOME`` (e.g. a shared
  folder on an offline hospital network). A model's name becomes those paths, so only names that
  :func:`~SwinUNETRSegmentLib.models.cards.is_model_name` accepts are used.
- A checkpoint becomes usable only after its checksum (SHA256, or the MD5 its publisher
  gives) matches the card. Every file is written through
  :func:`~SwinUNETRSegmentLib.fileio.atomic.atomic_path`: downloads stream into a
  temporary file beside the target (:mod:`.download` resumes a dropped connection), and
  a failed, interrupted or tampered transfer leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Callable, Optional

from SwinUNETRSegmentLib.errors import UserError
from SwinUNETRSegmentLib.fileio.atomic import atomic_path, atomic_write_text, file_digest
from SwinUNETRSegmentLib.models.cards import (
    BUILTIN_CARD_DIR,
    ModelCard,
    builtin_card_names,
    card_from_dict,
    check_model_name,
    is_model_name,
    load_card,
)

__all__ = ["BUNDLED_WEIGHTS_DIR", "DEFAULT_MODEL", "CHECKSUMS", "home_dir", "models_dir", "user_cards_dir",
           "model_names", "card_of", "installed_path", "is_installed", "resolve_model", "expected_checksum",
           "verify_checksum", "file_digest", "install_file", "download", "remove", "add_card", "add_card_data"]

BUNDLED_WEIGHTS_DIR = Path(__file__).with_name("weights")

#: The model used when none is named: the bundled demonstration model when present.
DEFAULT_MODEL = "demo" if (BUILTIN_CARD_DIR / "demo.json").is_file() else "btcv"

#: Checksums a card's checkpoint may give, in the order they are preferred.
CHECKSUMS = ("sha256", "md5")


def home_dir() -> Path:
    """The catalog's folder: ``SWINUNETR_SEGMENT_HOME``, else the per-user data folder."""
    env = os.environ.get("SWINUNETR_SEGMENT_HOME")
    if env:
        return Path(env)
    return _user_data_dir("swinunetr-segment")


def _user_data_dir(app: str) -> Path:
    """The per-user data folder platformdirs' ``user_data_dir(app, appauthor=False)`` names,
    found with the standard library only: 3D Slicer's Python, which imports this module for
    its panel, ships no platformdirs."""
    if sys.platform == "win32":
        return Path(os.environ.get("LOCALAPPDATA") or Path.home() / "AppData" / "Local") / app
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Application Support" / app
    xdg = os.environ.get("XDG_DATA_HOME", "")
    return Path(xdg if xdg.strip() else Path.home() / ".local" / "share") / app


def models_dir() -> Path:
    return home_dir() / "models"


def user_cards_dir() -> Path:
    return home_dir() / "cards"


def model_names() -> list[str]:
    """Every model in the catalog: the built-in cards and the user's, sorted."""
    user = sorted(p.stem for p in user_cards_dir().glob("*.json") if is_model_name(p.stem)) \
        if user_cards_dir().is_dir() else []
    return sorted(set(builtin_card_names()) | set(user))


def card_of(name: str) -> ModelCard:
    """The card of catalog model ``name``: the user's card of that name, else the built-in one."""
    if is_model_name(name):
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
        if not isinstance(bundled, str) or Path(bundled).name != bundled or bundled in ("", ".", ".."):
            raise UserError(f"model card {card.source}: checkpoint 'bundled' must be a file name in the package's "
                            f"weights folder, got {bundled!r}; fix the card")
        return BUNDLED_WEIGHTS_DIR / bundled
    name = check_model_name(card.name, f"model card {card.source}", "give the card another 'name'")
    return models_dir() / name / "model.pt"


def is_installed(card: ModelCard) -> bool:
    return installed_path(card).is_file()


def resolve_model(name: str) -> tuple[ModelCard, Path]:
    """The card and the verified weights file of catalog model ``name``."""
    card = card_of(name)
    weights = installed_path(card)
    if not weights.is_file():
        url = card.checkpoint.get("url", "")
        hint = f"run `swinunetr-segment models download {name}`" if url \
            else "get the weights from the model's publisher"
        raise UserError(
            f"the weights of model '{name}' are not on this machine; {hint}, "
            f"or `swinunetr-segment models install {name} FILE` "
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
            raise UserError(f"--sha256 differs from the SHA256 model card '{card.name}' gives ({given}); "
                            "the card's is used")
        return "sha256", sha256
    for algo in CHECKSUMS:
        value = card.checkpoint.get(algo)
        if value:
            return algo, str(value).lower()
    raise UserError(f"model card '{card.name}' gives no sha256 or md5 of its checkpoint (its publisher gives none); "
                    "pass --sha256 HASH of a copy you trust, a file cannot be used unverified")


def verify_checksum(path: Path, card: ModelCard, sha256: Optional[str] = None) -> None:
    """Raise a UserError unless the file's checksum is the one :func:`expected_checksum` gives."""
    algo, want = expected_checksum(card, sha256)
    got = file_digest(path, algo)
    if got != want:
        raise UserError(
            f"{Path(path).name} is not the checkpoint model card '{card.name}' names: its {algo} is {got}, "
            f"the card expects {want}; the file is damaged or not the published one"
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
    with atomic_path(target) as tmp:
        shutil.copyfile(src, tmp)
        verify_checksum(tmp, card, sha256)
    return target


def download(name: str, progress: Optional[Callable[[int, Optional[int]], None]] = None, url: Optional[str] = None,
             retries: int = 3, timeout: float = 30.0, sha256: Optional[str] = None) -> Path:
    """Download model ``name``'s checkpoint into the cache and verify it; a cache hit returns at once.

    ``progress(bytes_done, bytes_total_or_None)`` is called as data arrives. A dropped
    connection is resumed (HTTP Range) up to ``retries`` times; on any failure, or a
    checksum mismatch, the partial file is deleted and a UserError says why.
    """
    from SwinUNETRSegmentLib.models.download import fetch

    card = card_of(name)
    url = url or card.checkpoint.get("url")
    if not url:
        raise UserError(f"model card '{name}' names no download URL; "
                        f"install the weights with `models install {name} FILE`")
    algo, want = expected_checksum(card, sha256)
    target = installed_path(card)
    if target.is_file():
        if file_digest(target, algo) == want:
            return target
        target.unlink()  # damaged: fetch again
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(target) as tmp:
        fetch(url, tmp, progress, retries, timeout)
        got = file_digest(tmp, algo)
        if got != want:
            raise UserError(
                f"refusing the download of '{name}' from {url}: its {algo} is {got} but the card expects {want}; "
                "the file was damaged or tampered with on the way (check any proxy), nothing was installed"
            )
    return target


def remove(name: str) -> Optional[Path]:
    """Delete model ``name``'s downloaded or installed weights; returns the path, or None if there were none."""
    card = card_of(name)
    if card.checkpoint.get("bundled"):
        raise UserError(f"model '{name}' ships with the package; it cannot be removed")
    path = installed_path(card)
    if path.is_file():
        path.unlink()
        return path
    return None


def add_card(path: str | Path) -> ModelCard:
    """Validate a card JSON file and add it, as it is, to the user's catalog."""
    card = load_card(path)
    return _store_card(card, Path(path).read_text(encoding="utf-8"))


def add_card_data(data: dict[str, Any], source: str = "<dict>") -> ModelCard:
    """Validate card JSON data and add it to the user's catalog (written as indented JSON)."""
    card = card_from_dict(data, source=source)
    return _store_card(card, json.dumps(data, indent=2))


def _store_card(card: ModelCard, text: str) -> ModelCard:
    if card.name in builtin_card_names():
        raise UserError(f"'{card.name}' is a built-in model; give your card another name")
    name = check_model_name(card.name, f"model card {card.source}", "give the card another 'name'")
    user_cards_dir().mkdir(parents=True, exist_ok=True)
    atomic_write_text(user_cards_dir() / f"{name}.json", text)
    return card
