"""The conversion's child process: ``python -m SwinUNETRSegmentLib.inference.cpu.openvino_convert
--checkpoint W.pt --key KEY --threads N`` with the model card's JSON on standard input.

Converts the checkpoint for OpenVINO into the cache entry ``KEY``
(:func:`~.openvino_backend.convert_checkpoint`) and exits: 0 when the entry is whole, 1 with
a one-line reason on standard error otherwise. Run by
:func:`~.openvino_backend.convert_in_child`, so that what a conversion leaves resident goes
with this process and not into the engine's.
"""

from __future__ import annotations

import argparse
import json
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="openvino_convert")
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        import torch

        from SwinUNETRSegmentLib.inference.cpu import openvino_backend
        from SwinUNETRSegmentLib.models.cards import card_from_dict

        openvino_backend.no_telemetry()
        if args.threads > 0:
            torch.set_num_threads(args.threads)
        card = card_from_dict(json.loads(sys.stdin.read()), source="<the engine's card>")
        openvino_backend.convert_checkpoint(card, args.checkpoint, args.key)  # traces under no_grad, quietly
    except Exception as exc:  # OpenVINO's frontends raise many types: one line for the engine's log
        sys.stderr.write(f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
