"""The Slicer module's logic that runs without Slicer: what the panel shows (progress, time
left, devices, models), the segment table, what gets installed, and the packaging (CMake
lists, index entry, .ui: test_slicer_packaging.py). The engine runs, the controller and the
MRML work have their own test_slicer_*.py files."""

from __future__ import annotations

import dataclasses
import re
import sys
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
    "connected-components-3d": "4.1.1",
    "fastapi": "0.165.0",
    "uvicorn": "0.54.0",
    "openvino": "2026.4.1",
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
