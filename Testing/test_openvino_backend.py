"""The network on OpenVINO (inference/cpu/openvino_backend.py): the labels a user gets agree
with PyTorch's on the input's own grid, the conversion is made once per checkpoint and found
again by its SHA256, cancel and progress still work, float32 stays on PyTorch, and the
command line never aborts beside the preloaded allocator."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest

from SwinUNETRSegmentLib.errors import CancelledError, UserError
from SwinUNETRSegmentLib.fileio.read import read_volume
from SwinUNETRSegmentLib.inference.cpu import openvino_backend
from SwinUNETRSegmentLib.inference.engine import Segmenter
from SwinUNETRSegmentLib.inference.options import FastPath
from SwinUNETRSegmentLib.models import catalog
from SwinUNETRSegmentLib.training.metrics import dice_per_label

pytestmark = pytest.mark.skipif(
    not openvino_backend.available() or openvino_backend.preloaded_allocator() is not None,
    reason="openvino is not installed here (it is a dependency: ./dev installs it), or this test process runs "
    "under a preloaded allocator",
)
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """A catalog folder of its own, with the demo model converted once for the module."""
    folder = tmp_path_factory.mktemp("home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SWINUNETR_SEGMENT_HOME", str(folder))
        card, weights = catalog.resolve_model("demo")
        seg = Segmenter(card, weights, device="cpu")
        assert seg.openvino.key  # the checkpoint's SHA256, read before the measurement
        # what a killed conversion leaves behind (two hours ago), and one under way (now)
        stale, live = folder / "openvino" / ".0123abcd-killed", folder / "openvino" / ".4567cdef-running"
        for leftover in (stale, live):
            leftover.mkdir(parents=True)
            (leftover / "model.bin").write_bytes(b"\0" * 1024)
        old = stale.stat().st_mtime - 2 * 3600
        os.utime(stale, (old, old))
        before = _rss_mb()
        assert seg.convert_openvino() is not None
        CONVERSION["engine_grew_mb"] = _rss_mb() - before
        CONVERSION["leftovers"] = {"stale": stale.exists(), "live": live.exists()}
        shutil.rmtree(live)
        yield folder


#: what the module's conversion (``home``) did to this process
CONVERSION: dict = {}


def _rss_mb() -> float:
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024
    except OSError:  # not Linux
        return float("nan")


@pytest.fixture(scope="module")
def example_ct(reference_files):
    ct, _ = read_volume(reference_files / "example_ct.nii.gz")
    return ct


@pytest.fixture(scope="module")
def small_ct(example_ct):
    """The example CT at half the resolution: the same body, fewer windows."""
    from SwinUNETRSegmentLib.geometry import Volume

    m = example_ct.ijk_to_ras.copy()
    m[:3, :3] *= 2
    return Volume(example_ct.array[::2, ::2, ::2].copy(), m)


@pytest.fixture(scope="module")
def part_ct(example_ct):
    """The example CT's upper 40 slices: the same grid kind, a few windows (a quick run)."""
    from SwinUNETRSegmentLib.geometry import Volume

    m = example_ct.ijk_to_ras.copy()
    m[:3, 3] = (m @ np.array([0, 0, example_ct.shape[2] - 40, 1.0]))[:3]
    return Volume(example_ct.array[:, :, -40:].copy(), m)


@pytest.fixture(scope="module")
def one_window():
    """A box of soft tissue in air, one window of the demo model."""
    from conftest import make_affine

    from SwinUNETRSegmentLib.geometry import Volume

    vol = Volume(np.full((40, 40, 30), -1000, np.int16), make_affine((3, 3, 3)))
    vol.array[10:30, 10:30, 5:25] = 40
    return vol


def _segmenter(**fast):
    card, weights = catalog.resolve_model("demo")
    return Segmenter(card, weights, device="cpu", fast=FastPath(**fast))


def test_openvino_labels_agree_with_pytorch_on_the_example_ct(home, example_ct):
    on_ov = _segmenter().segment(example_ct)
    on_torch = _segmenter(backend="torch").segment(example_ct)
    assert on_ov.stats["backend"] == "openvino" and on_torch.stats["backend"] == "torch"
    assert on_ov.labels.same_grid(example_ct)
    a, b = on_ov.labels.array, on_torch.labels.array
    assert (a == b).mean() > 0.999
    # every organ the PyTorch run finds, the OpenVINO run finds in the same place
    dice = dice_per_label(a, b, on_torch.card.labels)
    for organ, d in dice.items():
        if (b == next(lab.value for lab in on_torch.card.labels if lab.name == organ)).sum() > 1000:
            assert d > 0.97, (organ, d)


@pytest.mark.parametrize("grid", ["flipped-lps", "oblique-flipped", "permuted-non-ras"])
def test_openvino_labels_land_on_the_input_grid_as_pytorch_s(home, example_ct, grid):
    from conftest import GRIDS, make_affine

    _, spacing, direction, origin = next(g for g in GRIDS if g[0] == grid)
    from SwinUNETRSegmentLib.geometry import Volume

    # the real CT's voxels on another grid: what matters is that both backends put each
    # label on the same voxels of it
    vol = Volume(example_ct.array[::2, ::2, ::2].copy(), make_affine([2 * s for s in spacing], direction, origin))
    a = _segmenter().segment(vol)
    b = _segmenter(backend="torch").segment(vol)
    assert a.stats["backend"] == "openvino"
    assert a.labels.same_grid(vol) and b.labels.same_grid(vol)
    assert (a.labels.array == b.labels.array).mean() > 0.995


def test_an_openvino_run_holds_no_pytorch_copy_of_the_weights(home, one_window, monkeypatch):
    """Memory: a run on a cached conversion never builds the PyTorch network (a second copy
    of the weights), hands back OpenVINO's activation buffers once its windows are done (650 MB
    at feature size 48, beside the resampling and a warm engine's idle time otherwise), a warm
    engine frees the network an earlier PyTorch run built, and the compiled model keeps the
    shift masks as per-plane biases: no attention mask of (windows, heads, n, n) constants,
    which OpenVINO folded into 710 MB at feature size 48."""
    import openvino as ov

    events = []
    one, release = openvino_backend.OpenVINONetwork._one, openvino_backend.OpenVINONetwork.release_memory
    monkeypatch.setattr(openvino_backend.OpenVINONetwork, "_one",
                        lambda self, window, borrow: events.append("window") or one(self, window, borrow))
    monkeypatch.setattr(openvino_backend.OpenVINONetwork, "release_memory",
                        lambda self: events.append("release") or release(self))
    seg = _segmenter()
    assert seg.runs_on_openvino()
    result = seg.segment(one_window)
    assert result.stats["backend"] == "openvino" and seg._network is None
    assert events and events[-1] == "release" and events.count("release") == 1  # after the last window
    seg.fast = FastPath(precision="float32")  # a PyTorch run of the same engine loads it...
    assert seg.segment(one_window).stats["backend"] == "torch" and seg.loaded
    seg.fast = FastPath()  # ... and the next OpenVINO run frees it again
    assert seg.segment(one_window).stats["backend"] == "openvino" and seg._network is None
    model = ov.Core().read_model(str(openvino_backend.ir_path(seg.openvino.key)))
    masks = [op.input(3).get_partial_shape() for op in model.get_ops()
             if op.get_type_name() == "ScaledDotProductAttention"]
    assert masks and all(m[0].get_length() == 1 for m in masks), masks


def test_windows_stitched_from_openvinos_own_output_buffer_give_the_labels_of_copies(home, part_ct, monkeypatch):
    """Memory without a cost in labels: on OpenVINO each window's logits are stitched straight
    from OpenVINO's output buffer (no copy of a window's logits: 47 MB at feature size 48), which
    the next window overwrites; the air windows' answer, which is kept for the whole run, is a
    tensor of its own. The labels are a run's on copied logits, voxel for voxel, on a scan with
    air windows between body windows."""
    import torch

    from SwinUNETRSegmentLib.geometry import Volume

    padded = np.full((part_ct.shape[0] * 2,) + part_ct.shape[1:], -1000, np.int16)
    padded[part_ct.shape[0] // 2 : part_ct.shape[0] // 2 + part_ct.shape[0]] = part_ct.array
    m = part_ct.ijk_to_ras.copy()
    m[:3, 3] -= m[:3, 0] * (part_ct.shape[0] // 2)
    vol = Volume(padded, m)
    buffers = []
    borrow = openvino_backend.OpenVINONetwork.borrow
    monkeypatch.setattr(openvino_backend.OpenVINONetwork, "borrow",
                        lambda self, batch: buffers.append(borrow(self, batch)) or buffers[-1])
    seg = _segmenter()
    borrowed = seg.segment(vol)
    assert borrowed.stats["backend"] == "openvino"
    assert borrowed.stats["windows_air"] > 0 and borrowed.stats["windows_run"] > 1
    assert len(buffers) == borrowed.stats["windows_run"]
    assert len({b.data_ptr() for b in buffers}) == 1  # every window in the same buffer: no copy
    # the air windows' answer, kept through the run, is still the network's answer for air
    (kept,) = seg._air_outputs.values()
    assert all(kept.data_ptr() != b.data_ptr() for b in buffers)
    air = torch.full((1, 1) + tuple(seg.card.roi_size), float(seg.card.intensity["b_min"]))
    hint = {"float32": "f32", "bfloat16": "bf16"}[borrowed.stats["precision"]]
    torch.testing.assert_close(kept, seg.openvino.network(hint, borrowed.stats["threads"])(air), rtol=0, atol=0)
    del buffers[:]
    monkeypatch.setattr(openvino_backend.OpenVINONetwork, "borrow", openvino_backend.OpenVINONetwork.__call__)
    copied = _segmenter().segment(vol)
    assert not buffers and copied.stats["windows_air"] == borrowed.stats["windows_air"]
    assert borrowed.labels.same_grid(vol)
    np.testing.assert_array_equal(borrowed.labels.array, copied.labels.array)
    assert (copied.labels.array > 0).any()  # organs found, not only background


def test_the_conversion_is_found_again_by_its_checkpoint(home, tmp_path, monkeypatch):
    card, weights = catalog.resolve_model("demo")
    first = Segmenter(card, weights, device="cpu")
    assert first.openvino.converted
    entry = openvino_backend.ir_path(first.openvino.key).parent
    assert entry.parent == home / "openvino" and sorted(p.name for p in entry.iterdir()) == ["model.bin", "model.xml"]
    # another process (a new Segmenter) finds it and converts nothing
    monkeypatch.setattr(openvino_backend, "convert_in_child", lambda *a, **k: pytest.fail("converted again"))
    assert Segmenter(card, weights, device="cpu").convert_openvino() == entry / "model.xml"
    # other weights are another conversion: not found, and "auto" runs them on PyTorch
    other = tmp_path / "other.pt"
    data = bytearray(weights.read_bytes())
    other.write_bytes(bytes(data) + b"\0")  # same weights, another file: another SHA256
    changed = Segmenter(card, other, device="cpu")
    assert changed.openvino.key != first.openvino.key and not changed.openvino.converted


@pytest.mark.parametrize("window", [(64, 64, 64), (64, 96, 32)], ids=["cube", "anisotropic"])
def test_a_swinunetr_converted_in_two_parts_is_the_whole_trace_bit_for_bit(window, tmp_path):
    """The conversion traces a SwinUNETR's full-resolution head on a small grid and wires it to
    the body traced on the whole window: the weights file is the one-piece trace's byte for
    byte, the compiled outputs are equal bit for bit, and they are PyTorch's to float rounding,
    on a cubic and a non-cubic window (a MONAI forward that changed would show here)."""
    import openvino as ov
    import torch

    from SwinUNETRSegmentLib.inference.cpu.window_attention import cached_window_attention
    from SwinUNETRSegmentLib.inference.network import fused_attention
    from SwinUNETRSegmentLib.models.checkpoint import load_model

    card, weights = catalog.resolve_model("demo")
    network = load_model(card, weights).float().eval()
    x = torch.from_numpy(np.random.default_rng(3).normal(size=(1, 1) + window).astype(np.float32))
    with torch.no_grad(), fused_attention(network, True), cached_window_attention(network, True, by_mask=True), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracing's warnings on shapes, as the conversion has them
        expected = network(x).numpy()
        two_parts = openvino_backend._to_openvino(network, x)
        whole = openvino_backend._traced(network, (x,), [x.shape])
    assert two_parts.get_friendly_name() == "swinunetr"  # the two-part path was taken
    outputs = {}
    for name, model in (("two_parts", two_parts), ("whole", whole)):
        ov.save_model(model, str(tmp_path / f"{name}.xml"), compress_to_fp16=False)
        compiled = ov.Core().compile_model(str(tmp_path / f"{name}.xml"), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        outputs[name] = compiled(x.numpy())[0]
    assert (tmp_path / "two_parts.bin").read_bytes() == (tmp_path / "whole.bin").read_bytes()
    np.testing.assert_array_equal(outputs["two_parts"], outputs["whole"])
    assert outputs["two_parts"].shape == expected.shape == (1, 14) + window
    np.testing.assert_allclose(outputs["two_parts"], expected, atol=2e-3)
    assert (outputs["two_parts"].argmax(1) == expected.argmax(1)).mean() > 0.999


def test_a_two_part_conversion_that_fails_traces_the_network_whole(monkeypatch, caplog):
    """A SwinUNETR whose two-part conversion raises still converts, traced whole, and says so in
    the log; so does one of a MONAI whose forward reads otherwise, and a run asked to trace whole."""
    import torch

    from SwinUNETRSegmentLib.models.checkpoint import load_model

    card, weights = catalog.resolve_model("demo")
    network = load_model(card, weights).float().eval()
    x = torch.zeros((1, 1, 64, 64, 64))

    def broken(net, example):
        raise AttributeError("'SwinUNETR' object has no attribute 'encoder10'")

    monkeypatch.setattr(openvino_backend, "_swinunetr_in_two_parts", broken)
    with torch.no_grad(), warnings.catch_warnings(), caplog.at_level("WARNING"):
        warnings.simplefilter("ignore")
        model = openvino_backend._to_openvino(network, x)
    assert model.get_friendly_name() != "swinunetr" and list(model.output(0).get_shape()) == [1, 14, 64, 64, 64]
    assert "converting the network in two parts failed ('SwinUNETR' object has no attribute" in caplog.text
    monkeypatch.setattr(openvino_backend, "_swinunetr_in_two_parts", lambda *a: pytest.fail("traced in two parts"))
    for name, value in (("SWINUNETR_FORWARDS", frozenset()), ("TRACE_WHOLE", None)):  # another MONAI; asked to
        with monkeypatch.context() as m, torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if value is None:
                m.setenv(openvino_backend.TRACE_WHOLE, "1")
            else:
                m.setattr(openvino_backend, name, value)
            assert openvino_backend._to_openvino(network, x).get_friendly_name() != "swinunetr"


def test_the_two_part_conversion_follows_this_monais_swinunetr_forward():
    """The body and head were written from MONAI 1.6.1's SwinUNETR.forward: another MONAI whose
    forward reads otherwise is traced whole; this one's must be the one followed, or the
    two-part conversion (and the memory it saves) silently stops being used."""
    from monai.networks.nets.swin_unetr import SwinUNETR

    assert openvino_backend._forward_is_known(SwinUNETR)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads this process's resident memory (Linux)")
def test_a_conversion_leaves_nothing_resident_in_the_engine(home):
    """The conversion runs in a child process: converting the built-in model in the engine's
    own process left about 0.5 GB resident (TorchScript's and OpenVINO's leftovers), which the
    engine service would carry for its whole life."""
    assert CONVERSION["engine_grew_mb"] < 100
    card, weights = catalog.resolve_model("demo")
    entry = openvino_backend.ir_path(Segmenter(card, weights, device="cpu").openvino.key).parent
    assert {p.name for p in (home / "openvino").iterdir()} <= {entry.name, "compiled"}  # no temporary folder left


@pytest.fixture()
def failing_converter(tmp_path, monkeypatch):
    """An empty catalog folder and a conversion process that fails the way OpenVINO's
    frontend does: a traceback, then the reason, exit 1."""
    monkeypatch.setenv("SWINUNETR_SEGMENT_HOME", str(tmp_path))
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\necho 'Traceback (most recent call last):' >&2\n"
                    "echo 'OpConversionFailure: aten::frobnicate has no OpenVINO conversion' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(fake))
    return tmp_path


def test_a_failed_conversion_says_why_in_one_line_and_the_run_goes_on_on_pytorch(failing_converter, one_window,
                                                                                caplog):
    """The child's reason reaches the engine's log as one line; the run is not held up."""
    seg = _segmenter(backend="openvino")
    with caplog.at_level("WARNING"):
        result = seg.segment(one_window)
    assert result.stats["backend"] == "torch"
    assert seg.openvino.failed == "OpConversionFailure: aten::frobnicate has no OpenVINO conversion"
    warned = [r.getMessage() for r in caplog.records if "cannot convert" in r.getMessage()]
    assert warned and "frobnicate" in warned[0] and "\n" not in warned[0]
    cache = failing_converter / "openvino"
    assert not cache.exists() or not any(cache.iterdir())


@pytest.mark.slow
def test_a_first_run_whose_conversion_fails_goes_on_on_pytorch(failing_converter, monkeypatch, part_ct):
    """A first run whose conversion pays but fails: PyTorch after all, every window counted once."""
    monkeypatch.setattr(openvino_backend, "CONVERT_MARGIN", 0.0)
    messages = []
    auto = _segmenter().segment(part_ct, progress=lambda p: messages.append(p))
    assert auto.stats["backend"] == "torch" and "converted_in_run" not in auto.stats
    assert any("converting demo" in p.message for p in messages)
    done = [p.done for p in messages if p.stage == "inference" and p.message.startswith("window")]
    assert done[-1] == auto.stats["windows_total"] and done == sorted(done)
    torch_only = _segmenter(backend="torch").segment(part_ct)
    np.testing.assert_array_equal(auto.labels.array, torch_only.labels.array)


def test_auto_without_a_conversion_runs_on_pytorch_and_converts_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("SWINUNETR_SEGMENT_HOME", str(tmp_path))
    monkeypatch.setattr(openvino_backend, "convert_in_child", lambda *a, **k: pytest.fail("auto converted"))
    from conftest import make_affine

    from SwinUNETRSegmentLib.geometry import Volume

    vol = Volume(np.full((40, 40, 30), -1000, np.int16), make_affine((3, 3, 3)))
    vol.array[10:30, 10:30, 5:25] = 40
    result = _segmenter().segment(vol)
    assert result.stats["backend"] == "torch"
    assert not (tmp_path / "openvino").exists()


@pytest.fixture()
def not_yet_converted(home, monkeypatch):
    """The demo model as if it had never been converted: ``convert`` hands out the module's
    conversion (made for real by ``home``) and makes it "converted"; ``gate`` holds it."""
    state = {"converted": False, "calls": 0, "gate": threading.Event()}
    state["gate"].set()

    def convert(self, spare_core=True):
        state["calls"] += 1
        state["gate"].wait(30)
        path = openvino_backend.ir_path(self.key)
        assert path.is_file()
        state["converted"] = True
        return path

    monkeypatch.setattr(openvino_backend.Conversion, "convert", convert)
    monkeypatch.setattr(openvino_backend.Conversion, "converted", property(lambda self: state["converted"]))
    return state


def test_a_long_auto_run_converts_once_it_pays_and_finishes_on_openvino(not_yet_converted, part_ct, monkeypatch):
    """A run whose PyTorch windows left would outlast the conversion converts in the run and
    runs its windows again on OpenVINO, letting go of the PyTorch network: its labels are
    exactly what the next run on the same scan gives, on the input grid, and PyTorch's to
    float rounding."""
    monkeypatch.setattr(openvino_backend, "CONVERT_MARGIN", 0.0)  # every run "pays" here
    messages = []
    seg = _segmenter()
    result = seg.segment(part_ct, progress=lambda p: messages.append((p.stage, p.message, p.done)))
    stats = result.stats
    assert stats["backend"] == "openvino" and stats["converted_in_run"] and not_yet_converted["calls"] == 1
    assert 1 <= stats["windows_torch"] < stats["windows_run"]
    assert not seg.loaded  # no PyTorch copy of the weights beside OpenVINO's
    assert any("converting demo for OpenVINO" in m for _, m, _ in messages)
    # the bar never went back: it waited while OpenVINO redid PyTorch's windows, then counted on
    done = [d for stage, m, d in messages if stage == "inference" and m.startswith("window")]
    assert done[-1] == stats["windows_total"] and done == sorted(done)
    assert result.labels.same_grid(part_ct)
    # the next run of the same engine kind finds the conversion: the same labels, voxel for voxel
    again = _segmenter().segment(part_ct)
    assert again.stats["backend"] == "openvino" and "converted_in_run" not in again.stats
    np.testing.assert_array_equal(result.labels.array, again.labels.array)
    torch_only = _segmenter(backend="torch").segment(part_ct)
    assert (result.labels.array == torch_only.labels.array).mean() > 0.999


def test_the_in_run_conversion_pays_where_it_was_measured_to():
    """The decision on the figures of benchmarks/README.md (sessions 10 to 12): the hold-out
    chest CT's 48 feature-48 windows at 3.3 s each on a bfloat16 CPU convert (OpenVINO: 100 s
    against 166 s); so do 30 windows at the 11 s of an AVX2-only CPU in float32; the demo's
    twelve short windows, a handful of feature-48 windows and a run with nothing left do not."""
    def after_first_call(seconds_per_window, gain, windows=48, parameters=62_000_000):
        w = openvino_backend.ConvertWhenItPays(None, windows, openvino_backend.conversion_seconds(parameters), gain)
        w.probed = seconds_per_window  # a probe ran: the first window's call is warm
        w.torch_windows = w.torch_calls = w.warm_windows = 1
        w.warm_seconds = seconds_per_window
        return w.pays()

    assert after_first_call(3.3, openvino_backend.GAIN_BFLOAT16)
    assert after_first_call(11.0, openvino_backend.GAIN_FLOAT32, windows=30)
    assert not after_first_call(0.33, openvino_backend.GAIN_FLOAT32, windows=12, parameters=4_000_000)  # the demo
    assert not after_first_call(2.5, openvino_backend.GAIN_BFLOAT16, windows=12)
    assert not after_first_call(7.0, openvino_backend.GAIN_FLOAT32, windows=2)  # nothing left to win


def test_the_in_run_rule_leaves_out_the_first_calls_warm_up_and_decides_on_the_warm_calls(monkeypatch):
    """Where no probe ran (windows of 64^3 or less, the demo's) or the probe failed, the run's
    first call carries the network's warm-up: it is left out, however slow, and the warm
    calls' mean decides; after a probe that ran, the first window's call is warm and counts."""
    calls = iter([30.0, 0.4, 0.4, 0.4, 6.0, 6.0])  # seconds per call: a warm-up, warm calls, a slow patch
    clock = {"t": 0.0}
    monkeypatch.setattr(openvino_backend.time, "perf_counter", lambda: clock["t"])

    def network(batch):
        clock["t"] += next(calls)
        return batch

    one = np.zeros((1, 1, 4, 4, 4), np.float32)
    w = openvino_backend.ConvertWhenItPays(network, 30, 20.0, 0.5)  # pays above 30 s saved (20 x 1.5)
    assert not w.pays()
    for _ in range(5):  # 29 left x 30 s x 0.5 = 435 s would have converted after the warm-up
        w(one)
    assert w.warm_windows == 4 and w.warm_seconds == pytest.approx(7.2) and w.torch_calls == 5
    with pytest.raises(openvino_backend.ConversionPays) as raised:
        w(one)  # 24 left x (13.2 s / 5) x 0.5 = 31.7 s saved
    assert raised.value.torch_windows == 6

    for probed, decides in ((None, False), (0.0, False), (9.0, True)):  # no probe, a failed one, one that ran
        calls = iter([9.0])
        first = openvino_backend.ConvertWhenItPays(network, 30, 20.0, 0.5)
        first.probed = probed
        if decides:
            with pytest.raises(openvino_backend.ConversionPays):
                first(one)  # 29 left x 9 s x 0.5 = 130 s saved
        else:
            first(one)
            assert first.torch_windows == 1 and first.warm_windows == 0


def test_a_probe_window_scaled_by_a_windows_voxels_decides_before_the_first_window(monkeypatch):
    """The probe's estimate is its time scaled by a window's voxels: a 64^3 call of 2 s stands
    for 6.75 s on 96^3; 60 such windows without bfloat16 pay for a feature-48 conversion before
    the first window, 4 do not (the windows' own timing decides then), and a window no larger
    than the probe's is not probed."""
    clock = {"t": 0.0}
    monkeypatch.setattr(openvino_backend.time, "perf_counter", lambda: clock["t"])

    def network(x):  # 2 s of this test's clock per 64^3 of voxels
        clock["t"] += 2.0 * x.numel() / 64**3
        return x

    cost = openvino_backend.conversion_seconds(62_000_000)
    for windows, pays in ((60, True), (4, False)):
        w = openvino_backend.ConvertWhenItPays(network, windows, cost, openvino_backend.GAIN_FLOAT32)
        if pays:
            with pytest.raises(openvino_backend.ConversionPays) as caught:
                w.probe((96, 96, 96), 1, None, "cpu")
            assert caught.value.torch_windows == 0
        else:
            w.probe((96, 96, 96), 1, None, "cpu")
        assert w.probed == pytest.approx(6.75) and w.torch_windows == 0
        w.probe((96, 96, 96), 1, None, "cpu")  # once per run
        assert clock["t"] == pytest.approx(2.0)
        clock["t"] = 0.0
    small = openvino_backend.ConvertWhenItPays(network, 60, cost, openvino_backend.GAIN_FLOAT32)
    small.probe((64, 64, 64), 1, None, "cpu")
    assert small.probed is None and clock["t"] == 0.0


def test_a_run_whose_probe_says_converting_pays_runs_no_window_on_pytorch_first(monkeypatch, part_ct):
    """A 96^3 window (the btcv cards') is probed on 64^3 before the first window; where that
    pays the run converts before any window ran on PyTorch (here the conversion "fails": the
    run then goes on on PyTorch from its first window, labels on the input grid)."""
    import dataclasses

    from SwinUNETRSegmentLib.progress import ProgressTracker

    monkeypatch.setattr(openvino_backend, "CONVERT_MARGIN", 0.0)  # every run "pays" here
    monkeypatch.setattr(openvino_backend.Conversion, "converted", property(lambda self: False))
    held, converts = [], []
    monkeypatch.setattr(ProgressTracker, "hold_until", lambda self, done: held.append(done))

    def convert_in_run(self, tracker, check_cancel):  # a conversion that failed, as Conversion records it
        converts.append(1)
        self.openvino.failed = "stopped by the test"

    monkeypatch.setattr(Segmenter, "_convert_in_run", convert_in_run)
    card, weights = catalog.resolve_model("demo")
    card = dataclasses.replace(card, roi_size=(96, 96, 96))
    result = Segmenter(card, weights, device="cpu").segment(part_ct)
    assert converts == [1] and held == [0]
    assert result.stats["backend"] == "torch" and result.labels.same_grid(part_ct)


def test_a_short_auto_run_stays_on_pytorch_and_is_never_held_up(not_yet_converted, one_window):
    result = _segmenter().segment(one_window)  # the demo: seconds, against a conversion of about 7.5 s
    assert result.stats["backend"] == "torch" and not_yet_converted["calls"] == 0


@pytest.mark.slow
def test_float32_windows_that_may_convert_run_one_per_call(not_yet_converted, one_window, part_ct, monkeypatch):
    """Memory of a first run on a CPU without native bfloat16: its float32 PyTorch windows
    before a conversion go one per call (two cost 4.6 GB instead of 2.7 at feature size 48),
    as every CPU run's do unless asked for more, and the C heap is handed back before the
    conversion."""
    from SwinUNETRSegmentLib.inference import devices, memory

    trims = []
    monkeypatch.setattr(memory, "release_free_memory", lambda: trims.append(1) or True)
    monkeypatch.setattr("SwinUNETRSegmentLib.inference.engine.release_free_memory", memory.release_free_memory)
    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: False)
    monkeypatch.setattr(openvino_backend, "CONVERT_MARGIN", 0.0)
    card, weights = catalog.resolve_model("demo")

    def run(volume=one_window, **fast):  # the demo card's batch is 1: a card allowing two
        return Segmenter(card, weights, device="cpu", sw_batch_size=2, fast=FastPath(**fast)).segment(volume)

    result = run(part_ct)
    assert result.stats["windows_per_call_torch"] == 1 and result.stats["precision"] == "float32"
    assert result.stats["converted_in_run"]
    assert trims, "the C heap was not handed back before the conversion"
    assert run(backend="torch", cpu_batch=2).stats["windows_per_call"] == 2  # what the caller asks
    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: True)
    not_yet_converted["converted"] = False
    assert run().stats["windows_per_call"] == 1


def test_cancel_during_an_in_run_conversion_stops_at_once(not_yet_converted, part_ct, monkeypatch):
    import time

    monkeypatch.setattr(openvino_backend, "CONVERT_MARGIN", 0.0)
    not_yet_converted["gate"].clear()  # the conversion takes as long as the test says
    cancel, asked = threading.Event(), []

    def progress(p):
        if "converting" in p.message and not asked:
            asked.append(time.monotonic())
            cancel.set()

    with pytest.raises(CancelledError):
        _segmenter().segment(part_ct, progress=progress, cancel=cancel)
    assert asked and time.monotonic() - asked[0] < 2.0  # not after the conversion
    assert not not_yet_converted["converted"]
    not_yet_converted["gate"].set()  # the conversion thread finishes its cache entry on its own
    for worker in list(openvino_backend._conversions.values()):
        worker.join(60)
    assert not_yet_converted["converted"]


def test_the_service_converts_in_the_background_after_a_pytorch_job(not_yet_converted, one_window):
    """What the engine service does after a job that ran on PyTorch: the conversion runs in a
    thread, so that the next job is on OpenVINO; once converted there is nothing to start."""
    seg = _segmenter()
    assert seg.segment(one_window).stats["backend"] == "torch"
    assert seg.convert_openvino_in_background()
    for worker in list(openvino_backend._conversions.values()):
        worker.join(60)
    assert not_yet_converted["calls"] == 1 and not seg.convert_openvino_in_background()
    assert seg.segment(one_window).stats["backend"] == "openvino"
    assert not _segmenter(backend="torch").convert_openvino_in_background()


def test_a_folder_converts_after_its_first_scan_only_when_the_rest_pays(not_yet_converted, one_window):
    """A folder of scans: after the first (on PyTorch) the rest's expected PyTorch time decides,
    by the rule of a run's own windows (a few seconds left: no; hours: yes)."""
    seg = _segmenter()
    seg.segment(one_window)
    assert seg.convert_openvino_if_it_pays(5.0) is None and not_yet_converted["calls"] == 0
    assert seg.convert_openvino_if_it_pays(3600.0) is not None and not_yet_converted["calls"] == 1
    assert seg.convert_openvino_if_it_pays(3600.0) is None  # converted: nothing more to do
    assert seg.segment(one_window).stats["backend"] == "openvino"


def test_float32_stays_on_pytorch(home, small_ct):
    """float32 promises the MONAI reference's labels exactly: only PyTorch gives them."""
    result = _segmenter(precision="float32").segment(small_ct)
    assert result.stats["backend"] == "torch" and result.stats["precision"] == "float32"


def test_progress_counts_every_window_and_cancel_stops_within_one(home, example_ct):
    seg = _segmenter(backend="openvino")
    seen = []
    cancel = threading.Event()

    def progress(p):
        if p.stage == "inference":
            seen.append((p.done, p.total))
            if p.done == 2:
                cancel.set()

    with pytest.raises(CancelledError):
        seg.segment(example_ct, progress=progress, cancel=cancel)
    assert seen[-1][0] == 2, seen  # stopped in the window after the one that asked
    # the engine is usable again right after, and reports every window
    seen.clear()
    result = seg.segment(example_ct, progress=lambda p: p.stage == "inference" and seen.append((p.done, p.total)))
    assert result.stats["backend"] == "openvino"
    total = result.stats["windows_total"]
    assert [d for d, _ in seen if d > 0] == list(range(1, total + 1))


def test_openvino_asked_for_where_it_is_missing_says_how_to_get_it(home, small_ct, monkeypatch):
    monkeypatch.setattr(openvino_backend, "available", lambda: False)
    with pytest.raises(UserError, match="pip install openvino"):
        _segmenter(backend="openvino").segment(small_ct)
    assert _segmenter().segment(small_ct).stats["backend"] == "torch"


def test_the_command_line_runs_on_openvino_beside_jemalloc(home, example_ct, tmp_path):
    """The console script re-executes itself on jemalloc where it is installed; OpenVINO's
    CPU plugin aborts under it ("free(): invalid pointer"), so a run that will use
    OpenVINO keeps the system allocator, and a PyTorch run still gets jemalloc."""
    from SwinUNETRSegmentLib.cli import runs_on_a_conversion, runs_on_openvino
    from SwinUNETRSegmentLib.inference.memory import allocator_env, jemalloc_library

    ct = str(tmp_path / "ct.nii.gz")
    from helpers import write_nifti

    write_nifti(example_ct, Path(ct))
    assert runs_on_openvino(["-i", ct, "-o", "x.seg.nrrd"])
    assert runs_on_openvino(["serve"])
    assert not runs_on_openvino(["-i", ct, "-o", "x.seg.nrrd", "--backend", "torch"])
    assert not runs_on_openvino(["-i", ct, "-o", "x.seg.nrrd", "--precision", "float32"])
    assert not runs_on_openvino(["models", "list"])
    assert not runs_on_openvino(["-i", ct, "-o", "x.seg.nrrd", "--device", "cuda"])
    # nothing converted yet: without native bfloat16 a long run converts once that pays, which
    # it cannot beside jemalloc; with it only a large model's run may (OpenVINO saves 40 % of a
    # feature-48 run there): the demo's keeps jemalloc, the btcv model's does not
    from SwinUNETRSegmentLib.inference import devices

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(devices, "cpu_flags_have_bf16", lambda: True)
        assert runs_on_openvino(["-i", ct, "-o", "x.seg.nrrd"])  # the module's conversion of demo
        # on the conversion from the first window: no PyTorch window for raised glibc thresholds
        assert runs_on_a_conversion(["-i", ct, "-o", "x.seg.nrrd"])
        assert not runs_on_a_conversion(["-i", ct, "-o", "x.seg.nrrd", "--backend", "torch"])
        assert not runs_on_a_conversion(["-i", ct, "-o", "x.seg.nrrd", "--precision", "float32"])
        assert not runs_on_a_conversion(["serve"])
        mp.setenv("SWINUNETR_SEGMENT_HOME", str(tmp_path / "nothing-converted"))
        assert not runs_on_openvino(["-i", ct, "-o", "x.seg.nrrd"])
        assert runs_on_openvino(["-i", ct, "-o", "x.seg.nrrd", "--model", "btcv"])  # no weights fetched for it
        assert not runs_on_openvino(["-i", ct, "-o", "x.seg.nrrd", "--model", "btcv", "--backend", "torch"])
        mp.setattr(devices, "cpu_flags_have_bf16", lambda: False)
        assert runs_on_openvino(["-i", ct, "-o", "x.seg.nrrd"])
        assert not runs_on_a_conversion(["-i", ct, "-o", "x.seg.nrrd"])  # PyTorch first: thresholds raised
    monkey = pytest.MonkeyPatch()
    monkey.setenv("ATEN_CPU_CAPABILITY", "avx2")  # PyTorch held to AVX2: no native bfloat16 for it
    try:
        assert not devices.cpu_flags_have_bf16()
    finally:
        monkey.undo()
    if jemalloc_library():
        assert "LD_PRELOAD" not in allocator_env({}, openvino=True)
        assert jemalloc_library() in allocator_env({})["LD_PRELOAD"]
    exe = Path(sys.executable).with_name("swinunetr-segment")
    if not exe.exists():
        pytest.skip("the console script is not installed in this environment")
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "_SWINUNETR_SEGMENT_REEXEC")}
    out = tmp_path / "labels.nii.gz"
    run = subprocess.run([str(exe), "-i", ct, "-o", str(out)], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    labels, _ = read_volume(out)
    assert labels.same_grid(example_ct)


def test_conversion_sends_no_telemetry(home):
    """OpenVINO's converter reports usage unless the user opted out: ours never loads it."""
    code = (
        "import sys; from SwinUNETRSegmentLib.inference.cpu import openvino_backend as ob; "
        "from SwinUNETRSegmentLib.models import catalog; from SwinUNETRSegmentLib.inference.engine import Segmenter; "
        "c, w = catalog.resolve_model('demo'); s = Segmenter(c, w, device='cpu'); s.openvino.key; "
        "import openvino.tools.ovc; print(sys.modules.get('openvino_telemetry'))"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO / "SwinUNETRSegment"))
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0, run.stderr[-1000:]
    assert run.stdout.strip() == "None"


def test_a_conversion_clears_what_a_killed_one_left_and_not_one_under_way(home):
    """A conversion killed midway (a timeout, a crash, the laptop switched off) leaves its
    temporary folder, up to a whole IR; the next conversion removes it, but not the folder of
    a conversion another process is running right now."""
    assert CONVERSION["leftovers"] == {"stale": False, "live": True}


def test_a_conversion_that_hangs_is_stopped_with_a_one_line_reason(monkeypatch, tmp_path):
    """A conversion's process that never ends is killed at the time limit, and the engine
    gets a reason to log and goes on on PyTorch, instead of a run that waits for ever."""
    import time

    hang = tmp_path / "python"
    hang.write_text("#!/bin/sh\nexec sleep 60\n")
    hang.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(hang))
    monkeypatch.setattr(openvino_backend, "CONVERT_TIMEOUT_S", 1.0)
    monkeypatch.setenv("SWINUNETR_SEGMENT_HOME", str(tmp_path))
    card, weights = catalog.resolve_model("demo")
    t = time.monotonic()
    with pytest.raises(RuntimeError, match="^the conversion did not finish in 1 s and was stopped$"):
        openvino_backend.convert_in_child(card, weights, "k" * 32, 1)
    assert time.monotonic() - t < 15
    assert not openvino_backend.is_converted("k" * 32)


def test_the_conversion_process_hands_its_large_buffers_back_unless_the_user_set_thresholds(monkeypatch, tmp_path):
    """The raised thresholds keep freed buffers for PyTorch's next window; the conversion has
    none, and under them its process peaked at 2.7 GB instead of 1.2 (feature size 48). glibc's
    dynamic threshold kept 340 MB of its trace's activations: the child runs on a fixed mmap
    threshold, where we raised them and where nobody set any. The user's own thresholds reach it
    unchanged."""
    from SwinUNETRSegmentLib.inference import devices, memory

    monkeypatch.setattr(devices, "cpu_flags_have_bf16", lambda: False)
    seen = []

    def run(cmd, env=None, **kwargs):
        seen.append(env)
        return subprocess.CompletedProcess(cmd, 1, "", "RuntimeError: stopped by the test\n")

    monkeypatch.setattr(subprocess, "run", run)
    card, weights = catalog.resolve_model("demo")
    raised = memory.allocator_env({}, openvino=True)
    assert raised["MALLOC_TRIM_THRESHOLD_"] == str(memory.DEFAULT_THRESHOLD)
    for env in (raised, {}, {"MALLOC_TRIM_THRESHOLD_": "4096"}):
        monkeypatch.setattr(os, "environ", dict(env, SWINUNETR_SEGMENT_HOME=str(tmp_path)))
        with pytest.raises(RuntimeError, match="stopped by the test"):
            openvino_backend.convert_in_child(card, weights, "k" * 32, 1)
    ours, unset, users = seen
    for env in (ours, unset):
        assert env["MALLOC_MMAP_THRESHOLD_"] == str(openvino_backend.CONVERSION_MMAP_THRESHOLD)
        assert "MALLOC_TRIM_THRESHOLD_" not in env and memory.RAISED_BY_US not in env
    assert users["MALLOC_TRIM_THRESHOLD_"] == "4096" and "MALLOC_MMAP_THRESHOLD_" not in users
    assert ours["SWINUNETR_SEGMENT_OPENVINO_CACHE"] == str(tmp_path / "openvino")
