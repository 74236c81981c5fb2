"""The engine service's wire format, shared by the server and the client.

Routes (every one but ``/health`` needs ``Authorization: Bearer <token>``):

==========================  =========================================================
``GET /health``             ``{"status": "ok", "service", "version", "api"}``
``GET /info``               limits (``max_upload_mb``, ``max_queue``, ``lease_s``...), devices
``GET /models``             the catalog: name, title, checksum, whether the weights are here
``GET /models/{name}``      one model with its card (``card``: the card's JSON)
``POST /jobs``              JSON ``{"path": FILE_OR_DICOM_FOLDER, "options": {...}}`` (servers
                            bound to loopback only: the file is read by the server)
``POST /jobs/upload``       body: a volume NRRD (:func:`encode_nrrd`); the options as JSON
                            in the :data:`OPTIONS_HEADER` header
``POST /jobs/dicomweb``     JSON ``{"pacs": URL, "study": UID, "series": UID, "store": false, "options": {...}}``
                            (:class:`~.pacs.DicomwebSeries`): the server fetches the series from a PACS it reaches
                            (``"skip_existing": true``: not when a SEG of the model references it already)
``GET /jobs/{id}``          the job's :class:`JobStatus` (each poll renews the job's lease)
``POST /jobs/{id}/cancel``  stop it (within one window); the status stays readable
``DELETE /jobs/{id}``       stop it and forget it
``GET /jobs/{id}/labels``   the labels on the input grid, a uint8 volume NRRD (``?gzip=0``:
                            raw); the segment table is the status's ``result``
``GET /jobs/{id}/seg.nrrd`` the Slicer ``.seg.nrrd`` file's bytes
``GET /jobs/{id}/seg.dcm``  a DICOMweb job's DICOM SEG (``result["dicomweb"]``: its UID, stored)
==========================  =========================================================

A fetched result is dropped unless ``?keep=1``; so is a finished job no one fetches within the server's
``result_ttl_s``; a job whose client stops polling for ``lease_s`` (it went away) is cancelled. Errors come back
as ``{"detail": "<one line>"}`` with the status: 401 token, 400 a PACS the server is not configured for, 404
unknown job or model (naming the known ones), 409 not finished, 413 upload over the limit, 422 a volume or
option the engine rejects (the command line's message), 503 queue full (with ``Retry-After``).

Volumes travel as NRRD (``NRRD0004``, space ``right-anterior-superior``, attached ``raw`` or ``gzip`` data:
Slicer opens them). The codec is written here by hand on the standard library and numpy, not with pynrrd: the
client runs in 3D Slicer's Python, which ships neither pynrrd nor nibabel. Each float is written with ``repr``:
a volume's geometry arrives bit for bit.
"""

from __future__ import annotations

import json
import math
import re
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any, Optional, Sequence

import numpy as np

from SwinUNETRSegmentLib.errors import UserError
from SwinUNETRSegmentLib.inference.options import PRECISIONS
from SwinUNETRSegmentLib.progress import Progress

__all__ = ["API_VERSION", "SERVICE", "DEFAULT_HOST", "DEFAULT_PORT", "DEFAULT_MAX_UPLOAD_MB", "DEFAULT_MAX_QUEUE",
           "DEFAULT_LEASE_S", "DEFAULT_RESULT_TTL_S", "MAX_EXPANSION", "OPTIONS_HEADER", "NRRD_MEDIA_TYPE", "QUEUED",
           "RUNNING", "DONE", "FAILED", "CANCELLED", "FINISHED", "JobOptions", "JobStatus", "NrrdError", "NrrdTooLarge",
           "encode_nrrd", "decode_nrrd", "NrrdDecoder"]

API_VERSION = 1
SERVICE = "swinunetr-segment"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765
DEFAULT_MAX_UPLOAD_MB = 1024
DEFAULT_MAX_QUEUE = 8
#: seconds without a poll after which a queued or running job is cancelled (its client went away)
DEFAULT_LEASE_S = 60.0
#: seconds a finished job waits to be fetched before it is dropped
DEFAULT_RESULT_TTL_S = 600.0
#: a volume may be at most this many times its upload's size once decompressed (more: a decompression bomb)
MAX_EXPANSION = 32
OPTIONS_HEADER = "X-SwinUNETR-Options"
NRRD_MEDIA_TYPE = "application/x-nrrd"

QUEUED, RUNNING, DONE, FAILED, CANCELLED = "queued", "running", "done", "failed", "cancelled"
FINISHED = (DONE, FAILED, CANCELLED)


@dataclass(frozen=True)
class JobOptions:
    """How to segment: what ``swinunetr-segment`` takes on its command line.

    Attributes:
        model: a catalog model name; the server's default model when None.
        device: "auto", "cpu", "cuda", "cuda:N" or "mps" (a device of the server).
        overlap: sliding-window overlap, 0 to <1; the card's when None.
        precision: one of ``inference.options.PRECISIONS``.
        sw_batch_size: windows per network call (at least 1); the card's when None.
        box: ``((r0, a0, s0), (r1, a1, s1))`` (RAS mm): only voxels centred in it are segmented, the rest is background.
    """

    model: Optional[str] = None
    device: str = "auto"
    overlap: Optional[float] = None
    precision: str = "auto"
    sw_batch_size: Optional[int] = None
    box: Optional[tuple[tuple[float, float, float], tuple[float, float, float]]] = None

    def __post_init__(self) -> None:
        if self.model is not None and (not isinstance(self.model, str) or not self.model):
            raise UserError(f"model must be a model name, got {self.model!r}")
        if not isinstance(self.device, str) or not self.device:
            raise UserError(f"device must be auto, cpu, cuda, cuda:N or mps, got {self.device!r}")
        if self.overlap is not None:
            if not _is_number(self.overlap) or not 0 <= float(self.overlap) < 1:
                raise UserError(f"overlap must be at least 0 and less than 1, got {self.overlap!r}")
            object.__setattr__(self, "overlap", float(self.overlap))
        if self.precision not in PRECISIONS:
            raise UserError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.sw_batch_size is not None and (type(self.sw_batch_size) is not int or self.sw_batch_size < 1):
            raise UserError(f"sw-batch-size must be at least 1, got {self.sw_batch_size!r}")
        if self.box is not None:
            object.__setattr__(self, "box", _box(self.box))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["box"] = None if self.box is None else [list(c) for c in self.box]
        return d

    @classmethod
    def from_dict(cls, data: Any) -> "JobOptions":
        if data is None:
            return cls()
        if not isinstance(data, dict):
            raise UserError("options must be a JSON object")
        unknown = sorted(set(data) - set(cls.__dataclass_fields__))
        if unknown:
            raise UserError(f"unknown option {unknown[0]!r}; known: {', '.join(cls.__dataclass_fields__)}")
        return cls(**data)

    def to_header(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"))  # ASCII: a valid header value

    @classmethod
    def from_header(cls, value: Optional[str]) -> "JobOptions":
        try:
            data = json.loads(value) if value else None
        except ValueError:
            raise UserError(f"the {OPTIONS_HEADER} header is not JSON") from None
        return cls.from_dict(data)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _box(value: Any) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    bad = UserError(f"box must be two RAS corners [[r0, a0, s0], [r1, a1, s1]] in millimetres, got {value!r}")
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise bad
    corners = []
    for c in value:
        if not isinstance(c, (list, tuple)) or len(c) != 3 or not all(_is_number(x) for x in c):
            raise bad
        corners.append(tuple(float(x) for x in c))
    lo = tuple(min(a, b) for a, b in zip(*corners))
    hi = tuple(max(a, b) for a, b in zip(*corners))
    return lo, hi  # type: ignore[return-value]


@dataclass
class JobStatus:
    """What ``GET /jobs/{id}`` answers.

    Attributes:
        id: the job's id. state: one of queued, running, done, failed, cancelled.
        stage: the engine's stage (``progress.STAGES``), or "queued". message: what it does.
        fraction: the whole job's progress, 0..1. done, total: windows done of all windows.
        seconds_left: estimated seconds to the end, None while unknown. position: jobs ahead in the queue.
        error: the one-line reason of a failed or cancelled job; error_status its HTTP status.
        created, started, finished: server times (seconds since the epoch), None until then.
        result: for a done job: ``segments`` (value, name, color 0..1, terminology of each card label),
            ``present`` (label values found), ``card`` (the card's JSON), ``device``, ``timings`` (the
            engine's; ``read``/``receive``/``fetch``, ``queued``: the server's), ``stats``, ``shape``, ``box``
            (voxel ranges run); a DICOMweb job's ``dicomweb``: pacs, study, series, seg_uid, stored, skipped, notes.
    """

    id: str
    state: str
    stage: str = "queued"
    message: str = ""
    fraction: float = 0.0
    done: int = 0
    total: int = 0
    seconds_left: Optional[float] = None
    position: int = 0
    error: Optional[str] = None
    error_status: Optional[int] = None
    created: Optional[float] = None
    started: Optional[float] = None
    finished: Optional[float] = None
    result: Optional[dict[str, Any]] = field(default=None, repr=False)

    to_dict = asdict

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "JobStatus":
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})

    def progress(self) -> Progress:
        """The status as the engine's :class:`~SwinUNETRSegmentLib.progress.Progress`."""
        return Progress(self.stage, float(self.fraction), self.seconds_left, self.message or self.stage,
                        int(self.done), int(self.total))


# --------------------------------------------------------------------------------------
# NRRD bytes
# --------------------------------------------------------------------------------------
class NrrdError(ValueError):
    """Bytes that are not a volume NRRD this codec reads; the message is one line."""


class NrrdTooLarge(NrrdError):
    """A volume over the decoder's ``max_voxel_bytes``."""


_TYPES = {"int8": "i1", "uint8": "u1", "int16": "i2", "uint16": "u2", "int32": "i4", "uint32": "u4",
          "int64": "i8", "uint64": "u8", "float": "f4", "double": "f8"}
_ALIASES = {"uchar": "uint8", "unsigned char": "uint8", "signed char": "int8", "short": "int16", "ushort": "uint16",
            "unsigned short": "uint16", "int": "int32", "uint": "uint32", "unsigned int": "uint32", "longlong": "int64",
            "ulonglong": "uint64", "float32": "float", "float64": "double"}
_NAMES = {np.dtype(v).newbyteorder("<"): k for k, v in _TYPES.items()}
#: bytes compressed per gzip member; members compress on threads (zlib releases the GIL)
_MEMBER = 16 << 20


def encode_nrrd(array: np.ndarray, ijk_to_ras: np.ndarray, level: int = 1) -> bytes:
    """A 3D ``array`` indexed ``[i, j, k]`` with its IJK-to-RAS matrix as NRRD bytes.

    ``level`` 0 writes the voxels raw (fastest on loopback), 1..9 gzip them: one member per
    16 MiB, compressed in parallel (concatenated members are valid gzip; zlib, ITK and Slicer
    read them all, pynrrd only the first: it reads volumes under 16 MiB).
    """
    a = np.asarray(array)
    m = np.asarray(ijk_to_ras, dtype=np.float64)
    if a.ndim != 3:
        raise ValueError(f"a volume is 3D, got shape {a.shape}")
    if m.shape != (4, 4) or not np.array_equal(m[3], [0.0, 0.0, 0.0, 1.0]) or not np.all(np.isfinite(m)):
        raise ValueError("ijk_to_ras must be a finite 4x4 affine matrix")
    little = a.dtype.newbyteorder("<")
    name = _NAMES.get(little)
    if name is None:
        raise ValueError(f"voxels of type {a.dtype} cannot travel as NRRD")
    data = np.asarray(a, dtype=little).tobytes(order="F")

    def vec(v: Sequence[float]) -> str:
        return "(" + ",".join(repr(float(x)) for x in v) + ")"

    header = "\n".join([
        "NRRD0004", f"# {SERVICE} volume", f"type: {name}", "dimension: 3", "space: right-anterior-superior",
        "sizes: " + " ".join(str(s) for s in a.shape),
        "space directions: " + " ".join(vec(m[:3, j]) for j in range(3)),
        "kinds: domain domain domain", "endian: little", f"encoding: {'gzip' if level else 'raw'}",
        "space origin: " + vec(m[:3, 3]), "", ""]).encode("ascii")
    if not level:
        return header + data
    parts = [memoryview(data)[i:i + _MEMBER] for i in range(0, len(data), _MEMBER)] or [memoryview(b"")]

    def member(part: memoryview) -> bytes:
        c = zlib.compressobj(level, zlib.DEFLATED, 31)
        return c.compress(part) + c.flush()

    with ThreadPoolExecutor(max_workers=4) as pool:
        return header + b"".join(pool.map(member, parts))


def decode_nrrd(data: bytes, max_voxel_bytes: Optional[int] = None) -> tuple[np.ndarray, np.ndarray]:
    """(array ``[i, j, k]``, IJK-to-RAS) of NRRD bytes; :class:`NrrdError` if they are none."""
    d = NrrdDecoder(max_voxel_bytes)
    d.feed(data)
    return d.finish()


class NrrdDecoder:
    """Decodes a volume NRRD fed in pieces as they arrive (an upload), into one buffer.

    ``max_voxel_bytes``: the largest volume accepted, checked against the header before
    any voxel is decompressed. Reads 3D scalar NRRDs with attached ``raw`` or ``gzip``
    data in any ``space`` of RAS or LPS (what :func:`encode_nrrd` and Slicer write).
    """

    def __init__(self, max_voxel_bytes: Optional[int] = None):
        self.max_voxel_bytes = max_voxel_bytes
        self._head = bytearray()
        self._out: Optional[np.ndarray] = None
        self._flat: Optional[memoryview] = None
        self._pos = 0
        self._z = None
        self._gzip = False
        self.ijk_to_ras: Optional[np.ndarray] = None

    def feed(self, data: bytes) -> None:
        if self._out is None:
            self._head += data
            end = self._head.find(b"\n\n")
            if end < 0:
                if len(self._head) > 65536:
                    raise NrrdError("no NRRD header (no blank line in the first 64 KiB)")
                return
            body = bytes(self._head[end + 2:])
            self._header(self._head[:end].decode("latin-1"))
            self._head = bytearray()
            data = body
        if self._gzip:
            self._inflate(data)
        else:
            self._put(data)

    def _put(self, data: bytes) -> None:
        n = len(data)
        if self._pos + n > len(self._flat):
            raise NrrdError("the NRRD holds more voxel data than its header's sizes and type say")
        self._flat[self._pos:self._pos + n] = data
        self._pos += n

    def _inflate(self, data: bytes) -> None:
        while data:
            if self._z is None:
                self._z = zlib.decompressobj(47)  # a gzip or zlib member
            room = len(self._flat) - self._pos
            try:
                out = self._z.decompress(data, room + 1)
            except zlib.error as exc:
                raise NrrdError(f"the NRRD's gzip data is damaged ({exc})") from None
            self._put(out)
            data = self._z.unconsumed_tail
            if self._z.eof:
                data = self._z.unused_data + data
                self._z = None

    def _header(self, text: str) -> None:
        lines = text.split("\n")
        if not lines[0].startswith("NRRD000"):
            raise NrrdError("not an NRRD (it must start with NRRD000x)")
        fields: dict[str, str] = {}
        for line in lines[1:]:
            line = line.strip()
            if not line or line.startswith("#") or ":=" in line:
                continue
            key, sep, value = line.partition(":")
            if not sep:
                raise NrrdError(f"bad NRRD header line {line[:60]!r}")
            fields[key.strip().lower()] = value.strip()
        for key in ("data file", "datafile"):
            if key in fields:
                raise NrrdError("detached NRRD data (a .nhdr's data file) cannot be uploaded; send one .nrrd")
        kind = _ALIASES.get(fields.get("type", ""), fields.get("type", ""))
        if kind not in _TYPES:
            raise NrrdError(f"NRRD type {fields.get('type')!r} is not a scalar type this service reads")
        if fields.get("dimension") != "3":
            raise NrrdError(f"the NRRD has dimension {fields.get('dimension')}; give a single 3D scalar volume")
        try:
            sizes = [int(s) for s in fields["sizes"].split()]
            dirs = [_vector(v) for v in re.findall(r"\([^)]*\)|none", fields["space directions"])]
            origin = _vector(fields.get("space origin", "(0,0,0)"))
        except (KeyError, ValueError):
            raise NrrdError("the NRRD header needs sizes, space directions and space origin") from None
        if len(sizes) != 3 or any(s < 1 for s in sizes) or len(dirs) != 3:
            raise NrrdError("the NRRD header's sizes and space directions are not those of a 3D volume")
        space = fields.get("space", "right-anterior-superior").lower()
        flip = {"right-anterior-superior": 1.0, "ras": 1.0, "left-posterior-superior": -1.0, "lps": -1.0}.get(space)
        if flip is None:
            raise NrrdError(f"NRRD space {space!r} is not RAS or LPS")
        m = np.eye(4)
        for j, v in enumerate(dirs):
            m[:3, j] = v
        m[:3, 3] = origin
        m[:2] *= flip  # LPS -> RAS flips x and y
        m += 0.0  # no negative zeros
        encoding = fields.get("encoding", "raw").lower()
        if encoding not in ("raw", "gzip", "gz"):
            raise NrrdError(f"NRRD encoding {encoding!r} is not raw or gzip")
        dtype = np.dtype(_TYPES[kind]).newbyteorder(">" if fields.get("endian", "little") == "big" else "<")
        n = int(np.prod(sizes, dtype=np.int64)) * dtype.itemsize
        if self.max_voxel_bytes is not None and n > self.max_voxel_bytes:
            raise NrrdTooLarge(f"the volume holds {n / 1e6:.0f} MB of voxels, more than this server's limit "
                            f"({self.max_voxel_bytes / 1e6:.0f} MB)")
        self._out = np.empty(sizes, dtype=dtype, order="F")
        self._flat = memoryview(self._out.reshape(-1, order="A").view(np.uint8))
        self._gzip = encoding != "raw"
        self.ijk_to_ras = m

    def finish(self) -> tuple[np.ndarray, np.ndarray]:
        if self._out is None:
            raise NrrdError("the upload ended inside the NRRD header")
        if self._pos != len(self._flat) or self._z is not None:
            raise NrrdError(f"the NRRD ended after {self._pos} of its {len(self._flat)} bytes of voxels (truncated)")
        out = self._out
        if out.dtype.byteorder == ">":
            out = out.astype(out.dtype.newbyteorder("<"), order="F")
        return out, self.ijk_to_ras


def _vector(text: str) -> list[float]:
    t = text.strip()
    if not (t.startswith("(") and t.endswith(")")):
        raise ValueError(text)
    v = [float(x) for x in t[1:-1].split(",")]
    if len(v) != 3 or not all(math.isfinite(x) for x in v):
        raise ValueError(text)
    return v
