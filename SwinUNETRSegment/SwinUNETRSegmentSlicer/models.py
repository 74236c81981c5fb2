"""The models and devices the panel offers, which segmenter a run uses, and which one stays
loaded between runs ("Keep the model loaded"). No Slicer here."""

from __future__ import annotations

import logging
import sys
import threading
import time
from typing import Any, Callable, Hashable, Optional

from SwinUNETRSegmentLib.errors import CancelledError, UserError
from SwinUNETRSegmentLib.inference.api import SegmenterProtocol
from SwinUNETRSegmentLib.models.cards import ModelCard
from SwinUNETRSegmentLib.progress import Progress, ProgressCallback

#: ``factory(model, device, overlap, sw_batch_size)`` -> a segmenter
#: (:class:`~SwinUNETRSegmentLib.inference.api.SegmenterProtocol`).
SegmenterFactory = Callable[[str, str, Optional[float], Optional[int]], SegmenterProtocol]


def catalog_models() -> list[tuple[str, ModelCard]]:
    """(name, card) of every catalog model; a user card that does not load is left out with a warning."""
    from SwinUNETRSegmentLib.models.catalog import card_of, model_names

    models = []
    for name in model_names():
        try:
            models.append((name, card_of(name)))
        except UserError as exc:
            logging.warning(f"SwinUNETRSegment: model '{name}' left out: {exc}")
    return models


def weights_url(card: ModelCard) -> Optional[str]:
    """Where to download ``card``'s weights from when they are not on this machine yet; None when
    they are (or when the card names no URL: running then says how to install them)."""
    from SwinUNETRSegmentLib.models.catalog import is_installed

    return None if is_installed(card) else card.checkpoint.get("url") or None


def devices() -> Optional[list[tuple[str, str]]]:
    """(device, name) torch can use here, best first; None while no usable torch is installed
    (checked from package metadata, so a missing torch is never imported)."""
    from SwinUNETRSegmentLib.requirements import torch_problem

    if torch_problem() is not None:
        return None
    from SwinUNETRSegmentLib.inference.devices import available_devices

    return available_devices()


def catalog_segmenter(
    model: str, device: str = "auto", overlap: Optional[float] = None, sw_batch_size: Optional[int] = None
):
    """The engine's Segmenter for catalog model ``model`` (UserError when its weights are missing)."""
    from SwinUNETRSegmentLib.inference.engine import Segmenter
    from SwinUNETRSegmentLib.models.catalog import resolve_model

    card, weights = resolve_model(model)
    return Segmenter(card, weights, device=device, overlap=overlap, sw_batch_size=sw_batch_size)


def download_progress(
    progress: ProgressCallback, cancel: Optional[threading.Event] = None, clock: Callable[[], float] = time.monotonic
) -> Callable[[int, Optional[int]], None]:
    """A ``progress(bytes_done, bytes_total)`` callback for :func:`SwinUNETRSegmentLib.catalog.download`
    that reports :class:`Progress` (stage "downloading weights", MB done, time left from the
    rate so far) and stops the download, by raising CancelledError, once ``cancel`` is set.
    """
    start = clock()

    def report(done: int, total: Optional[int]) -> None:
        if cancel is not None and cancel.is_set():
            raise CancelledError("download cancelled")
        elapsed = clock() - start
        left = None
        if total and done and elapsed > 0:
            left = (total - done) * elapsed / done
        mb = f"{done / 1e6:.0f} of {total / 1e6:.0f} MB" if total else f"{done / 1e6:.0f} MB"
        progress(Progress("downloading weights", (done / total) if total else 0.0, left, mb, done, total or 0))

    return report


class ModelCache:
    """Keeps at most one segmenter (and so one network in memory) between runs.

    A run with the same settings as the kept segmenter reuses it, so its network is not
    loaded again; any other settings release it first, so two models never sit in GPU
    memory together.
    """

    def __init__(self, factory: SegmenterFactory = catalog_segmenter):
        self.factory = factory
        self._key: Optional[Hashable] = None
        self._kept: Any = None

    @property
    def kept(self) -> Any:
        return self._kept

    def get(
        self,
        model: str,
        device: str = "auto",
        overlap: Optional[float] = None,
        sw_batch_size: Optional[int] = None,
        keep: bool = True,
    ):
        """The segmenter for these settings; remembered for the next run when ``keep``."""
        key = (model, device, overlap, sw_batch_size)
        if self._kept is not None and self._key == key:
            segmenter = self._kept
        else:
            self.release()
            segmenter = self.factory(model, device, overlap, sw_batch_size)
        if keep:
            self._key, self._kept = key, segmenter
        else:
            self._key, self._kept = None, None
        return segmenter

    def release(self) -> None:
        """Forget the kept segmenter; CUDA memory no network uses any more goes back to the driver."""
        self._key, self._kept = None, None
        torch = sys.modules.get("torch")  # never import torch just for this
        if torch is not None and torch.cuda.is_available():
            torch.cuda.empty_cache()
