"""The command line's ``--server URL``: a segmenter whose work an engine service does.

``swinunetr-segment -i ct.nii.gz -o ct.seg.nrrd --server https://host:8443 --token-file tok``
reads the scan here, uploads it, and writes the labels the server sends back with the same
writers as a local run, so the files are the same (the labels byte for byte). The token
comes from ``--token-file``, else ``SWINUNETR_SEGMENT_TOKEN``, else the token file a
server on this machine made (``<catalog home>/server-token``).

``swinunetr-segment --pacs URL --study UID --series UID --store --server https://host:8443``
(:func:`run_pacs_on_server`) has the server fetch the series from the PACS itself, with the
credentials its operator configured (``serve --pacs URL --pacs-auth FILE``), segment it and
store the DICOM SEG; ``-o`` files are written here from what it sends back.
"""

from __future__ import annotations

import argparse
import os
import threading
from pathlib import Path
from typing import Optional, Sequence

from SwinUNETRSegmentLib.errors import UserError
from SwinUNETRSegmentLib.geometry import Volume
from SwinUNETRSegmentLib.inference.api import SegmentationResult
from SwinUNETRSegmentLib.models.cards import ModelCard, card_from_dict
from SwinUNETRSegmentLib.progress import ProgressCallback
from SwinUNETRSegmentLib.service.client import Client, ServiceError
from SwinUNETRSegmentLib.service.pacs import DicomwebSeries
from SwinUNETRSegmentLib.service.protocol import JobOptions

__all__ = ["RemoteSegmenter", "server_client", "remote_model", "remote_segmenter", "run_pacs_on_server"]

TOKEN_ENV = "SWINUNETR_SEGMENT_TOKEN"


def server_client(args: argparse.Namespace) -> Client:
    """The client of ``--server`` with its token."""
    from SwinUNETRSegmentLib.service.auth import default_token_file

    if args.token_file:
        if not Path(args.token_file).expanduser().is_file():
            raise UserError(f"token file not found: {args.token_file}")
        return Client.from_token_file(args.server, Path(args.token_file).expanduser())
    if os.environ.get(TOKEN_ENV):
        return Client(args.server, os.environ[TOKEN_ENV].strip())
    if default_token_file().is_file():
        return Client.from_token_file(args.server, default_token_file())
    raise UserError(f"--server {args.server} needs a token: give --token-file F (the token the server's "
                    f"administrator gave you) or set {TOKEN_ENV}")


class RemoteSegmenter:
    """:class:`~SwinUNETRSegmentLib.inference.api.SegmenterProtocol` over a service."""

    loaded = True

    def __init__(self, client: Client, card: ModelCard, options: JobOptions):
        self.client, self.card, self.options = client, card, options

    def segment(self, volume: Volume, progress: Optional[ProgressCallback] = None,
                cancel: Optional[threading.Event] = None) -> SegmentationResult:
        res = self.client.segment(volume.array, volume.ijk_to_ras, options=self.options, progress=progress,
                                  cancel=cancel)
        labels = Volume(res.labels, volume.ijk_to_ras.copy())
        if tuple(res.labels.shape) != volume.shape or not Volume(res.labels, res.ijk_to_ras).same_grid(labels):
            raise ServiceError(f"{self.client.url} sent labels on another grid than the scan's; "
                               "is the server a swinunetr-segment of the same version?")
        return SegmentationResult(labels, self.card, f"{res.device} at {self.client.url}", res.timings, res.stats)


def remote_model(args: argparse.Namespace) -> tuple[ModelCard, None]:
    """The card of ``--model`` as the server has it (no weights here: the server has them)."""
    if args.card or args.checkpoint:
        raise UserError("--card and --checkpoint run only here; with --server give --model NAME of a model the "
                        "server has (swinunetr-segment models add/install on the server)")
    if args.overlap is not None and not 0 <= args.overlap < 1:
        raise UserError(f"--overlap must be at least 0 and less than 1, got {args.overlap}")
    if args.sw_batch_size is not None and args.sw_batch_size < 1:
        raise UserError(f"--sw-batch-size must be at least 1, got {args.sw_batch_size}")
    from SwinUNETRSegmentLib.models.catalog import DEFAULT_MODEL

    name = args.model or DEFAULT_MODEL
    entry = server_client(args).model(name)
    return card_from_dict(entry["card"], source=f"{args.server} model {name}"), None


def _options(args: argparse.Namespace) -> JobOptions:
    from SwinUNETRSegmentLib.models.catalog import DEFAULT_MODEL

    return JobOptions(model=args.model or DEFAULT_MODEL, device=args.device, overlap=args.overlap,
                      precision=getattr(args, "precision", "auto"), sw_batch_size=args.sw_batch_size)


def remote_segmenter(args: argparse.Namespace, card: ModelCard) -> RemoteSegmenter:
    return RemoteSegmenter(server_client(args), card, _options(args))


def run_pacs_on_server(args: argparse.Namespace, cancel: Optional[threading.Event] = None,
                       written: Optional[list[Path]] = None) -> list[Path]:
    """One series of ``--pacs`` segmented by ``--server``, which fetches it and stores its SEG
    (``--store``); ``-o`` files are written here. Returns the files written (also into ``written``)."""
    from SwinUNETRSegmentLib.cli.dicom import _report, dicom_seg_output
    from SwinUNETRSegmentLib.cli.segment import progress_printer
    from SwinUNETRSegmentLib.fileio.atomic import atomic_path
    from SwinUNETRSegmentLib.fileio.dicomweb import SeriesJob
    from SwinUNETRSegmentLib.fileio.write import write_segmentation

    written = [] if written is None else written
    if args.input:
        raise UserError("give either -i IN or --pacs URL, not both")
    if getattr(args, "pacs_auth", None):
        raise UserError("with --server the server reaches the PACS with its own credentials (its operator gives "
                        "them: serve --pacs URL --pacs-auth FILE); drop --pacs-auth")
    if getattr(args, "query", None) or not (args.study and args.series):
        raise UserError("with --server, --pacs segments one series: give --study UID and --series UID")
    if not args.store and not args.output:
        raise UserError("--pacs needs --store (send the DICOM SEG back to the PACS), -o OUT, or both")
    outputs = _checked_outputs(args, args.output or [])
    card, _ = remote_model(args)
    series = DicomwebSeries(args.pacs, args.study, args.series, store=bool(args.store),
                            segmentation_type=getattr(args, "dicom_seg_type", "binary"),
                            skip_existing=not args.overwrite)  # as a local --pacs run: no work done twice
    callback, close = progress_printer(args.quiet)
    try:
        res = server_client(args).segment(options=_options(args), progress=callback, cancel=cancel, dicomweb=series,
                                          dicom_seg=any(dicom_seg_output(args, o) for o in outputs))
    finally:
        close()
    if res.dicomweb.get("skipped"):
        _report(args, card, SeriesJob(args.study, args.series, skipped=True))
        return written
    labels = Volume(res.labels, res.ijk_to_ras)
    for out in outputs:
        if dicom_seg_output(args, out):
            with atomic_path(out) as tmp:
                Path(tmp).write_bytes(res.dicom_seg or b"")
            written.append(out)
        else:
            written += write_segmentation(out, labels, card.labels)
    d = res.dicomweb
    found = [card.label(v).name for v in res.present if any(lab.value == v for lab in card.labels)]
    _report(args, card, SeriesJob(args.study, args.series, seg_uid=d.get("seg_uid") or "", stored=bool(d.get("stored")),
                                  found=found, notes=list(d.get("notes") or [])))
    return written


def _checked_outputs(args: argparse.Namespace, names: Sequence[str]) -> list[Path]:
    """``-o`` files, each checked before the job starts (as a local run checks them)."""
    from SwinUNETRSegmentLib.cli.dicom import output_suffixes
    from SwinUNETRSegmentLib.fileio.read import has_suffix
    from SwinUNETRSegmentLib.fileio.write import LABELMAP_SUFFIXES, check_output_path, label_table_path

    outputs = [check_output_path(o, args.overwrite, output_suffixes(args)) for o in names]
    for o in outputs:
        if has_suffix(o, LABELMAP_SUFFIXES) and getattr(args, "output_type", None) != "dicom-seg":
            check_output_path(label_table_path(o), args.overwrite)
    if len({str(o.resolve()) for o in outputs}) != len(outputs):
        raise UserError("the same output is given twice; give each -o a different file")
    return outputs
