"""Shared fixtures: small model cards, synthetic grids, and the real example CT.

The real CT comes from the totalsegmentator 2.18.0 source archive (Apache-2.0), fetched
with pip into a cache once (``SWINUNETR_TEST_CACHE``, default: the demo's sample-data cache);
tests that need it skip with the reason when the package registry cannot be reached.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import pytest

from SwinUNETRSegmentLib.geometry import Volume
from SwinUNETRSegmentLib.models import cards


@pytest.fixture(scope="session", autouse=True)
def _own_catalog_home(tmp_path_factory):
    """The tests never write into the user's catalog (installed models, OpenVINO conversions):
    SWINUNETR_SEGMENT_HOME is a folder of the session's own unless the caller set one; tests
    that need another set theirs."""
    if os.environ.get("SWINUNETR_SEGMENT_HOME"):
        yield
        return
    os.environ["SWINUNETR_SEGMENT_HOME"] = str(tmp_path_factory.mktemp("catalog-home"))
    try:
        yield
    finally:
        os.environ.pop("SWINUNETR_SEGMENT_HOME", None)


def tiny_card(**overrides) -> cards.ModelCard:
    """The btcv card made small enough for a 2-core CI: feature_size 12, 6 mm voxels, one 64^3 window;
    no post-processing (tests of the clean-up ask for it)."""
    base = cards.load_card("btcv")
    card = dataclasses.replace(
        base,
        name="btcv-tiny-test",
        network_args={**base.network_args, "feature_size": 12},
        spacing=(6.0, 6.0, 6.0),
        roi_size=(64, 64, 64),
        overlap=0.25,
        sw_batch_size=1,
        source="tiny test card",
        postprocessing={},
    )
    return dataclasses.replace(card, **overrides)


@pytest.fixture(scope="session")
def tiny_card_file(tmp_path_factory) -> Path:
    import json

    path = tmp_path_factory.mktemp("card") / "tiny.json"
    path.write_text(json.dumps(tiny_card().to_json()))
    return path


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """Seeded random weights for the tiny card (what matters here is geometry, not accuracy)."""
    import torch

    from SwinUNETRSegmentLib.models.networks import build_network

    torch.manual_seed(0)
    net = build_network(tiny_card())
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    torch.save(net.state_dict(), path)
    return path


def rotation(ax: float, ay: float, az: float) -> np.ndarray:
    """Rotation matrix from angles (radians) about x, y, z."""
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def make_affine(spacing, direction=((1, 0, 0), (0, 1, 0), (0, 0, 1)), origin=(0.0, 0.0, 0.0)) -> np.ndarray:
    m = np.eye(4)
    m[:3, :3] = np.asarray(direction, float) * np.asarray(spacing, float)[None, :]
    m[:3, 3] = origin
    return m


#: Grids every path is tested on: (name, spacing, direction, origin). Directions are RAS.
GRIDS = [
    ("ras-iso", (2.0, 2.0, 2.0), np.eye(3), (-40.0, -30.0, 10.0)),
    ("anisotropic", (0.7, 1.3, 3.1), np.eye(3), (12.5, -7.25, -100.0)),
    ("flipped-lps", (1.5, 1.5, 2.5), np.diag([-1.0, -1.0, 1.0]), (60.0, 45.0, -20.0)),
    ("flipped-all", (1.2, 0.9, 2.0), np.diag([-1.0, 1.0, -1.0]), (30.0, -20.0, 80.0)),
    ("permuted-non-ras", (2.5, 1.0, 1.5), np.array([[0.0, 0, 1], [1, 0, 0], [0, -1, 0]]), (5.0, 6.0, 7.0)),
    ("oblique", (1.1, 1.7, 2.3), rotation(0.3, -0.2, 0.5), (-33.3, 21.7, 4.2)),
    ("oblique-flipped", (2.0, 1.0, 1.25), rotation(-0.4, 0.25, 1.1) @ np.diag([1.0, -1.0, 1.0]), (0.5, -0.25, 0.125)),
]


def grid_volume(spacing, direction, origin, shape=(23, 19, 17), seed=0, dtype=np.int16) -> Volume:
    rng = np.random.default_rng(seed)
    arr = rng.integers(-1000, 1500, size=shape).astype(dtype)
    return Volume(arr, make_affine(spacing, direction, origin))


def _cache_dir() -> Path:
    """The demo's sample-data cache (so CI downloads the archive once), unless SWINUNETR_TEST_CACHE is set."""
    from SwinUNETRSegmentLib.fileio.sampledata import cache_dir

    return Path(os.environ.get("SWINUNETR_TEST_CACHE") or cache_dir())


@pytest.fixture(scope="session")
def reference_files() -> Path:
    """tests/reference_files of the totalsegmentator source archive (real CT), fetched once."""
    from SwinUNETRSegmentLib.errors import UserError
    from SwinUNETRSegmentLib.fileio.sampledata import reference_files as fetch

    try:
        return fetch(_cache_dir())
    except UserError as exc:
        pytest.skip(f"real example CT unavailable: {exc}")
