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

import msgspec

FLUSH_INTERVAL = 0.1
FLUSH_BYTES = 64 * 1024


class Entry(msgspec.Struct, array_like=True):
    """What one answered request hands the log: plain values, no exchange internals.

    `url` is the request target as received (the query is cut here); `started` and
    `upstream_started` are monotonic times (0.0: no backend was asked)."""

    request_id: str
    app: str
    host: str
    method: bytes
    url: bytes
    status: int
    bytes_in: int
    bytes_out: int
    started: float
    upstream_started: float
    tls: str
    client: str
    protocol: str


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

    def request(self, entry: Entry) -> None:
        now = time.monotonic()
        line = {
            "time": round(time.time(), 3),
            "request_id": entry.request_id,
            "app": entry.app,
            "host": entry.host,
            "method": entry.method.decode("latin-1"),
            "path": entry.url.split(b"?", 1)[0].decode("latin-1"),
            "status": entry.status,
            "bytes_in": entry.bytes_in,
            "bytes_out": entry.bytes_out,
            "duration_ms": round((now - entry.started) * 1000, 3),
            "upstream_ms": (round((now - entry.upstream_started) * 1000, 3)
                            if entry.upstream_started else None),
            "tls": entry.tls,
            "client": entry.client,
            "protocol": entry.protocol,
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
