"""The engine process's allocator (inference/memory.py): jemalloc where installed, glibc's
thresholds raised otherwise, the system's when the user says so."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from SwinUNETRSegmentLib.inference import memory

PROBE = ("from SwinUNETRSegmentLib.inference.memory import reexec_with_allocator; reexec_with_allocator(); "
         "maps = open('/proc/self/maps').read(); print('jemalloc' in maps)")


def _probe(**env) -> str:
    drop = ("LD_PRELOAD", "MALLOC_CONF", "_SWINUNETR_SEGMENT_REEXEC")
    run_env = {k: v for k, v in os.environ.items() if k not in drop}
    run_env.update(env)
    out = subprocess.run([sys.executable, "-c", PROBE], env=run_env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


@pytest.mark.skipif(memory.jemalloc_library() is None, reason="libjemalloc2 is not installed here")
def test_the_engine_process_runs_on_jemalloc_when_installed():
    assert _probe() == "True"
    env = memory.allocator_env({})
    assert memory.jemalloc_library() in env["LD_PRELOAD"] and env["MALLOC_CONF"] == memory.JEMALLOC_CONF


@pytest.mark.skipif(platform.system() != "Linux", reason="/proc/self/maps is Linux's")
def test_the_user_can_keep_the_system_allocator():
    assert _probe(SWINUNETR_SEGMENT_ALLOCATOR="system") == "False"
    assert "LD_PRELOAD" not in memory.allocator_env({"SWINUNETR_SEGMENT_ALLOCATOR": "system"})


def test_glibc_thresholds_are_set_once_or_left_to_the_user(monkeypatch):
    monkeypatch.setattr(memory, "_configured", None)
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert memory.configure_allocator() is False  # the user's setting stands
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_")
    expected = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
    assert memory.configure_allocator() is expected
    assert memory.configure_allocator() is expected  # once per process, the same answer


FREED = ("import sys; from SwinUNETRSegmentLib.inference import memory; lowered = memory.lower_raised_thresholds(); "
         "rss = lambda: next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmRSS')) // 1024; "
         "before = rss(); b = bytearray(200 << 20); b[::4096] = b'x' * len(b[::4096]); del b; "
         "print(lowered, rss() - before)")


def _freed(**env) -> tuple[str, int]:
    run_env = {k: v for k, v in os.environ.items()
               if k not in ("LD_PRELOAD", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", memory.RAISED_BY_US)}
    run_env.update(env)
    out = subprocess.run([sys.executable, "-c", FREED], env=run_env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lowered, kept_mb = out.stdout.split()
    return lowered, int(kept_mb)


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's tunables")
def test_a_run_that_converted_midway_hands_freed_buffers_back_again():
    """After a first run's conversion, OpenVINO's windows run on glibc's usual thresholds: a
    freed 200 MB buffer leaves the process, where under the raised thresholds it stayed; the
    user's own thresholds are never changed."""
    raised = memory.allocator_env({}, openvino=True, converted=False)
    if memory.RAISED_BY_US not in raised:  # a CPU with native bfloat16: raise them as a CPU without would
        raised = {"MALLOC_MMAP_THRESHOLD_": str(memory.DEFAULT_THRESHOLD),
                  "MALLOC_TRIM_THRESHOLD_": str(memory.DEFAULT_THRESHOLD), memory.RAISED_BY_US: "1"}
    lowered, kept = _freed(**raised)
    assert lowered == "True" and kept < 50
    users = {k: v for k, v in raised.items() if k != memory.RAISED_BY_US}
    lowered, kept = _freed(**users)
    assert lowered == "False" and kept > 150  # what the raised thresholds do: kept for the next window


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's tunables")
def test_a_process_that_may_run_openvino_keeps_glibc_with_its_thresholds_raised(monkeypatch):
    """OpenVINO aborts under jemalloc: its process stays on glibc; without native bfloat16
    (PyTorch windows until a conversion pays) with the thresholds that stop the page-fault
    churn; the user's own settings stand."""
    from SwinUNETRSegmentLib.inference import devices

    monkeypatch.setattr(devices, "cpu_flags_have_bf16", lambda: True)
    assert memory.allocator_env({}, openvino=True) == {}  # OpenVINO's own windows: glibc as it is
    monkeypatch.setattr(devices, "cpu_flags_have_bf16", lambda: False)
    env = memory.allocator_env({}, openvino=True)
    assert "LD_PRELOAD" not in env
    assert env["MALLOC_MMAP_THRESHOLD_"] == env["MALLOC_TRIM_THRESHOLD_"] == str(memory.DEFAULT_THRESHOLD)
    # a run on a cached conversion from its first window has no PyTorch window to speed up
    assert memory.allocator_env({}, openvino=True, converted=True) == {}
    mine = memory.allocator_env({"MALLOC_TRIM_THRESHOLD_": "4096"}, openvino=True)
    assert mine["MALLOC_TRIM_THRESHOLD_"] == "4096" and "MALLOC_MMAP_THRESHOLD_" not in mine
    assert "MALLOC_MMAP_THRESHOLD_" not in memory.allocator_env({"SWINUNETR_SEGMENT_ALLOCATOR": "system"},
                                                                openvino=True)
    probe = ("from SwinUNETRSegmentLib.inference.memory import reexec_with_allocator; "
             "reexec_with_allocator(openvino=True); import os; maps = open('/proc/self/maps').read(); "
             "print('jemalloc' in maps, os.environ.get('MALLOC_TRIM_THRESHOLD_'))")
    drop = ("LD_PRELOAD", "MALLOC_CONF", "_SWINUNETR_SEGMENT_REEXEC",
            "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")
    run_env = {k: v for k, v in os.environ.items() if k not in drop}
    run_env["ATEN_CPU_CAPABILITY"] = "avx2"  # PyTorch without bfloat16, whatever this CPU has
    out = subprocess.run([sys.executable, "-c", probe], env=run_env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", str(memory.DEFAULT_THRESHOLD)]


def test_the_process_the_command_line_re_executed_does_not_choose_its_allocator_again(monkeypatch):
    """The re-executed process (the allocator chosen, the marker set) goes straight to the
    command: it does not parse the command line or hash the checkpoint a second time."""
    import SwinUNETRSegmentLib.cli as cli

    def must_not_run(argv):
        raise AssertionError("the allocator was chosen again in the re-executed process")

    monkeypatch.setattr(cli, "runs_on_a_conversion", must_not_run)
    monkeypatch.setattr(cli, "runs_on_openvino", must_not_run)
    monkeypatch.setattr(cli, "main", lambda: 0)
    monkeypatch.setattr(memory, "reexec_with_allocator", must_not_run)
    monkeypatch.setenv(memory.REEXEC_MARK, "1")
    assert cli.entry() == 0
    monkeypatch.delenv(memory.REEXEC_MARK)
    with pytest.raises(AssertionError, match="chosen again"):
        cli.entry()  # a fresh process does choose (the guard is the marker, not a constant)


def _resident_kb(path) -> int:
    """Resident kB of this process's mappings of ``path`` (/proc/self/smaps)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()
            if "-" in head[0] and len(head) >= 5 and not head[0].endswith(":"):
                inside = line.rstrip("\n").endswith(str(path))
            elif inside and head[0] == "Rss:":
                total += int(head[1])
    return total


@pytest.mark.skipif(platform.system() != "Linux", reason="madvise and /proc/self/smaps are Linux's")
def test_file_pages_read_through_are_handed_back_and_read_again_unchanged(tmp_path):
    """What OpenVINO does with a converted network's file: maps it shared and read-only and
    reads it through. Its pages leave the process's resident memory and come back, the same
    bytes, when read again; a writable or private mapping, and a file elsewhere, are left alone."""
    import mmap

    import numpy as np

    cache, elsewhere = tmp_path / "openvino", tmp_path / "other"
    cache.mkdir()
    elsewhere.mkdir()
    data = np.random.default_rng(0).integers(0, 255, 8 << 20, dtype=np.uint8).tobytes()
    blob, other = cache / "model.blob", elsewhere / "model.blob"
    for p in (blob, other):
        p.write_bytes(data)
    with open(blob, "rb") as f, open(other, "rb") as g, open(blob, "r+b") as h:
        shared = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)  # r--s: OpenVINO's way
        private = mmap.mmap(h.fileno(), 0, flags=mmap.MAP_PRIVATE)  # rw-p: may hold pages of its own
        outside = mmap.mmap(g.fileno(), 0, prot=mmap.PROT_READ)
        private[:4] = b"mine"
        for m in (shared, private, outside):
            assert m[:] is not None  # read through: every page resident
        before = _resident_kb(blob)
        assert before >= 2 * (8 << 10) - 64 and _resident_kb(other) >= (8 << 10) - 64
        assert memory.release_mapped_files(cache) == len(data)  # only the shared read-only mapping
        assert _resident_kb(blob) <= before - (8 << 10) + 64  # its 8 MB left; the private copy stayed
        assert _resident_kb(other) >= (8 << 10) - 64  # a file outside the folder: untouched
        assert shared[:] == data and private[:4] == b"mine" and private[4:] == data[4:]
        for m in (shared, private, outside):
            m.close()
