"""``swinunetr-segment pretrain``: self-supervised pretraining of SwinUNETR's Swin encoder
(:func:`SwinUNETRSegmentLib.training.ssl.pretrain.pretrain`)."""

from __future__ import annotations

import argparse
import json
import os
from typing import Sequence

__all__ = ["build_parser", "main"]


def build_parser(parser_class: type = argparse.ArgumentParser) -> argparse.ArgumentParser:
    p = parser_class(prog="swinunetr-segment pretrain",
                     description="Self-supervised pretraining of SwinUNETR's Swin encoder on unlabeled scans "
                                 "(rotation, contrastive and inpainting tasks; Tang et al., CVPR 2022).")
    p.add_argument("--data", required=True,
                   help="Decathlon datalist JSON (its 'training' images) or a folder of scans")
    p.add_argument("--card", required=True, help="model card (built-in name or JSON): preprocessing and network args")
    p.add_argument("--out", required=True, help="output folder (resumes from its last.pt); encoder.pt is the result")
    p.add_argument("--crop", type=int, default=96, help="sub-volume size, a multiple of 32 (default 96)")
    p.add_argument("--batch-size", type=int, default=4,
                   help="sub-volumes per step, at least 2 for the contrastive loss (default 4)")
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--steps-per-epoch", type=int, default=0,
                   help="steps per epoch (default: scans / batch size, at least 1)")
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


def main(argv: Sequence[str], parser_class: type = argparse.ArgumentParser) -> int:
    """Parse ``argv`` and pretrain; rank 0 prints a JSON summary (epochs, last loss, encoder.pt)."""
    from SwinUNETRSegmentLib.training.ssl.pretrain import pretrain

    args = build_parser(parser_class).parse_args(list(argv))
    args.argv = list(argv)
    result = pretrain(args, log=lambda s: print(s, flush=True))
    final = result["history"][-1] if result["history"] else {}
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    print(json.dumps({"epochs": result["epochs"], "loss": round(final.get("loss", float("nan")), 4),
                      "encoder": result["encoder"]}))
    return 0
