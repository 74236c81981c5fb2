"""The network as the engine runs it: its weights' dtype, fused attention, windows per call,
cancel checks inside a call, and torch.compile.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import Optional

from SwinUNETRSegmentLib.inference.devices import autocast_dtype, cpu_has_native_bf16

__all__ = [
    "cpu_windows_per_call",
    "is_swin",
    "use_fused_attention",
    "fused_attention",
    "network_dtype",
    "cancel_checks",
    "maybe_compile",
]

log = logging.getLogger(__name__)


def cpu_windows_per_call(cpu_batch: Optional[int]) -> int:
    """Windows per network call on the CPU: ``cpu_batch``, or one for None ("auto"). A second
    window in the same call computes no faster on the CPU (a feature-48 SwinUNETR: the same
    inference seconds on a chest CT's 48 windows) and holds a second window's activations beside
    the first (676 MB more peak memory there; benchmarks/README.md, session 11)."""
    return 1 if cpu_batch is None else int(cpu_batch)


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
    the plain attention; the outputs agree to float rounding."""
    n = 0
    for module in _attention_modules(network):
        module.use_flash_attention = bool(enabled)
        n += 1
    return n


def _attention_modules(network) -> list:
    return [
        m for m in network.modules() if hasattr(m, "use_flash_attention") and hasattr(m, "relative_position_bias_table")
    ]


@contextlib.contextmanager
def fused_attention(network, enabled: bool) -> Iterator[int]:
    """:func:`use_fused_attention` while open; each module's own flag again after (a
    caller's network is left as it was). Yields how many modules were switched."""
    modules = _attention_modules(network)
    before = [m.use_flash_attention for m in modules]
    try:
        yield use_fused_attention(network, enabled)
    finally:
        for m, flag in zip(modules, before):
            m.use_flash_attention = flag


def network_dtype(device, precision: str, network, bf16_weights: bool):
    """The dtype to hold ``network``'s weights in: bfloat16 for a Swin network on a CPU that
    runs bfloat16 natively (when allowed), else float32 (autocast then does the rest). A
    CPU that only emulates bfloat16 never gets bfloat16 weights, even when bfloat16 was
    asked for: it then runs under bfloat16 autocast."""
    import torch

    if (
        bf16_weights
        and getattr(device, "type", str(device)) == "cpu"
        and cpu_has_native_bf16()
        and autocast_dtype(device, precision) == torch.bfloat16
        and is_swin(network)
    ):
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
    except Exception as exc:  # torch.compile fails in many ways where it is unsupported
        log.warning("torch.compile is not available here (%s); running uncompiled", exc)
        return network
