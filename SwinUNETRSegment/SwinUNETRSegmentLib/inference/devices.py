"""Where and how the network runs: the device, the precision, the thread count, and the
ladder of fallbacks when a GPU runs out of memory.
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import subprocess
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Sequence

from SwinUNETRSegmentLib.errors import UserError

__all__ = [
    "available_devices",
    "resolve_device",
    "cpu_has_native_bf16",
    "cpu_flags_have_bf16",
    "autocast_dtype",
    "autocast",
    "physical_cores",
    "local_world_size",
    "configure_threads",
    "threads_for",
    "thread_count",
    "Plan",
    "inference_plans",
    "is_out_of_memory",
    "run_with_fallback",
]

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------
# devices
# ----------------------------------------------------------------------------------------
def available_devices() -> list[tuple[str, str]]:
    """(device string, human name) for every device torch can use here, best first."""
    import torch

    out = []
    if torch.cuda.is_available():
        for n in range(torch.cuda.device_count()):
            out.append((f"cuda:{n}", torch.cuda.get_device_name(n)))
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        out.append(("mps", "Apple GPU (MPS)"))
    out.append(("cpu", "CPU"))
    return out


def resolve_device(name: Optional[str] = "auto"):
    """``"auto"`` picks CUDA, then Apple MPS, then the CPU; anything else is checked."""
    import torch

    if name in (None, "", "auto"):
        return torch.device(available_devices()[0][0])
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        raise UserError(f"unknown device '{name}'; use auto, cpu, cuda, cuda:N or mps") from None
    known = [d for d, _ in available_devices()]
    here = f"devices here: {', '.join(known)}"
    if dev.type == "cuda":
        index = dev.index or 0
        if f"cuda:{index}" not in known:
            raise UserError(f"device '{name}' is not available on this machine ({here}); use --device auto")
        return torch.device(f"cuda:{index}")
    if dev.type == "mps" and "mps" not in known:
        raise UserError(f"device 'mps' is not available on this machine ({here}); use --device auto")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"unknown device '{name}'; use auto, cpu, cuda, cuda:N or mps")
    return dev


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
            # Both the CPU (its flags) and torch's kernels (ATEN_CPU_CAPABILITY can hold them
            # to AVX2) must do bfloat16 natively.
            native = "AMX" in capability or (bool({"avx512_bf16", "amx_bf16"} & flags) and "AVX512" in capability)
            if native:
                a = torch.ones(8, 8, dtype=torch.bfloat16)
                ok = bool(torch.isfinite((a @ a).float()).all())
        except Exception:  # noqa: BLE001 - any failure means: do not use it
            ok = False
        _BF16_CPU = ok
    return _BF16_CPU


def cpu_flags_have_bf16() -> bool:
    """:func:`cpu_has_native_bf16` without importing torch (for the command line's choice of
    allocator before it starts): the CPU's flags, and PyTorch's kernels not held below
    AVX-512 by ``ATEN_CPU_CAPABILITY``."""
    import os

    held = os.environ.get("ATEN_CPU_CAPABILITY", "").strip().lower()
    if held and not held.startswith("avx512"):
        return False
    return bool({"avx512_bf16", "amx_bf16"} & _cpu_flags())


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
    """Physical cores among the CPUs this process may run on (hyper-threads not counted).

    Linux: the CPU topology in /sys for the CPUs of this process's affinity mask; macOS:
    ``sysctl hw.physicalcpu``; elsewhere (Windows) psutil when installed; else the
    logical CPU count."""
    try:
        allowed = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        allowed = None
    if allowed is not None and os.path.isdir("/sys/devices/system/cpu"):
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
    if platform.system() == "Darwin":
        with contextlib.suppress(OSError, ValueError, subprocess.SubprocessError):
            out = subprocess.run(["sysctl", "-n", "hw.physicalcpu"], capture_output=True, text=True, timeout=5)
            return max(1, int(out.stdout.strip()))
    with contextlib.suppress(Exception):
        import psutil  # optional: not a dependency

        n = psutil.cpu_count(logical=False)
        if n:
            return max(1, int(n))
    return max(1, len(allowed) if allowed else (os.cpu_count() or 1))


def local_world_size() -> int:
    """Processes that share this machine's cores: torchrun's LOCAL_WORLD_SIZE, else 1."""
    try:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        return 1


def threads_for(threads: Any) -> Optional[int]:
    """The intra-op thread count ``threads`` asks for: an int as given; ``"auto"`` the
    physical cores shared out among torchrun's processes on this machine (each at least
    one), or None when the user fixed it with OMP_NUM_THREADS / MKL_NUM_THREADS or when
    ``threads`` is None (torch's setting stays)."""
    if threads is None:
        return None
    if threads == "auto":
        if os.environ.get("OMP_NUM_THREADS") or os.environ.get("MKL_NUM_THREADS"):
            return None
        return max(1, physical_cores() // local_world_size())
    return int(threads)


def configure_threads(threads: Any) -> Optional[int]:
    """Set torch's intra-op threads as :func:`threads_for` says; returns the count in use.
    Process-wide and not undone: for one run, use :func:`thread_count`."""
    import torch

    n = threads_for(threads)
    if n is not None and torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return torch.get_num_threads()


@contextlib.contextmanager
def thread_count(threads: Any) -> Iterator[int]:
    """torch's intra-op threads as :func:`threads_for` says while open, the caller's count
    again after; yields the count in use."""
    import torch

    before = torch.get_num_threads()
    n = threads_for(threads)
    try:
        if n is not None and n != before:
            torch.set_num_threads(n)
        yield torch.get_num_threads()
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


# ----------------------------------------------------------------------------------------
# out of GPU memory: fall back step by step
# ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Plan:
    """One way to run the sliding windows: where the stitching buffer lives ("auto": on the
    GPU, moving to the CPU when the GPU is full, as MONAI's ``SlidingWindowInfererAdapt``
    does; or a device), and windows per network call."""

    stitch_device: str
    sw_batch_size: int

    def describe(self) -> str:
        if self.stitch_device == "auto":
            where = "on the GPU, else on the CPU"
        else:
            where = "on the GPU" if self.stitch_device.startswith("cuda") else "on the CPU"
        return f"stitching {where}, {self.sw_batch_size} window{'s' if self.sw_batch_size != 1 else ''} per call"


def inference_plans(device, sw_batch_size: int, gpu_stitching: bool = True) -> list[Plan]:
    """The ladder of plans to try in order: for CUDA, adaptive stitching (GPU, then CPU;
    CPU only when ``gpu_stitching`` is off), then CPU stitching with the window batch
    halved down to one; elsewhere a single plan."""
    kind = getattr(device, "type", str(device))
    if kind != "cuda":
        return [Plan(str(device), sw_batch_size)]
    plans = [Plan("auto" if gpu_stitching else "cpu", sw_batch_size)]
    b = sw_batch_size
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


def run_with_fallback(
    plans: Sequence[Plan],
    attempt: Callable[[Plan], Any],
    on_fallback: Optional[Callable[[Plan, Plan], None]] = None,
    empty_cache: Callable[[], None] = lambda: None,
):
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
                    "or run on the CPU (device cpu)"
                ) from None
            nxt = plans[n + 1]
            log.warning("out of GPU memory with %s; retrying with %s", plan.describe(), nxt.describe())
            if on_fallback is not None:
                on_fallback(plan, nxt)
    raise AssertionError("no plan given")
