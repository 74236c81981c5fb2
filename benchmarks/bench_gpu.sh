#!/bin/sh
# Issue 16 item 5 on the device machine (benchmarks/bench_gpu.py says how to prepare it):
# the device tool's run with carry [".gpu-bench"], from the repository's root.
set -e
test -d .gpu-bench/wheels || { echo ".gpu-bench/ is missing: run ./dev python benchmarks/bench_gpu.py --prepare here first, and carry it"; exit 1; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu-bench/wheels/*.whl
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 benchmarks/bench_gpu.py --out "${OUT:-out/gpu}" "$@"
