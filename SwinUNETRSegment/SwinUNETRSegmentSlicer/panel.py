"""What the panel shows, computed without Qt: progress and time left, the device list,
the model description. The widget only copies these strings into its labels."""

from __future__ import annotations

from typing import Optional, Sequence

from SwinUNETRSegmentLib.models.cards import ModelCard
from SwinUNETRSegmentLib.progress import Progress, format_seconds

#: How each engine stage reads in the panel.
STAGE_TEXT = {
    "downloading weights": "Downloading the model's weights",
    "starting engine": "Starting the engine",
    "uploading": "Sending the volume to the engine",
    "queued": "Waiting for the engine",
    "receiving": "Receiving the segments",
    "loading model": "Loading the model",
    "reading": "Reading the volume",
    "preprocessing": "Preparing the volume",
    "inference": "Running the model",
    "resampling": "Back to the volume's grid",
    "writing": "Writing the segments",
}


def time_left_text(seconds: Optional[float]) -> str:
    """``75`` -> ``"about 1 min 15 s left"``; unknown -> ``""``."""
    if seconds is None:
        return ""
    if seconds < 1:
        return "less than a second left"
    return f"about {format_seconds(seconds)} left"


def progress_text(p: Progress) -> str:
    """One line for the status label: "Running the model: window 3 of 27, about 1 min 15 s left"."""
    text = STAGE_TEXT.get(p.stage, p.stage[:1].upper() + p.stage[1:])
    if p.stage == "inference" and p.total:
        text += f": window {p.done} of {p.total}"
    elif p.stage in ("downloading weights", "uploading", "queued") and p.message and p.message != p.stage:
        text += f": {p.message}"
    left = time_left_text(p.seconds_left)
    return f"{text}, {left}" if left else text


def progress_percent(p: Progress) -> int:
    """The progress bar value, 0..100."""
    return max(0, min(100, int(round(p.fraction * 100))))


def device_choices(devices: Optional[Sequence[tuple[str, str]]]) -> list[tuple[str, str]]:
    """(value, label) items of the device selector.

    Args:
        devices: :func:`SwinUNETRSegmentLib.inference.devices.available_devices` (best first), or
            None when torch is not installed yet (then only "Automatic" is offered).
    """
    if not devices:
        return [("auto", "Automatic")]
    best = devices[0]
    items = [("auto", f"Automatic ({_device_label(*best)})")]
    items += [(dev, _device_label(dev, name)) for dev, name in devices]
    return items


def engine_devices(info: Optional[dict]) -> Optional[list[tuple[str, str]]]:
    """(device, name) pairs of an engine's ``GET /info`` answer (best first); None without any."""
    found = [(str(d.get("device")), str(d.get("name", d.get("device")))) for d in (info or {}).get("devices") or []
             if isinstance(d, dict) and d.get("device")]
    return found or None


def _device_label(device: str, name: str) -> str:
    if device.startswith("cuda"):
        index = device.partition(":")[2] or "0"
        return f"GPU {index}: {name}"
    if device == "cpu":
        return "CPU (slow)"
    return name


def organs_text(card: ModelCard, limit: int = 8) -> str:
    """ "spleen, liver, ... and 5 more" """
    names = [lab.name for lab in card.labels]
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def model_summary(card: ModelCard) -> str:
    """Modality, structures and licence of a model, as shown under the model selector."""
    lines = [f"{card.modality}, {len(card.labels)} structures: {organs_text(card)}"]
    if card.license:
        lines.append(f"Licence: {card.license}")
    return "\n".join(lines)


def model_tooltip(card: ModelCard) -> str:
    """The longer description for the model selector's tooltip."""
    parts = [card.title]
    if card.description:
        parts.append(card.description)
    parts.append("Structures: " + ", ".join(lab.name for lab in card.labels))
    if card.license:
        parts.append(f"Licence: {card.license}")
    if card.citation:
        parts.append(f"Cite: {card.citation}")
    return "\n\n".join(parts)


def model_choices(models: Sequence[tuple[str, ModelCard]]) -> list[tuple[str, str, str]]:
    """(value, label, tooltip) items of the model selector for ``[(name, card)]``."""
    return [(name, card.title or name, model_tooltip(card)) for name, card in models]


def finished_text(summary: str, seconds: float, device: str) -> str:
    """The status line after a run: "Done in 42 s on cuda:0: added 13 (...)"."""
    return f"Done in {format_seconds(seconds)} on {device}: {summary}."
