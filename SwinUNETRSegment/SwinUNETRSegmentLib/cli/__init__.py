"""The ``swinunetr-segment`` command line: one module per command, :func:`main` dispatches.

- :mod:`.app`: :func:`main`, the dispatcher; messages and exit codes.
- :mod:`.segment`: the default command (``-i IN -o OUT``; a folder of scans to a folder).
- :mod:`.models`: the model catalog; :mod:`.demo`: the built-in model on a real CT;
  :mod:`.train`, :mod:`.pretrain`: training.
"""

from SwinUNETRSegmentLib.cli.app import main

__all__ = ["entry", "main"]


def entry() -> int:
    """The ``swinunetr-segment`` executable: :func:`main` in an engine process with the
    allocator :mod:`~SwinUNETRSegmentLib.inference.memory` picks (jemalloc where installed)."""
    from SwinUNETRSegmentLib.inference.memory import reexec_with_allocator

    reexec_with_allocator()
    return main()
