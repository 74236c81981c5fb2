"""The real engine as the Slicer module runs it: `swinunetr-segment serve` as a child process
(the service client's LocalEngine, in this Python as it would be in PythonSlicer), the
built-in demo model on a small crop of a real CT, the run moved on by EngineRun.tick() and
the labels written into a segmentation node of Slicer's own MRML (slicer-core), whose export
on the input volume's grid equals the engine's labels voxel for voxel. The engine stays warm:
a second run reuses the process."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import numpy as np
import pytest
from test_slicer_support import frozen_gc, import_slicer, mrml_scene

slicer = import_slicer()

from SwinUNETRSegmentLib.service.client import LocalEngine
from SwinUNETRSegmentLib.service.protocol import JobOptions
from SwinUNETRSegmentSlicer import mrml
from SwinUNETRSegmentSlicer.enginerun import DONE, EngineRun, LocalEndpoint


@pytest.fixture
def scene():
    yield from mrml_scene()


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    home = tmp_path_factory.mktemp("engine-home")
    env = {"SWINUNETR_SEGMENT_HOME": str(home)}
    # The engine converts the model for OpenVINO on its first job (once per machine); done
    # here first, so that the tick budget below is measured while the engine segments.
    from SwinUNETRSegmentLib.inference.cpu.openvino_backend import available

    if available():
        code = "import sys; from SwinUNETRSegmentLib.cli import main; sys.exit(main(sys.argv[1:]))"
        subprocess.run([sys.executable, "-c", code, "models", "convert", "demo"], env={**os.environ, **env},
                       check=True, capture_output=True, timeout=300)
    local = LocalEngine(python=sys.executable, args=["--models", "demo"], env=env)
    yield local
    local.stop()


def small_ct(reference_files):
    """A 3 mm crop of the example CT around the upper abdomen, as a Slicer volume node."""
    from SwinUNETRSegmentLib.fileio.read import read_volume

    volume, _ = read_volume(reference_files / "example_ct.nii.gz")
    arr = volume.kji()
    k, j, i = (s // 2 for s in arr.shape)
    crop = np.ascontiguousarray(arr[max(0, k - 24):k + 24, max(0, j - 40):j + 40, max(0, i - 40):i + 40])
    origin = volume.ijk_to_ras @ np.array([max(0, i - 40), max(0, j - 40), max(0, k - 24), 1.0])
    ijk_to_ras = volume.ijk_to_ras.copy()
    ijk_to_ras[:3, 3] = origin[:3]
    return slicer.util.addVolumeFromArray(crop, ijkToRAS=ijk_to_ras, name="example CT crop")


def run_once(engine, node):
    array_kji, snapshot = mrml.snapshotInput(node)
    run = EngineRun(LocalEndpoint(engine), array_kji, snapshot.ijkToRas, JobOptions(model="demo", device="cpu"))
    events, longest = [], 0.0
    deadline = time.monotonic() + 300
    with frozen_gc():
        while not run.finished and time.monotonic() < deadline:
            t0 = time.perf_counter()
            events += run.tick()
            longest = max(longest, time.perf_counter() - t0)
            time.sleep(0.01)
    assert events and events[-1].kind == DONE, events[-1].value if events else "no events"
    return events[-1].value.segmentation(snapshot.ijkToRas), snapshot, longest


@pytest.mark.slow  # about 30 s on 2 cores (the child imports torch and MONAI); quick counterpart: test_slicer_engine
def test_the_demo_model_in_the_local_engine_lands_in_mrml_voxel_for_voxel(scene, engine, reference_files):
    node = small_ct(reference_files)
    result, snapshot, longest = run_once(engine, node)
    assert longest < 0.05, f"a tick took {longest * 1000:.0f} ms"
    labels = result.labels.kji()
    assert (labels > 0).any(), "the demo model found nothing in the abdomen crop"
    segmentation = mrml.createSegmentationNode(node, "demo")
    mrml.writeSegments(segmentation, result, node, snapshot=snapshot)
    exported = mrml.exportLabels(segmentation, node)
    s = segmentation.GetSegmentation()
    names = [s.GetNthSegment(n).GetName() for n in range(s.GetNumberOfSegments())]
    value_of = {label.name: label.value for label in result.card.labels}
    back = np.zeros_like(labels)
    for index, name in enumerate(names):
        back[exported == index + 1] = value_of[name]
    np.testing.assert_array_equal(back, labels)
    pid = engine.process.pid
    again, _, _ = run_once(engine, node)  # warm: the same process, the model already loaded
    assert engine.process.pid == pid
    np.testing.assert_array_equal(again.labels.kji(), labels)
