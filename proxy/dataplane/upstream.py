"""Backend connections: a keep-alive pool per backend and the response parser.

Owns the sockets to the apps' backends. A connection goes back to the pool only when
its response was read to the end and both sides allow keep-alive; a connection whose
response was cut short is closed, never reused. Runs on the worker's loop only.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Protocol, cast

import httptools

from proxy.routing import Backend

# Bytes the client side may queue in our write buffer before we stop reading the
# backend (and the other way round): bounds memory per connection.
WRITE_HIGH = 256 * 1024
IDLE_PER_BACKEND = 64


class ResponseSink(Protocol):
    """What receives a backend's response; the client session implements it."""

    def response_head(self, status: int, reason: bytes, version: str,
                      headers: list[tuple[bytes, bytes]], keep_alive: bool,
                      framing: str) -> None: ...

    def response_body(self, data: bytes) -> None: ...

    def response_done(self, reusable: bool) -> None: ...

    def response_failed(self, exc: BaseException | None, got_head: bool) -> None: ...

    def upstream_pause(self) -> None: ...

    def upstream_resume(self) -> None: ...


class _StopParsing(Exception):
    """Raised inside a parser callback to end a bodiless (HEAD) response early."""


class UpstreamConnection(asyncio.Protocol):
    """One TCP connection to a backend, reused for sequential exchanges."""

    __slots__ = ("_close_delimited", "_got_head", "_head_only", "_headers", "_paused",
                 "_reason", "_writable", "backend", "idle_since", "parser", "sink",
                 "transport")

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.transport: asyncio.Transport | None = None
        self.sink: ResponseSink | None = None
        self.parser: httptools.HttpResponseParser | None = None
        self.idle_since = 0.0
        self._headers: list[tuple[bytes, bytes]] = []
        self._reason = b""
        self._got_head = False
        self._head_only = False
        self._close_delimited = False
        self._paused = False
        self._writable: asyncio.Future[None] | None = None

    # -- asyncio.Protocol ---------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: BaseException | None) -> None:
        sink, self.sink = self.sink, None
        self._wake_writer(exc or ConnectionResetError("backend closed the connection"))
        if sink is None:
            return
        if self._got_head and self._close_delimited and exc is None:
            sink.response_done(False)
        else:
            sink.response_failed(exc, self._got_head)

    def data_received(self, data: bytes) -> None:
        parser = self.parser
        if parser is None or self.sink is None:
            # Bytes with no request outstanding: the backend is broken; never reuse.
            if self.transport is not None:
                self.transport.close()
            return
        try:
            parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            if not isinstance(exc.__context__, _StopParsing):
                self._fail(exc)
        except httptools.HttpParserUpgrade:
            # The response switched protocols; the session takes the raw stream over.
            pass
        except httptools.HttpParserError as exc:
            self._fail(exc)

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        self._wake_writer(None)

    # -- used by the session ------------------------------------------------------
    def start(self, sink: ResponseSink, *, head_only: bool) -> None:
        """Begin one exchange: the next response on this connection goes to `sink`."""
        self.sink = sink
        self.parser = httptools.HttpResponseParser(self)
        self._headers = []
        self._reason = b""
        self._got_head = False
        self._head_only = head_only
        self._close_delimited = False

    def write(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    async def drain(self) -> None:
        """Wait until the backend has taken our buffered request bytes."""
        if not self._paused:
            return
        if self._writable is None:
            self._writable = asyncio.get_running_loop().create_future()
        await self._writable

    def _wake_writer(self, exc: BaseException | None) -> None:
        waiter, self._writable = self._writable, None
        if waiter is not None and not waiter.done():
            if exc is None:
                waiter.set_result(None)
            else:
                waiter.set_exception(exc)

    def _fail(self, exc: BaseException) -> None:
        sink, self.sink = self.sink, None
        if self.transport is not None:
            self.transport.abort()
        if sink is not None:
            sink.response_failed(exc, self._got_head)

    @property
    def usable(self) -> bool:
        return self.transport is not None and not self.transport.is_closing()

    # -- httptools callbacks ------------------------------------------------------
    def on_status(self, status: bytes) -> None:
        self._reason += status

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        parser, sink = self.parser, self.sink
        assert parser is not None and sink is not None
        status = parser.get_status_code()
        headers, self._headers = self._headers, []
        reason, self._reason = self._reason, b""
        if 100 <= status < 200 and status != 101:
            sink.response_head(status, reason, parser.get_http_version(), headers, True,
                               "none")
            return
        self._got_head = True
        framing = _framing(status, headers, self._head_only)
        self._close_delimited = framing == "close"
        sink.response_head(status, reason, parser.get_http_version(), headers,
                           parser.should_keep_alive(), framing)
        if self._head_only:
            # A response to HEAD has no body whatever its headers say; httptools
            # cannot be told the request method and would wait for Content-Length
            # bytes that never come, so stop the parser here. (`framing` is already
            # "none" for HEAD, so it cannot be the test.)
            self._finish(parser.should_keep_alive())
            raise _StopParsing

    def on_body(self, body: bytes) -> None:
        if self.sink is not None:
            self.sink.response_body(body)

    def on_message_complete(self) -> None:
        parser = self.parser
        if parser is None or not self._got_head:
            return  # end of a 1xx interim response
        self._finish(parser.should_keep_alive() and not self._close_delimited)

    def _finish(self, keep_alive: bool) -> None:
        sink, self.sink = self.sink, None
        self.parser = None
        if sink is not None:
            sink.response_done(keep_alive and self.usable)


def _framing(status: int, headers: list[tuple[bytes, bytes]], head_only: bool) -> str:
    """How the response body is delimited: none, length, chunked or close."""
    if head_only or status in (204, 304) or 100 <= status < 200:
        return "none"
    chunked = False
    length = False
    for name, value in headers:
        lname = name.lower()
        if lname == b"transfer-encoding":
            chunked = value.strip().lower().endswith(b"chunked")
        elif lname == b"content-length":
            length = True
    if chunked:
        return "chunked"
    return "length" if length else "close"


class UpstreamPool:
    """Idle keep-alive connections per backend, opened on demand with a timeout."""

    __slots__ = ("_idle", "_loop", "connect_timeout", "idle_timeout")

    def __init__(self, *, connect_timeout: float, idle_timeout: float = 30.0) -> None:
        self._loop = asyncio.get_running_loop()
        self._idle: dict[Backend, list[UpstreamConnection]] = {}
        self.connect_timeout = connect_timeout
        self.idle_timeout = idle_timeout

    async def acquire(self, backend: Backend) -> tuple[UpstreamConnection, bool]:
        """A connection to `backend` and whether it was reused from the pool."""
        idle = self._idle.get(backend)
        now = time.monotonic()
        while idle:
            conn = idle.pop()
            if conn.usable and now - conn.idle_since < self.idle_timeout:
                return conn, True
            if conn.transport is not None:
                conn.transport.close()
        factory: Callable[[], UpstreamConnection] = lambda: UpstreamConnection(backend)  # noqa: E731
        _, proto = await asyncio.wait_for(
            self._loop.create_connection(factory, backend.host, backend.port),
            self.connect_timeout)
        return proto, False

    def release(self, conn: UpstreamConnection) -> None:
        """Give back a connection whose last response was read to the end."""
        if not conn.usable:
            return
        idle = self._idle.setdefault(conn.backend, [])
        if len(idle) >= IDLE_PER_BACKEND:
            assert conn.transport is not None
            conn.transport.close()
            return
        conn.idle_since = time.monotonic()
        idle.append(conn)

    def close(self) -> None:
        for conns in self._idle.values():
            for conn in conns:
                if conn.transport is not None:
                    conn.transport.close()
        self._idle.clear()
