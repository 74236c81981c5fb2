#!/usr/bin/env python
"""Reference (MONAI model-zoo pipeline) against this engine, side by side, same weights.

Each pipeline runs in its own child process (so each one's peak resident memory is its
own: ``os.wait4`` returns the child's ``ru_maxrss``), the runs interleaved
(reference, engine, reference, engine, ...) so that both see the same machine load. For
every input it prints, per pipeline, the median over ``--repeats`` of:

* end to end: file in, uint8 labels on the input grid out (model load included, Python
  and library imports not: both pay the same);
* each stage;
* peak resident memory of the process (and peak GPU memory on CUDA);
* windows run through the network / windows in all;
* agreement with the reference's labels: Dice per organ and the mean over organs.

Examples (``./dev python benchmarks/bench_cpu.py ...``):

    --quick                                   smoke run: feature_size 12, small CT blocks
    --inputs native,padded,clinical --repeats 3          the full timing run (feature_size 48)
    --inputs native --card CARD.json --checkpoint W.pt   agreement with trained weights
    --pipelines reference,engine,exact,plain,crop,no-air,fp32,labels   each piece on/off

Timing does not depend on the weights' values, so the timing run uses seeded random
weights (written once into the cache); agreement needs trained weights.

The engine's pipelines run as the command line runs them: on the system allocator where
they may use OpenVINO (jemalloc for ``torch``), with a catalog folder of the bench run's own
shared by their repetitions. So ``engine`` (the defaults) is a user's first run in its
first repetition (on PyTorch, converting for OpenVINO during the run where that pays) and a
later run in the others (on that conversion): compare ``--repeats 1`` with ``first-run``
and ``openvino``, which are always the first run and always a run after ``models convert``.
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

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "SwinUNETRSegment"))
sys.path.insert(0, str(HERE))

#: Engine variants: FastPath switches over the defaults ("plain" is FastPath.plain()).
VARIANTS = {
    "engine": {},
    "plain": None,
    # the reference's answer exactly (float32, windows where the reference puts them);
    # still skips air windows and resamples only boundaries, which change nothing
    "exact": {"precision": "float32"},
    "crop": {"crop_to_body": True},
    "no-crop": {"crop_to_body": False},
    "no-air": {"skip_air": False},
    "fp32": {"precision": "float32"},
    "labels": {"resample": "labels"},
    # the logits stitched in float32 (the default stitches in float16 unless precision is float32)
    "f32-stitch": {"half_stitching": False},
    "torch-f32-stitch": {"backend": "torch", "half_stitching": False},
    "probabilities": {"resample": "probabilities"},
    "compiled": {"compile": True},
    "no-attn-cache": {"cached_attention": False},
    "no-pointwise": {"pointwise_matmul": False},
    # the engine as session 2 left it (before the cached attention and the channel products)
    "session2": {"cached_attention": False, "pointwise_matmul": False},
    # the network on PyTorch, or on OpenVINO (converted and compiled once, in a process of its
    # own before the measured one, as after `models convert`; its seconds are convert_s)
    "torch": {"backend": "torch"},
    "openvino": {"backend": "openvino"},
    # a user's first run: the default backend with nothing converted (an empty catalog
    # folder), in a process on the system allocator as the engine service runs; a long run
    # converts in the run once that pays (inference/cpu/openvino_backend.ConvertWhenItPays)
    "first-run": {"backend": "auto"},
    # one window per PyTorch network call instead of the SwinUNETR's two (FastPath.cpu_batch)
    "torch-one-per-call": {"backend": "torch", "cpu_batch": 1},
    # fewer FLOPs per voxel: larger windows (SwinUNETR runs on any size divisible by 32),
    # smaller overlap, the crop to the body ("roi" and "overlap" go to the Segmenter)
    "roi96": {"roi": 96},
    "roi128": {"roi": 128},
    "overlap0": {"overlap": 0.0},
    "roi96-crop": {"roi": 96, "crop_to_body": True},
    "roi128-crop": {"roi": 128, "crop_to_body": True},
}

#: variant keys that are Segmenter settings, not FastPath switches
SEGMENTER_KEYS = ("roi", "overlap")


# ----------------------------------------------------------------------------------------
# child process: one pipeline, one input
# ----------------------------------------------------------------------------------------
def worker(args) -> None:
    import numpy as np
    import torch

    from SwinUNETRSegmentLib.models.cards import load_card

    card = load_card(args.card)
    result: dict = {"pipeline": args.worker}
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    if args.worker == "reference":
        from reference import image_reader, run_reference

        labels, affine, timings = run_reference(args.input, card, args.checkpoint, device=args.device)
        result["reader"] = image_reader()
    else:
        from SwinUNETRSegmentLib.fileio.read import read_volume
        from SwinUNETRSegmentLib.inference.engine import Segmenter

        fast = engine_fastpath(args.worker, json.loads(args.set or "{}"))
        card, overlap = engine_card_overlap(args.worker, card)
        if args.worker == "first-run":
            import atexit
            import shutil

            os.environ["SWINUNETR_SEGMENT_HOME"] = tempfile.mkdtemp(prefix="bench-first-")
            atexit.register(shutil.rmtree, os.environ["SWINUNETR_SEGMENT_HOME"], True)
        if args.prepare:  # openvino: convert and compile once, in a process of its own (as `models convert`)
            from SwinUNETRSegmentLib.geometry import Volume

            t = time.perf_counter()
            warm = Segmenter(card, args.checkpoint, device=args.device, fast=fast)
            warm.convert_openvino()
            result["convert_s"] = time.perf_counter() - t
            # compiled once, as in a user's earlier run (OpenVINO's compiled-blob cache)
            warm.segment(Volume(np.zeros((8, 8, 8), np.int16), np.diag([40.0, 40.0, 40.0, 1.0])))
            Path(args.result_json).write_text(json.dumps(result))
            return
        t0 = time.perf_counter()
        vol, _ = read_volume(args.input)
        read = time.perf_counter() - t0
        seg = Segmenter(card, args.checkpoint, device=args.device, fast=fast, overlap=overlap)
        with TreeMemory() as tree:
            # an in-run conversion is a note within "inference"; its own row here
            res = seg.segment(vol, progress=lambda p: setattr(
                tree, "stage", "converting" if (p.message or "").startswith("converting") else p.stage))
        result["tree_peak_rss_mb"] = tree.peak_mb
        result["stage_peaks_mb"] = tree.by_stage
        timings = {"read": read, **{k: v for k, v in res.timings.items() if k != "total"}}
        timings["total"] = time.perf_counter() - t0
        labels, affine = res.labels.array, res.labels.ijk_to_ras
        result["stats"] = res.stats
        if args.warm:  # the same volume again in the same process: the warm engine
            t = time.perf_counter()
            res2 = seg.segment(vol)
            result["warm"] = {
                "total": time.perf_counter() - t,
                **res2.timings,
                "same_labels": bool(np.array_equal(res2.labels.array, labels)),
            }
    if args.device.startswith("cuda"):
        result["gpu_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    import resource

    result["self_maxrss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result["timings"] = timings
    np.save(args.labels_out, labels)
    np.save(args.labels_out + ".affine.npy", affine)
    Path(args.result_json).write_text(json.dumps(result))


class TreeMemory:
    """The peak of this process's resident memory plus its children's, sampled every 20 ms
    (Linux ``/proc``; ``peak_mb`` stays None elsewhere): an in-run conversion runs in a child
    process, whose memory ``os.wait4``'s ``ru_maxrss`` reports as a maximum, not a sum.
    ``by_stage``: the same peak per value of ``stage``, which the caller sets as a run goes
    (the engine's progress stages: ``--stages``)."""

    def __init__(self):
        import threading

        self.peak_mb, self._stop = None, threading.Event()
        self.stage, self.by_stage = None, {}
        self._thread = threading.Thread(target=self._sample, daemon=True)

    @staticmethod
    def _rss_kb(pid: int) -> int:
        try:
            with open(f"/proc/{pid}/status") as f:
                return next((int(ln.split()[1]) for ln in f if ln.startswith("VmRSS")), 0)
        except OSError:
            return 0

    @staticmethod
    def _children(pid: int) -> list[int]:
        import glob

        out = []
        for path in glob.glob(f"/proc/{pid}/task/*/children"):
            try:
                out += [int(x) for x in open(path).read().split()]
            except OSError:
                pass
        return out

    @staticmethod
    def _cmdline(pid: int) -> bytes:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                return f.read()
        except OSError:
            return b""

    def _sample(self) -> None:
        while not self._stop.is_set():
            todo, total = [os.getpid()], 0
            while todo:
                pid = todo.pop()
                total += self._rss_kb(pid)
                # A child that has not exec'd yet (subprocess's vfork, a fork) shares its
                # parent's pages, and its VmRSS counts them again: a conversion's process showed
                # the engine's whole resident memory for an instant, sampled as twice the engine.
                # Such a child reads its parent's command line; it counts once it runs its own.
                parent = self._cmdline(pid)
                todo += [c for c in self._children(pid) if self._cmdline(c) != parent]
            self.peak_mb = max(self.peak_mb or 0, total / 1024)
            if self.stage is not None:
                self.by_stage[self.stage] = max(self.by_stage.get(self.stage, 0), round(total / 1024))
            self._stop.wait(0.02)

    def __enter__(self):
        if os.path.exists(f"/proc/{os.getpid()}/status"):
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        return False


def engine_fastpath(variant: str, overrides: dict):
    from SwinUNETRSegmentLib.inference.options import FastPath

    base = VARIANTS[variant]
    base = None if base is None else {k: v for k, v in base.items() if k not in SEGMENTER_KEYS}
    fast = FastPath.plain() if base is None else FastPath().but(**base)
    return fast.but(**overrides) if overrides else fast


def may_run_openvino(pipeline: str, args, card) -> bool:
    """Whether the command line would keep this engine pipeline on the system allocator (it
    may run, or convert in the run, on OpenVINO: ``cli.runs_on_openvino``)."""
    from SwinUNETRSegmentLib.cli import may_convert_in_a_run
    from SwinUNETRSegmentLib.inference.memory import openvino_installed
    from SwinUNETRSegmentLib.models.cards import load_card

    if not openvino_installed() or not args.device.startswith(("cpu", "auto")):
        return False
    from SwinUNETRSegmentLib.inference.devices import cpu_flags_have_bf16

    fast = engine_fastpath(pipeline, json.loads(args.set or "{}"))
    if fast.backend == "torch" or fast.precision == "float32":
        return False
    # "auto" on a CPU with native bfloat16 and nothing converted keeps jemalloc for a small model
    # (cli.runs_on_openvino)
    return (fast.backend == "openvino" or pipeline == "first-run" or not cpu_flags_have_bf16()
            or may_convert_in_a_run(load_card(card)))


def engine_card_overlap(variant: str, card):
    """The card with the variant's window size, and the variant's overlap (None: the card's)."""
    import dataclasses

    v = VARIANTS[variant] or {}
    if "roi" in v:
        card = dataclasses.replace(card, roi_size=(int(v["roi"]),) * 3)
    return card, v.get("overlap")


# ----------------------------------------------------------------------------------------
# parent: inputs, interleaved runs, the table
# ----------------------------------------------------------------------------------------
def run_child(pipeline: str, input_path: Path, card: Path, checkpoint: Path, args, tmp: Path, tag: str) -> dict:
    """One pipeline on one input in a child process; its peak RSS from os.wait4 (Linux, macOS)
    or, where that is missing, from the child's own report."""
    labels_out = str(tmp / f"{tag}.npy")
    result_json = tmp / f"{tag}.json"
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        pipeline,
        "--input",
        str(input_path),
        "--card",
        str(card),
        "--checkpoint",
        str(checkpoint),
        "--device",
        args.device,
        "--labels-out",
        labels_out,
        "--result-json",
        str(result_json),
    ]
    if pipeline != "reference" and args.set:
        cmd += ["--set", args.set]
    if pipeline != "reference" and args.warm:
        cmd += ["--warm"]
    log_path = tmp / f"{tag}.log"
    t = time.perf_counter()
    with open(log_path, "w") as logf:
        # The engine's pipelines in the process the command line gives them: jemalloc where it
        # is installed, the system allocator for OpenVINO (inference/memory.py); the reference
        # as MONAI's users run it.
        from SwinUNETRSegmentLib.inference.memory import allocator_env

        # "openvino" runs on a conversion from its first window, as the command line finds it
        # (cli.runs_on_a_conversion): no raised glibc thresholds for PyTorch windows it has not
        env = None if pipeline == "reference" else allocator_env(openvino=may_run_openvino(pipeline, args, card),
                                                                 converted=pipeline == "openvino")
        if env is not None and pipeline not in ("openvino", "first-run"):
            # the engine's catalog folder of this bench run (shared by its repetitions, as a
            # user's runs share theirs): what a run converts for OpenVINO stays out of the user's
            env["SWINUNETR_SEGMENT_HOME"] = str(tmp / "engine-home")
        if pipeline == "openvino":
            # converted and compiled once per bench run in a process of its own, so that the
            # measured process's time and peak memory are a run's after `models convert`
            env["SWINUNETR_SEGMENT_HOME"] = str(tmp / f"ov-home-{Path(checkpoint).stem}")
            prepared = tmp / f"ov-home-{Path(checkpoint).stem}.json"
            if not prepared.exists():
                prep = subprocess.run(cmd[:-2] + ["--result-json", str(prepared), "--prepare"], stdout=logf,
                                      stderr=subprocess.STDOUT, env=env)
                if prep.returncode != 0:
                    sys.stderr.write(log_path.read_text()[-4000:])
                    raise SystemExit(f"openvino: the conversion failed (exit {prep.returncode})")
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env)
        maxrss_mb = None
        if hasattr(os, "wait4"):
            _, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)
            maxrss_mb = usage.ru_maxrss / (1024 if sys.platform != "darwin" else 2**20)
        else:
            proc.wait()
    wall = time.perf_counter() - t
    if proc.returncode != 0 or not result_json.exists():
        sys.stderr.write(log_path.read_text()[-4000:])
        raise SystemExit(f"{pipeline} failed on {input_path.name} (exit {proc.returncode})")
    result = json.loads(result_json.read_text())
    if pipeline == "openvino":
        result.update(json.loads((tmp / f"ov-home-{Path(checkpoint).stem}.json").read_text()))
    result["process_wall"] = wall
    result["peak_rss_mb"] = maxrss_mb if maxrss_mb is not None else result["self_maxrss_mb"]
    # os.wait4 gives the largest of the process and its children (a conversion's), not their sum
    result["peak_rss_mb"] = max(result["peak_rss_mb"], result.get("tree_peak_rss_mb") or 0)
    result["labels"] = labels_out
    return result


def dice_table(a, b, values) -> dict[int, float | None]:
    import numpy as np

    out = {}
    for v in values:
        x, y = a == v, b == v
        s = int(x.sum()) + int(y.sum())
        out[v] = None if s == 0 else 2.0 * int(np.logical_and(x, y).sum()) / s
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: feature_size 12, the small CT blocks, 1 repeat")
    p.add_argument(
        "--inputs",
        default=None,
        help="comma list of: native, padded, clinical, thick, quick, quick-padded, or file paths",
    )
    p.add_argument("--pipelines", default="reference,engine", help=f"comma list of: reference, {', '.join(VARIANTS)}")
    p.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="runs per pipeline and input (median reported); 3 by default, 1 with --quick",
    )
    p.add_argument(
        "--feature-size",
        type=int,
        default=None,
        help="random weights of this feature_size (48 by default, 12 with --quick)",
    )
    p.add_argument("--card", default=None, help="card JSON of trained weights (with --checkpoint)")
    p.add_argument("--checkpoint", default=None, help="trained weights for the card")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N")
    p.add_argument(
        "--set",
        default=None,
        help='FastPath overrides for the engine variants, JSON, e.g. \'{"precision": "float32"}\'',
    )
    p.add_argument(
        "--warm", action="store_true", help="engine: segment the same volume twice in one process, report the second"
    )
    p.add_argument("--stages", action="store_true",
                   help="engine: print each run's peak resident memory by stage of the run (sampled every 20 ms)")
    p.add_argument("--json", default=None, help="write all results here")
    p.add_argument("--keep", default=None, help="keep the label maps in this folder")
    # child mode
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--input", default=None, help=argparse.SUPPRESS)
    p.add_argument("--labels-out", default=None, help=argparse.SUPPRESS)
    p.add_argument("--result-json", default=None, help=argparse.SUPPRESS)
    p.add_argument("--prepare", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return 0

    import numpy as np
    from inputs import INPUT_NAMES, make_input, random_checkpoint

    repeats = args.repeats or (1 if args.quick else 3)
    if args.card or args.checkpoint:
        if not (args.card and args.checkpoint):
            p.error("--card and --checkpoint go together")
        card, ckpt = Path(args.card), Path(args.checkpoint)
        weights = f"{ckpt.name} ({card.name})"
    else:
        fs = args.feature_size or (12 if args.quick else 48)
        card, ckpt = random_checkpoint(fs)
        weights = f"seeded random, feature_size {fs}"
    names = (args.inputs or ("quick,quick-padded" if args.quick else "native,padded,clinical")).split(",")
    inputs = [make_input(n) if n in INPUT_NAMES else Path(n) for n in names]
    pipelines = args.pipelines.split(",")
    for name in pipelines:
        if name != "reference" and name not in VARIANTS:
            p.error(f"unknown pipeline '{name}'")

    import torch

    print(
        f"# {time.strftime('%Y-%m-%d %H:%M')}  torch {torch.__version__}  device {args.device}  "
        f"threads {torch.get_num_threads()}  cores {os.cpu_count()}  weights: {weights}  repeats {repeats}",
        flush=True,
    )
    all_results = []
    with tempfile.TemporaryDirectory(prefix="swinunetr-bench-") as tmpdir:
        tmp = Path(tmpdir)
        for inp, name in zip(inputs, names):
            runs: dict[str, list[dict]] = {pl: [] for pl in pipelines}
            for r in range(repeats):
                for pl in pipelines:
                    tag = f"{Path(name).name}-{pl}-{r}"
                    res = run_child(pl, inp, card, ckpt, args, tmp, tag)
                    runs[pl].append(res)
                    print(
                        f"  {name:>12} {pl:>10} run {r + 1}: {res['timings']['total']:.1f} s, "
                        f"peak RSS {res['peak_rss_mb']:.0f} MB",
                        flush=True,
                    )
                    if args.stages and res.get("stage_peaks_mb"):
                        print("               peak RSS by stage (engine + children, MB): "
                              + ", ".join(f"{k} {v}" for k, v in res["stage_peaks_mb"].items()), flush=True)
            report = summarize(name, inp, runs, card, args)
            all_results.append(report)
            if args.keep:
                keep = Path(args.keep)
                keep.mkdir(parents=True, exist_ok=True)
                for pl, rs in runs.items():
                    np.save(keep / f"{Path(name).name}-{pl}.npy", np.load(rs[-1]["labels"]))
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {"weights": weights, "device": args.device, "repeats": repeats, "results": all_results},
                indent=1,
                default=str,
            )
        )
    return 0


def summarize(name: str, path: Path, runs: dict, card_path: Path, args) -> dict:
    import numpy as np

    from SwinUNETRSegmentLib.models.cards import load_card

    card = load_card(card_path)
    organs = [lab.value for lab in card.labels]
    label_names = {lab.value: lab.name for lab in card.labels}
    ref_name = "reference" if "reference" in runs else next(iter(runs))
    ref = np.load(runs[ref_name][-1]["labels"])
    ref_aff = np.load(runs[ref_name][-1]["labels"] + ".affine.npy")
    shape = ref.shape
    print(f"\n## {name}: {path.name}, {shape[0]} x {shape[1]} x {shape[2]}")
    from SwinUNETRSegmentLib.inference.postprocess import PostProcessing, clean_labels

    post = PostProcessing.from_card(card)
    if ref_name == "reference" and post.active:
        # The card's post-processing is part of the model (the engine applies it on every
        # path); MONAI's pipeline has none, so the reference's labels get the same clean-up
        # and the Dice below compares the two pipelines' numerics, not the clean-up.
        ref = ref.astype(np.uint8, copy=True)
        removed = clean_labels(ref, float(abs(np.linalg.det(ref_aff[:3, :3]))), post, lambda: None)
        print(f"(reference + the card's post-processing: {removed.get('components_removed', 0)} components, "
              f"{removed.get('voxels_removed', 0)} voxels removed)")
    header = (f"{'pipeline':>10} {'end-to-end s':>13} {'x ref':>6} {'peak RSS MB':>12} {'/ref':>5} {'windows':>9}"
              f" {'mean Dice':>9}  stages (median s)")
    print(header)
    ref_total = statistics.median(r["timings"]["total"] for r in runs[ref_name])
    ref_rss = statistics.median(r["peak_rss_mb"] for r in runs[ref_name])
    out = {"input": name, "shape": list(shape), "pipelines": {}}
    for pl, rs in runs.items():
        total = statistics.median(r["timings"]["total"] for r in rs)
        rss = statistics.median(r["peak_rss_mb"] for r in rs)
        stages = {k: statistics.median(r["timings"][k] for r in rs) for k in rs[0]["timings"] if k != "total"}
        labels = np.load(rs[-1]["labels"])
        aff = np.load(rs[-1]["labels"] + ".affine.npy")
        if labels.shape != ref.shape or not np.allclose(aff, ref_aff, atol=1e-4):
            raise SystemExit(f"{pl}: labels on another grid than {ref_name}'s ({labels.shape} vs {ref.shape})")
        dice = dice_table(labels, ref, organs)
        present = [d for d in dice.values() if d is not None]
        mean = float(np.mean(present)) if present else float("nan")
        st = rs[-1].get("stats", {})
        win = f"{st.get('windows_run', '')}/{st.get('windows_full_image', '')}" if st else "all"
        stage_txt = " ".join(f"{k} {v:.1f}" for k, v in stages.items())
        if st.get("backend", "torch") != "torch":  # where the network ran (and for how many windows on PyTorch)
            on_torch = f", converted after {st['windows_torch']} on torch" if "windows_torch" in st else ""
            stage_txt += f"  [{st['backend']}{on_torch}]"
        print(
            f"{pl:>10} {total:13.1f} {ref_total / total:6.2f} {rss:12.0f} {rss / ref_rss:5.2f} {win:>9} {mean:9.4f}"
            f"  {stage_txt}"
        )
        entry = {
            "total_median_s": total,
            "totals_s": [r["timings"]["total"] for r in rs],
            "speedup": ref_total / total,
            "peak_rss_mb": rss,
            "rss_ratio": rss / ref_rss,
            "stages_median_s": stages,
            "mean_dice_vs_ref": mean,
            "dice_vs_ref": {label_names[v]: d for v, d in dice.items()},
            "stats": st,
        }
        if "gpu_peak_mb" in rs[-1]:
            entry["gpu_peak_mb"] = max(r["gpu_peak_mb"] for r in rs)
        if "warm" in rs[-1]:
            entry["warm"] = rs[-1]["warm"]
            print(
                f"{'':>10} warm second run: {rs[-1]['warm']['total']:.1f} s"
                f" (preprocess {rs[-1]['warm']['preprocess']:.2f} s)"
            )
        out["pipelines"][pl] = entry
    for pl, entry in out["pipelines"].items():
        if pl == ref_name:
            continue
        low = sorted((d, n) for n, d in entry["dice_vs_ref"].items() if d is not None and d < 0.98)
        if low:
            print(f"{pl:>10} organs below 0.98 Dice vs {ref_name}: " + ", ".join(f"{n} {d:.3f}" for d, n in low))
        absent = [n for n, d in entry["dice_vs_ref"].items() if d is None]
        if absent:
            print(f"{'':>10} absent in both: {', '.join(absent)}")
    return out


if __name__ == "__main__":
    raise SystemExit(main())
