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

import argparse
import sys
import threading
from pathlib import Path
from typing import Optional, Sequence

from .errors import CancelledError, UserError

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
                   help="NIfTI (.nii, .nii.gz), NRRD (.nrrd, .nhdr), MetaImage (.mha, .mhd) file, or a folder with one DICOM series")
    p.add_argument("-o", "--output", required=True, action="append", metavar="OUT",
                   help="output file: .seg.nrrd, .nii or .nii.gz (repeatable)")
    p.add_argument("--model", metavar="NAME", help="catalog model (card and installed weights)")
    p.add_argument("--card", metavar="NAME_OR_JSON", help="model card: a built-in name or a card JSON file")
    p.add_argument("--checkpoint", metavar="PATH", help="weights to run under --card (or instead of a model's installed weights)")
    p.add_argument("--device", default="auto", help="auto (CUDA, then Apple MPS, then CPU), cpu, cuda, cuda:N or mps (default: auto)")
    p.add_argument("--overlap", type=float, default=None, help="sliding-window overlap, 0 to <1 (default: the card's)")
    p.add_argument("--sw-batch-size", type=int, default=None, help="windows per network call (default: the card's)")
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

    from .progress import format_seconds

    bar = tqdm(total=1000, file=sys.stderr, bar_format="{desc} |{bar}| {percentage:3.0f}% {postfix}", leave=False)

    def callback(p):
        bar.set_description_str(p.message[:40].ljust(24))
        bar.n = int(p.fraction * 1000)
        bar.set_postfix_str(f"{format_seconds(p.seconds_left)} left" if p.seconds_left is not None else "")
        bar.refresh()

    return callback, bar.close


def run(args: argparse.Namespace, cancel: Optional[threading.Event] = None) -> list[Path]:
    """Do the work of one command line; returns the files written."""
    from . import catalog, imageio
    from .cards import load_card
    from .engine import Segmenter

    # 1. Everything that can be checked before reading the scan.
    outputs = [imageio.check_output_path(o, args.overwrite, imageio.OUTPUT_SUFFIXES) for o in args.output]
    for o in outputs:
        if imageio.has_suffix(o, imageio.LABELMAP_SUFFIXES):
            imageio.check_output_path(imageio.label_table_path(o), args.overwrite)
    if len({str(o.resolve()) for o in outputs}) != len(outputs):
        raise UserError("the same output is given twice; give each -o a different file")
    preview = imageio.check_output_path(args.preview, args.overwrite, (".png",)) if args.preview else None
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

    # 2. The scan, the model, the work.
    volume, info = imageio.read_volume(args.input, series_uid=args.series)
    if info.modality and card.modality and info.modality.upper() != card.modality.upper() and not args.quiet:
        print(f"{PROG}: warning: the scan is {info.modality} but model '{card.name}' was trained on {card.modality}; "
              "expect a poor segmentation", file=sys.stderr)
    segmenter = Segmenter(card, weights, device=args.device, overlap=args.overlap, sw_batch_size=args.sw_batch_size)
    segmenter.load()  # a checkpoint that does not fit the card fails here, before any inference
    callback, close = _progress_printer(args.quiet)
    try:
        result = segmenter.segment(volume, progress=callback, cancel=cancel)
    finally:
        close()

    # 3. Outputs, each written atomically.
    written: list[Path] = []
    for o in outputs:
        written += imageio.write_segmentation(o, result.labels, card.labels)
    if preview is not None:
        from .preview import write_preview

        written.append(write_preview(preview, volume, result.labels, card.labels, info.modality or card.modality))
    found = [card.label(v).name for v in result.present_labels() if any(lab.value == v for lab in card.labels)]
    if not args.quiet:
        print(f"{PROG}: {len(found)} of {len(card.labels)} structures found ({', '.join(found) or 'none'}) "
              f"in {result.timings.get('total', 0):.1f} s on {result.device}", file=sys.stderr)
    return written


def demo(argv: Sequence[str]) -> int:
    """``swinunetr-segment demo [--out DIR]``: the built-in model on a real abdominal CT.

    The first run fetches the example CT (the totalsegmentator 2.18.0 source archive, with
    pip) into the user cache; later runs need no network. Writes DIR/example_ct.seg.nrrd
    and DIR/example_ct.png (default DIR: ./swinunetr-demo) and prints where they are.
    """
    from . import catalog
    from .sampledata import reference_files

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
            from .training import main as train_main

            return train_main([a for a in argv[1:] if a != "--debug"], _Parser)
        if argv and argv[0] == "pretrain":
            from .pretrain import main as pretrain_main

            return pretrain_main([a for a in argv[1:] if a != "--debug"], _Parser)
        if argv and argv[0] == "demo":
            return demo([a for a in argv[1:] if a != "--debug"])
        if argv and argv[0] == "models":
            from .models_cli import main as models_main

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
