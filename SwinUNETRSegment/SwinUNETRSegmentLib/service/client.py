"""The engine service's client, importable in 3D Slicer's own Python.

It imports only what Slicer 5.10 ships (the standard library, requests, numpy) and the
package's torch-free modules (errors, progress, :mod:`.protocol`, :mod:`.auth`): no torch,
MONAI, nibabel, pynrrd or fastapi, so that the Slicer module can use it before those are
installed and never loads them into Slicer's process.

- :class:`Client`: a server URL and a token. :meth:`Client.submit` returns a
  :class:`RemoteJob` at once (the volume is encoded and sent on a thread that only waits
  on zlib and the socket, which both release the interpreter lock; or a series on a PACS
  is named, :class:`~.pacs.DicomwebSeries`, for the server to fetch); :meth:`RemoteJob.poll`
  asks for the job's state once, within a short timeout; :meth:`Client.segment` is the
  blocking loop for the command line.
- :class:`~.local.LocalEngine` (here too): ``swinunetr-segment serve`` as a child process on 127.0.0.1 with a
  random port and token, started on first use and reused (:func:`local_engine`), stopped
  when its parent exits (its stdin pipe closes; ``atexit`` too), started again when it died.

Every failure is a :class:`ServiceError` (a ``UserError``: one line, no traceback); a
cancelled job raises ``CancelledError``.
"""

from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional
from urllib.parse import urlsplit

import numpy as np
import requests

from SwinUNETRSegmentLib.errors import CancelledError, UserError
from SwinUNETRSegmentLib.progress import ProgressCallback
from SwinUNETRSegmentLib.service.auth import read_tokens
from SwinUNETRSegmentLib.service.pacs import DicomwebSeries
from SwinUNETRSegmentLib.service.protocol import (
    CANCELLED,
    DONE,
    FAILED,
    OPTIONS_HEADER,
    JobOptions,
    JobStatus,
    decode_nrrd,
    encode_nrrd,
)

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from SwinUNETRSegmentLib.service.local import LocalEngine, local_engine

__all__ = ["ServiceError", "EngineStopped", "Client", "RemoteJob", "RemoteResult", "LocalEngine", "local_engine",
           "CONNECT_TIMEOUT", "READ_TIMEOUT", "TRANSFER_TIMEOUT"]

#: seconds a call waits to connect, and for the answer to a poll, a cancel, a small request
CONNECT_TIMEOUT, READ_TIMEOUT = 5.0, 15.0
#: seconds an upload or a result download may go without a byte moving
TRANSFER_TIMEOUT = 300.0


class ServiceError(UserError):
    """The service refused or failed (``status``: its HTTP status, None when it was not reached)."""

    def __init__(self, message: str, status: Optional[int] = None):
        super().__init__(message)
        self.status = status


class EngineStopped(ServiceError):
    """The local engine process ended during a call; the next call starts a new one."""


@dataclass
class RemoteResult:
    """A finished job: ``labels`` uint8 ``[i, j, k]`` on the input's grid (``ijk_to_ras``),
    ``segments`` (value, name, color 0..1, terminology of each card label), ``present``
    (values found), ``card`` (the card's JSON) and the run's ``device``, ``timings``, ``stats``;
    for a DICOMweb job ``dicomweb``: ``pacs``, ``study``, ``series``, ``seg_uid`` (the DICOM
    SEG's SOP Instance UID, None without one), ``stored`` (sent to the PACS), ``skipped`` (a
    SEG of the model referenced the series already: ``labels`` and ``ijk_to_ras`` are None),
    ``notes``, and ``dicom_seg``: the SEG file's bytes when :meth:`Client.segment` was asked for them."""

    labels: Optional[np.ndarray]
    ijk_to_ras: Optional[np.ndarray]
    segments: list[dict[str, Any]] = field(default_factory=list)
    present: list[int] = field(default_factory=list)
    card: dict[str, Any] = field(default_factory=dict)
    device: str = ""
    timings: dict[str, float] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)
    dicomweb: dict[str, Any] = field(default_factory=dict)
    dicom_seg: Optional[bytes] = None


def _reason(exc: BaseException) -> str:
    """The root cause of a requests error in a few words ("Connection refused")."""
    text = str(exc)
    found = re.findall(r"\[Errno -?\d+\] ([^'\")]+)", text)
    if found:
        return found[-1].strip().rstrip(".")
    for pattern in (r"(Read timed out)", r"(certificate verify failed[^'\")]*)", r"(Connection aborted)",
                    r"(RemoteDisconnected)[^:]*: ([^'\")]+)"):
        m = re.search(pattern, text)
        if m:
            return " ".join(m.groups())
    return " ".join(text.split())[:160] or type(exc).__name__


class _Body:
    """Upload bytes that requests streams with a Content-Length, counting what was sent."""

    def __init__(self, data: bytes):
        self._view, self.sent = memoryview(data), 0

    def __len__(self) -> int:
        return len(self._view)

    def read(self, n: int = -1) -> bytes:
        end = len(self._view) if n is None or n < 0 else min(len(self._view), self.sent + n)
        chunk = self._view[self.sent:end].tobytes()
        self.sent = end
        return chunk


class Client:
    """A connection to one engine service.

    Args:
        url: ``http(s)://host:port``.
        token: the bearer token (``Client.from_token_file`` reads one from a file).
        verify: TLS verification: True (the system's CAs; ``REQUESTS_CA_BUNDLE`` names a
            private CA's file), a CA bundle path, or False.
        lost: what a lost connection means, as a ServiceError (the local engine's death).
    """

    def __init__(self, url: str, token: Optional[str] = None, verify: Any = True,
                 lost: Optional[Callable[[BaseException], ServiceError]] = None):
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ServiceError(f"server URL {url!r} is not http(s)://HOST:PORT")
        self.url, self.token, self.verify, self._lost = url.rstrip("/"), token, verify, lost
        self.session = requests.Session()
        if token:
            self.session.headers["Authorization"] = f"Bearer {token}"
        self._info: Optional[dict[str, Any]] = None

    @classmethod
    def from_token_file(cls, url: str, token_file: str | Path, **kwargs) -> "Client":
        return cls(url, read_tokens(token_file)[0][1], **kwargs)

    @property
    def loopback(self) -> bool:
        """Whether the server is on this machine (then a file may be sent by its path)."""
        return urlsplit(self.url).hostname in ("127.0.0.1", "localhost", "::1")

    def call(self, method: str, route: str, timeout: float = READ_TIMEOUT, **kwargs) -> requests.Response:
        """One request; every failure becomes a one-line :class:`ServiceError`."""
        try:
            r = self.session.request(method, self.url + route, timeout=(CONNECT_TIMEOUT, timeout),
                                     verify=self.verify, **kwargs)
        except requests.exceptions.SSLError as exc:
            raise ServiceError(f"TLS with {self.url} failed ({_reason(exc)}); if its certificate comes from your own "
                               "CA, set REQUESTS_CA_BUNDLE to the CA's file") from None
        except requests.exceptions.Timeout:
            raise ServiceError(f"{self.url} did not answer within {timeout:g} s; it may be overloaded, "
                               "try again later") from None
        except requests.exceptions.RequestException as exc:
            if self._lost is not None:
                raise self._lost(exc) from None
            raise ServiceError(f"cannot reach the engine at {self.url} ({_reason(exc)}); check the URL and that "
                               "the server runs") from None
        if r.status_code >= 400:
            try:
                detail = r.json().get("detail")
            except ValueError:
                detail = None
            detail = " ".join(str(detail or r.text or r.reason).split())[:500]
            raise ServiceError(detail if r.status_code != 404 or detail != "Not Found"
                               else f"{self.url} is no swinunetr-segment engine (no such route)", r.status_code)
        return r

    def json(self, method: str, route: str, **kwargs) -> Any:
        return self.call(method, route, **kwargs).json()

    def health(self, timeout: float = READ_TIMEOUT) -> dict[str, Any]:
        return self.json("GET", "/health", timeout=timeout)

    def info(self) -> dict[str, Any]:
        if self._info is None:
            self._info = self.json("GET", "/info")
        return self._info

    def models(self) -> list[dict[str, Any]]:
        return self.json("GET", "/models")

    def model(self, name: str) -> dict[str, Any]:
        return self.json("GET", f"/models/{name}")

    def submit(self, array: Optional[np.ndarray] = None, ijk_to_ras: Optional[np.ndarray] = None,
               path: Optional[str | Path] = None, options: Optional[JobOptions] = None,
               compress: Optional[int] = None, dicomweb: Optional[DicomwebSeries] = None) -> "RemoteJob":
        """Start a job on a volume (``array`` ``[i, j, k]`` and its IJK-to-RAS), on a scan
        the server reads (``path``: servers on this machine), or on a series on a PACS the
        server is configured for (``dicomweb``: it fetches the series, and stores the DICOM
        SEG when ``dicomweb.store``); returns at once.

        ``compress``: the gzip level of the upload; 0 (raw) on loopback, 1 otherwise when None.
        """
        options = options or JobOptions()
        if dicomweb is not None:
            body = {**dicomweb.to_dict(), "options": options.to_dict()}
            return RemoteJob(self, lambda job: self.json("POST", "/jobs/dicomweb", json=body,
                                                                  timeout=TRANSFER_TIMEOUT), "sending the job")
        if path is not None:
            body = {"path": str(Path(path).resolve()), "options": options.to_dict()}
            return RemoteJob(self, lambda job: self.json("POST", "/jobs", json=body, timeout=TRANSFER_TIMEOUT))
        if array is None or ijk_to_ras is None:
            raise ValueError("give array and ijk_to_ras, or path")
        level = (0 if self.loopback else 1) if compress is None else compress

        def upload(job: "RemoteJob") -> dict[str, Any]:
            limit = self.info().get("max_upload_mb")
            job.body = _Body(encode_nrrd(array, ijk_to_ras, level))
            size = len(job.body)
            if limit and size > limit * 1e6:
                raise ServiceError(f"the upload ({size / 1e6:.0f} MB) is over the server's limit of {limit:g} MB; "
                                   "crop the scan (a box), or ask the administrator to raise --max-upload-mb", 413)
            headers = {OPTIONS_HEADER: options.to_header(), "Content-Type": "application/x-nrrd"}
            return self.json("POST", "/jobs/upload", data=job.body, headers=headers, timeout=TRANSFER_TIMEOUT)

        return RemoteJob(self, upload)

    def segment(self, array: Optional[np.ndarray] = None, ijk_to_ras: Optional[np.ndarray] = None,
                path: Optional[str | Path] = None, options: Optional[JobOptions] = None,
                progress: Optional[ProgressCallback] = None, cancel: Optional[threading.Event] = None,
                poll_s: float = 0.1, compress: Optional[int] = None,
                dicomweb: Optional[DicomwebSeries] = None, dicom_seg: bool = False) -> RemoteResult:
        """Submit, poll until the end (reporting progress), fetch: the blocking way. The
        inputs are :meth:`submit`'s; a DICOMweb job's result says whether the SEG was stored,
        and holds the SEG file's bytes too with ``dicom_seg``.

        Setting ``cancel`` (or Ctrl-C) cancels the job on the server.
        """
        job = self.submit(array, ijk_to_ras, path, options, compress, dicomweb)
        last = None
        try:
            while True:
                if cancel is not None and cancel.is_set():
                    job.cancel()
                    raise CancelledError("segmentation cancelled")
                st = job.poll()
                now = (st.stage, round(st.fraction, 3), st.done, st.message)
                if progress is not None and now != last:
                    progress(st.progress())
                last = now
                if st.state == DONE:
                    dw = (st.result or {}).get("dicomweb") or {}
                    if dw.get("skipped"):  # nothing was made: no labels, no SEG to fetch
                        job.forget()
                        return RemoteResult(None, None, card=(st.result or {}).get("card", {}), dicomweb=dw)
                    seg = job.seg_dcm(keep=True) if dicom_seg else None
                    res = job.result()
                    res.dicom_seg = seg
                    return res
                if st.state == FAILED:
                    raise ServiceError(st.error or "the job failed", st.error_status)
                if st.state == CANCELLED:
                    raise CancelledError(st.error or "segmentation cancelled")
                if cancel is not None:
                    cancel.wait(poll_s)
                else:
                    time.sleep(poll_s)
        except KeyboardInterrupt:
            job.cancel()
            raise


class RemoteJob:
    """A job on the service. Its submission runs on a thread: until it is through,
    :meth:`poll` answers the state "submitting" (stage "uploading", bytes sent)."""

    def __init__(self, client: Client, post: Callable[["RemoteJob"], dict[str, Any]],
                 message: str = "sending the volume"):
        self.client, self.id, self.body = client, None, None
        self.status = JobStatus("", "submitting", "uploading", message)
        self._error: Optional[BaseException] = None
        self._cancel = False
        self._thread = threading.Thread(target=self._submit, args=(post,), name="swinunetr-upload", daemon=True)
        self._thread.start()

    def _submit(self, post) -> None:
        try:
            self.status = JobStatus.from_dict(post(self))
            self.id = self.status.id
            if self._cancel:
                self.cancel()
        except BaseException as exc:  # handed to the caller's thread by poll()
            self._error = exc
        finally:
            self.body = None

    @property
    def submitted(self) -> bool:
        return not self._thread.is_alive()

    def poll(self) -> JobStatus:
        """The job's state (one request, within a short timeout)."""
        if self._thread.is_alive():
            body = self.body
            if body is not None and len(body):
                self.status.message = f"sending the volume: {body.sent / 1e6:.0f} of {len(body) / 1e6:.0f} MB"
            return self.status
        if self._error is not None:
            raise self._error
        self.status = JobStatus.from_dict(self.client.json("GET", f"/jobs/{self.id}"))
        return self.status

    def forget(self) -> None:
        """Ask the server to drop the job now (``DELETE /jobs/{id}``). Never raises."""
        if self.id is None:
            return
        try:
            self.client.json("DELETE", f"/jobs/{self.id}", timeout=READ_TIMEOUT)
        except ServiceError:
            pass

    def cancel(self) -> Optional[JobStatus]:
        """Ask the server to stop the job (it stops within one window); its status then, or
        None (not submitted yet: it is cancelled once it is; or the server is gone). Never raises."""
        self._cancel = True
        if self.id is None:
            return None
        try:
            return JobStatus.from_dict(self.client.json("POST", f"/jobs/{self.id}/cancel", timeout=READ_TIMEOUT))
        except ServiceError:
            return None

    def result(self, keep: bool = False) -> RemoteResult:
        """The labels of a done job (the server then drops it, unless ``keep``)."""
        info = self.status.result or {}
        params = {"keep": int(keep), "gzip": 0 if self.client.loopback else 1}  # raw on loopback: no (de)compression
        r = self.client.call("GET", f"/jobs/{self.id}/labels", params=params, timeout=TRANSFER_TIMEOUT)
        labels, ijk_to_ras = decode_nrrd(r.content)
        return RemoteResult(labels, ijk_to_ras, info.get("segments", []), info.get("present", []), info.get("card", {}),
                            info.get("device", ""), info.get("timings", {}), info.get("stats", {}),
                            info.get("dicomweb") or {})

    def seg_nrrd(self, keep: bool = False) -> bytes:
        """The ``.seg.nrrd`` file of a done job, as bytes."""
        return self.client.call("GET", f"/jobs/{self.id}/seg.nrrd", params={"keep": int(keep)},
                                timeout=TRANSFER_TIMEOUT).content

    def seg_dcm(self, keep: bool = False) -> bytes:
        """The DICOM SEG file of a done DICOMweb job (output type dicom-seg), as bytes."""
        return self.client.call("GET", f"/jobs/{self.id}/seg.dcm", params={"keep": int(keep)},
                                timeout=TRANSFER_TIMEOUT).content


def __getattr__(name: str) -> Any:
    """LocalEngine and local_engine live in :mod:`.local` (built on Client); the client names them too."""
    if name in ("LocalEngine", "local_engine"):
        from SwinUNETRSegmentLib.service import local

        return getattr(local, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
