"""DICOMweb: series from a PACS in, DICOM SEG back (dicomweb-client: QIDO-RS, WADO-RS, STOW-RS).

The job the command line runs (:func:`segment_series`; the engine service runs its steps around its queue)::

    client = connect("https://pacs/dicom-web")                    # credentials from a file or the environment
    done = existing_segmentations(client, study, algorithm)       # series a SEG of this model references
    volume, info = fetch_series(client, study, series)            # every instance, checked like a DICOM folder
    result = segmenter.segment(volume)
    seg, notes = series_seg(result.labels, card, info, algorithm)  # on the server's own UIDs
    store(client, seg)                                             # STOW-RS

Credentials are never on the command line (they would show in ``ps`` and shell history):
a file (``--pacs-auth FILE``, or ``$SWINUNETR_DICOMWEB_AUTH_FILE``) holding ``Bearer TOKEN``,
``Basic USER:PASSWORD``, ``USER:PASSWORD`` or a bare token; else ``$SWINUNETR_DICOMWEB_TOKEN``
(bearer), else ``$SWINUNETR_DICOMWEB_USER`` and ``$SWINUNETR_DICOMWEB_PASSWORD`` (basic).
A URL with a password in it is refused. Every failure of the server (refused credentials,
an unknown series, a connection that drops part way) is a one-line :class:`UserError`.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Mapping, Optional, Sequence
from urllib.parse import urlsplit

from SwinUNETRSegmentLib.errors import CancelledError, UserError

__all__ = ["BearerAuth", "ENV_AUTH_FILE", "ENV_TOKEN", "ENV_USER", "ENV_PASSWORD", "read_auth", "connect",
           "find_series", "fetch_series", "existing_segmentations", "series_seg", "store", "segment_series",
           "SeriesJob"]

ENV_AUTH_FILE = "SWINUNETR_DICOMWEB_AUTH_FILE"
ENV_TOKEN = "SWINUNETR_DICOMWEB_TOKEN"
ENV_USER = "SWINUNETR_DICOMWEB_USER"
ENV_PASSWORD = "SWINUNETR_DICOMWEB_PASSWORD"
#: seconds to wait for a server to connect or to send the next bytes
TIMEOUT = 60.0
#: any stored transfer syntax: no transcoding on the server (SimpleITK decodes JPEG, JPEG 2000, RLE)
_AS_STORED = (("application/dicom", "*"),)


class BearerAuth:
    """requests auth: ``Authorization: Bearer TOKEN``."""

    def __init__(self, token: str):
        self.token = token

    def __call__(self, request):
        request.headers["Authorization"] = f"Bearer {self.token}"
        return request


def read_auth(auth_file: Optional[str | Path] = None, environ: Mapping[str, str] = os.environ):
    """The credentials to send (a requests auth object, or None for none); see the module doc."""
    path = auth_file or environ.get(ENV_AUTH_FILE)
    if path:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise UserError(f"cannot read the DICOMweb credentials file {path} ({exc.strerror or exc}); "
                            "check the path and its permissions") from None
        line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
        if not line:
            raise UserError(f"the DICOMweb credentials file {path} is empty; "
                            "write 'Bearer TOKEN' or 'USER:PASSWORD' in it")
        scheme, _, rest = line.partition(" ")
        if scheme.lower() == "bearer" and rest.strip():
            return BearerAuth(rest.strip())
        if scheme.lower() == "basic" and ":" in rest:
            line = rest.strip()
        if ":" in line:
            user, _, password = line.partition(":")
            return (user, password)
        return BearerAuth(line)
    if environ.get(ENV_TOKEN):
        return BearerAuth(environ[ENV_TOKEN].strip())
    if environ.get(ENV_USER):
        return (environ[ENV_USER], environ.get(ENV_PASSWORD, ""))
    return None


def connect(url: str, auth_file: Optional[str | Path] = None, environ: Mapping[str, str] = os.environ,
            auth=None):
    """A ``dicomweb_client.DICOMwebClient`` for the DICOMweb root ``url`` (e.g.
    ``http://127.0.0.1:8042/dicom-web``), with a timeout on every request.

    ``auth``: credentials a program already holds (``BearerAuth(token)`` or ``(user,
    password)``, e.g. the engine service's job); when None, those of :func:`read_auth`.
    """
    import requests
    from dicomweb_client.api import DICOMwebClient

    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UserError(f"--pacs {url!r} is not an http(s) URL; give the server's DICOMweb root, "
                        "e.g. https://pacs.example.org/dicom-web")
    if parts.password is not None:
        raise UserError("the --pacs URL holds a password; remove it from the URL and give the credentials in a "
                        f"file (--pacs-auth FILE) or in ${ENV_USER} and ${ENV_PASSWORD}")

    class _Timeout(requests.adapters.HTTPAdapter):
        def send(self, request, **kwargs):
            if kwargs.get("timeout") is None:
                kwargs["timeout"] = TIMEOUT
            return super().send(request, **kwargs)

    session = requests.Session()
    session.auth = auth if auth is not None else read_auth(auth_file, environ)
    session.mount("http://", _Timeout())
    session.mount("https://", _Timeout())
    client = DICOMwebClient(url=url.rstrip("/"), session=session)
    client.set_http_retry_params(retry=False)
    return client


@contextlib.contextmanager
def _server_errors(client, what: str) -> Iterator[None]:
    """Turn what requests and dicomweb-client raise into one line naming the server."""
    import requests

    url = client.base_url
    try:
        yield
    except requests.HTTPError as exc:
        code = getattr(exc.response, "status_code", 0)
        if code in (401, 403):
            raise UserError(f"the DICOMweb server {url} refused the credentials (HTTP {code}) while {what}; check "
                            f"the token or user and password in --pacs-auth, ${ENV_TOKEN} or ${ENV_USER}") from None
        if code == 404:
            raise UserError(f"the DICOMweb server {url} has no such resource (HTTP 404) while {what}; check the "
                            "study and series UIDs and that the URL is the server's DICOMweb root") from None
        raise UserError(f"the DICOMweb server {url} answered HTTP {code} while {what}; "
                        "check the server's log and try again") from None
    except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as exc:
        raise UserError(f"lost the connection to the DICOMweb server {url} while {what} "
                        f"({type(exc).__name__}); check that the server is running and reachable, then try again"
                        ) from None
    except (ValueError, KeyError) as exc:  # a truncated or malformed multipart or JSON answer
        raise UserError(f"the DICOMweb server {url} sent an incomplete or malformed answer while {what} "
                        f"({' '.join(str(exc).split())[:120]}); check that it is running, then try again") from None


def _values(item: dict, tag: str) -> list:
    return list((item.get(tag) or {}).get("Value") or [])


def find_series(client, study: Optional[str] = None, query: Optional[Mapping[str, str]] = None,
                modality: str = "CT") -> list[tuple[str, str]]:
    """(StudyInstanceUID, SeriesInstanceUID) of every series of ``modality`` in ``study``, or
    matching the QIDO-RS ``query`` (attribute keyword or tag -> value, e.g. ``{"PatientID": "42"}``)."""
    filters = {"Modality": modality, **dict(query or {})}
    with _server_errors(client, "searching for series"):
        found = client.search_for_series(study_instance_uid=study, search_filters=filters, get_remaining=True)
    out = []
    for item in found:
        st = (_values(item, "0020000D") or [study])[0]
        se = (_values(item, "0020000E") or [None])[0]
        mod = (_values(item, "00080060") or [modality])[0]
        if se and st and str(mod).upper() == modality.upper():  # servers that ignore the Modality filter
            out.append((str(st), str(se)))
    return out


def fetch_series(client, study: str, series: str, progress: Optional[Callable[[int, int], None]] = None,
                 cancel: Optional[threading.Event] = None):
    """A series from the server as a checked :class:`~SwinUNETRSegmentLib.geometry.Volume`.

    Every instance is retrieved as stored (WADO-RS), written to a temporary folder and read
    like a DICOM folder (:func:`~SwinUNETRSegmentLib.fileio.read.read_volume`: the same
    decoders and geometry checks). Returns ``(volume, info)``; ``info.dicom`` holds the
    instances' headers for the SEG. ``progress(received, expected)`` after each instance.

    Raises:
        UserError: the series is not on the server, the credentials are refused, or the
            connection drops (fewer instances arrive than the server lists).
        CancelledError: ``cancel`` was set.
    """
    import pydicom

    from SwinUNETRSegmentLib.fileio.read import read_volume

    where = f"series {series} of study {study}"
    with _server_errors(client, f"looking up {where}"):
        listed = client.search_for_instances(study_instance_uid=study, series_instance_uid=series,
                                             get_remaining=True)
    expected = {str(_values(i, "00080018")[0]) for i in listed if _values(i, "00080018")}
    if not expected:
        raise UserError(f"{where} is not on the DICOMweb server {client.base_url}; "
                        "check the UIDs (the server's QIDO-RS lists none of its instances)")
    with tempfile.TemporaryDirectory(prefix="swinunetr-dicomweb-") as tmp:
        received: set[str] = set()
        with _server_errors(client, f"retrieving {where} ({len(expected)} instances)"), \
                warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for n, ds in enumerate(client.iter_series(study, series, media_types=_AS_STORED)):
                if cancel is not None and cancel.is_set():
                    raise CancelledError("cancelled while retrieving the series")
                if any("End of file" in str(w.message) for w in caught):
                    break  # pydicom read a truncated instance: the connection dropped inside it
                pydicom.dcmwrite(os.path.join(tmp, f"{n:06d}.dcm"), ds, enforce_file_format=True)
                received.add(str(ds.get("SOPInstanceUID") or n))
                if progress is not None:
                    progress(len(received), len(expected))
        if not expected <= received:
            raise UserError(f"lost the connection to the DICOMweb server {client.base_url} while retrieving "
                            f"{where}: {len(expected & received)} of {len(expected)} instances arrived; "
                            "check that the server is running, then try again")
        volume, info = read_volume(tmp)
    info.source = f"{client.base_url} {where}"
    info.extra.update(study_uid=study, series_uid=series)
    return volume, info


def existing_segmentations(client, study: str, algorithm) -> set[str]:
    """SeriesInstanceUIDs in ``study`` that a SEG made by ``algorithm`` (name and version)
    already references: what a rerun skips."""
    import pydicom

    from SwinUNETRSegmentLib.fileio.dicomseg import seg_references

    with _server_errors(client, f"searching study {study} for segmentations"):
        segs = client.search_for_series(study_instance_uid=study, search_filters={"Modality": "SEG"},
                                        get_remaining=True)
        done: set[str] = set()
        for item in segs:
            uid = (_values(item, "0020000E") or [None])[0]
            if not uid or str((_values(item, "00080060") or ["SEG"])[0]).upper() != "SEG":
                continue
            for meta in client.retrieve_series_metadata(study, str(uid)):
                ds = pydicom.Dataset.from_json(meta, bulk_data_uri_handler=lambda *_a: b"")
                series, algorithms = seg_references(ds)
                if (algorithm.name, algorithm.version) in algorithms:
                    done |= series
    return done


def store(client, dataset) -> None:
    """Send one instance to the server with STOW-RS; a refusal is a UserError."""
    with _server_errors(client, "storing the DICOM SEG"):
        response = client.store_instances([dataset])
    failed = response.get("FailedSOPSequence") if response is not None else None
    if failed:
        reason = failed[0].get("FailureReason", "")
        raise UserError(f"the DICOMweb server {client.base_url} refused the DICOM SEG (failure reason {reason}); "
                        "check the server's log")


def series_seg(labels, card, info, algorithm, segmentation_type: str = "binary"):
    """``(seg, notes)``: the DICOM SEG of ``labels`` (a Volume on the series' grid) for a series
    :func:`fetch_series` returned ``info`` of, on the server's own UIDs so that it joins the
    series' study, and notes on what was filled in."""
    from SwinUNETRSegmentLib.fileio.dicomseg import build_dicom_seg, prepare_sources

    sources, notes = prepare_sources(info.dicom, repair_invalid_uids=False)
    return build_dicom_seg(labels, card, sources, algorithm, segmentation_type), notes


@dataclass
class SeriesJob:
    """What :func:`segment_series` did with one series."""

    study: str
    series: str
    skipped: bool = False
    seg_uid: str = ""
    written: list[Path] = field(default_factory=list)
    stored: bool = False
    found: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def segment_series(segmenter, client, study: str, series: str, *, store_result: bool = True,
                   outputs: Sequence[str | Path] = (), segmentation_type: str = "binary",
                   skip_existing: bool = True, algorithm=None, done: Optional[set[str]] = None,
                   progress=None, cancel: Optional[threading.Event] = None,
                   dicom_seg_suffixes: Sequence[str] = (".dcm",)) -> SeriesJob:
    """One DICOMweb job: fetch a series, segment it, make its DICOM SEG, store it (STOW-RS)
    and/or write it to ``output``. The command line's job; the engine service runs the same
    steps (:func:`fetch_series` before its device queue, :func:`series_seg` and :func:`store` after).

    Args:
        segmenter: a loaded segmenter (``SegmenterProtocol``: ``card`` and ``segment``).
        client: from :func:`connect`.
        study, series: the series' UIDs.
        store_result: send the SEG back to the server.
        outputs: files to write too (checked by the caller): ``.dcm`` (or any name when
            ``dicom_seg_suffixes`` is empty) gets the SEG, ``.seg.nrrd`` / ``.nii[.gz]`` the labels.
        segmentation_type: "binary" or "labelmap".
        skip_existing: do nothing when a SEG of the same model and weights references the series.
        algorithm: the SEG's :class:`~SwinUNETRSegmentLib.fileio.dicomseg.Algorithm`
            (default: the segmenter's card and checkpoint).
        done: series already known to be segmented (from :func:`existing_segmentations`; looked
            up when None and ``skip_existing``).
        progress: receives the segmenter's progress reports; cancel: a threading.Event.
    """
    from SwinUNETRSegmentLib.fileio.atomic import atomic_path
    from SwinUNETRSegmentLib.fileio.dicomseg import algorithm_of
    from SwinUNETRSegmentLib.fileio.read import has_suffix
    from SwinUNETRSegmentLib.fileio.write import write_segmentation

    card = segmenter.card
    algorithm = algorithm or algorithm_of(card, getattr(segmenter, "checkpoint", None))
    job = SeriesJob(study, series)
    if skip_existing:
        done = existing_segmentations(client, study, algorithm) if done is None else done
        if series in done:
            job.skipped = True
            return job
    volume, info = fetch_series(client, study, series, cancel=cancel)
    result = segmenter.segment(volume, progress=progress, cancel=cancel)
    seg, job.notes = series_seg(result.labels, card, info, algorithm, segmentation_type)
    job.seg_uid = str(seg.SOPInstanceUID)
    job.found = [card.label(v).name for v in result.present_labels() if any(lab.value == v for lab in card.labels)]
    for out in outputs:
        if not dicom_seg_suffixes or has_suffix(out, dicom_seg_suffixes):
            with atomic_path(out) as tmp:
                seg.save_as(str(tmp), enforce_file_format=True)
            job.written.append(Path(out))
        else:
            job.written += write_segmentation(out, result.labels, card.labels)
    if store_result:
        store(client, seg)
        job.stored = True
    return job
