#!/usr/bin/env python
"""Training steps per hour for the built-in model's recipe, and what each speed-up gives.

One training step as ``swinunetr-segment train`` takes it (SwinUNETR feature size 12,
14 classes, MONAI's DiceCELoss, AdamW), on seeded random crops, in one process, side by side:

* ``recipe``: float32, MONAI's plain window attention, 2 crops of 64^3 per step (the demo's
  stages 1-4);
* ``+fused``: window attention through ``scaled_dot_product_attention`` (MONAI's
  ``use_flash_attention``, which also runs backward);
* ``+bf16``: bfloat16 autocast (only where the CPU has native bfloat16);
* other crop shapes (multiples of 32; 32^3 is too small for its bottleneck norm): 4 x 64^3
  and 1 x 96^3 (voxels per second is the figure to compare).

It also times the data side: one crop drawn from the cached, preprocessed example CT (what
``CacheDataset`` keeps) against reading and preprocessing the scan for every sample (what an
uncached dataset does). Figures are medians over ``--steps`` steps after one warm-up step.

    ./dev python benchmarks/bench_training.py              # ~4 min on 2 cores
    ./dev python benchmarks/bench_training.py --steps 2    # quicker
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "SwinUNETRSegment"))


def _cpu_flags() -> str:
    try:
        flags = Path("/proc/cpuinfo").read_text().split("flags", 1)[1].split("\n", 1)[0].split()
    except (OSError, IndexError):
        return "unknown"
    return " ".join(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags) or "no avx2"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=3, help="timed steps per configuration (after one warm-up)")
    args = p.parse_args(argv)

    import torch
    from monai.losses import DiceCELoss
    from monai.networks.nets import SwinUNETR

    from SwinUNETRSegmentLib.inference.devices import configure_threads, cpu_has_native_bf16
    from SwinUNETRSegmentLib.inference.network import use_fused_attention

    threads = configure_threads("auto")
    bf16 = cpu_has_native_bf16()
    print(f"# {time.strftime('%Y-%m-%d %H:%M')}  torch {torch.__version__}  threads {threads}  CPU flags: "
          f"{_cpu_flags()}  native bfloat16: {bf16}  steps {args.steps}", flush=True)

    def step_seconds(fused: bool, amp: bool, crop: int, n: int) -> float:
        torch.manual_seed(0)
        net = SwinUNETR(in_channels=1, out_channels=14, feature_size=12).train()
        use_fused_attention(net, fused)
        opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
        loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
        g = torch.Generator().manual_seed(1)
        x = torch.rand((n, 1, crop, crop, crop), generator=g)
        y = torch.randint(0, 14, (n, 1, crop, crop, crop), generator=g)
        times = []
        for i in range(args.steps + 1):
            t = time.perf_counter()
            ctx = torch.autocast("cpu", dtype=torch.bfloat16) if amp else contextlib.nullcontext()
            with ctx:
                loss = loss_fn(net(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if i:
                times.append(time.perf_counter() - t)
        return statistics.median(times)

    configs = [("recipe: float32, plain attention, 2 x 64^3", False, False, 64, 2),
               ("+ fused attention", True, False, 64, 2)]
    if bf16:
        configs.append(("+ fused + bfloat16 autocast", True, True, 64, 2))
    configs += [("plain attention, 4 x 64^3", False, False, 64, 4), ("plain attention, 1 x 96^3", False, False, 96, 1)]
    rows = []
    for name, fused, amp, crop, n in configs:
        s = step_seconds(fused, amp, crop, n)
        rows.append((name, s, n * crop**3 / s))
        print(f"# {name}: {s:.2f} s/step", flush=True)
    base = rows[0][1]
    print(f"\n{'training step':44s} {'s/step':>7} {'steps/h':>8} {'x recipe':>9} {'Mvoxel/s':>9}")
    for name, s, vps in rows:
        print(f"{name:44s} {s:7.2f} {3600 / s:8.0f} {base / s:9.2f} {vps / 1e6:9.3f}")
    _data_side()
    return 0


def _data_side() -> None:
    """Seconds per training sample: a random crop of the cached preprocessed CT against
    reading and preprocessing the scan again (both through the training transforms)."""
    import numpy as np

    from SwinUNETRSegmentLib.errors import UserError
    from SwinUNETRSegmentLib.fileio.read import read_volume
    from SwinUNETRSegmentLib.fileio.sampledata import reference_files
    from SwinUNETRSegmentLib.inference.preprocess import to_model_space
    from SwinUNETRSegmentLib.models.cards import load_card

    try:
        scan = reference_files() / "example_ct.nii.gz"
    except UserError as exc:
        print(f"# data side skipped: {exc}")
        return
    card = load_card("demo")
    times_uncached = []
    for _ in range(3):
        t = time.perf_counter()
        vol, _ = read_volume(scan)
        img = to_model_space(card, vol)
        times_uncached.append(time.perf_counter() - t)
    arr = np.asarray(img.as_tensor()[0] if hasattr(img, "as_tensor") else img[0])
    rng = np.random.default_rng(0)
    times_cached = []
    for _ in range(20):
        t = time.perf_counter()
        x0, y0, z0 = (int(rng.integers(0, max(1, s - 64))) for s in arr.shape)
        np.ascontiguousarray(arr[x0 : x0 + 64, y0 : y0 + 64, z0 : z0 + 64])
        times_cached.append(time.perf_counter() - t)
    u, c = statistics.median(times_uncached), statistics.median(times_cached)
    print(f"\nper sample: read + preprocess the scan {u:.3f} s; crop of the cached volume {c * 1000:.2f} ms "
          f"({u / c:.0f} x)")


if __name__ == "__main__":
    raise SystemExit(main())
