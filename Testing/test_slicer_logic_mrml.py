"""The module's Logic end to end on Slicer's own MRML (slicer-core) with an engine server
(the fake one of test_slicer_engine, answering with the stand-in's labels): a run from a
volume node to a segmentation node, a second run that keeps an edited segment, a run whose
input shows another frame when the labels come back (nothing written), a removed output,
the panel's default input that is never a labelmap or a vector volume, and the model list:
this computer's catalog, or a real server's models with the server's own cards."""

from __future__ import annotations

import time

import numpy as np
import pytest
from test_slicer_controller import serve_tiny
from test_slicer_engine import TOKEN, FakeEngine
from test_slicer_support import GRIDS, add_transform, import_slicer, mrml_scene, rotation

slicer = import_slicer()

from SwinUNETRSegmentLib.errors import UserError
from SwinUNETRSegmentSlicer import mrml
from SwinUNETRSegmentSlicer.controller import DONE, MODELS, THIS_COMPUTER, Controller, Where
from SwinUNETRSegmentSlicer.logic import SegmentationLogic
from SwinUNETRSegmentSlicer.servermodels import ModelList
from SwinUNETRSegmentSlicer.testing import LIVER, SPLEEN, expected_labels_kji, synthetic_scan


@pytest.fixture
def scene():
    yield from mrml_scene()


@pytest.fixture(scope="module")
def model_server(tmp_path_factory, tiny_checkpoint):
    yield from serve_tiny(tmp_path_factory, tiny_checkpoint)


@pytest.fixture
def engine():
    with FakeEngine(windows=2) as fake:
        yield fake


def logic_on(engine):
    return SegmentationLogic(Controller(localEngine=lambda create=True: None)), Where(engine.url, TOKEN)


def add_scan(name="CT", grid="oblique"):
    arr, _ = synthetic_scan()
    return slicer.util.addVolumeFromArray(arr, ijkToRAS=GRIDS[grid], name=name), expected_labels_kji(arr)


def mask(node, name, volume):
    segment_id = node.GetSegmentation().GetSegmentIdBySegmentName(name)
    return slicer.util.arrayFromSegmentBinaryLabelmap(node, segment_id, volume)


def test_a_run_from_volume_node_to_segmentation_node_under_a_transform(scene, engine):
    volume, expected = add_scan()
    moved = np.eye(4)
    moved[:3, :3] = rotation((1, 0, 1), 15)
    moved[:3, 3] = (3.3, 1.1, -7.7)
    volume.SetAndObserveTransformNodeID(add_transform(slicer, moved).GetID())
    logic, where = logic_on(engine)
    node = logic.process(volume, model="btcv", where=where, downloadWeights=False)
    assert node.GetName() == "CT btcv" and node.GetTransformNodeID() == volume.GetTransformNodeID()
    for name, value in (("spleen", SPLEEN), ("liver", LIVER)):
        np.testing.assert_array_equal(mask(node, name, volume), (expected == value).astype(np.uint8))
    assert {s.action.value for s in logic.lastMergeSteps} == {"add"}


def test_a_second_run_keeps_the_edited_segment(scene, engine):
    volume, expected = add_scan()
    logic, where = logic_on(engine)
    node = logic.process(volume, model="btcv", where=where, downloadWeights=False)
    edited = mask(node, "liver", volume)
    edited[:, :, : edited.shape[2] // 3] = 0
    liver_id = node.GetSegmentation().GetSegmentIdBySegmentName("liver")
    slicer.util.updateSegmentBinaryLabelmapFromArray(edited, node, liver_id, volume)
    again = logic.process(volume, node, model="btcv", updateUnedited=True, where=where, downloadWeights=False)
    assert again is node
    np.testing.assert_array_equal(mask(node, "liver", volume), edited)
    assert {s.name: s.action.value for s in logic.lastMergeSteps} == {"spleen": "replace", "liver": "keep"}


def run_until_done(logic, volume, where, during=None):
    assert logic.startSegmentation(volume, model="btcv", where=where)
    deadline, changed = time.monotonic() + 30, False
    while time.monotonic() < deadline:
        for event in logic.controller.tick():
            if event.kind == DONE:
                return event.value
            assert event.kind not in ("error", "cancelled"), event.value
        if during is not None and not changed:
            during()
            changed = True
        time.sleep(0.01)
    raise AssertionError("no result")


def test_labels_that_come_back_after_the_input_changed_are_not_written(scene, engine):
    volume, _ = add_scan()
    arr, _ = synthetic_scan()
    logic, where = logic_on(engine)
    result = run_until_done(logic, volume, where,
                            during=lambda: slicer.util.updateVolumeFromArray(volume, np.roll(arr, 5, axis=1)))
    with pytest.raises(UserError, match="voxels changed"):
        logic.writeResult(result)
    assert slicer.util.getNodesByClass("vtkMRMLSegmentationNode") == []


def test_an_output_removed_during_the_run_gets_nothing(scene, engine):
    volume, _ = add_scan()
    logic, where = logic_on(engine)
    output = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "mine")
    assert logic.startSegmentation(volume, output, model="btcv", where=where)
    scene.RemoveNode(output)
    deadline = time.monotonic() + 30
    result = None
    while result is None and time.monotonic() < deadline:
        result = next((e.value for e in logic.controller.tick() if e.kind == DONE), None)
        time.sleep(0.01)
    with pytest.raises(UserError, match="output segmentation was removed"):
        logic.writeResult(result)
    assert slicer.util.getNodesByClass("vtkMRMLSegmentationNode") == []


def test_the_default_input_is_never_a_labelmap_or_a_vector_volume(scene):
    arr, _ = synthetic_scan()
    slicer.util.addVolumeFromArray(arr.astype(np.uint8), name="labels", nodeClassName="vtkMRMLLabelMapVolumeNode")
    slicer.util.addVolumeFromArray(np.zeros(arr.shape + (3,), np.uint8), name="rgb",
                                   nodeClassName="vtkMRMLVectorVolumeNode")
    assert mrml.firstScalarVolume(scene) is None
    volume, _ = add_scan("the CT")
    assert mrml.firstScalarVolume(scene) is volume


def test_a_labelmap_given_as_input_is_refused_before_anything_runs(scene, engine):
    arr, _ = synthetic_scan()
    labels = slicer.util.addVolumeFromArray(arr.astype(np.uint8), name="labels",
                                            nodeClassName="vtkMRMLLabelMapVolumeNode")
    logic, where = logic_on(engine)
    with pytest.raises(UserError, match="is a labelmap"):
        logic.process(labels, where=where, downloadWeights=False)
    assert engine.uploads == 0 and logic.controller.canApply


def test_the_model_list_is_this_computer_s_or_the_server_s_with_its_cards(model_server, tmp_path, monkeypatch,
                                                                          caplog):
    server, card = model_server
    monkeypatch.setenv("SWINUNETR_SEGMENT_HOME", str(tmp_path / "here"))
    logic = SegmentationLogic(Controller(localEngine=lambda create=True: None))
    here = dict(logic.listModels(THIS_COMPUTER))
    assert "demo" in here and "tiny" not in here
    with pytest.raises(UserError, match="tiny"):
        logic.modelCard("tiny")  # not in this computer's catalog
    assert logic.listModels(Where(server.url, server.token)) is None  # the answer comes on a later tick
    deadline, events = time.monotonic() + 60, []
    while not events and time.monotonic() < deadline:
        events = [e for e in logic.controller.tick() if e.kind == MODELS]
        time.sleep(0.01)
    assert events, "no answer from the server"
    listed = logic.useModels(events[0].value)
    assert [name for name, _ in listed] == ["tiny"]
    assert logic.modelCard("tiny").to_json() == card.to_json()  # what the panel's summary and settings read
    assert logic.weightsToDownload("tiny", Where(server.url, server.token)) is None  # the server has its weights
    with caplog.at_level("WARNING"):
        assert logic.useModels(ModelList(server.url, (), None, ("big: network 'x' is not supported",))) == []
    assert f"{server.url}: model big: network 'x' is not supported" in caplog.text
