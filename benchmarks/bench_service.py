"""The engine service's overhead against an in-process run of the same model.

Starts ``swinunetr-segment serve`` on 127.0.0.1 (a free port, a temporary token), warms the
model on both sides, then times, ``--repeats`` times each and in turn on each input:

* ``in-process, file``: ``read_volume`` + ``Segmenter.segment`` in this process;
* ``service, by path``: the client submits the file's path, polls, fetches the labels;
* ``in-process, volume``: ``Segmenter.segment`` on the volume in memory;
* ``service, upload``: the client sends the volume (raw over loopback; ``--gzip`` for the
  gzip level a remote server gets), polls, fetches the labels.

and prints the medians side by side with the overhead (service minus in-process), and the
labels' agreement (they must be equal). Inputs: ``benchmarks/inputs.py`` (``native``: the
example CT, 122 x 101 x 112; ``clinical``: it resampled to 512 x 512 x 300).

    ./dev python benchmarks/bench_service.py                         # demo model, native + clinical, 5 repeats
    ./dev python benchmarks/bench_service.py --tiny --gzip 1        # a small random model; gzip level 1
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "SwinUNETRSegment"))
sys.path.insert(0, str(HERE))

LAUNCH = "import sys; from SwinUNETRSegmentLib.cli import main; sys.exit(main(sys.argv[1:]))"


def start_server(folder: Path, model: str) -> tuple[subprocess.Popen, str]:
    from SwinUNETRSegmentLib.inference.memory import allocator_env

    ready = folder / "ready.json"
    cmd = [sys.executable, "-c", LAUNCH, "serve", "--port", "0", "--token-file", str(folder / "token"),
           "--ready-file", str(ready), "--models", model, "--log-level", "warning"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(folder / "server.log", "wb"),
                            stdin=subprocess.DEVNULL, env=allocator_env())
    deadline = time.monotonic() + 300
    while not ready.is_file():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"the server did not start: {(folder / 'server.log').read_text()[-2000:]}")
        time.sleep(0.05)
    return proc, json.loads(ready.read_text())["url"]


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def cpu_flags() -> str:
    try:
        flags = next(ln for ln in open("/proc/cpuinfo") if ln.startswith("flags")).split()
        model = next(ln for ln in open("/proc/cpuinfo") if ln.startswith("model name")).split(":", 1)[1].strip()
    except (OSError, StopIteration):
        return "unknown CPU"
    wanted = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f in flags]
    return f"{model}, {os.cpu_count()} cores, flags: {' '.join(wanted)}"


def _modes(path, volume, segmenter, client, options, level) -> dict:
    """The four ways to the labels, each a function returning them."""
    from SwinUNETRSegmentLib.fileio.read import read_volume

    def own(res) -> tuple:  # the labels, and the engine's seconds (and the server's read) to subtract
        return res.labels, res.timings.get("total", 0.0) + res.timings.get("read", 0.0)

    return {
        "in-process, file": lambda: (segmenter.segment(read_volume(path)[0]).labels.array, None),
        "service, by path": lambda: own(client.segment(path=path, options=options)),
        "in-process, volume": lambda: (segmenter.segment(volume).labels.array, None),
        "service, upload": lambda: own(client.segment(volume.array, volume.ijk_to_ras, options=options,
                                                      compress=level)),
    }


def tiny_home(folder: Path) -> str:
    """A catalog home with model 'bench-tiny': the btcv card at feature size 12, 6 mm, one 64^3
    window, seeded random weights (the service's overhead does not depend on the model)."""
    import dataclasses

    import torch

    from SwinUNETRSegmentLib.fileio.atomic import file_digest
    from SwinUNETRSegmentLib.models import cards, catalog
    from SwinUNETRSegmentLib.models.networks import build_network

    os.environ["SWINUNETR_SEGMENT_HOME"] = str(folder / "home")
    base = cards.load_card("btcv")
    card = dataclasses.replace(base, name="bench-tiny", network_args={**base.network_args, "feature_size": 12},
                               spacing=(6.0, 6.0, 6.0), roi_size=(64, 64, 64), overlap=0.25, sw_batch_size=1)
    torch.manual_seed(0)
    torch.save(build_network(card).state_dict(), folder / "tiny.pt")
    catalog.add_card_data(dataclasses.replace(card, checkpoint={"sha256": file_digest(folder / "tiny.pt")}).to_json())
    catalog.install_file("bench-tiny", folder / "tiny.pt")
    return "bench-tiny"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="demo", help="catalog model (default: demo, the built-in one)")
    p.add_argument("--inputs", nargs="+", default=["native", "clinical"], help="benchmarks/inputs.py names")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--gzip", type=int, default=0, help="the upload's gzip level (0: raw, what loopback gets)")
    p.add_argument("--tiny", action="store_true", help="a feature-12, 6 mm model with random weights instead")
    args = p.parse_args()
    from SwinUNETRSegmentLib.inference.memory import reexec_with_allocator

    reexec_with_allocator()  # this process on the allocator the engine process gets (jemalloc where installed)

    from inputs import make_input

    from SwinUNETRSegmentLib.fileio.read import read_volume
    from SwinUNETRSegmentLib.inference.engine import Segmenter
    from SwinUNETRSegmentLib.models.catalog import resolve_model
    from SwinUNETRSegmentLib.service.client import Client
    from SwinUNETRSegmentLib.service.protocol import JobOptions

    print(cpu_flags())
    with tempfile.TemporaryDirectory(prefix="bench-service-") as tmp:
        if args.tiny:
            args.model = tiny_home(Path(tmp))
        card, weights = resolve_model(args.model)
        segmenter = Segmenter(card, weights, device="auto")
        options = JobOptions(model=args.model)
        proc, url = start_server(Path(tmp), args.model)
        try:
            client = Client.from_token_file(url, Path(tmp) / "token")
            rows = []
            for name in args.inputs:
                path = make_input(name)
                volume = read_volume(path)[0]
                modes = _modes(path, volume, segmenter, client, options, args.gzip)
                if not rows:  # warm both sides once: the model loaded, first-run costs paid
                    modes["in-process, volume"]()
                    modes["service, upload"]()
                times: dict[str, list[float]] = {m: [] for m in modes}
                owns: dict[str, list[float]] = {m: [] for m in modes}
                labels = {}
                for _ in range(args.repeats):
                    for mode, fn in modes.items():  # interleaved: a load change hits every mode alike
                        t, (labels[mode], engine) = timed(fn)
                        times[mode].append(t)
                        if engine is not None:
                            owns[mode].append(t - engine)
                same = all(np.array_equal(labels["in-process, file"], v) for v in labels.values())
                med = {m: statistics.median(v) for m, v in times.items()}
                own = {m: statistics.median(v) for m, v in owns.items() if v}
                rows.append((name, "x".join(map(str, volume.shape)), med, own, same))
                print(name, {m: [round(t, 2) for t in v] for m, v in times.items()}, flush=True)
        finally:
            proc.terminate()
            proc.wait(30)
    print(f"\nmodel {args.model}, median of {args.repeats}, upload gzip level {args.gzip}; seconds")
    print("overhead: the service's median minus the in-process one; own: the median of (wall time minus the "
          "engine's own seconds and the server's read of the file, as the job reports them)")
    print("| input | grid | in-process, file | service, by path | overhead | own | in-process, volume "
          "| service, upload | overhead | own | labels equal |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, grid, m, own, same in rows:
        print(f"| {name} | {grid} | {m['in-process, file']:.2f} | {m['service, by path']:.2f} | "
              f"{m['service, by path'] - m['in-process, file']:+.2f} | {own['service, by path']:.2f} | "
              f"{m['in-process, volume']:.2f} | {m['service, upload']:.2f} | "
              f"{m['service, upload'] - m['in-process, volume']:+.2f} | {own['service, upload']:.2f} | {same} |")


if __name__ == "__main__":
    main()
