"""``swinunetr-segment demo [--out DIR]``: the built-in model on a real abdominal CT.

The first run fetches the example CT (the totalsegmentator 2.18.0 source archive, with
pip) into the user cache; later runs need no network. Writes DIR/example_ct.seg.nrrd
and DIR/example_ct.png (default DIR: ./swinunetr-demo) and prints where they are.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional, Sequence

from SwinUNETRSegmentLib.cli.app import PROG, Parser

__all__ = ["main"]


def main(argv: Sequence[str], written: Optional[list[Path]] = None) -> int:
    """Run the demo; ``written`` receives each file as it is complete (see :func:`.segment.run`)."""
    from SwinUNETRSegmentLib.cli.segment import build_parser, run
    from SwinUNETRSegmentLib.fileio.sampledata import reference_files
    from SwinUNETRSegmentLib.models import catalog

    p = Parser(prog=f"{PROG} demo",
               description="Segment a real example CT with the built-in model, offline after the first run.")
    p.add_argument("--out", default="swinunetr-demo", help="output folder (default: ./swinunetr-demo)")
    p.add_argument("--model", default=catalog.DEFAULT_MODEL, help=f"catalog model (default: {catalog.DEFAULT_MODEL})")
    p.add_argument("--device", default="auto")
    p.add_argument("-q", "--quiet", action="store_true")
    args = p.parse_args(list(argv))
    ct = reference_files() / "example_ct.nii.gz"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ns = build_parser().parse_args(["-i", str(ct), "-o", str(out / "example_ct.seg.nrrd"),
                                    "--preview", str(out / "example_ct.png"), "--model", args.model,
                                    "--device", args.device, "--overwrite"] + (["-q"] if args.quiet else []))
    paths = run(ns, written=written)
    print(f"{PROG}: segmented {ct.name} (a real abdominal CT) with model '{args.model}'. "
          "Open the .seg.nrrd in 3D Slicer together with the CT, or look at the PNG:", file=sys.stderr)
    for path in paths:
        print(path.resolve())
    return 0
