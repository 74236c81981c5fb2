"""``swinunetr-segment``: segment a scan from the shell.

    swinunetr-segment -i ct.nii.gz -o ct.seg.nrrd --preview ct.png
    swinunetr-segment -i dicom_folder/ -o ct.seg.nrrd -o ct.nii.gz --model btcv
    swinunetr-segment -i ct.nrrd -o ct.seg.nrrd --card btcv --checkpoint finetuned.pt
    swinunetr-segment models list | info NAME | download NAME | install NAME FILE | remove NAME | add CARD
    swinunetr-segment train --data datalist.json --card btcv --out run/ [--init-encoder encoder.pt]
    swinunetr-segment pretrain --data scans/ --card btcv --out pretrain/
    swinunetr-segment serve [--host H --port N --token-file F --tls-cert C --tls-key K]
    swinunetr-segment -i ct.nii.gz -o ct.seg.nrrd --server https://host:8443 --token-file token

Exit codes: 0 done; 2 bad input (one line on stderr says what to do); 130 interrupted
(one line says which files had already been written); 1 an internal error (a bug: run
with --debug for the traceback and report it).

This module is the dispatcher: :func:`main` picks the command (one module per command:
:mod:`.segment`, the default; :mod:`.models`; :mod:`.demo`; :mod:`.train`; :mod:`.pretrain`;
:mod:`.serve`)
and turns every way a command can end into its message and exit code.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from SwinUNETRSegmentLib.errors import CancelledError, UserError

__all__ = ["PROG", "Parser", "ArgumentError", "main", "cancelled_message"]

PROG = "swinunetr-segment"

#: how many written files the message after a cancel names
_NAMED = 10


class ArgumentError(Exception):
    """A command line argparse refuses."""


class Parser(argparse.ArgumentParser):
    """argparse with its errors raised, so that they end as one line and exit code 2, as
    every other bad input (every command builds its parser from this class)."""

    def error(self, message):
        raise ArgumentError(message)


def cancelled_message(written: Optional[Sequence[Path]]) -> str:
    """What the line after Ctrl-C says: the files the command had written (complete: each
    is written atomically), "nothing was written", or only "cancelled" for a command that
    does not report what it wrote (``written`` None)."""
    if written is None:
        return "cancelled"
    if not written:
        return "cancelled; nothing was written"
    names = ", ".join(str(p) for p in written[:_NAMED])
    more = f" and {len(written) - _NAMED} more" if len(written) > _NAMED else ""
    return f"cancelled; written before the cancel: {names}{more}; nothing else was written"


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run one command line; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    # Files the command has finished writing, for the message after a cancel; None where
    # the command does not report them.
    written: Optional[list[Path]] = []
    try:
        if argv and argv[0] == "train":
            written = None
            from SwinUNETRSegmentLib.cli.train import main as train_main

            return train_main([a for a in argv[1:] if a != "--debug"], Parser)
        if argv and argv[0] == "pretrain":
            written = None
            from SwinUNETRSegmentLib.cli.pretrain import main as pretrain_main

            return pretrain_main([a for a in argv[1:] if a != "--debug"], Parser)
        if argv and argv[0] == "demo":
            from SwinUNETRSegmentLib.cli.demo import main as demo_main

            return demo_main([a for a in argv[1:] if a != "--debug"], written)
        if argv and argv[0] == "serve":
            written = None
            from SwinUNETRSegmentLib.cli.serve import main as serve_main

            return serve_main([a for a in argv[1:] if a != "--debug"], Parser)
        if argv and argv[0] == "models":
            from SwinUNETRSegmentLib.cli.models import main as models_main

            return models_main([a for a in argv[1:] if a != "--debug"], Parser)  # each action all or nothing
        from SwinUNETRSegmentLib.cli.segment import build_parser, run

        args = build_parser(Parser).parse_args(argv)
        for path in run(args, written=written):
            print(path)
        return 0
    except ArgumentError as exc:
        print(f"{PROG}: error: {exc}; see {PROG} --help", file=sys.stderr)
        return 2
    except UserError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, CancelledError):
        print(f"{PROG}: {cancelled_message(written)}", file=sys.stderr)
        return 130
    except MemoryError:
        print(f"{PROG}: error: out of memory; close other programs, use a machine with more memory, "
              "or lower --sw-batch-size", file=sys.stderr)
        return 1
    except Exception as exc:  # a bug: say so in one line unless asked for details
        if debug:
            raise
        print(f"{PROG}: internal error: {type(exc).__name__}: {' '.join(str(exc).split())[:300]} "
              "(run again with --debug for the traceback and report it)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
