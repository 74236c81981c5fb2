"""Supervised training and fine-tuning: what ``swinunetr-segment train`` runs.

Data is a MONAI Decathlon datalist (JSON with "training" and optional "validation"
lists of {"image": ..., "label": ...}, paths relative to the JSON file). Images are
anything :func:`~SwinUNETRSegmentLib.fileio.read.read_volume` reads (DICOM folders
included); labels are what :mod:`~SwinUNETRSegmentLib.training.labels` reads (label maps,
Slicer ``.seg.nrrd``).

Training uses MONAI transforms (the card's model space, the recipe of
:mod:`SwinUNETRSegmentLib.inference.preprocess`; random crops balanced over the label
classes, flips, 90-degree rotations, intensity shifts), Dice + cross-entropy, AdamW, and
validation Dice per label (:mod:`~SwinUNETRSegmentLib.training.metrics`) with the card's
sliding window. Written to ``--out``: ``last.pt`` (resumable: model, optimizer, epoch,
history and the settings of the run), ``best.pt`` (the weights with the best validation
Dice), ``card.json`` (the card of the trained model, with the training command, seed, data
checksums and per-label Dice), and ``log.jsonl`` (one line per epoch). Rerunning the same
command resumes from ``last.pt`` and gives the losses an uninterrupted run would have; a
rerun with other settings is refused (:func:`~SwinUNETRSegmentLib.training.common.check_settings`).

Many GPUs or machines: ``torchrun --nproc_per_node=N --no-python swinunetr-segment train ...``
runs DistributedDataParallel (nccl on CUDA, gloo on the CPU); each rank trains on its own
shard of the scans with its own augmentation stream, rank 0 alone validates and writes, and
the files are the same as a single-process run's.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

from SwinUNETRSegmentLib.errors import UserError
from SwinUNETRSegmentLib.fileio.atomic import atomic_torch_save, atomic_write_bytes, atomic_write_text, file_digest
from SwinUNETRSegmentLib.models.cards import ModelCard, load_card
from SwinUNETRSegmentLib.models.networks import build_network
from SwinUNETRSegmentLib.training.common import (
    Distributed,
    check_settings,
    command_line,
    content_digest,
    epoch_learning_rate,
    epoch_seed,
    load_datalist,
    load_last,
    quiet,
    save_epoch,
    seed_epoch,
)
from SwinUNETRSegmentLib.training.labels import load_label_map, read_label
from SwinUNETRSegmentLib.training.metrics import average_scores, dice_per_label, mean_dice

__all__ = ["LoadPaird", "transforms", "check_augmentation", "run_settings", "train", "publish_builtin"]


class LoadPaird:
    """MONAI-style dictionary transform: {"image": path, "label": path} -> MetaTensors
    (1, I, J, K) on the image's grid: the image as float32, the labels as the card's uint8 values."""

    def __init__(self, card: ModelCard, label_map: Optional[dict[int, int]] = None):
        self.card, self.label_map = card, label_map

    def __call__(self, item: dict) -> dict:
        from SwinUNETRSegmentLib.fileio.read import read_volume
        from SwinUNETRSegmentLib.inference.preprocess import to_metatensor

        vol, _ = read_volume(item["image"])
        lab = read_label(item["label"], self.card, vol, self.label_map)
        return {"image": to_metatensor(vol, np.float32), "label": to_metatensor(vol.with_array(lab), np.uint8)}


def transforms(card: ModelCard, crop: Sequence[int], num_samples: int, label_map=None, train: bool = True,
               flip_prob: float = 0.2, rot90_prob: float = 0.2, background_weight: float = 1.0):
    """(deterministic part, random part): MONAI Compose objects (the random part None for
    validation, ``train=False``).

    The deterministic part loads a pair and puts it in the card's model space
    (:func:`~SwinUNETRSegmentLib.inference.preprocess.model_space_transforms`: labels by
    nearest neighbour), padded to ``crop`` for training. The random part makes
    ``num_samples`` crops of ``crop`` voxels, each a dict of (1, *crop) "image" and "label".

    Flips and 90-degree turns are MONAI's BTCV recipe; they are switchable because a flip
    across the left-right axis turns a left kidney into a right one, which a model that
    names left and right organs must then unlearn (the built-in demo model trains with 0).
    Crops are centred on each label in turn; ``background_weight`` makes crops centred on
    background that many times as frequent as those of each organ (so that the parts of a
    scan far from any organ, such as the pelvis for abdominal labels, are seen too)."""
    import torch
    from monai import transforms as T

    from SwinUNETRSegmentLib.inference.preprocess import model_space_transforms

    keys = ["image", "label"]
    fixed = [LoadPaird(card, label_map), *model_space_transforms(card, "image", ["label"]),
             T.EnsureTyped(keys="label", dtype=torch.uint8)]
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


def check_augmentation(args: argparse.Namespace) -> None:
    """Refuse probabilities outside [0, 1] and a background weight that is not positive."""
    for name in ("flip_prob", "rot90_prob"):
        if not 0.0 <= getattr(args, name, 0.0) <= 1.0:
            raise UserError(f"--{name.replace('_', '-')} {getattr(args, name)}: a probability is between 0 and 1")
    if not getattr(args, "background_weight", 1.0) > 0:
        raise UserError(f"--background-weight {args.background_weight}: must be positive")


def _resolved(path: Optional[str]) -> Optional[str]:
    return None if not path else str(Path(path).resolve())


def run_settings(args: argparse.Namespace, card: ModelCard, crop: Sequence[int], train_items: list[dict],
                 val_items: list[dict], label_map: Optional[dict[int, int]]) -> dict[str, Any]:
    """The settings that make the run what it is, as ``last.pt`` records them: a resumed run
    must have the same (the card by content, files by resolved path)."""
    def resolved(items: list[dict]) -> list[dict]:
        return [{k: _resolved(v) for k, v in item.items()} for item in items]

    return {
        "card": content_digest(card.to_json()),
        "data": {"training": resolved(train_items), "validation": resolved(val_items)},
        "label_map": sorted(label_map.items()) if label_map is not None else None,
        "init": _resolved(args.init),
        "init_encoder": _resolved(getattr(args, "init_encoder", None)),
        "crop": list(crop),
        "num_samples": args.num_samples,
        "steps_per_epoch": args.steps_per_epoch,
        "lr": args.lr,
        "weight_decay": args.weight_decay,
        "schedule": getattr(args, "schedule", "constant"),
        "flip_prob": getattr(args, "flip_prob", 0.2),
        "rot90_prob": getattr(args, "rot90_prob", 0.2),
        "background_weight": getattr(args, "background_weight", 1.0),
        "seed": args.seed,
    }


def train(args: argparse.Namespace, log: Callable[[str], Any] = print) -> dict[str, Any]:
    """Run (or resume) a training as ``args`` (from :func:`SwinUNETRSegmentLib.cli.train.build_parser`) say.

    Returns:
        {"epochs": epochs done, "best_dice": the best mean validation Dice, "history": the
        log entries, "stopped_early": bool (``--max-minutes``)}.
    """
    import torch
    from monai.data import CacheDataset
    from monai.losses import DiceCELoss
    from monai.utils import set_determinism

    from SwinUNETRSegmentLib.models.checkpoint import extract_state_dict, load_weights, read_state_dict

    t_start = time.monotonic()
    card = load_card(args.card)
    train_items, val_items = load_datalist(args.data)
    label_map = load_label_map(args.label_map)
    out = Path(args.out)
    crop = tuple(args.crop) if args.crop else card.roi_size
    if any(c < 64 or c % 32 for c in crop):
        raise UserError(f"--crop {' '.join(map(str, crop))}: each size must be a multiple of 32 and at least 64 "
                        "(SwinUNETR's deepest features need 2 voxels per axis to train)")
    check_augmentation(args)
    epoch_seed(args.seed, 1)  # a seed that cannot seed is refused before any work
    settings = run_settings(args, card, crop, train_items, val_items, label_map)
    val_items = val_items or train_items
    ddp = Distributed(args.device)
    device = ddp.device
    if not ddp.main:
        log = quiet  # one log, from rank 0
    last = out / "last.pt"
    ckpt = load_last(last)
    if ckpt is not None:  # every rank checks: all stop together
        check_settings(ckpt.get("settings"), settings, last, content_keys=("card", "data", "label_map"), log=log)
    if ddp.main:
        out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // (ddp.world if device.type == "cpu" else 1)))

    set_determinism(seed=args.seed)
    net = build_network(card)
    if args.init:
        load_weights(net, read_state_dict(args.init), card, Path(args.init).name)
    if getattr(args, "init_encoder", None):
        from SwinUNETRSegmentLib.training.ssl.encoder import load_encoder_weights

        n = load_encoder_weights(net, args.init_encoder)
        log(f"loaded {n} encoder tensors from {args.init_encoder}; the decoder and head start fresh")
    net = net.to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    model = net  # what is saved: the network itself, never the DDP wrapper
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    state = {"epoch": 0, "best_dice": -1.0, "history": []}
    if ckpt is not None:
        load_weights(net, extract_state_dict(ckpt["model"]), card, last.name)
        opt.load_state_dict(ckpt["optimizer"])
        state.update({k: ckpt[k] for k in ("epoch", "best_dice", "history")})
        log(f"resuming from {last} at epoch {state['epoch']}")

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
        from monai.inferers import sliding_window_inference

        net.eval()
        scans = []
        with torch.inference_mode():
            for item in val_ds:
                x = item["image"].as_tensor()[None].to(device)
                logits = sliding_window_inference(x, card.roi_size, 1, model, overlap=card.overlap)
                pred = logits.argmax(1)[0].cpu().numpy()
                scans.append(dice_per_label(pred, item["label"].as_tensor()[0].numpy(), card.labels))
        net.train()
        return average_scores(scans)

    net.train()
    stopped_early = False
    try:
        while state["epoch"] < args.epochs:
            epoch = state["epoch"] + 1
            # Every random stream of the epoch from (seed, epoch, rank): a resumed run draws
            # what the uninterrupted run would have, and each rank its own crops.
            rng = np.random.default_rng(seed_epoch(args.seed, epoch, ddp.rank, [rand]))
            t0 = time.monotonic()
            lr = epoch_learning_rate(args.lr, epoch, args.epochs, getattr(args, "schedule", "constant"))
            for group in opt.param_groups:
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
                entry.update({"dice": dice, "mean_dice": mean_dice(dice)})
                if entry["mean_dice"] > state["best_dice"]:
                    state["best_dice"] = entry["mean_dice"]
                    _save_best(model, out, card, args, dice, entry, train_items, val_items)
            state["epoch"] = epoch
            state["history"].append(entry)
            if ddp.main:
                save_epoch(out, {"model": model.state_dict(), "optimizer": opt.state_dict(), "settings": settings,
                                 **state}, entry)
            log(f"epoch {epoch}/{args.epochs} loss {entry['loss']:.4f}"
                + (f" mean Dice {entry['mean_dice']:.3f}" if "mean_dice" in entry else ""))
            stop = bool(args.max_minutes and (time.monotonic() - t_start) / 60 > args.max_minutes)
            if ddp.broadcast(stop):  # every rank stops at the same epoch
                log(f"stopping after {args.max_minutes} minutes; rerun the same command to resume")
                stopped_early = True
                break
            ddp.barrier()
    finally:
        ddp.close()
    return {"epochs": state["epoch"], "best_dice": state["best_dice"], "history": state["history"],
            "stopped_early": stopped_early}


def _save_best(net, out: Path, card: ModelCard, args, dice, entry, train_items, val_items) -> None:
    """``best.pt`` (half precision with ``--fp16-weights``) and the trained model's ``card.json``."""
    sd = {k: (v.half() if args.fp16_weights and v.is_floating_point() else v).cpu()
          for k, v in net.state_dict().items()}
    atomic_torch_save(sd, out / "best.pt")
    data = card.to_json()
    data["name"] = args.name or f"{card.name}-trained"
    data["checkpoint"] = {"file": "best.pt", "sha256": file_digest(out / "best.pt")}
    data["training"] = {
        "command": command_line("swinunetr-segment train", getattr(args, "argv", None)),
        "seed": args.seed,
        "epoch": entry["epoch"],
        "init": args.init,
        "init_encoder": getattr(args, "init_encoder", None),
        "data": [{"image": Path(i["image"]).name, "label": Path(i["label"]).name,
                  "image_sha256": file_digest(i["image"]), "label_sha256": file_digest(i["label"])}
                 for i in train_items],
        "validation": [Path(i["image"]).name for i in val_items],
        "dice": {k: round(v, 4) for k, v in dice.items()},
        "mean_dice": round(entry["mean_dice"], 4),
    }
    atomic_write_text(out / "card.json", json.dumps(data, indent=2) + "\n")


def publish_builtin(run_dir: str | Path, name: str = "demo") -> tuple[Path, Path]:
    """Make a training run's best checkpoint a built-in model: ``cards/<name>.json`` and
    ``weights/<name>.pt`` in the package (the card records the SHA256 checked at load)."""
    from SwinUNETRSegmentLib.models.cards import BUILTIN_CARD_DIR
    from SwinUNETRSegmentLib.models.catalog import BUNDLED_WEIGHTS_DIR

    run = Path(run_dir)
    data = json.loads((run / "card.json").read_text(encoding="utf-8"))
    BUNDLED_WEIGHTS_DIR.mkdir(exist_ok=True)
    weights = atomic_write_bytes(BUNDLED_WEIGHTS_DIR / f"{name}.pt", (run / "best.pt").read_bytes())
    data["name"] = name
    data["checkpoint"] = {"bundled": weights.name, "sha256": file_digest(weights)}
    card = atomic_write_text(BUILTIN_CARD_DIR / f"{name}.json", json.dumps(data, indent=2) + "\n")
    return card, weights
