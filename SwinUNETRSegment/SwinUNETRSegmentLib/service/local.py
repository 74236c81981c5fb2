"""The local engine process: ``swinunetr-segment serve`` as a child of this process.

On 127.0.0.1 with a random port (``--port 0``; the child writes it to ``ready.json``) and a
random token (``token``, mode 0600), both in a private folder beside its ``engine.log``;
started on first use and reused (:func:`local_engine`); stopped when this process exits
(the child watches its stdin pipe, which the OS closes when its parent dies however it
dies; ``atexit`` stops it too); started again by :meth:`LocalEngine.client` when it died.
Like :mod:`.client`, it imports only what 3D Slicer ships.
"""

from __future__ import annotations

import atexit
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Optional, Sequence

from SwinUNETRSegmentLib.service.client import Client, EngineStopped, ServiceError, _reason

__all__ = ["LocalEngine", "local_engine"]

#: runs the command line in the child (``python -c``), so that no entry-point script is needed
_LAUNCH = "import sys; from SwinUNETRSegmentLib.cli import main; sys.exit(main(sys.argv[1:]))"
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])


class LocalEngine:
    """``swinunetr-segment serve`` as a child process on 127.0.0.1, for this process only.

    Args:
        python: the interpreter to run it (in 3D Slicer: ``PythonSlicer``); this one when None.
        args: more ``serve`` options (``--models``, ``--lease-s``...).
        env: environment variables for the child (``SWINUNETR_SEGMENT_HOME``...).
        startup_timeout: seconds :meth:`client` waits for the child to answer.
    """

    def __init__(self, python: Optional[str] = None, args: Sequence[str] = (), env: Optional[dict[str, str]] = None,
                 startup_timeout: float = 120.0):
        self.python, self.args, self.env = python or sys.executable, list(args), dict(env or {})
        self.startup_timeout = startup_timeout
        self.process: Optional[subprocess.Popen] = None
        self._client: Optional[Client] = None
        self._dir: Optional[Path] = None
        self._lock = threading.Lock()
        atexit.register(self.stop)

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def log_path(self) -> Optional[Path]:
        return None if self._dir is None else self._dir / "engine.log"

    def start(self) -> None:
        """Start the child (returns at once; :meth:`ready` tells when it answers)."""
        from SwinUNETRSegmentLib.inference.memory import allocator_env, openvino_installed  # standard library only

        self.stop()
        if self._dir is not None:  # the last child's folder: only its log is left
            shutil.rmtree(self._dir, ignore_errors=True)
        self._dir = Path(tempfile.mkdtemp(prefix="swinunetr-engine-"))  # mode 0700
        token = secrets.token_urlsafe(32)
        fd = os.open(self._dir / "token", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="ascii") as f:
            f.write(token + "\n")
        # jemalloc where installed, as the executable; the system allocator where the engine
        # runs its networks on OpenVINO (inference/memory.py says why)
        env = allocator_env({**os.environ, **self.env}, openvino=openvino_installed())
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_ROOT, env.get("PYTHONPATH")) if p)
        cmd = [self.python, "-c", _LAUNCH, "serve", "--host", "127.0.0.1", "--port", "0",
               "--token-file", str(self._dir / "token"), "--ready-file", str(self._dir / "ready.json"),
               "--stop-on-stdin-eof", *self.args]
        with open(self._dir / "engine.log", "wb") as log:
            self.process = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT, env=env)
        self._token, self._client = token, None

    def endpoint(self) -> Optional[tuple[str, str]]:
        """``(url, token)`` of the child once it listens (it wrote its port), None while it
        starts; never waits. Raises :class:`EngineStopped` (with the reason from its log)
        when it died, or was never started or was stopped."""
        if self.process is None:
            raise EngineStopped("the engine process is not running; start() it first (the next run starts it)")
        if not self.alive:
            raise EngineStopped(f"the engine process could not start ({self._how()})")
        try:
            url = json.loads((self._dir / "ready.json").read_text(encoding="utf-8"))["url"]
        except (OSError, ValueError, KeyError, TypeError):
            return None  # not written yet (it is written whole, by a rename)
        return url, self._token

    def ready(self) -> bool:
        """Whether the child answers (one short check); raises :class:`EngineStopped` if it died."""
        if self._client is None:
            found = self.endpoint()
            if found is None:
                return False
            self._client = Client(*found, lost=self._lost)
        elif not self.alive:
            raise EngineStopped(f"the engine process could not start ({self._how()})")
        try:
            self._client.health(timeout=2.0)
        except EngineStopped:
            raise
        except ServiceError:
            return False
        return True

    def client(self) -> Client:
        """A client of the running child; starts it (again, if it died) and waits until it answers."""
        with self._lock:
            if not self.alive:
                self.start()
            deadline = time.monotonic() + self.startup_timeout
            while not self.ready():
                if time.monotonic() > deadline:
                    self.stop()
                    raise ServiceError(f"the engine process did not answer within {self.startup_timeout:g} s")
                time.sleep(0.05)
            return self._client

    def _how(self) -> str:
        rc = None if self.process is None else self.process.poll()
        if rc is not None and rc < 0:
            try:
                how = f"killed by {signal.Signals(-rc).name}"
            except ValueError:
                how = f"killed by signal {-rc}"
        else:
            how = f"exit code {rc}"
        last = ""
        if self.log_path is not None and self.log_path.is_file():
            lines = [ln for ln in self.log_path.read_text(errors="replace").splitlines() if ln.strip()]
            last = lines[-1].strip()[:200] if lines else ""
        return f"{how}{': ' + last if last and rc != -9 else ''}"

    def _lost(self, exc: BaseException) -> ServiceError:
        if self.process is not None:
            try:
                self.process.wait(1.0)
            except subprocess.TimeoutExpired:
                return ServiceError(f"lost the connection to the engine process ({_reason(exc)})")
        return EngineStopped(f"the engine process stopped ({self._how()}); the next run starts a new one")

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the child: its stdin closes (it shuts down), then terminate, then kill. Its
        folder keeps only the log (removed at the next start)."""
        proc, self.process, self._client = self.process, None, None
        if proc is not None and proc.poll() is None:
            try:
                proc.stdin.close()
                proc.wait(timeout / 2)
            except (OSError, subprocess.TimeoutExpired):
                proc.terminate()
                try:
                    proc.wait(timeout / 2)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        if self._dir is not None and proc is not None:
            for name in ("token", "ready.json"):
                (self._dir / name).unlink(missing_ok=True)


_ENGINE: Optional[LocalEngine] = None


def local_engine(**kwargs) -> LocalEngine:
    """The process's one :class:`LocalEngine`, made on first use with ``kwargs``, then reused."""
    global _ENGINE
    if _ENGINE is None:
        _ENGINE = LocalEngine(**kwargs)
    return _ENGINE
