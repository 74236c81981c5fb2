"""The fast path's switches: what each piece does and whether it changes the answer.

:class:`FastPath` holds the switches; :class:`~.engine.Segmenter` takes one (``fast=``).
Every piece is small and tested against the plain path on the same input
(``Testing/test_fastpath.py``); what each gains is measured against the MONAI model-zoo
reference pipeline by ``benchmarks/`` and recorded in ``benchmarks/README.md``, not here.

* **precision**: bfloat16 on CPUs with native bfloat16 (AVX512-BF16 / AMX), float16
  autocast on CUDA. Changes logits in the third significant digit; labels only where two
  classes are nearly tied.
* **bf16_weights**: on such CPUs a SwinUNETR runs with bfloat16 weights and inputs rather
  than under autocast (which casts around every norm and residual add). Never on a CPU
  that only emulates bfloat16. The same error as autocast.
* **fused_attention**: the Swin blocks' window attention through one fused
  ``scaled_dot_product_attention`` (MONAI's ``use_flash_attention``). Changes nothing
  beyond rounding.
* **cached_attention**: with fused attention, the shifted windows' attention mask and the
  relative position bias are built once per segmentation and broadcast over a call's
  windows, where MONAI rebuilds, expands and copies them on every call
  (:mod:`.cpu.window_attention`). Outputs bit for bit MONAI's.
* **pointwise_matmul**: on the CPU the 1x1x1 convolutions and the 2x2x2 stride-2
  transposed convolutions of the decoder run as one matrix product over the channels
  instead of through oneDNN's NCDHW path (:mod:`.cpu.pointwise_convs`). The same sums;
  equal bit for bit except where a large product's blocking changes the summation order.
* **threads**: torch's intra-op thread count from the physical cores this process may use
  (hyper-threads slow convolutions down), shared among torchrun's processes on the
  machine; restored after the run. Changes nothing.
* **skip_air**: a sliding window whose voxels all lie below the intensity window (air, the
  scanner's surroundings) is not run through the network: after clipping such a window is
  exactly the constant ``b_min``, so its output is the network's output for a constant
  window, computed once per engine and reused. Changes nothing (bit for bit up to the
  batch composition of the network call).
* **crop_to_body**: sliding windows cover only the bounding box of the body (non-air voxels
  in model space), its start snapped to the window grid of the uncropped image so that
  interior windows sit where the reference puts them; voxels outside the box are
  background; no crop when it would save no window. Changes the answer (the windows at
  the box's far edges sit elsewhere, and a network's answer depends on its window), so it
  is off by default.
* **resample**: the way back to the input grid (:mod:`.resample`): ``"boundaries"`` (the
  default; the labels of ``"probabilities"`` with probabilities computed only at
  boundaries; changes nothing beyond float rounding at exact ties), ``"probabilities"``
  (what the reference's bilinear ``Invertd`` + argmax computes, slab by slab) or
  ``"labels"`` (nearest neighbour; boundaries move by up to half a model voxel).
* **cpu_batch**: windows per network call on the CPU. "auto" gives one: a second window in
  the same call computes no faster on the CPU and holds a second window's activations. A
  caller may ask for more; cancel is then checked inside the network between its blocks, so
  it still acts within one window. Changes the answer by float rounding only.
* **gpu_stitching**: on CUDA the stitching buffer lives on the GPU (MONAI's
  ``SlidingWindowInfererAdapt`` moves it to the CPU when the GPU is full); then smaller
  window batches (a log line each).
* **half_stitching**: on the CPU, unless the precision is float32, the windows' logits are
  stitched into a float16 buffer (and the image the windows are cut from is float16):
  half the memory of the run's largest array (14 channels over model space: 393 MB at
  float32 on a 512 x 512 x 61 chest CT at 1.5 x 1.5 x 2 mm). Changes the input by at most
  0.05 % of the intensity window (a tenth of a Hounsfield unit) and the logits in the
  fourth significant digit, far below what bfloat16 changes; labels only at near ties.
* **float32_resampling**: unless the precision is float32, the scan is resampled to the model's
  grid in float32 (MONAI's ``Spacing`` computes in float64 by default): on the 512 x 512 x 300
  CT the preprocessing's peak falls from 2,312 to 1,326 MB, for intensities within 0.018 HU of
  float64's (mean 8e-5 HU; benchmarks/README.md, session 13).
* **compile**: ``torch.compile`` of the network. Off by default: it was measured to take
  minutes to compile on a CPU for no faster calls.
* **backend**: on the CPU the network can run on OpenVINO's runtime instead of PyTorch
  (:mod:`.cpu.openvino_backend`: converted once per checkpoint and cached). "auto" uses
  it where its conversion is cached (``swinunetr-segment models convert NAME``, the engine
  service in the background after a first job), and converts during a run whose PyTorch
  windows left would pay for it (``ConvertWhenItPays``); float32 always runs on PyTorch.
  Changes logits by float rounding (bfloat16 where the CPU has it natively, as above).
* **cache_preprocessed**: a second segmentation of the same voxels and grid reuses the
  model-space tensor (the key is a hash of the voxels, so an edited volume is redone).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import Enum
from typing import Any, Optional

from SwinUNETRSegmentLib.errors import UserError

__all__ = ["FastPath", "Backend", "Precision", "ResampleMode", "BACKENDS", "PRECISIONS", "RESAMPLE_MODES"]


class Precision(str, Enum):
    """The network's arithmetic: see :class:`FastPath` ``precision``."""

    AUTO = "auto"
    FLOAT32 = "float32"
    BFLOAT16 = "bfloat16"
    FLOAT16 = "float16"


class Backend(str, Enum):
    """What runs the network on the CPU: see :class:`FastPath` ``backend``."""

    AUTO = "auto"
    TORCH = "torch"
    OPENVINO = "openvino"


class ResampleMode(str, Enum):
    """The way back to the input grid: see :mod:`.resample`."""

    BOUNDARIES = "boundaries"
    PROBABILITIES = "probabilities"
    LABELS = "labels"


PRECISIONS = tuple(p.value for p in Precision)
BACKENDS = tuple(b.value for b in Backend)
RESAMPLE_MODES = tuple(m.value for m in ResampleMode)


def _option(value: Any, kind: type[Enum], what: str) -> str:
    """``value`` checked with MONAI's ``look_up_option`` against ``kind``; its plain string."""
    from monai.utils import look_up_option

    try:
        return str(look_up_option(value.value if isinstance(value, Enum) else value, kind).value)
    except (ValueError, TypeError):
        allowed = ", ".join(m.value for m in kind)
        raise UserError(f"{what} must be one of {allowed}, got '{value}'") from None


@dataclass(frozen=True)
class FastPath:
    """Switches of the fast path (see the module docstring for what each does).

    Attributes:
        precision: "auto" (bfloat16 on a CPU that has it, float16 on CUDA, float32
            elsewhere), "float32", "bfloat16" or "float16".
        bf16_weights: where the precision is bfloat16 on the CPU, a SwinUNETR's weights are
            cast to bfloat16 and the windows with them (no autocast casts around every norm
            and residual add); other networks get autocast.
        fused_attention: the Swin blocks' window attention through
            ``scaled_dot_product_attention`` (MONAI's ``use_flash_attention``) at inference.
        cached_attention: with fused attention, the shifted windows' mask and the relative
            position bias are built once per segmentation, not on every network call
            (:mod:`.window_attention`).
        pointwise_matmul: on the CPU, 1x1x1 convolutions and kernel-equals-stride transposed
            convolutions run as matrix products over the channels (:mod:`.pointwise_convs`).
        threads: torch intra-op threads; "auto" = the physical cores this process may run
            on; None leaves torch's setting alone.
        skip_air: do not run windows that hold only air.
        crop_to_body: run windows only over the body's bounding box.
        resample: "boundaries" (the reference's linear probabilities, computed only at
            boundaries), "probabilities" (linear everywhere, as the reference) or "labels"
            (nearest).
        cpu_batch: windows per network call on the CPU; None = "auto" (one).
        gpu_stitching: stitch windows on the GPU (CUDA only), with the fallbacks.
        half_stitching: on the CPU, stitch the logits in float16 unless ``precision`` is
            "float32".
        float32_resampling: resample the scan to the model's grid in float32 unless
            ``precision`` is "float32" (MONAI's default computes in float64).
        compile: torch.compile the network on first use.
        cache_preprocessed: reuse the model-space tensor of an unchanged volume.
        slab_voxels: input voxels resampled per slab (bounds the resampling's memory).
        backend: on the CPU, "auto" (OpenVINO when it is installed and this checkpoint's
            conversion is in the cache, or once converting during the run pays,
            :mod:`.cpu.openvino_backend`; PyTorch otherwise),
            "openvino" (convert now when not cached) or "torch". PyTorch always runs
            ``precision="float32"`` (the reference's labels exactly), GPUs and MPS.
    """

    precision: str = "auto"
    bf16_weights: bool = True
    fused_attention: bool = True
    cached_attention: bool = True
    pointwise_matmul: bool = True
    threads: Any = "auto"
    skip_air: bool = True
    crop_to_body: bool = False
    resample: str = "boundaries"
    cpu_batch: Optional[int] = None
    gpu_stitching: bool = True
    half_stitching: bool = True
    float32_resampling: bool = True
    compile: bool = False
    cache_preprocessed: bool = True
    slab_voxels: int = 1 << 20
    backend: str = "auto"

    def __post_init__(self) -> None:
        object.__setattr__(self, "precision", _option(self.precision, Precision, "precision"))
        object.__setattr__(self, "resample", _option(self.resample, ResampleMode, "resample"))
        object.__setattr__(self, "backend", _option(self.backend, Backend, "backend"))
        if self.threads not in (None, "auto") and (not isinstance(self.threads, int) or self.threads < 1):
            raise UserError(f"threads must be a positive integer, 'auto' or None, got {self.threads!r}")
        if self.cpu_batch is not None and (not isinstance(self.cpu_batch, int) or self.cpu_batch < 1):
            raise UserError(f"cpu_batch must be a positive integer or None (auto), got {self.cpu_batch!r}")
        if self.slab_voxels < 1:
            raise UserError("slab_voxels must be positive")

    @classmethod
    def plain(cls) -> "FastPath":
        """Everything off: float32, every window, the whole image, nearest labels back."""
        return cls(
            precision="float32",
            bf16_weights=False,
            fused_attention=False,
            cached_attention=False,
            pointwise_matmul=False,
            threads=None,
            skip_air=False,
            crop_to_body=False,
            resample="labels",
            cpu_batch=1,
            gpu_stitching=True,
            half_stitching=False,
            float32_resampling=False,
            compile=False,
            cache_preprocessed=False,
            backend="torch",
        )

    def but(self, **changes: Any) -> "FastPath":
        return replace(self, **changes)
