"""Where a named model's card and weights are found on this machine.

Built-in cards live in the package (``cards/*.json``); weights live in the per-user
data folder (``platformdirs``), one folder per model: ``<models>/<name>/model.pt``.
Set ``SWINUNETR_SEGMENT_HOME`` to keep them elsewhere (an offline hospital share).
"""

from __future__ import annotations

import os
from pathlib import Path

from .cards import ModelCard, builtin_card_names, load_card
from .errors import UserError

#: The model used when none is named.
DEFAULT_MODEL = "btcv"


def models_dir() -> Path:
    home = os.environ.get("SWINUNETR_SEGMENT_HOME")
    if home:
        return Path(home) / "models"
    import platformdirs

    return Path(platformdirs.user_data_dir("swinunetr-segment", appauthor=False)) / "models"


def model_names() -> list[str]:
    return builtin_card_names()


def resolve_model(name: str) -> tuple[ModelCard, Path]:
    """The card and the weights file of catalog model ``name``."""
    if name not in model_names():
        raise UserError(f"unknown model '{name}'; known models: {', '.join(model_names())}")
    card = load_card(name)
    weights = models_dir() / name / "model.pt"
    if not weights.is_file():
        url = card.checkpoint.get("url", "")
        where = f" from {url}" if url else ""
        raise UserError(
            f"the weights of model '{name}' are not on this machine; download them{where} and run with "
            f"--card {name} --checkpoint FILE, or place them at {weights}"
        )
    return card, weights
