"""Import a MONAI bundle directory as a model card, without running anything it names.

A bundle (configs/metadata.json, configs/inference.json, models/model.pt) describes its
network and transforms as config objects with ``_target_`` names; MONAI's
ConfigParser would import those names and evaluate ``$`` expressions. Here nothing is
imported or evaluated: the known ``_target_`` names are recognised and only their
literal arguments (and ``@`` references to literals) are read. Anything the card needs
that is not literal, or a transform whose effect cannot be expressed in a card, is a
clear error.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from SwinUNETRSegmentLib.errors import UserError
from SwinUNETRSegmentLib.models.cards import (
    MODEL_NAME_RULE,
    SLICER_GENERAL_ANATOMY,
    ModelCard,
    card_from_dict,
    is_model_name,
    load_card,
)

__all__ = ["card_from_bundle", "import_bundle"]

NETWORKS = {"SwinUNETR", "monai.networks.nets.SwinUNETR", "monai.networks.nets.swin_unetr.SwinUNETR"}
# Transforms that do not change what the network sees beyond what a card describes.
NEUTRAL = {"LoadImaged", "LoadImage", "EnsureChannelFirstd", "EnsureChannelFirst", "EnsureTyped", "EnsureType",
           "AddChanneld", "ToTensord", "ToTensor", "CastToTyped", "CropForegroundd", "CopyItemsd"}
UNUSED_NET_ARGS = {"img_size", "spatial_dims", "use_checkpoint"}


def _short(target: Any) -> str:
    return str(target).rsplit(".", 1)[-1] if isinstance(target, str) else ""


class _Reader:
    def __init__(self, config: dict, where: str):
        self.config, self.where = config, where

    def literal(self, value: Any, what: str) -> Any:
        """A literal value; follows ``@name`` references to literals; refuses ``$`` expressions."""
        seen = set()
        while isinstance(value, str) and value.startswith("@"):
            ref = value[1:]
            if ref in seen:
                raise UserError(f"{self.where}: {what} refers to itself ({value})")
            seen.add(ref)
            node: Any = self.config
            for part in ref.replace("::", "#").split("#"):
                if isinstance(node, dict) and part in node:
                    node = node[part]
                elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
                    node = node[int(part)]
                else:
                    raise UserError(f"{self.where}: {what} refers to '{value}', which is not in the config")
            value = node
        if isinstance(value, str) and value.startswith("$"):
            raise UserError(f"{self.where}: {what} is an expression ({value[:60]}); expressions are never evaluated, "
                            "write the literal value into the bundle config")
        if isinstance(value, (list, tuple)):
            return [self.literal(v, what) for v in value]
        if isinstance(value, dict):
            return {k: self.literal(v, f"{what}.{k}") for k, v in value.items() if not str(k).startswith("_")}
        return value

    def find(self, names: set[str]) -> list[dict]:
        """Every config object (anywhere in the tree) whose _target_ is one of ``names``."""
        out = []

        def walk(node):
            if isinstance(node, dict):
                if _short(node.get("_target_")) in {_short(n) for n in names} or node.get("_target_") in names:
                    out.append(node)
                for v in node.values():
                    walk(v)
            elif isinstance(node, list):
                for v in node:
                    walk(v)

        walk(self.config)
        return out


def card_from_bundle(bundle_dir: str | Path, name: str | None = None) -> ModelCard:
    """Read a bundle directory into a :class:`ModelCard` (the weights are not loaded)."""
    root = Path(bundle_dir)
    meta_path, inf_path = root / "configs" / "metadata.json", root / "configs" / "inference.json"
    for p in (meta_path, inf_path):
        if not p.is_file():
            raise UserError(f"{root} is not a MONAI bundle: {p.relative_to(root)} is missing")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        config = json.loads(inf_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"cannot read the bundle configs in {root} ({exc}); only JSON configs are read") from None
    r = _Reader(config, f"bundle {root.name} configs/inference.json")

    nets = r.find(NETWORKS)
    if not nets:
        raise UserError(f"bundle {root.name}: configs/inference.json defines no SwinUNETR network; "
                        "only SwinUNETR bundles can be imported")
    net_args = {k: v for k, v in nets[0].items() if not k.startswith("_")}
    args: dict[str, Any] = {}
    for k, v in net_args.items():
        if k in UNUSED_NET_ARGS:
            continue
        args[k] = r.literal(v, f"network_def.{k}")
    if int(net_args.get("spatial_dims", 3) if not isinstance(net_args.get("spatial_dims"), str) else 3) != 3:
        raise UserError(f"bundle {root.name}: only 3D SwinUNETR networks are supported")

    pre: dict[str, Any] = {"orientation": "RAS"}
    orient = r.find({"Orientationd", "Orientation"})
    if orient:
        pre["orientation"] = str(r.literal(orient[0].get("axcodes", "RAS"), "Orientationd.axcodes"))
    spacing = r.find({"Spacingd", "Spacing"})
    if not spacing:
        raise UserError(f"bundle {root.name}: no Spacingd transform; the model's voxel size cannot be read")
    pixdim = r.literal(spacing[0].get("pixdim"), "Spacingd.pixdim")
    mode = r.literal(spacing[0].get("mode", "bilinear"), "Spacingd.mode")
    pre["spacing"] = pixdim
    pre["interpolation"] = mode[0] if isinstance(mode, list) else mode
    scale = r.find({"ScaleIntensityRanged", "ScaleIntensityRange"})
    if not scale:
        raise UserError(f"bundle {root.name}: no ScaleIntensityRanged transform; "
                        "this importer reads only that intensity mapping")
    s = scale[0]
    pre["intensity"] = {k: r.literal(s.get(k, d), f"ScaleIntensityRanged.{k}")
                        for k, d in (("a_min", None), ("a_max", None), ("b_min", 0.0), ("b_max", 1.0), ("clip", False))}
    for t in r.find({"NormalizeIntensityd", "ScaleIntensityd", "ScaleIntensityRangePercentilesd", "Resized", "Zoomd"}):
        raise UserError(f"bundle {root.name}: transform {_short(t.get('_target_'))} "
                        "cannot be expressed in a model card")

    inferers = r.find({"SlidingWindowInferer"})
    if not inferers:
        raise UserError(f"bundle {root.name}: no SlidingWindowInferer in configs/inference.json")
    inf = inferers[0]
    inference = {
        "roi_size": r.literal(inf.get("roi_size"), "SlidingWindowInferer.roi_size"),
        "overlap": r.literal(inf.get("overlap", 0.25), "SlidingWindowInferer.overlap"),
        "sw_batch_size": r.literal(inf.get("sw_batch_size", 1), "SlidingWindowInferer.sw_batch_size"),
        "blend_mode": r.literal(inf.get("mode", "constant"), "SlidingWindowInferer.mode"),
    }

    outputs = (meta.get("network_data_format") or {}).get("outputs") or {}
    channel_def = (outputs.get("pred") or {}).get("channel_def") or {}
    if not channel_def:
        raise UserError(f"bundle {root.name}: configs/metadata.json has no "
                        "network_data_format.outputs.pred.channel_def (label names)")
    labels = []
    known = {lab.name.lower(): lab for lab in load_card("btcv").labels}
    aliases = {"rkid": "right kidney", "lkid": "left kidney", "gall": "gallbladder", "eso": "esophagus",
               "sto": "stomach", "ivc": "inferior vena cava", "veins": "portal vein and splenic vein",
               "pancreas": "pancreas", "rad": "right adrenal gland", "lad": "left adrenal gland"}
    for value, label_name in sorted(((int(k), str(v)) for k, v in channel_def.items()), key=lambda kv: kv[0]):
        if value == 0:
            continue
        key = label_name.strip().lower().replace("_", " ")
        key = aliases.get(key, key)
        lab = known.get(key)
        if lab is not None:
            entry = {"value": value, "name": lab.name, "color": list(lab.color), "category": lab.category.as_list(),
                     "type": lab.type.as_list()}
            if lab.type_modifier:
                entry["type_modifier"] = lab.type_modifier.as_list()
            if lab.context != SLICER_GENERAL_ANATOMY:
                entry["context"] = lab.context
        else:
            # Slicer's generic "Tissue" code when the bundle gives no code for the label.
            entry = {"value": value, "name": label_name, "color": _palette(value),
                     "category": ["SCT", "85756007", "Tissue"], "type": ["SCT", "85756007", "Tissue"]}
        labels.append(entry)

    references = meta.get("references", [])
    data = {
        "name": _card_name(root, meta, name),
        "title": str(meta.get("name") or root.name),
        "description": str(meta.get("description", "")),
        "modality": _modality(meta),
        "network": {"name": "SwinUNETR", "args": args},
        "preprocessing": pre,
        "inference": inference,
        "labels": labels,
        "license": str(meta.get("copyright", "")),
        "citation": "; ".join(references) if isinstance(references, list) else str(references),
        "checkpoint": {"source": f"MONAI bundle {root.name} {meta.get('version', '')}".strip()},
    }
    return card_from_dict(data, source=f"bundle {root}")


def _card_name(root: Path, meta: dict, name: str | None) -> str:
    """``name``, else the bundle's own name made lower case with ``_`` for spaces; it must be a
    usable model name (it becomes the catalog's file names)."""
    if name is not None:
        if not is_model_name(name):
            raise UserError(f"--name {name!r} is not a usable model name ({MODEL_NAME_RULE}); choose another")
        return name
    derived = str(meta.get("name") or root.name).lower().replace(" ", "_")
    if not is_model_name(derived):
        raise UserError(f"bundle {root.name}: its name {derived!r} (configs/metadata.json) is not a usable model name "
                        f"({MODEL_NAME_RULE}); pass --name NAME to import it under another name")
    return derived


def _modality(meta: dict) -> str:
    text = " ".join(str(meta.get(k, "")) for k in ("data_type", "task", "description", "intended_use")).lower()
    for key, modality in (("mri", "MR"), (" mr ", "MR"), ("ct", "CT")):
        if key in f" {text} ":
            return modality
    return "CT"


def _palette(value: int) -> list[int]:
    colors = [(128, 174, 128), (241, 214, 145), (177, 122, 101), (111, 184, 210), (216, 101, 79), (221, 130, 101),
              (144, 238, 144), (192, 104, 88), (220, 245, 20), (78, 63, 0), (255, 250, 220), (230, 220, 70)]
    return list(colors[value % len(colors)])


def import_bundle(bundle_dir: str | Path, name: str | None = None) -> ModelCard:
    """Add a bundle to the catalog: its card (with the SHA256 of models/model.pt) and its weights.

    Both or neither: when the weights cannot be installed, the card is taken out again.
    """
    from SwinUNETRSegmentLib.fileio.atomic import file_digest
    from SwinUNETRSegmentLib.models import catalog
    from SwinUNETRSegmentLib.models.checkpoint import load_model

    root = Path(bundle_dir)
    card = card_from_bundle(root, name)
    weights = root / "models" / "model.pt"
    if not weights.is_file():
        raise UserError(f"bundle {root.name}: models/model.pt is missing "
                        "(TorchScript model.ts is not used: it is code)")
    load_model(card, weights)  # weights_only, every key checked against the card
    data = card.to_json()
    data["checkpoint"]["sha256"] = file_digest(weights, "sha256")
    card_path = catalog.user_cards_dir() / f"{card.name}.json"
    had_card = card_path.is_file()
    card = catalog.add_card_data(data, source=f"bundle {root}")
    try:
        catalog.install_file(card.name, weights)
    except BaseException:
        if not had_card:
            card_path.unlink(missing_ok=True)
        raise
    return card
