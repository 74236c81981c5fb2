"""The Slicer module's logic that runs without Slicer: what the panel shows (progress, time
left, devices, models), the segment table, what gets installed, and the packaging (CMake
lists, index entry, .ui). The engine runs, the controller and the MRML work have their own
test_slicer_*.py files."""

from __future__ import annotations

import ast
import dataclasses
import json
import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULE_DIR = ROOT / "SwinUNETRSegment"
sys.path.insert(0, str(MODULE_DIR))  # the Slicer glue package sits beside the module file

from SwinUNETRSegmentLib import requirements as req
from SwinUNETRSegmentLib.errors import CancelledError
from SwinUNETRSegmentLib.geometry import Volume
from SwinUNETRSegmentLib.merge import mask_stamp
from SwinUNETRSegmentLib.models.cards import load_card
from SwinUNETRSegmentLib.progress import Progress
from SwinUNETRSegmentSlicer import panel, segments  # noqa: E402
from SwinUNETRSegmentSlicer.models import catalog_models, download_progress, weights_url  # noqa: E402
from SwinUNETRSegmentSlicer.testing import (  # noqa: E402
    LIVER,
    SPLEEN,
    ThresholdSegmenter,
    expected_labels_kji,
    oracle_segmenter,
    synthetic_scan,
)


# ---- progress and time left -----------------------------------------------------------
def test_progress_text_names_the_window_and_the_time_left():
    p = Progress("inference", 0.4, 75.0, "window 3 of 27", 3, 27)
    assert panel.progress_text(p) == "Running the model: window 3 of 27, about 1 min 15 s left"
    assert panel.progress_percent(p) == 40


def test_progress_text_before_an_estimate_exists_says_no_time():
    assert panel.progress_text(Progress("loading model", 0.0, None, "loading btcv on cpu")) == "Loading the model"
    assert panel.progress_text(Progress("preprocessing", 0.05, None, "")) == "Preparing the volume"


def test_time_left_reads_naturally():
    assert panel.time_left_text(None) == ""
    assert panel.time_left_text(0.3) == "less than a second left"
    assert panel.time_left_text(42) == "about 42 s left"
    assert panel.time_left_text(3 * 3600 + 120) == "about 3 h 02 min left"


def test_progress_bar_stays_within_0_and_100():
    assert panel.progress_percent(Progress("writing", 1.2, 0, "")) == 100
    assert panel.progress_percent(Progress("loading model", -0.1, None, "")) == 0


def test_download_reports_megabytes_and_time_left_and_stops_on_cancel():
    import threading

    reports, now = [], [100.0]
    cancel = threading.Event()
    cb = download_progress(reports.append, cancel, clock=lambda: now[0])
    now[0] = 110.0  # 10 s for the first quarter
    cb(25_000_000, 100_000_000)
    p = reports[-1]
    assert (p.fraction, p.seconds_left) == (0.25, 30.0)
    assert panel.progress_text(p) == "Downloading the model's weights: 25 of 100 MB, about 30 s left"
    cb(5_000_000, None)  # server gave no length
    assert reports[-1].fraction == 0.0 and reports[-1].seconds_left is None
    cancel.set()
    with pytest.raises(CancelledError):
        cb(30_000_000, 100_000_000)


# ---- devices and models -----------------------------------------------------------------
def test_device_selector_lists_auto_then_every_device_by_name():
    found = [("cuda:0", "NVIDIA H100 80GB HBM3"), ("cuda:1", "NVIDIA A40"), ("cpu", "CPU")]
    assert panel.device_choices(found) == [
        ("auto", "Automatic (GPU 0: NVIDIA H100 80GB HBM3)"),
        ("cuda:0", "GPU 0: NVIDIA H100 80GB HBM3"),
        ("cuda:1", "GPU 1: NVIDIA A40"),
        ("cpu", "CPU (slow)"),
    ]
    assert panel.device_choices([("mps", "Apple GPU (MPS)"), ("cpu", "CPU")])[0] == (
        "auto",
        "Automatic (Apple GPU (MPS))",
    )


def test_without_torch_only_automatic_is_offered():
    assert panel.device_choices(None) == [("auto", "Automatic")]


def test_device_selector_on_this_machine():
    from SwinUNETRSegmentLib.inference.devices import available_devices

    choices = panel.device_choices(available_devices())
    assert choices[0][0] == "auto" and choices[-1] == ("cpu", "CPU (slow)")
    assert len(choices) == len(available_devices()) + 1


def test_models_offered_are_the_catalog_s_without_a_broken_user_card(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("SWINUNETR_SEGMENT_HOME", str(tmp_path))
    (tmp_path / "cards").mkdir()
    (tmp_path / "cards" / "broken.json").write_text("{not json")
    offered = dict(catalog_models())
    assert offered["btcv"].title.startswith("Swin UNETR, 13 abdominal organs")
    assert "broken" not in offered and "broken" in caplog.text


def test_weights_are_offered_for_download_only_while_missing(tmp_path, monkeypatch):
    monkeypatch.setenv("SWINUNETR_SEGMENT_HOME", str(tmp_path))
    card = load_card("btcv")
    assert weights_url(card) == card.checkpoint["url"]
    weights = tmp_path / "models" / "btcv" / "model.pt"
    weights.parent.mkdir(parents=True)
    weights.write_bytes(b"installed")
    assert weights_url(card) is None
    weights.unlink()
    assert (
        weights_url(dataclasses.replace(card, checkpoint={"md5": card.checkpoint["md5"]})) is None
    )  # no URL: nothing to offer


def test_model_description_shows_modality_structures_and_licence():
    card = load_card("btcv")
    summary = panel.model_summary(card)
    assert summary.startswith("CT, 13 structures: spleen, right kidney")
    assert "and 5 more" in summary
    assert "Licence: Apache-2.0" in summary
    tip = panel.model_tooltip(card)
    assert "left adrenal gland" in tip and "Hatamizadeh" in tip


# ---- the segment table --------------------------------------------------------------------
def test_terminology_is_serialized_exactly_as_slicer_and_slicerio_store_it():
    pytest.importorskip("slicerio")
    from slicerio.segmentation import terminology_entry_to_string

    for label in load_card("btcv").labels:
        assert segments.terminology_string(label) == terminology_entry_to_string(label.terminology())
    kidney = load_card("btcv").label(2)
    assert segments.terminology_string(kidney) == (
        "Segmentation category and type - 3D Slicer General Anatomy list~SCT^123037004^Anatomical Structure"
        "~SCT^64033007^Kidney~SCT^24028007^Right~Anatomic codes - DICOM master list~^^~^^"
    )


def test_segments_are_made_only_for_labels_the_run_found_with_the_card_s_names_and_colours():
    card = load_card("btcv")
    specs = segments.segment_specs(card, [6, 1, 99])
    assert [(s.value, s.name) for s in specs] == [(1, "spleen"), (6, "liver")]
    assert specs[0].color == tuple(round(c / 255, 6) for c in card.label(1).color)
    assert "SCT^78961009^Spleen" in specs[0].terminology


def test_imported_labels_hold_only_the_values_written():
    labels = np.array([[[0, 1, 2], [6, 6, 7]]], np.uint8)
    out = segments.labels_for_import(labels, {1, 6})
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, [[[0, 1, 0], [6, 6, 0]]])
    assert segments.present_values(labels) == [1, 2, 6, 7]


def test_segment_ids_go_to_the_slot_of_their_label_value():
    assert segments.segment_id_slots({1: "spleen", 3: "liver"}) == ["spleen", "", "liver"]
    assert segments.segment_id_slots({}) == []
    with pytest.raises(ValueError):
        segments.segment_id_slots({0: "background"})


def test_stamps_written_equal_stamps_of_the_same_mask_exported_later():
    arr, _ = synthetic_scan()
    labels = expected_labels_kji(arr)
    stamps = segments.stamps_by_value(labels, [SPLEEN, LIVER])
    exported = (labels == LIVER).astype(np.uint8)  # what arrayFromSegmentBinaryLabelmap returns
    assert stamps[LIVER] == mask_stamp(exported)
    exported[10, 10, 10] ^= 1  # one voxel painted
    assert stamps[LIVER] != mask_stamp(exported)


# ---- the stand-ins the tests use -----------------------------------------------------------------
def scan_volume() -> tuple[Volume, np.ndarray]:
    arr, ijk_to_ras = synthetic_scan()
    return Volume.from_kji(arr, ijk_to_ras), expected_labels_kji(arr)


def test_the_stand_in_segmenter_reports_windows_and_answers_on_the_input_grid():
    volume, expected = scan_volume()
    reports = []
    result = ThresholdSegmenter(windows=4).segment(volume, reports.append)
    assert [p.message for p in reports if p.stage == "inference"] == [f"window {n} of 4" for n in range(5)]
    assert result.labels.same_grid(volume)
    np.testing.assert_array_equal(result.labels.kji(), expected)


def test_the_stand_in_segmenter_stops_on_cancel():
    import threading

    cancel = threading.Event()
    cancel.set()
    with pytest.raises(CancelledError):
        ThresholdSegmenter(windows=3).segment(scan_volume()[0], cancel=cancel)


def test_the_real_engine_finds_the_self_test_s_organs():
    """The oracle network gives spleen and liver where they are (MONAI preprocessing, windows, way back)."""
    pytest.importorskip("monai")
    volume, expected = scan_volume()
    reports = []
    result = oracle_segmenter().segment(volume, reports.append)
    assert result.labels.same_grid(volume)
    np.testing.assert_array_equal(result.labels.kji(), expected)  # the card has the scan's voxel size: exact
    assert any(p.stage == "inference" and p.total > 1 for p in reports)


# ---- what gets installed ------------------------------------------------------------------------
REQUIREMENTS = MODULE_DIR / "Resources" / "requirements.txt"
PINS = {
    "monai": "1.6.1",
    "einops": "0.8.2",
    "nibabel": "5.4.2",
    "slicerio": "1.4.0",
    "pynrrd": "1.1.3",
    "fastapi": "0.165.0",
    "uvicorn": "0.54.0",
}


def lookup(versions):
    return lambda name: versions.get(name.lower())


def test_requirements_file_pins_the_engine_stack_and_nothing_slicer_ships():
    lines = req.read_requirements(REQUIREMENTS)
    assert lines == [f"{name}=={version}" for name, version in PINS.items()]
    names = {re.split(r"[=<>!~; ]", line)[0].lower() for line in lines}
    assert not names & {p.lower() for p in req.PROTECTED}


def test_first_use_installs_torch_through_the_extension_and_every_pinned_package():
    plan = req.plan_install(req.read_requirements(REQUIREMENTS), lookup({"numpy": "2.2.6", "simpleitk": "2.5.0"}))
    assert plan.torch == "PyTorch is not installed"
    assert plan.packages == tuple(f"{n}=={v}" for n, v in PINS.items())
    assert plan.constraints == ("numpy==2.2.6", "SimpleITK==2.5.0")
    assert req.constraints_text(plan) == "numpy==2.2.6\nSimpleITK==2.5.0\n"
    message = plan.message()
    assert "PyTorch extension" in message and "monai==1.6.1" in message and "numpy==2.2.6" in message


def test_nothing_is_installed_when_everything_is_there():
    installed = {**PINS, "torch": "2.13.0+cu128", "numpy": "2.2.6"}
    plan = req.plan_install(req.read_requirements(REQUIREMENTS), lookup(installed))
    assert plan.nothing_to_do and plan.packages == () and plan.torch is None
    assert "torch==2.13.0+cu128" in plan.constraints  # pip may not swap the CUDA build for another


def test_only_the_package_at_another_version_is_installed():
    plan = req.plan_install(req.read_requirements(REQUIREMENTS), lookup({**PINS, "monai": "1.5.0", "torch": "2.9.0"}))
    assert plan.packages == ("monai==1.6.1",)


def test_a_torch_too_old_for_monai_is_reported_not_replaced():
    plan = req.plan_install([], lookup({"torch": "2.5.1"}))
    assert plan.torch == "PyTorch 2.5.1 is too old (MONAI needs >=2.8)"
    assert plan.packages == () and "torch==2.5.1" in plan.constraints


def test_a_requirement_naming_a_package_slicer_ships_is_refused():
    plan = req.plan_install(["numpy>=2.3", "SimpleITK", "torch==2.1", "monai==1.6.1"], lookup({"torch": "2.9.0"}))
    assert plan.refused == ("numpy>=2.3", "SimpleITK", "torch==2.1")
    assert plan.packages == ("monai==1.6.1",)


def test_requirements_for_another_platform_are_skipped():
    plan = req.plan_install(['pywin32==306; sys_platform == "nonexistent-os"'], lookup({"torch": "2.9.0"}))
    assert plan.packages == ()


def test_read_requirements_drops_comments_blank_lines_and_pip_options(tmp_path):
    path = tmp_path / "requirements.txt"
    path.write_text("# comment\n\n-c constraints.txt\nmonai==1.6.1  # the engine\n--index-url https://x\neinops\n")
    assert req.read_requirements(path) == ["monai==1.6.1", "einops"]


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
