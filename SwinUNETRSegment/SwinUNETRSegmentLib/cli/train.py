"""``swinunetr-segment train``: train or fine-tune a SwinUNETR under a model card
(:func:`SwinUNETRSegmentLib.training.supervised.train`)."""

from __future__ import annotations

import argparse
import json
import os
from typing import Sequence

__all__ = ["build_parser", "main"]


def build_parser(parser_class: type = argparse.ArgumentParser) -> argparse.ArgumentParser:
    p = parser_class(prog="swinunetr-segment train", description="Train or fine-tune a SwinUNETR under a model card.")
    p.add_argument("--data", required=True, help="MONAI Decathlon datalist JSON ('training', optional 'validation')")
    p.add_argument("--card", required=True, help="model card: built-in name or card JSON file")
    p.add_argument("--out", required=True, help="output folder (resumes from its last.pt)")
    p.add_argument("--init", help="weights to start from (fine-tuning); every key must fit the card")
    p.add_argument("--init-encoder",
                   help="encoder weights from `swinunetr-segment pretrain` (encoder.pt); the decoder starts fresh")
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


def main(argv: Sequence[str], parser_class: type = argparse.ArgumentParser) -> int:
    """Parse ``argv`` and train; rank 0 prints a JSON summary (epochs, best mean Dice)."""
    from SwinUNETRSegmentLib.training.supervised import train

    args = build_parser(parser_class).parse_args(list(argv))
    args.argv = list(argv)
    result = train(args, log=lambda s: print(s, flush=True))
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({"epochs": result["epochs"], "best_mean_dice": round(result["best_dice"], 4)}))
    return 0
