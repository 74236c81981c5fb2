"""The one atomic writer: every file this package writes goes to a temporary file beside its
target and is renamed into place only when complete.
"""

from __future__ import annotations
import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator


# --------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------
@contextlib.contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``target`` with the same suffixes; rename it into
    place when the block completes, delete it if the block fails."""
    target = Path(target)
    name = target.name
    suffix = next((s for s in (".seg.nrrd", ".nii.gz") if name.lower().endswith(s)), target.suffix)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=f".part{suffix}", dir=str(target.parent))
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, target)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp_path.unlink()
        raise
