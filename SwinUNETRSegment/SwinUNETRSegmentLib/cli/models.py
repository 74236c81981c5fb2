"""``swinunetr-segment models list | info NAME | download NAME | install NAME FILE | convert NAME | remove NAME |
add CARD | import-bundle DIR``: the model catalog (:mod:`SwinUNETRSegmentLib.models.catalog`) from the shell.

Each action writes all of its files or none (they go through ``fileio.atomic``).
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from SwinUNETRSegmentLib.errors import UserError
from SwinUNETRSegmentLib.models import catalog

__all__ = ["build_parser", "main"]

_HEADERS = ("NAME", "MODALITY", "LABELS", "WEIGHTS")


def build_parser(parser_class: type = argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The ``models`` command's parser, one subcommand per action."""
    p = parser_class(prog="swinunetr-segment models", description="Model catalog: cards and verified weights.")
    sub = p.add_subparsers(dest="action", required=True, parser_class=parser_class)
    sub.add_parser("list", help="every model, and whether its weights are on this machine")
    s = sub.add_parser("info", help="a model's card: labels, licence, citation, checkpoint")
    s.add_argument("name")
    s = sub.add_parser("download", help="download and verify a model's weights")
    s.add_argument("name")
    s.add_argument("--url", help="another address of the same file (a mirror); the checksum is still the card's")
    s.add_argument("--sha256", help="the SHA256 you trust, for a card whose publisher gives no checksum")
    s = sub.add_parser("install", help="verify and install weights you copied by hand")
    s.add_argument("name")
    s.add_argument("file")
    s.add_argument("--sha256", help="the SHA256 you trust, for a card whose publisher gives no checksum")
    s = sub.add_parser("convert", help="convert a model for OpenVINO now (CPU runs get faster; done once per "
                       "checkpoint, and after download and install)")
    s.add_argument("name")
    s = sub.add_parser("remove", help="delete a model's downloaded weights")
    s.add_argument("name")
    s = sub.add_parser("add", help="add a model card (JSON) to your catalog")
    s.add_argument("card")
    s = sub.add_parser("import-bundle", help="add a MONAI bundle folder (configs/, models/model.pt) to your catalog")
    s.add_argument("folder")
    s.add_argument("--name", help="catalog name (default: the bundle's)")
    return p


def main(argv: Sequence[str], parser_class: type = argparse.ArgumentParser) -> int:
    """Run one ``models`` action; returns the exit code (errors are raised as UserError)."""
    args = build_parser(parser_class).parse_args(list(argv))
    if args.action == "list":
        rows = []
        for name in catalog.model_names():
            card = catalog.card_of(name)
            if card.checkpoint.get("bundled"):
                state = "bundled"
            else:
                state = "installed" if catalog.is_installed(card) else "not installed"
            rows.append((name, card.modality, str(len(card.labels)), state, card.title))
        widths = [max(len(r[i]) for r in rows + [(*_HEADERS, "")]) for i in range(4)]
        print("  ".join(h.ljust(w) for h, w in zip(_HEADERS, widths, strict=True)) + "  TITLE")
        for r in rows:
            print("  ".join(c.ljust(w) for c, w in zip(r[:4], widths, strict=True)) + "  " + r[4])
    elif args.action == "info":
        card = catalog.card_of(args.name)
        print(f"{card.name}: {card.title}")
        if card.description:
            print(card.description)
        print(f"modality: {card.modality}")
        print(f"network: {card.network} {card.network_args}")
        print(f"preprocessing: {card.orientation}, spacing {list(card.spacing)} mm, intensity {card.intensity}")
        print(f"windows: {list(card.roi_size)}, overlap {card.overlap}")
        print("labels: " + ", ".join(f"{lab.value} {lab.name}" for lab in card.labels))
        if card.license:
            print(f"licence: {card.license}")
        if card.citation:
            print(f"citation: {card.citation}")
        ck = card.checkpoint
        if ck.get("url"):
            print(f"checkpoint: {ck['url']}")
        for algo in catalog.CHECKSUMS:
            if ck.get(algo):
                print(f"{algo}: {ck[algo]}")
        where = "present" if catalog.is_installed(card) else "not on this machine"
        print(f"weights: {catalog.installed_path(card)} ({where})")
        if card.training.get("dice"):
            print("Dice: " + ", ".join(f"{k} {v:.3f}" for k, v in card.training["dice"].items()))
    elif args.action == "download":
        path = catalog.download(args.name, progress=_bar(), url=args.url, sha256=args.sha256)
        print(path)
        _convert(args.name, quiet_when_unavailable=True)
    elif args.action == "install":
        print(catalog.install_file(args.name, args.file, sha256=args.sha256))
        _convert(args.name, quiet_when_unavailable=True)
    elif args.action == "convert":
        return _convert(args.name, quiet_when_unavailable=False)
    elif args.action == "remove":
        path = catalog.remove(args.name)
        print(f"removed {path}" if path else f"model '{args.name}' has no downloaded weights here")
    elif args.action == "import-bundle":
        from SwinUNETRSegmentLib.models.bundle import import_bundle

        card = import_bundle(args.folder, args.name)
        print(f"imported model '{card.name}' ({len(card.labels)} labels)")
    elif args.action == "add":
        card = catalog.add_card(args.card)
        print(f"added model '{card.name}'")
    return 0


def _convert(name: str, quiet_when_unavailable: bool) -> int:
    """Convert a model's weights for OpenVINO (inference/cpu/openvino_backend.py): one line
    with the time it took, or why it was not converted; the model works either way."""
    import time

    from SwinUNETRSegmentLib.inference.cpu import openvino_backend
    from SwinUNETRSegmentLib.inference.engine import Segmenter

    if not openvino_backend.available():
        if quiet_when_unavailable:
            return 0
        raise UserError("converting needs the openvino package: pip install openvino")
    card, weights = catalog.resolve_model(name)
    segmenter = Segmenter(card, weights, device="cpu")
    if segmenter.openvino.converted:
        print(f"model '{name}' is converted for OpenVINO ({openvino_backend.ir_path(segmenter.openvino.key).parent})")
        return 0
    print(f"converting model '{name}' for OpenVINO (once per checkpoint) ...", flush=True)
    t = time.perf_counter()
    try:
        path = segmenter.openvino.convert()
    except Exception:  # OpenVINO's frontends raise many types; the reason is kept in .failed
        path = None
    if path is None:
        print(f"model '{name}' was not converted for OpenVINO ({segmenter.openvino.failed}); it runs on PyTorch",
              file=sys.stderr)
        return 0 if quiet_when_unavailable else 2
    print(f"converted in {time.perf_counter() - t:.0f} s: {path.parent}")
    return 0


def _bar():
    if not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    bar = tqdm(unit="B", unit_scale=True, file=sys.stderr, leave=False)

    def update(done, total):
        if total and bar.total != total:
            bar.total = total
        bar.n = done
        bar.refresh()

    return update
