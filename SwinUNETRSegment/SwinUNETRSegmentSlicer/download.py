"""A model's weights downloaded by a child process, followed from the panel's timer.

The download (``SwinUNETRSegmentLib.models.catalog.download``: resumed on a dropped
connection, verified by the checksum the model's publisher gives, written atomically) runs
in the engine's Python as a child process, which writes ``done total`` lines to a file;
:meth:`WeightsDownload.tick` reads what arrived since the last tick and never waits. No
thread in Slicer's process, and Cancel stops the child, which leaves no partial file.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

from SwinUNETRSegmentLib.errors import CancelledError, UserError

from .enginerun import CANCELLED, DONE, ERROR, PROGRESS, JobEvent
from .models import download_progress

#: The child: reports bytes as "done total" lines, the failure as "error: message", and takes
#: SIGTERM as Ctrl-C so that the atomic writer deletes its partial file.
_SCRIPT = """
import signal, sys
def _stop(*args):
    raise KeyboardInterrupt
signal.signal(signal.SIGTERM, _stop)
from SwinUNETRSegmentLib.errors import UserError
from SwinUNETRSegmentLib.models import catalog
out = open(sys.argv[2], "w", buffering=1, encoding="utf-8")
try:
    catalog.download(sys.argv[1], progress=lambda done, total: out.write(f"{done} {total or 0}\\n"))
except UserError as exc:
    out.write("error: " + " ".join(str(exc).split()) + "\\n")
    sys.exit(2)
except KeyboardInterrupt:
    sys.exit(3)
out.write("ok\\n")
"""

_PACKAGE_ROOT = str(Path(__file__).resolve().parents[1])


class WeightsDownload:
    """Download catalog model ``model``'s weights with ``python`` (the engine's interpreter).

    ``env``: more environment variables for the child (``SWINUNETR_SEGMENT_HOME``...).
    """

    def __init__(self, model: str, python: Optional[str] = None, env: Optional[dict[str, str]] = None,
                 clock: Callable[[], float] = time.monotonic):
        self.model = model
        self._folder = Path(tempfile.mkdtemp(prefix="swinunetr-download-"))
        self._report = self._folder / "progress.txt"
        self._report.touch()
        child_env = {**os.environ, **(env or {})}
        child_env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_ROOT, child_env.get("PYTHONPATH")) if p)
        with open(self._folder / "log.txt", "wb") as log:
            self.process = subprocess.Popen([python or sys.executable, "-c", _SCRIPT, model, str(self._report)],
                                            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                            env=child_env)
        self._offset = 0
        self._partial = ""
        self._events: list[JobEvent] = []
        self._progress = download_progress(lambda p: self._events.append(JobEvent(PROGRESS, p)), clock=clock)
        self._error: Optional[str] = None
        self._final: Optional[JobEvent] = None

    @property
    def finished(self) -> bool:
        return self._final is not None

    def cancel(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
        if self._final is None:
            self._final = JobEvent(CANCELLED)
            self._events.append(self._final)

    def tick(self, budget: float = 0.02) -> list[JobEvent]:
        """What the child reported since the last call (reads a small file; never waits)."""
        if self._final is not None and not self._events:
            return []
        self._read()
        if self._final is None:
            code = self.process.poll()
            if code is not None:
                self._read()
                if code == 0:
                    self._final = JobEvent(DONE, self.model)
                else:
                    reason = self._error or self._log_tail() or f"exit code {code}"
                    self._final = JobEvent(ERROR, UserError(f"downloading the weights of '{self.model}' failed: "
                                                            f"{reason}"))
                self._events.append(self._final)
        events, self._events = self._events, []
        return events

    def _read(self) -> None:
        with open(self._report, "rb") as f:
            f.seek(self._offset)
            data = f.read(1 << 16)
        self._offset += len(data)
        text = self._partial + data.decode("utf-8", "replace")
        lines = text.split("\n")
        self._partial = lines.pop()
        last = None
        for line in lines:
            if line.startswith("error: "):
                self._error = line[len("error: "):]
            elif line and line[0].isdigit():
                last = line
        if last is not None:
            done, total = (int(x) for x in last.split())
            try:
                self._progress(done, total or None)
            except CancelledError:
                pass

    def _log_tail(self) -> str:
        try:
            lines = [ln for ln in (self._folder / "log.txt").read_text(errors="replace").splitlines() if ln.strip()]
        except OSError:
            return ""
        return lines[-1].strip()[:200] if lines else ""
