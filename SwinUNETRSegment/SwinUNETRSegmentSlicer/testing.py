"""Stand-ins for the self-tests: a synthetic scan and segmenters whose answer is known.

:class:`ThresholdSegmenter` (a :class:`~SwinUNETRSegmentLib.inference.api.SegmenterProtocol`)
needs neither torch nor MONAI: the quick tests drive the MRML writing and merging with it
(and a fake engine server answers with its labels). :func:`oracle_segmenter` runs the real
engine (MONAI preprocessing, sliding windows, resampling back) with a network whose output
is known, when torch and MONAI are installed.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from typing import Optional

import numpy as np

from SwinUNETRSegmentLib.errors import CancelledError
from SwinUNETRSegmentLib.geometry import Volume
from SwinUNETRSegmentLib.inference.api import SegmentationResult
from SwinUNETRSegmentLib.models.cards import ModelCard, load_card
from SwinUNETRSegmentLib.progress import ProgressCallback, ProgressTracker

#: Label values of the synthetic scan's two objects in the btcv card.
SPLEEN, LIVER = 1, 6
#: Their intensities (HU); the background is -175 HU (0 after the btcv intensity window).
SPLEEN_HU, LIVER_HU, BACKGROUND_HU = 250, 100, -175


#: The synthetic scan's voxel size along its i, j, k axes (which point R, A, S).
SCAN_SPACING = (1.5, 1.2, 2.5)


def selftest_card() -> ModelCard:
    """The btcv card (its label table) with 32^3 windows and the scan's own voxel size, so that
    the real engine's resampling to model space and back is exact on the synthetic scan."""
    return dataclasses.replace(
        load_card("btcv"),
        name="btcv-selftest",
        title="Self-test model",
        network_args={**load_card("btcv").network_args, "feature_size": 12},
        spacing=SCAN_SPACING,
        roi_size=(32, 32, 32),
        overlap=0.25,
        sw_batch_size=1,
    )


def synthetic_scan(shape_kji=(30, 36, 40)) -> tuple[np.ndarray, np.ndarray]:
    """(voxels indexed [k, j, i] as Slicer stores them, IJK-to-RAS) of a scan with two boxes.

    The grid is anisotropic and oblique so that any axis or orientation mix-up in the
    Slicer layer moves the segments off their boxes.
    """
    arr = np.full(shape_kji, BACKGROUND_HU, np.int16)
    arr[6:22, 8:28, 5:20] = LIVER_HU
    arr[10:20, 12:24, 24:34] = SPLEEN_HU
    c, s = np.cos(0.3), np.sin(0.3)
    direction = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
    ijk_to_ras = np.eye(4)
    ijk_to_ras[:3, :3] = direction * np.array(SCAN_SPACING)[None, :]
    ijk_to_ras[:3, 3] = (-20.0, 15.0, 40.0)
    return arr, ijk_to_ras


def expected_labels_kji(arr_kji: np.ndarray) -> np.ndarray:
    """What both stand-in segmenters find: spleen where >= 200 HU, liver where >= 50 HU."""
    return np.where(arr_kji >= 200, SPLEEN, np.where(arr_kji >= 50, LIVER, 0)).astype(np.uint8)


class ThresholdSegmenter:
    """A :class:`~SwinUNETRSegmentLib.inference.api.SegmenterProtocol` without torch.

    Thresholds the scan on its own grid and reports ``windows`` sliding-window steps,
    sleeping ``seconds_per_window`` in each so that tests can cancel mid-run.
    """

    def __init__(self, card: Optional[ModelCard] = None, windows: int = 4, seconds_per_window: float = 0.0):
        self.card = card or selftest_card()
        self.device = "cpu"
        self.loaded = True
        self.windows = windows
        self.seconds_per_window = seconds_per_window
        self.calls = 0

    def segment(
        self, volume: Volume, progress: Optional[ProgressCallback] = None, cancel: Optional[threading.Event] = None
    ) -> SegmentationResult:
        self.calls += 1
        tracker = ProgressTracker(progress)
        tracker.stage("preprocessing")
        tracker.windows(0, self.windows)
        for n in range(self.windows):
            if cancel is not None and cancel.is_set():
                raise CancelledError("segmentation cancelled")
            time.sleep(self.seconds_per_window)
            tracker.windows(n + 1, self.windows)
        if cancel is not None and cancel.is_set():
            raise CancelledError("segmentation cancelled")
        tracker.stage("resampling")
        labels = expected_labels_kji(volume.kji()).transpose(2, 1, 0)
        return SegmentationResult(
            Volume(np.ascontiguousarray(labels), volume.ijk_to_ras.copy()), self.card, self.device
        )


def oracle_segmenter(card: Optional[ModelCard] = None):
    """The real engine :class:`Segmenter` on the CPU with a network that answers by threshold.

    After the btcv intensity window (-175..250 HU -> 0..1) the spleen box is 1.0, the
    liver box 0.65 and the background 0: the network says spleen above 0.85, liver above
    0.4. Needs torch and MONAI.
    """
    import torch

    from SwinUNETRSegmentLib.inference.engine import Segmenter

    card = card or selftest_card()

    class ThresholdNetwork(torch.nn.Module):
        def __init__(self, classes: int):
            super().__init__()
            self.classes = classes
            self.dummy = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x):
            v = x[:, 0]
            out = torch.full((x.shape[0], self.classes) + tuple(x.shape[2:]), -10.0, device=x.device)
            out[:, 0] = torch.where(v < 0.4, 10.0, -10.0)
            out[:, LIVER] = torch.where((v >= 0.4) & (v < 0.85), 10.0, -10.0)
            out[:, SPLEEN] = torch.where(v >= 0.85, 10.0, -10.0)
            return out

    return Segmenter(card, network=ThresholdNetwork(card.num_classes), device="cpu")
