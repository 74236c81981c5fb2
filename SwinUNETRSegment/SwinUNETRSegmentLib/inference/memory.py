"""The engine process's allocator: keep large activation buffers instead of returning them.

Where jemalloc is installed (Linux: ``apt-get install libjemalloc2``), the engine process
runs on it, configured to retain the memory it frees (:func:`allocator_env`: the command
line re-executes itself with it, :func:`reexec_with_allocator`, and the local engine
service starts with it). :func:`configure_allocator` raises glibc's thresholds instead,
for callers that choose it (it costs peak memory). ``SWINUNETR_SEGMENT_ALLOCATOR=system``
keeps the C library's allocator untouched.

By default glibc serves every allocation above its mmap threshold (128 KiB, raised
dynamically up to 32 MiB) with a fresh ``mmap`` and unmaps it on ``free``: a SwinUNETR's
activations (hundreds of MB at 96^3) are then faulted in page by page on every window
and handed back after it, which costs kernel time on every window
(``benchmarks/bench_memory.py`` measures it). Raising the mmap threshold above the largest
buffer and the trim threshold with it makes glibc keep freed buffers in its heap and
reuse them for the next window.

No library sets this (PyTorch leaves the C allocator alone), so :func:`configure_allocator`
calls glibc's ``mallopt`` through ctypes. It changes no result, only where freed memory
goes; it is a no-op where the C library is not glibc (macOS, Windows, musl) and when the
user set ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` themselves.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import platform

__all__ = ["DEFAULT_THRESHOLD", "JEMALLOC_CONF", "RAISED_BY_US", "REEXEC_MARK", "allocator_env", "configure_allocator",
           "jemalloc_library", "lower_raised_thresholds", "openvino_installed", "reexec_with_allocator",
           "release_free_memory", "release_mapped_files"]

log = logging.getLogger(__name__)

#: set beside glibc's thresholds where :func:`allocator_env` raised them (not the user)
RAISED_BY_US = "_SWINUNETR_SEGMENT_RAISED_THRESHOLDS"
#: set in the environment of the process :func:`reexec_with_allocator` replaced this one with
REEXEC_MARK = "_SWINUNETR_SEGMENT_REEXEC"

#: glibc's mallopt parameter numbers (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

#: bytes: larger than one activation buffer of a feature-48 SwinUNETR at 96^3 per window pair
DEFAULT_THRESHOLD = 1 << 30

_configured: int | None = None

#: jemalloc keeps what it frees (no decay back to the system): no page faults per window
JEMALLOC_CONF = "retain:true,dirty_decay_ms:-1,muzzy_decay_ms:-1"
_JEMALLOC = ("/usr/lib/x86_64-linux-gnu/libjemalloc.so.2", "/usr/lib/aarch64-linux-gnu/libjemalloc.so.2",
             "/usr/lib64/libjemalloc.so.2", "/usr/lib/libjemalloc.so.2", "/usr/local/lib/libjemalloc.so.2")


def jemalloc_library() -> str | None:
    """The path of an installed libjemalloc.so.2 (Linux), or None."""
    if platform.system() != "Linux":
        return None
    return next((p for p in _JEMALLOC if os.path.exists(p)), None)


def openvino_installed() -> bool:
    """Whether the openvino package is installed (found, not imported)."""
    import importlib.util

    try:
        return importlib.util.find_spec("openvino") is not None
    except (ImportError, ValueError):
        return False


def allocator_env(env: dict | None = None, openvino: bool = False, converted: bool = False) -> dict:
    """``env`` (default: this process's) with what an engine process needs to start on
    jemalloc, when it is installed and the user did not ask for the system allocator.

    ``openvino``: the process may run the network on OpenVINO, whose CPU plugin aborts
    under a preloaded allocator ("free(): invalid pointer", jemalloc and TBB's proxy alike)
    and keeps its own buffers between windows: such a process keeps the system allocator.
    On a CPU without native bfloat16, where such a process runs PyTorch windows until a
    conversion pays (``openvino_backend.ConvertWhenItPays``), glibc's mmap and trim
    thresholds are raised too (``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``, unless
    the user set them): measured with PyTorch held to AVX2 that won back what jemalloc gives
    (10-17 % on the built-in model) for less peak memory than jemalloc's; on OpenVINO's own
    windows (a bfloat16 CPU) it changed nothing but 42 % more peak memory (benchmarks/README.md,
    session 7).

    ``converted``: the process's runs are on a cached conversion from their first window (no
    PyTorch windows to speed up): glibc's thresholds stay as they are, on any CPU (on an
    AVX2-only CPU the raised ones added 200-300 MB to a feature-48 run's peak; session 10)."""
    env = dict(os.environ if env is None else env)
    if env.get("SWINUNETR_SEGMENT_ALLOCATOR", "").lower() == "system":
        return env
    if openvino:
        from SwinUNETRSegmentLib.inference.devices import cpu_flags_have_bf16

        glibc = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
        mine = env.get("MALLOC_MMAP_THRESHOLD_") or env.get("MALLOC_TRIM_THRESHOLD_")
        if glibc and not mine and not converted and not cpu_flags_have_bf16():
            env["MALLOC_MMAP_THRESHOLD_"] = env["MALLOC_TRIM_THRESHOLD_"] = str(DEFAULT_THRESHOLD)
            env[RAISED_BY_US] = "1"  # a conversion's child process sets its own (openvino_backend)
        return env
    lib = jemalloc_library()
    if lib is None:
        return env
    if lib not in env.get("LD_PRELOAD", "").split(":"):
        env["LD_PRELOAD"] = ":".join(p for p in (lib, env.get("LD_PRELOAD", "")) if p)
    env.setdefault("MALLOC_CONF", JEMALLOC_CONF)
    return env


def reexec_with_allocator(openvino: bool = False, converted: bool = False) -> None:
    """Replace this process by itself on jemalloc (once: the new process finds it loaded),
    when :func:`allocator_env` changes anything. For the command line's entry point only:
    it must run before anything else was done."""
    import sys

    env = allocator_env(openvino=openvino, converted=converted)
    changed = any(env.get(k) != os.environ.get(k) for k in ("LD_PRELOAD", "MALLOC_MMAP_THRESHOLD_"))
    if changed and not os.environ.get(REEXEC_MARK):
        env[REEXEC_MARK] = "1"
        argv = list(getattr(sys, "orig_argv", []) or [sys.executable, *sys.argv])
        try:
            os.execve(sys.executable, [sys.executable, *argv[1:]], env)
        except OSError:
            pass  # keep running on the system allocator
    # Without jemalloc and OpenVINO the C library's allocator stays as it is: on a CPU with
    # native bfloat16 raising glibc's thresholds cut the page faults but cost half as much
    # peak memory again for no measured gain in time (benchmarks/README.md, session 4).


def _glibc():
    """The C library through ctypes where it is glibc (mallopt, malloc_trim), else None."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def configure_allocator(threshold: int = DEFAULT_THRESHOLD) -> bool:
    """Set glibc's mmap and trim thresholds to ``threshold`` bytes (once per process).

    Returns True when the thresholds were set; False where there is nothing to do (not
    glibc, or the user's environment already sets them)."""
    global _configured
    if _configured is not None:
        return _configured == threshold
    libc = _glibc()
    if libc is None:
        return False
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") or os.environ.get("MALLOC_TRIM_THRESHOLD_"):
        return False
    try:
        ok = all(libc.mallopt(param, int(threshold)) == 1 for param in (_M_MMAP_THRESHOLD, _M_TRIM_THRESHOLD))
    except AttributeError:
        ok = False
    if ok:
        _configured = int(threshold)
    else:
        log.debug("mallopt is not available here; the allocator keeps its defaults")
    return ok


#: bytes: the mmap threshold glibc's dynamic rule reaches once buffers of 32 MiB or more were freed
#: (its ceiling on 64-bit systems; the trim threshold then follows at twice that)
GLIBC_DYNAMIC_CEILING = 32 << 20


def lower_raised_thresholds() -> bool:
    """Where this process runs under the thresholds :func:`allocator_env` raised (not the
    user's), set glibc's mmap and trim thresholds to where glibc's own dynamic rule takes them
    (:data:`GLIBC_DYNAMIC_CEILING`, twice that) for the rest of its life; returns whether it
    did. For a run that converted for OpenVINO midway (``Segmenter._convert_in_run``): the
    raised thresholds keep buffers for PyTorch's next window, OpenVINO's windows reuse none
    of them (feature size 48 without bfloat16, the engine on OpenVINO's windows after a
    conversion midway: 2,276 MB sampled under them, 2,221 MB peak after; benchmarks/README.md,
    session 12).
    glibc's dynamic rule cannot be switched back on once set, hence its ceiling."""
    if not os.environ.get(RAISED_BY_US):
        return False
    libc = _glibc()
    if libc is None:
        return False
    try:
        ok = (libc.mallopt(_M_MMAP_THRESHOLD, GLIBC_DYNAMIC_CEILING) == 1
              and libc.mallopt(_M_TRIM_THRESHOLD, 2 * GLIBC_DYNAMIC_CEILING) == 1)
    except AttributeError:
        return False
    return ok


def release_free_memory() -> bool:
    """Give the C heap's free memory back to the system now (glibc's ``malloc_trim(0)``);
    returns whether it could. With the thresholds raised (:func:`allocator_env`) glibc keeps
    what PyTorch frees for reuse, which is the point while PyTorch runs windows; once a run
    leaves PyTorch for a conversion (``Segmenter._convert_in_run``) those buffers are not
    reused in the same sizes, and without this they stay resident beside OpenVINO's. No library
    exposes malloc_trim, hence ctypes."""
    libc = _glibc()
    if libc is None:
        return False
    try:
        libc.malloc_trim(0)
    except AttributeError:
        return False
    return True


_MADV_DONTNEED = 4  # Linux's madvise advice (asm-generic/mman-common.h)


def release_mapped_files(folder) -> int:
    """Drop from this process's resident memory the pages of the read-only shared mappings of
    files under ``folder``; returns the bytes of the mappings advised (0 where there is
    nothing to do, or not on Linux).

    OpenVINO maps a converted network's file (the IR's weights, or its compiled blob) whole and
    reads it through while compiling; afterwards the compiled model uses a third of those pages
    (it runs on its own repacked copy of most weights), but the ones compiling touched stay
    counted in the process's resident memory (benchmarks/README.md, session 11). ``madvise``
    with ``MADV_DONTNEED`` unmaps them from this process: a page the network reads again is
    mapped back from the file (the page cache, then the disk). Only shared read-only mappings
    (``r--s`` in /proc/self/maps) are touched: their pages can never hold data of their own, so
    nothing can be lost (a private mapping may hold copied-on-write pages). No library exposes
    madvise on another library's mappings, hence ctypes."""
    if platform.system() != "Linux":
        return 0
    libc = _glibc()
    if libc is None:
        return 0
    root = os.path.realpath(os.fspath(folder)).rstrip(os.sep) + os.sep
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return 0
    advised = 0
    madvise = libc.madvise
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    for line in lines:
        fields = line.split(maxsplit=5)
        if len(fields) < 6 or fields[1] != "r--s" or not fields[5].startswith(root):
            continue
        start, end = (int(x, 16) for x in fields[0].split("-"))
        if madvise(start, end - start, _MADV_DONTNEED) == 0:
            advised += end - start
    return advised
