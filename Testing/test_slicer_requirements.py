"""What the module installs into Slicer's Python (Resources/requirements.txt): only what the
engine process needs beside torch, none of it a package Slicer 5.10 ships, installed with
every Slicer package pinned; and the engine process, with exactly Slicer's packages, torch
and these requirements (with their own dependencies), serves and segments."""

from __future__ import annotations

import importlib.metadata
import re

import pytest
from test_slicer_imports import run_restricted, slicer_distributions
from test_slicer_support import MODULE_DIR

from SwinUNETRSegmentLib.requirements import plan_install, read_requirements
from SwinUNETRSegmentSlicer.packages import canonical, replaces_slicer_package, slicer_constraints

REQUIREMENTS = MODULE_DIR / "Resources" / "requirements.txt"


def test_requirements_are_exact_pins_of_packages_slicer_does_not_ship():
    lines = read_requirements(REQUIREMENTS)
    assert lines and all(re.fullmatch(r"[A-Za-z0-9_.-]+==[0-9][0-9A-Za-z.]*", line) for line in lines), lines
    assert replaces_slicer_package(lines) == []
    names = {canonical(line.split("==")[0]) for line in lines}
    assert not names & slicer_distributions(), names & slicer_distributions()
    # what the audit found there: neither side needs these (nibabel stays: MONAI's Orientation needs it)
    assert not names & {"pydicom", "tqdm", "platformdirs", "torch", "numpy", "simpleitk"}


def test_a_requirement_naming_a_slicer_package_is_refused():
    assert replaces_slicer_package(["pydicom==3.0.2", "monai==1.6.1", "Pillow>=12", "torch==2.1"]) == [
        "pydicom==3.0.2", "Pillow>=12", "torch==2.1"]


def test_pip_gets_every_slicer_package_pinned_as_installed():
    installed = {"pydicom": "2.4.4", "numpy": "2.0.2", "requests": "2.32.3", "torch": "2.9.0+cu128",
                 "typing_extensions": "4.14.0"}
    pins = slicer_constraints(lambda name: installed.get(name))
    assert {"pydicom==2.4.4", "numpy==2.0.2", "requests==2.32.3", "torch==2.9.0+cu128",
            "typing_extensions==4.14.0"} == set(pins)


def test_first_use_plans_torch_then_the_requirements():
    plan = plan_install(read_requirements(REQUIREMENTS), lambda name: {"numpy": "2.0.2"}.get(name.lower()))
    assert plan.torch == "PyTorch is not installed"
    assert set(plan.packages) == set(read_requirements(REQUIREMENTS))


def dependency_closure(names) -> set[str]:
    """The distributions ``names`` need here, themselves included (from installed metadata)."""
    from packaging.requirements import Requirement

    seen, todo = set(), [canonical(n) for n in names]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        for line in requires:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(canonical(req.name))
    return seen


ENGINE = r'''
import numpy as np
from SwinUNETRSegmentLib.service import jobs, server
jobs.import_engine()
import uvicorn  # what swinunetr-segment serve runs the app with
from SwinUNETRSegmentLib.geometry import Volume
from SwinUNETRSegmentLib.models.catalog import resolve_model
from SwinUNETRSegmentLib.inference.engine import Segmenter
card, weights = resolve_model("demo")
volume = Volume(np.full((24, 24, 16), -100, np.int16), np.diag([3.0, 3.0, 3.0, 1.0]))
result = Segmenter(card, weights, device="cpu").segment(volume)
RESULT = {"shape": list(result.labels.shape), "imported": sorted({m.split(".")[0] for m in sys.modules})}
'''


@pytest.mark.slow  # about 20 s: the engine imports torch and MONAI and runs the demo model once
def test_the_engine_runs_with_slicer_s_packages_torch_and_the_requirements_only(tmp_path):
    pytest.importorskip("monai")
    requirements = [line.split("==")[0] for line in read_requirements(REQUIREMENTS)]
    allowed = slicer_distributions() | dependency_closure(["torch"]) | dependency_closure(requirements)
    out = run_restricted(ENGINE, tmp_path, allowed)
    ours = [(name, where) for name, where in out["refused"] if where.startswith(str(MODULE_DIR))]
    assert ours == [], ours
    assert out["shape"] == [24, 24, 16]
    imported = {canonical(m) for m in out["imported"]}
    for name in requirements:  # each one is needed: the engine imports it
        module = {"pynrrd": "nrrd"}.get(name, name)
        assert canonical(module) in imported, f"{name} is listed but the engine does not import it"
