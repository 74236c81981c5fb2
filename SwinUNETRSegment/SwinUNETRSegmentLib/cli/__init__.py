"""The ``swinunetr-segment`` command line: one module per command, :func:`main` dispatches.

- :mod:`.app`: :func:`main`, the dispatcher; messages and exit codes.
- :mod:`.segment`: the default command (``-i IN -o OUT``; a folder of scans to a folder).
- :mod:`.models`: the model catalog; :mod:`.demo`: the built-in model on a real CT;
  :mod:`.train`, :mod:`.pretrain`: training.
"""

from SwinUNETRSegmentLib.cli.app import main

__all__ = ["main"]
