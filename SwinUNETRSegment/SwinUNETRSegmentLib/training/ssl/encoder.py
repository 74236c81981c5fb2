"""Fine-tuning from self-supervised weights: loading an encoder into a network's ``swinViT``.

Reads ``encoder.pt`` from ``swinunetr-segment pretrain``, a whole SwinUNETR (or SwinUnet)
checkpoint, or a research-contributions SwinUNETR/Pretrain checkpoint; the decoder and the
output head are left as they are.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from SwinUNETRSegmentLib.errors import UserError

__all__ = ["ENCODER_PREFIX", "load_encoder_weights"]

#: The encoder's attribute in SwinUNETR (and SwinUnet): its state_dict keys start with this.
ENCODER_PREFIX = "swinViT."
#: Prefixes under which checkpoints keep the encoder (after "module." is stripped).
_ENCODER_PREFIXES = ("swinViT.", "swin_vit.")
#: Older MONAI names of the Swin blocks' MLP layers (research-contributions' model_swinvit.pt).
_RENAMES = ((".mlp.fc1.", ".mlp.linear1."), (".mlp.fc2.", ".mlp.linear2."))


def _encoder_key(key: str, roots: set[str]) -> str | None:
    """The encoder-relative name of a checkpoint key, or None when it is not an encoder weight."""
    while key.startswith("module."):
        key = key[len("module."):]
    for prefix in _ENCODER_PREFIXES:
        if key.startswith(prefix):
            key = key[len(prefix):]
            break
    else:
        if key.split(".", 1)[0] not in roots:
            return None  # a head, a decoder, or another network's weight
    for old, new in _RENAMES:
        key = key.replace(old, new)
    return key


def load_encoder_weights(network: nn.Module, path: str | Path) -> int:
    """Load self-supervised encoder weights into a network's Swin encoder (``network.swinViT``).

    Reads ``encoder.pt`` from ``swinunetr-segment pretrain`` (keys ``swinViT....``), a whole
    SwinUNETR (or SwinUnet) checkpoint (its ``swinViT.*`` weights; the rest is ignored), or a
    research-contributions SwinUNETR/Pretrain checkpoint (keys ``module.``-prefixed,
    without ``swinViT.``, nested under ``state_dict``, old ``mlp.fc1``/``fc2`` names), always
    with ``torch.load(weights_only=True)``. The decoder and the output head keep their
    weights (fresh ones, for fine-tuning).

    Returns:
        the number of tensors loaded (every parameter of the encoder, and its buffers the file holds).

    Raises:
        UserError: the file is not a checkpoint, holds no encoder weight, misses some of the
            encoder's parameters, holds encoder weights the network lacks, maps two keys to
            one weight, or a shape differs (another feature_size, depths or window size).
    """
    from SwinUNETRSegmentLib.models.checkpoint import read_state_dict

    name = Path(path).name
    encoder = getattr(network, "swinViT", None)
    if not isinstance(encoder, nn.Module):
        raise UserError(f"cannot load {name}: the network has no Swin encoder ('swinViT'); "
                        "use a SwinUNETR or Swin-Unet card")
    state = read_state_dict(path)
    expected = encoder.state_dict()
    roots = {k.split(".", 1)[0] for k in expected}
    mapped: dict[str, torch.Tensor] = {}
    source: dict[str, str] = {}
    for key, value in state.items():
        k = _encoder_key(key, roots)
        if k is None:
            continue
        if k in mapped:
            raise UserError(f"{name} is ambiguous: '{source[k]}' and '{key}' both name encoder weight '{k}'; "
                            "keep one of them")
        mapped[k], source[k] = value, key
    if not set(mapped) & set(expected):
        first = next(iter(state), "?")
        raise UserError(f"{name} holds no Swin encoder weights (its first key is '{first}'); give encoder.pt from "
                        "'swinunetr-segment pretrain', a SwinUNETR checkpoint or a SwinUNETR/Pretrain model_swinvit.pt")
    for k, v in mapped.items():
        if k in expected and tuple(v.shape) != tuple(expected[k].shape):
            raise UserError(f"{name} does not fit this network's encoder: '{ENCODER_PREFIX}{k}' has shape "
                            f"{tuple(v.shape)} but the network needs {tuple(expected[k].shape)}; use a card with the "
                            "pretraining run's feature_size, depths and window_size")
    unexpected = sorted(set(mapped) - set(expected))
    if unexpected:
        raise UserError(f"{name} holds {len(unexpected)} encoder weights this network lacks, e.g. "
                        f"'{ENCODER_PREFIX}{unexpected[0]}'; use a card with the pretraining run's network args "
                        "(depths, use_v2)")
    params = {n for n, _ in encoder.named_parameters()}
    missing = sorted(params - set(mapped))
    if missing:
        raise UserError(f"{name} covers {len(params) - len(missing)} of the encoder's {len(params)} parameters; "
                        f"'{ENCODER_PREFIX}{missing[0]}' is missing; give the whole encoder")
    with torch.no_grad():
        for k, v in mapped.items():
            expected[k].copy_(v)  # state_dict tensors share storage with the module's
    return len(mapped)

