"""Self-supervised pretraining of the Swin encoder: ``swinunetr-segment pretrain``.

Tang et al., "Self-Supervised Pre-Training of Swin Transformers for 3D Medical Image
Analysis" (CVPR 2022) pretrain SwinUNETR's Swin encoder on unlabeled CT with three proxy
tasks, then fine-tune the whole network on few labeled scans. Here:

- each step takes ``--batch-size`` random sub-volumes (``--crop``\\ ^3 voxels, in the
  card's model space: orientation, spacing, intensity window) and makes two views of
  each: a random rotation by k*90 degrees about the axial axis (the label k of the
  rotation task) and random cut-out regions (filled with noise, or with another
  sub-volume's voxels) to inpaint;
- the encoder is MONAI's ``SwinTransformer`` with SwinUNETR's parameter names
  (``swinViT.*``), built from the card's network args, so its weights load into the
  segmentation network;
- three heads on the deepest encoder features (B, 16F, H/32, W/32, D/32): a rotation head
  (MLP, 4 classes, cross-entropy), a contrastive head (MLP projection; InfoNCE between the
  two views of each sub-volume against the other sub-volumes of the batch, with a
  temperature) and a reconstruction head (convolutions and 2x upsamplings back to the
  input size; L1 loss against the uncut view, over the whole volume as in the paper, or
  over the cut-out regions only); the total loss is their weighted sum (weights 1 by default).

Written to ``--out``: ``last.pt`` (resumable: model, optimizer, epoch, history; plain
tensors and numbers, loadable with ``torch.load(weights_only=True)``), ``encoder.pt``
(the encoder's weights alone, keys exactly as in SwinUNETR's state_dict:
``swinViT....``), ``pretrain.json`` (the configuration) and ``log.jsonl`` (one line per
epoch, each loss separately). Rerunning the same command resumes from ``last.pt``.
Fine-tuning loads ``encoder.pt`` with :func:`load_encoder_weights`.
"""

from __future__ import annotations
from SwinUNETRSegmentLib.fileio.read import ITK_SUFFIXES, NIFTI_SUFFIXES, has_suffix
from SwinUNETRSegmentLib.fileio.write import SEG_SUFFIXES

import argparse
import json
import math
import os
import shlex
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from SwinUNETRSegmentLib.errors import UserError

#: Number of rotation classes: 0, 90, 180 and 270 degrees about the axial axis.
ROTATIONS = 4
#: Losses in the order of ``--loss-weights``.
LOSS_NAMES = ("rotation", "contrastive", "reconstruction")
#: The encoder's attribute in SwinUNETR (and SwinUnet): its state_dict keys start with this.
ENCODER_PREFIX = "swinViT."


# --------------------------------------------------------------------------------------
# augmentation
# --------------------------------------------------------------------------------------
def axial_plane(orientation: str = "RAS") -> tuple[int, int]:
    """The two spatial axes (0..2) spanning the axial plane of arrays in ``orientation``
    (the axes that are not S/I): rotating in them rotates about the axial axis."""
    code = orientation.upper()
    axial = [n for n, c in enumerate(code) if c in "SI"]
    if len(code) != 3 or len(axial) != 1:
        raise UserError(f"orientation '{orientation}' has no single superior/inferior axis; use codes such as RAS or LPS")
    return tuple(n for n in range(3) if n != axial[0])  # type: ignore[return-value]


def rotate_axial(
    x: torch.Tensor,
    k: torch.Tensor | None = None,
    plane: tuple[int, int] = (0, 1),
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate each volume of a batch by k*90 degrees in ``plane``.

    Args:
        x: (B, C, X, Y, Z) volumes; the two sizes in ``plane`` must be equal.
        k: (B,) integers 0..3, or None to draw them uniformly.
        plane: the spatial axes (0..2) of the rotation plane, e.g. :func:`axial_plane`.
        generator: CPU random generator for ``k``.

    Returns:
        (rotated (B, C, X, Y, Z), k (B,) int64 on x's device): the rotation task's input and labels.
    """
    dims = (plane[0] + 2, plane[1] + 2)
    if x.shape[dims[0]] != x.shape[dims[1]]:
        raise ValueError(f"rotation plane {plane} of a {tuple(x.shape)} batch is not square")
    if k is None:
        k = torch.randint(0, ROTATIONS, (x.shape[0],), generator=generator)
    k = torch.as_tensor(k, dtype=torch.int64).reshape(-1)
    if k.numel() != x.shape[0]:
        raise ValueError(f"{k.numel()} rotations for a batch of {x.shape[0]}")
    out = torch.stack([torch.rot90(x[i], int(k[i]) % ROTATIONS, dims=(dims[0] - 1, dims[1] - 1)) for i in range(x.shape[0])])
    return out, k.to(x.device)


def _random_boxes(shape: Sequence[int], fraction: float, max_block: float, min_block: float,
                  generator: torch.Generator | None) -> list[tuple[slice, slice, slice]]:
    """Boxes in a volume of ``shape`` until their total size reaches ``fraction`` of it."""
    def draw(high: int) -> int:
        return int(torch.randint(0, max(high, 1), (1,), generator=generator))

    lo = [max(1, round(s * min_block)) for s in shape]
    hi = [max(lo[n] + 1, round(s * max_block) + 1) for n, s in enumerate(shape)]
    target = fraction * float(np.prod(shape))
    boxes, covered = [], 0
    while covered < target and len(boxes) < 1000:
        size = [lo[n] + draw(hi[n] - lo[n]) for n in range(3)]
        start = [draw(shape[n] - size[n] + 1) for n in range(3)]
        boxes.append(tuple(slice(start[n], start[n] + size[n]) for n in range(3)))
        covered += int(np.prod(size))
    return boxes  # type: ignore[return-value]


def random_cutout(
    x: torch.Tensor,
    max_fraction: float = 0.3,
    max_block: float = 0.25,
    min_block: float = 0.05,
    swap_probability: float = 0.5,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut random boxes out of each volume, for the network to inpaint.

    Each volume loses up to ``max_fraction`` of its voxels (a fraction drawn uniformly) in
    boxes of ``min_block`` to ``max_block`` of each side, filled with uniform noise in the
    volume's intensity range; with ``swap_probability`` as many more voxels are replaced
    by the voxels of another volume of the batch at the same place.

    Args:
        x: (B, C, X, Y, Z) volumes (not modified).
        generator: CPU random generator.

    Returns:
        (cut (B, C, X, Y, Z), mask (B, 1, X, Y, Z) bool: True where voxels were replaced).
    """
    out = x.detach().clone()
    mask = torch.zeros((x.shape[0], 1, *x.shape[2:]), dtype=torch.bool, device=x.device)
    shape = tuple(int(s) for s in x.shape[2:])

    def uniform() -> float:
        return float(torch.rand((), generator=generator))

    for i in range(x.shape[0]):
        lo, hi = float(x[i].min()), float(x[i].max())
        for box in _random_boxes(shape, uniform() * max_fraction, max_block, min_block, generator):
            size = [s.stop - s.start for s in box]
            noise = torch.rand((x.shape[1], *size), generator=generator) * (hi - lo) + lo
            out[(i, slice(None), *box)] = noise.to(device=x.device, dtype=x.dtype)
            mask[(i, slice(None), *box)] = True
        if x.shape[0] > 1 and uniform() < swap_probability:
            other = (i + 1 + int(torch.randint(0, x.shape[0] - 1, (1,), generator=generator))) % x.shape[0]
            for box in _random_boxes(shape, uniform() * max_fraction, max_block, min_block, generator):
                out[(i, slice(None), *box)] = x[(other, slice(None), *box)]
                mask[(i, slice(None), *box)] = True
    return out, mask


# --------------------------------------------------------------------------------------
# heads and losses
# --------------------------------------------------------------------------------------
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
                Convolution(3, channels, nxt, kernel_size=3, act=("leakyrelu", {"negative_slope": 0.01}), norm="instance"),
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
        self.reconstruction_head = ReconstructionHead(dim, int(network_args["in_channels"]), round(math.log2(patch * 16)))

    def forward(self, x: torch.Tensor) -> PretrainOutput:
        deepest = self.swinViT(x.contiguous(), self.normalize)[4]  # (N, 16F, X/32, Y/32, Z/32)
        return PretrainOutput(self.rotation_head(deepest), self.contrastive_head(deepest), self.reconstruction_head(deepest))

    def encoder_state_dict(self) -> dict[str, torch.Tensor]:
        """The encoder's weights, keys as in SwinUNETR's state_dict (``swinViT.``...), on the CPU."""
        return {ENCODER_PREFIX + k: v.detach().cpu().clone() for k, v in self.swinViT.state_dict().items()}


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
        raise ValueError(f"two (B, P) projections of equal shape are needed, got {tuple(z1.shape)} and {tuple(z2.shape)}")
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
        parts = {
            "rotation": rotation_loss(out.rotation, k),
            "contrastive": contrastive_loss(out.contrastive[:b], out.contrastive[b:], self.temperature),
            "reconstruction": reconstruction_loss(out.reconstruction, target, mask if self.region == "cutout" else None),
        }
        total = sum(w * parts[n] for w, n in zip(self.weights, LOSS_NAMES))
        return total, parts  # type: ignore[return-value]


def make_views(x: torch.Tensor, plane: tuple[int, int] = (0, 1), generator: torch.Generator | None = None,
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two augmented views of each sub-volume of a batch.

    Args:
        x: (B, C, X, Y, Z) sub-volumes.

    Returns:
        (inputs (2B, C, X, Y, Z): rotated and cut; k (2B,): the rotations; targets
        (2B, C, X, Y, Z): rotated, uncut; masks (2B, 1, X, Y, Z): the cut-out voxels).
        Views ``i`` and ``B + i`` come from sub-volume ``i``.
    """
    r1, k1 = rotate_axial(x, plane=plane, generator=generator)
    r2, k2 = rotate_axial(x, plane=plane, generator=generator)
    c1, m1 = random_cutout(r1, generator=generator)
    c2, m2 = random_cutout(r2, generator=generator)
    return torch.cat([c1, c2]), torch.cat([k1, k2]), torch.cat([r1, r2]), torch.cat([m1, m2])


def train_step(
    model: PretrainNetwork,
    optimizer: torch.optim.Optimizer,
    loss_fn: PretrainLoss,
    views: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    amp: bool = False,
    max_grad_norm: float = 0.0,
) -> tuple[float, dict[str, float]]:
    """One optimisation step on the views of :func:`make_views` (inputs (2B, C, X, Y, Z),
    rotations (2B,), targets (2B, C, X, Y, Z), masks (2B, 1, X, Y, Z)).

    Returns:
        (the total loss, {loss name: unweighted value}) before the step.
    """
    inputs, k, targets, masks = views
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast(device_type=inputs.device.type, dtype=torch.bfloat16, enabled=amp):
        outputs = model(inputs)
    loss, parts = loss_fn(outputs, k, targets, masks)
    if torch.isfinite(loss):
        loss.backward()
        if max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        optimizer.step()
    return float(loss.detach()), {n: float(v.detach()) for n, v in parts.items()}


# --------------------------------------------------------------------------------------
# fine-tuning: loading encoder weights
# --------------------------------------------------------------------------------------
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

    Reads ``encoder.pt`` from :func:`pretrain` (keys ``swinViT....``), a whole SwinUNETR
    (or SwinUnet) checkpoint (its ``swinViT.*`` weights; the rest is ignored), or a
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
        raise UserError(f"cannot load {name}: the network has no Swin encoder ('swinViT'); use a SwinUNETR or Swin-Unet card")
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
            raise UserError(f"{name} is ambiguous: '{source[k]}' and '{key}' both name encoder weight '{k}'; keep one of them")
        mapped[k], source[k] = value, key
    if not set(mapped) & set(expected):
        first = next(iter(state), "?")
        raise UserError(f"{name} holds no Swin encoder weights (its first key is '{first}'); give encoder.pt from "
                        "'swinunetr-segment pretrain', a SwinUNETR checkpoint or a SwinUNETR/Pretrain model_swinvit.pt")
    for k, v in mapped.items():
        if k in expected and tuple(v.shape) != tuple(expected[k].shape):
            raise UserError(f"{name} does not fit this network's encoder: '{ENCODER_PREFIX}{k}' has shape {tuple(v.shape)} but the "
                            f"network needs {tuple(expected[k].shape)}; use a card with the pretraining run's feature_size, "
                            "depths and window_size")
    unexpected = sorted(set(mapped) - set(expected))
    if unexpected:
        raise UserError(f"{name} holds {len(unexpected)} encoder weights this network lacks, e.g. '{ENCODER_PREFIX}{unexpected[0]}'; "
                        "use a card with the pretraining run's network args (depths, use_v2)")
    params = {n for n, _ in encoder.named_parameters()}
    missing = sorted(params - set(mapped))
    if missing:
        raise UserError(f"{name} covers {len(params) - len(missing)} of the encoder's {len(params)} parameters; "
                        f"'{ENCODER_PREFIX}{missing[0]}' is missing; give the whole encoder")
    with torch.no_grad():
        for k, v in mapped.items():
            expected[k].copy_(v)  # state_dict tensors share storage with the module's
    return len(mapped)


# --------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------
def list_images(data: str | Path) -> list[str]:
    """Scans to pretrain on: the "image" of each "training" item of a Decathlon datalist
    (paths relative to the JSON file; labels are not needed), or every scan in a folder
    (NIfTI, NRRD, MetaImage files; subfolders are DICOM series)."""

    p = Path(data)
    if p.is_file():
        try:
            content = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise UserError(f"datalist {p} is not readable JSON ({exc})") from None
        items = content.get("training") if isinstance(content, dict) else None
        if not isinstance(items, list) or not items:
            raise UserError(f"datalist {p} needs a non-empty 'training' list of {{\"image\": ...}} (labels are not needed)")
        out = []
        for n, item in enumerate(items):
            image = item.get("image") if isinstance(item, dict) else item
            if not isinstance(image, str):
                raise UserError(f"datalist {p}: training[{n}] needs an 'image' path")
            q = Path(image) if Path(image).is_absolute() else p.parent / image
            if not q.exists():
                raise UserError(f"datalist {p}: training[{n}] image not found: {q}")
            out.append(str(q))
        return out
    if p.is_dir():
        suffixes = NIFTI_SUFFIXES + ITK_SUFFIXES
        out = []
        for q in sorted(p.iterdir()):
            if q.name.startswith("."):
                continue
            if q.is_file() and has_suffix(q, suffixes) and not has_suffix(q, SEG_SUFFIXES):
                out.append(str(q))
            elif q.is_dir():
                out.append(str(q))  # a DICOM series (read_volume says so if it is not one)
        if not out:
            raise UserError(f"no scans in folder {p}; give NIfTI/NRRD/MetaImage files or DICOM series folders, or a datalist JSON")
        return out
    raise UserError(f"--data {data} not found; give a Decathlon datalist JSON or a folder of scans")


class LoadScand:
    """MONAI-style dictionary transform: {"image": path} -> {"image": MetaTensor (1, X, Y, Z)} with its RAS affine."""

    def __call__(self, item: dict) -> dict:
        from monai.data import MetaTensor

        from SwinUNETRSegmentLib.fileio.read import read_volume

        vol, _ = read_volume(item["image"])
        affine = torch.as_tensor(vol.ijk_to_ras, dtype=torch.float64)
        array = torch.from_numpy(np.ascontiguousarray(vol.array, dtype=np.float32))[None]
        return {"image": MetaTensor(array, affine=affine, meta={"filename_or_obj": str(item["image"])})}


def transforms(card, crop: int):
    """(deterministic part, random crop): MONAI Compose objects putting a scan in the card's
    model space (orientation, spacing, intensity window), trimmed to the body, padded to
    the crop, then one random ``crop``^3 sub-volume (1, crop, crop, crop)."""
    from monai import transforms as T

    it = card.intensity
    threshold = float(it["b_min"]) + 0.02 * (float(it["b_max"]) - float(it["b_min"]))
    fixed = T.Compose([
        LoadScand(),
        T.Orientationd(keys="image", axcodes=card.orientation, labels=(("L", "R"), ("P", "A"), ("I", "S"))),
        T.Spacingd(keys="image", pixdim=card.spacing, mode=card.interpolation),
        T.ScaleIntensityRanged(keys="image", a_min=it["a_min"], a_max=it["a_max"], b_min=it["b_min"], b_max=it["b_max"],
                               clip=bool(it.get("clip", True))),
        T.CropForegroundd(keys="image", source_key="image", select_fn=lambda a: a > threshold, allow_smaller=True),
        T.SpatialPadd(keys="image", spatial_size=[crop] * 3),
    ])
    rand = T.RandSpatialCropd(keys="image", roi_size=[crop] * 3, random_size=False)
    return fixed, rand


# --------------------------------------------------------------------------------------
# the loop
# --------------------------------------------------------------------------------------
def build_parser(parser_class: type = argparse.ArgumentParser) -> argparse.ArgumentParser:
    p = parser_class(prog="swinunetr-segment pretrain",
                     description="Self-supervised pretraining of SwinUNETR's Swin encoder on unlabeled scans "
                                 "(rotation, contrastive and inpainting tasks; Tang et al., CVPR 2022).")
    p.add_argument("--data", required=True, help="Decathlon datalist JSON (its 'training' images) or a folder of scans")
    p.add_argument("--card", required=True, help="model card (built-in name or JSON): preprocessing and network args")
    p.add_argument("--out", required=True, help="output folder (resumes from its last.pt); encoder.pt is the result")
    p.add_argument("--crop", type=int, default=96, help="sub-volume size, a multiple of 32 (default 96)")
    p.add_argument("--batch-size", type=int, default=4, help="sub-volumes per step, at least 2 for the contrastive loss (default 4)")
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--steps-per-epoch", type=int, default=0, help="steps per epoch (default: scans / batch size, at least 1)")
    p.add_argument("--lr", type=float, default=4e-4)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--warmup-steps", type=int, default=0, help="linear learning-rate warm-up steps")
    p.add_argument("--schedule", choices=("cosine", "constant"), default="cosine", help="learning rate after warm-up")
    p.add_argument("--max-grad-norm", type=float, default=0.0, help="clip gradients to this norm (0: no clipping)")
    p.add_argument("--loss-weights", type=float, nargs=3, default=(1.0, 1.0, 1.0), metavar=("ROT", "CONTRAST", "RECON"),
                   help="weights of the rotation, contrastive and reconstruction losses (default 1 1 1)")
    p.add_argument("--temperature", type=float, default=0.5, help="InfoNCE temperature (default 0.5)")
    p.add_argument("--recon-region", choices=("volume", "cutout"), default="volume",
                   help="L1 over the whole volume (the paper) or over the cut-out regions only")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--no-amp", action="store_true", help="no bfloat16 autocast on CUDA")
    p.add_argument("--max-minutes", type=float, default=0, help="stop cleanly (resumable) after this many minutes")
    return p


def _check_args(args: argparse.Namespace) -> None:
    if args.crop < 32 or args.crop % 32:
        raise UserError(f"--crop {args.crop} must be a multiple of 32 (the encoder halves the size five times)")
    if args.batch_size < 1:
        raise UserError("--batch-size must be at least 1")
    if args.batch_size < 2 and args.loss_weights[1] > 0:
        raise UserError("--batch-size 1 leaves the contrastive loss no other sub-volume to contrast with; "
                        "use --batch-size 2 or more, or --loss-weights R 0 C")
    if any(w < 0 for w in args.loss_weights) or not any(w > 0 for w in args.loss_weights):
        raise UserError("--loss-weights must be non-negative and not all 0")
    if args.temperature <= 0:
        raise UserError("--temperature must be positive")
    if args.epochs < 1 or args.steps_per_epoch < 0 or args.lr <= 0:
        raise UserError("--epochs must be at least 1, --steps-per-epoch at least 0 and --lr positive")


def _lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    span = max(total - warmup, 1)
    return 0.5 * (1.0 + math.cos(math.pi * min(step - warmup, span) / span))


def _atomic_torch_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.part")
    torch.save(obj, str(tmp))
    os.replace(tmp, path)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.part")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def pretrain(args: argparse.Namespace, log: Callable[[str], Any] = print) -> dict[str, Any]:
    """Run (or resume) a pretraining as ``args`` (from :func:`build_parser`) say.

    Returns:
        {"epochs": epochs done, "history": the log entries, "stopped_early": bool,
        "encoder": path of encoder.pt}.
    """
    from monai.data import CacheDataset
    from monai.utils import set_determinism

    from SwinUNETRSegmentLib.models.cards import load_card
    from SwinUNETRSegmentLib.training.supervised import Distributed, _quiet

    t_start = time.monotonic()
    _check_args(args)
    card = load_card(args.card)
    plane = axial_plane(card.orientation)
    images = list_images(args.data)
    out = Path(args.out)
    ddp = Distributed(args.device)  # torchrun: DistributedDataParallel, one shard of scans per rank
    device = ddp.device
    if ddp.main:
        out.mkdir(parents=True, exist_ok=True)
    else:
        log = _quiet  # one log, from rank 0
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // (ddp.world if device.type == "cpu" else 1)))
    amp = device.type == "cuda" and not args.no_amp and torch.cuda.is_bf16_supported()

    set_determinism(seed=args.seed)
    try:
        model = PretrainNetwork(card.network_args)
    except (TypeError, ValueError) as exc:
        raise UserError(f"model card {card.source}: its network args do not make a Swin encoder ({exc}); fix 'network.args'") from None
    model = model.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    loss_fn = PretrainLoss(args.loss_weights, args.temperature, args.recon_region)
    config = {
        "card": card.name,
        "network_args": dict(card.network_args),
        "crop": args.crop,
        "batch_size": args.batch_size,
        "loss_weights": list(args.loss_weights),
        "temperature": args.temperature,
        "recon_region": args.recon_region,
        "seed": args.seed,
    }
    state: dict[str, Any] = {"epoch": 0, "step": 0, "history": []}

    last = out / "last.pt"
    if last.exists():
        try:
            ckpt = torch.load(str(last), map_location="cpu", weights_only=True)
            model.load_state_dict(ckpt["model"])
            opt.load_state_dict(ckpt["optimizer"])
        except (RuntimeError, KeyError, ValueError) as exc:
            raise UserError(f"{last} is not a pretraining checkpoint of this card's network ({' '.join(str(exc).split())[:160]}); "
                            "use another --out or the card it was made with") from None
        state.update({k: ckpt[k] for k in ("epoch", "step", "history")})
        log(f"resuming from {last} at epoch {state['epoch']}")
    if ddp.main:
        _atomic_write_text(out / "pretrain.json", json.dumps({
        **config,
        "command": "swinunetr-segment pretrain " + " ".join(shlex.quote(a) for a in getattr(args, "argv", []) or []),
        "images": [Path(i).name for i in images],
        "processes": ddp.world,
    }, indent=2) + "\n")

    fixed, rand = transforms(card, args.crop)
    shard = ddp.shard(len(images))
    log(f"caching {len(images)} scans in model space" + (f" ({ddp.world} processes, {len(shard)} scans each)" if ddp.enabled else ""))
    dataset = CacheDataset([{"image": images[i]} for i in shard], fixed, cache_rate=1.0, num_workers=0, progress=False)
    steps = args.steps_per_epoch or max(1, len(images) // (args.batch_size * ddp.world))
    net = ddp.wrap(model)
    total_steps = steps * args.epochs

    model.train()
    stopped_early = False
    while state["epoch"] < args.epochs:
        epoch = state["epoch"] + 1
        seed = args.seed + epoch + 1000 * ddp.rank
        set_determinism(seed=seed)
        rng = np.random.default_rng(seed)
        gen = torch.Generator().manual_seed(seed)
        rand.set_random_state(seed=seed)  # crops depend on the epoch only: a resumed run repeats them
        t0 = time.monotonic()
        sums = dict.fromkeys(("loss", *LOSS_NAMES), 0.0)
        for _ in range(steps):
            batch = torch.stack([rand(dataset[int(rng.integers(len(dataset)))])["image"].as_tensor() for _ in range(args.batch_size)])
            views = make_views(batch.to(device), plane, gen)
            lr = args.lr * _lr_factor(state["step"], total_steps, args.warmup_steps, args.schedule)
            for group in opt.param_groups:
                group["lr"] = lr
            loss, parts = train_step(net, opt, loss_fn, views, amp=amp, max_grad_norm=args.max_grad_norm)
            if not math.isfinite(loss):
                raise UserError(f"the loss became {loss} at epoch {epoch}; lower --lr or set --max-grad-norm 1")
            state["step"] += 1
            sums["loss"] += loss
            for n in LOSS_NAMES:
                sums[n] += parts[n]
        ranks = ddp.gather({n: v / steps for n, v in sums.items()})
        entry: dict[str, Any] = {"epoch": epoch, **{n: float(np.mean([r[n] for r in ranks])) for n in sums}, "lr": lr,
                                 "seconds": round(time.monotonic() - t0, 2)}
        if ddp.enabled:
            entry["ranks"] = ranks
        state["epoch"] = epoch
        state["history"].append(entry)
        if ddp.main:
            _atomic_torch_save({"model": model.state_dict(), "optimizer": opt.state_dict(), "config": config, **state}, last)
            _atomic_torch_save(model.encoder_state_dict(), out / "encoder.pt")
            with open(out / "log.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(entry) + "\n")
        log(f"epoch {epoch}/{args.epochs} loss {entry['loss']:.4f} (rotation {entry['rotation']:.4f}, "
            f"contrastive {entry['contrastive']:.4f}, reconstruction {entry['reconstruction']:.4f})")
        if ddp.broadcast(bool(args.max_minutes and (time.monotonic() - t_start) / 60 > args.max_minutes)):
            log(f"stopping after {args.max_minutes} minutes; rerun the same command to resume")
            stopped_early = True
            break
        ddp.barrier()
    ddp.close()
    return {"epochs": state["epoch"], "history": state["history"], "stopped_early": stopped_early, "encoder": str(out / "encoder.pt")}


def main(argv: Sequence[str], parser_class: type = argparse.ArgumentParser) -> int:
    """``swinunetr-segment pretrain ...``: parse ``argv`` and pretrain; prints a JSON summary."""
    args = build_parser(parser_class).parse_args(list(argv))
    args.argv = list(argv)
    result = pretrain(args, log=lambda s: print(s, flush=True))
    final = result["history"][-1] if result["history"] else {}
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    print(json.dumps({"epochs": result["epochs"], "loss": round(final.get("loss", float("nan")), 4), "encoder": result["encoder"]}))
    return 0
