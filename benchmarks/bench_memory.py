"""Allocator settings for the engine process: page faults, system time and peak memory.

glibc hands every large activation buffer (over its mmap threshold) back to the system
when it is freed and faults it in again on the next window; the kernel time that costs
shows up as system time and minor page faults. This script runs the same SwinUNETR windows
in a fresh process per setting and prints, side by side with the default:

* wall and user/system CPU seconds per window (medians over the windows after the first);
* minor page faults per window;
* peak resident memory.

Settings: ``default`` (glibc's own, dynamic thresholds), ``mallopt-N`` (M_MMAP_THRESHOLD
and M_TRIM_THRESHOLD set to N MiB through ``inference/memory.py``, as the engine process
does), and ``jemalloc`` (LD_PRELOAD of libjemalloc.so.2 with a retaining configuration,
when it is installed: ``apt-get install libjemalloc2``).

    ./dev python benchmarks/bench_memory.py                      # feature size 48, 96^3, 3 windows
    ./dev python benchmarks/bench_memory.py --feature-size 12 --roi 64 --windows 4
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

JEMALLOC = [Path("/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"), Path("/usr/lib/aarch64-linux-gnu/libjemalloc.so.2")]


def worker(args) -> None:
    import resource
    import time

    import torch
    from monai.networks.nets import SwinUNETR

    from SwinUNETRSegmentLib.inference import memory

    if args.setting.startswith("mallopt-"):
        memory.configure_allocator(int(args.setting.split("-")[1]) << 20)
    torch.manual_seed(0)
    net = SwinUNETR(in_channels=1, out_channels=14, feature_size=args.feature_size, use_v2=False).eval()
    x = torch.rand((1, 1) + (args.roi,) * 3)
    rows = []
    with torch.inference_mode():
        for _ in range(args.windows):
            r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
            net(x)
            r1, t1 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
            rows.append({"wall": t1 - t0, "user": r1.ru_utime - r0.ru_utime, "sys": r1.ru_stime - r0.ru_stime,
                         "minflt": r1.ru_minflt - r0.ru_minflt})
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"rows": rows, "peak_rss_mb": peak, "threads": torch.get_num_threads()}))


def cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return " ".join(sorted(flags & {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}))
    except OSError:
        pass
    return "unknown"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--feature-size", type=int, default=48)
    p.add_argument("--roi", type=int, default=96)
    p.add_argument("--windows", type=int, default=3)
    p.add_argument("--settings", default="default,mallopt-256,mallopt-1024,jemalloc")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--setting", default="default", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    print(f"# CPU flags: {cpu_flags()}; cores {os.cpu_count()}; SwinUNETR feature size {args.feature_size}, "
          f"{args.roi}^3 float32, {args.windows} windows per setting")
    print(f"{'setting':>14} {'wall s/win':>10} {'user s':>7} {'sys s':>6} {'faults/win':>11} {'peak MB':>8}"
          f" {'x wall':>7}")
    base = None
    for setting in args.settings.split(","):
        env = dict(os.environ)
        if setting == "jemalloc":
            lib = next((str(j) for j in JEMALLOC if j.exists()), None)
            if lib is None:
                print(f"{setting:>14} (libjemalloc.so.2 not installed)")
                continue
            env["LD_PRELOAD"] = lib
            env["MALLOC_CONF"] = "retain:true,dirty_decay_ms:-1,muzzy_decay_ms:-1"
        cmd = [sys.executable, __file__, "--worker", "--setting", setting, "--feature-size", str(args.feature_size),
               "--roi", str(args.roi), "--windows", str(args.windows)]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if out.returncode != 0:
            print(f"{setting:>14} failed: {out.stderr.strip().splitlines()[-1:]}")
            continue
        res = json.loads(out.stdout.strip().splitlines()[-1])
        rows = res["rows"][1:] or res["rows"]  # the first window warms up
        med = {k: statistics.median(r[k] for r in rows) for k in ("wall", "user", "sys", "minflt")}
        base = base or med["wall"]
        print(f"{setting:>14} {med['wall']:10.2f} {med['user']:7.2f} {med['sys']:6.2f} {med['minflt']:11.0f} "
              f"{res['peak_rss_mb']:8.0f} {base / med['wall']:7.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
