"""The segmentation engine: a volume in, labels on exactly the same grid out.

Data flow (all MONAI, nothing hand-written where MONAI has it):

1. the input :class:`~.geometry.Volume` becomes a MONAI ``MetaTensor`` whose affine is its
   IJK-to-RAS matrix;
2. ``Orientation``, ``Spacing`` and ``ScaleIntensityRange`` as the model card says bring it
   into model space (cropped to the body's box when the fast path says so);
3. ``sliding_window_inference`` runs the network window by window; a wrapper around the
   network reports progress, honours cancel between windows and answers windows of pure
   air from a cache instead of the network;
4. back onto the input's voxels with ``SpatialResample`` using the two affines: class
   probabilities interpolated linearly slab by slab, then argmax (as the reference's
   bilinear ``Invertd``), or the model-space argmax by nearest neighbour; either way the
   output has the input's exact shape and IJK-to-RAS matrix.

The network is built and its weights loaded once per :class:`Segmenter` and reused for
every call of :meth:`Segmenter.segment`; so are the compiled network (if asked for), the
network's answer for an all-air window, and the model-space tensor of the last volume.
The switches of the fast path are in :class:`~.fastpath.FastPath`.
"""

from __future__ import annotations
from SwinUNETRSegmentLib.inference.devices import Plan, autocast, autocast_dtype, configure_threads, inference_plans, is_out_of_memory, run_with_fallback
from SwinUNETRSegmentLib.inference.windows import air_window_starts, body_box, shift_affine, volume_key
from SwinUNETRSegmentLib.inference.network import cancel_checks, cpu_windows_per_call, maybe_compile, network_dtype, use_fused_attention
from SwinUNETRSegmentLib.inference.resample import resample_argmax, resample_probabilities, softmax_inplace

import contextlib
import copy

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from SwinUNETRSegmentLib.models.cards import ModelCard
from SwinUNETRSegmentLib.errors import CancelledError, UserError
from SwinUNETRSegmentLib.inference.options import FastPath
from SwinUNETRSegmentLib.inference.windows import Prepared, count_windows
from SwinUNETRSegmentLib.geometry import Volume
from SwinUNETRSegmentLib.progress import ProgressCallback, ProgressTracker
from SwinUNETRSegmentLib.inference.cpu.pointwise_convs import pointwise_as_matmul
from SwinUNETRSegmentLib.inference.cpu.window_attention import cached_window_attention

log = logging.getLogger(__name__)


@dataclass
class SegmentationResult:
    """Labels on the input grid and what produced them.

    Attributes:
        labels: uint8 label map with the input's shape and IJK-to-RAS; values are the
            card's label values, 0 is background.
        card: the model card whose label table names the values.
        device: the torch device the network ran on.
        timings: seconds spent in each stage.
        stats: what the run did: windows in all and run through the network, the
            precision, threads, whether the preprocessed volume came from the cache.
    """

    labels: Volume
    card: ModelCard
    device: str
    timings: dict[str, float] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)

    def present_labels(self) -> list[int]:
        values = np.unique(self.labels.array)
        return [int(v) for v in values if v != 0]


def available_devices() -> list[tuple[str, str]]:
    """(device string, human name) for every device torch can use here, best first."""
    import torch

    out = []
    if torch.cuda.is_available():
        for n in range(torch.cuda.device_count()):
            out.append((f"cuda:{n}", torch.cuda.get_device_name(n)))
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        out.append(("mps", "Apple GPU (MPS)"))
    out.append(("cpu", "CPU"))
    return out


def resolve_device(name: Optional[str] = "auto"):
    """``"auto"`` picks CUDA, then Apple MPS, then the CPU; anything else is checked."""
    import torch

    if name in (None, "", "auto"):
        return torch.device(available_devices()[0][0])
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        raise UserError(f"unknown device '{name}'; use auto, cpu, cuda, cuda:N or mps") from None
    known = [d for d, _ in available_devices()]
    if dev.type == "cuda":
        index = dev.index or 0
        if f"cuda:{index}" not in known:
            raise UserError(f"device '{name}' is not available on this machine (devices here: {', '.join(known)}); use --device auto")
        return torch.device(f"cuda:{index}")
    if dev.type == "mps" and "mps" not in known:
        raise UserError(f"device 'mps' is not available on this machine (devices here: {', '.join(known)}); use --device auto")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"unknown device '{name}'; use auto, cpu, cuda, cuda:N or mps")
    return dev


def resample_labels(src, dst: Volume, src_affine: Optional[np.ndarray] = None, outside: str = "border") -> np.ndarray:
    """Labels of ``src`` (a Volume, or an array with ``src_affine``) on ``dst``'s voxels.

    Nearest neighbour, with MONAI's SpatialResample between the two IJK-to-RAS matrices.
    Voxels of ``dst`` beyond ``src`` take the nearest edge label (``outside="border"``, for
    model space that covers the input up to a sliver) or background (``"zeros"``, for a
    label map cropped to its segments). Returns uint8 of ``dst.shape``.
    """
    import torch
    from monai.data import MetaTensor
    from monai.transforms import SpatialResample

    if isinstance(src, Volume):
        array, src_affine = src.array, src.ijk_to_ras
    else:
        array = src
    img = MetaTensor(torch.as_tensor(np.asarray(array), dtype=torch.float32)[None],
                     affine=torch.as_tensor(np.asarray(src_affine), dtype=torch.float64))
    back = SpatialResample(mode="nearest", padding_mode=outside, dtype=torch.float64)(
        img, dst_affine=torch.as_tensor(dst.ijk_to_ras, dtype=torch.float64), spatial_size=dst.shape
    )
    return np.asarray(back.as_tensor()[0].round().to(torch.uint8).numpy())


class Segmenter:
    """Runs one model card on volumes; the model is loaded once and kept.

    Args:
        card: the model card (network, preprocessing, windows, labels).
        checkpoint: weights file for the card's network. Not needed when ``network`` is given.
        device: "auto" (CUDA, then MPS, then CPU), or a torch device string.
        overlap: sliding-window overlap; the card's value when None.
        sw_batch_size: windows per network call; the card's value when None.
        network: an already built ``torch.nn.Module`` to use instead of loading ``checkpoint``
            (tests, and callers that keep their own model).
        fast: the fast path's switches (:class:`~.fastpath.FastPath`); its defaults when
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
        self._network = network
        self._owns_network = False
        self._dtype = None  # the network's weights' dtype once loaded
        self._runner = None  # the network as called: compiled or not
        self._air_outputs: dict[tuple, Any] = {}
        self._prepared: Optional[tuple[str, Prepared]] = None
        self._lock = threading.Lock()

    # ---- model --------------------------------------------------------------------
    @property
    def loaded(self) -> bool:
        return self._network is not None and next(self._network.parameters()).device == self.device

    def load(self):
        """Build the network and load the weights (once); returns the network."""

        if self._network is None:
            from SwinUNETRSegmentLib.models.checkpoint import load_model

            self._network = load_model(self.card, self.checkpoint)
            self._owns_network = True
        if not self.loaded:
            self._network = self._network.to(self.device)
            self._runner = None
        dtype = network_dtype(self.device, self.fast.precision, self._network, self.fast.bf16_weights)
        if next(self._network.parameters()).dtype != dtype:
            if not self._owns_network:  # a caller's module is theirs: cast a copy
                self._network = copy.deepcopy(self._network)
                self._owns_network = True
            self._network = self._network.to(dtype)
            self._runner = None
            self._air_outputs.clear()
        self._dtype = dtype
        use_fused_attention(self._network, self.fast.fused_attention)
        self._network.eval()
        if self._runner is None:
            self._runner = maybe_compile(self._network, self.fast.compile)
        return self._network

    # ---- the pipeline ---------------------------------------------------------------
    def _spaced(self, volume: Volume):
        """Orientation and Spacing: the volume's intensities on the model's grid."""
        import torch
        from monai.data import MetaTensor
        from monai.transforms import Orientation, Spacing

        card = self.card
        data = torch.from_numpy(np.ascontiguousarray(volume.array, dtype=np.float32))[None]
        img = MetaTensor(data, affine=torch.as_tensor(volume.ijk_to_ras, dtype=torch.float64))
        img = Orientation(axcodes=card.orientation, labels=(("L", "R"), ("P", "A"), ("I", "S")))(img)
        return Spacing(pixdim=card.spacing, mode=card.interpolation)(img)

    def _scale(self, img):
        from monai.transforms import ScaleIntensityRange

        it = self.card.intensity
        return ScaleIntensityRange(a_min=it["a_min"], a_max=it["a_max"], b_min=it["b_min"], b_max=it["b_max"], clip=bool(it.get("clip", True)))(img)

    def preprocess(self, volume: Volume):
        """The volume in model space: a ``(1, X, Y, Z)`` float32 MetaTensor with its affine
        (the whole image; the fast path may then crop it to the body)."""
        return self._scale(self._spaced(volume))

    def _air_applies(self) -> bool:
        """Air voxels become one constant only when the intensity window clips upwards."""
        it = self.card.intensity
        return bool(it.get("clip", True)) and it["b_max"] > it["b_min"]

    def prepare(self, volume: Volume) -> tuple[Prepared, bool]:
        """The volume in model space with its air windows and body box; the second value
        says whether it came from the cache (an unchanged volume seen last time)."""
        fast = self.fast
        key = None
        if fast.cache_preprocessed:
            key = volume_key(volume.array, volume.ijk_to_ras, self.card.orientation, self.card.spacing,
                                self.card.interpolation, sorted(self.card.intensity.items()), self.card.roi_size,
                                self.overlap, fast.skip_air, fast.crop_to_body)
            if self._prepared is not None and self._prepared[0] == key:
                return self._prepared[1], True
        prepared = self._prepare(volume)
        # Only the latest volume is kept: the cache never holds more than one model-space image.
        self._prepared = None if key is None else (key, prepared)
        return prepared, False

    def _prepare(self, volume: Volume) -> Prepared:
        img = self._spaced(volume)
        full_affine = img.affine.numpy().astype(np.float64)
        full_shape = tuple(int(s) for s in img.shape[1:])
        fast = self.fast
        use_air = (fast.skip_air or fast.crop_to_body) and self._air_applies()
        air = None
        box = None
        if use_air:
            it = self.card.intensity
            # "Below the window" with a margin of 1 % of its width: such voxels clip to exactly
            # b_min, whatever rounding the resampling left on values at the window's edge.
            floor = float(it["a_min"]) - 0.01 * (float(it["a_max"]) - float(it["a_min"]))
            air = img.as_tensor()[0] < floor
            if fast.crop_to_body:
                box = body_box(air, self.card.roi_size, self.overlap)
        if box is not None:
            img = img[(slice(None),) + box]
            air = air[box]
        affine = full_affine if box is None else shift_affine(full_affine, [s.start for s in box])
        img = self._scale(img)
        air_starts: set = set()
        if use_air and fast.skip_air:
            pad_is_air = float(self.card.intensity["b_min"]) == 0.0  # MONAI pads windows with 0
            air_starts = air_window_starts(air, self.card.roi_size, self.overlap, pad_is_air)
        image = img.as_tensor().contiguous()
        return Prepared(image, affine, full_shape, full_affine, box, air_starts)

    def _air_output(self, net, autocast_dtype):
        """The network's answer for a window of pure air (every voxel ``b_min``), once."""
        import torch

        key = (str(self.device), str(autocast_dtype), str(self._dtype), tuple(self.card.roi_size))
        if key not in self._air_outputs:
            window = torch.full((1, 1) + tuple(self.card.roi_size), float(self.card.intensity["b_min"]), device=self.device,
                                dtype=self._dtype)
            self._air_outputs[key] = net(window).float()
        return self._air_outputs[key]

    def segment(
        self,
        volume: Volume,
        progress: Optional[ProgressCallback] = None,
        cancel: Optional[threading.Event] = None,
    ) -> SegmentationResult:
        """Segment ``volume``; the labels come back on its exact grid.

        Args:
            volume: the scan; any orientation, spacing and obliquity.
            progress: called with :class:`~.progress.Progress` reports from this thread.
            cancel: set it from another thread to stop; the call then raises
                :class:`~.errors.CancelledError` after the window that is running.
        """
        import torch
        from monai.inferers import sliding_window_inference

        tracker = ProgressTracker(progress)
        timings: dict[str, float] = {}
        stats: dict[str, Any] = {}
        fast = self.fast

        def check_cancel() -> None:
            if cancel is not None and cancel.is_set():
                raise CancelledError("segmentation cancelled")

        with self._lock:
            t0 = time.perf_counter()
            check_cancel()
            stats["threads"] = configure_threads(fast.threads) if self.device.type == "cpu" else None
            if not self.loaded:
                tracker.stage("loading model", f"loading {self.card.name} on {self.device}")
            self.load()
            net = self._runner
            timings["load"] = time.perf_counter() - t0

            t = time.perf_counter()
            check_cancel()
            tracker.stage("preprocessing", "resampling to the model's spacing")
            prepared, cached = self.prepare(volume)
            stats["preprocess_cached"] = cached
            timings["preprocess"] = time.perf_counter() - t

            check_cancel()
            roi = tuple(self.card.roi_size)
            image_shape = prepared.image.shape[1:]
            total = count_windows(image_shape, roi, self.overlap)
            air_starts = prepared.air_starts
            stats.update(windows_total=total, windows_full_image=count_windows(prepared.full_shape, roi, self.overlap),
                         windows_air=len(air_starts), windows_run=total - len(air_starts),
                         crop=None if prepared.box is None else [(s.start, s.stop) for s in prepared.box],
                         model_shape=list(prepared.full_shape))
            ac_dtype = autocast_dtype(self.device, fast.precision)
            stats["precision"] = "float32" if ac_dtype is None else str(ac_dtype).replace("torch.", "")
            stats["weights"] = str(self._dtype).replace("torch.", "")
            done = 0
            # On the CPU the card's window batch (a GPU setting) gives way to the fast path's
            # (cpu_windows_per_call); a batch's windows then share one network call, and
            # cancel is checked inside the network (cancel_checks) so it still acts
            # within one window. GPUs get the card's batch.
            cpu_batch = cpu_windows_per_call(self._network, fast.cpu_batch, self.sw_batch_size)
            stats["windows_per_call"] = cpu_batch if self.device.type == "cpu" else self.sw_batch_size

            def predictor(batch, coords):
                nonlocal done
                outs = []
                is_air = [tuple(s.start for s in c[2:]) in air_starts for c in coords]
                run = [n for n, a in enumerate(is_air) if not a]
                check_cancel()
                result = net((batch if len(run) == len(is_air) else batch[run]).to(self._dtype)).float() if run else None
                if result is not None and len(run) == len(is_air):
                    outs.append(result)
                else:
                    air_out = self._air_output(net, ac_dtype).to(batch.device)
                    r = 0
                    for a in is_air:
                        if a:
                            outs.append(air_out)
                        else:
                            outs.append(result[r:r + 1])
                            r += 1
                for _ in is_air:  # one report per window, air or not
                    done += 1
                    tracker.windows(done, total)
                return torch.cat(outs)

            def attempt(plan: Plan):
                nonlocal done
                done = 0
                tracker.windows(0, total)
                out_device = torch.device(plan.stitch_device)
                batch = cpu_batch if self.device.type == "cpu" else plan.sw_batch_size
                x = prepared.image[None].to(self.device if out_device.type == self.device.type else out_device)
                hooks = cancel_checks(self._network, check_cancel, enabled=batch > 1 and not fast.compile)
                amp = contextlib.nullcontext() if self._dtype != torch.float32 else autocast(self.device, fast.precision)
                attention = cached_window_attention(self._network, fast.cached_attention and not fast.compile)
                pointwise = pointwise_as_matmul(self._network, fast.pointwise_matmul and self.device.type == "cpu"
                                                and not fast.compile)
                with torch.inference_mode(), amp, hooks, attention as cached_modules, pointwise as matmul_modules:
                    stats["attention_cached"] = cached_modules
                    stats["pointwise_matmul"] = matmul_modules
                    return sliding_window_inference(
                        x, roi_size=roi, sw_batch_size=batch, predictor=predictor,
                        overlap=self.overlap, mode=self.card.blend_mode, sw_device=self.device,
                        device=out_device, with_coord=True,
                    )

            t = time.perf_counter()
            plans = inference_plans(self.device, self.sw_batch_size if self.device.type != "cpu" else cpu_batch,
                                       fast.gpu_stitching)
            empty = torch.cuda.empty_cache if self.device.type == "cuda" else (lambda: None)
            logits = run_with_fallback(plans, attempt, empty_cache=empty)
            timings["inference"] = time.perf_counter() - t

            check_cancel()
            t = time.perf_counter()
            tracker.stage("resampling", "back to the input grid")
            outside = "border" if prepared.box is None else "background"
            with torch.inference_mode():
                labels = self._to_input_grid(logits, prepared, volume, outside, check_cancel)
            del logits
            timings["resample"] = time.perf_counter() - t
            timings["total"] = time.perf_counter() - t0

        if labels.shape != volume.shape:  # a broken invariant, not bad input
            raise AssertionError(f"labels {labels.shape} do not match the input grid {volume.shape}")
        return SegmentationResult(Volume(labels, volume.ijk_to_ras.copy()), self.card, str(self.device), timings, stats)

    def _to_input_grid(self, logits, prepared: Prepared, volume: Volume, outside: str, check_cancel) -> np.ndarray:
        """uint8 labels on ``volume``'s grid from the stitched ``(1, C, X, Y, Z)`` logits."""
        import torch

        if self.fast.resample == "labels":
            labels_model = logits.argmax(dim=1).to(torch.uint8).cpu()
            return resample_labels(labels_model[0].numpy(), volume, src_affine=prepared.affine,
                                   outside="border" if outside == "border" else "zeros")
        if self.fast.resample == "boundaries":
            def run(scores):
                return resample_argmax(scores, prepared.affine, volume.shape, volume.ijk_to_ras, outside=outside,
                                          slab_voxels=self.fast.slab_voxels, cancel=check_cancel)
        else:
            softmax_inplace(logits)

            def run(scores):
                return resample_probabilities(scores, prepared.affine, volume.shape, volume.ijk_to_ras,
                                                 outside=outside, slab_voxels=self.fast.slab_voxels, cancel=check_cancel)

        if logits.device.type != "cuda":
            return run(logits[0])
        try:
            return run(logits[0])
        except Exception as exc:  # noqa: BLE001 - only out-of-memory is handled
            if not is_out_of_memory(exc):
                raise
            torch.cuda.empty_cache()
            log.warning("out of GPU memory resampling to the input grid; resampling on the CPU")
            return run(logits[0].cpu())
