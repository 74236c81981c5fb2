"""What a segmentation gives back, and the interface of whatever produces one.

Torch-free on purpose: the Slicer side and the service client import these names without
torch or MONAI installed.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Optional, Protocol, runtime_checkable

from SwinUNETRSegmentLib.geometry import Volume
from SwinUNETRSegmentLib.models.cards import ModelCard
from SwinUNETRSegmentLib.progress import ProgressCallback

__all__ = ["SegmentationResult", "SegmenterProtocol"]


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
        """The nonzero label values found, ascending (counted, not sorted: no copy)."""
        from SwinUNETRSegmentLib.models.segment_table import present_values

        return present_values(self.labels.array)


@runtime_checkable
class SegmenterProtocol(Protocol):
    """What the Slicer side, the command line and the service need of a segmenter:
    :class:`~SwinUNETRSegmentLib.inference.engine.Segmenter` in the engine process, a stand-in
    in tests, a client of a remote engine.

    ``segment`` takes the scan, an optional progress callback and an optional cancel event,
    and returns the labels on the scan's exact grid; it raises
    :class:`~SwinUNETRSegmentLib.errors.CancelledError` when cancelled and
    :class:`~SwinUNETRSegmentLib.errors.UserError` for a volume it cannot segment.
    """

    card: ModelCard

    @property
    def loaded(self) -> bool: ...

    def segment(
        self, volume: Volume, progress: Optional[ProgressCallback] = None, cancel: Optional[threading.Event] = None
    ) -> SegmentationResult: ...
