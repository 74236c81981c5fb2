"""One segmentation in the engine process, moved on by :meth:`EngineRun.tick` from the panel's
QTimer: no thread, and no call waits (each tick returns within its budget, a few ms).

The engine is the service of :mod:`SwinUNETRSegmentLib.service`: on this computer the
service client's :class:`~SwinUNETRSegmentLib.service.client.LocalEngine` (``swinunetr-segment
serve`` as a child process on 127.0.0.1 with a random port and token, in the Python torch was
installed into, started on first use and kept warm), or a server (URL and token). A run:

1. starting: until the engine answers ``GET /health`` (the local engine's first start
   imports torch and MONAI), then ``GET /info`` (its devices, its upload limit);
2. uploading: the voxels as a volume NRRD (:mod:`~SwinUNETRSegmentLib.service.protocol`'s
   format), raw on loopback, gzip (compressed a piece per tick) to a server;
3. running: ``GET /jobs/{id}`` every ``poll_interval`` s (which also renews the job's lease);
4. receiving: ``GET /jobs/{id}/labels``, decoded a piece at a time as it arrives.

Cancel drops an upload in progress (the server makes no job) or asks the server to stop the
job; a result that arrives after Cancel is never reported as done.
"""

from __future__ import annotations

import time
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional

import numpy as np

from SwinUNETRSegmentLib.errors import UserError
from SwinUNETRSegmentLib.geometry import Volume
from SwinUNETRSegmentLib.inference.api import SegmentationResult
from SwinUNETRSegmentLib.models.cards import card_from_dict
from SwinUNETRSegmentLib.progress import Progress
from SwinUNETRSegmentLib.service.client import ServiceError
from SwinUNETRSegmentLib.service.protocol import (
    CANCELLED as JOB_CANCELLED,
)
from SwinUNETRSegmentLib.service.protocol import (
    DONE as JOB_DONE,
)
from SwinUNETRSegmentLib.service.protocol import (
    FAILED as JOB_FAILED,
)
from SwinUNETRSegmentLib.service.protocol import OPTIONS_HEADER, JobOptions, JobStatus, NrrdDecoder

from .nbhttp import Exchange, ssl_context

PROGRESS, INFO, DONE, CANCELLED, ERROR = "progress", "info", "done", "cancelled", "error"

_NRRD_TYPES = {"i1": "int8", "u1": "uint8", "i2": "int16", "u2": "uint16", "i4": "int32", "u4": "uint32",
               "i8": "int64", "u8": "uint64", "f4": "float", "f8": "double"}
#: voxel bytes compressed (or copied) per piece of an upload
UPLOAD_PIECE = 1 << 20


@dataclass(frozen=True)
class JobEvent:
    """What a tick reports.

    Attributes:
        kind: PROGRESS (value: :class:`Progress`), INFO (value: the engine's ``/info``),
            DONE (value: :class:`EngineResult`), CANCELLED, or ERROR (value: the exception).
    """

    kind: str
    value: Any = None

    @property
    def final(self) -> bool:
        return self.kind in (DONE, CANCELLED, ERROR)


@dataclass
class EngineResult:
    """A finished job: ``labels`` uint8 ``[i, j, k]`` on the input grid (``ijkToRas``) and
    the job's ``result`` (``segments``, ``present``, ``card``, ``device``, ``timings``...)."""

    labels: np.ndarray
    ijkToRas: np.ndarray
    result: dict[str, Any] = field(default_factory=dict)

    @property
    def device(self) -> str:
        return str(self.result.get("device", ""))

    def segmentation(self, ijkToRas: np.ndarray) -> SegmentationResult:
        """The engine's result on the input's grid ``ijkToRas`` (as sent), for the MRML writer;
        a ServiceError when the labels came back on another grid."""
        sent = Volume(self.labels, np.asarray(ijkToRas, dtype=np.float64))
        if not Volume(self.labels, self.ijkToRas).same_grid(sent):
            raise ServiceError("the engine sent labels on another grid than the scan's; is it a swinunetr-segment "
                               "of the same version?")
        card = card_from_dict(self.result.get("card") or {}, source="the engine's model card")
        return SegmentationResult(sent, card, self.device, self.result.get("timings") or {},
                                  self.result.get("stats") or {})


class RemoteEndpoint:
    """A server that runs already: its URL and token (TLS checked against ``verify``)."""

    loopback = False
    startup_timeout = 30.0

    def __init__(self, url: str, token: Optional[str], verify: Any = True):
        self.url, self.token = url.rstrip("/"), token
        self.context = ssl_context(verify) if url.startswith("https:") else None

    def begin(self) -> None:
        pass

    def address(self) -> Optional[tuple[str, Optional[str]]]:
        return self.url, self.token

    def describe(self) -> str:
        return self.url


class LocalEndpoint:
    """The service client's :class:`LocalEngine` (started here when it does not run); its URL
    and token come from :meth:`LocalEngine.endpoint`, never from the engine's files."""

    loopback = True
    context = None

    def __init__(self, engine, startup_timeout: float = 600.0):
        self.engine, self.startup_timeout = engine, startup_timeout

    def begin(self) -> None:
        if not self.engine.alive:
            self.engine.start()  # a Popen: returns at once

    def address(self) -> Optional[tuple[str, Optional[str]]]:
        """(URL, token) once the child listens; None before; EngineStopped (the reason from its log) if it died."""
        return self.engine.endpoint()

    def describe(self) -> str:
        return "this computer"


def nrrd_header(shapeKji: tuple, dtype: np.dtype, ijkToRas: np.ndarray, gzip: bool) -> bytes:
    """The header :func:`SwinUNETRSegmentLib.service.protocol.encode_nrrd` writes, for voxels
    stored as Slicer stores them (``[k, j, i]``, C order: the NRRD's own order)."""
    name = _NRRD_TYPES.get(np.dtype(dtype).newbyteorder("<").str[1:])
    if name is None or np.dtype(dtype).byteorder == ">":
        raise UserError(f"voxels of type {dtype} cannot be sent to the engine")
    m = np.asarray(ijkToRas, dtype=np.float64)

    def vec(v) -> str:
        return "(" + ",".join(repr(float(x)) for x in v) + ")"

    return "\n".join([
        "NRRD0004", "# swinunetr-segment volume", f"type: {name}", "dimension: 3", "space: right-anterior-superior",
        "sizes: " + " ".join(str(s) for s in tuple(shapeKji)[::-1]),
        "space directions: " + " ".join(vec(m[:3, j]) for j in range(3)),
        "kinds: domain domain domain", "endian: little", f"encoding: {'gzip' if gzip else 'raw'}",
        "space origin: " + vec(m[:3, 3]), "", ""]).encode("ascii")


def upload_pieces(arrayKji: np.ndarray, ijkToRas: np.ndarray, level: int) -> tuple[Iterator[bytes], Optional[int]]:
    """(pieces of the volume NRRD, total size or None when gzip makes it unknown)."""
    data = memoryview(np.ascontiguousarray(arrayKji)).cast("B")
    header = nrrd_header(arrayKji.shape, arrayKji.dtype, ijkToRas, bool(level))

    def raw() -> Iterator[bytes]:
        yield header
        for i in range(0, len(data), UPLOAD_PIECE):
            yield bytes(data[i:i + UPLOAD_PIECE])

    def gzip() -> Iterator[bytes]:
        yield header
        z = zlib.compressobj(level, zlib.DEFLATED, 31)
        for i in range(0, len(data), UPLOAD_PIECE):
            yield z.compress(data[i:i + UPLOAD_PIECE])
        yield z.flush()

    return (gzip(), None) if level else (raw(), len(header) + len(data))


class EngineRun:
    """One segmentation on an engine.

    Args:
        endpoint: :class:`LocalEndpoint` or :class:`RemoteEndpoint`.
        arrayKji: the voxels as Slicer stores them (``[k, j, i]``); ijkToRas: their grid.
        options: model, device, overlap... (:class:`JobOptions`).
        poll_interval: seconds between two status requests.
    """

    def __init__(self, endpoint, arrayKji: np.ndarray, ijkToRas: np.ndarray, options: JobOptions,
                 poll_interval: float = 0.25, clock: Callable[[], float] = time.monotonic):
        self.endpoint, self.options, self.poll_interval, self._clock = endpoint, options, poll_interval, clock
        self._array, self._ijkToRas = arrayKji, np.asarray(ijkToRas, dtype=np.float64)
        self.started_at = clock()
        self._state = "begin"
        self._exchange: Optional[Exchange] = None
        self._cleanup: list[Exchange] = []
        self._next_at = 0.0
        self._url: Optional[str] = None
        self._headers: dict[str, str] = {}
        self._upload_size = 0
        self._decoder: Optional[NrrdDecoder] = None
        self.job_id: Optional[str] = None
        self.status: Optional[JobStatus] = None
        self.info: dict[str, Any] = {}
        self._final: Optional[JobEvent] = None
        self._cancelled = False
        self._poll_failures = 0

    # ---- what the panel calls -----------------------------------------------------------
    @property
    def finished(self) -> bool:
        return self._final is not None

    @property
    def busy(self) -> bool:
        """True while a request still has to go out (a cancel), even after the final event."""
        return not self.finished or any(not x.done for x in self._cleanup)

    @property
    def elapsed(self) -> float:
        return self._clock() - self.started_at

    def cancel(self) -> None:
        """Stop: nothing of this run will be reported as done."""
        if self.finished or self._cancelled:
            return
        self._cancelled = True
        if self._exchange is not None and self._state == "uploading":
            self._exchange.close()  # the server makes no job of a partial upload
        if self.job_id is not None:
            self._cleanup.append(self._request("POST", f"/jobs/{self.job_id}/cancel"))

    def tick(self, budget: float = 0.02) -> list[JobEvent]:
        """Move the run on for about ``budget`` seconds at most; returns what happened."""
        end = self._clock() + budget
        for x in self._cleanup:
            x.step(0.002)
        self._cleanup = [x for x in self._cleanup if not x.done]
        if self.finished:
            return []
        if self._cancelled:
            return [self._end(JobEvent(CANCELLED))]
        events: list[JobEvent] = []
        try:
            while not self.finished and self._clock() < end:
                if not self._advance(events, end):
                    break
        except UserError as exc:
            events.append(self._end(JobEvent(ERROR, exc)))
        if self._cancelled and not self.finished:
            events.append(self._end(JobEvent(CANCELLED)))
        return events

    # ---- the steps ------------------------------------------------------------------------
    def _end(self, event: JobEvent) -> JobEvent:
        self._final = event
        if self._exchange is not None and not self._exchange.done:
            self._exchange.close()
        self._array = None  # the copy of the voxels goes as soon as the run ends
        return event

    def _request(self, method: str, path: str, timeout: float = 15.0, **kwargs) -> Exchange:
        return Exchange(self._url, method, path, headers=self._headers, timeout=timeout,
                        context=self.endpoint.context, clock=self._clock, **kwargs)

    def _progress(self, events: list, stage: str, message: str, fraction: float = 0.0) -> None:
        events.append(JobEvent(PROGRESS, Progress(stage, fraction, None, message)))

    def _advance(self, events: list, end: float) -> bool:
        """One move of the state machine; False when there is nothing to do before the next tick."""
        now = self._clock()
        if self._state == "begin":
            self.endpoint.begin()
            self._state, self._deadline = "address", now + self.endpoint.startup_timeout
            where = self.endpoint.describe()
            self._progress(events, "starting engine",
                           "starting the engine" if self.endpoint.loopback else f"connecting to {where}")
            return True
        if self._state == "address":
            address = self.endpoint.address()
            if address is None:
                return self._wait_for_start(now)
            self._url, token = address
            self._headers = {"Authorization": f"Bearer {token}"} if token else {}
            self._state = "health"
            return True
        if self._exchange is None:
            if now < self._next_at:
                return False
            self._exchange = self._start_exchange()
            return True
        if not self._exchange.step(max(0.0, end - self._clock())):
            if self._state == "uploading" and self._upload_size:
                sent = min(self._exchange.sent, self._upload_size)
                self._progress(events, "uploading", f"sending the volume: {sent / 1e6:.0f} of "
                                                    f"{self._upload_size / 1e6:.0f} MB")
            return False
        exchange, self._exchange = self._exchange, None
        return self._answered(exchange, events, now)

    def _wait_for_start(self, now: float) -> bool:
        if now > self._deadline:
            raise ServiceError(f"the engine did not start within {self.endpoint.startup_timeout:g} s")
        self._next_at = now + 0.1
        return False

    def _start_exchange(self) -> Exchange:
        state = self._state
        if state == "health":
            return self._request("GET", "/health", timeout=5.0)
        if state == "info":
            return self._request("GET", "/info")
        if state == "upload":
            level = 0 if self.endpoint.loopback else 1
            pieces, length = upload_pieces(self._array, self._ijkToRas, level)
            self._upload_size = length or self._array.nbytes
            self._state = "uploading"
            headers = {**self._headers, OPTIONS_HEADER: self.options.to_header(), "Content-Type": "application/x-nrrd"}
            return Exchange(self._url, "POST", "/jobs/upload", headers=headers, body=pieces, length=length,
                            timeout=300.0, context=self.endpoint.context, clock=self._clock)
        if state == "running":
            return self._request("GET", f"/jobs/{self.job_id}")
        if state == "receive":
            self._decoder = NrrdDecoder()
            return self._request("GET", f"/jobs/{self.job_id}/labels", timeout=300.0, sink=self._decoder.feed)
        raise RuntimeError(state)

    def _answered(self, x: Exchange, events: list, now: float) -> bool:
        state = self._state
        if state == "health":
            if x.error is not None or x.status != 200:
                if self.endpoint.loopback and x.status is None and now < self._deadline:
                    self._next_at = now + 0.2  # its server socket is not up yet
                    return False
                x.raise_for_status()
            self._state = "info"
        elif state == "info":
            self.info = x.json()
            events.append(JobEvent(INFO, self.info))
            limit = self.info.get("max_upload_mb")
            if limit and self.endpoint.loopback and self._array.nbytes > limit * 1e6:
                raise ServiceError(f"the volume ({self._array.nbytes / 1e6:.0f} MB) is over the engine's limit of "
                                   f"{limit:g} MB; crop it first (Crop Volume module)", 413)
            self._state = "upload"
        elif state == "uploading":
            self.status = JobStatus.from_dict(x.json())
            self.job_id, self._state = self.status.id, "running"
            self._array = None
            events.append(JobEvent(PROGRESS, self.status.progress()))
        elif state == "running":
            return self._polled(x, events, now)
        elif state == "receive":
            x.raise_for_status()
            labels, ijkToRas = self._decoder.finish()
            self._decoder = None
            events.append(self._end(JobEvent(DONE, EngineResult(labels, ijkToRas, self.status.result or {}))))
        return True

    def _polled(self, x: Exchange, events: list, now: float) -> bool:
        if x.error is not None and x.status is None:
            if not self.endpoint.loopback and self._poll_failures < 3:
                self._poll_failures += 1  # a server's network may drop one request
                self._next_at = now + self.poll_interval
                return False
            if self.endpoint.loopback:
                self.endpoint.address()  # EngineStopped with the reason when the child died
            raise x.error
        self._poll_failures = 0
        previous, self.status = self.status, JobStatus.from_dict(x.json())
        st = self.status
        if previous is None or (st.stage, st.fraction, st.done, st.message) != (
                previous.stage, previous.fraction, previous.done, previous.message):
            events.append(JobEvent(PROGRESS, st.progress()))
        if st.state == JOB_DONE:
            self._state = "receive"
            self._progress(events, "receiving", "receiving the segments", 1.0)
            return True
        if st.state == JOB_FAILED:
            raise ServiceError(st.error or "the job failed", st.error_status)
        if st.state == JOB_CANCELLED:
            raise ServiceError(st.error or "the engine cancelled the job")
        self._next_at = now + self.poll_interval
        return False
