"""What the slicer-core tests share (no tests here): Slicer's own MRML classes from the
slicer-core wheel (Kitware, on PyPI) with a scene set up the way Slicer's application sets
it up for the module (``slicer.mrmlScene``, ``slicer.modules.segmentations.logic()``, the
subject hierarchy and colour logics), and the grids every geometry test runs on.

``pytest.importorskip`` skips a test module with the reason where the wheel is not installed
(``pip install -e '.[slicer-test]'``, pinned in constraints.txt).
"""

from __future__ import annotations

import contextlib
import gc
import sys
import types
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULE_DIR = ROOT / "SwinUNETRSegment"
if str(MODULE_DIR) not in sys.path:
    sys.path.insert(0, str(MODULE_DIR))  # the Slicer glue package sits beside the module file

SKIP_REASON = "slicer-core (Slicer's MRML as a wheel) is not installed: pip install -e '.[slicer-test]'"


def import_slicer():
    """Slicer-core's ``slicer`` package, or skip the calling test module with the reason."""
    slicer = pytest.importorskip("slicer", reason=SKIP_REASON)
    if not hasattr(slicer, "vtkMRMLScene") or not hasattr(slicer, "util"):
        pytest.skip(f"the 'slicer' package here is not slicer-core's: {SKIP_REASON}", allow_module_level=True)
    import slicer.util  # noqa: F401

    return slicer


def mrml_scene():
    """A fresh MRML scene as ``slicer.mrmlScene``, with the logics the module relies on (a
    generator: each test module makes it its ``scene`` fixture with ``yield from``)."""
    slicer = import_slicer()
    mrml = slicer.vtkMRMLScene()
    segmentations = slicer.vtkSlicerSegmentationsModuleLogic()
    segmentations.SetMRMLScene(mrml)
    subjectHierarchy = slicer.vtkSlicerSubjectHierarchyModuleLogic()
    subjectHierarchy.SetMRMLScene(mrml)
    colors = slicer.vtkMRMLColorLogic()
    colors.SetMRMLScene(mrml)
    volumes = slicer.vtkSlicerVolumesLogic()
    volumes.SetMRMLScene(mrml)
    saved = {name: getattr(slicer, name, None) for name in ("mrmlScene", "modules")}
    slicer.mrmlScene = mrml
    slicer.modules = types.SimpleNamespace(
        segmentations=types.SimpleNamespace(logic=lambda: segmentations),
        volumes=types.SimpleNamespace(logic=lambda: volumes),
    )
    try:
        yield mrml
    finally:
        mrml.Clear(1)
        for name, value in saved.items():
            if value is None:
                delattr(slicer, name)
            else:
                setattr(slicer, name, value)


def rotation(axis, degrees: float) -> np.ndarray:
    """3x3 rotation about ``axis`` (Rodrigues)."""
    a = np.asarray(axis, float) / np.linalg.norm(axis)
    t = np.radians(degrees)
    k = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    return np.eye(3) + np.sin(t) * k + (1 - np.cos(t)) * k @ k


def grid(direction: np.ndarray, spacing, origin) -> np.ndarray:
    """IJK-to-RAS of a grid with these axis directions (columns), voxel size and origin."""
    m = np.eye(4)
    m[:3, :3] = np.asarray(direction, float) * np.asarray(spacing, float)[None, :]
    m[:3, 3] = origin
    return m


#: Grids every MRML test runs on: the ways an axis or orientation mix-up would show.
GRIDS = {
    "oblique": grid(rotation((1, 2, 3), 27), (1.5, 1.2, 2.5), (-20.0, 15.0, 40.0)),
    "flipped": grid(np.diag([-1.0, -1.0, 1.0]) @ rotation((0, 0, 1), 90), (0.8, 0.8, 3.0), (100.0, 80.0, -50.0)),
    "anisotropic": grid(np.eye(3), (0.7, 0.7, 5.0), (0.0, 0.0, 0.0)),
}


def add_transform(slicer, matrix: np.ndarray, name: str = "moved"):
    """A linear transform node (to parent) in the current scene."""
    node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLinearTransformNode", name)
    node.SetMatrixTransformToParent(slicer.util.vtkMatrixFromArray(matrix))
    return node


@contextlib.contextmanager
def frozen_gc():
    """Objects alive now are left out of the cyclic garbage collector while ticks are measured:
    a full collection of a test process's heap (pytest, VTK, torch) takes about 100 ms whatever
    code runs, and says nothing about whether a tick waits."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
