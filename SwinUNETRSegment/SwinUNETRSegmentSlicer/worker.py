"""Inference off the GUI thread.

:class:`InferenceJob` runs the segmentation in a Python ``threading.Thread``. The thread
never touches MRML or Qt: it only puts :class:`JobEvent` items into a ``queue.Queue``.
The GUI thread calls :meth:`InferenceJob.poll` from a ``qt.QTimer`` (every 100 ms), which
returns at once with whatever arrived, and applies it to the widgets and the scene.
This is the pattern Slicer itself uses for non-blocking processes
(``slicer.util._startAsyncProcessHandling``: a reader thread, a queue, a QTimer).
"""

from __future__ import annotations

import queue
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Optional

from SwinUNETRSegmentLib.errors import CancelledError
from SwinUNETRSegmentLib.progress import Progress, ProgressCallback

#: ``work(progress, cancel)``: runs the segmentation, calls ``progress`` from the worker
#: thread, raises CancelledError once ``cancel`` is set, returns the result.
Work = Callable[[ProgressCallback, threading.Event], Any]

PROGRESS, DONE, CANCELLED, ERROR = "progress", "done", "cancelled", "error"


@dataclass(frozen=True)
class JobEvent:
    """One message from the worker thread.

    Attributes:
        kind: PROGRESS (value: :class:`Progress`), DONE (value: the result), CANCELLED,
            or ERROR (value: the exception, detail: its traceback).
    """

    kind: str
    value: Any = None
    detail: str = ""

    @property
    def final(self) -> bool:
        return self.kind in (DONE, CANCELLED, ERROR)


class InferenceJob:
    """One segmentation running on a worker thread.

    Cancel is cooperative: :meth:`cancel` sets an event that the engine checks between
    sliding windows. A result that arrives after cancel was asked for is reported as
    CANCELLED, so a cancelled run never writes anything.
    """

    def __init__(self, work: Work, name: str = "SwinUNETRSegment inference"):
        self._work = work
        self._events: "queue.Queue[JobEvent]" = queue.Queue()
        self.cancel_event = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._final: Optional[JobEvent] = None
        self.started_at: Optional[float] = None

    # ---- GUI thread -------------------------------------------------------------------
    def start(self) -> "InferenceJob":
        self.started_at = time.monotonic()
        self._thread.start()
        return self

    def cancel(self) -> None:
        self.cancel_event.set()

    @property
    def cancelling(self) -> bool:
        return self.cancel_event.is_set() and self._final is None

    @property
    def finished(self) -> bool:
        """True once :meth:`poll` has returned the final event."""
        return self._final is not None

    @property
    def elapsed(self) -> float:
        return 0.0 if self.started_at is None else time.monotonic() - self.started_at

    def poll(self) -> list[JobEvent]:
        """Every event that arrived since the last call; never waits."""
        events = []
        while True:
            try:
                event = self._events.get_nowait()
            except queue.Empty:
                break
            events.append(event)
            if event.final:
                self._final = event
        return events

    def wait(self, timeout: Optional[float] = None) -> list[JobEvent]:
        """Block until the worker ends (scripts and tests only, never the GUI), then :meth:`poll`."""
        self._thread.join(timeout)
        return self.poll()

    # ---- worker thread ----------------------------------------------------------------
    def _progress(self, p: Progress) -> None:
        self._events.put(JobEvent(PROGRESS, p))

    def _run(self) -> None:
        try:
            result = self._work(self._progress, self.cancel_event)
        except CancelledError:
            self._events.put(JobEvent(CANCELLED))
        except BaseException as exc:  # reported to the GUI thread, which shows it
            self._events.put(JobEvent(ERROR, exc, traceback.format_exc()))
        else:
            self._events.put(JobEvent(CANCELLED) if self.cancel_event.is_set() else JobEvent(DONE, result))
