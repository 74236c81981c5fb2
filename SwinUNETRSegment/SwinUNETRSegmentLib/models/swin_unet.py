"""The Swin-Unet decoder variant in 3D, on MONAI's SwinUNETR encoder.

Cao et al., "Swin-Unet: Unet-like Pure Transformer for Medical Image Segmentation"
(ECCV workshops 2022) replace the convolutional decoder of a U-Net by Swin transformer
blocks and *patch expanding* layers. This is its 3D counterpart on the very Swin
transformer SwinUNETR uses (``monai.networks.nets.swin_unetr.SwinTransformer``, kept
under the attribute ``swinViT``), so that encoder weights (self-supervised
``encoder.pt`` from :mod:`.pretrain`, or a SwinUNETR checkpoint's ``swinViT.*``) load
into either network unchanged.

Shapes, for an input (B, C, H, W, D) with H, W, D multiples of 32 and F = feature_size::

    encoder (SwinUNETR's swinViT)   1/4: 2F   1/8: 4F   1/16: 8F   1/32: 16F
    bottleneck                      Swin blocks at 1/32, 16F
    decoder, three stages           patch expanding (x2, channels / 2), concatenate the
                                    encoder's features of that scale, linear back to the
                                    channels, Swin blocks: 1/16 8F -> 1/8 4F -> 1/4 2F
    final expanding                 x4 to full resolution, F channels
    class projection                per-voxel linear map F -> out_channels

The encoder's 1/2-scale output (the bare patch embedding, before any attention) is not a
skip, as in Swin-Unet, whose decoder ends at 1/4 with one 4x expansion.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

__all__ = ["DECODER_ONLY_ARGS", "PatchExpanding", "SwinUnet", "build_swin_encoder", "encoder_args"]

#: SwinUNETR constructor arguments that do not shape its Swin encoder (and this module's own).
DECODER_ONLY_ARGS = frozenset({
    "out_channels", "norm_name", "normalize", "img_size", "spatial_dims",
    "decoder", "decoder_depths", "bottleneck_depth",
})

#: SwinUNETR's names for the encoder arguments whose SwinTransformer names differ.
_RENAMED = {"in_channels": "in_chans", "feature_size": "embed_dim", "dropout_path_rate": "drop_path_rate"}

#: SwinUNETR's defaults for the encoder arguments (monai.networks.nets.SwinUNETR).
_DEFAULTS: dict[str, Any] = {
    "patch_size": 2, "depths": (2, 2, 2, 2), "num_heads": (3, 6, 12, 24), "window_size": 7, "qkv_bias": True,
    "mlp_ratio": 4.0, "feature_size": 24, "drop_rate": 0.0, "attn_drop_rate": 0.0, "dropout_path_rate": 0.0,
    "patch_norm": False, "use_checkpoint": False, "downsample": "merging", "use_v2": False,
}


def encoder_args(network_args: Mapping[str, Any]) -> dict[str, Any]:
    """SwinTransformer keyword arguments for the encoder of a SwinUNETR built with ``network_args``.

    ``network_args`` are a card's ``network.args`` (SwinUNETR's or :class:`SwinUnet`'s
    keywords); decoder-only keys are dropped, SwinUNETR's defaults fill the rest, and
    the conversions SwinUNETR applies (tuples per axis, the merging layer by name) are
    applied here too, so that the encoder's parameter names and shapes are SwinUNETR's.

    Raises:
        TypeError: a key that neither SwinUNETR's encoder nor the decoders know.
        ValueError: ``spatial_dims`` other than 3 or ``feature_size`` not a multiple of 12.
    """
    from monai.networks.nets.swin_unetr import MERGING_MODE, SwinTransformer
    from monai.utils import ensure_tuple_rep, look_up_option

    args = dict(network_args)
    if int(args.get("spatial_dims", 3)) != 3:
        raise ValueError(f"spatial_dims must be 3, got {args['spatial_dims']}")
    merged = {**_DEFAULTS, **{k: v for k, v in args.items() if k not in DECODER_ONLY_ARGS}}
    if "in_channels" not in merged:
        raise TypeError("in_channels is required")
    if int(merged["feature_size"]) % 12:
        raise ValueError(f"feature_size should be divisible by 12, got {merged['feature_size']}")
    accepted = set(inspect.signature(SwinTransformer).parameters)
    out: dict[str, Any] = {"spatial_dims": 3}
    for key, value in merged.items():
        name = _RENAMED.get(key, key)
        if name not in accepted:
            raise TypeError(f"unexpected network argument '{key}'")
        out[name] = value
    out["patch_size"] = ensure_tuple_rep(out["patch_size"], 3)
    out["window_size"] = ensure_tuple_rep(out["window_size"], 3)
    if isinstance(out["downsample"], str):
        out["downsample"] = look_up_option(out["downsample"], MERGING_MODE)
    if out.get("hyena_stages") is not None:
        out["hyena_stages"] = tuple(bool(s) for s in out["hyena_stages"])
    return out


def build_swin_encoder(network_args: Mapping[str, Any]) -> nn.Module:
    """The Swin encoder (``monai.networks.nets.swin_unetr.SwinTransformer``) of a SwinUNETR
    built with ``network_args``: same module tree, parameter names and shapes as
    ``SwinUNETR(**network_args).swinViT``.

    Its forward maps (B, in_channels, H, W, D) to five feature maps: (B, F*2^i, H/2^(i+1),
    W/2^(i+1), D/2^(i+1)) for i = 0..4, F = feature_size.
    """
    from monai.networks.nets.swin_unetr import SwinTransformer

    return SwinTransformer(**encoder_args(network_args))


def _channels_last(x: torch.Tensor) -> torch.Tensor:
    """(B, C, D, H, W) -> (B, D, H, W, C)."""
    return x.permute(0, 2, 3, 4, 1)


def _channels_first(x: torch.Tensor) -> torch.Tensor:
    """(B, D, H, W, C) -> (B, C, D, H, W), contiguous."""
    return x.permute(0, 4, 1, 2, 3).contiguous()


class PatchExpanding(nn.Module):
    """Swin-Unet's patch expanding layer in 3D.

    A linear layer raises the channels from ``dim`` to ``scale**3 * out_dim``; a
    rearrangement then moves each token's ``scale**3`` groups of ``out_dim`` channels to a
    ``scale x scale x scale`` block of new voxels; a LayerNorm follows. With the default
    ``scale=2, out_dim=dim // 2`` it doubles each spatial size and halves the channels.

    Input and output are channels-last: (B, D, H, W, dim) -> (B, scale*D, scale*H, scale*W, out_dim).
    """

    def __init__(self, dim: int, scale: int = 2, out_dim: int | None = None,
                 norm_layer: type[nn.Module] = nn.LayerNorm):
        super().__init__()
        self.scale = int(scale)
        self.out_dim = int(out_dim if out_dim is not None else dim // 2)
        self.expand = nn.Linear(dim, self.scale**3 * self.out_dim, bias=False)
        self.norm = norm_layer(self.out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, d, h, w, _ = x.shape
        s, c = self.scale, self.out_dim
        x = self.expand(x).view(b, d, h, w, s, s, s, c)
        x = x.permute(0, 1, 4, 2, 5, 3, 6, 7).reshape(b, d * s, h * s, w * s, c)
        return self.norm(x)


class SwinUnet(nn.Module):
    """Swin-Unet (Cao et al.) in 3D on SwinUNETR's Swin encoder.

    Args:
        in_channels: channels of the input image.
        out_channels: classes of the output (background included).
        feature_size: F, the encoder's embedding size (multiple of 12), as SwinUNETR's.
        depths, num_heads, window_size, patch_size, mlp_ratio, qkv_bias, drop_rate,
            attn_drop_rate, dropout_path_rate, use_checkpoint, downsample, use_v2 (and any
            other SwinUNETR encoder argument): the encoder's, with SwinUNETR's defaults.
        decoder_depths: Swin blocks in the decoder stages at 1/16, 1/8 and 1/4 resolution.
        bottleneck_depth: Swin blocks at 1/32 resolution between encoder and decoder.
        normalize: layer-normalise the encoder's outputs (as SwinUNETR does).
        spatial_dims: must be 3.

    Forward: (B, in_channels, H, W, D) -> logits (B, out_channels, H, W, D), for H, W, D
    multiples of 32 (``ValueError`` otherwise).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        feature_size: int = 24,
        depths: Sequence[int] = (2, 2, 2, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        window_size: Sequence[int] | int = 7,
        decoder_depths: Sequence[int] = (2, 2, 2),
        bottleneck_depth: int = 2,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        dropout_path_rate: float = 0.0,
        normalize: bool = True,
        use_checkpoint: bool = False,
        spatial_dims: int = 3,
        **encoder_kwargs: Any,
    ) -> None:
        super().__init__()
        from monai.networks.blocks import UnetOutBlock
        from monai.networks.nets.swin_unetr import BasicLayer
        from monai.utils import ensure_tuple_rep

        if spatial_dims != 3:
            raise ValueError(f"SwinUnet is 3D only; spatial_dims must be 3, got {spatial_dims}")
        if len(tuple(depths)) != 4 or len(tuple(num_heads)) != 4:
            raise ValueError("depths and num_heads need four stages each, as SwinUNETR's")
        if len(tuple(decoder_depths)) != 3:
            raise ValueError(f"decoder_depths needs three stages (1/16, 1/8, 1/4), got {list(decoder_depths)}")
        if encoder_kwargs.get("patch_size", 2) != 2:
            raise ValueError("SwinUnet needs patch_size 2 (its decoder ends at 1/4 with a 4x expansion)")
        self.normalize = normalize
        self.swinViT = build_swin_encoder({
            "in_channels": in_channels, "feature_size": feature_size, "depths": tuple(depths),
            "num_heads": tuple(num_heads), "window_size": window_size, "mlp_ratio": mlp_ratio, "qkv_bias": qkv_bias,
            "drop_rate": drop_rate,
            "attn_drop_rate": attn_drop_rate, "dropout_path_rate": dropout_path_rate, "use_checkpoint": use_checkpoint,
            **encoder_kwargs,
        })
        windows = ensure_tuple_rep(window_size, 3)
        f = feature_size
        n_blocks = bottleneck_depth + sum(decoder_depths)
        rates = [float(r) for r in torch.linspace(dropout_path_rate, 0.0, max(n_blocks, 1))]  # deepest drop most

        def swin_stage(dim: int, depth: int, heads: int, start: int) -> nn.Module:
            return BasicLayer(dim=dim, depth=depth, num_heads=heads, window_size=windows,
                              drop_path=rates[start:start + depth], mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                              drop=drop_rate, attn_drop=attn_drop_rate,
                              norm_layer=nn.LayerNorm, downsample=None, use_checkpoint=use_checkpoint)

        self.bottleneck = swin_stage(16 * f, bottleneck_depth, 2 * num_heads[3], 0) if bottleneck_depth > 0 \
            else nn.Identity()
        dims = (8 * f, 4 * f, 2 * f)  # decoder stages at 1/16, 1/8, 1/4
        heads = (num_heads[3], num_heads[2], num_heads[1])  # the encoder's heads at those widths
        self.expand = nn.ModuleList([PatchExpanding(2 * d) for d in dims])
        self.skip_proj = nn.ModuleList([nn.Linear(2 * d, d) for d in dims])
        starts = [bottleneck_depth + sum(decoder_depths[:i]) for i in range(3)]
        self.decoder = nn.ModuleList([swin_stage(d, n, h, s)
                                      for d, n, h, s in zip(dims, decoder_depths, heads, starts, strict=True)])
        self.norm_up = nn.LayerNorm(2 * f)
        self.final_expand = PatchExpanding(2 * f, scale=4, out_dim=f)
        self.out = UnetOutBlock(spatial_dims=3, in_channels=f, out_channels=out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_channels, H, W, D) -> logits (B, out_channels, H, W, D)."""
        bad = [int(s) for s in x.shape[2:] if int(s) % 32]
        if len(x.shape) != 5 or bad:
            raise ValueError(f"SwinUnet needs a (B, C, H, W, D) input with H, W, D multiples of 32, "
                             f"got {tuple(x.shape)}")
        hidden = self.swinViT(x, self.normalize)  # 1/2 F, 1/4 2F, 1/8 4F, 1/16 8F, 1/32 16F
        y = self.bottleneck(hidden[4])
        skips = (hidden[3], hidden[2], hidden[1])
        for expand, proj, stage, skip in zip(self.expand, self.skip_proj, self.decoder, skips, strict=True):
            y = expand(_channels_last(y))
            y = proj(torch.cat([y, _channels_last(skip)], dim=-1))
            y = stage(_channels_first(y))
        y = self.final_expand(self.norm_up(_channels_last(y)))
        return self.out(_channels_first(y))
