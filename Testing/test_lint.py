"""The code passes the linter configured in pyproject.toml (ruff: pyflakes, pycodestyle with
lines of at most 120 characters, import order, bugbear)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_ruff_passes():
    pytest.importorskip("ruff", reason="ruff is in the test extra (./dev installs it)")
    out = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", str(REPO)], capture_output=True,
                         text=True, cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
