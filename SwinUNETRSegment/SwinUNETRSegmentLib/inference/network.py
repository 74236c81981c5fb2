"""The network as the engine runs it: its weights' dtype, fused attention, windows per call,
cancel checks inside a call, and torch.compile.
"""

from __future__ import annotations
from SwinUNETRSegmentLib.inference.devices import autocast_dtype
import logging
import contextlib
from typing import Callable, Optional

log = logging.getLogger(__name__)


def cpu_windows_per_call(network, cpu_batch: Optional[int], card_batch: int = 2) -> int:
    """Windows per network call on the CPU: ``cpu_batch``, or for None two for a MONAI
    SwinUNETR (measured to pay; never more than the card's ``card_batch``) and one for any
    other network."""
    if cpu_batch is not None:
        return int(cpu_batch)
    try:
        from monai.networks.nets import SwinUNETR
    except ImportError:  # pragma: no cover - MONAI is a dependency
        return 1
    return max(1, min(2, int(card_batch))) if isinstance(network, SwinUNETR) else 1


def is_swin(network) -> bool:
    """A MONAI SwinUNETR or this package's Swin-Unet: the networks the CPU tuning was measured on."""
    try:
        from monai.networks.nets import SwinUNETR

        from SwinUNETRSegmentLib.models.swin_unet import SwinUnet
    except ImportError:  # pragma: no cover - MONAI is a dependency
        return False
    return isinstance(network, (SwinUNETR, SwinUnet))


def use_fused_attention(network, enabled: bool) -> int:
    """Switch MONAI's window attention modules to ``scaled_dot_product_attention`` (their
    ``use_flash_attention`` flag, read only at inference); returns how many were switched.

    One fused kernel instead of the bias add, mask add, softmax and two matrix products of
    the plain attention: feature_size 48, 96^3, float32 on 2 CPU cores: 1.28 x faster per
    window, outputs equal to 2e-6 (benchmarks/README.md)."""
    n = 0
    for module in network.modules():
        if hasattr(module, "use_flash_attention") and hasattr(module, "relative_position_bias_table"):
            module.use_flash_attention = bool(enabled)
            n += 1
    return n


def network_dtype(device, precision: str, network, bf16_weights: bool):
    """The dtype to hold ``network``'s weights in: bfloat16 for a Swin network on a CPU that
    runs bfloat16 natively (when allowed), else float32 (autocast then does the rest)."""
    import torch

    if (bf16_weights and getattr(device, "type", str(device)) == "cpu"
            and autocast_dtype(device, precision) == torch.bfloat16 and is_swin(network)):
        return torch.bfloat16
    return torch.float32


@contextlib.contextmanager
def cancel_checks(network, check: Callable[[], None], enabled: bool = True, depth: int = 3):
    """Call ``check`` before each of ``network``'s blocks (modules up to ``depth`` levels
    down) while the context is open, so that cancel acts inside a network call that holds
    several windows. The hooks are removed on exit."""
    handles = []
    if enabled and network is not None:
        for name, module in network.named_modules():
            if name and name.count(".") < depth:
                handles.append(module.register_forward_pre_hook(lambda _m, _a: check()))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def maybe_compile(network, enabled: bool):
    """``torch.compile(network)`` when asked and available; the plain network otherwise."""
    if not enabled:
        return network
    import torch

    try:
        return torch.compile(network, dynamic=False)
    except Exception as exc:  # noqa: BLE001
        log.warning("torch.compile is not available here (%s); running uncompiled", exc)
        return network
