"""Loading weights into a card's network, safely and completely.

Checkpoints are read with ``torch.load(weights_only=True)``: a file that would run code
when unpickled is refused, not executed. The weights must fit the card's network
exactly: a missing, unexpected or mis-shaped key is an error that names the key and
the card, never a silent partial load.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any, Mapping

from SwinUNETRSegmentLib.errors import UserError
from SwinUNETRSegmentLib.fileio.atomic import file_digest
from SwinUNETRSegmentLib.models.cards import ModelCard
from SwinUNETRSegmentLib.models.networks import build_network  # re-exported: its home is models.networks

__all__ = ["NESTED_KEYS", "STRIP_PREFIXES", "read_state_dict", "extract_state_dict", "load_weights", "load_model",
           "sha256_file", "build_network"]

#: Keys under which training scripts nest the network's state_dict.
NESTED_KEYS = ("state_dict", "model", "model_state_dict", "network", "net")
#: Prefixes added by DistributedDataParallel / DataParallel and torch.compile.
STRIP_PREFIXES = ("module.", "_orig_mod.")


def sha256_file(path: str | Path) -> str:
    """The SHA256 of a file (:func:`~SwinUNETRSegmentLib.fileio.atomic.file_digest`)."""
    return file_digest(path, "sha256")


def read_state_dict(path: str | Path) -> dict[str, Any]:
    """The network weights inside a checkpoint file, whatever its known layout."""
    import torch

    p = Path(path)
    if not p.is_file():
        raise UserError(f"checkpoint not found: {path}; check the path")
    try:
        obj = torch.load(str(p), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        reason = " ".join(str(exc).split())[:160]
        raise UserError(
            f"refusing checkpoint {p.name}: it holds objects other than weights and would run code when loaded "
            f"({reason}); save it with torch.save(model.state_dict(), path)"
        ) from None
    except Exception as exc:  # torch raises many types for a file that is not a checkpoint
        raise UserError(f"cannot read checkpoint {p.name} ({' '.join(str(exc).split())[:160]}); "
                        "it is not a PyTorch weights file or is truncated") from None
    return extract_state_dict(obj, p.name)


def extract_state_dict(obj: Any, name: str = "checkpoint") -> dict[str, Any]:
    import torch

    if isinstance(obj, Mapping):
        for key in NESTED_KEYS:
            inner = obj.get(key)
            if isinstance(inner, Mapping) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                obj = inner
                break
    if not isinstance(obj, Mapping) or not obj:
        raise UserError(f"checkpoint {name} holds no state_dict; expected a dict of tensors, "
                        f"or one under {', '.join(NESTED_KEYS)}")
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise UserError(f"checkpoint {name} holds no tensors; expected a state_dict")
    out = {}
    for k, v in tensors.items():
        for prefix in STRIP_PREFIXES:
            while k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out


def load_weights(model, state_dict: Mapping[str, Any], card: ModelCard, checkpoint_name: str) -> None:
    """Load ``state_dict`` into ``model``; every key must match in name and shape."""
    expected = model.state_dict()
    where = f"checkpoint {checkpoint_name} does not fit model card '{card.name}'"
    for k, v in state_dict.items():
        if k in expected and tuple(expected[k].shape) != tuple(v.shape):
            raise UserError(
                f"{where}: '{k}' has shape {tuple(v.shape)} but the card's network needs {tuple(expected[k].shape)}; "
                "use the card the checkpoint was trained with"
            )
    result = model.load_state_dict(dict(state_dict), strict=False)
    missing, unexpected = list(result.missing_keys), list(result.unexpected_keys)
    if missing:
        raise UserError(f"{where}: {len(missing)} weights are missing, e.g. '{missing[0]}'; "
                        "use the card the checkpoint was trained with")
    if unexpected:
        raise UserError(f"{where}: {len(unexpected)} weights are not in the network, e.g. '{unexpected[0]}'; "
                        "use the card the checkpoint was trained with")


def load_model(card: ModelCard, checkpoint: str | Path):
    """Build the card's network and load a checkpoint into it (on the CPU, in eval mode)."""
    model = build_network(card)
    load_weights(model, read_state_dict(checkpoint), card, Path(checkpoint).name)
    return model.eval()
