"""Issue 16, item 5, on a lent GPU as one prepared command: the engine end to end on the
512 x 512 x 300 CT against the MONAI reference, peak GPU memory, float16 autocast labels
against float32, and each out-of-memory fallback forced once.

The device machine reaches nothing outside it and has PyTorch (with CUDA) but not MONAI or
nibabel, so what it needs travels with the working tree, in ``.gpu-bench/`` (ignored by git):
the wheels of the engine's requirements that its image lacks, for its Python 3.12, and the example CT
that the benchmark's inputs are made from. Here, on a machine with pip's registry, once::

    ./dev python benchmarks/bench_gpu.py --prepare

Then, on the device (its ``run`` tool, ``carry: [".gpu-bench"]``, ``timeout_s`` 600)::

    sh benchmarks/bench_gpu.sh

which installs the wheels into /tmp/site and runs this script, writing ``$OUT/bench.log`` as
it goes, and ``$OUT/gpu.md`` (a table for benchmarks/README.md, with the date and the device)
and ``$OUT/gpu.json`` after each step and each rung, so that a run stopped at the call's limit
keeps what it measured. Where both steps do not fit one call, ``sh benchmarks/bench_gpu.sh
--step bench`` then ``--step ladder`` (or ``--repeats 1``). Here,
without a GPU, the same steps on the CPU with a small input and model check the script::

    ./dev python benchmarks/bench_gpu.py --dry-run

Steps on the device:

1. ``bench_cpu.py --device cuda --inputs clinical --feature-size 48 --pipelines
   reference,engine,exact`` (three repetitions, interleaved): end to end, peak GPU memory,
   and each pipeline's Dice against the reference; ``engine`` is the default (float16
   autocast on CUDA), ``exact`` float32, and their label maps are compared with each other:
   float16 against float32.
2. The out-of-memory ladder (``devices.inference_plans``: stitching on the GPU, then on the
   CPU, then the window batch halved down to one), each rung forced once: the engine run in
   this process under ``torch.cuda.set_per_process_memory_fraction`` caps below the
   uncapped run's peak, recording the fallbacks it logged, its peak and seconds, and its
   labels against the uncapped run's; the smallest cap must end in the one-line error a
   person sees, not a traceback.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PREPARED = REPO / ".gpu-bench"
sys.path.insert(0, str(REPO / "SwinUNETRSegment"))
sys.path.insert(0, str(HERE))

#: requirements of the engine and the reference pipeline that the device's image lacks
#: (benchmarks' imports, checked against the image's package list in the device tool's
#: KINDS.md); the versions are Resources/requirements.txt's and constraints.txt's
WHEELS = ("monai==1.6.1", "nibabel==5.4.2", "pynrrd==1.1.3", "pydicom==3.0.2", "platformdirs==4.14.8",
          "connected-components-3d==4.1.1")


def prepare() -> None:
    """Fill ``.gpu-bench/``: the wheels for Python 3.12 and the example CT."""
    wheels = PREPARED / "wheels"
    shutil.rmtree(PREPARED, ignore_errors=True)
    wheels.mkdir(parents=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
           "--implementation", "cp", "--platform", "manylinux2014_x86_64",
           "--platform", "manylinux_2_28_x86_64", "--platform", "any", "-q",
           "--disable-pip-version-check", "-d", str(wheels), *WHEELS]
    subprocess.run(cmd, check=True)
    from inputs import _example_ct

    shutil.copy2(_example_ct(), PREPARED / "example_ct.nii.gz")
    size = sum(p.stat().st_size for p in PREPARED.rglob("*") if p.is_file()) / 2**20
    print(f"prepared {PREPARED} ({size:.1f} MiB): {', '.join(sorted(p.name for p in wheels.iterdir()))}")


def _labels(result):
    import numpy as np

    return np.asarray(result.labels.array)


def ladder(device: str, card_path: Path, checkpoint: Path, input_path: Path, log_lines: list,
           on_row=None) -> list[dict]:
    """The out-of-memory ladder forced rung by rung (module docstring, step 2); ``on_row(row)``
    after each rung, so that a run stopped at its time limit keeps what it measured."""
    import numpy as np
    import torch

    from SwinUNETRSegmentLib.errors import UserError
    from SwinUNETRSegmentLib.fileio.read import read_volume
    from SwinUNETRSegmentLib.inference.engine import Segmenter
    from SwinUNETRSegmentLib.models.cards import load_card

    class Catch(logging.Handler):
        def emit(self, record):
            log_lines.append(record.getMessage())

    handler = Catch(level=logging.WARNING)
    # the engine's ladder logs under SwinUNETRSegmentLib; MONAI's adaptive inferer logs its own
    # first rung (GPU stitching to CPU stitching) under a logger that does not propagate
    loggers = [logging.getLogger("SwinUNETRSegmentLib"), logging.getLogger("monai.inferers.inferer")]
    for logger in loggers:
        logger.addHandler(handler)
    card = load_card(card_path)
    vol, _ = read_volume(input_path)
    seg = Segmenter(card, checkpoint, device=device)  # one model, kept warm, as the service keeps it
    cuda = device.startswith("cuda")

    def run(cap_bytes):
        if cuda:
            torch.cuda.empty_cache()
            total = torch.cuda.get_device_properties(0).total_memory
            torch.cuda.set_per_process_memory_fraction(1.0 if cap_bytes is None else cap_bytes / total)
            torch.cuda.reset_peak_memory_stats()
        first = len(log_lines)
        t = time.perf_counter()
        row = {"cap_mb": None if cap_bytes is None else round(cap_bytes / 2**20)}
        try:
            res = seg.segment(vol)
            row.update(seconds=round(time.perf_counter() - t, 2), labels=_labels(res))
        except UserError as exc:  # the message a person sees at the bottom of the ladder
            row.update(seconds=round(time.perf_counter() - t, 2), error=str(exc))
        except Exception as exc:  # noqa: BLE001 - what escaped the ladder is a finding: recorded, not fatal
            row.update(seconds=round(time.perf_counter() - t, 2),
                       error=f"NOT A ONE-LINE ERROR: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}")
        row["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20) if cuda else None
        row["fallbacks"] = [m for m in log_lines[first:] if "out of GPU memory" in m or "stitching failed" in m]
        if on_row is not None:
            on_row({k: v for k, v in row.items() if k != "labels"})
        return row

    seg.segment(vol)  # warm-up: model on the GPU, kernels chosen
    base = run(None)
    rows = [base]
    peak = base["peak_gpu_mb"] or 0
    # below the uncapped peak: GPU stitching no longer fits, then CPU stitching with the whole
    # batch, then with halved batches; the last cap leaves less than the weights need
    model_mb = Path(checkpoint).stat().st_size / 2**20  # float32 weights, as they sit on the GPU
    for share in (0.75, 0.5, 0.3, 0.15) if cuda else ():
        rows.append(run(int(max(peak * share, model_mb * 1.5) * 2**20)))
    if cuda:
        rows.append(run(int(model_mb * 0.5 * 2**20)))
        torch.cuda.set_per_process_memory_fraction(1.0)
    uncapped = base.get("labels")
    for row in rows:
        labels = row.pop("labels", None)
        if labels is not None and uncapped is not None:
            row["labels_equal_to_uncapped"] = float(np.mean(labels == uncapped))
    for logger in loggers:
        logger.removeHandler(handler)
    return rows


def agreement(keep: Path, inp: str, card_path: Path) -> dict:
    """The default engine's labels (float16 autocast on CUDA) against float32's (``exact``):
    the share of equal voxels and the mean Dice over the organs either holds."""
    import numpy as np

    from SwinUNETRSegmentLib.models.cards import load_card
    from SwinUNETRSegmentLib.training.metrics import dice_per_label

    half, full = (np.load(keep / f"{inp}-{pl}.npy") for pl in ("engine", "exact"))
    dice = dice_per_label(half, full, load_card(card_path).labels)
    return {"equal_voxels": float(np.mean(half == full)), "mean_dice": float(np.mean(list(dice.values()))),
            "worst": min(dice.items(), key=lambda kv: kv[1]) if dice else None}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prepare", action="store_true", help="here: fill .gpu-bench/ with the wheels and the example CT")
    p.add_argument("--dry-run", action="store_true", help="here, without a GPU: the same steps on the CPU, small")
    p.add_argument("--step", choices=("all", "bench", "ladder"), default="all",
                   help="both steps (default), or one: two device calls where one would run out of time")
    p.add_argument("--out", default=os.environ.get("OUT", str(REPO / "out" / "gpu")), help="where gpu.md/json go")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    if args.prepare:
        prepare()
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cache = Path(os.environ.get("SWINUNETR_BENCH_CACHE", "/tmp/swinunetr-gpu-bench"))
    os.environ["SWINUNETR_BENCH_CACHE"] = str(cache)
    # the engine's catalog (a conversion, on the CPU) in a folder of the benchmark's, not the user's
    os.environ["SWINUNETR_SEGMENT_HOME"] = str(cache / "home")
    if (PREPARED / "example_ct.nii.gz").exists():
        os.environ.setdefault("SWINUNETR_BENCH_EXAMPLE_CT", str(PREPARED / "example_ct.nii.gz"))
    import torch

    device = "cpu" if args.dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device here: run it on a lent GPU, or --dry-run to check the script on the CPU")
        return 1
    name = torch.cuda.get_device_name(0) if device == "cuda" else "CPU (dry run)"
    inp, fs = ("quick", 12) if args.dry_run else ("clinical", 48)
    repeats = 1 if args.dry_run else args.repeats
    header = (f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {name}, torch {torch.__version__}, "
              f"input {inp}, feature size {fs}")
    print(header, flush=True)
    from inputs import make_input, random_checkpoint

    t = time.perf_counter()
    input_path = make_input(inp, cache)
    card_path, checkpoint = random_checkpoint(fs, cache)
    print(f"inputs made in {time.perf_counter() - t:.1f} s", flush=True)
    report: dict = {"header": header}
    lines = [f"GPU benchmark: {header}", ""]

    def save() -> None:  # after each step and rung: what a run stopped at its limit measured stays in $OUT
        (out / "gpu.json").write_text(json.dumps(report, indent=1, default=str))
        (out / "gpu.md").write_text("\n".join(lines) + "\n")

    if args.step in ("all", "bench"):
        keep = cache / "labels"
        cmd = [sys.executable, str(HERE / "bench_cpu.py"), "--device", device, "--inputs", inp, "--feature-size",
               str(fs), "--repeats", str(repeats), "--pipelines", "reference,engine,exact", "--json",
               str(out / "bench.json"), "--keep", str(keep)]
        with open(out / "bench.log", "w") as log_file:  # written as it runs, not at the end
            bench = subprocess.run(cmd, stdout=log_file, stderr=subprocess.STDOUT)
        text = (out / "bench.log").read_text()
        print(text[-6000:], flush=True)
        if bench.returncode != 0:
            return 1
        report["bench"] = json.loads((out / "bench.json").read_text())
        report["float16_against_float32"] = agreement(keep, inp, card_path)
        a = report["float16_against_float32"]
        lines += ["```", *[ln for ln in text.splitlines() if ln.strip()][-12:], "```", "",
                  f"engine (float16 autocast) against exact (float32): {a['equal_voxels']:.6f} of the voxels equal, "
                  f"mean Dice {a['mean_dice']:.4f}, lowest {a['worst']}", ""]
        save()
    if args.step in ("all", "ladder"):
        lines += ["Out-of-memory ladder (the engine, this process, capped):", "",
                  "| cap | seconds | peak GPU MB | fallbacks logged | labels = uncapped | error |",
                  "| --- | --- | --- | --- | --- | --- |"]
        report["ladder"] = []

        def on_row(row: dict) -> None:
            report["ladder"].append(row)
            cap = "none" if row["cap_mb"] is None else f"{row['cap_mb']} MB"
            lines.append(f"| {cap} | {row['seconds']} | {row['peak_gpu_mb']} | {'; '.join(row['fallbacks']) or '-'} "
                         f"| {row.get('labels_equal_to_uncapped', '-')} | {row.get('error', '-')} |")
            save()
            print(lines[-1], flush=True)

        rows = ladder(device, card_path, checkpoint, input_path, [], on_row)
        report["ladder"] = rows  # now with each rung's labels against the uncapped run's
        for n, row in enumerate(rows):
            lines[len(lines) - len(rows) + n] = (
                lines[len(lines) - len(rows) + n].rsplit("|", 3)[0]
                + f"| {row.get('labels_equal_to_uncapped', '-')} | {row.get('error', '-')} |")
        save()
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
