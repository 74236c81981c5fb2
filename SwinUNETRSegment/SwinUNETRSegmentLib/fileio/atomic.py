"""The one atomic writer, and the one file hasher.

Every file this package writes (segmentations, label tables, previews, checkpoints,
training records, model cards) goes to a temporary file beside its target and is renamed
into place only when complete, so an interrupted or failed write leaves no partial file.
The finished file gets the mode a plain ``open(path, "w")`` would give it (``0o666`` less
the user's umask): ``tempfile.mkstemp`` creates its file with mode 0600, which
``os.replace`` would otherwise carry into place, and colleagues could not read a
segmentation written into a shared folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
import threading
from pathlib import Path
from typing import Any, Iterator

__all__ = ["atomic_path", "atomic_write_bytes", "atomic_write_text", "atomic_torch_save", "file_digest", "umask",
           "DOUBLE_SUFFIXES"]

#: suffixes kept whole on the temporary file, so that writers that pick a format from the
#: name (nibabel, SimpleITK, slicerio) see the target's format
DOUBLE_SUFFIXES = (".seg.nrrd", ".nii.gz")

_UMASK_LOCK = threading.Lock()


def umask() -> int:
    """The process's umask, read without changing it where the OS tells it (Linux), else
    by setting and restoring it under a lock."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``target`` with the same suffixes; when the block
    completes, give it the umask's mode and rename it into place; delete it if the block
    fails (also on KeyboardInterrupt)."""
    target = Path(target)
    name = target.name
    suffix = next((s for s in DOUBLE_SUFFIXES if name.lower().endswith(s)), target.suffix)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=f".part{suffix}", dir=str(target.parent))
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~umask())
        os.replace(tmp_path, target)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp_path.unlink()
        raise


def atomic_write_bytes(target: str | Path, data: bytes) -> Path:
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)
    return Path(target)


def atomic_write_text(target: str | Path, text: str) -> Path:
    return atomic_write_bytes(target, text.encode("utf-8"))


def atomic_torch_save(obj: Any, target: str | Path) -> Path:
    """``torch.save`` through :func:`atomic_path` (a checkpoint is never half written)."""
    import torch

    with atomic_path(target) as tmp:
        torch.save(obj, tmp)
    return Path(target)


def file_digest(path: str | Path, algo: str = "sha256", chunk: int = 1 << 20) -> str:
    """Hex digest of a file, or of a folder's files (sorted by relative path, contents
    concatenated: a DICOM series folder), read in chunks."""
    p = Path(path)
    h = hashlib.new(algo)
    files = sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else [p]
    for q in files:
        with open(q, "rb") as f:
            for block in iter(lambda: f.read(chunk), b""):
                h.update(block)
    return h.hexdigest()
