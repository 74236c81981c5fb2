"""The engine service's jobs: a bounded queue per device, one job running on each device at
a time, and models kept loaded between jobs.

- :class:`JobManager` takes a job (a volume and its :class:`~.protocol.JobOptions`), checks
  the model and the device at once, and queues it on its device. A worker thread per
  device runs the jobs in order through one
  :class:`~SwinUNETRSegmentLib.inference.engine.Segmenter` per model, device and precision,
  built on first use and kept (the overlap and the window batch are a job's own).
- A job's progress is the engine's; its cancel is the engine's (``cancel`` checked per
  window). A job whose client stops polling for ``lease_s`` is cancelled; a finished job
  nobody fetches is dropped after ``result_ttl_s``, and a fetched one at once.
- Labels of a job with a box are those of the engine on the box's voxels, pasted into a
  background label map of the input's grid.

Nothing here knows HTTP: :mod:`.server` maps the errors to statuses
(:class:`UnknownModel` 404, :class:`Busy` 503, ``UserError`` 422).
"""

from __future__ import annotations

import logging
import queue
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from SwinUNETRSegmentLib.errors import CancelledError, UserError
from SwinUNETRSegmentLib.geometry import Volume, check_volume, shift_affine
from SwinUNETRSegmentLib.progress import Progress
from SwinUNETRSegmentLib.service.protocol import (
    CANCELLED,
    DONE,
    FAILED,
    FINISHED,
    QUEUED,
    RUNNING,
    JobOptions,
    JobStatus,
)

__all__ = ["Job", "JobManager", "UnknownModel", "Busy", "crop_to_box", "import_engine"]

log = logging.getLogger("swinunetr_segment.service")


class UnknownModel(UserError):
    """A model the server does not serve (404)."""


class Busy(UserError):
    """The queue is full (503); ``retry_after`` seconds is a hint."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


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

    def on_progress(self, p: Progress) -> None:
        self.stage, self.message, self.fraction, self.seconds_left = p.stage, p.message, p.fraction, p.seconds_left
        if p.stage == "inference":
            self.done, self.total = p.done, p.total

    def status(self, position: int = 0) -> JobStatus:
        return JobStatus(self.id, self.state, self.stage, self.message, self.fraction, self.done, self.total,
                         self.seconds_left, position, self.error, self.error_status, self.created, self.started,
                         self.finished, self.result)


class JobManager:
    """Jobs, queues and loaded models of one server.

    Args:
        models: the models served (catalog names); every catalog model with weights here
            when None.
        max_queue: jobs that may wait (all devices together) besides those running.
        lease_s: a queued or running job not polled for this long is cancelled.
        result_ttl_s: a finished job is dropped this long after it finished.
        segmenter_factory: ``(card, weights, device, precision) -> segmenter`` (tests);
            the engine's Segmenter when None.
    """

    def __init__(self, models: Optional[list[str]] = None, max_queue: int = 8, lease_s: float = 60.0,
                 result_ttl_s: float = 600.0, segmenter_factory: Optional[Callable] = None):
        self.models = None if models is None else list(models)
        self.max_queue = int(max_queue)
        self.lease_s = float(lease_s)
        self.result_ttl_s = float(result_ttl_s)
        self._factory = segmenter_factory or _engine_segmenter
        self._jobs: dict[str, Job] = {}
        self._queues: dict[str, queue.Queue] = {}
        self._workers: dict[str, threading.Thread] = {}
        self._segmenters: dict[tuple, Any] = {}
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._reaper = threading.Thread(target=self._reap, name="swinunetr-reaper", daemon=True)
        self._reaper.start()

    # ---- models -------------------------------------------------------------------
    def served(self) -> list[str]:
        from SwinUNETRSegmentLib.models import catalog

        if self.models is not None:
            return list(self.models)
        return [n for n in catalog.model_names() if _has_weights(n)]

    def resolve(self, name: Optional[str]):
        """(card, weights) of a served model; :class:`UnknownModel` names the served ones."""
        from SwinUNETRSegmentLib.models import catalog

        name = name or catalog.DEFAULT_MODEL
        served = self.served()
        if name not in served:
            raise UnknownModel(f"unknown model '{name}'; this server's models: {', '.join(served) or 'none'}")
        return catalog.resolve_model(name)

    # ---- jobs ---------------------------------------------------------------------
    def submit(self, owner: str, options: JobOptions, volume: Volume, timings: Optional[dict] = None) -> Job:
        """Queue a job; the model, the device, the volume and the box are checked first.
        ``timings``: seconds the server spent on the job before (reading, receiving)."""
        import_engine()
        from SwinUNETRSegmentLib.inference.devices import resolve_device

        card, weights = self.resolve(options.model)
        device = str(resolve_device(options.device))
        check_volume(volume, "the volume")
        crop_to_box(volume, options.box)
        with self._lock:
            waiting = sum(1 for j in self._jobs.values() if j.state == QUEUED)
            if waiting >= self.max_queue:
                retry = self._retry_after()
                raise Busy(f"the server is busy (its queue of {self.max_queue} is full); try again in about {retry} s",
                           retry)
            job = Job(owner, options, volume, card, weights, device, before=dict(timings or {}))
            self._jobs[job.id] = job
            self._queue(device).put(job)
        log.info("job %s queued on %s (%s, %s)", job.id, device, card.name, "x".join(map(str, volume.shape)))
        return job

    def _retry_after(self) -> int:
        left = [j.seconds_left for j in self._jobs.values() if j.state == RUNNING and j.seconds_left]
        return int(min(600, max(5, min(left) if left else 30)))

    def get(self, owner: str, job_id: str, touch: bool = True) -> Job:
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None or job.owner != owner:
                raise KeyError(job_id)
            if touch:
                job.seen = time.monotonic()
            return job

    def status(self, job: Job) -> JobStatus:
        with self._lock:
            position = 0
            if job.state == QUEUED:
                position = sum(1 for j in self._jobs.values()
                               if j.state == QUEUED and j.device == job.device and j.created < job.created)
            return job.status(position)

    def cancel(self, owner: str, job_id: str, forget: bool = False) -> Job:
        with self._lock:
            job = self.get(owner, job_id)
            self._cancel(job, "cancelled by the client")
            if forget:
                job.forget = True
                if job.state in FINISHED:
                    self._drop(job)
            return job

    def _cancel(self, job: Job, reason: str) -> None:
        if job.state in FINISHED:
            return
        job.cancel.set()
        job.error = reason
        if job.state == QUEUED:  # the worker skips it
            self._finish(job, CANCELLED)

    def take(self, owner: str, job_id: str, keep: bool = False) -> Optional[Volume]:
        """A done job's labels (None if fetched already); the job is dropped unless ``keep``."""
        with self._lock:
            job = self.get(owner, job_id)
            labels = job.labels
            if job.state == DONE and not keep:
                self._drop(job)
            return labels

    def _drop(self, job: Job) -> None:
        self._jobs.pop(job.id, None)
        job.volume = job.labels = None

    def _finish(self, job: Job, state: str, status: Optional[int] = None, error: Optional[str] = None) -> None:
        job.state, job.finished = state, time.time()
        if error is not None or state == DONE:
            job.error, job.error_status = error, status
        if state == CANCELLED:
            job.error_status, job.message = 409, job.error or "cancelled"
        job.volume = None
        job.seconds_left = 0.0 if state == DONE else None
        if job.forget:
            self._drop(job)

    # ---- workers ------------------------------------------------------------------
    def _queue(self, device: str) -> queue.Queue:
        if device not in self._queues:
            self._queues[device] = queue.Queue()
            worker = threading.Thread(target=self._work, args=(device,), name=f"swinunetr-{device}", daemon=True)
            self._workers[device] = worker
            worker.start()
        return self._queues[device]

    def _work(self, device: str) -> None:
        q = self._queues[device]
        while True:
            job = q.get()
            if job is None:
                return
            with self._lock:
                if job.state != QUEUED:
                    continue
                job.state, job.started, job.stage, job.message = RUNNING, time.time(), "loading model", "starting"
            self._run(job)

    def _run(self, job: Job) -> None:
        try:
            opts = job.options
            segmenter = self._segmenter(job)
            # The overlap and the window batch are the job's; the loaded network is shared.
            segmenter.overlap = job.card.overlap if opts.overlap is None else opts.overlap
            segmenter.sw_batch_size = job.card.sw_batch_size if opts.sw_batch_size is None else opts.sw_batch_size
            volume, where = crop_to_box(job.volume, opts.box)
            result = segmenter.segment(volume, progress=job.on_progress, cancel=job.cancel)
            labels = result.labels
            if where is not None:
                full = np.zeros(job.volume.shape, dtype=labels.array.dtype, order="F")
                full[where] = labels.array
                labels = Volume(full, job.volume.ijk_to_ras.copy())
            summary = _summary(job, result, labels, where)
            with self._lock:
                job.labels, job.result = labels, summary
                job.stage, job.message, job.fraction = "writing", "done", 1.0
                self._finish(job, DONE)
            log.info("job %s done in %.1f s", job.id, time.time() - job.started)
        except CancelledError:
            with self._lock:
                self._finish(job, CANCELLED)
            log.info("job %s cancelled (%s) after window %d of %d", job.id, job.error, job.done, job.total)
        except UserError as exc:
            with self._lock:
                self._finish(job, FAILED, 422, str(exc))
        except MemoryError:
            with self._lock:
                self._finish(job, FAILED, 507, "out of memory on the server; try a smaller box or ask again later")
        except Exception as exc:  # a bug: one line for the client, the traceback in the server's log
            log.exception("job %s failed", job.id)
            with self._lock:
                text = " ".join(str(exc).split())[:300]
                self._finish(job, FAILED, 500, f"internal error on the server: {type(exc).__name__}: {text}")

    def _segmenter(self, job: Job):
        key = (job.card.name, str(job.weights), job.device, job.options.precision)
        with self._lock:
            segmenter = self._segmenters.get(key)
        if segmenter is None:
            segmenter = self._factory(job.card, job.weights, job.device, job.options.precision)
            with self._lock:
                self._segmenters[key] = segmenter
        return segmenter

    # ---- housekeeping -------------------------------------------------------------
    def _reap(self) -> None:
        while not self._stop.wait(min(1.0, self.lease_s / 4)):
            now, wall = time.monotonic(), time.time()
            with self._lock:
                for job in list(self._jobs.values()):
                    if job.state in (QUEUED, RUNNING) and now - job.seen > self.lease_s:
                        self._cancel(job, f"cancelled: no poll for {self.lease_s:g} s (the client went away)")
                        log.info("job %s: client gone, cancelled", job.id)
                    elif job.state in FINISHED and wall - job.finished > self.result_ttl_s:
                        self._drop(job)

    def jobs(self) -> list[Job]:
        with self._lock:
            return list(self._jobs.values())

    def close(self, timeout: float = 10.0) -> None:
        """Cancel every job and stop the workers (waiting up to ``timeout`` s for each)."""
        self._stop.set()
        with self._lock:
            for job in self._jobs.values():
                self._cancel(job, "the server is shutting down")
            for q in self._queues.values():
                q.put(None)
        for worker in self._workers.values():
            worker.join(timeout)


def _has_weights(name: str) -> bool:
    from SwinUNETRSegmentLib.models import catalog

    try:
        return catalog.is_installed(catalog.card_of(name))
    except UserError:
        return False


def _engine_segmenter(card, weights, device: str, precision: str):
    from SwinUNETRSegmentLib.inference.engine import Segmenter
    from SwinUNETRSegmentLib.inference.options import FastPath

    return Segmenter(card, weights, device=device, fast=FastPath(precision=precision))


def _summary(job: Job, result, labels: Volume, where) -> dict[str, Any]:
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
