"""The ``swinunetr-segment`` command line: one module per command, :func:`main` dispatches."""

from SwinUNETRSegmentLib.cli.app import main

__all__ = ["main"]
