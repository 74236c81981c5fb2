"""The segment command's DICOM side: DICOM SEG outputs, and series on a DICOMweb server as input.

``-o result.dcm`` (or ``--output-type dicom-seg``) writes a DICOM SEG of a DICOM input
(:func:`dicom_seg_output`, :func:`write_output`); an input that is not DICOM has no series
to reference, which is said before any work.

``swinunetr-segment --pacs URL --study UID [--series UID] --store`` (:func:`run_pacs`):

One series (``--series``), every CT series of a study (``--study`` alone), or every CT
series a QIDO-RS query matches (``--query KEY=VALUE``, repeatable), all with one model
load. Each result goes back as a DICOM SEG with STOW-RS (``--store``) and/or into ``-o``:
a file for one series (``.dcm``, ``.seg.nrrd``, ``.nii[.gz]``), a folder for several
(``<SeriesInstanceUID>.dcm``). A series that a SEG of the same model and weights already
references is skipped, so a rerun does no work twice (``--overwrite`` segments it again).
The work of one series is :func:`SwinUNETRSegmentLib.fileio.dicomweb.segment_series`.
"""

from __future__ import annotations

import argparse
import sys
import threading
from pathlib import Path
from typing import Optional

from SwinUNETRSegmentLib.cli.app import PROG
from SwinUNETRSegmentLib.errors import UserError
from SwinUNETRSegmentLib.fileio.read import DICOM_SUFFIXES, has_suffix

__all__ = ["OUTPUT_TYPES", "BATCH_SUFFIXES", "output_suffixes", "dicom_seg_output", "check_dicom_seg_input",
           "write_output", "run_pacs", "parse_query"]

#: ``--output-type``: the format of every output, whatever its name (default: from the name)
OUTPUT_TYPES = ("seg-nrrd", "nifti", "dicom-seg")
#: the file a folder of scans gets per scan, by ``--output-type``
BATCH_SUFFIXES = {"seg-nrrd": ".seg.nrrd", "nifti": ".nii.gz", "dicom-seg": ".dcm"}


def output_suffixes(args: argparse.Namespace):
    """The output names ``-o`` accepts: any with ``--output-type dicom-seg``, else the known suffixes."""
    from SwinUNETRSegmentLib.fileio.dicomseg import DICOM_SEG_SUFFIXES
    from SwinUNETRSegmentLib.fileio.write import OUTPUT_SUFFIXES

    return None if getattr(args, "output_type", None) == "dicom-seg" else OUTPUT_SUFFIXES + DICOM_SEG_SUFFIXES


def dicom_seg_output(args: argparse.Namespace, path) -> bool:
    """Whether output ``path`` is a DICOM SEG (``.dcm``, or any name under ``--output-type dicom-seg``)."""
    from SwinUNETRSegmentLib.fileio.dicomseg import DICOM_SEG_SUFFIXES
    from SwinUNETRSegmentLib.fileio.read import has_suffix

    return getattr(args, "output_type", None) == "dicom-seg" or has_suffix(path, DICOM_SEG_SUFFIXES)


def check_dicom_seg_input(args: argparse.Namespace, outputs) -> None:
    """Before any work: a DICOM SEG output needs a DICOM series as input."""
    seg = [o for o in outputs if dicom_seg_output(args, o)]
    if seg and args.input and not Path(args.input).is_dir() and not has_suffix(args.input, DICOM_SUFFIXES):
        raise UserError(f"cannot write {Path(seg[0]).name}: a DICOM SEG references the DICOM series it segments, "
                        f"and {Path(args.input).name} is not a DICOM series, so there is no series to reference; "
                        "give a DICOM folder, a multi-frame .dcm file (or --pacs) as input, "
                        "or write .seg.nrrd or .nii.gz")


def write_output(args: argparse.Namespace, path, result, info, segmenter) -> list[Path]:
    """Write one output of a run in its format; returns the files written."""
    from SwinUNETRSegmentLib.fileio.dicomseg import algorithm_of, prepare_sources, write_dicom_seg
    from SwinUNETRSegmentLib.fileio.write import write_segmentation

    card = segmenter.card
    if not dicom_seg_output(args, path):
        return write_segmentation(path, result.labels, card.labels)
    if not info.dicom:
        raise UserError(f"cannot write {Path(path).name}: {info.source} is not a DICOM series, so a DICOM SEG "
                        "has no series to reference; write .seg.nrrd or .nii.gz")
    if not args.quiet:
        for note in prepare_sources(info.dicom)[1]:
            print(f"{PROG}: warning: {note}", file=sys.stderr)
    algorithm = algorithm_of(card, getattr(segmenter, "checkpoint", None))
    kind = getattr(args, "dicom_seg_type", "binary")
    return [write_dicom_seg(path, result.labels, card, info.dicom, algorithm, kind)]



def parse_query(items) -> dict[str, str]:
    """``--query KEY=VALUE`` items as QIDO-RS search filters."""
    out = {}
    for item in items or []:
        key, sep, value = str(item).partition("=")
        if not sep or not key.strip():
            raise UserError(f"--query {item!r} is not KEY=VALUE; e.g. --query PatientID=12345 --query StudyDate=2024")
        out[key.strip()] = value.strip()
    return out


def _outputs(args: argparse.Namespace, single: bool) -> tuple[list[Path], Optional[Path]]:
    """(files for one series, or the folder for several), checked before any work."""
    from SwinUNETRSegmentLib.fileio.write import check_output_path

    outs = list(args.output or [])
    if not single:
        if len(outs) > 1 or (outs and not Path(outs[0]).is_dir()):
            raise UserError("with several series (--study without --series, or --query) give -o an existing folder "
                            "(each series becomes <SeriesInstanceUID>.dcm), or only --store")
        if outs:
            check_output_path(Path(outs[0]) / ".probe.dcm", overwrite=True)
        return [], Path(outs[0]) if outs else None
    return [check_output_path(o, args.overwrite, output_suffixes(args)) for o in outs], None


def run_pacs(args: argparse.Namespace, cancel: Optional[threading.Event] = None,
             written: Optional[list[Path]] = None) -> list[Path]:
    """Segment the series ``args`` name on the DICOMweb server ``args.pacs``; returns the files written."""
    from SwinUNETRSegmentLib.cli.segment import _model, _segmenter, progress_printer
    from SwinUNETRSegmentLib.fileio import dicomweb
    from SwinUNETRSegmentLib.fileio.dicomseg import DICOM_SEG_SUFFIXES, algorithm_of

    written = [] if written is None else written
    query = parse_query(getattr(args, "query", None))
    if args.input:
        raise UserError("give either -i IN or --pacs URL, not both")
    if not (args.study or query):
        raise UserError("--pacs needs --study UID (with --series UID for one series) or --query KEY=VALUE")
    if args.series and not args.study:
        raise UserError(f"--series {args.series} needs --study UID (DICOMweb addresses a series within its study)")
    if not args.store and not args.output:
        raise UserError("--pacs needs --store (send the DICOM SEG back to the server), -o OUT, or both")
    single = bool(args.series)
    dicom_suffixes = () if getattr(args, "output_type", None) == "dicom-seg" else DICOM_SEG_SUFFIXES
    files, folder = _outputs(args, single)
    card, weights = _model(args)
    client = dicomweb.connect(args.pacs, getattr(args, "pacs_auth", None))
    if single:
        targets = [(args.study, args.series)]
    else:
        targets = dicomweb.find_series(client, args.study, query, modality=card.modality or "CT")
        if not targets:
            where = f"study {args.study}" if args.study else f"the query {query}"
            raise UserError(f"no {card.modality or 'CT'} series in {where} on {args.pacs}; check the UIDs or the query")
    algorithm = algorithm_of(card, weights)
    segmenter = None  # loaded once, when the first series needs it
    done: dict[str, set[str]] = {}
    failed: list[str] = []
    for study, series in targets:
        try:
            if not args.overwrite and study not in done:
                done[study] = dicomweb.existing_segmentations(client, study, algorithm)
            outs = files if single else ([folder / f"{series}.dcm"] if folder is not None else [])
            if not args.overwrite and series in done[study]:
                job = dicomweb.SeriesJob(study, series, skipped=True)
                _report(args, card, job)
                continue
            segmenter = segmenter or _segmenter(args, card, weights)
            callback, close = progress_printer(args.quiet)
            try:
                job = dicomweb.segment_series(
                    segmenter, client, study, series, store_result=args.store, outputs=outs,
                    segmentation_type=getattr(args, "dicom_seg_type", "binary"), skip_existing=not args.overwrite,
                    algorithm=algorithm, done=done.get(study, set()), progress=callback, cancel=cancel,
                    dicom_seg_suffixes=dicom_suffixes)
            finally:
                close()
        except UserError as exc:
            if single:
                raise
            failed.append(series)
            print(f"{PROG}: error: series {series}: {exc}", file=sys.stderr)
            continue
        written += job.written
        _report(args, card, job)
    if failed:
        raise UserError(f"{len(failed)} of {len(targets)} series failed ({', '.join(failed[:5])}); "
                        "the others were done")
    return written


def _report(args: argparse.Namespace, card, job) -> None:
    if args.quiet:
        return
    for note in job.notes:
        print(f"{PROG}: warning: {note}", file=sys.stderr)
    if job.skipped:
        print(f"{PROG}: series {job.series}: skipped, a DICOM SEG of model '{card.name}' already references it "
              "(--overwrite segments it again)", file=sys.stderr)
    else:
        print(f"{PROG}: series {job.series}: {len(job.found)} of {len(card.labels)} structures found "
              f"({', '.join(job.found) or 'none'}); DICOM SEG {job.seg_uid}"
              f"{' stored on the server' if job.stored else ''}", file=sys.stderr)
