"""Model cards: what a checkpoint is, how to feed it, and what its labels mean.

A card is a small JSON file (see ``cards/btcv.json``). Reading one never executes
anything: it is plain data, validated here field by field, and every problem is a
:class:`UserError` naming the card and the field.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from SwinUNETRSegmentLib.errors import UserError

__all__ = ["Code", "LabelInfo", "ModelCard", "Decoder", "Interpolation", "BlendMode", "load_card", "card_from_dict",
           "builtin_card_names", "is_model_name", "check_model_name", "BUILTIN_CARD_DIR", "SUPPORTED_NETWORKS",
           "DECODERS", "MODEL_NAME_RULE"]

BUILTIN_CARD_DIR = Path(__file__).with_name("cards")

# Context names Slicer's terminology module knows (Modules/Loadable/Terminologies/Resources).
SLICER_GENERAL_ANATOMY = "Segmentation category and type - 3D Slicer General Anatomy list"
DICOM_MASTER = "Segmentation category and type - DICOM master list"
ANATOMIC_CONTEXT = "Anatomic codes - DICOM master list"

SUPPORTED_NETWORKS = ("SwinUNETR",)


class _Choice(str, Enum):
    """A card field with a few allowed values; ``str(member)`` is its value, as in the JSON.

    Cards are read before PyTorch is installed (the Slicer panel lists the catalog first),
    so these are checked here without MONAI's ``look_up_option``, which imports torch.
    """

    def __str__(self) -> str:
        return str(self.value)

    @classmethod
    def values(cls) -> tuple[str, ...]:
        return tuple(str(m.value) for m in cls)


class Decoder(_Choice):
    """``network.decoder``: the decoder on SwinUNETR's Swin encoder."""

    UNETR = "unetr"  # SwinUNETR's convolutional decoder
    SWIN_UNET = "swin_unet"  # Swin-Unet's transformer decoder (Cao et al.)


class Interpolation(_Choice):
    """``preprocessing.interpolation``: how the scan is resampled to the model's spacing."""

    BILINEAR = "bilinear"
    NEAREST = "nearest"


class BlendMode(_Choice):
    """``inference.blend_mode``: how overlapping windows are averaged (MONAI's ``BlendMode``)."""

    CONSTANT = "constant"
    GAUSSIAN = "gaussian"


DECODERS = Decoder.values()

#: What a model name may be: it names files in the catalog (``cards/NAME.json``,
#: ``models/NAME/model.pt``), so it holds no path separator and is not ``..``.
MODEL_NAME_RULE = "1 to 64 letters, digits, '.', '_' or '-', starting with a letter or digit, without '..'"
_MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def is_model_name(name: object) -> bool:
    """Whether ``name`` can name a model: see :data:`MODEL_NAME_RULE`."""
    return isinstance(name, str) and _MODEL_NAME.fullmatch(name) is not None and ".." not in name


def check_model_name(name: object, where: str, hint: str) -> str:
    """``name`` if :func:`is_model_name`, else a UserError: ``where``, the rule and ``hint`` (what to do)."""
    if not is_model_name(name):
        raise UserError(f"{where}: {name!r} is not a usable model name ({MODEL_NAME_RULE}); {hint}")
    return str(name)


@dataclass(frozen=True)
class Code:
    """A coded concept: (coding scheme, code value, code meaning), e.g. ("SCT", "78961009", "Spleen")."""

    scheme: str
    value: str
    meaning: str

    def as_list(self) -> list[str]:
        return [self.scheme, self.value, self.meaning]


@dataclass(frozen=True)
class LabelInfo:
    """One output label of a model: its value in the label map, and how Slicer shows it."""

    value: int
    name: str
    color: tuple[int, int, int]  # 0..255
    category: Code
    type: Code
    type_modifier: Code | None = None
    context: str = SLICER_GENERAL_ANATOMY

    @property
    def color_float(self) -> tuple[float, float, float]:
        return tuple(round(c / 255.0, 6) for c in self.color)  # type: ignore[return-value]

    def terminology(self) -> dict[str, Any]:
        """The terminology dict slicerio writes as a segment's ``TerminologyEntry`` tag."""
        entry: dict[str, Any] = {
            "contextName": self.context,
            "category": self.category.as_list(),
            "type": self.type.as_list(),
            "anatomicContextName": ANATOMIC_CONTEXT,
        }
        if self.type_modifier is not None:
            entry["typeModifier"] = self.type_modifier.as_list()
        return entry


@dataclass(frozen=True)
class ModelCard:
    """Everything needed to run a checkpoint and to name its output.

    ``network_args`` go to MONAI's network constructor as keyword arguments.
    ``spacing`` is the model's voxel size in mm along R, A, S after reorientation to
    ``orientation``. ``intensity`` maps ``a_min..a_max`` to ``b_min..b_max``.
    """

    name: str
    title: str
    network: str
    network_args: dict[str, Any]
    orientation: str
    spacing: tuple[float, float, float]
    interpolation: str
    intensity: dict[str, Any]
    roi_size: tuple[int, int, int]
    overlap: float
    sw_batch_size: int
    blend_mode: str
    labels: tuple[LabelInfo, ...]
    modality: str = "CT"
    decoder: str = "unetr"
    description: str = ""
    checkpoint: dict[str, Any] = field(default_factory=dict)
    license: str = ""
    citation: str = ""
    source: str = ""  # where the card was read from
    training: dict[str, Any] = field(default_factory=dict)  # how the weights were made, and their scores
    # connected-component clean-up after the way back (inference/postprocess.py checks it)
    postprocessing: dict[str, Any] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return int(self.network_args["out_channels"])

    def label(self, value: int) -> LabelInfo:
        for lab in self.labels:
            if lab.value == value:
                return lab
        raise KeyError(value)

    def to_json(self) -> dict[str, Any]:
        """The card as the JSON it was read from (round-trips through :func:`card_from_dict`)."""
        labels = []
        for lab in self.labels:
            d: dict[str, Any] = {
                "value": lab.value,
                "name": lab.name,
                "color": list(lab.color),
                "category": lab.category.as_list(),
                "type": lab.type.as_list(),
            }
            if lab.type_modifier is not None:
                d["type_modifier"] = lab.type_modifier.as_list()
            if lab.context != SLICER_GENERAL_ANATOMY:
                d["context"] = lab.context
            labels.append(d)
        return {
            "name": self.name,
            "title": self.title,
            "description": self.description,
            "modality": self.modality,
            "network": {"name": self.network, "args": dict(self.network_args),
                        **({"decoder": self.decoder} if self.decoder != "unetr" else {})},
            "preprocessing": {
                "orientation": self.orientation,
                "spacing": list(self.spacing),
                "interpolation": self.interpolation,
                "intensity": dict(self.intensity),
            },
            "inference": {
                "roi_size": list(self.roi_size),
                "overlap": self.overlap,
                "sw_batch_size": self.sw_batch_size,
                "blend_mode": self.blend_mode,
            },
            "labels": labels,
            **({"postprocessing": dict(self.postprocessing)} if self.postprocessing else {}),
            "checkpoint": dict(self.checkpoint),
            "license": self.license,
            "citation": self.citation,
            **({"training": dict(self.training)} if self.training else {}),
        }


def builtin_card_names() -> list[str]:
    """The names of the cards that ship in the package (``cards/*.json``)."""
    return sorted(p.stem for p in BUILTIN_CARD_DIR.glob("*.json"))


def load_card(name_or_path: str | Path) -> ModelCard:
    """A built-in card by name (``"btcv"``) or a card JSON file by path."""
    text = str(name_or_path)
    path = Path(text)
    if not text.endswith(".json") and is_model_name(text) and (BUILTIN_CARD_DIR / f"{text}.json").is_file():
        path = BUILTIN_CARD_DIR / f"{text}.json"
    elif not path.is_file():
        known = ", ".join(builtin_card_names())
        if text.endswith(".json"):
            raise UserError(f"model card file not found: {text}; give the path of a card JSON file")
        raise UserError(f"unknown model card '{text}'; known cards: {known} (or give the path of a card JSON file)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"model card {path} is not readable JSON ({exc}); fix or replace the file") from None
    return card_from_dict(data, source=str(path))


def _get(d: dict, key: str, where: str, kind: type | tuple[type, ...] = object, default: Any = ...) -> Any:
    if key not in d:
        if default is not ...:
            return default
        raise UserError(f"{where}: '{key}' is missing; add it to the card")
    value = d[key]
    if not isinstance(value, kind) or isinstance(value, bool) and kind in (int, float, (int, float)):
        raise UserError(f"{where}: '{key}' must be {getattr(kind, '__name__', kind)}, got {value!r}")
    return value


def _code(value: Any, where: str) -> Code:
    if not (isinstance(value, (list, tuple)) and len(value) == 3 and all(isinstance(v, str) for v in value)):
        raise UserError(f"{where} must be [scheme, code value, meaning] strings, "
                        "e.g. [\"SCT\", \"78961009\", \"Spleen\"]")
    return Code(*value)


def _triple(value: Any, where: str, kind: type) -> tuple:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = [value] * 3
    if not (isinstance(value, (list, tuple)) and len(value) == 3
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)):
        raise UserError(f"{where} must be three numbers, got {value!r}")
    if any(v <= 0 for v in value):
        raise UserError(f"{where} must be positive, got {value!r}")
    return tuple(kind(v) for v in value)


def card_from_dict(data: Any, source: str = "<dict>") -> ModelCard:
    """Validate card JSON data and build a :class:`ModelCard`."""
    where = f"model card {source}"
    if not isinstance(data, dict):
        raise UserError(f"{where}: the top level must be a JSON object")
    name = check_model_name(_get(data, "name", where, str), f"{where}: 'name'", "give the card another 'name'")
    net = _get(data, "network", where, dict)
    net_name = _get(net, "name", f"{where} network", str)
    if net_name not in SUPPORTED_NETWORKS:
        raise UserError(f"{where}: network '{net_name}' is not supported; use one of {', '.join(SUPPORTED_NETWORKS)}")
    args = dict(_get(net, "args", f"{where} network", dict))
    decoder = _get(net, "decoder", f"{where} network", str, Decoder.UNETR.value)
    if decoder not in Decoder.values():
        raise UserError(f"{where}: network decoder '{decoder}' is not known; use one of {', '.join(DECODERS)}")
    for key in ("in_channels", "out_channels"):
        if not isinstance(args.get(key), int) or args[key] < 1:
            raise UserError(f"{where}: network args need a positive integer '{key}'")
    if args["in_channels"] != 1:
        raise UserError(f"{where}: in_channels must be 1 (one scalar image in), got {args['in_channels']}")

    pre = _get(data, "preprocessing", where, dict)
    pw = f"{where} preprocessing"
    orientation = _get(pre, "orientation", pw, str, "RAS").upper()
    if not _is_axcodes(orientation):
        raise UserError(f"{pw}: orientation '{orientation}' is not three axis codes such as RAS or LPS")
    spacing = _triple(_get(pre, "spacing", pw), f"{pw} spacing", float)
    interpolation = _get(pre, "interpolation", pw, str, Interpolation.BILINEAR.value)
    if interpolation not in Interpolation.values():
        raise UserError(f"{pw}: interpolation must be 'bilinear' or 'nearest', got '{interpolation}'")
    intensity = dict(_get(pre, "intensity", pw, dict))
    for key in ("a_min", "a_max", "b_min", "b_max"):
        if not isinstance(intensity.get(key), (int, float)) or isinstance(intensity.get(key), bool):
            raise UserError(f"{pw}: intensity needs a number '{key}'")
    if intensity["a_max"] <= intensity["a_min"]:
        raise UserError(f"{pw}: intensity a_max must be greater than a_min")
    intensity.setdefault("clip", True)

    inf = _get(data, "inference", where, dict)
    iw = f"{where} inference"
    roi = _triple(_get(inf, "roi_size", iw), f"{iw} roi_size", int)
    if any(r % 32 for r in roi):
        raise UserError(f"{iw}: roi_size {list(roi)} must be multiples of 32 for SwinUNETR")
    overlap = float(_get(inf, "overlap", iw, (int, float), 0.5))
    if not 0 <= overlap < 1:
        raise UserError(f"{iw}: overlap must be in [0, 1), got {overlap}")
    swb = int(_get(inf, "sw_batch_size", iw, int, 1))
    if swb < 1:
        raise UserError(f"{iw}: sw_batch_size must be at least 1")
    blend = _get(inf, "blend_mode", iw, str, BlendMode.CONSTANT.value)
    if blend not in BlendMode.values():
        raise UserError(f"{iw}: blend_mode must be 'constant' or 'gaussian'")

    raw_labels = _get(data, "labels", where, list)
    labels = []
    seen_values: set[int] = set()
    for n, lab in enumerate(raw_labels):
        lw = f"{where} labels[{n}]"
        if not isinstance(lab, dict):
            raise UserError(f"{lw} must be an object")
        value = _get(lab, "value", lw, int)
        if not 1 <= value < args["out_channels"]:
            raise UserError(f"{lw}: value {value} must be between 1 and out_channels-1 "
                            f"({args['out_channels'] - 1}); 0 is background")
        if value in seen_values:
            raise UserError(f"{lw}: value {value} appears twice")
        seen_values.add(value)
        color = lab.get("color")
        if not (isinstance(color, list) and len(color) == 3
                and all(isinstance(c, int) and 0 <= c <= 255 for c in color)):
            raise UserError(f"{lw}: color must be three integers 0..255")
        modifier = lab.get("type_modifier")
        labels.append(LabelInfo(
            value=value,
            name=_get(lab, "name", lw, str),
            color=tuple(color),  # type: ignore[arg-type]
            category=_code(_get(lab, "category", lw), f"{lw} category"),
            type=_code(_get(lab, "type", lw), f"{lw} type"),
            type_modifier=None if modifier is None else _code(modifier, f"{lw} type_modifier"),
            context=_get(lab, "context", lw, str, SLICER_GENERAL_ANATOMY),
        ))
    if not labels:
        raise UserError(f"{where}: 'labels' is empty; list the model's output labels")

    return ModelCard(
        name=name,
        title=_get(data, "title", where, str, name),
        network=net_name,
        network_args=args,
        orientation=orientation,
        spacing=spacing,
        interpolation=interpolation,
        intensity=intensity,
        roi_size=roi,
        overlap=overlap,
        sw_batch_size=swb,
        blend_mode=blend,
        labels=tuple(sorted(labels, key=lambda lab: lab.value)),
        modality=_get(data, "modality", where, str, "CT"),
        decoder=decoder,
        description=_get(data, "description", where, str, ""),
        checkpoint=dict(_get(data, "checkpoint", where, dict, {})),
        license=_get(data, "license", where, str, ""),
        citation=_get(data, "citation", where, str, ""),
        source=source,
        training=dict(_get(data, "training", where, dict, {})),
        postprocessing=dict(_get(data, "postprocessing", where, dict, {})),
    )


def _is_axcodes(code: str) -> bool:
    pairs = [set("LR"), set("AP"), set("SI")]
    if len(code) != 3:
        return False
    used = []
    for c in code:
        hits = [n for n, p in enumerate(pairs) if c in p]
        if not hits:
            return False
        used.append(hits[0])
    return sorted(used) == [0, 1, 2]
