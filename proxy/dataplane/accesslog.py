"""The access log: one JSON line per request, written in batches off the request path.

A request appends one encoded line to a buffer (~2 us with msgspec); the buffer is
written every 100 ms or when it passes 64 KiB, so a request never waits for the
file. Never logs the query string, header values or anything secret.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from typing import TYPE_CHECKING

import msgspec

if TYPE_CHECKING:
    from proxy.dataplane.exchange import ClientSide, Exchange

FLUSH_INTERVAL = 0.1
FLUSH_BYTES = 64 * 1024


class AccessLog:
    """Buffered JSON-lines writer owned by one worker; loop-bound, not thread-safe."""

    __slots__ = ("_buffer", "_encoder", "_fd", "_loop", "_owns_fd", "_timer")

    def __init__(self, path: str | None) -> None:
        if path:
            self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
            self._owns_fd = True
        else:
            self._fd = sys.stderr.fileno()
            self._owns_fd = False
        self._buffer = bytearray()
        self._encoder = msgspec.json.Encoder()
        self._loop = asyncio.get_running_loop()
        self._timer: asyncio.TimerHandle | None = None

    def request(self, session: ClientSide, exchange: Exchange) -> None:
        req = exchange.req
        now = time.monotonic()
        path = req.url.split(b"?", 1)[0].decode("latin-1")
        line = {
            "time": round(time.time(), 3),
            "request_id": exchange.request_id,
            "app": exchange.app.name if exchange.app is not None else "",
            "host": exchange.host,
            "method": req.method.decode("latin-1"),
            "path": path,
            "status": exchange.status,
            "bytes_in": req.body.total,
            "bytes_out": exchange.bytes_out,
            "duration_ms": round((now - req.started) * 1000, 3),
            "upstream_ms": (round((now - exchange.upstream_started) * 1000, 3)
                            if exchange.upstream_started else None),
            "tls": session.tls_version,
            "client": session.peer,
        }
        self._encoder.encode_into(line, self._buffer, -1)
        self._buffer += b"\n"
        if len(self._buffer) >= FLUSH_BYTES:
            self.flush()
        elif self._timer is None:
            self._timer = self._loop.call_later(FLUSH_INTERVAL, self.flush)

    def flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        data, self._buffer = self._buffer, bytearray()
        view = memoryview(data)
        try:
            while view:
                written = os.write(self._fd, view)
                view = view[written:]
        except OSError:
            pass  # a full disk must not stop the proxy; the lines are lost

    def close(self) -> None:
        self.flush()
        if self._owns_fd:
            os.close(self._fd)
