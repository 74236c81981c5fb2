"""The pretraining network: SwinUNETR's Swin encoder with the three proxy-task heads.

The encoder is MONAI's ``SwinTransformer`` with SwinUNETR's parameter names (``swinViT.*``),
built from the card's network args, so its weights load into the segmentation network
(:func:`~SwinUNETRSegmentLib.training.ssl.encoder.load_encoder_weights`). The heads work on
the deepest encoder features (B, 16F, H/32, W/32, D/32): a rotation head (MLP, 4 classes), a
contrastive head (MLP projection) and a reconstruction head (convolutions and 2x upsamplings
back to the input size).
"""

from __future__ import annotations

import math
from typing import Any, Mapping, NamedTuple

import torch
from torch import nn

from SwinUNETRSegmentLib.training.ssl.encoder import ENCODER_PREFIX
from SwinUNETRSegmentLib.training.ssl.views import ROTATIONS

__all__ = ["RotationHead", "ContrastiveHead", "ReconstructionHead", "PretrainOutput", "PretrainNetwork"]


def _pool(features: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w, d) -> (B, C): the mean over the voxels."""
    return features.flatten(2).mean(-1)


class RotationHead(nn.Module):
    """MLP on the pooled deepest features: (B, dim, h, w, d) -> rotation logits (B, 4)."""

    def __init__(self, dim: int, hidden: int | None = None):
        super().__init__()
        hidden = hidden or dim
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, ROTATIONS))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.mlp(_pool(features))


class ContrastiveHead(nn.Module):
    """MLP projection of the pooled deepest features: (B, dim, h, w, d) -> (B, out_dim)."""

    def __init__(self, dim: int, out_dim: int = 512, hidden: int | None = None):
        super().__init__()
        hidden = hidden or dim
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, out_dim))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.mlp(_pool(features))


class ReconstructionHead(nn.Module):
    """Upsampling convolutions from the deepest features back to the input size.

    ``upsamplings`` times: trilinear 2x upsampling, then a 3x3x3 convolution, instance
    norm and leaky ReLU, the channels halving from ``dim`` down to ``dim // 16``; then a
    1x1x1 convolution to ``out_channels``.
    (B, dim, h, w, d) -> (B, out_channels, h*2^n, w*2^n, d*2^n), n = ``upsamplings`` (5 for patch size 2).
    """

    def __init__(self, dim: int, out_channels: int = 1, upsamplings: int = 5):
        super().__init__()
        from monai.networks.blocks import Convolution

        layers: list[nn.Module] = []
        channels = dim
        for n in range(upsamplings):
            nxt = max(dim // 2 ** min(n + 1, 4), 1)
            layers += [
                nn.Upsample(scale_factor=2, mode="trilinear", align_corners=False),
                Convolution(3, channels, nxt, kernel_size=3, act=("leakyrelu", {"negative_slope": 0.01}),
                            norm="instance"),
            ]
            channels = nxt
        layers.append(nn.Conv3d(channels, out_channels, kernel_size=1))
        self.layers = nn.Sequential(*layers)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.layers(features)


class PretrainOutput(NamedTuple):
    """What :class:`PretrainNetwork` predicts for a batch of N volumes."""

    rotation: torch.Tensor  #: (N, 4) logits
    contrastive: torch.Tensor  #: (N, proj_dim) projections
    reconstruction: torch.Tensor  #: (N, in_channels, X, Y, Z), the input's size


class PretrainNetwork(nn.Module):
    """SwinUNETR's Swin encoder (``swinViT``) with the three proxy-task heads.

    Args:
        network_args: the card's network args (SwinUNETR's keywords: in_channels,
            feature_size, depths, ...); decoder-only ones are ignored.
        proj_dim: size of the contrastive projection.

    Forward: (N, in_channels, X, Y, Z), sizes multiples of 32 -> :class:`PretrainOutput`.
    """

    def __init__(self, network_args: Mapping[str, Any], proj_dim: int = 512):
        super().__init__()
        from SwinUNETRSegmentLib.models.swin_unet import build_swin_encoder

        self.swinViT = build_swin_encoder(network_args)
        dim = int(self.swinViT.embed_dim) * 16  # 16F: four patch mergings each double the channels
        patch = int(self.swinViT.patch_size[0])
        self.normalize = bool(network_args.get("normalize", True))
        self.rotation_head = RotationHead(dim)
        self.contrastive_head = ContrastiveHead(dim, proj_dim)
        self.reconstruction_head = ReconstructionHead(dim, int(network_args["in_channels"]),
                                                      round(math.log2(patch * 16)))

    def forward(self, x: torch.Tensor) -> PretrainOutput:
        deepest = self.swinViT(x.contiguous(), self.normalize)[4]  # (N, 16F, X/32, Y/32, Z/32)
        return PretrainOutput(self.rotation_head(deepest), self.contrastive_head(deepest),
                              self.reconstruction_head(deepest))

    def encoder_state_dict(self) -> dict[str, torch.Tensor]:
        """The encoder's weights, keys as in SwinUNETR's state_dict (``swinViT.``...), on the CPU."""
        return {ENCODER_PREFIX + k: v.detach().cpu().clone() for k, v in self.swinViT.state_dict().items()}

