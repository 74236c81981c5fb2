"""The segmentation engine: a volume in, labels on exactly the same grid out.

The data path, one module per step (all MONAI where MONAI has the piece):

1. :mod:`.preprocess`: the volume becomes a MONAI ``MetaTensor`` whose affine is its
   IJK-to-RAS matrix; ``Orientation``, ``Spacing`` and ``ScaleIntensityRange`` as the
   model card says bring it into model space;
2. :mod:`.windows`: the windows MONAI's sliding-window inferer will run, those of pure air
   answered without the network (and optionally only those over the body);
3. :mod:`.network` and :mod:`.devices`: the network in the precision and on the threads
   the device calls for, with a ladder of fallbacks when a GPU runs out of memory;
4. MONAI's ``SlidingWindowInfererAdapt`` runs the windows (stitching on the GPU, or on the
   CPU when the GPU is full), reporting progress and honouring cancel per window;
5. :mod:`.resample`: back onto the input's voxels, the step-by-step inverse of 1;
6. :mod:`.postprocess`: the connected-component clean-up the card declares.

The network is built and its weights loaded once per :class:`Segmenter` and reused for
every call of :meth:`Segmenter.segment`; so are the network's answer for an all-air window
and the model-space tensor of the last volume. What the engine changes for a run (torch's
thread count, the attention modules' flags and forwards) is restored when the run ends; a
network handed in by the caller is never modified (it is copied where the run needs other
weights or another device). The fast path's switches are :class:`~.options.FastPath`.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import threading
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np

from SwinUNETRSegmentLib.errors import CancelledError, UserError
from SwinUNETRSegmentLib.geometry import Volume, check_volume
from SwinUNETRSegmentLib.inference.api import SegmentationResult
from SwinUNETRSegmentLib.inference.cpu import openvino_backend
from SwinUNETRSegmentLib.inference.cpu.pointwise_convs import pointwise_as_matmul
from SwinUNETRSegmentLib.inference.cpu.window_attention import cached_window_attention
from SwinUNETRSegmentLib.inference.devices import (
    Plan,
    autocast,
    autocast_dtype,
    inference_plans,
    resolve_device,
    run_with_fallback,
    thread_count,
)
from SwinUNETRSegmentLib.inference.memory import lower_raised_thresholds, release_free_memory
from SwinUNETRSegmentLib.inference.network import (
    cancel_checks,
    cpu_windows_per_call,
    fused_attention,
    maybe_compile,
    network_dtype,
)
from SwinUNETRSegmentLib.inference.options import FastPath
from SwinUNETRSegmentLib.inference.postprocess import PostProcessing, clean_labels
from SwinUNETRSegmentLib.inference.preprocess import to_model_space
from SwinUNETRSegmentLib.inference.resample import to_input_grid
from SwinUNETRSegmentLib.inference.windows import (
    Prepared,
    WindowPredictor,
    count_windows,
    prepare,
    resampling_dtype,
    volume_key,
)
from SwinUNETRSegmentLib.models.cards import ModelCard
from SwinUNETRSegmentLib.progress import ProgressCallback, ProgressTracker

__all__ = ["Segmenter", "SegmentationResult"]


log = logging.getLogger(__name__)


@contextlib.contextmanager
def _eval_mode(network):
    """``network`` in eval mode while open, each module's own mode again after (a caller's
    network is left as it was)."""
    modes = [(m, m.training) for m in network.modules()]
    network.eval()
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


class Segmenter:
    """Runs one model card on volumes; the model is loaded once and kept.

    Args:
        card: the model card (network, preprocessing, windows, labels).
        checkpoint: weights file for the card's network. Not needed when ``network`` is given.
        device: "auto" (CUDA, then MPS, then CPU), or a torch device string.
        overlap: sliding-window overlap, 0 to <1; the card's value when None.
        sw_batch_size: windows per network call, at least 1; the card's value when None.
        network: an already built ``torch.nn.Module`` to use instead of loading ``checkpoint``
            (tests, and callers that keep their own model). It is never modified: where a
            run needs it in another dtype or on another device, the engine runs a copy.
        fast: the fast path's switches (:class:`~.options.FastPath`); its defaults when
            None, :meth:`FastPath.plain` for the plain path.
    """

    def __init__(
        self,
        card: ModelCard,
        checkpoint: str | Path | None = None,
        device: Optional[str] = "auto",
        overlap: Optional[float] = None,
        sw_batch_size: Optional[int] = None,
        network=None,
        fast: Optional[FastPath] = None,
    ):
        if checkpoint is None and network is None:
            raise UserError(f"model '{card.name}' has no weights here; give a checkpoint file")
        self.card = card
        self.checkpoint = None if checkpoint is None else Path(checkpoint)
        self.device = resolve_device(device)
        self.overlap = card.overlap if overlap is None else float(overlap)
        if not 0 <= self.overlap < 1:
            raise UserError(f"overlap must be at least 0 and less than 1, got {overlap}")
        self.sw_batch_size = card.sw_batch_size if sw_batch_size is None else int(sw_batch_size)
        if self.sw_batch_size < 1:
            raise UserError(f"sw-batch-size must be at least 1, got {sw_batch_size}")
        self.fast = FastPath() if fast is None else fast
        self.postprocessing = PostProcessing.from_card(card)
        self._network = network
        self._owns_network = False
        self._dtype = None  # the network's weights' dtype once loaded
        self._runner = None  # the network as called: compiled or not
        self._air_outputs: dict[tuple, Any] = {}
        self._prepared: Optional[tuple[str, Prepared]] = None
        self._lock = threading.Lock()
        self._threads: Optional[int] = None
        self.openvino = openvino_backend.Conversion(card, self.checkpoint)

    # ---- model --------------------------------------------------------------------
    @property
    def loaded(self) -> bool:
        return self._network is not None and next(self._network.parameters()).device == self.device

    def _own(self) -> None:
        """A caller's module is theirs: from here on the engine works on a copy."""
        if not self._owns_network:
            self._network = copy.deepcopy(self._network)
            self._owns_network = True

    def load(self):
        """Build the network and load the weights (once), on the device and in the dtype
        the fast path calls for; returns the network."""
        if self._network is None:
            from SwinUNETRSegmentLib.models.checkpoint import load_model

            self._network = load_model(self.card, self.checkpoint)
            self._owns_network = True
        if not self.loaded:
            self._own()
            self._network = self._network.to(self.device)
            self._runner = None
        dtype = network_dtype(self.device, self.fast.precision, self._network, self.fast.bf16_weights)
        if next(self._network.parameters()).dtype != dtype:
            self._own()
            self._network = self._network.to(dtype)
            self._runner = None
            self._air_outputs.clear()
        self._dtype = dtype
        if self._owns_network:
            self._network.eval()
        if self._runner is None:
            self._runner = maybe_compile(self._network, self.fast.compile)
        return self._network

    def _release_torch_network(self) -> None:
        """Free the PyTorch network this engine loaded, once its runs are on OpenVINO (its
        weights are a second copy of the compiled model's: 250 MB at feature size 48); a
        later PyTorch run (float32, another backend) loads it again. A caller's network is
        theirs and stays."""
        if self._owns_network and self._network is not None and self.checkpoint is not None:
            self._network, self._runner, self._dtype, self._owns_network = None, None, None, False

    def runs_on_openvino(self) -> bool:
        """Whether this engine's next run will be on a cached OpenVINO conversion (then
        :meth:`load` is not needed: the conversion was made from this checkpoint)."""
        return self.openvino.usable(self.device, self.fast.backend, self.fast.precision) and self.openvino.converted

    # ---- the way in ---------------------------------------------------------------
    def preprocess(self, volume: Volume):
        """The whole volume in this card's model space (:func:`~.preprocess.to_model_space`)."""
        return to_model_space(self.card, volume)

    def prepare(self, volume: Volume) -> tuple[Prepared, bool]:
        """The volume in model space with its air windows and body box; the second value
        says whether it came from the cache (an unchanged volume seen last time)."""
        fast = self.fast
        key = None
        if fast.cache_preprocessed:
            card = self.card
            key = volume_key(
                volume.array,
                volume.ijk_to_ras,
                card.orientation,
                card.spacing,
                card.interpolation,
                sorted(card.intensity.items()),
                card.roi_size,
                self.overlap,
                fast.skip_air,
                fast.crop_to_body,
                np.dtype(resampling_dtype(fast)).name,
            )
            if self._prepared is not None and self._prepared[0] == key:
                return self._prepared[1], True
        prepared = prepare(self.card, volume, fast, self.overlap)
        # Only the latest volume is kept: the cache never holds more than one model-space image.
        self._prepared = None if key is None else (key, prepared)
        return prepared, False

    # ---- OpenVINO (cpu/openvino_backend.py) -----------------------------------------
    def convert_openvino(self) -> Optional[Path]:
        """Convert this checkpoint for OpenVINO now, unless it is cached or cannot run
        there (a GPU, float32, no OpenVINO, a caller's network); returns the IR's path or
        None. A folder of scans calls it through :meth:`convert_openvino_if_it_pays`; a
        failure is logged once and the engine stays on PyTorch."""
        return self.openvino.convert_for(self.device, self.fast)

    def convert_openvino_in_background(self) -> bool:
        """Start converting this checkpoint for OpenVINO in a thread (on one core fewer)
        when an "auto" engine could run there and it is not converted yet, so that the next
        run is faster; returns whether a conversion is under way. The engine service calls
        it after a job that ran on PyTorch."""
        if not self.openvino.may_convert_in_run(self.device, self.fast):
            return False
        self.openvino.start_conversion(spare_core=True)
        return True

    def convert_openvino_if_it_pays(self, torch_seconds_left: float) -> Optional[Path]:
        """:meth:`convert_openvino` now, when OpenVINO's saving on ``torch_seconds_left`` of
        PyTorch inference still to come pays for the conversion (the rule of a run's own
        windows, ``openvino_backend.saving_pays``). A folder of scans calls it after its first
        scan with that scan's inference time times the scans left."""
        if self._network is None or not self.openvino.may_convert_in_run(self.device, self.fast):
            return None
        cost, gain = self._conversion_estimate()
        if not openvino_backend.saving_pays(torch_seconds_left, cost, gain):
            return None
        return self.convert_openvino()

    def _conversion_estimate(self) -> tuple[float, float]:
        """(the conversion's estimated seconds, the share of PyTorch's time OpenVINO saves here)."""
        from SwinUNETRSegmentLib.inference.devices import cpu_has_native_bf16

        parameters = sum(p.numel() for p in self._network.parameters())
        gain = openvino_backend.GAIN_BFLOAT16 if cpu_has_native_bf16() else openvino_backend.GAIN_FLOAT32
        return openvino_backend.conversion_seconds(parameters), gain

    def _openvino_network(self, tracker: ProgressTracker):
        """The compiled OpenVINO network for this run, or None to run on PyTorch."""
        announce = lambda: tracker.stage(  # noqa: E731
            "loading model", f"converting {self.card.name} for OpenVINO (once per checkpoint)"
        )
        return self.openvino.network_for(self.device, self.fast, self._threads, announce)

    def _convert_in_run(self, tracker: ProgressTracker, check_cancel):
        """Convert for OpenVINO in the middle of a run (``ConvertWhenItPays`` found it pays),
        its PyTorch part let go first; returns the compiled network, or None when the
        conversion failed (logged; the run goes on on PyTorch)."""
        tracker.note(f"converting {self.card.name} for OpenVINO (once per checkpoint; the rest of this run is faster)")
        # The network, and what PyTorch's windows freed, which glibc keeps for them (raised
        # thresholds on a CPU without bfloat16), would stay resident beside the conversion's
        # process and OpenVINO's windows: let go of both.
        self._release_torch_network()
        release_free_memory()
        lower_raised_thresholds()  # they only served PyTorch's windows
        return self.openvino.convert_waiting(self.fast, self._threads, check_cancel)

    def _air_output(self, net, dtype, backend: str):
        """The network's answer for a window of pure air (every voxel ``b_min``), once."""
        import torch

        key = (
            backend,
            str(self.device),
            str(dtype),
            str(autocast_dtype(self.device, self.fast.precision)),
            tuple(self.card.roi_size),
        )
        if key not in self._air_outputs:
            window = torch.full(
                (1, 1) + tuple(self.card.roi_size),
                float(self.card.intensity["b_min"]),
                device=self.device,
                dtype=dtype,
            )
            self._air_outputs[key] = net(window).float()
        return self._air_outputs[key]

    # ---- the run ------------------------------------------------------------------
    def segment(
        self,
        volume: Volume,
        progress: Optional[ProgressCallback] = None,
        cancel: Optional[threading.Event] = None,
    ) -> SegmentationResult:
        """Segment ``volume``; the labels come back on its exact grid.

        Args:
            volume: the scan; any orientation, spacing and obliquity; at least two voxels
                along each axis, finite voxel values and a valid voxel-to-world matrix
                (else :class:`~SwinUNETRSegmentLib.errors.UserError` says what is wrong).
            progress: called with :class:`~SwinUNETRSegmentLib.progress.Progress` reports
                from this thread.
            cancel: set it from another thread to stop; the call then raises
                :class:`~SwinUNETRSegmentLib.errors.CancelledError` after the window that
                is running.
        """
        check_volume(volume, "the volume")
        tracker = ProgressTracker(progress)

        def check_cancel() -> None:
            if cancel is not None and cancel.is_set():
                raise CancelledError("segmentation cancelled")

        with self._lock:
            check_cancel()
            on_cpu = self.device.type == "cpu"
            threads = thread_count(self.fast.threads) if on_cpu else contextlib.nullcontext(None)
            with threads as n_threads:
                self._threads = n_threads
                result = self._segment(volume, tracker, check_cancel)
            result.stats["threads"] = n_threads
        if result.labels.shape != volume.shape:  # a broken invariant, not bad input
            raise AssertionError(f"labels {result.labels.shape} do not match the input grid {volume.shape}")
        return result

    def _segment(self, volume: Volume, tracker: ProgressTracker, check_cancel) -> SegmentationResult:
        import torch

        fast = self.fast
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        ov_net = self._openvino_network(tracker)
        if ov_net is None:
            if not self.loaded:
                tracker.stage("loading model", f"loading {self.card.name} on {self.device}")
            self.load()
        else:
            self._release_torch_network()
        timings["load"] = time.perf_counter() - t0

        t = time.perf_counter()
        check_cancel()
        tracker.stage("preprocessing", "resampling to the model's spacing")
        prepared, cached = self.prepare(volume)
        timings["preprocess"] = time.perf_counter() - t

        check_cancel()
        roi = tuple(self.card.roi_size)
        total = count_windows(prepared.image.shape[1:], roi, self.overlap)
        ac_dtype = autocast_dtype(self.device, fast.precision)
        # On the CPU the card's window batch (a GPU setting) gives way to the fast path's
        # (cpu_windows_per_call: one unless the caller asks for more; then a batch's windows
        # share one network call, and cancel is checked inside the network, cancel_checks, so
        # it still acts within one window). One per call on OpenVINO (one window per request).
        cpu_batch = 1 if ov_net is not None else cpu_windows_per_call(fast.cpu_batch)
        batch = cpu_batch if self.device.type == "cpu" else self.sw_batch_size
        stats: dict[str, Any] = dict(
            preprocess_cached=cached,
            windows_total=total,
            windows_full_image=count_windows(prepared.full_shape, roi, self.overlap),
            windows_air=len(prepared.air_starts),
            windows_run=total - len(prepared.air_starts),
            crop=None if prepared.box is None else [(s.start, s.stop) for s in prepared.box],
            model_shape=list(prepared.full_shape),
            precision="float32" if ac_dtype is None else str(ac_dtype).replace("torch.", ""),
            weights=str(self._dtype).replace("torch.", ""),
            windows_per_call=batch,
            backend="torch",
        )

        t = time.perf_counter()
        logits, torch_windows = None, None
        if ov_net is None:
            try:
                logits = self._torch_windows(prepared, batch, total, tracker, check_cancel, stats)
            except openvino_backend.ConversionPays as pays:
                torch_windows = pays.torch_windows
        if torch_windows is not None:
            ov_net = self._convert_in_run(tracker, check_cancel)
            tracker.hold_until(torch_windows)  # the bar waits while the windows done are done again
            if ov_net is None:  # the conversion failed (logged): PyTorch after all, from the first window
                self.load()
                logits = self._torch_windows(prepared, batch, total, tracker, check_cancel, stats)
            else:
                log.info("converted %s for OpenVINO after %d windows on PyTorch; the run starts again there",
                         self.card.name, torch_windows)
                stats.update(converted_in_run=True, windows_torch=torch_windows,
                             windows_per_call_torch=stats["windows_per_call"], windows_per_call=1)
        if logits is None:
            try:
                logits = self._run_windows(prepared, 1, total, tracker, check_cancel, stats, ov_net)
            finally:
                ov_net.release_memory()  # its activations, before the resampling and between runs
        timings["inference"] = time.perf_counter() - t

        check_cancel()
        t = time.perf_counter()
        tracker.stage("resampling", "back to the input grid")
        outside = "border" if prepared.box is None else "background"
        with torch.inference_mode():
            labels = to_input_grid(
                logits, prepared.affine, volume, fast.resample, outside, fast.slab_voxels, check_cancel
            )
        del logits
        timings["resample"] = time.perf_counter() - t
        if self.postprocessing.active:
            t = time.perf_counter()
            voxel_mm3 = float(abs(np.linalg.det(volume.ijk_to_ras[:3, :3])))
            stats.update(clean_labels(labels, voxel_mm3, self.postprocessing, check_cancel))
            timings["postprocess"] = time.perf_counter() - t
        timings["total"] = time.perf_counter() - t0
        return SegmentationResult(Volume(labels, volume.ijk_to_ras.copy()), self.card, str(self.device), timings, stats)

    def _torch_windows(self, prepared: Prepared, batch: int, total: int, tracker: ProgressTracker, check_cancel,
                       stats: dict):
        with _eval_mode(self._network), fused_attention(self._network, self.fast.fused_attention):
            return self._run_windows(prepared, batch, total, tracker, check_cancel, stats, None)

    def _run_windows(
        self, prepared: Prepared, batch: int, total: int, tracker: ProgressTracker, check_cancel, stats: dict, ov_net
    ):
        """The stitched ``(1, C, X, Y, Z)`` logits (float32; float16 with ``half_stitching``)
        over the prepared image, with the out-of-memory ladder (:func:`~.devices.inference_plans`);
        on ``ov_net`` (a compiled OpenVINO network) when given, else on the PyTorch network."""
        import torch
        from monai.inferers import SlidingWindowInfererAdapt

        fast, net, roi = self.fast, self._runner, tuple(self.card.roi_size)
        dtype, on_torch = self._dtype, True
        # The air window's answer is kept, so it comes from a call that returns a tensor of its
        # own; nor is that call one of the windows the conversion's rule counts and times.
        air_net = net
        if ov_net is not None:
            ov_net.check_cancel = check_cancel
            # MONAI is done with each window's logits before it asks for the next: OpenVINO's
            # output buffer serves without a copy
            air_net, net, dtype, on_torch = ov_net, ov_net.borrow, torch.float32, False
            stats.update(backend="openvino", precision=ov_net.precision.replace("f32", "float32").replace(
                "bf16", "bfloat16"), weights="openvino")
        elif self.openvino.may_convert_in_run(self.device, fast):
            windows_left = total - len(prepared.air_starts)
            net = openvino_backend.ConvertWhenItPays(net, windows_left, *self._conversion_estimate())
        predictor = WindowPredictor(
            net,
            dtype,
            prepared.air_starts,
            lambda: self._air_output(air_net, dtype, stats["backend"]),
            check_cancel,
            lambda done: tracker.windows(done, total),
        )
        def attempt(plan: Plan):
            predictor.done = 0
            tracker.windows(0, total)
            # "auto": MONAI's adaptive inferer stitches on the GPU and retries on the CPU when
            # the GPU is full; otherwise the plan's device holds the stitching buffer.
            stitch = None if plan.stitch_device == "auto" else torch.device(plan.stitch_device)
            x = prepared.image[None].to(self.device if stitch is None or stitch.type == self.device.type else stitch)
            # MONAI stitches in the input's dtype: a float16 image gives a float16 buffer
            x = x.to(stitch_dtype)
            inferer = SlidingWindowInfererAdapt(
                roi_size=roi,
                sw_batch_size=plan.sw_batch_size,
                overlap=self.overlap,
                mode=self.card.blend_mode,
                sw_device=self.device,
                device=stitch,
                with_coord=True,
            )
            hooks = cancel_checks(
                self._network, check_cancel, enabled=on_torch and plan.sw_batch_size > 1 and not fast.compile
            )
            use_amp = on_torch and self._dtype == torch.float32
            amp = autocast(self.device, fast.precision) if use_amp else contextlib.nullcontext()
            attention = cached_window_attention(self._network, on_torch and fast.cached_attention and not fast.compile)
            pointwise = pointwise_as_matmul(
                self._network, on_torch and fast.pointwise_matmul and self.device.type == "cpu" and not fast.compile
            )
            with torch.inference_mode(), amp, hooks, attention as cached_modules, pointwise as matmul_modules:
                stats["attention_cached"] = cached_modules
                stats["pointwise_matmul"] = matmul_modules
                if isinstance(net, openvino_backend.ConvertWhenItPays):  # may raise ConversionPays
                    net.probe(roi, int(self.card.network_args.get("in_channels", 1)), dtype, self.device)
                return inferer(x, predictor)

        # not beside CPU autocast, which rejects float16 tensors ("Unexpected floating ScalarType")
        under_autocast = on_torch and self._dtype == torch.float32 and autocast_dtype(self.device, fast.precision)
        half = fast.half_stitching and self.device.type == "cpu" and fast.precision != "float32" and not under_autocast
        stitch_dtype = torch.float16 if half else torch.float32
        stats["stitching"] = "float16" if half else "float32"
        plans = inference_plans(self.device, batch, fast.gpu_stitching)
        empty = torch.cuda.empty_cache if self.device.type == "cuda" else (lambda: None)
        return run_with_fallback(plans, attempt, empty_cache=empty)
