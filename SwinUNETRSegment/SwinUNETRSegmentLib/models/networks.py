"""The network a model card describes, freshly initialised (no weights loaded).

``network.decoder`` picks the decoder on SwinUNETR's Swin encoder: ``"unetr"`` (MONAI's
:class:`~monai.networks.nets.SwinUNETR`, its convolutional decoder) or ``"swin_unet"``
(:class:`~SwinUNETRSegmentLib.models.swin_unet.SwinUnet`, Swin-Unet's transformer decoder).
"""

from __future__ import annotations

from SwinUNETRSegmentLib.errors import UserError
from SwinUNETRSegmentLib.models.cards import Decoder, ModelCard

__all__ = ["build_network"]


def _network_class(decoder: str) -> type:
    from monai.networks.nets import SwinUNETR
    from monai.utils import look_up_option

    from SwinUNETRSegmentLib.models.swin_unet import SwinUnet

    return look_up_option(decoder, {Decoder.UNETR.value: SwinUNETR, Decoder.SWIN_UNET.value: SwinUnet})


def build_network(card: ModelCard):
    """A freshly initialised ``torch.nn.Module`` as the card describes it: MONAI's SwinUNETR,
    or the Swin-Unet decoder variant (``"decoder": "swin_unet"``) on the same Swin encoder.

    Its input is ``(batch, in_channels, *roi_size)``; its output ``(batch, out_channels, *roi_size)``
    logits, one channel per label value.

    Raises:
        UserError: the card's ``network.args`` are not arguments the network accepts.
    """
    network_class = _network_class(str(card.decoder))
    args = dict(card.network_args)
    args.pop("img_size", None)  # older MONAI bundles pass it; current SwinUNETR infers it
    args.setdefault("spatial_dims", 3)
    try:
        return network_class(**args)
    except (TypeError, ValueError, AssertionError) as exc:
        raise UserError(f"model card {card.source}: SwinUNETR does not accept its network args ({exc}); "
                        "fix 'network.args'") from None
