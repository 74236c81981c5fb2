"""Progress and time-left estimates a person can read.

The engine reports :class:`Progress` to a callback. The command line draws it as a bar;
the Slicer module shows it in its progress bar and status text. Both read the same
numbers, computed here without any GUI.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Optional

# Share of the whole run each stage takes on a typical CPU run (for the overall bar only).
STAGES: dict[str, tuple[float, float]] = {
    "loading model": (0.00, 0.03),
    "reading": (0.03, 0.05),
    "preprocessing": (0.05, 0.10),
    "inference": (0.10, 0.92),
    "resampling": (0.92, 0.97),
    "writing": (0.97, 1.00),
}


@dataclass(frozen=True)
class Progress:
    """One progress report.

    Attributes:
        stage: one of :data:`STAGES`.
        fraction: the whole run's progress, 0..1.
        seconds_left: estimated seconds to the end, None while unknown.
        message: what is happening, e.g. "window 3 of 27".
        done: steps done in this stage (windows during inference).
        total: steps in this stage.
    """

    stage: str
    fraction: float
    seconds_left: Optional[float]
    message: str
    done: int = 0
    total: int = 0


ProgressCallback = Callable[[Progress], None]


def format_seconds(seconds: Optional[float]) -> str:
    """``75`` -> ``"1 min 15 s"``; None -> ``""``."""
    if seconds is None:
        return ""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds} s"
    minutes, s = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {s:02d} s"
    hours, m = divmod(minutes, 60)
    return f"{hours} h {m:02d} min"


class ProgressTracker:
    """Turns stage events into :class:`Progress` reports with a time-left estimate.

    The estimate comes from the measured time per sliding window (the dominant cost),
    plus the time the stages after inference are expected to take, scaled from the
    inference time by their share in :data:`STAGES`.
    """

    def __init__(self, callback: Optional[ProgressCallback], clock: Callable[[], float] = time.monotonic):
        self.callback = callback
        self.clock = clock
        self._inference_start: Optional[float] = None
        self._hold = 0  # window reports up to this many are not shown (hold_until)
        self._last: Optional[Progress] = None

    def stage(self, stage: str, message: str = "") -> None:
        lo, _ = STAGES[stage]
        self._emit(
            Progress(stage, lo, None if self._inference_start is None else self._tail_seconds(0), message or stage)
        )

    def windows(self, done: int, total: int) -> None:
        """Report ``done`` of ``total`` sliding windows finished."""
        now = self.clock()
        if self._inference_start is None or done == 0:
            self._inference_start = now
        if self._hold and done <= self._hold:
            return
        lo, hi = STAGES["inference"]
        frac = done / total if total else 1.0
        left: Optional[float] = None
        if done > 0:
            per_window = (now - self._inference_start) / done
            left = per_window * (total - done) + self._tail_seconds(per_window * total)
        self._emit(Progress("inference", lo + (hi - lo) * frac, left, f"window {done} of {total}", done, total))

    def note(self, message: str) -> None:
        """Say what is happening now without moving the bar (a pause within a stage)."""
        if self._last is not None:
            p = self._last
            self._emit(Progress(p.stage, p.fraction, None, message, p.done, p.total))

    def hold_until(self, done: int) -> None:
        """The windows start again (the run moved to a faster backend): the bar stays where
        it is until the new pass has done more than ``done`` windows."""
        self._hold = int(done)

    def _tail_seconds(self, inference_seconds: float) -> float:
        lo, hi = STAGES["inference"]
        return inference_seconds * (1.0 - hi) / (hi - lo)

    def finished(self) -> None:
        self._emit(Progress("writing", 1.0, 0.0, "done"))

    def _emit(self, p: Progress) -> None:
        self._last = p
        if self.callback is not None:
            self.callback(p)
