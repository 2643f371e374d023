"""Backend connections: a bounded keep-alive pool per backend and the response parser.

Owns the sockets to the apps' backends. A connection goes back to the pool only when
its response was read to the end and both sides allow keep-alive; a connection whose
response was cut short is closed, never reused. Per backend and worker: at most
`max_connections` open at once, at most `queue` requests waiting beyond that (served
in turn between client addresses), and a backend that refused or timed out a
connection is quarantined for a while. A response head that breaks the rules in
`checks` fails the exchange (502), never reaches the client. A chunked body's trailer
fields are kept, bounded like a request head, and handed to the sink before the
response ends. Runs on the worker's loop only; knows nothing of the client side except
the ResponseSink interface.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Sequence
from typing import Protocol, cast

import httptools

from proxy import metrics
from proxy.dataplane import checks
from proxy.dataplane.checks import UNDERSCORE
from proxy.routing import Backend

# Bytes the client side may queue in our write buffer before we stop reading the
# backend (and the other way round): bounds memory per connection.
WRITE_HIGH = 256 * 1024


# Response headers that describe the backend connection, not the response (RFC 9110
# 7.6.1): never delivered to a sink, like the names a Connection header lists.
HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"te", b"trailer", b"transfer-encoding", b"upgrade",
    b"proxy-connection", b"proxy-authorization", b"proxy-authenticate",
})
_PLAIN_CONNECTION = frozenset({b"keep-alive", b"close", b"Keep-Alive", b"Close"})
_FRAMING = frozenset({b"content-length"})
# Fields a trailer section must not carry (RFC 9110 6.5.1: framing, routing, request
# modifiers, authentication, response control and content metadata): dropped from it.
_NOT_TRAILERS = HOP_BY_HOP | frozenset({
    b"content-length", b"content-type", b"content-encoding", b"content-range", b"host",
    b"cache-control", b"expires", b"date", b"location", b"retry-after", b"vary", b"age",
    b"set-cookie", b"www-authenticate", b"authorization", b"strict-transport-security",
})


class ResponseSink(Protocol):
    """What receives a backend's response; the client-side exchange implements it."""

    # Lower-case names of end-to-end response headers the sink does not want either.
    dropped_headers: frozenset[bytes]

    def response_head(self, status: int, reason: bytes, version: str,
                      headers: list[tuple[bytes, bytes]], keep_alive: bool,
                      framing: str) -> None: ...

    def response_body(self, data: bytes) -> None: ...

    def trailer_limits(self) -> tuple[int, int]:
        """The most a trailer section may hold (bytes, fields) before it is dropped."""
        ...

    def response_trailers(self, trailers: list[tuple[bytes, bytes]]) -> None:
        """The chunked body's trailer fields (lower-case, end-to-end only): once, after
        the last `response_body`, before `response_done`."""
        ...

    def response_done(self, reusable: bool) -> None: ...

    def response_failed(self, exc: BaseException | None, got_head: bool) -> None: ...

    def tunnel_data(self, data: bytes) -> None: ...

    def upstream_write_paused(self, paused: bool) -> None: ...


class Output(Protocol):
    """Where a response is written (the client side): writes between `cork` and
    `uncork` go out together, so one backend read costs one client write."""

    def cork(self) -> None: ...

    def uncork(self) -> None: ...


class BadResponse(Exception):
    """The backend's response broke HTTP/1.1 rules; the client gets 502."""


class PoolFull(Exception):
    """The backend's connection limit and wait queue are both full (503)."""


class _StopParsing(Exception):
    """Raised inside a parser callback to end a bodiless (HEAD) response early."""


class UpstreamConnection(asyncio.Protocol):
    """One TCP connection to a backend, reused for sequential exchanges."""

    __slots__ = ("_close_delimited", "_connection", "_drop", "_got_head", "_has_length",
                 "_head_only", "_headers", "_output", "_paused", "_reason", "_te",
                 "_trailer_fields", "_trailer_room", "_trailers", "_underscore",
                 "_wants_upgrade", "_writable", "backend", "idle_since", "last_read",
                 "parser", "pool", "sink", "transport", "tunnel")

    def __init__(self, backend: Backend, pool: UpstreamPool) -> None:
        self.backend = backend
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.sink: ResponseSink | None = None
        self._output: Output | None = None
        self.parser: httptools.HttpResponseParser | None = None
        self.idle_since = 0.0
        self.last_read = 0.0
        self.tunnel = False
        self._headers: list[tuple[bytes, bytes]] = []
        self._drop: frozenset[bytes] = frozenset()
        self._connection: bytes | None = None
        self._reason = b""
        self._got_head = False
        self._head_only = False
        self._wants_upgrade = False
        self._underscore = False
        self._te: bytes | None = None
        self._has_length = False
        self._close_delimited = False
        # The response's trailer fields (None until the first), and the bytes left of
        # their bound (below 0: over it, the section is dropped).
        self._trailers: list[tuple[bytes, bytes]] | None = None
        self._trailer_room = 0
        self._trailer_fields = 0
        self._paused = False
        self._writable: asyncio.Future[None] | None = None

    # -- asyncio.Protocol ---------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(high=WRITE_HIGH)

    def connection_lost(self, exc: BaseException | None) -> None:
        self.pool.lost(self)
        sink, self.sink = self.sink, None
        self._wake_writer(exc or ConnectionResetError("backend closed the connection"))
        if sink is None:
            return
        if self.tunnel or (self._got_head and self._close_delimited and exc is None):
            sink.response_done(False)
        else:
            sink.response_failed(exc, self._got_head)

    def data_received(self, data: bytes) -> None:
        self.last_read = time.monotonic()
        if self.tunnel:
            if self.sink is not None:
                self.sink.tunnel_data(data)
            return
        parser = self.parser
        if parser is None or self.sink is None:
            # Bytes with no request outstanding: the backend is broken; never reuse.
            if self.transport is not None:
                self.transport.close()
            return
        # Corked on the client side itself, not through the sink: two calls fewer.
        output = self._output
        if output is not None:
            output.cork()
        try:
            parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            if not isinstance(cause, _StopParsing):
                self._fail(cause if isinstance(cause, BadResponse) else exc)
        except httptools.HttpParserUpgrade as exc:
            # 101 to an upgrade we asked for: from here on the bytes are the new
            # protocol's, relayed untouched.
            rest = data[exc.args[0]:] if exc.args else b""
            if self.tunnel and rest and self.sink is not None:
                self.sink.tunnel_data(rest)
        except httptools.HttpParserError as exc:
            self._fail(exc)
        finally:
            if output is not None:
                output.uncork()

    def eof_received(self) -> bool | None:
        return None  # close our side too; connection_lost reports the end

    def pause_writing(self) -> None:
        self._paused = True
        if self.tunnel and self.sink is not None:
            self.sink.upstream_write_paused(True)

    def resume_writing(self) -> None:
        self._paused = False
        self._wake_writer(None)
        if self.tunnel and self.sink is not None:
            self.sink.upstream_write_paused(False)

    # -- used by the exchange -----------------------------------------------------
    def start(self, sink: ResponseSink, output: Output | None, head_only: bool,
              upgrade: bool, now: float) -> None:
        """Begin one exchange: the next response on this connection goes to `sink`,
        which writes it to `output` (corked around each backend read)."""
        self.sink = sink
        self._output = output
        if self.parser is None:
            # A parser that ended its last response cleanly goes on with the next
            # one (llhttp keeps no state between messages): creating one is ~0.3 us.
            self.parser = httptools.HttpResponseParser(self)
        self._headers = []
        self._drop = sink.dropped_headers
        self._connection = None
        self._reason = b""
        self._got_head = False
        self._head_only = head_only
        self._wants_upgrade = upgrade
        self._underscore = False
        self._te = None
        self._has_length = False
        self._close_delimited = False
        self._trailers = None
        self.last_read = now

    def write(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    async def drain(self) -> None:
        """Wait until the backend has taken our buffered request bytes."""
        if not self._paused:
            return
        if self._writable is None:
            self._writable = self.pool.loop.create_future()
        await self._writable

    def detach(self) -> None:
        """The exchange gave up on this connection: forget it and close it."""
        self.sink = None
        self._output = None
        if self.transport is not None:
            self.transport.abort()

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
        # Sorted here, as they arrive: the sink gets the headers it forwards and does
        # not pass over them again (two Python loops over nginx's five headers were
        # ~1.5 us of the ~16 us of Python per proxied request).
        if self._got_head:
            self._trailer(name, value)
            return
        if UNDERSCORE in name:
            self._underscore = True
        lname = name.lower()
        if lname in HOP_BY_HOP:
            if lname == b"transfer-encoding":
                self._te = value
            elif lname == b"connection":
                connection = self._connection
                self._connection = value if connection is None else connection + b"," + value
            return
        if lname in self._drop:
            return
        if lname == b"content-length":
            self._has_length = True
        self._headers.append((name, value))

    def _trailer(self, name: bytes, value: bytes) -> None:
        """A field of the chunked body's trailer section (RFC 9112 7.1.2): kept for the
        sink, bounded like a request head; past the bound the whole section is dropped
        (the body is complete without it)."""
        trailers, sink = self._trailers, self.sink
        if trailers is None:
            if sink is None:
                return
            size, fields = sink.trailer_limits()
            trailers = self._trailers = []
            self._trailer_room = size
            self._trailer_fields = fields
        if self._trailer_room < 0:
            return
        lname = name.lower()
        if lname in _NOT_TRAILERS or UNDERSCORE in name:
            return
        self._trailer_room -= len(name) + len(value) + 4
        trailers.append((lname, value))
        if self._trailer_room < 0 or len(trailers) > self._trailer_fields:
            self._trailer_room = -1
            trailers.clear()
            metrics.LIMITS_HIT.labels("response_trailers").inc()

    def on_headers_complete(self) -> None:
        parser, sink = self.parser, self.sink
        assert parser is not None and sink is not None
        status = parser.get_status_code()
        version = parser.get_http_version()
        headers, reason, te = self._headers, self._reason, self._te
        why = checks.response_head(version, status, reason, te, self._underscore)
        if why is not None:
            raise BadResponse(why)
        connection = self._connection
        if connection is not None and connection not in _PLAIN_CONNECTION:
            # Connection may list end-to-end names too; never the framing header.
            named = frozenset(t.strip() for t in connection.lower().split(b",")) - _FRAMING
            if named:
                headers = [(n, v) for n, v in headers if n.lower() not in named]
        if 100 <= status < 200 and status != 101:
            # An interim response: the final one follows on the same parser. (The
            # final one's fields are reset by `start`, once per exchange.)
            self._headers, self._reason, self._te = [], b"", None
            self._has_length, self._connection = False, None
            sink.response_head(status, reason, version, headers, True, "none")
            return
        if status == 101:
            if not self._wants_upgrade:
                raise BadResponse("101 to a request that asked for no upgrade")
            self.tunnel = True
        self._got_head = True
        framing = _framing(status, te, self._has_length, self._head_only)
        if self._has_length and (framing == "chunked" or framing == "close"):
            # Unreachable while llhttp refuses Content-Length with Transfer-Encoding;
            # a length must never go out with a body framed otherwise.
            headers = [(n, v) for n, v in headers if n.lower() != b"content-length"]
        self._close_delimited = framing == "close"
        keep_alive = parser.should_keep_alive()
        sink.response_head(status, reason, version, headers, keep_alive, framing)
        if self._head_only and not self.tunnel:
            # A response to HEAD has no body whatever its headers say; httptools
            # cannot be told the request method and would wait for Content-Length
            # bytes that never come, so stop the parser here (and never reuse it:
            # it is in the middle of a message).
            self.parser = None
            self._finish(keep_alive)
            raise _StopParsing

    def on_body(self, body: bytes) -> None:
        if self.sink is not None:
            self.sink.response_body(body)

    def on_message_complete(self) -> None:
        parser = self.parser
        if parser is None or not self._got_head or self.tunnel:
            return  # end of a 1xx interim response, or the 101 of a tunnel
        self._finish(parser.should_keep_alive() and not self._close_delimited)

    def _finish(self, keep_alive: bool) -> None:
        sink, self.sink = self.sink, None
        self._output = None  # an idle pooled connection must not hold a client
        if sink is not None:
            trailers = self._trailers
            if trailers:
                self._trailers = None
                sink.response_trailers(trailers)
            transport = self.transport
            sink.response_done(keep_alive and transport is not None
                               and not transport.is_closing())


def _framing(status: int, te: bytes | None, has_length: bool, head_only: bool) -> str:
    """How the response body is delimited: none, length, chunked or close."""
    if head_only or status in (204, 304) or 100 <= status < 200:
        return "none"
    if te is not None:
        return "chunked"  # checks.response_head allowed nothing else
    return "length" if has_length else "close"


class _BackendState:
    """Per backend: idle connections, how many are open, who waits, quarantine.

    The wait queue is fair between client addresses: one queue per client, served in
    turn (a client that got a connection goes to the back of the turn), and when the
    queue is full a newcomer takes the place of the newest waiter of the client that
    has the most waiting. One client's flood then neither fills the queue nor takes
    every connection that frees up.
    """

    __slots__ = ("idle", "open", "quarantined_until", "waiters", "waiting")

    def __init__(self) -> None:
        self.idle: list[UpstreamConnection] = []
        self.open = 0
        # Client address -> its waiters, oldest first; dict order is the turn.
        self.waiters: dict[str, deque[asyncio.Future[None]]] = {}
        self.waiting = 0
        self.quarantined_until = 0.0

    def enqueue(self, client: str, waiter: asyncio.Future[None]) -> None:
        queue = self.waiters.get(client)
        if queue is None:
            queue = self.waiters[client] = deque()
        queue.append(waiter)
        self.waiting += 1

    def next_waiter(self) -> asyncio.Future[None] | None:
        """The first waiter of the client whose turn it is (it moves to the back)."""
        waiters = self.waiters
        if not waiters:
            return None
        client = next(iter(waiters))
        queue = waiters.pop(client)
        waiter = queue.popleft()
        if queue:
            waiters[client] = queue
        self.waiting -= 1
        return waiter

    def remove(self, client: str, waiter: asyncio.Future[None]) -> None:
        queue = self.waiters.get(client)
        if queue is None or waiter not in queue:
            return
        queue.remove(waiter)
        self.waiting -= 1
        if not queue:
            del self.waiters[client]

    def make_room(self, client: str) -> bool:
        """The queue is full: refuse the newest waiter of the client with the most
        waiting, when that is more than `client` would have; False: refuse `client`."""
        longest, queue = max(self.waiters.items(), key=lambda item: len(item[1]))
        mine = self.waiters.get(client)
        if len(queue) <= (len(mine) if mine is not None else 0) + 1:
            return False
        victim = queue.pop()
        self.waiting -= 1
        if not queue:
            del self.waiters[longest]
        if not victim.done():
            victim.set_exception(PoolFull())
        return True


class UpstreamPool:
    """Keep-alive connections per backend, opened on demand, bounded, with a queue.

    Contract: every connection `acquire` returns is either given back with `release`
    (its response was read to the end) or closed by its user; closing is noticed in
    `lost`, which frees its slot. Loop-bound; not thread-safe.
    """

    __slots__ = (
        "_backends",
        "_last_backend",
        "_last_state",
        "_loop",
        "_quarantines",
        "connect_timeout",
        "idle_timeout",
        "loop",
        "max_connections",
        "quarantine_for",
        "queue",
    )

    def __init__(self, *, connect_timeout: float, idle_timeout: float = 30.0,
                 max_connections: int = 100, queue: int = 50,
                 quarantine_for: float = 10.0) -> None:
        self._loop = asyncio.get_running_loop()
        self.loop = self._loop
        self._backends: dict[Backend, _BackendState] = {}
        self._last_backend: Backend | None = None
        self._last_state = _BackendState()
        self._quarantines = 0
        self.connect_timeout = connect_timeout
        self.idle_timeout = idle_timeout
        self.max_connections = max_connections
        self.queue = queue
        self.quarantine_for = quarantine_for
        self._loop.call_later(idle_timeout, self._sweep)

    def _sweep(self) -> None:
        """Close keep-alive connections idle for longer than `idle_timeout`."""
        cutoff = time.monotonic() - self.idle_timeout
        for state in self._backends.values():
            for conn in [c for c in state.idle if c.idle_since < cutoff]:
                if conn.transport is not None:
                    conn.transport.close()
        self._loop.call_later(self.idle_timeout / 2, self._sweep)

    def _state(self, backend: Backend) -> _BackendState:
        # Backend is a frozen dataclass: its hash is a Python call building a tuple
        # (a dict lookup ~0.12 us); the same backend object asks again and again.
        if backend is self._last_backend:
            return self._last_state
        state = self._backends.get(backend)
        if state is None:
            state = self._backends[backend] = _BackendState()
        self._last_backend, self._last_state = backend, state
        return state

    def available(self, backends: Sequence[Backend]) -> Sequence[Backend]:
        """`backends` without the quarantined ones, in the same order."""
        if not self._quarantines:
            return backends  # the usual case: no copy, no clock read
        return [b for b in backends if not self.quarantined(b)]

    def quarantined(self, backend: Backend) -> bool:
        if not self._quarantines:
            return False  # the usual case: no dict lookup, no clock read
        until = self._state(backend).quarantined_until
        return until != 0.0 and until > time.monotonic()

    def quarantine(self, backend: Backend) -> None:
        self._quarantines += 1  # never decremented: one quarantine costs a lookup later
        self._state(backend).quarantined_until = time.monotonic() + self.quarantine_for
        metrics.LIMITS_HIT.labels("backend_quarantine").inc()

    def take_idle(self, backend: Backend) -> UpstreamConnection | None:
        """An idle pooled connection to `backend` if one is at hand (no waiting)."""
        state = self._state(backend)
        idle = state.idle
        if not idle or state.waiters:
            return None  # requests queued for this backend go first
        now = time.monotonic()
        while idle:
            conn = idle.pop()
            if conn.usable and now - conn.idle_since < self.idle_timeout:
                return conn
            if conn.transport is not None:
                conn.transport.close()  # `lost` will free its slot
        return None

    async def acquire(self, backend: Backend,
                      client: str = "") -> tuple[UpstreamConnection, bool]:
        """A connection to `backend` and whether it was reused from the pool; waits in
        `client`'s queue when every connection is busy (see _BackendState).

        Raises PoolFull (queue full), TimeoutError or OSError (connect failed).
        """
        state = self._state(backend)
        while True:
            idle = state.idle
            now = time.monotonic()
            while idle:
                conn = idle.pop()
                if conn.usable and now - conn.idle_since < self.idle_timeout:
                    return conn, True
                if conn.transport is not None:
                    conn.transport.close()  # `lost` will free its slot
            if state.open < self.max_connections:
                break
            if state.waiting >= self.queue and not state.make_room(client):
                metrics.LIMITS_HIT.labels("backend_queue").inc()
                raise PoolFull
            waiter = self._loop.create_future()
            state.enqueue(client, waiter)
            try:
                await waiter
            except PoolFull:
                metrics.LIMITS_HIT.labels("backend_queue").inc()
                raise  # a client with fewer waiting took our place (make_room)
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():
                    self._wake(state)  # our turn came as we left: pass it on
                else:
                    state.remove(client, waiter)
                raise
        state.open += 1
        try:
            _, proto = await asyncio.wait_for(
                self._loop.create_connection(lambda: UpstreamConnection(backend, self),
                                             backend.host, backend.port),
                self.connect_timeout)
        except BaseException:
            state.open -= 1
            self._wake(state)
            raise
        return proto, False

    def release(self, conn: UpstreamConnection) -> None:
        """Give back a connection whose last response was read to the end."""
        if not conn.usable:
            return
        if conn.backend.send_proxy:
            # It opened with one client's PROXY header: never another client's.
            if conn.transport is not None:
                conn.transport.close()
            return
        state = self._state(conn.backend)
        conn.idle_since = time.monotonic()
        state.idle.append(conn)
        self._wake(state)

    def lost(self, conn: UpstreamConnection) -> None:
        """A connection closed (called from its connection_lost)."""
        state = self._backends.get(conn.backend)
        if state is None:
            return
        state.open -= 1
        if conn in state.idle:
            state.idle.remove(conn)
        self._wake(state)

    def _wake(self, state: _BackendState) -> None:
        while state.waiters:  # usually empty: one test, as before the queue was fair
            waiter = state.next_waiter()
            if waiter is not None and not waiter.done():
                waiter.set_result(None)
                return

    def close(self) -> None:
        for state in self._backends.values():
            for conn in state.idle:
                if conn.transport is not None:
                    conn.transport.close()
            state.idle.clear()

