"""The engine service's DICOMweb jobs: a series on a PACS that the server fetches, segments
and, on request, stores the DICOM SEG of; a laptop without a GPU (or without a route to the
PACS) names the series, the GPU server does the rest.

- A client names the series (:class:`DicomwebSeries`: the PACS's DICOMweb root, the study
  and series UIDs, whether to store the SEG) and never sends PACS credentials.
- The server reaches only the PACS its operator configured (``serve --pacs URL
  [--pacs-auth FILE]``, :class:`PacsRegistry`), each with its own credentials file (read
  for each job, so that a rotated token needs no restart; without one, the server's
  environment as on the command line, else none). A job naming another URL is refused
  with :class:`UnknownPacs` (HTTP 400), before anything is fetched.
- A job's steps are the command line's (:mod:`SwinUNETRSegmentLib.fileio.dicomweb`):
  :func:`~SwinUNETRSegmentLib.fileio.dicomweb.fetch_series` on a thread of the job's own
  while it waits for its device (progress per instance, cancel between instances), the
  engine on the device, then ``series_seg`` and ``store`` (:meth:`DicomwebJob.after`). The
  labels come back as for every job; the result adds ``dicomweb``: the series, ``seg_uid``
  and ``stored``; the SEG itself is ``GET /jobs/{id}/seg.dcm``.

The request half (:class:`DicomwebSeries`, :func:`normalize_url`) imports only the standard
library: the client, in 3D Slicer's Python, uses it.
"""

from __future__ import annotations

import re
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional, Sequence
from urllib.parse import urlsplit, urlunsplit

from SwinUNETRSegmentLib.errors import UserError
from SwinUNETRSegmentLib.progress import STAGES, Progress

__all__ = ["OUTPUT_TYPES", "SEGMENTATION_TYPES", "DicomwebSeries", "normalize_url", "UnknownPacs", "PacsRegistry",
           "DicomwebJob"]

#: what a DICOMweb job makes: the labels and a DICOM SEG (stored with ``store``), or the labels only
OUTPUT_TYPES = ("dicom-seg", "labels")
#: the SEG's encoding, as ``--dicom-seg-type``
SEGMENTATION_TYPES = ("binary", "labelmap")
_UID = re.compile(r"[0-9]+(\.[0-9]+)*")
_ADD = "its administrator adds one with: swinunetr-segment serve --pacs URL --pacs-auth FILE"


def normalize_url(url: str) -> str:
    """A DICOMweb root as compared: scheme and host in lower case, no default port, no trailing slash."""
    parts = urlsplit(url.strip())
    scheme, host = parts.scheme.lower(), (parts.hostname or "").lower()
    try:
        port = parts.port
    except ValueError:
        raise UserError(f"the PACS URL {url!r} has a bad port; give e.g. https://pacs.example.org/dicom-web") from None
    netloc = f"[{host}]" if ":" in host else host
    if port is not None and port != {"http": 80, "https": 443}.get(scheme):
        netloc += f":{port}"
    return urlunsplit((scheme, netloc, parts.path.rstrip("/"), parts.query, ""))


@dataclass(frozen=True)
class DicomwebSeries:
    """A series on a PACS for the server to segment (the body of ``POST /jobs/dicomweb``,
    beside ``options``).

    Attributes:
        pacs: the PACS's DICOMweb root as the server is configured for it, e.g.
            ``https://pacs.example.org/dicom-web`` (no user name or password in it).
        study, series: the StudyInstanceUID and SeriesInstanceUID.
        store: send the DICOM SEG back to the PACS with STOW-RS (into the same study).
        output_type: "dicom-seg" (the labels and a SEG) or "labels" (no SEG; not with store).
        segmentation_type: the SEG's encoding, "binary" or "labelmap".
        skip_existing: do nothing when a DICOM SEG of the same model and weights already
            references the series on the PACS (the job ends done, ``result["dicomweb"]["skipped"]``
            true, with no labels): a rerun does no work twice.
    """

    pacs: str
    study: str
    series: str
    store: bool = False
    output_type: str = "dicom-seg"
    segmentation_type: str = "binary"
    skip_existing: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.pacs, str):
            raise UserError("pacs must be the PACS's DICOMweb root, an http(s) URL")
        parts = urlsplit(self.pacs.strip())
        if "@" in parts.netloc:  # never echoed: it may hold a password
            raise UserError("the PACS URL holds a user name or password; send it without: the server uses its own "
                            "credentials for each PACS it is configured for")
        if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
            raise UserError(f"pacs must be the PACS's DICOMweb root, an http(s) URL such as "
                            f"https://pacs.example.org/dicom-web; got {self.pacs!r}")
        normalize_url(self.pacs)  # a bad port
        for name in ("study", "series"):
            value = getattr(self, name)
            if not isinstance(value, str) or len(value) > 64 or not _UID.fullmatch(value):
                raise UserError(f"{name} must be a DICOM UID (digits and dots, at most 64 characters), got {value!r}")
        for name in ("store", "skip_existing"):
            if not isinstance(getattr(self, name), bool):
                raise UserError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.output_type not in OUTPUT_TYPES:
            raise UserError(f"output_type must be one of {', '.join(OUTPUT_TYPES)}, got {self.output_type!r}")
        if self.segmentation_type not in SEGMENTATION_TYPES:
            raise UserError(f"segmentation_type must be one of {', '.join(SEGMENTATION_TYPES)}, "
                            f"got {self.segmentation_type!r}")
        if self.store and self.output_type != "dicom-seg":
            raise UserError("store sends the DICOM SEG to the PACS: give output_type dicom-seg, or store false")

    to_dict = asdict

    @classmethod
    def from_dict(cls, data: Any) -> "DicomwebSeries":
        if not isinstance(data, dict):
            raise UserError('give the series as JSON: {"pacs": URL, "study": UID, "series": UID, "store": false, '
                            '"options": {...}}')
        fields = cls.__dataclass_fields__
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise UserError(f"unknown field {unknown[0]!r} of a DICOMweb job; known: {', '.join(fields)}, options")
        missing = [f for f in ("pacs", "study", "series") if f not in data]
        if missing:
            raise UserError(f"a DICOMweb job needs {', '.join(missing)}: "
                            '{"pacs": URL, "study": UID, "series": UID, "store": false, "options": {...}}')
        return cls(**data)

    def __str__(self) -> str:
        return f"series {self.series} of study {self.study} on {self.pacs}"


class UnknownPacs(UserError):
    """A PACS this server is not configured to reach (HTTP 400)."""


class PacsRegistry:
    """The PACS a server may reach: ``(url, credentials file or None)`` pairs, as
    ``serve --pacs URL [--pacs-auth FILE]`` gives them (None: the server's environment,
    ``$SWINUNETR_DICOMWEB_*``, as on the command line, else no credentials)."""

    def __init__(self, entries: Sequence[tuple[str, Optional[str | Path]]] = ()):
        self._entries: dict[str, tuple[str, Optional[Path]]] = {}
        for url, auth in entries:
            key = normalize_url(url)
            if key in self._entries:
                raise UserError(f"--pacs {url} is given twice; give each PACS once, with its --pacs-auth")
            self._entries[key] = (url.strip().rstrip("/"), None if auth is None else Path(auth).expanduser())

    def __len__(self) -> int:
        return len(self._entries)

    def urls(self) -> list[str]:
        return [url for url, _ in self._entries.values()]

    def check(self) -> None:
        """Each URL and credentials file as a job would meet them: one line before serving, not at the first job."""
        from SwinUNETRSegmentLib.fileio import dicomweb

        for url, auth in self._entries.values():
            dicomweb.connect(url, auth)  # checks the URL and reads the credentials; sends nothing

    def connect(self, url: str):
        """A DICOMweb client of the configured PACS ``url`` names, with its credentials;
        :class:`UnknownPacs` for one that is not configured."""
        from SwinUNETRSegmentLib.fileio import dicomweb

        entry = self._entries.get(normalize_url(url))
        if entry is None:
            if not self._entries:
                raise UnknownPacs(f"this server is configured to reach no PACS, so it cannot fetch from {url}; {_ADD}")
            raise UnknownPacs(f"this server is not configured to reach the PACS {url}; it reaches "
                              f"{', '.join(self.urls())} ({_ADD})")
        return dicomweb.connect(*entry)


_ALGORITHMS: dict[tuple, Any] = {}
_ALGORITHMS_LOCK = threading.Lock()


def _algorithm(card, weights: Path):
    """The SEG's algorithm (its version hashes the weights: once per weights file, not per job)."""
    from SwinUNETRSegmentLib.fileio.dicomseg import algorithm_of

    st = Path(weights).stat()
    key = (card.name, str(weights), st.st_size, st.st_mtime_ns)
    with _ALGORITHMS_LOCK:
        if key not in _ALGORITHMS:
            _ALGORITHMS[key] = algorithm_of(card, weights)
        return _ALGORITHMS[key]


class DicomwebJob:
    """The source of a job (:meth:`~.jobs.JobManager.submit`'s ``source``): the series it
    fetches before it is queued, and the SEG it makes (and stores) once the labels are there."""

    def __init__(self, series: DicomwebSeries, client):
        self.series, self.client = series, client

    def __str__(self) -> str:
        return str(self.series)

    def fetch(self, job):
        """The series' volume (on the job's fetch thread); its headers wait in ``job.context``.
        None when ``skip_existing`` finds a SEG of this model and weights referencing it."""
        from SwinUNETRSegmentLib.fileio.dicomweb import existing_segmentations, fetch_series

        lo, hi = STAGES["reading"]
        s = self.series
        if s.skip_existing:
            job.on_progress(Progress("reading", lo, None, f"looking for DICOM SEGs of {job.card.name} on the PACS"))
            if s.series in existing_segmentations(self.client, s.study, _algorithm(job.card, job.weights)):
                return None

        def progress(received: int, expected: int) -> None:
            job.on_progress(Progress("reading", lo + (hi - lo) * received / max(expected, 1), None,
                                     f"retrieving the series from the PACS: {received} of {expected} instances"))

        job.on_progress(Progress("reading", lo, None, "retrieving the series from the PACS"))
        volume, info = fetch_series(self.client, self.series.study, self.series.series, progress=progress,
                                    cancel=job.cancel)
        job.context["info"] = info
        return volume

    def skipped(self, job) -> dict[str, Any]:
        """What the result of a job that :meth:`fetch` skipped says."""
        s = self.series
        return {"dicomweb": {"pacs": s.pacs, "study": s.study, "series": s.series, "seg_uid": None, "stored": False,
                             "skipped": True, "notes": [f"a DICOM SEG of model '{job.card.name}' (these weights) "
                                                        "already references the series: nothing done"]}}

    def after(self, job, labels) -> dict[str, Any]:
        """Make the DICOM SEG of ``labels`` and store it when asked; what the job's result adds."""
        from SwinUNETRSegmentLib.fileio.dicomweb import series_seg, store

        s = self.series
        out = {"pacs": s.pacs, "study": s.study, "series": s.series, "seg_uid": None, "stored": False,
               "skipped": False, "notes": []}
        info = job.context.pop("info")
        if s.output_type == "dicom-seg":
            lo = STAGES["writing"][0]
            job.on_progress(Progress("writing", lo, None, "making the DICOM SEG"))
            seg, notes = series_seg(labels, job.card, info, _algorithm(job.card, job.weights), s.segmentation_type)
            out.update(seg_uid=str(seg.SOPInstanceUID), notes=notes)
            if s.store:
                job.on_progress(Progress("writing", lo + 0.01, None, f"storing the DICOM SEG on {s.pacs}"))
                store(self.client, seg)
                out["stored"] = True
            job.context["seg"] = seg
        return {"dicomweb": out}
