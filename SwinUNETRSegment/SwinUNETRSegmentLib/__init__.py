"""SwinUNETR Segment's engine: a MONAI SwinUNETR from a scan to labels on its exact grid.

The public API (everything else is internal)::

    from SwinUNETRSegmentLib import segment
    result = segment("ct.nii.gz", "ct.seg.nrrd", model="demo")   # read, segment, write
    result.present_labels()                                       # label values found

    from SwinUNETRSegmentLib import Segmenter, load_card, read_volume, write_segmentation
    volume, _info = read_volume("ct.nii.gz")
    segmenter = Segmenter(load_card("demo"), checkpoint="weights.pt", device="auto")
    result = segmenter.segment(volume, progress=print)           # the model stays loaded
    write_segmentation("ct.seg.nrrd", result.labels, result.card.labels)

The package is laid out along the data path: ``fileio/`` (reading scans, writing
segmentations, previews), ``models/`` (cards, catalog, checkpoints, networks),
``inference/`` (preprocess -> windows -> network -> resample, driven by the engine),
``training/`` (fine-tuning and self-supervised pretraining), ``cli/`` (the commands).
Names are imported on first use, so importing the package costs nothing and needs neither
torch nor MONAI (the Slicer side imports it before they are installed).
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

__all__ = [
    "CancelledError",
    "FastPath",
    "ModelCard",
    "SegmentationResult",
    "Segmenter",
    "SegmenterProtocol",
    "UserError",
    "Volume",
    "load_card",
    "read_volume",
    "segment",
    "write_segmentation",
]

_HOMES = {
    "CancelledError": "SwinUNETRSegmentLib.errors",
    "UserError": "SwinUNETRSegmentLib.errors",
    "Volume": "SwinUNETRSegmentLib.geometry",
    "FastPath": "SwinUNETRSegmentLib.inference.options",
    "SegmentationResult": "SwinUNETRSegmentLib.inference.api",
    "SegmenterProtocol": "SwinUNETRSegmentLib.inference.api",
    "Segmenter": "SwinUNETRSegmentLib.inference.engine",
    "ModelCard": "SwinUNETRSegmentLib.models.cards",
    "load_card": "SwinUNETRSegmentLib.models.cards",
    "read_volume": "SwinUNETRSegmentLib.fileio.read",
    "write_segmentation": "SwinUNETRSegmentLib.fileio.write",
}

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from SwinUNETRSegmentLib.errors import CancelledError, UserError
    from SwinUNETRSegmentLib.fileio.read import read_volume
    from SwinUNETRSegmentLib.fileio.write import write_segmentation
    from SwinUNETRSegmentLib.geometry import Volume
    from SwinUNETRSegmentLib.inference.api import SegmentationResult, SegmenterProtocol
    from SwinUNETRSegmentLib.inference.engine import Segmenter
    from SwinUNETRSegmentLib.inference.options import FastPath
    from SwinUNETRSegmentLib.models.cards import ModelCard, load_card


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        value = getattr(importlib.import_module(_HOMES[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'SwinUNETRSegmentLib' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


#: the last segmenter :func:`segment` used, kept warm for the next call with the same model
_WARM: dict[tuple, Any] = {}


def segment(
    input: str | Path | Volume,
    output: str | Path | list[str | Path] | None = None,
    model: str = "demo",
    *,
    device: str = "auto",
    overlap: Optional[float] = None,
    fast: Optional[FastPath] = None,
    overwrite: bool = False,
    progress=None,
    cancel=None,
) -> SegmentationResult:
    """Segment a scan with a catalog model in one call; write the result if asked.

    Args:
        input: a scan file (NIfTI, NRRD, MetaImage), a DICOM series folder, or a
            :class:`Volume`.
        output: where to write the labels (``.seg.nrrd``, ``.nii``, ``.nii.gz``; a list
            for several), or None to only return them. Checked before any work is done.
        model: a catalog model name (``swinunetr-segment models list``).
        device: "auto", "cpu", "cuda", "cuda:N" or "mps".
        overlap: sliding-window overlap (the card's when None).
        fast: the fast path's switches (:class:`FastPath`; its defaults when None).
        overwrite: replace outputs that exist.
        progress: called with :class:`~SwinUNETRSegmentLib.progress.Progress` reports.
        cancel: a ``threading.Event``; set it to stop.

    Returns:
        the :class:`SegmentationResult`: labels on the input's exact grid, the card, timings.

    The model stays loaded for the next call with the same model, device and settings.
    Bad input raises :class:`UserError` with a one-line message.
    """
    from SwinUNETRSegmentLib.fileio.read import read_volume
    from SwinUNETRSegmentLib.fileio.write import check_output_path, write_segmentation
    from SwinUNETRSegmentLib.geometry import Volume
    from SwinUNETRSegmentLib.inference.engine import Segmenter
    from SwinUNETRSegmentLib.models.catalog import resolve_model

    outputs = [] if output is None else ([output] if isinstance(output, (str, Path)) else list(output))
    paths = [check_output_path(p, overwrite=overwrite) for p in outputs]
    volume = input if isinstance(input, Volume) else read_volume(input)[0]
    key = (model, device, overlap, fast)
    segmenter = _WARM.get(key)
    if segmenter is None:
        card, weights = resolve_model(model)
        segmenter = Segmenter(card, checkpoint=weights, device=device, overlap=overlap, fast=fast)
        _WARM.clear()  # one warm model at a time
        _WARM[key] = segmenter
    result = segmenter.segment(volume, progress=progress, cancel=cancel)
    for p in paths:
        write_segmentation(p, result.labels, result.card.labels)
    return result
