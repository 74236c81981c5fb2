"""Bearer tokens of the engine service: the token file, and the constant-time check.

A token file holds one token per line, optionally after a name (``alice 3q9...``), so
that each user can get a token of their own and lose it alone; ``#`` starts a comment.
The server re-reads the file when it changes, so that a token is added or revoked
without a restart. A request's token is compared with every token of the file through
:func:`hmac.compare_digest`, without stopping at the first match: how long the check
takes tells nothing about how much of a token an attacker guessed, nor which one.

When no file is given the server uses ``<catalog home>/server-token``, made on first
start with one random token and mode 0600 (created with ``O_EXCL`` and mode 0600, not
through ``fileio.atomic``, which gives files the umask's mode on purpose: a token must
stay private).
"""

from __future__ import annotations

import hmac
import os
import secrets
import stat
import threading
from pathlib import Path
from typing import Optional

from SwinUNETRSegmentLib.errors import UserError

__all__ = ["MIN_TOKEN_LENGTH", "default_token_file", "new_token", "ensure_token_file", "read_tokens", "private",
           "TokenStore"]

#: the shortest token accepted (``secrets.token_urlsafe(32)`` gives 43 characters)
MIN_TOKEN_LENGTH = 16


def default_token_file() -> Path:
    """``<catalog home>/server-token`` (``SWINUNETR_SEGMENT_HOME`` or the per-user data folder)."""
    from SwinUNETRSegmentLib.models.catalog import home_dir

    return home_dir() / "server-token"


def new_token() -> str:
    return secrets.token_urlsafe(32)


def ensure_token_file(path: str | Path) -> tuple[Path, bool]:
    """``path``, created with one new token and mode 0600 when it does not exist; the
    second value says whether it was created."""
    p = Path(path).expanduser()
    if p.exists():
        return p, False
    p.parent.mkdir(parents=True, exist_ok=True)
    try:  # O_EXCL: a file another process made meanwhile is kept
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return p, False
    with os.fdopen(fd, "w", encoding="ascii") as f:
        f.write(f"# bearer tokens of swinunetr-segment serve, one a line, optionally after a name\n{new_token()}\n")
    return p, True


def read_tokens(path: str | Path) -> list[tuple[str, str]]:
    """(name, token) of every token in the file; a line without a name gets ``token-N``."""
    p = Path(path).expanduser()
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise UserError(f"cannot read token file {p} ({exc.strerror or exc})") from None
    tokens = []
    for n, line in enumerate(text.splitlines(), 1):
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        if len(words) > 2:
            raise UserError(f"token file {p} line {n}: give a token, or a name and a token, per line")
        name, token = (f"token-{n}", words[0]) if len(words) == 1 else (words[0], words[1])
        if len(token) < MIN_TOKEN_LENGTH or not token.isascii():
            raise UserError(f"token file {p} line {n}: a token needs at least {MIN_TOKEN_LENGTH} ASCII characters; "
                            "make one with: python -c 'import secrets; print(secrets.token_urlsafe(32))'")
        tokens.append((name, token))
    if not tokens:
        raise UserError(f"token file {p} holds no token; put one in it, or delete it to have one made")
    return tokens


def private(path: str | Path) -> bool:
    """Whether only the owner may read the file (always true where modes mean nothing)."""
    if os.name == "nt":
        return True
    return not (os.stat(path).st_mode & (stat.S_IRWXG | stat.S_IRWXO))


class TokenStore:
    """The tokens a server accepts; :meth:`check` gives the name of the token a request bears.

    ``path`` None with ``tokens`` given: a fixed set (tests). The file is re-read when its
    modification time or size changes; a file that became unreadable keeps the last tokens.
    """

    def __init__(self, path: Optional[str | Path] = None, tokens: Optional[list[tuple[str, str]]] = None):
        self.path = None if path is None else Path(path).expanduser()
        self._lock = threading.Lock()
        self._stamp: Optional[tuple[int, int]] = None
        self._tokens: list[tuple[str, bytes]] = []
        if tokens is not None:
            self._set(tokens)
        elif self.path is not None:
            self._reload(force=True)

    def _set(self, tokens: list[tuple[str, str]]) -> None:
        self._tokens = [(name, token.encode("ascii")) for name, token in tokens]

    def _reload(self, force: bool = False) -> None:
        try:
            st = os.stat(self.path)
        except OSError:
            if force:
                raise UserError(f"token file {self.path} does not exist") from None
            return
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp == self._stamp and not force:
            return
        try:
            tokens = read_tokens(self.path)
        except UserError:
            if force:
                raise
            return
        self._set(tokens)
        self._stamp = stamp

    def check(self, presented: Optional[str]) -> Optional[str]:
        """The name of the token ``presented`` equals, or None; constant time in its content."""
        if presented is None:
            return None
        if self.path is not None:
            with self._lock:
                self._reload()
        candidate = presented.encode("utf-8", "surrogateescape")
        found: Optional[str] = None
        for name, token in self._tokens:  # every token compared: no early exit
            if hmac.compare_digest(candidate, token) and found is None:
                found = name
        return found
