"""The extension's packaging: the CMake lists ship every file the Slicer side needs, the module
loads before torch is installed, the engine and the pure glue never import Slicer, the Slicer
side starts no thread and imports no torch, the index entry, icons and the .ui file."""

from __future__ import annotations

import ast
import json
import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODULE_DIR = ROOT / "SwinUNETRSegment"
sys.path.insert(0, str(MODULE_DIR))  # the Slicer glue package sits beside the module file


# ---- packaging ---------------------------------------------------------------------------------
SLICER_SIDE = [MODULE_DIR / "SwinUNETRSegment.py", *sorted((MODULE_DIR / "SwinUNETRSegmentSlicer").glob("*.py"))]


def imported_lib_modules(path: Path) -> set[str]:
    """SwinUNETRSegmentLib modules a file imports, at any depth of the file."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.module and node.module.startswith("SwinUNETRSegmentLib"):
                found.add(node.module.split(".", 1)[1] if "." in node.module else "__init__")
            elif node.level == 1 and path.parent.name == "SwinUNETRSegmentLib":
                found.add(node.module or "__init__") if node.module else found.update(a.name for a in node.names)
    return found


def test_cmake_ships_every_file_the_slicer_side_needs():
    cmake = (MODULE_DIR / "CMakeLists.txt").read_text(encoding="utf-8").replace("${MODULE_NAME}", "SwinUNETRSegment")
    listed = set(re.findall(r"^\s+(\S+\.(?:py|png|ui|txt|json|pt))\s*$", cmake, re.M))

    def block(name):
        return cmake.split(f"set({name}", 1)[1].split(")", 1)[0]

    # the engine package, its model cards and bundled weights: globbed, and the globs are used
    assert (
        "${CMAKE_CURRENT_SOURCE_DIR}/SwinUNETRSegmentLib/*.py" in listed and "GLOB_RECURSE MODULE_LIB_SCRIPTS" in cmake
    )
    assert "${CMAKE_CURRENT_SOURCE_DIR}/SwinUNETRSegmentLib/models/cards/*.json" in listed
    assert "${CMAKE_CURRENT_SOURCE_DIR}/SwinUNETRSegmentLib/models/weights/*.pt" in listed
    assert "${MODULE_LIB_SCRIPTS}" in block("MODULE_PYTHON_SCRIPTS")
    assert "${MODULE_MODEL_FILES}" in block("MODULE_PYTHON_RESOURCES")
    weights = {p.suffix for p in (MODULE_DIR / "SwinUNETRSegmentLib" / "models" / "weights").glob("*")}
    assert weights <= {".pt"}, f"bundled weights with suffixes {weights} would not ship"
    # every engine module the Slicer side imports, directly or through the engine, exists
    needed, todo = {"__init__"}, list(SLICER_SIDE)
    while todo:
        for mod in imported_lib_modules(todo.pop()) - needed:
            needed.add(mod)
            path = MODULE_DIR / "SwinUNETRSegmentLib" / mod.replace(".", "/")
            todo.append(path.with_suffix(".py") if path.with_suffix(".py").is_file() else path / "__init__.py")
            assert todo[-1].is_file(), f"the Slicer side needs SwinUNETRSegmentLib/{mod}, which does not exist"
    assert {"inference.engine", "merge", "requirements", "models.catalog", "models.checkpoint"} <= needed
    # the glue is listed file by file, and everything listed exists
    for path in SLICER_SIDE:
        assert str(path.relative_to(MODULE_DIR)) in listed, f"{path.name} is not in CMake SCRIPTS"
    for name in listed:
        if "*" not in name:
            assert (MODULE_DIR / name).is_file(), f"CMake lists {name}, which does not exist"
    assert "slicer_add_python_unittest(SCRIPT SwinUNETRSegment.py)" in cmake


def test_the_module_loads_before_torch_and_monai_are_installed():
    """Slicer imports the module at startup; it must load without torch to offer installing it."""
    import subprocess

    code = (
        "import sys; sys.modules['torch'] = None; sys.modules['monai'] = None\n"
        f"sys.path.insert(0, {str(MODULE_DIR)!r})\n"
        "import SwinUNETRSegmentLib.models.catalog, SwinUNETRSegmentLib.inference.engine\n"
        "import SwinUNETRSegmentLib.merge, SwinUNETRSegmentLib.requirements\n"
        "import SwinUNETRSegmentSlicer.panel, SwinUNETRSegmentSlicer.segments, SwinUNETRSegmentSlicer.controller\n"
        "import SwinUNETRSegmentSlicer.models, SwinUNETRSegmentSlicer.testing, SwinUNETRSegmentSlicer.download\n"
        "import SwinUNETRSegmentSlicer.enginerun, SwinUNETRSegmentSlicer.nbhttp, SwinUNETRSegmentSlicer.packages\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_the_engine_never_imports_slicer_and_the_pure_glue_neither():
    pure = [*(MODULE_DIR / "SwinUNETRSegmentLib").glob("*.py")] + [
        MODULE_DIR / "SwinUNETRSegmentSlicer" / f"{n}.py"
        for n in ("panel", "segments", "testing", "models", "packages", "nbhttp", "enginerun", "download", "controller")
    ]
    for path in pure:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            for name in names:
                assert name.split(".")[0] not in {"slicer", "qt", "ctk", "vtk", "PythonQt"}, (
                    f"{path.name} imports {name}"
                )


def test_extension_declares_pytorch_and_the_segmentation_category():
    entry = json.loads((ROOT / "SwinUNETRSegment.json").read_text(encoding="utf-8"))
    assert {"$schema", "category", "scm_url"} <= set(entry)
    assert entry["category"] == "Segmentation" and entry["build_dependencies"] == ["PyTorch"]
    assert entry["scm_url"].startswith("https://")
    top = (ROOT / "CMakeLists.txt").read_text(encoding="utf-8")
    assert 'set(EXTENSION_DEPENDS "PyTorch")' in top and 'set(EXTENSION_CATEGORY "Segmentation")' in top
    assert "add_subdirectory(SwinUNETRSegment)" in top


def test_icons_are_128_pixel_pngs():
    from PIL import Image

    for path in (ROOT / "Resources/Icons/SwinUNETRSegment.png", MODULE_DIR / "Resources/Icons/SwinUNETRSegment.png"):
        with Image.open(path) as img:
            assert (img.format, img.size) == ("PNG", (128, 128))


def test_every_widget_the_module_uses_is_in_the_ui_file_and_parameters_match():
    tree = ET.parse(MODULE_DIR / "Resources/UI/SwinUNETRSegment.ui")
    widgets = {w.get("name") for w in tree.iter("widget")}
    bound = {}
    for w in tree.iter("widget"):
        for prop in w.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                bound[w.get("name")] = prop.find("string").text
    module = ast.parse((MODULE_DIR / "SwinUNETRSegment.py").read_text(encoding="utf-8"))
    selftest = ast.parse((MODULE_DIR / "SwinUNETRSegmentSlicer" / "selftest.py").read_text(encoding="utf-8"))
    used = {
        n.attr
        for tree_ in (module, selftest)
        for n in ast.walk(tree_)
        if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Attribute) and n.value.attr == "ui"
    }
    assert used and used <= widgets, used - widgets
    params = next(n for n in module.body if isinstance(n, ast.ClassDef) and n.name == "SwinUNETRSegmentParameterNode")
    fields = {n.target.id for n in params.body if isinstance(n, ast.AnnAssign)}
    assert set(bound.values()) <= fields
    # model, device, runOn: combos filled and synced by hand; modelSettingsApplied: no widget
    assert set(bound.values()) == fields - {"model", "device", "runOn", "modelSettingsApplied"}


def test_slicer_s_process_starts_no_thread_and_imports_no_torch():
    """The Slicer side hands all work to the engine process: no thread, no torch or MONAI (the
    test stand-ins in testing.py may import torch for the oracle network; the module never calls it)."""
    for path in SLICER_SIDE:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr in ("Thread", "ThreadPoolExecutor", "start_new_thread"):
                raise AssertionError(f"{path.name}:{node.lineno} starts a thread ({node.attr})")
            if isinstance(node, ast.ImportFrom) and node.module in ("threading", "concurrent.futures", "_thread"):
                names = {a.name for a in node.names}
                assert not names & {"Thread", "ThreadPoolExecutor", "start_new_thread"}, f"{path.name} imports {names}"
            if path.name != "testing.py" and isinstance(node, (ast.Import, ast.ImportFrom)):
                modules = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                for name in modules:
                    assert name.split(".")[0] not in ("torch", "monai"), f"{path.name} imports {name}"
                    assert not name.startswith("SwinUNETRSegmentLib.inference.engine"), f"{path.name} imports {name}"
