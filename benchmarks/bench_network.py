#!/usr/bin/env python
"""Seconds per sliding window: the network as the reference runs it against each step of
the engine's fast path, in one process, side by side.

The reference (MONAI model-zoo swin_unetr_btcv_segmentation) calls a float32 SwinUNETR on
four 96^3 windows at a time with MONAI's plain window attention. The engine's steps, each
on top of the previous one (``SwinUNETRSegmentLib.inference.options.FastPath``):

* ``bf16``: bfloat16 weights and windows (CPUs with native bfloat16), two windows per call;
* ``+fused``: window attention through ``scaled_dot_product_attention``;
* ``+cached``: the shift mask and position bias built once (``window_attention``);
* ``+pointwise``: 1x1x1 and 2x2x2 transposed convolutions as channel products
  (``pointwise_convs``): the engine's PyTorch default;
* ``OpenVINO``: the float32 network converted once (``inference/cpu/openvino_backend.py``)
  and run on OpenVINO's CPU runtime in float32, and in bfloat16 where the CPU has it natively.

For each it prints the median over ``--repeats`` calls (after one warm-up call) of the
seconds per window, the ratio to the reference, and the largest difference of its logits
from the float32 reference's on the same windows, with the share of voxels whose argmax
agrees (seeded random weights: agreement here is a worst case, trained weights have
wider margins). ``--quick`` is a smoke run (feature_size 12, 64^3).

    ./dev python benchmarks/bench_network.py                 # feature_size 48, 96^3, ~5 min on 2 cores
    ./dev python benchmarks/bench_network.py --quick
    ./dev python benchmarks/bench_network.py --float32       # what a CPU without native bfloat16 runs
    ./dev python benchmarks/bench_network.py --float32 --profile   # + OpenVINO's time per operation, GFLOP/s
    ./dev python benchmarks/bench_network.py --float32 --onnxruntime   # + ONNX Runtime (not a dependency:
        # pip install --target ~/.cache/ortpkgs onnxruntime onnx onnxscript; PYTHONPATH=~/.cache/ortpkgs,
        # outside the repository, whose lint test reads every .py file under it)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from SwinUNETRSegmentLib.inference.devices import configure_threads, cpu_has_native_bf16
from SwinUNETRSegmentLib.inference.network import use_fused_attention

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "SwinUNETRSegment"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="feature_size 12, 64^3 windows, 2 repeats")
    p.add_argument("--feature-size", type=int, default=None)
    p.add_argument("--roi", type=int, default=None, help="window edge in voxels (96 by default, 64 with --quick)")
    p.add_argument("--repeats", type=int, default=None, help="timed calls per configuration (3; 2 with --quick)")
    p.add_argument("--float32", action="store_true",
                   help="the engine's steps and OpenVINO in float32 only, as on a CPU without native bfloat16 "
                        "(with this CPU's full instruction set)")
    p.add_argument("--profile", action="store_true",
                   help="and where OpenVINO's time goes in one window: seconds per operation type, the largest "
                        "operations, and the convolutions' GFLOP/s (OpenVINO's PERF_COUNT)")
    p.add_argument("--onnxruntime", action="store_true",
                   help="add ONNX Runtime's CPU runtime in float32 (onnxruntime and onnx importable)")
    args = p.parse_args(argv)

    import contextlib
    import copy

    import torch
    from monai.networks.nets import SwinUNETR

    from SwinUNETRSegmentLib.inference.cpu.pointwise_convs import pointwise_as_matmul
    from SwinUNETRSegmentLib.inference.cpu.window_attention import cached_window_attention

    fs = args.feature_size or (12 if args.quick else 48)
    roi = args.roi or (64 if args.quick else 96)
    repeats = args.repeats or (2 if args.quick else 3)
    threads = configure_threads("auto")
    torch.manual_seed(0)
    reference = SwinUNETR(in_channels=1, out_channels=14, feature_size=fs).eval()
    windows = torch.rand((4, 1, roi, roi, roi), generator=torch.Generator().manual_seed(1))
    bf16 = cpu_has_native_bf16() and not args.float32
    print(
        f"# {time.strftime('%Y-%m-%d %H:%M')}  torch {torch.__version__}  threads {threads}  feature_size {fs}  "
        f"window {roi}^3  native bfloat16: {bf16}  repeats {repeats}",
        flush=True,
    )

    def timed(net, x, contexts=()):
        times = []
        with torch.inference_mode(), contextlib.ExitStack() as stack:
            for make in contexts:
                stack.enter_context(make(net))
            out = net(x)  # warm-up (and, with the caches, their one-time build)
            for _ in range(repeats):
                t = time.perf_counter()
                net(x)
                times.append((time.perf_counter() - t) / x.shape[0])
        return statistics.median(times), out.float()

    ref_s, ref_out = timed(reference, windows)
    ref_labels = ref_out.argmax(1)
    rows = [("reference: float32, 4 per call, plain attention", ref_s, 0.0, 1.0)]
    dtype = torch.bfloat16 if bf16 else torch.float32
    steps = [
        (f"{'bf16' if bf16 else 'float32 (no native bf16)'}, 2 per call", False, ()),
        ("+ fused attention", True, ()),
        ("+ cached mask and bias", True, (cached_window_attention,)),
        ("+ channel products (engine default)", True, (cached_window_attention, pointwise_as_matmul)),
    ]
    net = copy.deepcopy(reference).to(dtype)
    for name, fused, contexts in steps:
        use_fused_attention(net, fused)
        outs = []
        seconds = []
        for half in (windows[:2], windows[2:]):
            s, o = timed(net, half.to(dtype), contexts)
            seconds.append(s)
            outs.append(o)
        out = torch.cat(outs)
        rows.append(
            (
                name,
                statistics.mean(seconds),
                float((out - ref_out).abs().max()),
                float((out.argmax(1) == ref_labels).float().mean()),
            )
        )
    engine_s = rows[-1][1]
    rows += _openvino_rows(reference, windows, roi, threads, bf16, timed, ref_out, ref_labels, args.profile)
    if args.onnxruntime:
        rows += _onnxruntime_rows(reference, windows, roi, threads, timed, ref_out, ref_labels)
    print(f"\n{'network as run':52s} {'s/window':>9} {'x ref':>6} {'max |logit diff|':>17} {'argmax agrees':>14}")
    for name, s, diff, agree in rows:
        print(f"{name:52s} {s:9.2f} {ref_s / s:6.2f} {diff:17.4f} {agree:14.4f}")
    for name, s, _, _ in rows[5:]:
        print(f"{name}: {engine_s / s:.2f} x the PyTorch engine's {engine_s:.2f} s per window")
    return 0


def _openvino_rows(reference, windows, roi, threads, bf16, timed, ref_out, ref_labels, profile=False) -> list:
    """The same windows on OpenVINO (inference/cpu/openvino_backend.py): float32, and
    bfloat16 where the CPU has it natively; conversion and compile seconds printed."""
    import os
    import tempfile

    import torch

    from SwinUNETRSegmentLib.inference.cpu import openvino_backend as ob
    from SwinUNETRSegmentLib.inference.network import fused_attention

    if not ob.available() or ob.preloaded_allocator():
        print("# OpenVINO: not installed here (or a preloaded allocator): no OpenVINO rows")
        return []
    rows = []
    with tempfile.TemporaryDirectory() as home:
        os.environ["SWINUNETR_SEGMENT_HOME"] = home
        t = time.perf_counter()
        with fused_attention(reference, True):
            path = ob.convert(reference, (roi,) * 3, "bench")
        print(f"# OpenVINO {ob.version()}: conversion {time.perf_counter() - t:.1f} s", flush=True)
        for hint in ("f32", "bf16") if bf16 else ("f32",):
            net = ob.OpenVINONetwork(path, hint, threads)
            print(f"# OpenVINO {hint}: compile {net.compile_seconds:.1f} s", flush=True)
            s, out = timed(net, windows)
            name = f"OpenVINO {'float32' if hint == 'f32' else 'bfloat16'}, 1 per call"
            rows.append((name, s, float((out - ref_out).abs().max()),
                         float((out.argmax(1) == ref_labels).float().mean())))
            del net
            if profile:
                _openvino_profile(reference, path, hint, threads, windows[:1])
    torch.set_num_threads(threads)
    return rows


def _openvino_profile(reference, path, hint, threads, window) -> None:
    """One window on OpenVINO with its per-operation counters (``PERF_COUNT``), the median of 3
    calls per operation: seconds per operation type, the largest operations, and each large
    convolution's GFLOP/s (2 x output voxels x in x out channels x kernel voxels, from the torch
    module the operation was traced from). Convolutions running near the CPU's multiply-add peak
    leave nothing for a faster kernel to win at the same arithmetic."""
    import collections

    import openvino as ov
    import torch

    core = ov.Core()
    config = {"INFERENCE_PRECISION_HINT": hint, "PERFORMANCE_HINT": "LATENCY", "PERF_COUNT": "YES",
              "INFERENCE_NUM_THREADS": int(threads)}
    req = core.compile_model(core.read_model(str(path)), "CPU", config).create_infer_request()
    x = window.numpy()
    req.infer([x])
    per_op = collections.defaultdict(list)
    for _ in range(3):
        req.infer([x])
        seen = collections.Counter()
        for p in req.get_profiling_info():
            seen[(p.node_type, p.node_name, p.exec_type)] += p.real_time.total_seconds()
        for k, v in seen.items():
            per_op[k].append(v)
    ops = {k: statistics.median(v) for k, v in per_op.items()}
    total = sum(ops.values())
    by_type = collections.Counter()
    for (kind, _, _), v in ops.items():
        by_type[kind] += v
    print(f"\n# OpenVINO {hint}, one window, per operation (PERF_COUNT, median of 3): {total:.2f} s in all")
    for kind, v in by_type.most_common(8):
        print(f"#   {kind:26s} {v:6.3f} s {100 * v / total:5.1f} %")
    # output voxels of each convolution, for its arithmetic
    voxels = {}
    hooks = [m.register_forward_hook(lambda m, i, o, n=n: voxels.__setitem__(n, o[0, 0].numel()))
             for n, m in reference.named_modules() if isinstance(m, torch.nn.Conv3d)]
    with torch.inference_mode():
        reference(window)
    for h in hooks:
        h.remove()
    modules = dict(reference.named_modules())
    print("#   the largest operations:")
    for (kind, name, exec_type), v in sorted(ops.items(), key=lambda kv: -kv[1])[:8]:
        module = name.split("/")[0].removeprefix("__module.net.").removeprefix("__module.")
        rate = ""
        if kind == "Convolution" and module in voxels:
            w = modules[module].weight
            rate = f"  {2 * voxels[module] * w[0].numel() * w.shape[0] / v / 1e9:6.0f} GFLOP/s"
        print(f"#   {v:6.3f} s  {kind:14s} {exec_type:24s} {module[:60]}{rate}")


def _onnxruntime_rows(reference, windows, roi, threads, timed, ref_out, ref_labels) -> list:
    """The same windows on ONNX Runtime's CPU execution provider, float32, one per call (the
    issue's other candidate backend; measured, not a dependency)."""
    import tempfile

    import numpy as np
    import torch

    from SwinUNETRSegmentLib.inference.network import fused_attention

    try:
        import onnxruntime as ort
    except ImportError:
        print("# ONNX Runtime: not importable here: no ONNX Runtime row")
        return []

    class OrtNetwork:
        def __init__(self, path):
            options = ort.SessionOptions()
            options.intra_op_num_threads = threads
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
            self.name = self.session.get_inputs()[0].name

        def __call__(self, batch):
            outs = [self.session.run(None, {self.name: batch[i : i + 1].numpy()})[0] for i in range(batch.shape[0])]
            return torch.from_numpy(np.concatenate(outs))

    with tempfile.TemporaryDirectory() as tmp:
        path = f"{tmp}/net.onnx"
        t = time.perf_counter()
        with torch.no_grad(), fused_attention(reference, True):
            torch.onnx.export(reference, (windows[:1],), path, dynamo=False, opset_version=17)
        print(f"# ONNX Runtime {ort.__version__}: export {time.perf_counter() - t:.1f} s", flush=True)
        t = time.perf_counter()
        net = OrtNetwork(path)
        print(f"# ONNX Runtime: session {time.perf_counter() - t:.1f} s", flush=True)
        s, out = timed(net, windows)
    torch.set_num_threads(threads)
    return [("ONNX Runtime float32, 1 per call", s, float((out - ref_out).abs().max()),
             float((out.argmax(1) == ref_labels).float().mean()))]


if __name__ == "__main__":
    raise SystemExit(main())
