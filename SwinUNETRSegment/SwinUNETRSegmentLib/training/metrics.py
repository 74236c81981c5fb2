"""Validation Dice: what chooses ``best.pt`` and what a trained card records.

Dice per label by MONAI's :class:`~monai.metrics.DiceMetric` on one-hot (background, label)
inputs. A label the prediction holds but the truth does not scores 0 (an organ the model
invents counts against it); a label absent from both is left out (nothing to score).
"""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import numpy as np

from SwinUNETRSegmentLib.models.cards import LabelInfo

__all__ = ["dice_per_label", "mean_dice", "average_scores"]


def _one_hot(mask):
    """(X, Y, Z) bool -> (1, 2, X, Y, Z) float: background and foreground channels."""
    import torch

    m = torch.as_tensor(np.asarray(mask))
    return torch.stack([~m, m]).to(torch.float32)[None]


def dice_per_label(pred, truth, labels: Sequence[LabelInfo]) -> dict[str, float]:
    """Dice of each label present in ``truth`` or ``pred``.

    Args:
        pred: predicted label map (X, Y, Z), numpy or torch, the card's label values.
        truth: the reference label map of the same shape.
        labels: the card's labels.

    Returns:
        {label name: Dice in [0, 1]}: 0 for a label only ``pred`` holds; labels absent from
        both are not keys.
    """
    from monai.metrics import DiceMetric

    pred, truth = np.asarray(pred), np.asarray(truth)
    if pred.shape != truth.shape:
        raise ValueError(f"prediction {pred.shape} and truth {truth.shape} differ in shape")
    metric = DiceMetric(include_background=False, reduction="none", ignore_empty=False)
    out = {}
    for lab in labels:
        p, t = pred == lab.value, truth == lab.value
        if not (p.any() or t.any()):
            continue  # in neither: no Dice to report
        out[lab.name] = float(metric(_one_hot(p), _one_hot(t))[0, 0])
    return out


def average_scores(scans: Iterable[Mapping[str, float]]) -> dict[str, float]:
    """{label name: mean Dice over the scans that score it} from :func:`dice_per_label` of each scan."""
    scores: dict[str, list[float]] = {}
    for dice in scans:
        for name, d in dice.items():
            scores.setdefault(name, []).append(d)
    return {k: float(np.mean(v)) for k, v in scores.items()}


def mean_dice(dice: Mapping[str, float]) -> float:
    """The mean over the labels scored (invented ones included, at 0); 0 when none is."""
    return float(np.mean(list(dice.values()))) if dice else 0.0
