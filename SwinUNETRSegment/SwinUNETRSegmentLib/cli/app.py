"""``swinunetr-segment``: segment a scan from the shell.

    swinunetr-segment -i ct.nii.gz -o ct.seg.nrrd --preview ct.png
    swinunetr-segment -i dicom_folder/ -o ct.seg.nrrd -o ct.nii.gz --model btcv
    swinunetr-segment -i ct.nrrd -o ct.seg.nrrd --card btcv --checkpoint finetuned.pt
    swinunetr-segment models list | info NAME | download NAME | install NAME FILE | remove NAME | add CARD
    swinunetr-segment train --data datalist.json --card btcv --out run/ [--init-encoder encoder.pt]
    swinunetr-segment pretrain --data scans/ --card btcv --out pretrain/

Exit codes: 0 done; 2 bad input (one line on stderr says what to do); 130 interrupted;
1 an internal error (a bug: run with --debug for the traceback and report it).
"""

from __future__ import annotations
from SwinUNETRSegmentLib.fileio.read import ITK_SUFFIXES, NIFTI_SUFFIXES, has_suffix, read_volume
from SwinUNETRSegmentLib.fileio.write import LABELMAP_SUFFIXES, OUTPUT_SUFFIXES, SEG_SUFFIXES, check_output_path, label_table_path, write_segmentation

import argparse
import os
import sys
import threading
from pathlib import Path
from typing import Optional, Sequence

from SwinUNETRSegmentLib.errors import CancelledError, UserError

PROG = "swinunetr-segment"


class _ArgumentError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit 2, as for every other bad input
        raise _ArgumentError(message)


def build_parser(parser_class: type = argparse.ArgumentParser) -> argparse.ArgumentParser:
    p = parser_class(
        prog=PROG,
        description="Segment a CT with a SwinUNETR model (MONAI) and write a segmentation that opens in 3D Slicer.",
        epilog="Outputs: .seg.nrrd (Slicer segmentation with names, colours, SNOMED terminology) or "
        ".nii/.nii.gz (label map, with a Slicer colour-table .csv beside it). Give -o more than once for several.",
    )
    p.add_argument("-i", "--input", required=True, metavar="IN",
                   help="NIfTI (.nii, .nii.gz), NRRD (.nrrd, .nhdr), MetaImage (.mha, .mhd) file, or a folder with one DICOM series; "
                   "or a folder of scans when OUT is a folder")
    p.add_argument("-o", "--output", required=True, action="append", metavar="OUT",
                   help="output file: .seg.nrrd, .nii or .nii.gz (repeatable); or an existing folder for a folder of scans "
                   "(split across processes under torchrun)")
    p.add_argument("--model", metavar="NAME", help="catalog model (card and installed weights)")
    p.add_argument("--card", metavar="NAME_OR_JSON", help="model card: a built-in name or a card JSON file")
    p.add_argument("--checkpoint", metavar="PATH", help="weights to run under --card (or instead of a model's installed weights)")
    p.add_argument("--device", default="auto", help="auto (CUDA, then Apple MPS, then CPU), cpu, cuda, cuda:N or mps (default: auto)")
    p.add_argument("--overlap", type=float, default=None, help="sliding-window overlap, 0 to <1 (default: the card's)")
    p.add_argument("--sw-batch-size", type=int, default=None, help="windows per network call (default: the card's)")
    p.add_argument("--precision", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                   help="network precision: auto = bfloat16 on CPUs that have it, float16 on CUDA; "
                        "float32 gives the MONAI reference pipeline's labels exactly")
    p.add_argument("--preview", metavar="PNG", help="also write a PNG: three orthogonal slices with the segments overlaid")
    p.add_argument("--series", metavar="UID", help="SeriesInstanceUID to read when the DICOM folder holds several series")
    p.add_argument("--overwrite", action="store_true", help="replace outputs that already exist")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.add_argument("--debug", action="store_true", help="show tracebacks of internal errors")
    return p


def _progress_printer(quiet: bool):
    """A callback drawing a tqdm bar on a terminal; nothing when piped or quiet."""
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


def _model(args: argparse.Namespace):
    """(card, weights) that the options name; checked before any scan is read."""
    from SwinUNETRSegmentLib.models import catalog
    from SwinUNETRSegmentLib.models.cards import load_card

    if args.model and args.card:
        raise UserError("give --model NAME, or --card with --checkpoint, not both")
    if args.card and not args.checkpoint:
        raise UserError(f"--card {args.card} needs --checkpoint PATH (the weights to run under that card)")
    if args.checkpoint:
        card = load_card(args.card) if args.card else catalog.card_of(args.model or catalog.DEFAULT_MODEL)
        weights = Path(args.checkpoint)
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
    from SwinUNETRSegmentLib.inference.engine import Segmenter

    device = args.device
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and device in ("auto", "cuda"):
        import torch

        if torch.cuda.is_available():  # torchrun: one GPU per process
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0')) % torch.cuda.device_count()}"
    from SwinUNETRSegmentLib.inference.options import FastPath

    segmenter = Segmenter(card, weights, device=device, overlap=args.overlap, sw_batch_size=args.sw_batch_size,
                          fast=FastPath(precision=getattr(args, "precision", "auto")))
    segmenter.load()  # a checkpoint that does not fit the card fails here, before any inference
    return segmenter


def _is_batch(args: argparse.Namespace) -> bool:
    """A folder of scans to a folder of results: one -o without a segmentation file suffix."""

    return len(args.output) == 1 and not has_suffix(args.output[0], OUTPUT_SUFFIXES + (".png",)) \
        and Path(args.input).is_dir() and (Path(args.output[0]).is_dir() or args.output[0].endswith(("/", os.sep)))


def run(args: argparse.Namespace, cancel: Optional[threading.Event] = None) -> list[Path]:
    """Do the work of one command line; returns the files written."""

    if _is_batch(args):
        return run_batch(args, cancel)
    # 1. Everything that can be checked before reading the scan.
    outputs = [check_output_path(o, args.overwrite, OUTPUT_SUFFIXES) for o in args.output]
    for o in outputs:
        if has_suffix(o, LABELMAP_SUFFIXES):
            check_output_path(label_table_path(o), args.overwrite)
    if len({str(o.resolve()) for o in outputs}) != len(outputs):
        raise UserError("the same output is given twice; give each -o a different file")
    preview = check_output_path(args.preview, args.overwrite, (".png",)) if args.preview else None
    card, weights = _model(args)

    # 2. The scan, the model, the work.
    volume, info = read_volume(args.input, series_uid=args.series)
    _warn_modality(args, info, card)
    segmenter = _segmenter(args, card, weights)
    written = _segment_one(args, segmenter, volume, info, outputs, preview, cancel)
    return written


def _warn_modality(args, info, card) -> None:
    if info.modality and card.modality and info.modality.upper() != card.modality.upper() and not args.quiet:
        print(f"{PROG}: warning: the scan is {info.modality} but model '{card.name}' was trained on {card.modality}; "
              "expect a poor segmentation", file=sys.stderr)


def _segment_one(args, segmenter, volume, info, outputs, preview, cancel) -> list[Path]:

    card = segmenter.card
    callback, close = _progress_printer(args.quiet)
    try:
        result = segmenter.segment(volume, progress=callback, cancel=cancel)
    finally:
        close()
    # Outputs, each written atomically.
    written: list[Path] = []
    for o in outputs:
        written += write_segmentation(o, result.labels, card.labels)
    if preview is not None:
        from SwinUNETRSegmentLib.fileio.preview import write_preview

        written.append(write_preview(preview, volume, result.labels, card.labels, info.modality or card.modality))
    found = [card.label(v).name for v in result.present_labels() if any(lab.value == v for lab in card.labels)]
    if not args.quiet:
        print(f"{PROG}: {Path(info.source).name}: {len(found)} of {len(card.labels)} structures found ({', '.join(found) or 'none'}) "
              f"in {result.timings.get('total', 0):.1f} s on {result.device}", file=sys.stderr)
    return written


def scan_entries(folder: Path) -> list[Path]:
    """The scans in a folder: image files, and subfolders that hold DICOM files."""

    out = []
    for p in sorted(folder.iterdir()):
        if p.name.startswith("."):
            continue
        if p.is_file() and has_suffix(p, NIFTI_SUFFIXES + ITK_SUFFIXES) \
                and not has_suffix(p, SEG_SUFFIXES):
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


def run_batch(args: argparse.Namespace, cancel: Optional[threading.Event] = None) -> list[Path]:
    """Every scan of folder IN to folder OUT (``<case>.seg.nrrd``, and ``<case>.png`` with
    --preview), one model load for all. Under ``torchrun`` each process takes its share of
    the scans (scan n goes to rank n mod WORLD_SIZE). A bad scan is reported and skipped;
    the run then exits with code 2."""

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
    written: list[Path] = []
    failed: list[str] = []
    for case in mine:
        name = _case_name(case)
        try:
            out = check_output_path(dst / f"{name}.seg.nrrd", args.overwrite)
            preview = check_output_path(dst / f"{name}.png", args.overwrite) if args.preview else None
            volume, info = read_volume(case)
            _warn_modality(args, info, card)
            written += _segment_one(args, segmenter, volume, info, [out], preview, cancel)
        except UserError as exc:
            failed.append(case.name)
            print(f"{PROG}: error: {exc}", file=sys.stderr)
    if failed:
        raise UserError(f"{len(failed)} of {len(mine)} scans failed ({', '.join(failed[:5])}); the others were written")
    return written


def demo(argv: Sequence[str]) -> int:
    """``swinunetr-segment demo [--out DIR]``: the built-in model on a real abdominal CT.

    The first run fetches the example CT (the totalsegmentator 2.18.0 source archive, with
    pip) into the user cache; later runs need no network. Writes DIR/example_ct.seg.nrrd
    and DIR/example_ct.png (default DIR: ./swinunetr-demo) and prints where they are.
    """
    from SwinUNETRSegmentLib.models import catalog
    from SwinUNETRSegmentLib.fileio.sampledata import reference_files

    p = _Parser(prog=f"{PROG} demo", description="Segment a real example CT with the built-in model, offline after the first run.")
    p.add_argument("--out", default="swinunetr-demo", help="output folder (default: ./swinunetr-demo)")
    p.add_argument("--model", default=catalog.DEFAULT_MODEL, help=f"catalog model (default: {catalog.DEFAULT_MODEL})")
    p.add_argument("--device", default="auto")
    p.add_argument("-q", "--quiet", action="store_true")
    args = p.parse_args(list(argv))
    ct = reference_files() / "example_ct.nii.gz"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ns = build_parser().parse_args(["-i", str(ct), "-o", str(out / "example_ct.seg.nrrd"), "--preview", str(out / "example_ct.png"),
                                    "--model", args.model, "--device", args.device, "--overwrite"] + (["-q"] if args.quiet else []))
    written = run(ns)
    print(f"{PROG}: segmented {ct.name} (a real abdominal CT) with model '{args.model}'. Open the .seg.nrrd in 3D Slicer "
          "together with the CT, or look at the PNG:", file=sys.stderr)
    for path in written:
        print(path.resolve())
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        if argv and argv[0] == "train":
            from SwinUNETRSegmentLib.training.supervised import main as train_main

            return train_main([a for a in argv[1:] if a != "--debug"], _Parser)
        if argv and argv[0] == "pretrain":
            from SwinUNETRSegmentLib.training.ssl.pretrain import main as pretrain_main

            return pretrain_main([a for a in argv[1:] if a != "--debug"], _Parser)
        if argv and argv[0] == "demo":
            return demo([a for a in argv[1:] if a != "--debug"])
        if argv and argv[0] == "models":
            from SwinUNETRSegmentLib.cli.models import main as models_main

            return models_main([a for a in argv[1:] if a != "--debug"], _Parser)
        args = build_parser(_Parser).parse_args(argv)
        for path in run(args):
            print(path)
        return 0
    except _ArgumentError as exc:
        print(f"{PROG}: error: {exc}; see {PROG} --help", file=sys.stderr)
        return 2
    except UserError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, CancelledError):
        print(f"{PROG}: cancelled; nothing was written", file=sys.stderr)
        return 130
    except MemoryError:
        print(f"{PROG}: error: out of memory; close other programs, use a machine with more memory, or lower --sw-batch-size", file=sys.stderr)
        return 1
    except Exception as exc:  # a bug: say so in one line unless asked for details
        if debug:
            raise
        print(f"{PROG}: internal error: {type(exc).__name__}: {' '.join(str(exc).split())[:300]} "
              "(run again with --debug for the traceback and report it)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
