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
    import os
    import sys

    from SwinUNETRSegmentLib.inference.memory import REEXEC_MARK, reexec_with_allocator

    if not os.environ.get(REEXEC_MARK):  # the process its allocator was chosen for: no second look
        argv = sys.argv[1:]
        # a run on a conversion runs on OpenVINO: the checkpoint is hashed once, not twice
        converted = runs_on_a_conversion(argv)
        reexec_with_allocator(openvino=converted or runs_on_openvino(argv), converted=converted)
    return main()


def runs_on_openvino(argv: list[str]) -> bool:
    """Whether this command line may run a network on OpenVINO (then it keeps the system
    allocator: inference/memory.py): ``serve`` where openvino is installed (the service
    converts in the background), a segmentation with ``--backend openvino``, and one with the
    default backend on the CPU that runs on a cached conversion or may convert during the run
    (``openvino_backend.ConvertWhenItPays``, which cannot run beside jemalloc). On a CPU with
    native bfloat16 an unconverted run converts only with a large model (:func:`may_convert_in_a_run`):
    a small one keeps jemalloc, 9 % faster for PyTorch (benchmarks/README.md, session 7).
    Anything unclear: False."""
    from SwinUNETRSegmentLib.inference.memory import openvino_installed

    if not openvino_installed() or "--backend=torch" in argv or "torch" in _values(argv, "--backend"):
        return False
    if argv[:1] == ["serve"]:
        return True
    if "openvino" in _values(argv, "--backend"):
        return True
    if argv[:1] and not argv[0].startswith("-"):
        return False  # another command (models, train, demo, ...)
    try:
        from SwinUNETRSegmentLib.cli.segment import build_parser
        from SwinUNETRSegmentLib.inference.devices import cpu_flags_have_bf16

        args, _ = build_parser().parse_known_args(argv)
        if args.device not in ("auto", "cpu") or args.precision == "float32" or getattr(args, "server", None):
            return False
        if not cpu_flags_have_bf16():
            return True  # a long run converts once that pays (40 % saved without bfloat16)
        from SwinUNETRSegmentLib.cli.segment import _card

        return may_convert_in_a_run(_card(args)) or _cached_conversion(args)
    except BaseException:  # noqa: B036 - argparse exits, a bad card raises: the run itself will say so
        return False


def runs_on_a_conversion(argv: list[str]) -> bool:
    """Whether this segmentation will run on a cached OpenVINO conversion from its first
    window (then no PyTorch window needs glibc's raised thresholds: memory.allocator_env).
    ``serve`` and anything unclear: False."""
    if argv[:1] and not argv[0].startswith("-"):
        return False  # serve (its first job may run on PyTorch), models, train, ...
    try:
        from SwinUNETRSegmentLib.cli.segment import build_parser

        args, _ = build_parser().parse_known_args(argv)
        if args.device not in ("auto", "cpu") or args.precision == "float32" or getattr(args, "server", None):
            return False
        if args.backend == "torch":
            return False
        return _cached_conversion(args)
    except BaseException:  # noqa: B036 - argparse exits, a bad card raises: the run itself will say so
        return False


#: the SwinUNETR feature size from which a run on a CPU with native bfloat16 may convert for
#: OpenVINO (:func:`may_convert_in_a_run`)
CONVERTS_FROM_FEATURE_SIZE = 24


def may_convert_in_a_run(card) -> bool:
    """Whether a run of ``card``'s model on a CPU with native bfloat16 may convert for OpenVINO
    midway (and so must not start on jemalloc). OpenVINO saves 40 % of a feature-48 run there
    (session 11: 100 s against 166 s on the hold-out chest CT), which pays for the conversion
    (22 s) from about 30 windows on, a run of most CTs at the btcv cards' 1.5 mm; the demo
    model (feature size 12: a 7.5-s conversion against 0.3-s windows) would need over 85
    windows, more than a 512 x 512 x 300 CT gives at its 3 mm, and keeps jemalloc."""
    return int(card.network_args.get("feature_size", 0) or 0) >= CONVERTS_FROM_FEATURE_SIZE


def _cached_conversion(args) -> bool:
    """The parsed command line's model has an OpenVINO conversion in the cache."""
    from SwinUNETRSegmentLib.cli.segment import _model
    from SwinUNETRSegmentLib.inference.cpu.openvino_backend import Conversion, cache_root

    if not any(cache_root().glob("*/model.xml")):
        return False  # nothing converted on this machine: no need to hash the checkpoint
    card, weights = _model(args)
    return weights is not None and Conversion(card, weights).converted


def _values(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == flag] + [
        a.split("=", 1)[1] for a in argv if a.startswith(flag + "=")
    ]
