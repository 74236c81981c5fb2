"""HTTP/1.1 exchanges that never block: Slicer's main thread moves them on a few milliseconds
at a time from a QTimer, with no thread.

Slicer's main thread holds the interpreter lock while its event loop waits, so a Python
thread in Slicer's process runs only when the main thread runs Python; and a blocking
request (``requests``) would freeze the GUI for as long as the server takes to answer. An
:class:`Exchange` is one request and its response on its own connection with a
non-blocking socket (TLS through :mod:`ssl`): :meth:`Exchange.step` sends and receives
what the socket takes or has right now, within a time budget, and returns.

Only the standard library; errors are the service client's one-line ``ServiceError``.
"""

from __future__ import annotations

import errno
import json
import os
import select
import socket
import ssl
import time
from typing import Any, Callable, Iterator, Optional
from urllib.parse import urlsplit

from SwinUNETRSegmentLib.service.client import ServiceError

#: Bytes handed to a response's sink per call, so that one call stays short (gzip of labels that are mostly
#: background expands up to a thousandfold).
SINK_PIECE = 1 << 14
#: Bytes read from or written to the socket per call.
IO_PIECE = 1 << 20


def ssl_context(verify: Any = True) -> ssl.SSLContext:
    """A client TLS context: the CA bundle named by ``verify`` (a path), else the one in
    ``REQUESTS_CA_BUNDLE``, else certifi's (Slicer ships it), else the system's; ``False``
    turns verification off (a test server)."""
    if verify is False:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        return ctx
    cafile = verify if isinstance(verify, str) else os.environ.get("REQUESTS_CA_BUNDLE") or None
    if cafile is None:
        try:
            import certifi

            cafile = certifi.where()
        except ImportError:
            cafile = None
    return ssl.create_default_context(cafile=cafile)


class Exchange:
    """One request on a fresh connection; :meth:`step` moves it on without blocking.

    Args:
        url: the server, ``http(s)://host:port``.
        method, path: the request line (path with its query).
        headers: more request headers (``Authorization``...).
        body: bytes, or an iterator of byte pieces (an empty piece means "nothing ready
            yet, ask again next step"), sent chunked unless ``length`` gives their total.
        length: the total size of an iterator ``body`` when known (sent as Content-Length).
        sink: called with each piece of the response body instead of collecting it.
        timeout: seconds the exchange may go without a byte moving before it fails.
        context: the TLS context for https (:func:`ssl_context` when None).
    """

    def __init__(self, url: str, method: str, path: str, headers: Optional[dict[str, str]] = None,
                 body: bytes | Iterator[bytes] | None = None, length: Optional[int] = None,
                 sink: Optional[Callable[[bytes], None]] = None,
                 timeout: float = 15.0, context: Optional[ssl.SSLContext] = None,
                 clock: Callable[[], float] = time.monotonic):
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ServiceError(f"server URL {url!r} is not http(s)://HOST:PORT")
        self.url, self.method, self.path = url.rstrip("/"), method, path
        self._host, self._tls = parts.hostname, parts.scheme == "https"
        self._port = parts.port or (443 if self._tls else 80)
        self._context = context if context is not None or not self._tls else ssl_context()
        self._sink, self.timeout, self._clock = sink, timeout, clock
        streamed = body is not None and not isinstance(body, (bytes, bytearray, memoryview))
        chunked = streamed and length is None
        head = [f"{method} {path} HTTP/1.1", f"Host: {parts.netloc}", "Connection: close", "Accept: */*"]
        for key, value in (headers or {}).items():
            head.append(f"{key}: {value}")
        if chunked:
            head.append("Transfer-Encoding: chunked")
        elif body is not None:
            head.append(f"Content-Length: {length if streamed else len(body)}")
        self._out = bytearray(("\r\n".join(head) + "\r\n\r\n").encode("latin-1"))
        self._body: Optional[Iterator[bytes]] = iter(body) if streamed else None
        self._chunked = chunked
        if body is not None and not streamed:
            self._out += body
        self.sent = 0
        self._sock: Optional[socket.socket] = None
        self._state = "connect"
        self._in = bytearray()
        self._pending = bytearray()  # body bytes not yet handed to the sink
        self._body_left: Optional[int] = None
        self._chunked_in = False
        self._chunk_left = 0
        self.status: Optional[int] = None
        self.headers: dict[str, str] = {}
        self.body = bytearray()
        self.error: Optional[ServiceError] = None
        self.done = False
        self._last = clock()

    # ---- public -----------------------------------------------------------------------
    @property
    def sending(self) -> bool:
        return self._state in ("connect", "connecting", "handshake", "send")

    def step(self, budget: float = 0.005) -> bool:
        """Move the exchange on for at most about ``budget`` seconds; True once it is over
        (then :attr:`status`, :attr:`headers`, :attr:`body` or :attr:`error` hold the answer)."""
        if self.done:
            return True
        end = self._clock() + budget
        try:
            while not self.done:
                moved = self._advance()
                if moved:
                    self._last = self._clock()
                elif self._clock() - self._last > self.timeout:
                    raise ServiceError(f"{self.url} did not answer within {self.timeout:g} s; it may be overloaded, "
                                       "try again later")
                if not moved or self._clock() >= end:
                    break
        except ServiceError as exc:
            self._fail(exc)
        except ssl.SSLCertVerificationError as exc:
            self._fail(ServiceError(f"TLS with {self.url} failed ({exc.verify_message or exc}); if its certificate "
                                    "comes from your own CA, set REQUESTS_CA_BUNDLE to the CA's file"))
        except (OSError, ssl.SSLError) as exc:
            reason = exc.strerror or str(exc) or type(exc).__name__
            self._fail(ServiceError(f"cannot reach the engine at {self.url} ({reason}); check the URL and that the "
                                    "server runs"))
        return self.done

    def json(self) -> Any:
        """The answer as JSON; a ServiceError for an error status or a failed exchange."""
        self.raise_for_status()
        try:
            return json.loads(bytes(self.body).decode("utf-8"))
        except ValueError:
            raise ServiceError(f"{self.url} answered {self.path} with no JSON; is it a swinunetr-segment engine?") \
                from None

    def raise_for_status(self) -> None:
        if self.error is not None:
            raise self.error
        if not self.done:
            raise RuntimeError("the exchange is not over")
        if self.status >= 400:
            try:
                detail = json.loads(bytes(self.body).decode("utf-8")).get("detail")
            except (ValueError, AttributeError):
                detail = None
            detail = " ".join(str(detail or bytes(self.body[:500]).decode("latin-1") or self.status).split())[:500]
            if self.status == 404 and detail == "Not Found":
                detail = f"{self.url} is no swinunetr-segment engine (no such route)"
            raise ServiceError(detail, self.status)

    def close(self) -> None:
        """Drop the connection (an upload in progress is abandoned: the server makes no job)."""
        if self._sock is not None:
            try:
                self._sock.close()
            except OSError:
                pass
            self._sock = None
        if not self.done:
            self._fail(ServiceError("cancelled"))

    # ---- the state machine ---------------------------------------------------------------
    def _fail(self, exc: ServiceError) -> None:
        self.error, self.done = exc, True
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _finish(self) -> None:
        self.done = True
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _advance(self) -> bool:
        """One move; False when the socket has nothing for us right now."""
        state = self._state
        if state == "connect":
            family, kind, proto, _name, address = socket.getaddrinfo(self._host, self._port, type=socket.SOCK_STREAM)[0]
            self._sock = socket.socket(family, kind, proto)
            self._sock.setblocking(False)
            code = self._sock.connect_ex(address)
            if code not in (0, errno.EINPROGRESS, errno.EWOULDBLOCK, getattr(errno, "WSAEWOULDBLOCK", errno.EAGAIN)):
                raise OSError(code, os.strerror(code))
            self._state = "connecting"
            return True
        if state == "connecting":
            _, writable, _ = select.select([], [self._sock], [], 0)
            if not writable:
                return False
            code = self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if code:
                raise OSError(code, os.strerror(code))
            if self._tls:
                self._sock = self._context.wrap_socket(self._sock, server_hostname=self._host,
                                                       do_handshake_on_connect=False)
                self._state = "handshake"
            else:
                self._state = "send"
            return True
        if state == "handshake":
            try:
                self._sock.do_handshake()
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                return False
            self._state = "send"
            return True
        if state == "send":
            return self._send()
        if state == "flush":
            self._feed()
            return True
        return self._receive()

    def _send(self) -> bool:
        if not self._out and self._body is not None:
            piece = next(self._body, None)
            if piece is None:
                if self._chunked:
                    self._out += b"0\r\n\r\n"
                self._body = None
            elif piece and self._chunked:
                self._out += f"{len(piece):x}\r\n".encode("ascii") + piece + b"\r\n"
            elif piece:
                self._out += piece
            else:
                return False  # the producer has nothing ready yet
        if not self._out:
            if self._body is None:
                self._state = "receive"
            return True
        try:
            n = self._sock.send(memoryview(self._out)[:IO_PIECE])
        except (BlockingIOError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
            return self._early_answer()
        except (BrokenPipeError, ConnectionResetError):
            return self._early_answer(closed=True)
        del self._out[:n]
        self.sent += n
        return n > 0

    def _early_answer(self, closed: bool = False) -> bool:
        """A server may answer (413, 401) before it read the whole body: read that answer."""
        readable, _, _ = select.select([self._sock], [], [], 0)
        if readable or closed:
            self._state = "receive"
            self._out.clear()
            self._body = None
            return True
        return False

    def _receive(self) -> bool:
        if self._pending and self._sink is not None:
            self._feed()
            return True
        try:
            data = self._sock.recv(IO_PIECE)
        except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return False
        if not data:
            if self.status is not None and self._body_left is None and not self._chunked_in:
                self._flush_and_finish()  # a body that ends with the connection
                return True
            raise ServiceError(f"{self.url} closed the connection before it answered {self.path}")
        if self.status is None:
            self._in += data
            end = self._in.find(b"\r\n\r\n")
            if end < 0:
                if len(self._in) > 65536:
                    raise ServiceError(f"{self.url} sent no HTTP answer")
                return True
            self._headers(bytes(self._in[:end]).decode("latin-1"))
            data = bytes(self._in[end + 4:])
            self._in.clear()
        self._body_bytes(data)
        return True

    def _headers(self, text: str) -> None:
        lines = text.split("\r\n")
        parts = lines[0].split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
            raise ServiceError(f"{self.url} sent no HTTP answer ({lines[0][:60]!r})")
        self.status = int(parts[1])
        for line in lines[1:]:
            key, _, value = line.partition(":")
            self.headers[key.strip().lower()] = value.strip()
        self._chunked_in = "chunked" in self.headers.get("transfer-encoding", "").lower()
        length = self.headers.get("content-length")
        self._body_left = int(length) if length and length.isdigit() and not self._chunked_in else None
        if self.method == "HEAD" or self.status in (204, 304):
            self._body_left = 0
        if self.status >= 400:
            self._sink = None  # an error's detail is collected, not decoded as a volume

    def _body_bytes(self, data: bytes) -> None:
        if not self._chunked_in:
            if self._body_left is not None:
                data = data[: self._body_left]
                self._body_left -= len(data)
            self._collect(data)
            if self._body_left == 0:
                self._flush_and_finish()
            return
        self._in += data
        while not self.done and self._state != "flush":
            if self._chunk_left > 0:  # inside a chunk's data
                take = min(self._chunk_left, len(self._in))
                if take == 0:
                    return
                self._collect(bytes(self._in[:take]))
                del self._in[:take]
                self._chunk_left -= take
                continue
            end = self._in.find(b"\r\n")
            if end < 0:
                return
            line = bytes(self._in[:end])
            del self._in[:end + 2]
            if not line:
                continue  # the CRLF after a chunk's data
            size = int(line.split(b";")[0].strip() or b"0", 16)
            if size == 0:
                self._flush_and_finish()
                return
            self._chunk_left = size

    def _collect(self, data: bytes) -> None:
        if self._sink is None:
            self.body += data
        else:
            self._pending += data

    def _feed(self) -> None:
        piece = bytes(self._pending[:SINK_PIECE])
        del self._pending[:SINK_PIECE]
        try:
            self._sink(piece)
        except ServiceError:
            raise
        except Exception as exc:  # the decoder refused the bytes
            raise ServiceError(f"{self.url} sent a result this module cannot read ({exc})") from None
        if not self._pending and self._state == "flush":
            self._finish()

    def _flush_and_finish(self) -> None:
        """The whole body is in; what the sink has not had yet goes to it over the next steps."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._pending and self._sink is not None:
            self._state = "flush"
        else:
            self._finish()
