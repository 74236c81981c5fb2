"""The proxy tasks' losses: rotation (cross-entropy), contrastive (InfoNCE between the two
views of each sub-volume) and reconstruction (L1 against the uncut view), and their
weighted sum."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from SwinUNETRSegmentLib.training.ssl.heads import PretrainOutput

__all__ = ["LOSS_NAMES", "rotation_loss", "contrastive_loss", "reconstruction_loss", "PretrainLoss"]

#: Losses in the order of ``--loss-weights``.
LOSS_NAMES = ("rotation", "contrastive", "reconstruction")


def rotation_loss(logits: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of rotation logits (N, 4) against the rotations k (N,) in 0..3."""
    return F.cross_entropy(logits.float(), k.long())


def contrastive_loss(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """InfoNCE (NT-Xent) between two views of a batch.

    ``z1[i]`` and ``z2[i]`` (B, P) are projections of two views of sub-volume i: each of the
    2B projections must pick its partner among the other 2B - 1 by cosine similarity
    divided by ``temperature``. Needs B >= 2 (with B = 1 there is no negative: the loss is 0).
    """
    if z1.shape != z2.shape or z1.dim() != 2:
        raise ValueError(f"two (B, P) projections of equal shape are needed, got {tuple(z1.shape)} and "
                         f"{tuple(z2.shape)}")
    b = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)
    sim = z @ z.t() / temperature
    sim = sim.masked_fill(torch.eye(2 * b, dtype=torch.bool, device=z.device), float("-inf"))
    partner = torch.cat([torch.arange(b, 2 * b), torch.arange(0, b)]).to(z.device)
    return F.cross_entropy(sim, partner)


def reconstruction_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """L1 between a reconstruction and its target (N, C, X, Y, Z): the mean over all voxels,
    or over the voxels where ``mask`` (N, 1, X, Y, Z) is True (0 when it is empty)."""
    diff = (pred.float() - target.float()).abs()
    if mask is None:
        return diff.mean()
    m = mask.expand_as(diff).to(diff.dtype)
    return (diff * m).sum() / m.sum().clamp_min(1.0)


class PretrainLoss(nn.Module):
    """Weighted sum of the three proxy losses.

    Args:
        weights: (rotation, contrastive, reconstruction) weights.
        temperature: of the InfoNCE loss.
        region: "volume" (L1 over every voxel, as the paper) or "cutout" (over the cut-out voxels).
    """

    def __init__(self, weights: Sequence[float] = (1.0, 1.0, 1.0), temperature: float = 0.5, region: str = "volume"):
        super().__init__()
        if len(weights) != 3:
            raise ValueError("three loss weights are needed: rotation, contrastive, reconstruction")
        if region not in ("volume", "cutout"):
            raise ValueError(f"region must be 'volume' or 'cutout', got {region!r}")
        self.weights = tuple(float(w) for w in weights)
        self.temperature = float(temperature)
        self.region = region

    def forward(self, out: PretrainOutput, k: torch.Tensor, target: torch.Tensor,
                mask: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Total loss and each loss (unweighted) for the outputs of 2B views: the first B
        and the last B are the two views of the same B sub-volumes.

        Args:
            out: the network's outputs for the (2B, C, X, Y, Z) cut views.
            k: (2B,) their rotations.
            target: (2B, C, X, Y, Z) the rotated views before the cut-outs.
            mask: (2B, 1, X, Y, Z) the cut-out voxels (used when ``region="cutout"``).
        """
        b = out.contrastive.shape[0] // 2
        region_mask = mask if self.region == "cutout" else None
        parts = {
            "rotation": rotation_loss(out.rotation, k),
            "contrastive": contrastive_loss(out.contrastive[:b], out.contrastive[b:], self.temperature),
            "reconstruction": reconstruction_loss(out.reconstruction, target, region_mask),
        }
        total = sum(w * parts[n] for w, n in zip(self.weights, LOSS_NAMES))
        return total, parts  # type: ignore[return-value]

