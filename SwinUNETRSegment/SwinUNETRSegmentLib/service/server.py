"""The engine service's HTTP side: a FastAPI app over a :class:`~.jobs.JobManager`.

Every route but ``GET /health`` needs a bearer token that :class:`~.auth.TokenStore`
accepts; a job is visible only with the token that made it. The routes and their answers
are listed in :mod:`.protocol`. Every error is ``{"detail": "<one line>"}``.

A DICOMweb job (``POST /jobs/dicomweb``, :mod:`.pacs`) names a series on a PACS that the
server's operator configured (``ServerConfig.pacs``); any other PACS is refused with 400.

Uploads stream: the body is fed to :class:`~.protocol.NrrdDecoder` as it arrives (a few
MB at a time, on a worker thread), so that a volume is held once, decompressed, and an
upload over the limit is refused (413) as soon as it passes the limit, or at once when
its ``Content-Length`` says so.
"""

from __future__ import annotations

import importlib.util
import io
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.requests import ClientDisconnect

from SwinUNETRSegmentLib.errors import UserError
from SwinUNETRSegmentLib.geometry import Volume
from SwinUNETRSegmentLib.service.auth import TokenStore
from SwinUNETRSegmentLib.service.jobs import Busy, Job, JobManager, UnknownModel, import_engine
from SwinUNETRSegmentLib.service.protocol import (
    API_VERSION,
    DONE,
    FAILED,
    MAX_EXPANSION,
    NRRD_MEDIA_TYPE,
    OPTIONS_HEADER,
    SERVICE,
    JobOptions,
    NrrdDecoder,
    NrrdError,
    NrrdTooLarge,
    encode_nrrd,
)

__all__ = ["ServerConfig", "create_app"]

#: bytes of upload gathered before they are handed to the decoder's thread
_FEED = 4 << 20


@dataclass(frozen=True)
class ServerConfig:
    """What ``swinunetr-segment serve`` was asked for (see :mod:`SwinUNETRSegmentLib.cli.serve`).

    ``allow_paths``: whether ``POST /jobs`` may name a file on the server (only a server
    bound to loopback: its clients are on its machine). ``pacs``: the
    :class:`~.pacs.PacsRegistry` of the PACS that DICOMweb jobs may name (None: none).
    """

    max_upload_mb: float = 1024
    allow_paths: bool = True
    version: str = ""
    pacs: Any = None


class HTTPFailure(Exception):
    def __init__(self, status: int, detail: str, headers: Optional[dict[str, str]] = None):
        super().__init__(detail)
        self.status, self.detail, self.headers = status, detail, headers or {}


def create_app(manager: JobManager, tokens: Optional[TokenStore], config: ServerConfig = ServerConfig()) -> FastAPI:
    """The FastAPI app; ``tokens`` None serves without authentication (loopback only)."""
    app = FastAPI(title="SwinUNETR Segment engine", version=config.version, docs_url=None, redoc_url=None,
                  openapi_url=None)
    limit = int(config.max_upload_mb * 1e6)

    @app.exception_handler(HTTPFailure)
    async def _failure(request, exc: HTTPFailure):
        return JSONResponse({"detail": exc.detail}, status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        first = (exc.errors() or [{}])[0]
        where = ".".join(str(x) for x in first.get("loc", ()))
        return JSONResponse({"detail": f"bad request: {where}: {first.get('msg', 'invalid')}"}, 422)

    @app.exception_handler(Exception)
    async def _bug(request, exc: Exception):
        text = " ".join(str(exc).split())[:300]
        return JSONResponse({"detail": f"internal error on the server: {type(exc).__name__}: {text}"}, 500)

    def owner(request: Request) -> str:
        if tokens is None:
            return "anonymous"
        header = request.headers.get("authorization")
        if not header:
            raise HTTPFailure(401, "missing token: send the header 'Authorization: Bearer <token>' (the token is "
                                   "in the server's token file)", {"WWW-Authenticate": "Bearer"})
        scheme, _, presented = header.partition(" ")
        name = tokens.check(presented.strip()) if scheme.lower() == "bearer" else None
        if name is None:
            raise HTTPFailure(401, "wrong token: the server does not accept it; ask its administrator for yours",
                              {"WWW-Authenticate": 'Bearer error="invalid_token"'})
        return name

    def job_of(request: Request, job_id: str, touch: bool = True) -> Job:
        who = owner(request)
        try:
            return manager.get(who, job_id, touch)
        except KeyError:
            raise HTTPFailure(404, f"no job {job_id} here (finished jobs are dropped once fetched, or "
                                   f"{manager.result_ttl_s:g} s after they end)") from None

    def submit(who: str, options: JobOptions, volume: Optional[Volume], timings: dict[str, float],
               source: Any = None) -> dict[str, Any]:
        try:
            job = manager.submit(who, options, volume, timings, source)
        except UnknownModel as exc:
            raise HTTPFailure(404, str(exc)) from None
        except Busy as exc:
            raise HTTPFailure(503, str(exc), {"Retry-After": str(exc.retry_after)}) from None
        except UserError as exc:
            raise HTTPFailure(422, str(exc)) from None
        return manager.status(job).to_dict()

    @app.get("/health")
    def health():
        return {"status": "ok", "service": SERVICE, "version": config.version, "api": API_VERSION}

    @app.get("/info")
    def info(request: Request):
        owner(request)
        import_engine()
        from SwinUNETRSegmentLib.inference.devices import available_devices

        return {"service": SERVICE, "version": config.version, "api": API_VERSION,
                "max_upload_mb": config.max_upload_mb, "max_queue": manager.max_queue, "lease_s": manager.lease_s,
                "result_ttl_s": manager.result_ttl_s, "allow_paths": config.allow_paths,
                "pacs": config.pacs.urls() if config.pacs is not None else [],
                "devices": [{"device": d, "name": n} for d, n in available_devices()], "models": manager.served()}

    @app.get("/models")
    def models(request: Request):
        owner(request)
        return [_model_entry(name, manager.served()) for name in _catalog_names()]

    @app.get("/models/{name}")
    def model(request: Request, name: str):
        owner(request)
        try:
            card, _ = manager.resolve(name)
        except UnknownModel as exc:
            raise HTTPFailure(404, str(exc)) from None
        except UserError as exc:
            raise HTTPFailure(422, str(exc)) from None
        return {**_model_entry(name, manager.served()), "card": card.to_json()}

    def read_and_submit(who: str, body: Any) -> dict[str, Any]:
        import_engine()
        from SwinUNETRSegmentLib.fileio.read import read_volume

        path = body.get("path") if isinstance(body, dict) else None
        if not isinstance(path, str) or not path:
            raise HTTPFailure(422, "give the scan's path: {\"path\": FILE_OR_DICOM_FOLDER, \"options\": {...}}")
        series = body.get("series")
        try:
            options = JobOptions.from_dict(body.get("options"))
            manager.resolve(options.model)  # an unknown model fails before the file is read
            t = time.perf_counter()
            volume, _info = read_volume(Path(path), series_uid=series if isinstance(series, str) else None)
        except UnknownModel as exc:
            raise HTTPFailure(404, str(exc)) from None
        except UserError as exc:
            raise HTTPFailure(422, str(exc)) from None
        return submit(who, options, volume, {"read": time.perf_counter() - t})

    @app.post("/jobs", status_code=202)
    async def submit_path(request: Request):
        who = owner(request)
        if not config.allow_paths:
            raise HTTPFailure(403, "this server reads no files named by clients; upload the volume instead")
        try:
            body = await request.json()
        except ValueError:
            raise HTTPFailure(422, "the request body is not JSON") from None
        return await run_in_threadpool(read_and_submit, who, body)

    def dicomweb_submit(who: str, body: Any) -> dict[str, Any]:
        from SwinUNETRSegmentLib.service.pacs import DicomwebJob, DicomwebSeries, PacsRegistry, UnknownPacs

        try:
            series = DicomwebSeries.from_dict({k: v for k, v in body.items() if k != "options"}
                                              if isinstance(body, dict) else body)
            options = JobOptions.from_dict(body.get("options"))
        except UserError as exc:
            raise HTTPFailure(422, str(exc)) from None
        try:
            client = (config.pacs or PacsRegistry()).connect(series.pacs)
        except UnknownPacs as exc:
            raise HTTPFailure(400, str(exc)) from None
        except UserError as exc:  # the operator's credentials file went missing
            raise HTTPFailure(500, f"the server's PACS configuration: {exc}") from None
        if series.output_type == "dicom-seg" and importlib.util.find_spec("highdicom") is None:
            raise HTTPFailure(422, "this server cannot make a DICOM SEG (highdicom is not installed there: pip install "
                                   "highdicom); ask for output_type labels")
        return submit(who, options, None, {}, DicomwebJob(series, client))

    @app.post("/jobs/dicomweb", status_code=202)
    async def submit_dicomweb(request: Request):
        who = owner(request)
        try:
            body = await request.json()
        except ValueError:
            raise HTTPFailure(422, "the request body is not JSON") from None
        return await run_in_threadpool(dicomweb_submit, who, body)

    @app.post("/jobs/upload", status_code=202)
    async def submit_upload(request: Request):
        who = owner(request)
        try:
            options = JobOptions.from_header(request.headers.get(OPTIONS_HEADER))
        except UserError as exc:
            raise HTTPFailure(422, str(exc)) from None
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > limit:
            raise HTTPFailure(413, _too_large(int(length), config.max_upload_mb))
        decoder, received, pending, size = NrrdDecoder(limit * MAX_EXPANSION), 0, [], 0
        t = time.perf_counter()
        try:
            async for chunk in request.stream():
                received += len(chunk)
                if received > limit:
                    raise HTTPFailure(413, _too_large(received, config.max_upload_mb))
                pending.append(chunk)
                size += len(chunk)
                if size >= _FEED:
                    await run_in_threadpool(decoder.feed, b"".join(pending))
                    pending, size = [], 0
            await run_in_threadpool(decoder.feed, b"".join(pending))
            array, ijk_to_ras = decoder.finish()
        except ClientDisconnect:
            return Response(status_code=499)  # nobody is there to read it; no job was made
        except NrrdTooLarge as exc:
            raise HTTPFailure(413, f"{exc}; crop the scan (a box), or ask the administrator to raise --max-upload-mb") \
                from None
        except NrrdError as exc:
            raise HTTPFailure(422, f"the upload is no volume NRRD: {exc}") from None
        del decoder, pending
        return await run_in_threadpool(submit, who, options, Volume(array, ijk_to_ras),
                                       {"receive": time.perf_counter() - t})

    @app.get("/jobs/{job_id}")
    def status(request: Request, job_id: str):
        return manager.status(job_of(request, job_id)).to_dict()

    @app.post("/jobs/{job_id}/cancel")
    def cancel(request: Request, job_id: str):
        job = job_of(request, job_id)
        return manager.status(manager.cancel(job.owner, job.id)).to_dict()

    @app.delete("/jobs/{job_id}")
    def forget(request: Request, job_id: str):
        job = job_of(request, job_id)
        return manager.status(manager.cancel(job.owner, job.id, forget=True)).to_dict()

    def finished(request: Request, job_id: str, keep: bool) -> tuple[Job, Volume]:
        job = job_of(request, job_id)
        if job.state == FAILED or (job.state != DONE and job.error_status):
            raise HTTPFailure(job.error_status or 500, job.error or job.state)
        if job.state != DONE:
            raise HTTPFailure(409, f"job {job_id} is {job.state} ({job.message}); poll GET /jobs/{job_id} until done")
        if ((job.result or {}).get("dicomweb") or {}).get("skipped"):
            raise HTTPFailure(404, f"job {job_id} was skipped: a DICOM SEG of model '{job.card.name}' already "
                                   "references the series; it has no labels (send skip_existing false to redo it)")
        labels = manager.take(job.owner, job.id, keep)
        if labels is None:
            raise HTTPFailure(404, f"job {job_id}'s result was fetched already")
        return job, labels

    @app.get("/jobs/{job_id}/labels")
    def labels(request: Request, job_id: str, keep: bool = False, gzip: int = 1):
        _job, labels = finished(request, job_id, keep)  # gzip=0: raw, for clients on loopback
        level = min(9, max(0, gzip))
        return Response(encode_nrrd(labels.array, labels.ijk_to_ras, level=level), media_type=NRRD_MEDIA_TYPE)

    @app.get("/jobs/{job_id}/seg.nrrd")
    def seg_nrrd(request: Request, job_id: str, keep: bool = False):
        job, labels = finished(request, job_id, keep)
        import_engine()
        from SwinUNETRSegmentLib.fileio.segnrrd import write_seg_nrrd

        with tempfile.TemporaryDirectory(prefix="swinunetr-result-") as tmp:
            path = Path(tmp) / "result.seg.nrrd"
            write_seg_nrrd(path, labels, job.card.labels)
            data = path.read_bytes()
        return Response(data, media_type=NRRD_MEDIA_TYPE)

    @app.get("/jobs/{job_id}/seg.dcm")
    def seg_dcm(request: Request, job_id: str, keep: bool = False):
        job = job_of(request, job_id)
        seg = job.context.get("seg")
        if seg is None and job.state == DONE:
            raise HTTPFailure(404, f"job {job_id} made no DICOM SEG (a DICOMweb job with output_type dicom-seg makes "
                                   "one); fetch its labels")
        finished(request, job_id, keep)
        import pydicom

        buffer = io.BytesIO()
        pydicom.dcmwrite(buffer, seg, enforce_file_format=True)
        return Response(buffer.getvalue(), media_type="application/dicom")

    app.state.manager = manager
    return app


def _too_large(size: int, limit_mb: float) -> str:
    return (f"the upload ({size / 1e6:.0f} MB) is over this server's limit of {limit_mb:g} MB; "
            "crop the scan (a box), or ask the administrator to raise --max-upload-mb")


def _catalog_names() -> list[str]:
    from SwinUNETRSegmentLib.models import catalog

    return catalog.model_names()


def _model_entry(name: str, served: list[str]) -> dict[str, Any]:
    from SwinUNETRSegmentLib.models import catalog

    try:
        card = catalog.card_of(name)
    except UserError:
        return {"name": name, "title": "", "labels": 0, "checksum": None, "weights_present": False, "served": False}
    try:
        algo, value = catalog.expected_checksum(card)
        checksum: Optional[dict[str, str]] = {"algorithm": algo, "value": value}
    except UserError:  # the publisher gives none
        checksum = None
    return {"name": name, "title": card.title, "labels": len(card.labels), "checksum": checksum,
            "weights_present": _installed(card), "served": name in served}


def _installed(card) -> bool:
    from SwinUNETRSegmentLib.models import catalog

    try:
        return catalog.is_installed(card)
    except UserError:
        return False
