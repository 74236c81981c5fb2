"""What the panel does between clicks, without Qt: one run at a time (the weights download,
then the engine), the progress bar that never goes back, Apply refused while the packages
install, the question asked once per server before a scan leaves this computer, a server's
model list asked for without waiting, and the engine let go when the module is reloaded or
"Keep the model loaded" is off.

The widget calls :meth:`Controller.tick` from a QTimer and shows what it returns.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, MutableMapping, Optional
from urllib.parse import urlsplit

from SwinUNETRSegmentLib.progress import Progress

from .enginerun import CANCELLED, DONE, ERROR, INFO, PROGRESS, EngineRun, JobEvent, LocalEndpoint, RemoteEndpoint
from .servermodels import ServerModels

log = logging.getLogger(__name__)

IDLE, INSTALLING, RUNNING = "idle", "installing", "running"
#: the event of :meth:`Controller.listModels`' answer (value: a :class:`.servermodels.ModelList`)
MODELS = "models"
#: share of the progress bar the weights download takes when a run starts with one
DOWNLOAD_SHARE = 0.3


def server_key(url: str) -> str:
    """``https://GPU.example:8443/`` -> ``https://gpu.example:8443``: one answer per server."""
    parts = urlsplit(url.strip())
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return f"{parts.scheme.lower()}://{(parts.hostname or '').lower()}:{port}"


def is_this_computer(url: str) -> bool:
    return (urlsplit(url.strip()).hostname or "").lower() in ("127.0.0.1", "localhost", "::1")


class ServerConsent:
    """The servers the user agreed to send scans to, kept in ``store`` (the panel: QSettings)."""

    PREFIX = "SwinUNETRSegment/ApprovedServers/"

    def __init__(self, store: MutableMapping[str, Any]):
        self.store = store

    def needed(self, url: str) -> bool:
        """True when sending a scan to ``url`` needs the user's yes first."""
        return not is_this_computer(url) and str(self.store.get(self.PREFIX + server_key(url), "")) != "yes"

    def approve(self, url: str) -> None:
        self.store[self.PREFIX + server_key(url)] = "yes"


@dataclass(frozen=True)
class Where:
    """Where a run goes: ``server`` None for this computer, else its URL and ``token``."""

    server: Optional[str] = None
    token: Optional[str] = None
    verify: Any = True


#: Where a run goes by default.
THIS_COMPUTER = Where()


class TokenFile:
    """The servers' tokens in a JSON file only its owner may read (mode 0600, like ``~/.netrc``;
    written whole to a temporary file and renamed), not in Slicer's settings file, which
    Slicer and other modules read and users copy between machines.

    A missing or unreadable file holds no tokens (the user is asked again); one line in the
    log says why."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def _read(self) -> dict[str, str]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            log.warning("cannot read the server tokens in %s (%s); they will be asked for again", self.path, exc)
            return {}
        return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}

    def get(self, key: str) -> str:
        return self._read().get(key, "")

    def set(self, key: str, token: str) -> None:
        tokens = self._read()
        if token:
            tokens[key] = token
        else:
            tokens.pop(key, None)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tokens-", dir=self.path.parent)  # 0600 from mkstemp
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(tokens, f, indent=1, sort_keys=True)
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


class ServerSettings:
    """The server fields: one token per server (in ``tokens``, a :class:`TokenFile`; never in
    the scene) and the user's yes per server (:attr:`consent`, in ``store``: the panel's
    QSettings). A token an earlier version kept in ``store`` moves to ``tokens`` when read."""

    TOKEN_KEY = "SwinUNETRSegment/ServerTokens/"

    def __init__(self, store: MutableMapping[str, Any], tokens: Optional[TokenFile] = None):
        self.store, self.consent, self.tokens = store, ServerConsent(store), tokens

    def token(self, url: str) -> str:
        key = server_key(url or "")
        legacy = str(self.store.get(self.TOKEN_KEY + key, "") or "")
        if self.tokens is None:
            return legacy
        if legacy:  # out of the settings file, into the private one
            self.tokens.set(key, legacy)
            del self.store[self.TOKEN_KEY + key]
        return self.tokens.get(key)

    def setToken(self, url: str, token: str) -> None:
        key = server_key(url)
        if self.tokens is None:
            self.store[self.TOKEN_KEY + key] = token.strip()
        else:
            self.tokens.set(key, token.strip())

    def where(self, runOn: str, url: str) -> Where:
        """Where "Run on" points: the server (``url``, its token) or this computer; asks nothing."""
        url = (url or "").strip()
        if runOn != "server" or not url:
            return THIS_COMPUTER
        return Where(url, self.token(url) or None)


class Controller:
    """One run at a time on the local engine or a server.

    Args:
        localEngine: ``(create) -> LocalEngine or None`` (:class:`LocalEngines`; None when
            ``create`` is False and none was made).
        download: ``(model) -> WeightsDownload``.
    """

    def __init__(self, localEngine: Callable[[], Any], download: Optional[Callable[[str], Any]] = None,
                 clock: Callable[[], float] = time.monotonic):
        self._localEngine, self._download, self._clock = localEngine, download, clock
        self.state = IDLE
        self._step: Any = None  # the WeightsDownload or EngineRun moving now
        self._then: Optional[Callable[[], Any]] = None  # the engine run that follows a download
        self._base, self._share = 0.0, 1.0
        self.percent = 0
        self.lastProgress: Optional[Progress] = None
        self._cancelled = False
        self._leftover: list = []  # finished runs whose cancel request still goes out
        self.keepLoaded = True
        self.remote = False
        self._startedAt = clock()
        self._listing: Optional[ServerModels] = None  # a server's model list on its way

    # ---- state -----------------------------------------------------------------------------
    @property
    def canApply(self) -> bool:
        return self.state == IDLE

    def install(self, installer: Callable[[], bool]) -> bool:
        """Run ``installer`` (which pumps the event loop for minutes) unless something else
        runs; a second Apply meanwhile gets False without installing anything."""
        if self.state != IDLE:
            return False
        self.state = INSTALLING
        try:
            return bool(installer())
        finally:
            self.state = IDLE

    # ---- a run -----------------------------------------------------------------------------
    def start(self, arrayKji, ijkToRas, options, where: Where = THIS_COMPUTER, downloadModel: Optional[str] = None,
              keepLoaded: bool = True) -> bool:
        """Start a run (after downloading ``downloadModel``'s weights when given); False when busy."""
        if self.state != IDLE:
            return False
        self.state, self._cancelled, self.percent, self.lastProgress = RUNNING, False, 0, None
        self._startedAt = self._clock()
        self.keepLoaded, self.remote = keepLoaded, where.server is not None

        def engineRun() -> EngineRun:
            if where.server is not None:
                endpoint = RemoteEndpoint(where.server, where.token, where.verify)
            else:
                endpoint = LocalEndpoint(self._localEngine(True))
            return EngineRun(endpoint, arrayKji, ijkToRas, options, clock=self._clock)

        if downloadModel is not None and self._download is not None and where.server is None:
            self._step, self._then = self._download(downloadModel), engineRun
            self._base, self._share = 0.0, DOWNLOAD_SHARE
        else:
            self._step, self._then = engineRun(), None
            self._base, self._share = 0.0, 1.0
        return True

    def listModels(self, where: Optional[Where]) -> None:
        """Ask ``where``'s server for the models it serves: a later tick brings a MODELS event
        (once). None or this computer: only drops a question still on its way."""
        if self._listing is not None:
            self._listing.cancel()
        self._listing = None
        if where is not None and where.server is not None:
            self._listing = ServerModels(where.server, where.token, where.verify, clock=self._clock)

    def cancel(self) -> None:
        if self.state == RUNNING and self._step is not None:
            self._cancelled = True
            self._step.cancel()

    def tick(self, budget: float = 0.02) -> list[JobEvent]:
        """Move the run on; PROGRESS events carry the bar's value in :attr:`percent` (never lower
        than before in the same run), the final event ends the run."""
        for run in self._leftover:
            run.tick(0.002)
        self._leftover = [r for r in self._leftover if r.busy]
        out = []
        if self._listing is not None and self._listing.tick(0.005) is not None:
            out.append(JobEvent(MODELS, self._listing.result))
            self._listing = None
        if self.state != RUNNING or self._step is None:
            return out
        for event in self._step.tick(budget):
            if event.kind == PROGRESS:
                self._show(event.value)
                out.append(event)
            elif event.kind == INFO:
                out.append(event)
            elif event.kind == DONE and self._then is not None:  # the weights are in: now the engine
                self._step, self._then = self._then(), None
                self._base, self._share = self._base + self._share, 1.0 - (self._base + self._share)
            else:
                out.append(self._finish(event))
        return out

    def _show(self, p: Progress) -> None:
        self.lastProgress = p
        value = int(round(100 * (self._base + self._share * max(0.0, min(1.0, p.fraction)))))
        self.percent = max(self.percent, min(100, value))

    def _finish(self, event: JobEvent) -> JobEvent:
        step, self._step, self._then = self._step, None, None
        if getattr(step, "busy", False):  # an engine run whose cancel request still goes out
            self._leftover.append(step)
        self.state = IDLE
        if event.kind == DONE:
            self.percent = 100
        if self._cancelled and event.kind != CANCELLED:
            event = JobEvent(CANCELLED)  # Cancel was clicked: nothing is written
        if not self.keepLoaded and not self.remote:
            self.releaseEngine()
        return event

    @property
    def running(self) -> bool:
        return self.state == RUNNING

    @property
    def busy(self) -> bool:
        """True while the timer must go on: a run, a cancel request or a model list on its way."""
        return self.running or bool(self._leftover) or self._listing is not None

    @property
    def elapsed(self) -> float:
        """Seconds since the run (its download included) started."""
        return self._clock() - self._startedAt

    # ---- letting go ------------------------------------------------------------------------------
    def releaseEngine(self) -> None:
        """Stop the local engine process: its models leave memory (the next run starts it again)."""
        engine = self._localEngine(False)
        if engine is not None:
            engine.stop()

    def cleanup(self) -> None:
        """The module is reloaded or Slicer closes: cancel the run, stop the local engine."""
        self.cancel()
        self.listModels(None)
        if self._step is not None:
            self._finish(JobEvent(CANCELLED))
        for run in self._leftover:
            run.tick(0.01)
        self.releaseEngine()


class LocalEngines:
    """``(create) -> LocalEngine`` for the Controller: the service client's one local engine of
    this process, run by ``python`` (in Slicer: PythonSlicer, where torch was installed)."""

    def __init__(self, python: Optional[str] = None, args=(), env: Optional[dict[str, str]] = None):
        self.python, self.args, self.env = python, list(args), env
        self.engine = None

    def __call__(self, create: bool = True):
        if self.engine is None and create:
            from SwinUNETRSegmentLib.service.client import local_engine

            self.engine = local_engine(python=self.python, args=self.args, env=self.env)
        return self.engine


__all__ = ["IDLE", "INSTALLING", "RUNNING", "MODELS", "DOWNLOAD_SHARE", "THIS_COMPUTER", "Controller", "LocalEngines",
           "ServerConsent", "ServerSettings", "TokenFile", "Where", "server_key", "is_this_computer", "CANCELLED",
           "DONE", "ERROR", "INFO", "PROGRESS"]
