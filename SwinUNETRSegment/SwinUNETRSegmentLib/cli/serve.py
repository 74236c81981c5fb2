"""``swinunetr-segment serve``: the engine as a service (FastAPI, run by uvicorn).

    swinunetr-segment serve                                   # 127.0.0.1:8765, token file made on first start
    swinunetr-segment serve --host 0.0.0.0 --port 8443 --tls-cert cert.pem --tls-key key.pem --models btcv
    swinunetr-segment serve ... --pacs https://pacs.example.org/dicom-web --pacs-auth /etc/swinunetr/pacs.auth

The models stay loaded between jobs; one job runs on a device at a time and the others
wait in a bounded queue (:mod:`SwinUNETRSegmentLib.service.jobs`). Every route but
``/health`` needs a bearer token from the token file (:mod:`SwinUNETRSegmentLib.service.auth`).
A server bound to any address but loopback needs a token (``--no-token`` is refused
there) and warns without TLS. The local engine process that the client starts for
3D Slicer is this command with ``--port 0 --ready-file F --stop-on-stdin-eof``.

``--pacs URL`` (repeatable) names a PACS (its DICOMweb root) that clients' DICOMweb jobs may
have the server fetch from and store to; ``--pacs-auth FILE`` after it gives that PACS's
credentials (the command line's file format; without it, ``$SWINUNETR_DICOMWEB_*``, else
none). Clients never send PACS credentials; a job naming a PACS not given here is refused
(:mod:`SwinUNETRSegmentLib.service.pacs`).
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import os
import socket
import sys
import threading
from pathlib import Path
from typing import Sequence

from SwinUNETRSegmentLib.cli.app import PROG
from SwinUNETRSegmentLib.errors import UserError
from SwinUNETRSegmentLib.service.protocol import (
    DEFAULT_HOST,
    DEFAULT_LEASE_S,
    DEFAULT_MAX_QUEUE,
    DEFAULT_MAX_UPLOAD_MB,
    DEFAULT_PORT,
    DEFAULT_RESULT_TTL_S,
)

__all__ = ["build_parser", "main", "is_loopback"]


class _Pacs(argparse.Action):
    """``--pacs URL`` adds a PACS; ``--pacs-auth FILE`` gives the last one its credentials."""

    def __call__(self, parser, namespace, value, option_string=None):
        entries = list(getattr(namespace, "pacs", None) or [])
        if option_string == "--pacs":
            entries.append((value, None))
        elif not entries or entries[-1][1] is not None:
            raise UserError("--pacs-auth FILE goes after the --pacs URL whose credentials it holds "
                            "(--pacs URL --pacs-auth FILE, once per PACS)")
        else:
            entries[-1] = (entries[-1][0], value)
        namespace.pacs = entries


def build_parser(parser_class: type = argparse.ArgumentParser) -> argparse.ArgumentParser:
    p = parser_class(prog=f"{PROG} serve", description="Run the segmentation engine as an HTTP service "
                     "(models kept loaded; bearer token; TLS).")
    p.add_argument("--host", default=DEFAULT_HOST,
                   help=f"address to listen on (default: {DEFAULT_HOST}; any other needs a token)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default: {DEFAULT_PORT}; 0: any free port)")
    p.add_argument("--token-file", metavar="F",
                   help="bearer tokens, one a line (optionally 'NAME TOKEN'); made with one random token and mode "
                        "0600 if missing (default: <catalog home>/server-token)")
    p.add_argument("--no-token", action="store_true", help="serve without authentication (loopback only)")
    p.add_argument("--tls-cert", metavar="C", help="TLS certificate chain (PEM); with --tls-key")
    p.add_argument("--tls-key", metavar="K", help="TLS private key (PEM)")
    p.add_argument("--models", nargs="+", metavar="NAME",
                   help="models to serve (default: every catalog model whose weights are here)")
    p.add_argument("--max-upload-mb", type=float, default=DEFAULT_MAX_UPLOAD_MB,
                   help=f"largest upload accepted, MB as sent (default: {DEFAULT_MAX_UPLOAD_MB:g})")
    p.add_argument("--max-queue", type=int, default=DEFAULT_MAX_QUEUE,
                   help=f"jobs that may wait besides the running ones; more get 503 (default: {DEFAULT_MAX_QUEUE})")
    p.add_argument("--lease-s", type=float, default=DEFAULT_LEASE_S,
                   help=f"cancel a job whose client has not polled for this long (default: {DEFAULT_LEASE_S:g})")
    p.add_argument("--result-ttl-s", type=float, default=DEFAULT_RESULT_TTL_S,
                   help=f"drop a finished job nobody fetched after this long (default: {DEFAULT_RESULT_TTL_S:g})")
    p.add_argument("--pacs", metavar="URL", action=_Pacs, default=None,
                   help="a PACS (DICOMweb root) that clients' DICOMweb jobs may fetch from and store to (repeatable); "
                        "jobs naming any other are refused")
    p.add_argument("--pacs-auth", metavar="FILE", action=_Pacs, dest="pacs",
                   help="after --pacs URL: that PACS's credentials, a file holding 'Bearer TOKEN' or 'USER:PASSWORD' "
                        "(default: $SWINUNETR_DICOMWEB_TOKEN or _USER/_PASSWORD, else none)")
    p.add_argument("--backend", choices=("auto", "torch", "openvino"), default="auto",
                   help="what runs the networks on a CPU: auto = OpenVINO where a model is converted (in the "
                   "background after its first job, or during a long job; once per checkpoint and machine), "
                   "else PyTorch; openvino = convert before the first job")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    p.add_argument("--ready-file", metavar="F", help=argparse.SUPPRESS)  # the local engine: where the port goes
    p.add_argument("--stop-on-stdin-eof", action="store_true", help=argparse.SUPPRESS)  # ends with its parent
    return p


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _say(text: str) -> None:
    print(f"{PROG} serve: {text}", file=sys.stderr, flush=True)


def _check(args: argparse.Namespace):
    """Everything that can be refused before a socket is opened; returns the token store."""
    from SwinUNETRSegmentLib.service import auth

    loopback = is_loopback(args.host)
    if args.no_token and not loopback:
        raise UserError(f"refusing to serve {args.host} without a token: anyone who reaches it could run jobs and "
                        "read results; drop --no-token (a token file is made for you) or serve 127.0.0.1")
    if bool(args.tls_cert) != bool(args.tls_key):
        raise UserError("give both --tls-cert and --tls-key (the certificate and its private key), or neither")
    for f in (args.tls_cert, args.tls_key):
        if f and not Path(f).is_file():
            raise UserError(f"TLS file not found: {f}")
    if args.max_upload_mb <= 0 or args.max_queue < 0 or args.lease_s <= 0 or args.result_ttl_s <= 0:
        raise UserError("--max-upload-mb, --lease-s and --result-ttl-s must be positive, --max-queue at least 0")
    if not 0 <= args.port <= 65535:
        raise UserError(f"--port must be 0..65535, got {args.port}")
    from SwinUNETRSegmentLib.service.pacs import PacsRegistry

    args.pacs = PacsRegistry(args.pacs or ())
    args.pacs.check()  # an unreadable credentials file or a bad URL: one line now, not at the first job
    if args.models:
        from SwinUNETRSegmentLib.models.catalog import resolve_model

        for name in args.models:
            resolve_model(name)  # unknown, or weights missing: one line now, not at the first job
    if args.no_token:
        return None
    path, made = auth.ensure_token_file(args.token_file or auth.default_token_file())
    store = auth.TokenStore(path)
    if made:
        _say(f"made a token file {path} (mode 0600); give its token to the users of this server")
    elif not auth.private(path):
        _say(f"warning: token file {path} can be read by other users; chmod 600 {path}")
    if not loopback and not args.tls_cert:
        _say(f"warning: serving {args.host} over plain HTTP: tokens and scans cross the network unencrypted; "
             "give --tls-cert and --tls-key, or put a TLS proxy in front")
    return store


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port} ({exc.strerror or exc}); choose another --port or --host") \
            from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("swinunetr-segment")
    except PackageNotFoundError:
        return "0"


def main(argv: Sequence[str], parser_class: type = argparse.ArgumentParser) -> int:
    args = build_parser(parser_class).parse_args(list(argv))
    tokens = _check(args)
    import uvicorn

    from SwinUNETRSegmentLib.fileio.atomic import atomic_write_text
    from SwinUNETRSegmentLib.service.jobs import JobManager
    from SwinUNETRSegmentLib.service.server import ServerConfig, create_app

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(message)s",
                        stream=sys.stderr)
    manager = JobManager(args.models, args.max_queue, args.lease_s, args.result_ttl_s, backend=args.backend)
    app = create_app(manager, tokens, ServerConfig(args.max_upload_mb, is_loopback(args.host), _version(), args.pacs))
    sock = _listen(args.host, args.port)
    port = sock.getsockname()[1]
    scheme = "https" if args.tls_cert else "http"
    url = f"{scheme}://{'[' + args.host + ']' if ':' in args.host else args.host}:{port}"
    config = uvicorn.Config(app, ssl_certfile=args.tls_cert, ssl_keyfile=args.tls_key, log_level=args.log_level,
                            access_log=False, timeout_keep_alive=30, limit_concurrency=256, lifespan="off")
    server = uvicorn.Server(config)

    def when_started() -> None:
        while not server.started and not server.should_exit:
            threading.Event().wait(0.05)
        if server.started:
            _say(f"listening on {url} (models: {', '.join(manager.served()) or 'none yet'}; "
                 f"token file: {tokens.path if tokens else 'none'}"
                 f"{'; PACS: ' + ', '.join(args.pacs.urls()) if len(args.pacs) else ''})")
            if args.ready_file:
                atomic_write_text(args.ready_file, json.dumps({"url": url, "port": port, "pid": os.getpid()}))
        _preload()

    def watch_stdin() -> None:
        try:
            while sys.stdin.buffer.read(4096):
                pass
        except Exception:  # no stdin at all (None), or closed: the parent is gone all the same
            pass
        server.should_exit = True  # the parent is gone (its end of the pipe closed)

    threading.Thread(target=when_started, name="swinunetr-started", daemon=True).start()
    if args.stop_on_stdin_eof:
        threading.Thread(target=watch_stdin, name="swinunetr-stdin", daemon=True).start()
    try:
        server.run(sockets=[sock])
    finally:
        manager.close(timeout=10)
        sock.close()
    return 0


def _preload() -> None:
    """torch, MONAI and the engine imported while no job waits, so that the first job does not wait for them."""
    from SwinUNETRSegmentLib.service.jobs import import_engine

    try:
        import_engine()
    except ImportError as exc:
        _say(f"warning: the engine cannot be imported ({exc}); jobs will fail until it is installed")
