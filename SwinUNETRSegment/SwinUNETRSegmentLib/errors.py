"""Errors a person can act on.

Every failure caused by the input (a path, a file, a model card, a checkpoint, an
output location) is raised as :class:`UserError` with a one-line message that says what
is wrong and what to do. The command line prints that line and exits with code 2; the
Slicer module shows it in an error box. Anything else is a bug.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input: the message is one line, says what is wrong and what to do."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


class CancelledError(Exception):
    """The caller asked the running segmentation to stop; nothing was written."""
