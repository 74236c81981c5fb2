"""The command line's ``--server URL``: a segmenter whose work an engine service does.

``swinunetr-segment -i ct.nii.gz -o ct.seg.nrrd --server https://host:8443 --token-file tok``
reads the scan here, uploads it, and writes the labels the server sends back with the same
writers as a local run, so the files are the same (the labels byte for byte). The token
comes from ``--token-file``, else ``SWINUNETR_SEGMENT_TOKEN``, else the token file a
server on this machine made (``<catalog home>/server-token``).
"""

from __future__ import annotations

import argparse
import os
import threading
from pathlib import Path
from typing import Optional

from SwinUNETRSegmentLib.errors import UserError
from SwinUNETRSegmentLib.geometry import Volume
from SwinUNETRSegmentLib.inference.api import SegmentationResult
from SwinUNETRSegmentLib.models.cards import ModelCard, card_from_dict
from SwinUNETRSegmentLib.progress import ProgressCallback
from SwinUNETRSegmentLib.service.client import Client, ServiceError
from SwinUNETRSegmentLib.service.protocol import JobOptions

__all__ = ["RemoteSegmenter", "server_client", "remote_model", "remote_segmenter"]

TOKEN_ENV = "SWINUNETR_SEGMENT_TOKEN"


def server_client(args: argparse.Namespace) -> Client:
    """The client of ``--server`` with its token."""
    from SwinUNETRSegmentLib.service.auth import default_token_file

    if args.token_file:
        if not Path(args.token_file).expanduser().is_file():
            raise UserError(f"token file not found: {args.token_file}")
        return Client.from_token_file(args.server, Path(args.token_file).expanduser())
    if os.environ.get(TOKEN_ENV):
        return Client(args.server, os.environ[TOKEN_ENV].strip())
    if default_token_file().is_file():
        return Client.from_token_file(args.server, default_token_file())
    raise UserError(f"--server {args.server} needs a token: give --token-file F (the token the server's "
                    f"administrator gave you) or set {TOKEN_ENV}")


class RemoteSegmenter:
    """:class:`~SwinUNETRSegmentLib.inference.api.SegmenterProtocol` over a service."""

    loaded = True

    def __init__(self, client: Client, card: ModelCard, options: JobOptions):
        self.client, self.card, self.options = client, card, options

    def segment(self, volume: Volume, progress: Optional[ProgressCallback] = None,
                cancel: Optional[threading.Event] = None) -> SegmentationResult:
        res = self.client.segment(volume.array, volume.ijk_to_ras, options=self.options, progress=progress,
                                  cancel=cancel)
        labels = Volume(res.labels, volume.ijk_to_ras.copy())
        if tuple(res.labels.shape) != volume.shape or not Volume(res.labels, res.ijk_to_ras).same_grid(labels):
            raise ServiceError(f"{self.client.url} sent labels on another grid than the scan's; "
                               "is the server a swinunetr-segment of the same version?")
        return SegmentationResult(labels, self.card, f"{res.device} at {self.client.url}", res.timings, res.stats)


def remote_model(args: argparse.Namespace) -> tuple[ModelCard, None]:
    """The card of ``--model`` as the server has it (no weights here: the server has them)."""
    if args.card or args.checkpoint:
        raise UserError("--card and --checkpoint run only here; with --server give --model NAME of a model the "
                        "server has (swinunetr-segment models add/install on the server)")
    if args.overlap is not None and not 0 <= args.overlap < 1:
        raise UserError(f"--overlap must be at least 0 and less than 1, got {args.overlap}")
    if args.sw_batch_size is not None and args.sw_batch_size < 1:
        raise UserError(f"--sw-batch-size must be at least 1, got {args.sw_batch_size}")
    from SwinUNETRSegmentLib.models.catalog import DEFAULT_MODEL

    name = args.model or DEFAULT_MODEL
    entry = server_client(args).model(name)
    return card_from_dict(entry["card"], source=f"{args.server} model {name}"), None


def remote_segmenter(args: argparse.Namespace, card: ModelCard) -> RemoteSegmenter:
    from SwinUNETRSegmentLib.models.catalog import DEFAULT_MODEL

    options = JobOptions(model=args.model or DEFAULT_MODEL, device=args.device, overlap=args.overlap,
                         precision=getattr(args, "precision", "auto"), sw_batch_size=args.sw_batch_size)
    return RemoteSegmenter(server_client(args), card, options)
