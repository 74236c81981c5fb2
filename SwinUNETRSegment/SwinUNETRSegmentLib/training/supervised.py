"""Supervised training and fine-tuning: ``swinunetr-segment train``.

Data is a MONAI Decathlon datalist (JSON with "training" and optional "validation"
lists of {"image": ..., "label": ...}, paths relative to the JSON file). Images are
anything :func:`~.read_volume` reads (DICOM folders included). Labels are label
maps (NIfTI, NRRD...) or Slicer ``.seg.nrrd`` files, whose segments are matched to the
card's labels by SNOMED code (type and modifier) or, failing that, by name, so that
segmentations clinicians corrected in Slicer become training data. A label grid that
differs from its image's (Slicer crops ``.seg.nrrd`` to the segments' extent) is
resampled onto the image's voxels.

Training uses MONAI transforms (the card's orientation, spacing and intensity window;
random crops balanced over the label classes, flips, 90-degree rotations, intensity
shifts), Dice + cross-entropy, AdamW, validation Dice per label with the card's sliding
window. Written to ``--out``: ``last.pt`` (resumable: model, optimizer, epoch, history),
``best.pt`` (the weights with the best validation Dice), ``card.json`` (the card of the
trained model, with the training command, seed, data checksums and per-label Dice), and
``log.jsonl`` (one line per epoch). Rerunning the same command resumes from ``last.pt``.

Many GPUs or machines: ``torchrun --nproc_per_node=N --no-python swinunetr-segment train ...``
runs DistributedDataParallel (nccl on CUDA, gloo on the CPU); each rank trains on its own
shard of the scans, rank 0 alone validates and writes, and the files are the same as a
single-process run's.
"""

from __future__ import annotations
from SwinUNETRSegmentLib.fileio.read import has_suffix, read_volume

import argparse
import hashlib
import json
import math
import os
import shlex
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from SwinUNETRSegmentLib.models.cards import LabelInfo, ModelCard, load_card
from SwinUNETRSegmentLib.errors import UserError
from SwinUNETRSegmentLib.geometry import Volume


# --------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------
def load_datalist(path: str | Path) -> tuple[list[dict], list[dict]]:
    """(training items, validation items) with absolute paths."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"datalist not found: {path}; give a MONAI Decathlon JSON file")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"datalist {p} is not readable JSON ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("training"), list) or not data["training"]:
        raise UserError(f"datalist {p} needs a non-empty 'training' list of {{\"image\": ..., \"label\": ...}}")

    def items(key: str) -> list[dict]:
        out = []
        for n, item in enumerate(data.get(key) or []):
            if not isinstance(item, dict) or "image" not in item or "label" not in item:
                raise UserError(f"datalist {p}: {key}[{n}] needs 'image' and 'label'")
            resolved = {}
            for k in ("image", "label"):
                q = Path(item[k])
                q = q if q.is_absolute() else p.parent / q
                if not q.exists():
                    raise UserError(f"datalist {p}: {key}[{n}] {k} not found: {q}")
                resolved[k] = str(q)
            out.append(resolved)
        return out

    return items("training"), items("validation")


def _label_key(lab_type: Sequence[str], modifier: Optional[Sequence[str]]) -> tuple:
    return (str(lab_type[0]).upper(), str(lab_type[1]), None if not modifier or not modifier[1] else str(modifier[1]))


def match_segments(segments: Sequence[dict], labels: Sequence[LabelInfo]) -> dict[str, int]:
    """Segment id -> card label value, by SNOMED type (+ modifier) code, else by name.

    Segments that match no label (e.g. a tumour a clinician added) are left out.
    """
    by_code = {_label_key(lab.type.as_list(), lab.type_modifier.as_list() if lab.type_modifier else None): lab.value for lab in labels}
    by_name = {lab.name.strip().lower(): lab.value for lab in labels}
    out: dict[str, int] = {}
    for seg in segments:
        term = seg.get("terminology") or {}
        value = None
        if term.get("type") and len(term["type"]) >= 2 and term["type"][1]:
            value = by_code.get(_label_key(term["type"], term.get("typeModifier")))
        if value is None:
            value = by_name.get(str(seg.get("name", "")).strip().lower())
        if value is not None:
            out[seg["id"]] = value
    return out


def read_label(path: str | Path, card: ModelCard, grid: Volume, label_map: Optional[dict[int, int]] = None) -> np.ndarray:
    """The label map of ``path`` as card label values (uint8) on ``grid``'s voxels."""
    from SwinUNETRSegmentLib.inference.engine import resample_labels

    p = Path(path)
    if has_suffix(p, (".seg.nrrd",)):
        from SwinUNETRSegmentLib.fileio import segnrrd as slicerio

        try:
            seg = slicerio.read_segmentation(str(p))
        except Exception as exc:
            raise UserError(f"cannot read segmentation {p.name} ({' '.join(str(exc).split())[:160]})") from None
        matched = match_segments(seg["segments"], card.labels)
        if not matched:
            names = ", ".join(s.get("name", "?") for s in seg["segments"])
            raise UserError(f"no segment of {p.name} ({names}) matches a label of card '{card.name}' by SNOMED code or name")
        voxels = np.asarray(seg["voxels"])
        arr = np.zeros(voxels.shape[-3:], np.uint8)
        for s in seg["segments"]:
            if s["id"] in matched:
                arr[slicerio.segment_mask(seg, s)] = matched[s["id"]]
        src = Volume.from_lps(arr, np.asarray(seg["ijkToLPS"], dtype=float))
    else:
        vol, _ = read_volume(p)
        arr = np.asarray(vol.array)
        if label_map is not None:
            lut = np.zeros(int(max(arr.max(initial=0), max(label_map, default=0))) + 1, np.uint8)
            for k, v in label_map.items():
                lut[int(k)] = int(v)
            arr = lut[np.clip(arr, 0, len(lut) - 1).astype(np.int64)]
        valid = {lab.value for lab in card.labels} | {0}
        bad = sorted(set(np.unique(arr).tolist()) - valid)
        if bad:
            raise UserError(f"label map {p.name} has values {bad[:8]} that are not labels of card '{card.name}'; "
                            "give --label-map to translate them")
        src = Volume(arr.astype(np.uint8), vol.ijk_to_ras)
    if src.same_grid(grid):
        return src.array.astype(np.uint8)
    return resample_labels(src, grid, outside="zeros")


def _sha256(path: str | Path) -> str:
    p = Path(path)
    h = hashlib.sha256()
    files = sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else [p]
    for q in files:
        with open(q, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


class LoadPaird:
    """MONAI-style dictionary transform: paths -> MetaTensors (channel first) on one grid."""

    def __init__(self, card: ModelCard, label_map: Optional[dict[int, int]] = None):
        self.card, self.label_map = card, label_map

    def __call__(self, item: dict) -> dict:
        import torch
        from monai.data import MetaTensor

        from SwinUNETRSegmentLib.fileio.read import read_volume

        vol, _ = read_volume(item["image"])
        lab = read_label(item["label"], self.card, vol, self.label_map)
        affine = torch.as_tensor(vol.ijk_to_ras, dtype=torch.float64)
        return {
            "image": MetaTensor(torch.from_numpy(np.ascontiguousarray(vol.array, dtype=np.float32))[None], affine=affine),
            "label": MetaTensor(torch.from_numpy(np.ascontiguousarray(lab))[None], affine=affine.clone()),
        }


def transforms(card: ModelCard, crop: Sequence[int], num_samples: int, label_map=None, train: bool = True,
               flip_prob: float = 0.2, rot90_prob: float = 0.2, background_weight: float = 1.0):
    """(deterministic part, random part): MONAI Compose objects.

    Flips and 90-degree turns are MONAI's BTCV recipe; they are switchable because a flip
    across the left-right axis turns a left kidney into a right one, which a model that
    names left and right organs must then unlearn (the built-in demo model trains with 0).
    Crops are centred on each label in turn; ``background_weight`` makes crops centred on
    background that many times as frequent as those of each organ (so that the parts of a
    scan far from any organ, such as the pelvis for abdominal labels, are seen too)."""
    from monai import transforms as T

    it = card.intensity
    keys = ["image", "label"]
    fixed = [
        LoadPaird(card, label_map),
        T.Orientationd(keys=keys, axcodes=card.orientation, labels=(("L", "R"), ("P", "A"), ("I", "S"))),
        T.Spacingd(keys=keys, pixdim=card.spacing, mode=(card.interpolation, "nearest")),
        T.ScaleIntensityRanged(keys="image", a_min=it["a_min"], a_max=it["a_max"], b_min=it["b_min"], b_max=it["b_max"],
                               clip=bool(it.get("clip", True))),
        T.EnsureTyped(keys="label", dtype=__import__("torch").uint8),
    ]
    if not train:
        return T.Compose(fixed), None
    fixed.append(T.SpatialPadd(keys=keys, spatial_size=list(crop)))
    rand = T.Compose([
        T.RandCropByLabelClassesd(keys=keys, label_key="label", spatial_size=list(crop), num_classes=card.num_classes,
                                  ratios=[float(background_weight)] + [1.0] * (card.num_classes - 1),
                                  num_samples=num_samples, image_key="image", image_threshold=-1e9, warn=False),
        T.RandFlipd(keys=keys, prob=flip_prob, spatial_axis=0),
        T.RandFlipd(keys=keys, prob=flip_prob, spatial_axis=1),
        T.RandFlipd(keys=keys, prob=flip_prob, spatial_axis=2),
        T.RandRotate90d(keys=keys, prob=rot90_prob, max_k=3),
        T.RandShiftIntensityd(keys="image", offsets=0.1, prob=0.5),
        T.RandScaleIntensityd(keys="image", factors=0.1, prob=0.5),
    ])
    return T.Compose(fixed), rand


# --------------------------------------------------------------------------------------
# the loop
# --------------------------------------------------------------------------------------
def dice_per_label(pred, truth, labels: Sequence[LabelInfo]) -> dict[str, float]:
    """Dice of each label present in ``truth`` or ``pred`` (label maps of equal shape)."""
    out = {}
    for lab in labels:
        p, t = pred == lab.value, truth == lab.value
        denom = int(p.sum()) + int(t.sum())
        if int(t.sum()) == 0:
            continue  # not in this scan: no Dice to report
        out[lab.name] = 2.0 * int((p & t).sum()) / denom
    return out


class Distributed:
    """PyTorch's own distributed training when launched by ``torchrun`` (WORLD_SIZE > 1).

    nccl on CUDA (one GPU per process, LOCAL_RANK), gloo on the CPU. Rank 0 alone writes
    checkpoints, logs and cards; every rank trains on its own shard of the data.
    """

    def __init__(self, device_name: str = "auto"):
        import torch
        import torch.distributed as dist

        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.enabled = self.world > 1
        from SwinUNETRSegmentLib.inference.engine import resolve_device

        device = resolve_device(device_name)
        if self.enabled and device.type == "cuda":
            device = torch.device(f"cuda:{self.local_rank}")
            torch.cuda.set_device(device)
        self.device = device
        if self.enabled and not dist.is_initialized():
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def wrap(self, net):
        if not self.enabled:
            return net
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(net, device_ids=ids)

    def shard(self, n: int) -> list[int]:
        """This rank's item indices, as torch's DistributedSampler deals them (no shuffle)."""
        if not self.enabled:
            return list(range(n))
        from torch.utils.data.distributed import DistributedSampler

        return list(DistributedSampler(range(n), num_replicas=self.world, rank=self.rank, shuffle=False))

    def gather(self, obj):
        if not self.enabled:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj):
        if not self.enabled:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            dist.barrier()

    def close(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


def build_parser(parser_class: type = argparse.ArgumentParser) -> argparse.ArgumentParser:
    p = parser_class(prog="swinunetr-segment train", description="Train or fine-tune a SwinUNETR under a model card.")
    p.add_argument("--data", required=True, help="MONAI Decathlon datalist JSON ('training', optional 'validation')")
    p.add_argument("--card", required=True, help="model card: built-in name or card JSON file")
    p.add_argument("--out", required=True, help="output folder (resumes from its last.pt)")
    p.add_argument("--init", help="weights to start from (fine-tuning); every key must fit the card")
    p.add_argument("--init-encoder", help="encoder weights from `swinunetr-segment pretrain` (encoder.pt); the decoder starts fresh")
    p.add_argument("--name", help="name of the trained model's card (default: the card's name + '-trained')")
    p.add_argument("--label-map", help="JSON {source value: card value} for label maps with other values")
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--steps-per-epoch", type=int, default=0, help="steps per epoch (default: one per training scan)")
    p.add_argument("--crop", type=int, nargs=3, default=None, help="crop size (default: the card's window)")
    p.add_argument("--num-samples", type=int, default=2, help="crops per scan and step (the batch size)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--flip-prob", type=float, default=0.2,
                   help="chance of a flip along each axis (0 keeps left and right organs apart)")
    p.add_argument("--rot90-prob", type=float, default=0.2, help="chance of a random 90-degree turn")
    p.add_argument("--background-weight", type=float, default=1.0,
                   help="crops centred on background per crop centred on each label (default 1)")
    p.add_argument("--schedule", choices=("constant", "cosine"), default="constant",
                   help="learning rate over the epochs: constant, or cosine decay from --lr to 0 at --epochs")
    p.add_argument("--weight-decay", type=float, default=1e-5)
    p.add_argument("--val-every", type=int, default=1, help="validate every N epochs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--fp16-weights", action="store_true", help="store best.pt in half precision (half the size)")
    p.add_argument("--max-minutes", type=float, default=0, help="stop cleanly (resumable) after this many minutes")
    return p


def train(args: argparse.Namespace, log=print) -> dict[str, Any]:
    import torch
    from monai.data import CacheDataset
    from monai.inferers import sliding_window_inference
    from monai.losses import DiceCELoss
    from monai.utils import set_determinism

    from SwinUNETRSegmentLib.models.checkpoint import build_network, extract_state_dict, load_weights, read_state_dict

    t_start = time.monotonic()
    card = load_card(args.card)
    train_items, val_items = load_datalist(args.data)
    if not val_items:
        val_items = train_items
    label_map = None
    if args.label_map:
        try:
            label_map = {int(k): int(v) for k, v in json.loads(Path(args.label_map).read_text()).items()}
        except (OSError, ValueError, AttributeError) as exc:
            raise UserError(f"--label-map {args.label_map} must be a JSON object of integer values ({exc})") from None
    out = Path(args.out)
    crop = tuple(args.crop) if args.crop else card.roi_size
    if any(c < 64 or c % 32 for c in crop):
        raise UserError(f"--crop {' '.join(map(str, crop))}: each size must be a multiple of 32 and at least 64 "
                        "(SwinUNETR's deepest features need 2 voxels per axis to train)")
    ddp = Distributed(args.device)
    device = ddp.device
    if ddp.main:
        out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // (ddp.world if device.type == "cpu" else 1)))
    if not ddp.main:
        log = _quiet  # one log, from rank 0

    set_determinism(seed=args.seed)
    net = build_network(card)
    if args.init:
        load_weights(net, read_state_dict(args.init), card, Path(args.init).name)
    if getattr(args, "init_encoder", None):
        from SwinUNETRSegmentLib.training.ssl.pretrain import load_encoder_weights

        n = load_encoder_weights(net, args.init_encoder)
        log(f"loaded {n} encoder tensors from {args.init_encoder}; the decoder and head start fresh")
    net = net.to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    model = net  # what is saved: the network itself, never the DDP wrapper
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    state = {"epoch": 0, "best_dice": -1.0, "history": []}

    last = out / "last.pt"
    if last.exists():
        ckpt = torch.load(str(last), map_location="cpu", weights_only=True)
        load_weights(net, extract_state_dict(ckpt["model"]), card, last.name)
        opt.load_state_dict(ckpt["optimizer"])
        state.update({k: ckpt[k] for k in ("epoch", "best_dice", "history")})
        log(f"resuming from {last} at epoch {state['epoch']}")

    _check_augmentation(args)
    fixed, rand = transforms(card, crop, args.num_samples, label_map,
                             flip_prob=getattr(args, "flip_prob", 0.2), rot90_prob=getattr(args, "rot90_prob", 0.2),
                             background_weight=getattr(args, "background_weight", 1.0))
    val_fixed, _ = transforms(card, crop, args.num_samples, label_map, train=False)
    shard = ddp.shard(len(train_items))  # this rank's scans: ranks see different data
    log(f"caching {len(train_items)} training and {len(val_items)} validation scans in model space"
        + (f" ({ddp.world} processes, {len(shard)} scans each)" if ddp.enabled else ""))
    train_ds = CacheDataset([train_items[i] for i in shard], fixed, cache_rate=1.0, num_workers=0, progress=False)
    val_ds = CacheDataset(val_items, val_fixed, cache_rate=1.0, num_workers=0, progress=False) if ddp.main else []
    steps = args.steps_per_epoch or max(1, len(shard))
    net = ddp.wrap(net)

    def evaluate() -> dict[str, float]:
        net.eval()
        net_eval = model
        scores: dict[str, list[float]] = {}
        with torch.inference_mode():
            for item in val_ds:
                x = item["image"].as_tensor()[None].to(device)
                logits = sliding_window_inference(x, card.roi_size, 1, net_eval, overlap=card.overlap)
                pred = logits.argmax(1)[0].cpu().numpy()
                for name, d in dice_per_label(pred, item["label"].as_tensor()[0].numpy(), card.labels).items():
                    scores.setdefault(name, []).append(d)
        net.train()
        return {k: float(np.mean(v)) for k, v in scores.items()}

    net.train()
    stopped_early = False
    while state["epoch"] < args.epochs:
        epoch = state["epoch"] + 1
        set_determinism(seed=args.seed + epoch + 1000 * ddp.rank)
        rng = np.random.default_rng((args.seed, epoch, ddp.rank))
        t0 = time.monotonic()
        lr = _learning_rate(args, epoch)
        for group in opt.param_groups:  # from the epoch alone, so a resumed run continues the same curve
            group["lr"] = lr
        losses, seen = [], []
        for _ in range(steps):
            index = int(rng.integers(len(train_ds)))
            seen.append(shard[index])
            crops = rand(train_ds[index])
            x = torch.stack([c["image"].as_tensor() for c in crops]).to(device)
            y = torch.stack([c["label"].as_tensor() for c in crops]).to(device).long()
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(net(x), y)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        gathered = ddp.gather((float(np.mean(losses)), sorted(set(seen))))
        entry: dict[str, Any] = {"epoch": epoch, "loss": float(np.mean([g[0] for g in gathered])), "lr": lr,
                                 "seconds": round(time.monotonic() - t0, 2)}
        if ddp.enabled:
            entry["ranks"] = [{"rank": r, "loss": g[0], "scans": g[1]} for r, g in enumerate(gathered)]
        if ddp.main and (epoch % args.val_every == 0 or epoch == args.epochs):
            dice = evaluate()
            mean = float(np.mean(list(dice.values()))) if dice else 0.0
            entry.update({"dice": dice, "mean_dice": mean})
            if mean > state["best_dice"]:
                state["best_dice"] = mean
                _save_best(model, out, card, args, dice, entry, train_items, val_items)
        state["epoch"] = epoch
        state["history"].append(entry)
        if ddp.main:
            _atomic_torch_save({"model": model.state_dict(), "optimizer": opt.state_dict(), **state}, last)
            with open(out / "log.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(entry) + "\n")
        log(f"epoch {epoch}/{args.epochs} loss {entry['loss']:.4f}" + (f" mean Dice {entry['mean_dice']:.3f}" if "mean_dice" in entry else ""))
        stop = bool(args.max_minutes and (time.monotonic() - t_start) / 60 > args.max_minutes)
        if ddp.broadcast(stop):  # every rank stops at the same epoch
            log(f"stopping after {args.max_minutes} minutes; rerun the same command to resume")
            stopped_early = True
            break
        ddp.barrier()
    ddp.close()
    return {"epochs": state["epoch"], "best_dice": state["best_dice"], "history": state["history"], "stopped_early": stopped_early}


def _check_augmentation(args) -> None:
    for name in ("flip_prob", "rot90_prob"):
        if not 0.0 <= getattr(args, name, 0.0) <= 1.0:
            raise UserError(f"--{name.replace('_', '-')} {getattr(args, name)}: a probability is between 0 and 1")
    if not getattr(args, "background_weight", 1.0) > 0:
        raise UserError(f"--background-weight {args.background_weight}: must be positive")


def _learning_rate(args, epoch: int) -> float:
    if getattr(args, "schedule", "constant") == "cosine":
        return 0.5 * args.lr * (1.0 + math.cos(math.pi * (epoch - 1) / max(1, args.epochs)))
    return args.lr


def _quiet(*_args, **_kwargs) -> None:
    return None


def _atomic_torch_save(obj, path: Path) -> None:
    import torch

    tmp = path.with_name(f".{path.name}.part")
    torch.save(obj, str(tmp))
    os.replace(tmp, path)


def _save_best(net, out: Path, card: ModelCard, args, dice, entry, train_items, val_items) -> None:
    sd = {k: (v.half() if args.fp16_weights and v.is_floating_point() else v).cpu() for k, v in net.state_dict().items()}
    _atomic_torch_save(sd, out / "best.pt")
    from SwinUNETRSegmentLib.models.checkpoint import sha256_file

    data = card.to_json()
    data["name"] = args.name or f"{card.name}-trained"
    data["checkpoint"] = {"file": "best.pt", "sha256": sha256_file(out / "best.pt")}
    data["training"] = {
        "command": "swinunetr-segment train " + " ".join(shlex.quote(a) for a in getattr(args, "argv", []) or []),
        "seed": args.seed,
        "epoch": entry["epoch"],
        "init": args.init,
        "init_encoder": getattr(args, "init_encoder", None),
        "data": [{"image": Path(i["image"]).name, "label": Path(i["label"]).name,
                  "image_sha256": _sha256(i["image"]), "label_sha256": _sha256(i["label"])} for i in train_items],
        "validation": [Path(i["image"]).name for i in val_items],
        "dice": {k: round(v, 4) for k, v in dice.items()},
        "mean_dice": round(entry["mean_dice"], 4),
    }
    tmp = out / ".card.json.part"
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, out / "card.json")


def publish_builtin(run_dir: str | Path, name: str = "demo") -> tuple[Path, Path]:
    """Make a training run's best checkpoint a built-in model: ``cards/<name>.json`` and
    ``weights/<name>.pt`` in the package (the card records the SHA256 checked at load)."""
    from SwinUNETRSegmentLib.models.cards import BUILTIN_CARD_DIR
    from SwinUNETRSegmentLib.models.catalog import BUNDLED_WEIGHTS_DIR, file_digest

    run = Path(run_dir)
    data = json.loads((run / "card.json").read_text(encoding="utf-8"))
    BUNDLED_WEIGHTS_DIR.mkdir(exist_ok=True)
    weights = BUNDLED_WEIGHTS_DIR / f"{name}.pt"
    weights.write_bytes((run / "best.pt").read_bytes())
    data["name"] = name
    data["checkpoint"] = {"bundled": weights.name, "sha256": file_digest(weights, "sha256")}
    card = BUILTIN_CARD_DIR / f"{name}.json"
    card.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    return card, weights


def main(argv: Sequence[str], parser_class: type = argparse.ArgumentParser) -> int:
    args = build_parser(parser_class).parse_args(list(argv))
    args.argv = list(argv)
    result = train(args, log=lambda s: print(s, flush=True))
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({"epochs": result["epochs"], "best_mean_dice": round(result["best_dice"], 4)}))
    return 0
