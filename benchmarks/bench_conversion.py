"""The OpenVINO conversion: in the engine's own process against a process of its own.

For each way, a fresh process (the engine) converts a checkpoint into an empty cache,
compiles the result and runs one window, and reports:

* the conversion's wall seconds;
* the engine process's resident memory before, after the conversion, and after compiling
  and one window (what a warm engine, the service or Slicer's local engine, then carries);
* the peak of the engine process plus its children, sampled every 20 ms (a conversion in
  a child stacks on the engine's memory while it runs).

Ways: ``in-process`` (``openvino_backend.convert_checkpoint`` called by the engine, as the
engine did until session 9, but with today's trace in two parts), ``child-dynamic``
(``Conversion.convert``: the conversion in a child process on glibc's dynamic mmap threshold,
sessions 9 to 11), ``child-whole`` (the same on a fixed 1 MiB threshold,
``openvino_backend.CONVERSION_MMAP_THRESHOLD``, session 12) and ``child`` (the same with a
SwinUNETR traced in two parts, its full-resolution head on a small grid,
``openvino_backend._to_openvino``: what it does now). ``child-dynamic`` and ``child-whole``
trace the network whole.
Interleaved, ``--repeats`` times each; ``--ways`` picks some.

    ./dev python benchmarks/bench_conversion.py                      # feature size 48, 96^3
    ./dev python benchmarks/bench_conversion.py --feature-size 12 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
WAYS = ("in-process", "child-dynamic", "child-whole", "child")
sys.path.insert(0, str(HERE.parent / "SwinUNETRSegment"))
sys.path.insert(0, str(HERE))


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(ln.split()[1]) for ln in f if ln.startswith("VmRSS")) / 1024


def worker(args) -> None:
    import time
    import warnings

    warnings.simplefilter("ignore")
    import openvino  # noqa: F401  (imported before the first figure, as the engine has it)
    import torch
    from bench_cpu import TreeMemory
    from inputs import random_checkpoint

    from SwinUNETRSegmentLib.inference.cpu import openvino_backend
    from SwinUNETRSegmentLib.models.cards import load_card

    card_path, checkpoint = random_checkpoint(args.feature_size)
    card = load_card(card_path)
    conversion = openvino_backend.Conversion(card, checkpoint)
    key = conversion.key
    out = {"before_mb": _rss_mb()}
    t = time.perf_counter()
    with TreeMemory() as tree:
        if args.worker.startswith("child"):
            if args.worker == "child-dynamic":
                openvino_backend.CONVERSION_MMAP_THRESHOLD = None
            if args.worker in ("child-dynamic", "child-whole"):  # the child inherits it
                os.environ[openvino_backend.TRACE_WHOLE] = "1"
            conversion.convert(spare_core=False)
        else:
            openvino_backend.convert_checkpoint(card, checkpoint, key)
    out["convert_s"] = time.perf_counter() - t
    out["tree_peak_mb"] = tree.peak_mb
    out["after_convert_mb"] = _rss_mb()
    net = conversion.network("f32", torch.get_num_threads())
    net(torch.zeros((1, 1) + tuple(card.roi_size)))
    out["after_window_mb"] = _rss_mb()
    print(json.dumps(out))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--feature-size", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--ways", default=",".join(WAYS), help=f"some of {', '.join(WAYS)}")
    parser.add_argument("--worker", choices=WAYS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    from bench_service import cpu_flags

    print(f"CPU: {cpu_flags()}; feature size {args.feature_size}, {args.repeats} repeat(s), interleaved")
    results: dict[str, list[dict]] = {w: [] for w in WAYS if w in args.ways.split(",")}
    for _ in range(args.repeats):
        for way in results:
            home = tempfile.mkdtemp(prefix="bench-conversion-")
            env = dict(os.environ, SWINUNETR_SEGMENT_HOME=home)
            run = subprocess.run([sys.executable, __file__, "--worker", way, "--feature-size", str(args.feature_size)],
                                 capture_output=True, text=True, env=env)
            subprocess.run(["rm", "-rf", home])
            if run.returncode != 0:
                raise SystemExit(f"{way} failed:\n{run.stderr[-3000:]}")
            results[way].append(json.loads(run.stdout.strip().splitlines()[-1]))
    cols = ("convert_s", "before_mb", "after_convert_mb", "after_window_mb", "tree_peak_mb")
    print(f"{'way':>10} " + " ".join(f"{c:>16}" for c in cols) + "   (medians)")
    for way, rs in results.items():
        print(f"{way:>10} " + " ".join(f"{statistics.median(r[c] for r in rs):16.1f}" for c in cols))
    if "in-process" in results and "child" in results:
        kept_a = statistics.median(r["after_window_mb"] for r in results["in-process"])
        kept_b = statistics.median(r["after_window_mb"] for r in results["child"])
        print(f"the engine after the conversion, a compile and one window: {kept_b:.0f} MB with the child "
              f"against {kept_a:.0f} MB in-process ({kept_a - kept_b:.0f} MB less)")
    if "child-whole" in results and "child" in results:
        whole = statistics.median(r["tree_peak_mb"] for r in results["child-whole"])
        parts = statistics.median(r["tree_peak_mb"] for r in results["child"])
        secs = [statistics.median(r["convert_s"] for r in results[w]) for w in ("child-whole", "child")]
        print(f"peak of the engine and its conversion: {parts:.0f} MB traced in two parts against {whole:.0f} MB "
              f"traced whole ({whole - parts:.0f} MB less); {secs[1]:.1f} s against {secs[0]:.1f} s")
    if "child-dynamic" in results and "child" in results:
        dyn = statistics.median(r["tree_peak_mb"] for r in results["child-dynamic"])
        fixed = statistics.median(r["tree_peak_mb"] for r in results["child"])
        print(f"peak of the engine and its conversion: {fixed:.0f} MB on the fixed mmap threshold against "
              f"{dyn:.0f} MB on glibc's dynamic one ({dyn - fixed:.0f} MB less)")


if __name__ == "__main__":
    main()
