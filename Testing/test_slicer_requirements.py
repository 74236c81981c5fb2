"""What the module installs into Slicer's Python (Resources/requirements.txt): only what the
engine process needs beside torch, none of it a package Slicer 5.10 ships, installed with
every Slicer package pinned, and each one installable beside Slicer 5.10's versions; every
third-party module the engine process (`serve`) imports, read from its import statements,
comes with Slicer, with torch or with these requirements; and the engine process, with
exactly Slicer's packages, torch and these requirements (with their own dependencies),
serves and segments."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys

import pytest
from test_slicer_imports import SLICER_LIST, run_restricted, slicer_distributions
from test_slicer_support import MODULE_DIR, ROOT

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
        module = {"pynrrd": "nrrd", "connected-components-3d": "cc3d"}.get(name, name)
        assert canonical(module) in imported, f"{name} is listed but the engine does not import it"



# ---- installable beside Slicer 5.10's own versions ---------------------------------------------
#: The versions Slicer 5.10.0 pins (../shared/data/slicer-5.10-python.txt; checked against it when there).
SLICER_PINS = {
    "SimpleITK": "2.5.2", "Deprecated": "1.2.18", "GitPython": "3.1.44", "PyGithub": "2.6.1", "PyJWT": "2.10.1",
    "PyNaCl": "1.5.0", "certifi": "2025.4.26", "cffi": "1.17.1", "chardet": "5.2.0", "charset-normalizer": "3.4.2",
    "couchdb": "1.2", "cryptography": "45.0.3", "dicomweb-client": "0.60.0", "gitdb": "4.0.12", "idna": "3.10",
    "numpy": "2.0.2", "packaging": "25.0", "pillow": "11.2.1", "pip": "25.1.1", "pycparser": "2.22",
    "pydicom": "2.4.4", "pyparsing": "3.2.3", "python-dateutil": "2.9.0.post0", "requests": "2.32.3",
    "retrying": "1.3.4", "scipy": "1.13.1", "setuptools": "80.9.0", "six": "1.17.0", "smmap": "5.0.2",
    "typing_extensions": "4.14.0", "urllib3": "2.4.0", "wheel": "0.45.1", "wrapt": "1.17.2",
}
#: environment markers as Slicer 5.10's Python (3.12.10) evaluates them
SLICER_PYTHON = {"python_version": "3.12", "python_full_version": "3.12.10", "extra": ""}


def test_the_pins_are_slicer_5_10_s():
    if not SLICER_LIST.is_file():
        pytest.skip(f"{SLICER_LIST} is not beside this checkout")
    listed = {}
    for line in SLICER_LIST.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line and not line.startswith("python=="):
            name, version = line.split("==")
            listed[canonical(name)] = version.strip()
    assert {canonical(n): v for n, v in SLICER_PINS.items()} == listed


def requires_of(pin: str) -> list[str]:
    """The requirements ``name==version`` declares (its installed metadata; skips when another version is here)."""
    name, version = pin.split("==")
    try:
        here = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        pytest.skip(f"{name} is not installed here (./dev setup installs it)")
    if here != version:
        pytest.skip(f"{name} {here} is installed here, not {version}: its metadata would be another version's")
    return importlib.metadata.requires(name) or []


def applies(req) -> bool:
    return req.marker is None or req.marker.evaluate(SLICER_PYTHON)


def slicer_conflicts(pins) -> list[str]:
    """One line per dependency of a pinned distribution on a package Slicer ships that
    Slicer 5.10's version does not satisfy (pip, which runs with those pinned, cannot install it)."""
    from packaging.requirements import Requirement

    shipped = {canonical(n): (n, v) for n, v in SLICER_PINS.items()}
    out = []
    for pin in pins:
        for text in requires_of(pin):
            req = Requirement(text)
            name, version = shipped.get(canonical(req.name), (None, None))
            if name and applies(req) and not req.specifier.contains(version, prereleases=True):
                out.append(f"{pin.replace('==', ' ')} needs {req.name}{req.specifier}; Slicer 5.10 ships "
                           f"{name} {version}")
    return out


def test_every_requirement_installs_beside_slicer_s_pinned_packages():
    assert slicer_conflicts(read_requirements(REQUIREMENTS)) == []


def test_highdicom_cannot_be_installed_into_slicer_5_10_s_python():
    """Why highdicom and pyjpegls (the engine's DICOM SEG output) are not in the requirements:
    highdicom 0.23 and later need pydicom 3, and pip runs with Slicer's pydicom 2.4.4 pinned
    (replacing it would break Slicer's DICOM module); the last highdicom that takes pydicom 2
    (0.22) has no highdicom.Volume, which fileio/dicomseg.py writes with."""
    assert slicer_conflicts([constraint("highdicom")]) == [
        f"{constraint('highdicom').replace('==', ' ')} needs pydicom>=3.0.1; Slicer 5.10 ships pydicom 2.4.4"]


def constraint(name: str) -> str:
    """``name==version`` as ./dev pins it (constraints.txt)."""
    for line in (ROOT / "constraints.txt").read_text(encoding="utf-8").splitlines():
        if canonical(line.split("==")[0]) == canonical(name):
            return line.strip()
    raise AssertionError(f"{name} is not in constraints.txt")


# ---- what the engine process imports --------------------------------------------------------------
#: The engine process runs ``python -c "...cli import main..." serve ...`` (service/local.py): the
#: dispatcher's other commands (function-level imports of cli.app) never run there.
ENGINE_ENTRY = "SwinUNETRSegmentLib.cli.serve"
DISPATCHER = {"SwinUNETRSegmentLib.cli", "SwinUNETRSegmentLib.cli.app"}
LIB = MODULE_DIR / "SwinUNETRSegmentLib"
#: the engine's third-party imports that Slicer 5.10's Python cannot have, and why (see the test above)
NOT_IN_SLICER = {"highdicom": "DICOM SEG (fileio/dicomseg.py) needs highdicom with pydicom 3"}


def module_file(name: str):
    path = MODULE_DIR.joinpath(*name.split("."))
    for candidate in (path / "__init__.py", path.with_suffix(".py")):
        if candidate.is_file():
            return candidate
    return None


def probing(node, parents) -> bool:
    """Whether an import sits in a ``try`` that catches ImportError or in ``contextlib.suppress``."""
    catches = {"ImportError", "ModuleNotFoundError", "Exception", "BaseException"}
    child = node
    for parent in parents:
        if isinstance(parent, ast.Try) and child in parent.body:
            for handler in parent.handlers:
                kinds = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
                if handler.type is None or any(getattr(k, "id", getattr(k, "attr", None)) in catches for k in kinds):
                    return True
        if isinstance(parent, ast.With) and any(
                isinstance(i.context_expr, ast.Call) and "suppress" in ast.unparse(i.context_expr.func)
                for i in parent.items):
            return True
        child = parent
    return False


def imports_of(name: str, top_level_only: bool):
    """(imported module, probed) of each import statement of module ``name``."""
    path = module_file(name)
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    stack = [(node, ()) for node in tree.body]
    while stack:
        node, parents = stack.pop()
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, probing(node, parents)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([node.module] if node.module else []))
            yield base, probing(node, parents)
            for alias in node.names:
                yield f"{base}.{alias.name}", probing(node, parents)
        if not top_level_only or isinstance(node, (ast.If, ast.Try)):
            stack += [(child, (node, *parents)) for child in ast.iter_child_nodes(node)]


def engine_imports() -> dict[str, dict[str, bool]]:
    """{third-party top-level module: {engine module importing it: whether it probes for it}},
    following every import of the modules `serve` reaches (function-level ones too). A module
    that probes for a package (an import in a ``try`` or ``suppress``) uses it only when there."""
    seen, todo, found = set(), [ENGINE_ENTRY], {}
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        for target, probed in imports_of(name, name in DISPATCHER):
            top = target.split(".")[0]
            if top == "SwinUNETRSegmentLib":
                parts = target.split(".")
                todo += [m for m in (".".join(parts[:k]) for k in range(1, len(parts) + 1))
                         if module_file(m) and (not m.startswith("SwinUNETRSegmentLib.cli.") or m == ENGINE_ENTRY
                                                or m in DISPATCHER)]
            elif top and top not in sys.stdlib_module_names and top != "__future__":
                entry = found.setdefault(top, {})
                entry[name] = entry.get(name, False) or probed
    return found


def test_the_walk_sees_the_engine_s_own_imports():
    found = engine_imports()
    assert {"torch", "monai", "fastapi", "uvicorn", "nibabel", "slicerio", "numpy", "SimpleITK"} <= set(found)
    assert found["psutil"] == {"SwinUNETRSegmentLib.inference.devices": True}  # probed: optional
    assert "tqdm" not in found and "platformdirs" not in found  # the command line's bar, the sample-data cache
    assert not [m for modules in found.values() for m in modules if ".training" in m]


def test_every_module_the_engine_process_imports_comes_with_slicer_torch_or_the_requirements():
    from packaging.requirements import Requirement

    requirements = read_requirements(REQUIREMENTS)
    listed = {canonical(line.split("==")[0]) for line in requirements}
    with_them = {canonical(Requirement(t).name): pin.split("==")[0] for pin in requirements
                 for t in requires_of(pin) if applies(Requirement(t))}  # what pip installs with a pinned one
    dists = importlib.metadata.packages_distributions()
    missing, refused = [], {}
    for module, importers in sorted(engine_imports().items()):
        if all(importers.values()):
            continue  # only probed for (psutil, openvino): the engine runs without it
        names = {canonical(d) for d in dists.get(module, [])}
        assert names, f"the engine imports {module} ({', '.join(importers)}), which is not installed here"
        if names & (slicer_distributions() | {"torch"} | listed | set(with_them)):
            continue
        if module in NOT_IN_SLICER:
            refused[module] = slicer_conflicts([constraint(next(iter(names)))])
            continue
        missing.append(f"{module} (a distribution of {', '.join(sorted(names))}; imported by {', '.join(importers)})")
    assert missing == [], "add these to Resources/requirements.txt, pinned as in constraints.txt: " + "; ".join(missing)
    assert all(refused.values()), f"these install beside Slicer's packages now: add them to the requirements: {refused}"
