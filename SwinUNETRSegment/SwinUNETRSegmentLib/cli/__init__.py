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
    import sys

    from SwinUNETRSegmentLib.inference.memory import reexec_with_allocator

    reexec_with_allocator(openvino=runs_on_openvino(sys.argv[1:]))
    return main()


def runs_on_openvino(argv: list[str]) -> bool:
    """Whether this command line may run a network on OpenVINO (then it keeps the system
    allocator: inference/memory.py): ``serve`` where openvino is installed (the service
    converts in the background), and a CPU segmentation with the default or the openvino
    backend: it runs on a cached conversion, or converts in the run when that pays
    (``openvino_backend.ConvertWhenItPays``), which it cannot do beside jemalloc. Measured
    on the built-in model's PyTorch path: jemalloc is 9 % faster there for 30 % more peak
    memory (benchmarks/README.md, session 7). Anything unclear: False."""
    from SwinUNETRSegmentLib.inference.memory import openvino_installed

    if not openvino_installed() or "--backend=torch" in argv or "torch" in _values(argv, "--backend"):
        return False
    if argv[:1] == ["serve"]:
        return True
    if argv[:1] and not argv[0].startswith("-"):
        return False  # another command (models, train, demo, ...)
    try:
        from SwinUNETRSegmentLib.cli.segment import build_parser

        args, _ = build_parser().parse_known_args(argv)
        return args.device in ("auto", "cpu") and args.precision != "float32" and not getattr(args, "server", None)
    except BaseException:  # noqa: B036 - argparse exits: the run itself will say so
        return False


def _values(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == flag] + [
        a.split("=", 1)[1] for a in argv if a.startswith(flag + "=")
    ]
