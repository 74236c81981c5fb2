"""Self-supervised pretraining of the Swin encoder: what ``swinunetr-segment pretrain`` runs.

Tang et al., "Self-Supervised Pre-Training of Swin Transformers for 3D Medical Image
Analysis" (CVPR 2022) pretrain SwinUNETR's Swin encoder on unlabeled CT with three proxy
tasks, then fine-tune the whole network on few labeled scans. Here each step takes
``--batch-size`` random sub-volumes (``--crop``\\ ^3 voxels in the card's model space,
:mod:`~SwinUNETRSegmentLib.training.ssl.data`), makes two views of each
(:mod:`~SwinUNETRSegmentLib.training.ssl.views`), runs the encoder and its three heads
(:mod:`~SwinUNETRSegmentLib.training.ssl.heads`) and minimises the weighted sum of the
rotation, contrastive and reconstruction losses (:mod:`~SwinUNETRSegmentLib.training.ssl.losses`).

Written to ``--out``: ``last.pt`` (resumable: model, optimizer, epoch, history, the
settings of the run; plain tensors and numbers, loadable with ``torch.load(weights_only=True)``),
``encoder.pt`` (the encoder's weights alone, keys exactly as in SwinUNETR's state_dict:
``swinViT....``), ``pretrain.json`` (the configuration) and ``log.jsonl`` (one line per
epoch, each loss separately). Rerunning the same command resumes from ``last.pt`` with the
same random draws as an uninterrupted run; a rerun with other settings is refused.
Fine-tuning loads ``encoder.pt`` with
:func:`~SwinUNETRSegmentLib.training.ssl.encoder.load_encoder_weights`.

A step whose loss is not finite on any process is skipped by every process (they agree
before the backward pass, whose gradient all-reduce they must all join); an epoch whose
every step is skipped stops the run with an error.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from SwinUNETRSegmentLib.errors import UserError
from SwinUNETRSegmentLib.fileio.atomic import atomic_torch_save, atomic_write_text
from SwinUNETRSegmentLib.models.cards import ModelCard
from SwinUNETRSegmentLib.training.common import (
    Distributed,
    check_settings,
    command_line,
    content_digest,
    epoch_seed,
    load_last,
    quiet,
    save_epoch,
    seed_epoch,
    step_lr_factor,
)
from SwinUNETRSegmentLib.training.ssl.data import list_images, transforms
from SwinUNETRSegmentLib.training.ssl.heads import PretrainNetwork
from SwinUNETRSegmentLib.training.ssl.losses import LOSS_NAMES, PretrainLoss
from SwinUNETRSegmentLib.training.ssl.views import axial_plane, make_views

__all__ = ["StepResult", "train_step", "check_args", "run_settings", "pretrain"]


class StepResult(NamedTuple):
    """What :func:`train_step` did."""

    loss: float  #: the total loss before the step
    parts: dict[str, float]  #: {loss name: unweighted value}
    stepped: bool  #: False: the loss was not finite here or on another process; no process stepped


def train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: PretrainLoss,
    views: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    amp: bool = False,
    max_grad_norm: float = 0.0,
    all_true: Callable[[bool], bool] = bool,
) -> StepResult:
    """One optimisation step on the views of :func:`~SwinUNETRSegmentLib.training.ssl.views.make_views`
    (inputs (2B, C, X, Y, Z), rotations (2B,), targets (2B, C, X, Y, Z), masks (2B, 1, X, Y, Z)).

    Args:
        model: a :class:`~SwinUNETRSegmentLib.training.ssl.heads.PretrainNetwork`, or it in
            DistributedDataParallel.
        amp: bfloat16 autocast for the forward pass.
        max_grad_norm: clip the gradients to this norm (0: no clipping).
        all_true: whether every process's loss is finite, given this one's
            (:meth:`~SwinUNETRSegmentLib.training.common.Distributed.all_true`); all
            processes then step, or all skip, together.
    """
    inputs, k, targets, masks = views
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast(device_type=inputs.device.type, dtype=torch.bfloat16, enabled=amp):
        outputs = model(inputs)
    loss, parts = loss_fn(outputs, k, targets, masks)
    stepped = all_true(bool(torch.isfinite(loss)))
    if stepped:
        loss.backward()
        if max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        optimizer.step()
    return StepResult(float(loss.detach()), {n: float(v.detach()) for n, v in parts.items()}, stepped)


def check_args(args: argparse.Namespace) -> None:
    """Refuse settings that cannot pretrain, before any work."""
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
    epoch_seed(args.seed, 1)  # a seed that cannot seed


def run_settings(args: argparse.Namespace, card: ModelCard, images: list[str]) -> dict[str, Any]:
    """The settings that make the run what it is, as ``last.pt`` records them: a resumed run
    must have the same (the card by content, the scans by resolved path)."""
    keys = ("crop", "batch_size", "steps_per_epoch", "lr", "weight_decay", "warmup_steps", "schedule",
            "max_grad_norm", "loss_weights", "temperature", "recon_region", "seed")
    return {"card": content_digest(card.to_json()), "data": [str(Path(i).resolve()) for i in images],
            **{k: getattr(args, k) for k in keys}}


def _resume(last: Path, model, opt, settings, log) -> dict[str, Any] | None:
    ckpt = load_last(last)
    if ckpt is None:
        return None
    check_settings(ckpt.get("settings"), settings, last, content_keys=("card", "data"), log=log)
    try:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
    except (RuntimeError, KeyError, ValueError) as exc:
        reason = " ".join(str(exc).split())[:160]
        raise UserError(f"{last} is not a pretraining checkpoint of this card's network ({reason}); "
                        "use another --out or the card it was made with") from None
    log(f"resuming from {last} at epoch {ckpt['epoch']}")
    return ckpt


def pretrain(args: argparse.Namespace, log: Callable[[str], Any] = print) -> dict[str, Any]:
    """Run (or resume) a pretraining as ``args`` (from :func:`SwinUNETRSegmentLib.cli.pretrain.build_parser`) say.

    Returns:
        {"epochs": epochs done, "history": the log entries, "stopped_early": bool,
        "encoder": path of encoder.pt}.
    """
    from monai.data import CacheDataset
    from monai.utils import set_determinism

    from SwinUNETRSegmentLib.models.cards import load_card

    t_start = time.monotonic()
    check_args(args)
    card = load_card(args.card)
    plane = axial_plane(card.orientation)
    images = list_images(args.data)
    settings = run_settings(args, card, images)
    out = Path(args.out)
    ddp = Distributed(args.device)  # torchrun: DistributedDataParallel, one shard of scans per rank
    device = ddp.device
    if not ddp.main:
        log = quiet  # one log, from rank 0
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // (ddp.world if device.type == "cpu" else 1)))
    amp = device.type == "cuda" and not args.no_amp and torch.cuda.is_bf16_supported()

    set_determinism(seed=args.seed)
    try:
        model = PretrainNetwork(card.network_args)
    except (TypeError, ValueError) as exc:
        raise UserError(f"model card {card.source}: its network args do not make a Swin encoder ({exc}); "
                        "fix 'network.args'") from None
    model = model.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    loss_fn = PretrainLoss(args.loss_weights, args.temperature, args.recon_region)
    config = {"card": card.name, "network_args": dict(card.network_args), "crop": args.crop,
              "batch_size": args.batch_size, "loss_weights": list(args.loss_weights), "temperature": args.temperature,
              "recon_region": args.recon_region, "seed": args.seed}
    state: dict[str, Any] = {"epoch": 0, "step": 0, "history": []}
    last = out / "last.pt"
    ckpt = _resume(last, model, opt, settings, log)  # every rank checks: all stop together
    if ckpt is not None:
        state.update({k: ckpt[k] for k in ("epoch", "step", "history")})
    if ddp.main:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "pretrain.json", json.dumps({
            **config, "command": command_line("swinunetr-segment pretrain", getattr(args, "argv", None)),
            "images": [Path(i).name for i in images], "processes": ddp.world}, indent=2) + "\n")

    fixed, rand = transforms(card, args.crop)
    shard = ddp.shard(len(images))
    log(f"caching {len(images)} scans in model space"
        + (f" ({ddp.world} processes, {len(shard)} scans each)" if ddp.enabled else ""))
    dataset = CacheDataset([{"image": images[i]} for i in shard], fixed, cache_rate=1.0, num_workers=0, progress=False)
    steps = args.steps_per_epoch or max(1, len(images) // (args.batch_size * ddp.world))
    net = ddp.wrap(model)
    total_steps = steps * args.epochs

    model.train()
    stopped_early = False
    try:
        while state["epoch"] < args.epochs:
            epoch = state["epoch"] + 1
            # Every random stream of the epoch from (seed, epoch, rank): a resumed run draws
            # what the uninterrupted run would have, and each rank its own sub-volumes.
            seed = seed_epoch(args.seed, epoch, ddp.rank, [rand])
            rng = np.random.default_rng(seed)
            gen = torch.Generator().manual_seed(seed)
            t0 = time.monotonic()
            sums = dict.fromkeys(("loss", *LOSS_NAMES), 0.0)
            taken = 0
            for n_step in range(steps):
                batch = torch.stack([rand(dataset[int(rng.integers(len(dataset)))])["image"].as_tensor()
                                     for _ in range(args.batch_size)])
                views = make_views(batch.to(device), plane, gen)
                lr = args.lr * step_lr_factor(state["step"], total_steps, args.warmup_steps, args.schedule)
                for group in opt.param_groups:
                    group["lr"] = lr
                result = train_step(net, opt, loss_fn, views, amp=amp, max_grad_norm=args.max_grad_norm,
                                    all_true=ddp.all_true)
                state["step"] += 1
                if not result.stepped:
                    log(f"epoch {epoch} step {n_step + 1}: the loss was not finite (here {result.loss}); "
                        "every process skipped the step")
                    continue
                taken += 1
                sums["loss"] += result.loss
                for n in LOSS_NAMES:
                    sums[n] += result.parts[n]
            if not taken:
                raise UserError(f"the loss was not finite at any step of epoch {epoch}; lower --lr or set "
                                "--max-grad-norm 1 (in another --out: a rerun resumes with the same settings)")
            ranks = ddp.gather({n: v / taken for n, v in sums.items()})
            entry: dict[str, Any] = {"epoch": epoch, **{n: float(np.mean([r[n] for r in ranks])) for n in sums},
                                     "lr": lr, "seconds": round(time.monotonic() - t0, 2)}
            if taken < steps:
                entry["skipped_steps"] = steps - taken
            if ddp.enabled:
                entry["ranks"] = ranks
            state["epoch"] = epoch
            state["history"].append(entry)
            if ddp.main:
                atomic_torch_save(model.encoder_state_dict(), out / "encoder.pt")
                save_epoch(out, {"model": model.state_dict(), "optimizer": opt.state_dict(), "config": config,
                                 "settings": settings, **state}, entry)
            log(f"epoch {epoch}/{args.epochs} loss {entry['loss']:.4f} (rotation {entry['rotation']:.4f}, "
                f"contrastive {entry['contrastive']:.4f}, reconstruction {entry['reconstruction']:.4f})")
            if ddp.broadcast(bool(args.max_minutes and (time.monotonic() - t_start) / 60 > args.max_minutes)):
                log(f"stopping after {args.max_minutes} minutes; rerun the same command to resume")
                stopped_early = True
                break
            ddp.barrier()
    finally:
        ddp.close()
    return {"epochs": state["epoch"], "history": state["history"], "stopped_early": stopped_early,
            "encoder": str(out / "encoder.pt")}
