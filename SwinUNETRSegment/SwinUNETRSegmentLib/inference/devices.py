"""Where and how the network runs: the device, the precision, the thread count, and the
ladder of fallbacks when a GPU runs out of memory.
"""

from __future__ import annotations
import logging
import contextlib
import os
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence
from SwinUNETRSegmentLib.errors import UserError

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------
# precision and threads
# ----------------------------------------------------------------------------------------
_BF16_CPU: Optional[bool] = None


def cpu_has_native_bf16() -> bool:
    """True when this CPU computes bfloat16 natively (AVX512-BF16 or AMX) and torch's
    bfloat16 matrix product works here; emulated bfloat16 would be slower than float32."""
    global _BF16_CPU
    if _BF16_CPU is None:
        import torch

        ok = False
        try:
            capability = str(torch.backends.cpu.get_cpu_capability())  # e.g. "AVX512", "AVX2"
            flags = _cpu_flags()
            native = bool({"avx512_bf16", "amx_bf16"} & flags) or "AMX" in capability
            if native:
                a = torch.ones(8, 8, dtype=torch.bfloat16)
                ok = bool(torch.isfinite((a @ a).float()).all())
        except Exception:  # noqa: BLE001 - any failure means: do not use it
            ok = False
        _BF16_CPU = ok
    return _BF16_CPU


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def autocast_dtype(device, precision: str):
    """The torch dtype for autocast on ``device``, or None for plain float32."""
    import torch

    kind = getattr(device, "type", str(device))
    if precision == "float32":
        return None
    if precision == "auto":
        if kind == "cuda":
            return torch.float16
        if kind == "cpu" and cpu_has_native_bf16():
            return torch.bfloat16
        return None
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}[precision]
    if kind == "mps":
        return None
    return dtype


def autocast(device, precision: str):
    """A context manager running the network in the chosen precision."""
    import torch

    dtype = autocast_dtype(device, precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(getattr(device, "type", str(device)), dtype=dtype)


def physical_cores() -> int:
    """Physical cores among the CPUs this process may run on (hyper-threads not counted)."""
    try:
        allowed = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        allowed = list(range(os.cpu_count() or 1))
    cores = set()
    for cpu in allowed:
        base = f"/sys/devices/system/cpu/cpu{cpu}/topology"
        try:
            with open(f"{base}/core_id") as f:
                core = f.read().strip()
            with open(f"{base}/physical_package_id") as f:
                package = f.read().strip()
            cores.add((package, core))
        except OSError:
            cores.add(("cpu", str(cpu)))
    return max(1, len(cores))


def configure_threads(threads: Any) -> Optional[int]:
    """Set torch's intra-op threads (``"auto"``: physical cores) unless the user fixed them
    with OMP_NUM_THREADS; returns the count in use."""
    import torch

    if threads is None:
        return torch.get_num_threads()
    if threads == "auto":
        if os.environ.get("OMP_NUM_THREADS") or os.environ.get("MKL_NUM_THREADS"):
            return torch.get_num_threads()
        threads = physical_cores()
    if torch.get_num_threads() != int(threads):
        torch.set_num_threads(int(threads))
    return torch.get_num_threads()


# ----------------------------------------------------------------------------------------
# out of GPU memory: fall back step by step
# ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Plan:
    """One way to run the sliding windows: where the stitching buffer lives, windows per call."""

    stitch_device: str
    sw_batch_size: int

    def describe(self) -> str:
        where = "on the GPU" if self.stitch_device.startswith("cuda") else "on the CPU"
        return f"stitching {where}, {self.sw_batch_size} window{'s' if self.sw_batch_size != 1 else ''} per call"


def inference_plans(device, sw_batch_size: int, gpu_stitching: bool = True) -> list[Plan]:
    """The ladder of plans to try in order: for CUDA, GPU stitching (if allowed), then CPU
    stitching, then halving the window batch down to one; elsewhere a single plan."""
    kind = getattr(device, "type", str(device))
    if kind != "cuda":
        return [Plan(str(device), sw_batch_size)]
    plans = []
    if gpu_stitching:
        plans.append(Plan(str(device), sw_batch_size))
    b = sw_batch_size
    plans.append(Plan("cpu", b))
    while b > 1:
        b //= 2
        plans.append(Plan("cpu", b))
    return plans


def is_out_of_memory(exc: BaseException) -> bool:
    import torch

    oom = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", None)
    if oom is not None and isinstance(exc, oom):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def run_with_fallback(plans: Sequence[Plan], attempt: Callable[[Plan], Any],
                      on_fallback: Optional[Callable[[Plan, Plan], None]] = None, empty_cache: Callable[[], None] = lambda: None):
    """Run ``attempt(plan)`` for each plan in turn until one does not run out of memory.

    Every fallback is logged (and reported to ``on_fallback(failed, next)``); the last
    plan's out-of-memory error becomes a :class:`UserError` that says what to do.
    """
    for n, plan in enumerate(plans):
        try:
            return attempt(plan)
        except Exception as exc:  # noqa: BLE001 - only out-of-memory is handled
            if not is_out_of_memory(exc):
                raise
            empty_cache()
            if n + 1 == len(plans):
                raise UserError(
                    f"out of GPU memory even with {plan.describe()}; close other GPU programs, "
                    "or run on the CPU (device cpu)") from None
            nxt = plans[n + 1]
            log.warning("out of GPU memory with %s; retrying with %s", plan.describe(), nxt.describe())
            if on_fallback is not None:
                on_fallback(plan, nxt)
    raise AssertionError("no plan given")
