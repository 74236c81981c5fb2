"""``swinunetr-segment -i IN -o OUT``: segment a scan, or a folder of scans, from the shell.

Everything that can be checked is checked before the scan is read and before the model is
loaded (outputs writable and not already there, the model and its weights present), so
that a bad command line fails in a second with one line that says what to do.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
from pathlib import Path
from typing import Callable, Optional

from SwinUNETRSegmentLib.cli.app import PROG
from SwinUNETRSegmentLib.cli.dicom import (
    BATCH_SUFFIXES,
    OUTPUT_TYPES,
    check_dicom_seg_input,
    dicom_seg_output,
    output_suffixes,
    write_output,
)
from SwinUNETRSegmentLib.errors import UserError
from SwinUNETRSegmentLib.fileio.dicomseg import SEGMENTATION_TYPES
from SwinUNETRSegmentLib.fileio.read import ITK_SUFFIXES, NIFTI_SUFFIXES, has_suffix, read_volume
from SwinUNETRSegmentLib.fileio.write import (
    LABELMAP_SUFFIXES,
    OUTPUT_SUFFIXES,
    SEG_SUFFIXES,
    check_output_path,
    label_table_path,
    write_segmentation,
)

__all__ = ["build_parser", "run", "run_batch", "is_batch", "scan_entries", "progress_printer"]

#: precisions ``--precision`` accepts (the network's; see ``inference.options.FastPath``)
PRECISIONS = ("auto", "float32", "bfloat16", "float16")
#: ``--backend`` choices (``inference.options.Backend``)
BACKENDS = ("auto", "torch", "openvino")


def build_parser(parser_class: type = argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of the segment command (the CLI's default command)."""
    p = parser_class(
        prog=PROG,
        description="Segment a CT with a SwinUNETR model (MONAI) and write a segmentation that opens in 3D Slicer.",
        epilog="Outputs: .seg.nrrd (Slicer segmentation with names, colours, SNOMED terminology), "
        ".nii/.nii.gz (label map, with a Slicer colour-table .csv beside it) or .dcm (DICOM SEG of a DICOM input). "
        "Give -o more than once for several.",
    )
    p.add_argument("-i", "--input", metavar="IN",
                   help="NIfTI (.nii, .nii.gz), NRRD (.nrrd, .nhdr), MetaImage (.mha, .mhd) file, "
                   "or a folder with one DICOM series; or a folder of scans when OUT is a folder (or use --pacs)")
    p.add_argument("-o", "--output", action="append", metavar="OUT",
                   help="output file: .seg.nrrd, .nii, .nii.gz or .dcm (DICOM SEG) (repeatable); or an existing folder "
                   "for a folder of scans (split across processes under torchrun)")
    p.add_argument("--model", metavar="NAME", help="catalog model (card and installed weights)")
    p.add_argument("--card", metavar="NAME_OR_JSON", help="model card: a built-in name or a card JSON file")
    p.add_argument("--checkpoint", metavar="PATH",
                   help="weights to run under --card (or instead of a model's installed weights)")
    p.add_argument("--device", default="auto",
                   help="auto (CUDA, then Apple MPS, then CPU), cpu, cuda, cuda:N or mps (default: auto)")
    p.add_argument("--overlap", type=float, default=None, help="sliding-window overlap, 0 to <1 (default: the card's)")
    p.add_argument("--sw-batch-size", type=int, default=None, help="windows per network call (default: the card's)")
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="network precision: auto = bfloat16 on CPUs that have it, float16 on CUDA; "
                        "float32 gives the MONAI reference pipeline's labels exactly")
    p.add_argument("--backend", choices=BACKENDS, default="auto",
                   help="what runs the network on the CPU: auto = OpenVINO when this model was converted for it "
                        "('models convert NAME'; a folder of scans converts after its first), else PyTorch; "
                        "openvino = convert now if needed; torch")
    p.add_argument("--preview", metavar="PNG",
                   help="also write a PNG: three orthogonal slices with the segments overlaid")
    p.add_argument("--series", metavar="UID",
                   help="SeriesInstanceUID to read when the DICOM folder holds several series; with --pacs, the series")
    d = p.add_argument_group("DICOM SEG and DICOMweb")
    d.add_argument("--output-type", choices=OUTPUT_TYPES,
                   help="format of a folder's outputs (default: seg-nrrd); dicom-seg makes any -o name a DICOM SEG")
    d.add_argument("--dicom-seg-type", choices=SEGMENTATION_TYPES, default="binary",
                   help="DICOM SEG encoding: binary (a frame per segment and slice) or labelmap (default: binary)")
    d.add_argument("--pacs", metavar="URL", help="DICOMweb root of a server to read the series from, instead of -i")
    d.add_argument("--study", metavar="UID", help="with --pacs: the StudyInstanceUID (alone: its every CT series)")
    d.add_argument("--query", metavar="KEY=VALUE", action="append",
                   help="with --pacs: segment every CT series this QIDO-RS filter matches (repeatable)")
    d.add_argument("--pacs-auth", metavar="FILE",
                   help="file holding 'Bearer TOKEN' or 'USER:PASSWORD' (else $SWINUNETR_DICOMWEB_TOKEN, "
                   "or $SWINUNETR_DICOMWEB_USER and $SWINUNETR_DICOMWEB_PASSWORD)")
    d.add_argument("--store", action="store_true", help="with --pacs: send each DICOM SEG back with STOW-RS")
    p.add_argument("--overwrite", action="store_true", help="replace outputs that already exist")
    p.add_argument("--server", metavar="URL",
                   help="run on an engine service (swinunetr-segment serve), e.g. https://host:8443; the scan is "
                   "uploaded, the outputs are written here; with --pacs the server fetches the series and stores")
    p.add_argument("--token-file", metavar="F", help="the --server's bearer token (default: $SWINUNETR_SEGMENT_TOKEN, "
                   "else the token file of a server on this machine)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.add_argument("--debug", action="store_true", help="show tracebacks of internal errors")
    return p


def progress_printer(quiet: bool) -> tuple[Optional[Callable], Callable[[], None]]:
    """(callback, close): a callback drawing a tqdm bar on a terminal; None when piped or quiet."""
    if quiet or not sys.stderr.isatty():
        return None, lambda: None
    from tqdm import tqdm

    from SwinUNETRSegmentLib.progress import format_seconds

    bar = tqdm(total=1000, file=sys.stderr, bar_format="{desc} |{bar}| {percentage:3.0f}% {postfix}", leave=False)

    def callback(p):
        bar.set_description_str(p.message[:40].ljust(24))
        bar.n = int(p.fraction * 1000)
        bar.set_postfix_str(f"{format_seconds(p.seconds_left)} left" if p.seconds_left is not None else "")
        bar.refresh()

    return callback, bar.close


def _card(args: argparse.Namespace):
    """The model card that the options name (no weights fetched, no checkpoint hashed)."""
    from SwinUNETRSegmentLib.models import catalog
    from SwinUNETRSegmentLib.models.cards import load_card

    return load_card(args.card) if args.card else catalog.card_of(args.model or catalog.DEFAULT_MODEL)


def _model(args: argparse.Namespace):
    """(card, weights) that the options name; checked before any scan is read."""
    if getattr(args, "server", None):
        from SwinUNETRSegmentLib.service.remote import remote_model

        return remote_model(args)  # the server's card; the weights are the server's
    from SwinUNETRSegmentLib.models import catalog

    if args.model and args.card:
        raise UserError("give --model NAME, or --card with --checkpoint, not both")
    if args.card and not args.checkpoint:
        raise UserError(f"--card {args.card} needs --checkpoint PATH (the weights to run under that card)")
    if args.checkpoint:
        card, weights = _card(args), Path(args.checkpoint)
    else:
        card, weights = catalog.resolve_model(args.model or catalog.DEFAULT_MODEL)
    if not Path(weights).is_file():
        raise UserError(f"checkpoint not found: {weights}; check the path")
    if args.overlap is not None and not 0 <= args.overlap < 1:
        raise UserError(f"--overlap must be at least 0 and less than 1, got {args.overlap}")
    if args.sw_batch_size is not None and args.sw_batch_size < 1:
        raise UserError(f"--sw-batch-size must be at least 1, got {args.sw_batch_size}")
    return card, weights


def _segmenter(args: argparse.Namespace, card, weights):
    """The loaded Segmenter; under torchrun, on this process's GPU; with --server, the service's."""
    if getattr(args, "server", None):
        from SwinUNETRSegmentLib.service.remote import remote_segmenter

        return remote_segmenter(args, card)
    from SwinUNETRSegmentLib.inference.engine import Segmenter
    from SwinUNETRSegmentLib.inference.options import FastPath

    device = args.device
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and device in ("auto", "cuda"):
        import torch

        if torch.cuda.is_available():  # torchrun: one GPU per process
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0')) % torch.cuda.device_count()}"
    segmenter = Segmenter(card, weights, device=device, overlap=args.overlap, sw_batch_size=args.sw_batch_size,
                          fast=FastPath(precision=getattr(args, "precision", "auto"),
                                        backend=getattr(args, "backend", "auto")))
    if not segmenter.runs_on_openvino():  # (a conversion was made from this very checkpoint: it fits)
        segmenter.load()  # a checkpoint that does not fit the card fails here, before any inference
    return segmenter


def is_batch(args: argparse.Namespace) -> bool:
    """A folder of scans to a folder of results: one -o without a segmentation file suffix."""
    return len(args.output) == 1 and not has_suffix(args.output[0], OUTPUT_SUFFIXES + (".png",)) \
        and Path(args.input).is_dir() and (Path(args.output[0]).is_dir() or args.output[0].endswith(("/", os.sep)))


def run(args: argparse.Namespace, cancel: Optional[threading.Event] = None,
        written: Optional[list[Path]] = None) -> list[Path]:
    """Do the work of one command line; returns the files written.

    ``written``, when given, receives each file as soon as it is complete, so that the
    caller can say what was written when the run is cancelled (Ctrl-C) part way.
    """
    written = [] if written is None else written
    if getattr(args, "pacs", None) and getattr(args, "server", None):  # the server fetches, segments, stores
        from SwinUNETRSegmentLib.service.remote import run_pacs_on_server

        return run_pacs_on_server(args, cancel, written)
    if getattr(args, "pacs", None):
        from SwinUNETRSegmentLib.cli.dicom import run_pacs

        return run_pacs(args, cancel, written)
    missing = [name for name, value in (("-i/--input", args.input), ("-o/--output", args.output)) if not value]
    if missing:
        raise UserError(f"the following arguments are required: {', '.join(missing)} "
                        "(or --pacs URL for a series on a DICOMweb server); see --help")
    if is_batch(args):
        return run_batch(args, cancel, written)
    # 1. Everything that can be checked before reading the scan.
    outputs = [check_output_path(o, args.overwrite, output_suffixes(args)) for o in args.output]
    check_dicom_seg_input(args, outputs)
    for o in outputs:
        if has_suffix(o, LABELMAP_SUFFIXES) and getattr(args, "output_type", None) != "dicom-seg":
            check_output_path(label_table_path(o), args.overwrite)
    if len({str(o.resolve()) for o in outputs}) != len(outputs):
        raise UserError("the same output is given twice; give each -o a different file")
    preview = check_output_path(args.preview, args.overwrite, (".png",)) if args.preview else None
    card, weights = _model(args)

    # 2. The scan, the model, the work.
    volume, info = read_volume(args.input, series_uid=args.series)
    _warn_modality(args, info, card)
    segmenter = _segmenter(args, card, weights)
    _segment_one(args, segmenter, volume, info, outputs, preview, cancel, written)
    return written


def _warn_modality(args, info, card) -> None:
    if info.modality and card.modality and info.modality.upper() != card.modality.upper() and not args.quiet:
        print(f"{PROG}: warning: the scan is {info.modality} but model '{card.name}' was trained on {card.modality}; "
              "expect a poor segmentation", file=sys.stderr)


def _segment_one(args, segmenter, volume, info, outputs, preview, cancel, written: list[Path]):
    """Segment one scan and write its outputs, each atomically, appending each to ``written``;
    returns the segmentation result."""
    card = segmenter.card
    callback, close = progress_printer(args.quiet)
    try:
        result = segmenter.segment(volume, progress=callback, cancel=cancel)
    finally:
        close()
    for o in outputs:
        if dicom_seg_output(args, o):
            written += write_output(args, o, result, info, segmenter)
        else:
            written += write_segmentation(o, result.labels, card.labels)
    if preview is not None:
        from SwinUNETRSegmentLib.fileio.preview import write_preview

        written.append(write_preview(preview, volume, result.labels, card.labels, info.modality or card.modality))
    found = [card.label(v).name for v in result.present_labels() if any(lab.value == v for lab in card.labels)]
    if not args.quiet:
        print(f"{PROG}: {Path(info.source).name}: {len(found)} of {len(card.labels)} structures found "
              f"({', '.join(found) or 'none'}) in {result.timings.get('total', 0):.1f} s on {result.device}",
              file=sys.stderr)
    return result


def scan_entries(folder: Path) -> list[Path]:
    """The scans in a folder: image files, and subfolders that hold DICOM files."""
    out = []
    for p in sorted(folder.iterdir()):
        if p.name.startswith("."):
            continue
        if p.is_file() and has_suffix(p, NIFTI_SUFFIXES + ITK_SUFFIXES) and not has_suffix(p, SEG_SUFFIXES):
            out.append(p)
        elif p.is_dir():
            out.append(p)
    return out


def _case_name(p: Path) -> str:
    name = p.name
    for suffix in (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def run_batch(args: argparse.Namespace, cancel: Optional[threading.Event] = None,
              written: Optional[list[Path]] = None) -> list[Path]:
    """Every scan of folder IN to folder OUT (``<case>.seg.nrrd``, and ``<case>.png`` with
    --preview), one model load for all. Under ``torchrun`` each process takes its share of
    the scans (scan n goes to rank n mod WORLD_SIZE). A bad scan is reported and skipped;
    the run then exits with code 2. ``written`` as for :func:`run`."""
    written = [] if written is None else written
    src, dst = Path(args.input), Path(args.output[0])
    if not dst.is_dir():
        raise UserError(f"output folder does not exist: {dst}; create it first")
    check_output_path(dst / ".probe.seg.nrrd", overwrite=True)
    cases = scan_entries(src)
    if not cases:
        raise UserError(f"folder {src} holds no scans (NIfTI, NRRD, MetaImage files or DICOM series folders)")
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    mine = cases[rank::world]
    card, weights = _model(args)
    segmenter = _segmenter(args, card, weights)
    failed: list[str] = []
    for case in mine:
        name = _case_name(case)
        try:
            out = check_output_path(dst / f"{name}{BATCH_SUFFIXES[args.output_type or 'seg-nrrd']}", args.overwrite)
            preview = check_output_path(dst / f"{name}.png", args.overwrite) if args.preview else None
            volume, info = read_volume(case)
            _warn_modality(args, info, card)
            result = _segment_one(args, segmenter, volume, info, [out], preview, cancel, written)
            if case is mine[0] and len(mine) > 1 and hasattr(segmenter, "convert_openvino_if_it_pays") \
                    and result.stats.get("backend") == "torch":
                # the rest of the folder on OpenVINO when its saving there pays for the conversion
                segmenter.convert_openvino_if_it_pays(result.timings.get("inference", 0.0) * (len(mine) - 1))
        except UserError as exc:
            failed.append(case.name)
            print(f"{PROG}: error: {exc}", file=sys.stderr)
    if failed:
        raise UserError(f"{len(failed)} of {len(mine)} scans failed ({', '.join(failed[:5])}); the others were written")
    return written
