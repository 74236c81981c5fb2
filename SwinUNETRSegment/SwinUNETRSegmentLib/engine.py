"""The segmentation engine: a volume in, labels on exactly the same grid out.

Data flow (all MONAI, nothing hand-written where MONAI has it):

1. the input :class:`~.geometry.Volume` becomes a MONAI ``MetaTensor`` whose affine is its
   IJK-to-RAS matrix;
2. ``Orientation``, ``Spacing`` and ``ScaleIntensityRange`` as the model card says bring it
   into model space;
3. ``sliding_window_inference`` runs the network window by window; a wrapper around the
   network reports progress and honours cancel between windows;
4. the argmax in model space (uint8 labels) is resampled back onto the input's voxels with
   ``SpatialResample`` (nearest neighbour) using the two affines, so the output has the
   input's exact shape and IJK-to-RAS matrix.

The network is built and its weights loaded once per :class:`Segmenter` and reused for
every call of :meth:`Segmenter.segment`.
"""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from .cards import ModelCard
from .errors import CancelledError, UserError
from .geometry import Volume
from .progress import ProgressCallback, ProgressTracker


@dataclass
class SegmentationResult:
    """Labels on the input grid and what produced them.

    Attributes:
        labels: uint8 label map with the input's shape and IJK-to-RAS; values are the
            card's label values, 0 is background.
        card: the model card whose label table names the values.
        device: the torch device the network ran on.
        timings: seconds spent in each stage.
    """

    labels: Volume
    card: ModelCard
    device: str
    timings: dict[str, float] = field(default_factory=dict)

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


def count_windows(image_size, roi_size, overlap: float) -> int:
    """How many windows MONAI's sliding-window inferer runs over an image of ``image_size``.

    Mirrors monai.inferers.utils: the image is padded up to the window size, the step is
    ``int(roi * (1 - overlap))`` (the whole window where window and image are equal).
    """
    from monai.data.utils import dense_patch_slices

    size = [max(int(s), int(r)) for s, r in zip(image_size, roi_size)]
    interval = [int(r) if int(r) == s else max(int(int(r) * (1 - overlap)), 1) for s, r in zip(size, roi_size)]
    return len(dense_patch_slices(size, list(roi_size), interval))


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
    """

    def __init__(
        self,
        card: ModelCard,
        checkpoint: str | Path | None = None,
        device: Optional[str] = "auto",
        overlap: Optional[float] = None,
        sw_batch_size: Optional[int] = None,
        network=None,
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
        self._network = network
        self._lock = threading.Lock()

    # ---- model --------------------------------------------------------------------
    @property
    def loaded(self) -> bool:
        return self._network is not None and next(self._network.parameters()).device == self.device

    def load(self):
        """Build the network and load the weights (once); returns the network."""
        if self._network is None:
            from .checkpoint import load_model

            self._network = load_model(self.card, self.checkpoint)
        if not self.loaded:
            self._network = self._network.to(self.device)
        self._network.eval()
        return self._network

    # ---- the pipeline ---------------------------------------------------------------
    def preprocess(self, volume: Volume):
        """The volume in model space: a ``(1, X, Y, Z)`` float32 MetaTensor with its affine."""
        import torch
        from monai.data import MetaTensor
        from monai.transforms import Orientation, ScaleIntensityRange, Spacing

        card = self.card
        data = torch.from_numpy(np.ascontiguousarray(volume.array, dtype=np.float32))[None]
        img = MetaTensor(data, affine=torch.as_tensor(volume.ijk_to_ras, dtype=torch.float64))
        img = Orientation(axcodes=card.orientation, labels=(("L", "R"), ("P", "A"), ("I", "S")))(img)
        img = Spacing(pixdim=card.spacing, mode=card.interpolation)(img)
        it = card.intensity
        img = ScaleIntensityRange(a_min=it["a_min"], a_max=it["a_max"], b_min=it["b_min"], b_max=it["b_max"], clip=bool(it.get("clip", True)))(img)
        return img

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

        def check_cancel() -> None:
            if cancel is not None and cancel.is_set():
                raise CancelledError("segmentation cancelled")

        with self._lock:
            t0 = time.perf_counter()
            check_cancel()
            if not self.loaded:
                tracker.stage("loading model", f"loading {self.card.name} on {self.device}")
            net = self.load()
            timings["load"] = time.perf_counter() - t0

            t = time.perf_counter()
            check_cancel()
            tracker.stage("preprocessing", "resampling to the model's spacing")
            img = self.preprocess(volume)
            model_affine = img.affine.clone()
            timings["preprocess"] = time.perf_counter() - t

            check_cancel()
            roi = self.card.roi_size
            total = count_windows(img.shape[1:], roi, self.overlap)
            done = 0
            # Windows run one at a time on the CPU (no throughput lost there) so that cancel
            # and progress act within one window; GPUs get the full batch.
            step = 1 if self.device.type == "cpu" else self.sw_batch_size
            tracker.windows(0, total)

            def predictor(batch):
                nonlocal done
                outs = []
                for start in range(0, batch.shape[0], step):
                    check_cancel()
                    outs.append(net(batch[start:start + step]).float())
                    done += min(step, batch.shape[0] - start)
                    tracker.windows(done, total)
                return torch.cat(outs)

            t = time.perf_counter()
            x = img.as_tensor()[None].to(self.device)
            autocast = torch.autocast("cuda", dtype=torch.float16) if self.device.type == "cuda" else contextlib.nullcontext()
            with torch.inference_mode(), autocast:
                logits = sliding_window_inference(
                    x, roi_size=roi, sw_batch_size=self.sw_batch_size, predictor=predictor,
                    overlap=self.overlap, mode=self.card.blend_mode,
                )
                labels_model = logits.argmax(dim=1).to(torch.uint8).cpu()  # (1, X, Y, Z)
            del logits, x
            timings["inference"] = time.perf_counter() - t

            check_cancel()
            t = time.perf_counter()
            tracker.stage("resampling", "back to the input grid")
            labels = resample_labels(labels_model[0].numpy(), volume, src_affine=model_affine.numpy())
            timings["resample"] = time.perf_counter() - t
            timings["total"] = time.perf_counter() - t0

        if labels.shape != volume.shape:  # a broken invariant, not bad input
            raise AssertionError(f"labels {labels.shape} do not match the input grid {volume.shape}")
        return SegmentationResult(Volume(labels, volume.ijk_to_ras.copy()), self.card, str(self.device), timings)

