"""The network on OpenVINO's CPU runtime: converted once per checkpoint, cached, and run
window by window with progress and cancel.

Why: on CPUs OpenVINO's graph compiler runs SwinUNETR 1.5 to 2.4 x faster than eager
PyTorch with this package's fast path (``benchmarks/bench_network.py``), and it keeps its
activation buffers between calls (no page-fault churn). PyTorch stays the path on GPUs,
on MPS, for ``precision="float32"`` (the MONAI reference's labels exactly) and wherever
OpenVINO is missing or cannot convert the network.

The converted model (OpenVINO IR: an XML graph and a binary of weights; loading it runs
no code) is cached under the catalog's folder in ``openvino/<key>/``, where the key is the
SHA256 of the checkpoint file together with the card's network, the window size and the
OpenVINO version: another checkpoint, window or OpenVINO gets its own conversion. A
conversion is written to a temporary folder and renamed into place, so a cache entry is
either whole or absent. OpenVINO's own compiled-blob cache (``CACHE_DIR``) sits beside it,
so that compiling the IR again in a later process takes a fraction of the first time.

This module is written by hand because no library does this caching for a MONAI
checkpoint; the conversion and the runtime are OpenVINO's (``openvino.convert_model``,
``Core.compile_model``, ``InferRequest.start_async``/``cancel``).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Optional

from SwinUNETRSegmentLib.errors import CancelledError, UserError
from SwinUNETRSegmentLib.inference.memory import RAISED_BY_US, release_mapped_files

__all__ = [
    "available",
    "no_telemetry",
    "preloaded_allocator",
    "version",
    "cache_root",
    "ir_key",
    "ir_path",
    "is_converted",
    "convert",
    "convert_checkpoint",
    "convert_in_child",
    "OpenVINONetwork",
    "ConversionPays",
    "ConvertWhenItPays",
]

log = logging.getLogger(__name__)

#: bump when the way the graph is converted changes, so that old cache entries are not used
#: (2: shifted-window attention grouped by mask plane, a third of the compiled model's memory)
FORMAT = 2
_WAIT_MS = 100  # how often a running window looks at the cancel flag

#: "auto" on a checkpoint not yet converted converts during the run when the time OpenVINO
#: would save on the windows left exceeds the conversion's cost times this margin. Measured on
#: a 2-core EPYC with native bfloat16 (benchmarks/README.md, sessions 7 and 8): converting and
#: compiling costs 7.5 s at feature size 12 and 22 s at feature size 48 (6.5 s + 15 s per 62
#: million weights, :func:`conversion_seconds`). OpenVINO then saves 40 % of a feature-48 run
#: in bfloat16 (the hold-out chest CT, medians: 100.0 s against 166.6 s, session 11; per window
#: 1.17 s against 2.50 s, session 12; it was 18 % in session 7, before the shifted windows'
#: attention went by mask plane) and 39 % of a window where PyTorch runs float32 (3.45 s
#: against the engine's 5.69 s on the same CPU in float32; session 10's AVX2-only EPYC: 6.85 s
#: against 11.14 s). A run that would not win by the margin stays on PyTorch and is never held up.
CONVERT_MARGIN = 1.5
#: a conversion's process still running after this long is stopped (and the run goes on on
#: PyTorch): feature size 48 converts in 20-40 s on a 2-core laptop-class CPU, so an hour means
#: it hangs, and a run waiting for it, or the next conversion of the same checkpoint, must not
CONVERT_TIMEOUT_S = 3600.0
#: bytes: glibc's mmap threshold in a conversion's process (:func:`convert_in_child`); None:
#: glibc's own dynamic rule (what it was until session 12)
CONVERSION_MMAP_THRESHOLD: Optional[int] = 1 << 20
#: set to "1" in the environment: trace a SwinUNETR whole, as before session 13 (:func:`_to_openvino`)
TRACE_WHOLE = "SWINUNETR_SEGMENT_TRACE_WHOLE"
#: SHA256 of the source of MONAI's ``SwinUNETR.forward`` that :func:`_swinunetr_parts` follows
#: (MONAI 1.6.1): a MONAI whose forward reads otherwise is traced whole, since a body and head
#: that no longer add up to its forward would convert without an error and give other outputs
SWINUNETR_FORWARDS = frozenset({"5b266744f11fa9c423a58ae09ff864fd56c0a48bc967eabd1324a90026ad8653"})
GAIN_BFLOAT16 = 0.40
GAIN_FLOAT32 = 0.40


def saving_pays(torch_seconds_left: float, cost_s: float, gain: float) -> bool:
    """Whether OpenVINO's saving (``gain`` of ``torch_seconds_left`` of PyTorch inference still
    to come) exceeds the conversion's ``cost_s`` by :data:`CONVERT_MARGIN`."""
    return gain * torch_seconds_left > CONVERT_MARGIN * cost_s


def conversion_seconds(parameters: int) -> float:
    """The estimated seconds to convert and compile a network of ``parameters`` weights
    (two measured points on a 2-core EPYC: 4.1 M weights 7.5 s, 62 M weights 21.7 s)."""
    return 6.5 + 15.2 * parameters / 62e6


def no_telemetry() -> None:
    """Keep OpenVINO's model converter from sending usage events: it does so unless the user
    opted out (openvino-telemetry, opt-out by default for the converter). Its imports fall
    back to a stub when ``openvino_telemetry`` cannot be imported; a clinician's engine
    reports nothing anywhere."""
    import sys

    if "openvino_telemetry" not in sys.modules:
        sys.modules["openvino_telemetry"] = None  # type: ignore[assignment]  # import now raises ImportError


def available() -> bool:
    """Whether the ``openvino`` package can be imported here."""
    no_telemetry()
    try:
        import openvino  # noqa: F401
    except Exception:  # ImportError, or a broken native library
        return False
    return True


@functools.lru_cache(maxsize=1)
def preloaded_allocator() -> Optional[str]:
    """The malloc replacement loaded into this process (jemalloc, tcmalloc, TBB's proxy),
    or None. OpenVINO's CPU plugin aborts beside one ("free(): invalid pointer"). Read once:
    a preloaded allocator is there from the process's start."""
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as f:
            maps = f.read()
    except OSError:  # not Linux: no LD_PRELOAD here
        return None
    for name in ("libjemalloc", "libtcmalloc", "libtbbmalloc_proxy", "libmimalloc"):
        if name in maps:
            return name
    return None


def version() -> str:
    no_telemetry()
    import openvino

    return str(openvino.__version__)


def cache_root() -> Path:
    """``<catalog home>/openvino``: next to the installed models (a conversion's child
    process is told its parent's, ``SWINUNETR_SEGMENT_OPENVINO_CACHE``)."""
    given = os.environ.get("SWINUNETR_SEGMENT_OPENVINO_CACHE")
    if given:
        return Path(given)
    from SwinUNETRSegmentLib.models.catalog import home_dir

    return home_dir() / "openvino"


def ir_key(checkpoint_sha256: str, network: dict, roi_size: Sequence[int]) -> str:
    """The cache key of a conversion: checkpoint, network, window, OpenVINO version."""
    text = json.dumps(
        {
            "format": FORMAT,
            "checkpoint": checkpoint_sha256,
            "network": network,
            "roi": [int(r) for r in roi_size],
            "openvino": version(),
        },
        sort_keys=True,
    )
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def ir_path(key: str) -> Path:
    return cache_root() / key / "model.xml"


def is_converted(key: str) -> bool:
    p = ir_path(key)
    return p.is_file() and p.with_suffix(".bin").is_file()


def convert(network, roi_size: Sequence[int], key: str, in_channels: int = 1) -> Path:
    """Convert ``network`` (a float32 ``torch.nn.Module`` in eval mode) for one window of
    ``roi_size`` and store it under ``key``; returns the IR's path. Raises what OpenVINO
    raises when the network cannot be converted."""
    no_telemetry()
    import openvino as ov
    import torch

    final = ir_path(key).parent
    final.parent.mkdir(parents=True, exist_ok=True)
    example = torch.zeros((1, in_channels) + tuple(int(r) for r in roi_size))
    t = time.perf_counter()
    _remove_leftovers(final.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=final.parent))
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # Tracing warns about every Python branch on a shape; the shape is fixed here
            # (SwinUNETR's window partition reshapes by constants), so they say nothing.
            warnings.simplefilter("ignore")
            model = _to_openvino(network, example)
        ov.save_model(model, str(tmp / "model.xml"), compress_to_fp16=False)
        _apply_umask(tmp)
        try:
            os.replace(tmp, final)
        except OSError:  # another process converted the same checkpoint meanwhile
            if not is_converted(key):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("converted the network for OpenVINO in %.1f s (%s)", time.perf_counter() - t, final)
    return final / "model.xml"


def _traced(module, example: tuple, shapes: Sequence[Sequence[int]]):
    """``module`` traced on ``example`` (a tuple of inputs) and converted for inputs of
    ``shapes``. Traced here rather than by convert_model, which calls torch.jit.trace with its
    default check_trace=True: two more forward passes to compare, 42 s instead of 12 s at
    feature size 48 for a bit-identical IR (benchmarks/README.md, session 8)."""
    import openvino as ov
    import torch

    traced = torch.jit.freeze(torch.jit.trace(module, example, strict=False, check_trace=False))
    return ov.convert_model(traced, example_input=example, input=[ov.PartialShape(list(s)) for s in shapes])


def _swinunetr_parts(net):
    """MONAI ``SwinUNETR.forward`` cut in two at ``dec0``, the decoder's output at half
    resolution (see :func:`_to_openvino`): the body (the Swin transformer, whose window sizes,
    shifts and masks follow the grid, and the decoder down to ``dec0``), and the head
    (``encoder1`` on the input, ``decoder1`` and the output block: full-resolution
    convolutions, normalisations and a concatenation, whose traced graph holds no size).
    Written out because MONAI's forward has no way to stop at ``dec0``; it follows the forward
    whose source :data:`SWINUNETR_FORWARDS` names, and :func:`_to_openvino` uses it for no
    other."""
    import torch

    class Body(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, x_in):
            n = self.net
            hidden = n.swinViT(x_in, n.normalize)
            enc1 = n.encoder2(hidden[0])
            enc2 = n.encoder3(hidden[1])
            enc3 = n.encoder4(hidden[2])
            dec3 = n.decoder5(n.encoder10(hidden[4]), hidden[3])
            return n.decoder2(n.decoder3(n.decoder4(dec3, enc3), enc2), enc1)

    class Head(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, x_in, dec0):
            n = self.net
            return n.out(n.decoder1(dec0, n.encoder1(x_in)))

    return Body().eval(), Head().eval()


def _to_openvino(network, example):
    """``network`` as an OpenVINO model for inputs shaped like ``example``.

    Tracing runs the network forward once, and a SwinUNETR's full-resolution blocks
    (``encoder1`` and ``decoder1``, 48 channels of 96^3 in float32 at feature size 48 are
    170 MB a tensor) held 1.5 GB of the trace's 2.2-GB peak. So a MONAI SwinUNETR whose
    forward is MONAI's own is traced in two parts: the body (the Swin transformer and the
    decoder down to ``dec0``) on the whole window, and the full-resolution head on a 32^3
    grid; then the head's inputs are wired to the body's input and output, with OpenVINO's
    graph API, as one model. The IR is the one-piece trace's byte for byte (the weights file)
    and gives the same outputs bit for bit; the conversion's peak is 1.2 GB instead of 2.2
    at feature size 48, and it traces in half the time (benchmarks/README.md, session 13).
    Any other network is traced whole, and so is a SwinUNETR whose two-part conversion fails,
    one of a MONAI whose forward is not the one followed here (:data:`SWINUNETR_FORWARDS`),
    or any network where ``SWINUNETR_SEGMENT_TRACE_WHOLE=1`` is set (what the conversion did
    until session 13; ``benchmarks/bench_conversion.py``'s ``child-whole``)."""
    from monai.networks.nets.swin_unetr import SwinUNETR

    if type(network).forward is SwinUNETR.forward and os.environ.get(TRACE_WHOLE) != "1":
        if not _forward_is_known(SwinUNETR):
            log.info("this MONAI's SwinUNETR.forward is not the one the two-part conversion follows; tracing whole")
            return _traced(network, (example,), [example.shape])
        try:
            return _swinunetr_in_two_parts(network, example)
        except Exception as exc:  # OpenVINO's frontends raise many types; the whole trace still works
            log.warning("converting the network in two parts failed (%s); tracing it whole",
                        " ".join(str(exc).split())[:200])
    return _traced(network, (example,), [example.shape])


def _forward_is_known(cls) -> bool:
    """Whether ``cls.forward``'s source is one of :data:`SWINUNETR_FORWARDS`."""
    import inspect
    import textwrap

    try:
        source = textwrap.dedent(inspect.getsource(cls.forward))
    except (OSError, TypeError):  # no source shipped
        return False
    return hashlib.sha256(source.encode()).hexdigest() in SWINUNETR_FORWARDS


def _swinunetr_in_two_parts(network, example):
    """:func:`_to_openvino` for a MONAI SwinUNETR: the body traced on ``example``, the head
    on a small grid, wired into one model."""
    import openvino as ov
    import torch

    body_part, head_part = _swinunetr_parts(network)
    body = _traced(body_part, (example,), [example.shape])
    (x_in,) = body.get_parameters()
    dec0 = body.get_results()[0].input_value(0)
    # the head's inputs on a small grid, in the window's proportion of input to dec0 (2)
    spatial = example.dim() - 2
    factor = int(example.shape[2]) // int(dec0.get_shape()[2])
    small = (torch.zeros(tuple(example.shape[:2]) + (16 * factor,) * spatial),
             torch.zeros(tuple(dec0.get_shape()[:2]) + (16,) * spatial))
    head = _traced(head_part, small, [example.shape, list(dec0.get_shape())])
    for parameter, source in zip(head.get_parameters(), (x_in.output(0), dec0)):
        for target in list(parameter.output(0).get_target_inputs()):
            target.replace_source_output(source)
    model = ov.Model(head.get_results(), [x_in], "swinunetr")
    model.validate_nodes_and_infer_types()
    return model


def _remove_leftovers(root: Path) -> None:
    """Remove the temporary folders of conversions that were killed (a timeout, a crash, the
    machine switched off) before they could clean up: hidden ``.KEY-*`` folders untouched
    for longer than a conversion may take, so that one still under way is left alone. Each
    holds up to a whole IR (250 MB at feature size 48)."""
    now = time.time()
    for entry in root.glob(".*-*"):
        try:
            if entry.is_dir() and now - entry.stat().st_mtime > CONVERT_TIMEOUT_S:
                shutil.rmtree(entry, ignore_errors=True)
        except OSError:  # removed meanwhile by another process
            pass


def convert_checkpoint(card, checkpoint: Path, key: str) -> Path:
    """Convert ``card``'s network with the weights of ``checkpoint`` and store it under
    ``key`` (what the conversion's child process runs): a float32 copy of the network with
    fused attention, which OpenVINO maps to its own attention operation, and the shifted
    windows' attention grouped by mask plane (eight ``(heads, n, n)`` planes per block instead
    of the ``(windows, heads, n, n)`` sum OpenVINO folds into constants; window_attention.py)."""
    from SwinUNETRSegmentLib.inference.cpu.window_attention import cached_window_attention
    from SwinUNETRSegmentLib.inference.network import fused_attention
    from SwinUNETRSegmentLib.models.checkpoint import load_model

    network = load_model(card, checkpoint).float().eval()
    in_channels = int(card.network_args.get("in_channels", 1))
    with fused_attention(network, True), cached_window_attention(network, True, by_mask=True):
        return convert(network, card.roi_size, key, in_channels)


def convert_in_child(card, checkpoint: Path, key: str, threads: int) -> Path:
    """:func:`convert_checkpoint` in a child Python process; returns the IR's path or raises
    RuntimeError with the child's one-line reason.

    Why a process: a conversion in the engine's own process leaves about 0.7 GB resident at
    feature size 48 after it is done (TorchScript keeps the traced graph's compilation unit,
    OpenVINO's frontend its own buffers; neither can be handed back), on top of a peak that
    stacks on the run's; the engine service, which converts in the background, would carry
    that for its whole life. A child's memory goes with it; its cache entry is written to a
    temporary folder and renamed into place, so a child killed midway leaves nothing behind.
    """
    import subprocess
    import sys

    package_root = Path(__file__).resolve().parents[3]  # the folder holding SwinUNETRSegmentLib
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(package_root)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["SWINUNETR_SEGMENT_OPENVINO_CACHE"] = str(cache_root())
    ours = env.pop(RAISED_BY_US, None)
    mine = env.get("MALLOC_MMAP_THRESHOLD_") or env.get("MALLOC_TRIM_THRESHOLD_")
    if CONVERSION_MMAP_THRESHOLD and (ours or not mine):
        # The raised thresholds keep freed buffers for PyTorch's next window (memory.allocator_env);
        # a conversion has no next window, and with them its peak was 2.7 GB instead of 1.2. glibc's
        # own dynamic threshold is no better for it: each large buffer freed raises the threshold
        # (up to 32 MB), so the trace's later activations land on the heap, between the graph's
        # small allocations, and stay resident. A fixed one returns them (feature size 48:
        # 2,356 -> 2,014 MB peak, the same seconds; benchmarks/README.md, session 12).
        env.pop("MALLOC_TRIM_THRESHOLD_", None)
        env["MALLOC_MMAP_THRESHOLD_"] = str(CONVERSION_MMAP_THRESHOLD)
    elif ours:  # (benchmarks/bench_conversion.py's "child-dynamic": glibc's own rule)
        env.pop("MALLOC_MMAP_THRESHOLD_", None)
        env.pop("MALLOC_TRIM_THRESHOLD_", None)
    cmd = [sys.executable, "-m", "SwinUNETRSegmentLib.inference.cpu.openvino_convert",
           "--checkpoint", str(checkpoint), "--key", key, "--threads", str(int(threads))]
    t = time.perf_counter()
    try:
        proc = subprocess.run(cmd, input=json.dumps(card.to_json()), capture_output=True, text=True, env=env,
                              timeout=CONVERT_TIMEOUT_S)
    except subprocess.TimeoutExpired:  # run() has killed the child; convert() clears its folder later
        limit = f"{CONVERT_TIMEOUT_S / 60:.0f} minutes" if CONVERT_TIMEOUT_S >= 60 else f"{CONVERT_TIMEOUT_S:.0f} s"
        raise RuntimeError(f"the conversion did not finish in {limit} and was stopped") from None
    if proc.returncode != 0 or not is_converted(key):
        lines = [line.strip() for line in (proc.stderr or "").splitlines() if line.strip()]
        raise RuntimeError(lines[-1] if lines else f"the conversion process ended with exit code {proc.returncode}")
    log.info("converted the network for OpenVINO in a child process in %.1f s", time.perf_counter() - t)
    return ir_path(key)


def _apply_umask(folder: Path) -> None:
    """mkdtemp makes 0700 folders: give the cache entry the user's umask's modes."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(folder, 0o777 & ~mask)
    for f in folder.iterdir():
        os.chmod(f, 0o666 & ~mask)


class OpenVINONetwork:
    """A converted network compiled for the CPU, called like the torch network:
    ``(B, C_in, X, Y, Z)`` float tensor -> ``(B, C_out, X, Y, Z)`` float32 logits.

    Each window runs as one asynchronous request; ``check_cancel`` is called every 0.1 s
    while it runs and, when it raises, the request is cancelled and the error goes on.

    Args:
        path: the IR's ``model.xml``.
        precision: "f32" or "bf16" (OpenVINO's inference precision hint).
        threads: CPU threads for inference; None leaves OpenVINO's choice.
    """

    def __init__(self, path: Path, precision: str = "f32", threads: Optional[int] = None):
        no_telemetry()
        import openvino as ov

        self.path, self.precision, self.threads = Path(path), precision, threads
        core = ov.Core()
        config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "LATENCY"}
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        blobs = self.path.parent.parent / "compiled"
        try:
            blobs.mkdir(parents=True, exist_ok=True)
            core.set_property({"CACHE_DIR": str(blobs)})
        except (OSError, RuntimeError):  # a read-only cache: compile every time
            pass
        t = time.perf_counter()
        self.compiled = core.compile_model(core.read_model(str(self.path)), "CPU", config)
        self.compile_seconds = time.perf_counter() - t
        self._cache_folder = self.path.parent.parent  # the IR's and the compiled blobs' folder
        release_mapped_files(self._cache_folder)  # compiling read the whole file; windows need a third
        self._request = self.compiled.create_infer_request()
        self._lock = threading.Lock()
        self.check_cancel: Callable[[], None] = lambda: None

    def release_memory(self) -> None:
        """Hand back the activation buffers OpenVINO keeps between windows (``CompiledModel.
        release_memory``; the next window allocates them again, in no measurable time): 650 MB
        at feature size 48 in float32 on 96^3 windows, resident beside the run's resampling and
        a warm engine's idle time otherwise."""
        with self._lock:
            try:
                self.compiled.release_memory()
            except (AttributeError, RuntimeError):  # an OpenVINO without it, or a plugin that cannot
                pass
            release_mapped_files(self._cache_folder)  # and the file pages the windows read again

    def __call__(self, batch):
        """The logits of ``batch``, in a tensor of their own."""
        import torch

        outs = [self._one(batch[i : i + 1], borrow=False) for i in range(batch.shape[0])]
        return torch.cat(outs) if len(outs) > 1 else outs[0]

    def borrow(self, batch):
        """As calling it, but a batch of one window comes back as OpenVINO's output buffer
        itself, which the next window overwrites: for a caller done with each window's logits
        before it asks for the next, as MONAI's sliding-window inference is (it weighs them in
        place and adds them into the stitched logits). A window's copy less: 47 MB at feature
        size 48 on 96^3, 40-45 MB off a run's peak (benchmarks/README.md, session 14)."""
        if batch.shape[0] != 1:
            return self(batch)
        return self._one(batch, borrow=True)

    def _one(self, window, borrow: bool):
        import numpy as np
        import torch

        x = np.ascontiguousarray(window.detach().to("cpu", torch.float32).numpy())
        with self._lock:
            req = self._request
            self.check_cancel()
            req.start_async([x])
            while not req.wait_for(_WAIT_MS):
                try:
                    self.check_cancel()
                except CancelledError:
                    req.cancel()
                    try:
                        req.wait()  # the request is free again for the next run
                    except RuntimeError:  # OpenVINO reports the cancelled request as an error
                        pass
                    raise
            out = req.get_output_tensor(0).data  # a view that keeps OpenVINO's tensor alive
            return torch.from_numpy(out if borrow else np.array(out, copy=True))


class Conversion:
    """One engine's checkpoint on OpenVINO: whether it may run there, its cache entry, and
    the compiled network (kept while the precision and thread count stay the same).

    Args:
        card: the model card (its network and window size are part of the key).
        checkpoint: the weights file; a network without a file (a caller's module) is never
            converted, as there is nothing to key its conversion by.
    """

    def __init__(self, card, checkpoint: Optional[Path]):
        self.card, self.checkpoint = card, checkpoint
        self._key: Optional[str] = None
        self._compiled: Optional[tuple[tuple, OpenVINONetwork]] = None
        self.failed: Optional[str] = None  # why a conversion or compilation failed (not retried)

    def usable(self, device, backend: str, precision: str) -> bool:
        """OpenVINO may run this run: a CPU run, not held to PyTorch or to float32, from a
        checkpoint file, with OpenVINO importable and no failure so far."""
        return (
            getattr(device, "type", str(device)) == "cpu"
            and backend != "torch"
            and precision != "float32"
            and self.checkpoint is not None
            and self.failed is None
            and available()
            and preloaded_allocator() is None
        )

    @property
    def key(self) -> str:
        if self._key is None:
            from SwinUNETRSegmentLib.models.checkpoint import sha256_file

            network = {"name": self.card.network, "args": self.card.network_args, "decoder": self.card.decoder}
            self._key = ir_key(sha256_file(self.checkpoint), network, self.card.roi_size)
        return self._key

    @property
    def converted(self) -> bool:
        return is_converted(self.key)

    def convert(self, spare_core: bool = True) -> Path:
        """The IR for this checkpoint, converted now when it is not in the cache, in a
        process of its own (:func:`convert_in_child`). ``spare_core``: trace on one core
        fewer (a conversion beside the user's work); False when a run waits for it."""
        if self.converted:
            return ir_path(self.key)
        import torch

        threads = torch.get_num_threads()
        try:
            # one core fewer for the tracing: the conversion is in the background of what the
            # user is doing (Slicer's main thread on a 2-core laptop), not in front of it
            threads = max(1, threads - 1) if spare_core else threads
            return convert_in_child(self.card, self.checkpoint, self.key, threads)
        except Exception as exc:  # the child's reason, or a failure to start it
            self.failed = " ".join(str(exc).split())[:200]
            raise

    def precision_for(self, fast) -> str:
        from SwinUNETRSegmentLib.inference.devices import cpu_has_native_bf16

        return "bf16" if cpu_has_native_bf16() and fast.precision in ("auto", "bfloat16") else "f32"

    def network(self, precision: str, threads: Optional[int]) -> OpenVINONetwork:
        """The compiled network for ``precision`` ("f32"/"bf16") and ``threads``, kept."""
        settings = (self.key, precision, threads)
        if self._compiled is None or self._compiled[0] != settings:
            self._compiled = None
            try:
                self._compiled = (settings, OpenVINONetwork(ir_path(self.key), precision, threads))
            except Exception as exc:
                self.failed = " ".join(str(exc).split())[:200]
                raise
        return self._compiled[1]

    # ---- what the engine calls ----------------------------------------------------
    def convert_for(self, device, fast) -> Optional[Path]:
        """:meth:`convert` when this engine's runs may use OpenVINO; None otherwise or when
        the conversion fails (logged once; the engine stays on PyTorch)."""
        if not self.usable(device, fast.backend, fast.precision):
            return None
        try:
            return self.convert()
        except Exception:
            log.warning("OpenVINO cannot convert model %s (%s); it runs on PyTorch", self.card.name, self.failed)
            return None

    def network_for(self, device, fast, threads: Optional[int], announce: Callable[[], None]):
        """The compiled network for a run with the switches ``fast``, or None to run on
        PyTorch: "auto" takes a cached conversion only; "openvino" converts now (calling
        ``announce`` first)."""
        if not self.usable(device, fast.backend, fast.precision):
            if fast.backend == "openvino" and getattr(device, "type", "") == "cpu":
                if not available():
                    raise UserError("backend 'openvino' needs the openvino package: pip install openvino")
                if preloaded_allocator():
                    raise UserError(f"backend 'openvino' cannot run beside {preloaded_allocator()} (LD_PRELOAD): "
                                    "start without it, or set SWINUNETR_SEGMENT_ALLOCATOR=system")
            return None
        if not self.converted:
            if fast.backend != "openvino":
                return None
            announce()
            if self.convert_for(device, fast) is None:
                return None
        return self._compiled_or_none(fast, threads)

    def _compiled_or_none(self, fast, threads: Optional[int]):
        try:
            return self.network(self.precision_for(fast), threads)
        except Exception:
            log.warning("OpenVINO cannot compile model %s (%s); it runs on PyTorch", self.card.name, self.failed)
            return None

    def may_convert_in_run(self, device, fast) -> bool:
        """"auto" on a checkpoint that OpenVINO may run but that is not converted yet."""
        return fast.backend == "auto" and self.usable(device, fast.backend, fast.precision) and not self.converted

    def start_conversion(self, spare_core: bool = True) -> threading.Thread:
        """Convert in a thread (one per checkpoint: a conversion under way is joined, not
        repeated); returns the thread."""
        with _conversions_lock:
            worker = _conversions.get(self.key)
            if worker is None or not worker.is_alive():

                def work() -> None:
                    try:
                        self.convert(spare_core=spare_core)
                    except Exception:  # OpenVINO's frontends raise many types; self.failed says
                        pass

                worker = threading.Thread(target=work, name="openvino-convert", daemon=True)
                _conversions[self.key] = worker
                worker.start()
        return worker

    def convert_waiting(self, fast, threads: Optional[int], check_cancel: Callable[[], None]):
        """Convert in a thread while this one polls ``check_cancel`` every 0.1 s (OpenVINO's
        conversion cannot be interrupted: on cancel the thread finishes the cache entry on its
        own and the run stops at once), then compile here (seconds; a cancel then acts at the
        first window). Returns the compiled network, or None when the conversion or
        compilation failed (logged; the run stays on PyTorch)."""
        worker = self.start_conversion(spare_core=False)
        while worker.is_alive():
            worker.join(_WAIT_MS / 1000)
            check_cancel()
        if not self.converted:
            log.warning("OpenVINO cannot convert model %s (%s); it runs on PyTorch", self.card.name, self.failed)
            return None
        return self._compiled_or_none(fast, threads)


# conversions running in a thread, by key: a run that needs one already under way waits for it
_conversions: dict[str, threading.Thread] = {}
_conversions_lock = threading.Lock()


class ConversionPays(Exception):
    """Raised out of a run's PyTorch windows once :class:`ConvertWhenItPays` finds that
    converting pays: the run lets go of everything PyTorch held (the network, its caches,
    the half-stitched output), converts, and runs its windows again on OpenVINO."""

    def __init__(self, torch_windows: int):
        super().__init__(f"converting pays after {torch_windows} windows on PyTorch")
        self.torch_windows = int(torch_windows)


class ConvertWhenItPays:
    """The PyTorch network of an "auto" run whose checkpoint is not converted yet, called
    like it: after each call (from the second on where no :meth:`probe` ran: :meth:`pays`)
    it estimates the time the windows left would take on PyTorch and, once ``gain`` of that
    exceeds ``cost_s`` times :data:`CONVERT_MARGIN`, raises :class:`ConversionPays`.

    Why the run starts again rather than going on from where it was: the PyTorch network,
    its attention caches and the allocator's retained buffers would otherwise stay resident
    under the conversion and beside OpenVINO's compiled model until the run ends (a first
    run's peak at feature size 48 was 1 GB above a converted run's), and the labels are then
    a converted run's exactly, as the next run on the same scan gives them. It costs the
    windows PyTorch ran: none where :meth:`probe` decided before the first.

    Args:
        torch_network: the network as the run calls it.
        windows_left: windows this run will send through the network.
        cost_s: the conversion's estimated seconds (:func:`conversion_seconds`).
        gain: the share of a window's PyTorch time OpenVINO saves here.
    """

    #: the side of :meth:`probe`'s window: the smallest a SwinUNETR takes (its deepest stage
    #: halves the grid five times and normalises over what is left)
    PROBE_SIDE = 64

    def __init__(self, torch_network, windows_left: int, cost_s: float, gain: float):
        self.torch_network, self.windows_left = torch_network, int(windows_left)
        self.cost_s, self.gain = float(cost_s), float(gain)
        self.torch_windows, self.torch_calls = 0, 0
        self.warm_seconds, self.warm_windows = 0.0, 0  # the calls after the warm-up (:meth:`pays`)
        self.probed: Optional[float] = None

    def probe(self, roi_size: Sequence[int], in_channels: int, dtype, device) -> None:
        """Before the first window: time one call on a :data:`PROBE_SIDE`-cubed window, scale it
        by a window's voxels, and raise :class:`ConversionPays` (after 0 windows) when the
        windows left at that speed already pay for the conversion. A run that converts then runs
        no window twice and never holds a whole float32 window's activations under raised
        thresholds before it (a feature-48 first run without bfloat16 peaked there: 2,979 MB
        against 2,173 for its conversion's process; benchmarks/README.md, session 12). The
        estimate errs high, as the first window's own timing does: the probe is the process's
        first call and carries its warm-up (feature size 48, AVX2-held: 2.13 s against 1.54-1.67 s
        for later 64^3 calls, so 7.2 s estimated for 6.2 s measured on 96^3); :data:`CONVERT_MARGIN`
        (1.5) keeps a run it converts on the winning side of that. Where it does not convert,
        the windows' timing still decides after each call. Once per run; nothing where a
        window is not larger than the probe's, or where the network cannot take its size."""
        import math

        import torch

        side = self.PROBE_SIDE
        if self.probed is not None or self.windows_left < 2 or min(roi_size) < side or math.prod(roi_size) <= side**3:
            return
        x = torch.zeros((1, int(in_channels)) + (side,) * 3, dtype=dtype, device=device)
        t = time.perf_counter()
        try:
            self.torch_network(x)
        except (RuntimeError, ValueError) as exc:  # a network whose grid rules exclude 64^3
            log.debug("no probe window for the conversion's decision (%s)", exc)
            self.probed = 0.0
            return
        self.probed = (time.perf_counter() - t) * math.prod(roi_size) / side**3
        if saving_pays(self.windows_left * self.probed, self.cost_s, self.gain):
            raise ConversionPays(0)

    def pays(self) -> bool:
        """Whether the windows left, at the warm calls' mean seconds per window, pay for the
        conversion. Where no probe ran before it (or the probe failed), a run's first call is
        the network's first in the process and carries its warm-up (feature size 12 at 64^3,
        the demo's windows: 0.61 s against 0.40 s for later calls, more than
        :data:`CONVERT_MARGIN` covers), so it is left out and nothing is decided on it alone;
        a run of short windows would otherwise convert where that barely pays."""
        left = self.windows_left - self.torch_windows
        if left <= 0 or self.warm_windows == 0:
            return False
        return saving_pays(left * self.warm_seconds / self.warm_windows, self.cost_s, self.gain)

    def __call__(self, batch):
        t = time.perf_counter()
        out = self.torch_network(batch)
        seconds = time.perf_counter() - t
        windows = int(batch.shape[0])
        self.torch_windows += windows
        self.torch_calls += 1
        if self.probed or self.torch_calls > 1:  # a probe that ran warmed the network up
            self.warm_seconds += seconds
            self.warm_windows += windows
        if self.pays():
            raise ConversionPays(self.torch_windows)
        return out
