"""The models the panel offers and where their weights come from. No Slicer, no torch: the
panel builds this in Slicer's own Python, with only the packages Slicer ships.

A model is offered when its weights are on this machine, or when they can be downloaded
and verified: the card names a URL and the checksum its publisher gives. A model whose
publisher gives no checksum and whose weights are not here is left out (its weights can be
installed from a copy the user trusts with ``swinunetr-segment models download NAME
--sha256 HASH`` or ``models install``; then it is offered).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Optional

from SwinUNETRSegmentLib.errors import CancelledError, UserError
from SwinUNETRSegmentLib.models.cards import ModelCard
from SwinUNETRSegmentLib.progress import Progress, ProgressCallback


def catalog_models() -> list[tuple[str, ModelCard]]:
    """(name, card) of every catalog model; a user card that does not load is left out with a warning."""
    from SwinUNETRSegmentLib.models.catalog import card_of, model_names

    models = []
    for name in model_names():
        try:
            models.append((name, card_of(name)))
        except UserError as exc:
            logging.warning(f"SwinUNETRSegment: model '{name}' left out: {exc}")
    return models


def publisher_checksum(card: ModelCard) -> Optional[str]:
    """The checksum (``sha256`` or ``md5``) the card's publisher gives for its weights, None without one."""
    from SwinUNETRSegmentLib.models.catalog import CHECKSUMS

    for algo in CHECKSUMS:
        if card.checkpoint.get(algo):
            return algo
    return None


def weights_here(card: ModelCard) -> bool:
    from SwinUNETRSegmentLib.models.catalog import is_installed

    try:
        return is_installed(card)
    except UserError:
        return False


def weights_url(card: ModelCard) -> Optional[str]:
    """Where the panel may download ``card``'s weights from: None when they are here already,
    or when they cannot be verified after download (no URL, or no publisher checksum)."""
    if weights_here(card):
        return None
    url = card.checkpoint.get("url") or None
    return url if url and publisher_checksum(card) else None


def offered_models() -> list[tuple[str, ModelCard]]:
    """The models the panel lists: weights here, or downloadable and verifiable."""
    offered = []
    for name, card in catalog_models():
        if weights_here(card) or weights_url(card):
            offered.append((name, card))
        else:
            logging.info(f"SwinUNETRSegment: model '{name}' not offered: its weights are not here and its "
                         "publisher gives no checksum to verify a download against")
    return offered


def default_model(offered: list[tuple[str, ModelCard]]) -> Optional[str]:
    """The catalog's default model when offered, else the first offered one."""
    from SwinUNETRSegmentLib.models.catalog import DEFAULT_MODEL

    names = [name for name, _ in offered]
    return DEFAULT_MODEL if DEFAULT_MODEL in names else (names[0] if names else None)


def download_progress(
    progress: ProgressCallback, cancel: Optional[threading.Event] = None, clock: Callable[[], float] = time.monotonic
) -> Callable[[int, Optional[int]], None]:
    """A ``progress(bytes_done, bytes_total)`` callback that reports :class:`Progress` (stage
    "downloading weights", MB done, time left from the rate so far) and raises
    CancelledError once ``cancel`` is set."""
    start = clock()

    def report(done: int, total: Optional[int]) -> None:
        if cancel is not None and cancel.is_set():
            raise CancelledError("download cancelled")
        elapsed = clock() - start
        left = None
        if total and done and elapsed > 0:
            left = (total - done) * elapsed / done
        mb = f"{done / 1e6:.0f} of {total / 1e6:.0f} MB" if total else f"{done / 1e6:.0f} MB"
        progress(Progress("downloading weights", (done / total) if total else 0.0, left, mb, done, total or 0))

    return report
