"""The HTTP(S) transfer of a checkpoint: streamed, resumed after a dropped connection.

:func:`fetch` only moves bytes into the file it is given; :func:`SwinUNETRSegmentLib.models.catalog.download`
gives it a temporary file, checks the checksum and installs the file, or deletes it.
Proxies are honoured through the usual ``HTTP(S)_PROXY`` variables.
"""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable, Optional

from SwinUNETRSegmentLib.errors import UserError

__all__ = ["fetch"]


def fetch(url: str, dest: Path, progress: Optional[Callable[[int, Optional[int]], None]] = None, retries: int = 3,
          timeout: float = 30.0) -> None:
    """Write the body of ``url`` into ``dest``.

    Args:
        url: the address (``http://``, ``https://``).
        dest: the file to write (created or truncated).
        progress: called as ``progress(bytes_done, bytes_total_or_None)`` as data arrives.
        retries: how many times a dropped connection is resumed (HTTP Range; started over
            where the server ignores Range), with a growing pause between tries.
        timeout: seconds a connection may stay silent.

    Raises:
        UserError: an HTTP error status, or a connection that failed ``retries`` times.
    """
    done, total, attempt = 0, None, 0
    while True:
        req = urllib.request.Request(url, headers={"User-Agent": "swinunetr-segment"})
        if done:
            req.add_header("Range", f"bytes={done}-")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:  # honours HTTP(S)_PROXY
                if done and resp.status != 206:  # server ignored Range: start over
                    done = 0
                length = resp.headers.get("Content-Length")
                if length is not None:
                    total = done + int(length)
                with open(dest, "r+b" if done else "wb") as f:
                    f.seek(done)
                    f.truncate()
                    while True:
                        block = resp.read(1 << 16)
                        if not block:
                            break
                        f.write(block)
                        done += len(block)
                        if progress:
                            progress(done, total)
            if total is not None and done < total:
                raise ConnectionError(f"connection closed after {done} of {total} bytes")
            return
        except urllib.error.HTTPError as exc:
            raise UserError(f"download from {url} failed: HTTP {exc.code} {exc.reason}") from None
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as exc:
            attempt += 1
            if attempt > retries:
                reason = getattr(exc, "reason", exc)
                raise UserError(f"download from {url} failed after {retries} retries ({reason}); check the network or "
                                "proxy (HTTPS_PROXY), or copy the file by hand and use `models install`") from None
            time.sleep(min(2.0 ** attempt * 0.1, 5.0))
