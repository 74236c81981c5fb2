"""One job of the engine service: what it holds (:class:`Job`), the part of its volume a box
selects (:func:`crop_to_box`), and what its result says (:func:`summary`); and the one
import of the engine that every thread of the server waits for (:func:`import_engine`).
:mod:`.jobs` queues and runs the jobs.
"""

from __future__ import annotations

import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from SwinUNETRSegmentLib.errors import UserError
from SwinUNETRSegmentLib.geometry import Volume, shift_affine
from SwinUNETRSegmentLib.progress import STAGES, Progress
from SwinUNETRSegmentLib.service.protocol import QUEUED, JobOptions, JobStatus

__all__ = ["Job", "crop_to_box", "summary", "import_engine"]

_IMPORTS = threading.Lock()


def import_engine() -> None:
    """Import torch, MONAI and the engine, once, one thread at a time: MONAI's package
    imports its submodules in a cycle that two threads importing it at once deadlock on
    (the server's handlers, its workers and its preloading thread all get here first)."""
    with _IMPORTS:
        import monai  # noqa: F401
        import torch  # noqa: F401

        import SwinUNETRSegmentLib.fileio.read  # noqa: F401
        import SwinUNETRSegmentLib.fileio.segnrrd  # noqa: F401
        import SwinUNETRSegmentLib.inference.engine  # noqa: F401
        import SwinUNETRSegmentLib.models.checkpoint  # noqa: F401


def crop_to_box(volume: Volume, box) -> tuple[Volume, Optional[tuple[slice, slice, slice]]]:
    """The part of ``volume`` whose voxel centres lie in ``box`` (RAS corners; on an oblique
    grid, the voxel index range the box's corners span), and where it lies in the volume."""
    if box is None:
        return volume, None
    lo, hi = (np.asarray(c, dtype=np.float64) for c in box)
    corners = np.array([[(lo, hi)[b >> a & 1][a] for a in range(3)] for b in range(8)])
    ijk = volume.world_to_ijk(corners)
    start = np.maximum(np.ceil(ijk.min(axis=0) - 1e-6), 0).astype(int)
    stop = np.minimum(np.floor(ijk.max(axis=0) + 1e-6) + 1, volume.shape).astype(int)
    if np.any(stop - start < 2):
        raise UserError(f"the box {[list(lo), list(hi)]} (RAS mm) covers fewer than 2 voxels of the volume along "
                        "an axis; give a box that overlaps the scan")
    where = tuple(slice(int(a), int(b)) for a, b in zip(start, stop))
    return Volume(volume.array[where], shift_affine(volume.ijk_to_ras, start)), where  # type: ignore[return-value]


@dataclass(eq=False)
class Job:
    """One segmentation asked of the server (the fields behind a :class:`JobStatus`)."""

    owner: str
    options: JobOptions
    volume: Optional[Volume]
    card: Any
    weights: Path
    device: str
    id: str = field(default_factory=lambda: secrets.token_urlsafe(16))
    state: str = QUEUED
    stage: str = "queued"
    message: str = "waiting for the device"
    fraction: float = 0.0
    done: int = 0
    total: int = 0
    seconds_left: Optional[float] = None
    error: Optional[str] = None
    error_status: Optional[int] = None
    created: float = field(default_factory=time.time)
    started: Optional[float] = None
    finished: Optional[float] = None
    seen: float = field(default_factory=time.monotonic)
    cancel: threading.Event = field(default_factory=threading.Event)
    labels: Optional[Volume] = None
    result: Optional[dict[str, Any]] = None
    forget: bool = False  # drop the job as soon as it stops (DELETE while running)
    before: dict[str, float] = field(default_factory=dict)  # seconds spent before it was queued
    source: Any = None  # where the volume comes from (.pacs.DicomwebJob: fetch, after), None: given
    context: dict[str, Any] = field(default_factory=dict)  # what the source keeps (the series' headers, the SEG)

    def on_progress(self, p: Progress) -> None:
        # Never backwards; a job with a source has its own writing stage after the engine's "done".
        cap = 1.0 if self.source is None else STAGES["writing"][0] + 0.02
        self.stage, self.message, self.seconds_left = p.stage, p.message, p.seconds_left
        self.fraction = max(self.fraction, min(p.fraction, cap))
        if p.stage == "inference":
            self.done, self.total = p.done, p.total

    def status(self, position: int = 0) -> JobStatus:
        return JobStatus(self.id, self.state, self.stage, self.message, self.fraction, self.done, self.total,
                         self.seconds_left, position, self.error, self.error_status, self.created, self.started,
                         self.finished, self.result)


def summary(job: Job, result, labels: Volume, where) -> dict[str, Any]:
    """The result of a done job (:class:`~.protocol.JobStatus`'s ``result``, before its source adds to it)."""
    from SwinUNETRSegmentLib.models.segment_table import present_values, segment_table

    return {
        "segments": [{"value": s.value, "name": s.name, "color": list(s.color), "terminology": s.terminology}
                     for s in segment_table(result.card)],
        "present": present_values(labels.array),
        "card": result.card.to_json(),
        "device": result.device,
        "timings": {**{k: float(v) for k, v in result.timings.items()}, **job.before,
                    "queued": job.started - job.created},
        "stats": {k: v for k, v in result.stats.items() if isinstance(v, (int, float, str, bool, type(None)))},
        "shape": list(labels.shape),
        "box": None if where is None else [[s.start, s.stop] for s in where],
    }
