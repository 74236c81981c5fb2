"""The engine's fast path: the pieces that make a segmentation cheaper, each switchable.

:class:`FastPath` holds the switches; :class:`~.engine.Segmenter` takes one (``fast=``).
Every piece is small and tested against the plain path on the same input
(``Testing/test_fastpath.py``); ``benchmarks/bench_cpu.py`` measures each against the
MONAI model-zoo reference pipeline.

Pieces, and what each may change in the answer:

* **precision**: bfloat16 autocast on CPUs with native bfloat16 (AVX512-BF16 / AMX),
  float16 autocast on CUDA. Changes logits in the third significant digit; labels only
  where two classes are nearly tied.
* **bf16_weights**: on such CPUs a SwinUNETR runs with bfloat16 weights and inputs rather
  than under autocast, which casts around every norm and residual add of the full-size
  decoder: 1.13 x faster per window (feature_size 48), the same error as autocast.
* **fused_attention**: the Swin blocks' window attention through one fused
  ``scaled_dot_product_attention`` (MONAI's ``use_flash_attention``): 1.28 x faster per
  window in float32, outputs equal to 2e-6. Changes nothing beyond rounding.
* **cached_attention**: with fused attention, the shifted windows' attention mask and the
  relative position bias are built once per segmentation and broadcast over a call's
  windows, where MONAI rebuilds, expands and copies them on every call
  (:mod:`.window_attention`): 1.18 x faster per window at feature_size 48 (bfloat16, 96^3,
  two windows per call), 1.75 x at feature_size 12 (64^3; benchmarks/bench_network.py).
  Outputs bit for bit MONAI's.
* **pointwise_matmul**: on the CPU the 1x1x1 convolutions and the 2x2x2 stride-2
  transposed convolutions of the decoder run as one matrix product over the channels
  instead of through oneDNN's NCDHW path, which reorders the activations around every call
  (:mod:`.pointwise_convs`): 1.15 x per window at feature_size 48 (bfloat16, 96^3). The same
  sums; outputs equal bit for bit except where a large product's blocking changes the
  summation order (one rounding step).
* **threads**: torch's intra-op thread count from the physical cores this process may use
  (hyper-threads slow convolutions down). Changes nothing.
* **skip_air**: a sliding window whose voxels all lie below the intensity window (air, the
  scanner's surroundings) is not run through the network: after clipping such a window is
  exactly the constant ``b_min``, so its output is the network's output for a constant
  window, computed once per engine and reused. Changes nothing (bit for bit up to the
  batch composition of the network call).
* **crop_to_body**: sliding windows cover only the bounding box of the body (non-air voxels
  in model space), its start snapped to the window grid of the uncropped image so that
  interior windows sit where the reference puts them; voxels outside the box are
  background; no crop when it would save no window. The number of windows then follows
  the body, not the field of view. Changes the answer (the windows at the box's far edges
  sit elsewhere, and a network's answer depends on its window): an early checkpoint of the
  demo model gave 0.45 mean Dice against the reference on the air-padded CT (it never
  saw air around a body in training), so it is off by default (benchmarks/README.md).
* **resample** ``"boundaries"`` (the default): the labels of ``"probabilities"`` below,
  computed from a uint8 label map: wherever the eight model-space voxels around an input
  voxel share one argmax label, linear interpolation cannot change the winner, so only the
  voxels on a boundary interpolate the softmax of the 14 channels (:func:`resample_argmax`).
  Changes nothing beyond float rounding at exact ties (tested against MONAI's ``Invertd``).
  ``"probabilities"``: softmax probabilities interpolated linearly from model
  space to the input grid slab by slab (then argmax per slab), which is what the
  reference's bilinear ``Invertd`` + argmax computes, without a full-resolution float copy
  of the 14 channels. ``"labels"``: argmax in model space, nearest-neighbour labels back
  (the cheapest; boundaries move by up to half a model voxel).
* **cpu_batch**: windows per network call on the CPU. "auto" gives a SwinUNETR two (never
  more than the card's sw_batch_size) and other networks (stand-ins) one. Before the cached
  attention, two windows per call ran about 1.2 x faster than one (feature_size 48,
  bfloat16); with it, one, two and four per call cost the same per window (3.1, 3.1,
  3.2 s; peak RSS 1.6, 2.2, 3.2 GB), so a caller short of memory may set 1. Cancel is
  checked inside the network between its blocks, so it still acts within one window.
  Changes the answer by float rounding only.
* **gpu_stitching**: on CUDA the stitching buffer lives on the GPU; on out-of-memory the
  engine falls back to CPU stitching, then to smaller window batches (a log line each).
* **compile**: ``torch.compile`` of the network. Off by default: on 2 CPU cores it took
  167 s to compile a feature_size-48 SwinUNETR and the compiled calls were no faster
  (8.3-9.0 s against eager 7.8-8.0 s per two 96^3 windows; benchmarks/README.md).
* **cache_preprocessed**: a second segmentation of the same voxels and grid reuses the
  model-space tensor (the key is a hash of the voxels, so an edited volume is redone).
"""

from __future__ import annotations
from dataclasses import dataclass, replace
from typing import Any, Optional
from SwinUNETRSegmentLib.errors import UserError


PRECISIONS = ("auto", "float32", "bfloat16", "float16")


RESAMPLE_MODES = ("boundaries", "probabilities", "labels")


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
        cpu_batch: windows per network call on the CPU; None = "auto" (2 for a SwinUNETR,
            at most the card's sw_batch_size; 1 for any other network).
        gpu_stitching: stitch windows on the GPU (CUDA only), with the fallbacks.
        compile: torch.compile the network on first use.
        cache_preprocessed: reuse the model-space tensor of an unchanged volume.
        slab_voxels: input voxels resampled per slab (bounds the resampling's memory).
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
    compile: bool = False
    cache_preprocessed: bool = True
    slab_voxels: int = 1 << 20

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise UserError(f"precision must be one of {', '.join(PRECISIONS)}, got '{self.precision}'")
        if self.resample not in RESAMPLE_MODES:
            raise UserError(f"resample must be one of {', '.join(RESAMPLE_MODES)}, got '{self.resample}'")
        if self.threads not in (None, "auto") and (not isinstance(self.threads, int) or self.threads < 1):
            raise UserError(f"threads must be a positive integer, 'auto' or None, got {self.threads!r}")
        if self.cpu_batch is not None and (not isinstance(self.cpu_batch, int) or self.cpu_batch < 1):
            raise UserError(f"cpu_batch must be a positive integer or None (auto), got {self.cpu_batch!r}")
        if self.slab_voxels < 1:
            raise UserError("slab_voxels must be positive")

    @classmethod
    def plain(cls) -> "FastPath":
        """Everything off: float32, every window, the whole image, nearest labels back."""
        return cls(precision="float32", bf16_weights=False, fused_attention=False, cached_attention=False,
                   pointwise_matmul=False, threads=None, skip_air=False, crop_to_body=False, resample="labels",
                   cpu_batch=1, gpu_stitching=True, compile=False, cache_preprocessed=False)

    def but(self, **changes: Any) -> "FastPath":
        return replace(self, **changes)
