"""The engine service's jobs: a bounded queue per device, one job running on each device at
a time, and models kept loaded between jobs.

- :class:`JobManager` takes a job (a volume and its :class:`~.protocol.JobOptions`), checks
  the model and the device at once, and queues it on its device; a job with a source (a
  DICOMweb series, :mod:`.pacs`) fetches its volume on a thread of its own first, counted
  in the queue meanwhile, so that the device never waits for a download. A worker thread
  per device runs the jobs in order through one
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

import functools
import logging
import queue
import threading
import time
from typing import Any, Callable, Optional

import numpy as np

from SwinUNETRSegmentLib.errors import CancelledError, UserError
from SwinUNETRSegmentLib.geometry import Volume, check_volume
from SwinUNETRSegmentLib.service.job import Job, crop_to_box, import_engine, summary
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

__all__ = ["Job", "JobManager", "UnknownModel", "Busy", "crop_to_box", "import_engine"]  # Job and the rest: .job

log = logging.getLogger("swinunetr_segment.service")


class UnknownModel(UserError):
    """A model the server does not serve (404)."""


class Busy(UserError):
    """The queue is full (503); ``retry_after`` seconds is a hint."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


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
        backend: the engine's CPU backend: "auto" runs on OpenVINO where a conversion is
            cached, converts a model during a long job or after its first one, "torch" or
            "openvino" (converts before the first job).
    """

    def __init__(self, models: Optional[list[str]] = None, max_queue: int = 8, lease_s: float = 60.0,
                 result_ttl_s: float = 600.0, segmenter_factory: Optional[Callable] = None, backend: str = "auto"):
        self.models = None if models is None else list(models)
        self.max_queue = int(max_queue)
        self.lease_s = float(lease_s)
        self.result_ttl_s = float(result_ttl_s)
        self._factory = segmenter_factory or functools.partial(_engine_segmenter, backend=backend)
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
    def submit(self, owner: str, options: JobOptions, volume: Optional[Volume], timings: Optional[dict] = None,
               source: Any = None) -> Job:
        """Queue a job; the model, the device, the volume and the box are checked first.
        ``timings``: seconds the server spent on the job before (reading, receiving).
        ``source`` instead of ``volume`` (a :class:`~.pacs.DicomwebJob`): ``source.fetch(job)``
        gets the volume on a thread of the job's own while the job waits (queued, stage
        "reading"); ``source.after(job, labels)`` runs once the labels are there, and its dict
        joins the job's result."""
        if (volume is None) == (source is None):
            raise ValueError("give a job a volume or a source, not both")
        import_engine()
        from SwinUNETRSegmentLib.inference.devices import resolve_device

        card, weights = self.resolve(options.model)
        device = str(resolve_device(options.device))
        if volume is not None:
            check_volume(volume, "the volume")
            crop_to_box(volume, options.box)
        with self._lock:
            waiting = sum(1 for j in self._jobs.values() if j.state == QUEUED)
            if waiting >= self.max_queue:
                retry = self._retry_after()
                raise Busy(f"the server is busy (its queue of {self.max_queue} is full); try again in about {retry} s",
                           retry)
            job = Job(owner, options, volume, card, weights, device, before=dict(timings or {}), source=source)
            self._jobs[job.id] = job
            if source is None:
                self._queue(device).put(job)
        if source is not None:
            threading.Thread(target=self._fetch, args=(job,), name=f"swinunetr-fetch-{job.id[:6]}", daemon=True).start()
        log.info("job %s queued on %s (%s, %s)", job.id, device, card.name,
                 source or "x".join(map(str, volume.shape)))
        return job

    def _fetch(self, job: Job) -> None:
        """A job's volume from its source, then the job into its device's queue (unless it ended meanwhile)."""
        t = time.perf_counter()
        try:
            volume = job.source.fetch(job)
            if volume is not None:
                crop_to_box(volume, job.options.box)
        except Exception as exc:
            self._failed(job, exc)
            return
        with self._lock:
            job.before["fetch"] = time.perf_counter() - t
            if job.state != QUEUED:  # cancelled, or its client went away
                job.context.clear()
                return
            if volume is None:  # nothing to do (a SEG of this model references the series already)
                job.result = job.source.skipped(job)
                job.stage, job.message, job.fraction = "writing", "skipped: a DICOM SEG of this model exists", 1.0
                self._finish(job, DONE)
                log.info("job %s skipped (%s)", job.id, job.source)
                return
            job.volume, job.stage, job.message = volume, "queued", "waiting for the device"
            self._queue(job.device).put(job)

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
                position = sum(1 for j in self._jobs.values() if j.state == QUEUED and j.device == job.device
                               and j.volume is not None and j.created < job.created)
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
        job.context.clear()

    def _finish(self, job: Job, state: str, status: Optional[int] = None, error: Optional[str] = None) -> None:
        job.state, job.finished = state, time.time()
        if error is not None or state == DONE:
            job.error, job.error_status = error, status
        if state == CANCELLED:
            job.error_status, job.message = 409, job.error or "cancelled"
        job.volume = None
        if state != DONE:
            job.context.clear()
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
            extra = job.source.after(job, labels) if job.source is not None else {}
            done = {**summary(job, result, labels, where), **extra}
            with self._lock:
                job.labels, job.result = labels, done
                job.stage, job.message, job.fraction = "writing", "done", 1.0
                self._finish(job, DONE)
            log.info("job %s done in %.1f s", job.id, time.time() - job.started)
            # the next job on OpenVINO: converted now, beside the idle or next job (once)
            background = getattr(segmenter, "convert_openvino_in_background", None)
            if background is not None and background():
                log.info("converting %s for OpenVINO in the background", job.card.name)
        except Exception as exc:
            self._failed(job, exc)

    def _failed(self, job: Job, exc: Exception) -> None:
        """End a job that raised ``exc``: cancelled; failed with the engine's one line (422); out of
        memory (507); a bug (500: one line for the client, the traceback in the server's log)."""
        if isinstance(exc, CancelledError):
            state, status, error = CANCELLED, None, None
        elif isinstance(exc, UserError):
            state, status, error = FAILED, 422, str(exc)
        elif isinstance(exc, MemoryError):
            state, status, error = FAILED, 507, "out of memory on the server; try a smaller box or ask again later"
        else:
            log.error("job %s failed", job.id, exc_info=exc)
            text = " ".join(str(exc).split())[:300]
            state, status, error = FAILED, 500, f"internal error on the server: {type(exc).__name__}: {text}"
        with self._lock:
            if job.state not in FINISHED:
                self._finish(job, state, status, error)
        if state == CANCELLED:
            log.info("job %s cancelled (%s) after window %d of %d", job.id, job.error, job.done, job.total)

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


def _engine_segmenter(card, weights, device: str, precision: str, backend: str = "auto"):
    from SwinUNETRSegmentLib.inference.engine import Segmenter
    from SwinUNETRSegmentLib.inference.options import FastPath

    # "auto": a model not yet converted for OpenVINO runs its first CPU job on PyTorch (a long
    # job converts once that pays, in the job) and is converted in the background after it
    # (once per checkpoint and machine; the process runs on the system allocator, memory.py).
    return Segmenter(card, weights, device=device, fast=FastPath(precision=precision, backend=backend))
