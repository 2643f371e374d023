"""One request from routing to the end of its response, independent of the client's
protocol: Host vs certificate (421), app lookup, canonical-domain redirect, backend
choice (round robin, quarantine, queue), the request head the backend sees, the
response headers the client sees, upstream timeouts and the WebSocket tunnel.

The client side (today the HTTP/1.1 session; later an HTTP/2 stream) implements
`ClientSide` and owns framing. Nothing here writes client bytes directly, blocks or
touches the store.

Two ways through an exchange, same decisions: the fast path (a complete small request
and an idle pooled connection to the chosen backend) runs entirely in protocol
callbacks, no task, future or timer; anything else (a new backend connection, a
streamed body, an upgrade, a retry) runs in one task per exchange. A pooled
connection found dead on the fast path before any response byte hands the exchange
over to the task, which retries.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import operator
import os
import re
import time
from collections import deque
from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

from proxy import metrics, routing
from proxy.dataplane.accesslog import AccessLog
from proxy.dataplane.upstream import (
    HOP_BY_HOP,
    BadResponse,
    PoolFull,
    UpstreamConnection,
    UpstreamPool,
)
from proxy.routing import App, Backend, RouteTable

if TYPE_CHECKING:
    from proxy.dataplane.state import Live

log = logging.getLogger("tlsedge.http")

# Request headers a client may not pass through us: hop-by-hop (RFC 9110 7.6.1).
_HOP_BY_HOP = HOP_BY_HOP
# Set by us; from a peer outside trusted_proxies they are dropped.
_FORWARDING = frozenset({
    b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"x-forwarded-port",
    b"forwarded", b"x-real-ip", b"x-request-id",
})
_REQUEST_DROP_UNTRUSTED = _HOP_BY_HOP | _FORWARDING | {b"x-request-start"}
_REQUEST_DROP_TRUSTED = _HOP_BY_HOP | {b"x-request-start"}
_REQUEST_ID = re.compile(rb"[A-Za-z0-9._:+/=-]{8,128}")
_BODY_HIGH = 256 * 1024
_CODE_CLASS = {1: "1xx", 2: "2xx", 3: "3xx", 4: "4xx", 5: "5xx"}
_HSTS = (b"strict-transport-security", b"max-age=31536000")
_FORWARDED = (b"x-forwarded-for: %s\r\nx-forwarded-proto: %s\r\nx-forwarded-host: %s\r\n"
              b"x-forwarded-port: %d\r\nx-request-id: %s\r\nx-request-start: t=%d\r\n\r\n")
_NO_TOKENS: frozenset[bytes] = frozenset()
# A request header name that the full pass in `forwarded_head` must see (dropped,
# merged or checked against Connection's tokens), as one line of the names.
_SPECIAL_REQUEST_HEADER = re.compile(
    rb"^(?:%s)$" % b"|".join(re.escape(n) for n in sorted(_REQUEST_DROP_UNTRUSTED)),
    re.IGNORECASE | re.MULTILINE)
_PLAIN_HEAD = b"%s %s HTTP/1.1\r\n%s%s%s" + _FORWARDED
_first = operator.itemgetter(0)
# A complete request body up to this size is written at once on the fast path; a
# larger one is pumped by the task with backpressure.
_FAST_BODY_MAX = 64 * 1024


class ClientSide(Protocol):
    """What an exchange needs from the client connection (HTTP/1.1 session today)."""

    live: Live
    pool: UpstreamPool
    peer: str
    scheme: str
    port: int
    trusted: bool
    tls_version: str
    access_log: AccessLog | None
    # The client stopped reading what we write (an attribute, not a call: it is read
    # on every request).
    write_paused: bool
    # The last (Host value, route table, host, app) this client resolved: a connection
    # asks for the same host again and again (split_host alone measured ~0.3 us).
    route_memo: tuple[bytes | None, RouteTable, str, App | None] | None

    def send_interim(self, req: Request, status: int, reason: bytes) -> None: ...

    def send_head(self, req: Request, status: int, reason: bytes,
                  headers: list[tuple[bytes, bytes]], framing: str,
                  upstream_keep: bool) -> None: ...

    def send_body(self, data: bytes) -> None: ...

    def end_body(self) -> None: ...

    def send_error(self, req: Request, status: int, request_id: str, why: str) -> bool: ...

    def send_redirect(self, req: Request, location: str) -> bool: ...

    def start_tunnel(self, exchange: Exchange) -> None: ...

    def exchange_done(self, exchange: Exchange, keep: bool) -> None: ...

    def watch_by(self, delay: float, now: float) -> None: ...

    def tunnel_to_client(self, data: bytes) -> None: ...

    def pause_reading_client(self) -> None: ...

    def resume_reading_client(self) -> None: ...

    def abort(self) -> None: ...

    def misdirected(self, host: str) -> bool: ...

    def cork(self) -> None: ...

    def uncork(self) -> None: ...

    @property
    def loop(self) -> asyncio.AbstractEventLoop: ...


class Body:
    """A request body in flight: the client side feeds it, the exchange reads it."""

    __slots__ = ("chunks", "consumed", "done", "last", "session", "size", "total",
                 "truncated", "waiter")

    def __init__(self, session: ClientSide) -> None:
        self.session = session
        self.chunks: deque[bytes] = deque()
        self.size = 0
        self.total = 0
        self.last = 0.0
        self.consumed = False
        self.done = False
        self.truncated = False
        self.waiter: asyncio.Future[None] | None = None

    def feed(self, data: bytes) -> None:
        self.chunks.append(data)
        self.size += len(data)
        self.total += len(data)
        self._wake()
        if self.size > _BODY_HIGH:
            self.session.pause_reading_client()

    def finish(self) -> None:
        self.done = True
        if self.waiter is not None:
            self._wake()

    def cut(self) -> None:
        """The client went away mid-body: end it as incomplete, so the relay never
        frames what it has as a whole request."""
        if not self.done:
            self.truncated = True
        self.finish()

    def _wake(self) -> None:
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def read(self) -> bytes | None:
        """Next chunk, or None at the end of the body."""
        while not self.chunks:
            if self.done:
                return None
            self.waiter = self.session.loop.create_future()
            await self.waiter
        data = self.chunks.popleft()
        self.consumed = True
        self.size -= len(data)
        if self.size <= _BODY_HIGH // 2:
            self.session.resume_reading_client()
        return data


class Request:
    """A parsed request head and its body, as any client protocol delivers it."""

    __slots__ = ("body", "chunked", "connection", "content_length", "error", "exchange",
                 "headers", "host", "keep_alive", "method", "started", "tunnel_early",
                 "upgrade", "url", "version")

    def __init__(self, session: ClientSide, started: float = 0.0) -> None:
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.method = b""
        self.version = "1.1"
        self.keep_alive = True
        self.host: bytes | None = None
        # The Connection header's value(s), joined with commas; None when absent.
        self.connection: bytes | None = None
        self.chunked = False
        self.content_length: bytes | None = None
        self.upgrade = False
        self.tunnel_early = b""
        self.started = started
        self.body = Body(session)
        self.exchange: Exchange | None = None
        # Set when this request must be refused, not relayed: (status, why).
        self.error: tuple[int, str] | None = None


_REQUESTS_CHILDREN: dict[tuple[str, int], metrics.BatchedCounter] = {}
_UPSTREAM_SECONDS: dict[str, metrics.BatchedHistogram] = {}


# Request ids: a random per-process prefix and a counter. Unique and cheap (no
# getrandom syscall per request); they identify requests, they are not secrets.
_ID_PREFIX = os.urandom(8).hex()
_id_counter = itertools.count(1)


def _next_request_id() -> str:
    return f"{_ID_PREFIX}{next(_id_counter):016x}"


def count(app: str, status: int) -> None:
    """Count one answered request (batched: ~0.1 us instead of ~0.7 us of mmap write)."""
    key = (app, status // 100)
    child = _REQUESTS_CHILDREN.get(key)
    if child is None:
        child = metrics.batched_counter(metrics.REQUESTS, app,
                                        _CODE_CLASS.get(status // 100, "5xx"))
        _REQUESTS_CHILDREN[key] = child
    child.pending += 1


def _observe_upstream(app: str, seconds: float) -> None:
    batch = _UPSTREAM_SECONDS.get(app)
    if batch is None:
        batch = _UPSTREAM_SECONDS[app] = metrics.batched_histogram(metrics.UPSTREAM_SECONDS, app)
    batch.observe(seconds)


def _tokens(connection: bytes) -> frozenset[bytes]:
    """The header names a Connection value lists (they are hop-by-hop too)."""
    return frozenset(t.strip() for t in connection.lower().split(b","))


def split_host(value: bytes) -> str:
    """Host header bytes -> lower-case host without port or trailing dot."""
    return routing.split_host(value.decode("latin-1"))


class Exchange:
    """One request relayed to one backend, and its response relayed back.

    `start` answers, or starts relaying; either way the client side's
    `exchange_done(exchange, keep)` is called exactly once (possibly before `start`
    returns), `keep` saying whether the connection may carry another request. While
    in flight the client side calls `watch` from its timer and `client_gone` when the
    client leaves.
    """

    # A backend's HSTS never reaches the client: ours is added for force_https apps.
    dropped_headers = frozenset({b"strict-transport-security"})

    __slots__ = ("app", "backends", "bytes_out", "conn", "early", "fast", "finished",
                 "got_head",
                 "head", "host", "req", "request_id", "reused", "sent_at", "session",
                 "settled", "status", "task", "upstream_paused", "upstream_started", "waiter")

    def __init__(self, session: ClientSide, req: Request) -> None:
        self.session = session
        self.req = req
        self.app: App | None = None
        self.host = ""
        self.conn: UpstreamConnection | None = None
        self.backends: Sequence[Backend] = ()
        self.head = b""
        # Task path only: what `_attempt` awaits, and the task that runs `_relay`.
        self.waiter: asyncio.Future[bool | int | None] | None = None
        self.task: asyncio.Task[None] | None = None
        # A limit that fired while the task had no attempt running (before it started,
        # while connecting): the task answers with it instead of relaying.
        self.early: bool | int | None = None
        self.fast = False
        self.settled = False
        self.finished = False
        self.reused = False
        self.status = 0
        self.got_head = False
        self.upstream_paused = False
        self.sent_at = 0.0
        self.upstream_started = 0.0
        self.bytes_out = 0
        self.request_id = ""
        req.exchange = self

    # -- decisions ------------------------------------------------------------------
    def start(self) -> None:
        keep = self._decide()
        if keep is not None:
            self._finish(keep)
        elif not self._start_fast():
            self.task = self.session.loop.create_task(self._run_task(), name="exchange")

    def _decide(self) -> bool | None:
        """Answer what needs no backend (keep-alive as result); None: relay it."""
        session, req = self.session, self.req
        self.request_id = (self._request_id() if session.trusted
                           else f"{_ID_PREFIX}{next(_id_counter):016x}")
        if req.error is not None:
            return self.refuse(req.error[0], req.error[1])
        raw, routes = req.host, session.live.routes
        memo = session.route_memo
        if memo is not None and memo[0] == raw and memo[1] is routes:
            host, app = memo[2], memo[3]
        else:
            host = split_host(raw) if raw is not None else ""
            app = routes.resolve(host)
            session.route_memo = (raw, routes, host, app)
        self.host = host
        if host and session.misdirected(host):
            metrics.LIMITS_HIT.labels("misdirected").inc()
            return self.refuse(421, "Host not covered by the connection's certificate")
        if app is None:
            return self.refuse(404, "no app serves this host")
        self.app = app
        canonical = app.canonical_domain
        if canonical is not None and host != canonical:
            return self._redirect(canonical)
        # One backend (the usual app): no rotation list and modulo arithmetic.
        rotation = app.backends if len(app.backends) == 1 else app.rotation()
        self.backends = session.pool.available(rotation)
        if not self.backends:
            return self.refuse(503, "every backend is quarantined")
        self.head = self.forwarded_head()
        return None

    def _start_fast(self) -> bool:
        """Relay from the protocol callbacks when the request is complete and small and
        an idle pooled connection to the first backend is at hand; False: use a task.

        The task path costs per request: a task (~3 us to create and start on uvloop,
        measured), a future per attempt, the coroutine chain (_relay -> acquire ->
        _attempt -> _pump_body) and a wake-up per await. With this path, the batched
        metrics and the header trims, benchmarks/profile_worker.py went from 88 to
        62 us of CPU per keep-alive request (62 -> 39 us user; medians of 4 rounds
        interleaved on a busy machine).
        """
        req = self.req
        body = req.body
        if not body.done or body.size > _FAST_BODY_MAX or req.upgrade:
            return False
        conn = self.session.pool.take_idle(self.backends[0])
        if conn is None:
            return False
        self.fast = True
        self._send(conn, True)
        if body.chunks:
            data = b"".join(body.chunks)
            body.chunks.clear()
            body.size = 0
            body.consumed = True
            conn.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(data), data) if req.chunked else data)
        elif req.chunked:
            conn.write(b"0\r\n\r\n")
        return True

    async def _run_task(self) -> None:
        try:
            keep = await self._relay()
        except asyncio.CancelledError:
            keep = False  # the client left (client_gone)
        except Exception:
            log.exception("exchange %s failed", self.request_id)
            self.session.abort()
            keep = False
        self._finish(keep)

    def _finish(self, keep: bool) -> None:
        if self.finished:
            return
        self.finished = True
        self.task = None
        session = self.session
        self.req.exchange = None
        if session.access_log is not None:
            session.access_log.request(session, self)
        session.exchange_done(self, keep)

    def _request_id(self) -> str:
        """A trusted peer's X-Request-Id when well-formed, else our own."""
        for name, value in self.req.headers:
            if len(name) == 12 and name.lower() == b"x-request-id":
                if _REQUEST_ID.fullmatch(value):
                    return value.decode()
                break
        return _next_request_id()

    def refuse(self, status: int, why: str) -> bool:
        self.status = status
        count(self.app.name if self.app else "", status)
        return self.session.send_error(self.req, status, self.request_id, why)

    def _redirect(self, canonical: str) -> bool:
        port = self.session.port
        authority = canonical if port == 443 else f"{canonical}:{port}"
        path = self.req.url.decode("latin-1")
        self.status = 301
        count(self.app.name if self.app else "", 301)
        return self.session.send_redirect(self.req, f"https://{authority}{path}")

    async def _relay(self) -> bool:
        app = self.app
        assert app is not None
        pool = self.session.pool
        backends = self.backends
        i = 0
        while i < len(backends):
            if self.early is not None:
                return self._answer_early()
            backend = backends[i]
            try:
                conn, reused = await pool.acquire(backend)
            except PoolFull:
                return self.refuse(503, "backend queue is full")
            except (TimeoutError, OSError) as exc:
                timeout = isinstance(exc, TimeoutError)
                if timeout:
                    metrics.LIMITS_HIT.labels("upstream_connect_timeout").inc()
                metrics.UPSTREAM_ERRORS.labels(app.name, "timeout" if timeout
                                               else "connect").inc()
                pool.quarantine(backend)
                i += 1
                continue
            if self.early is not None:
                pool.release(conn)  # nothing was sent on it
                return self._answer_early()
            outcome = await self._attempt(conn, reused)
            if isinstance(outcome, bool):
                return outcome
            if isinstance(outcome, int):
                return self.refuse(outcome, "upstream failure or client limit")
            if not self._may_resend():
                break
            # Resent to the same backend on its next pooled connection or a new one:
            # the pool is finite, and a failing new connection ends the loop.
        return self.refuse(502, "no backend answered")

    def _answer_early(self) -> bool:
        early = self.early
        if isinstance(early, bool):
            return early
        assert early is not None
        return self.refuse(early, "client limit")

    def _may_resend(self) -> bool:
        """The backend dropped the connection before answering. A pooled connection the
        backend had already closed is the usual cause; resend only when no body bytes
        were consumed, so nothing is sent twice."""
        body = self.req.body
        return self.reused and body.done and not body.consumed

    # -- the request to the backend ------------------------------------------------
    def forwarded_head(self) -> bytes:
        """The request head as the backend sees it (~2 us for wrk's head; one format
        for the usual forwarding headers instead of pieces measured ~3 us)."""
        session, req = self.session, self.req
        headers = req.headers
        # Usually no header needs dropping or merging: one regex over the names
        # finds that and the lines are joined in C, instead of a Python loop with
        # a lower() and two set lookups per header.
        if not headers or not _SPECIAL_REQUEST_HEADER.search(
                b"\n".join(map(_first, headers))):
            return _PLAIN_HEAD % (
                req.method, req.url,
                b"\r\n".join(map(b": ".join, headers)) + b"\r\n" if headers else b"",
                b"transfer-encoding: chunked\r\n" if req.chunked else b"",
                b"connection: upgrade\r\nupgrade: websocket\r\n" if req.upgrade else b"",
                session.peer.encode(), session.scheme.encode(),
                self.host.encode("latin-1"), session.port, self.request_id.encode(),
                int(time.time() * 1_000_000))
        trusted = session.trusted
        drop = _REQUEST_DROP_TRUSTED if trusted else _REQUEST_DROP_UNTRUSTED
        out = [req.method, b" ", req.url, b" HTTP/1.1\r\n"]
        named = _tokens(req.connection) if req.connection is not None else _NO_TOKENS
        xff = None
        present: set[bytes] = set()
        for name, value in req.headers:
            lname = name.lower()
            if lname in drop or lname in named:
                continue
            if trusted and lname in _FORWARDING:
                present.add(lname)
                if lname == b"x-forwarded-for":
                    xff = value if xff is None else xff + b", " + value
                    continue
                if lname == b"x-request-id":
                    continue
            out += (name, b": ", value, b"\r\n")
        if req.chunked:
            out.append(b"transfer-encoding: chunked\r\n")
        if req.upgrade:
            out.append(b"connection: upgrade\r\nupgrade: websocket\r\n")
        peer = session.peer.encode()
        host = self.host.encode("latin-1")
        start = int(time.time() * 1_000_000)
        if not present:
            out.append(_FORWARDED % (peer if xff is None else xff + b", " + peer,
                                     session.scheme.encode(), host, session.port,
                                     self.request_id.encode(), start))
            return b"".join(out)
        out += (b"x-forwarded-for: ", peer if xff is None else xff + b", " + peer, b"\r\n")
        if b"x-forwarded-proto" not in present:
            out += (b"x-forwarded-proto: ", session.scheme.encode(), b"\r\n")
        if b"x-forwarded-host" not in present:
            out += (b"x-forwarded-host: ", host, b"\r\n")
        if b"x-forwarded-port" not in present:
            out += (b"x-forwarded-port: ", str(session.port).encode(), b"\r\n")
        out.append(b"x-request-id: %s\r\nx-request-start: t=%d\r\n\r\n"
                   % (self.request_id.encode(), start))
        return b"".join(out)

    def _send(self, conn: UpstreamConnection, reused: bool) -> None:
        """Begin an attempt on `conn`: the head is written, its response comes to us."""
        req = self.req
        self.conn = conn
        self.reused = reused
        self.got_head = False
        self.settled = False
        now = time.monotonic()
        session = self.session
        conn.start(self, session, req.method == b"HEAD", req.upgrade, now)
        self.upstream_started = now
        self.sent_at = now if self.fast else 0.0
        conn.write(self.head)
        if session.write_paused:
            self.pause_upstream()
        session.watch_by(session.live.limits.upstream_first_byte_timeout, now)

    async def _attempt(self, conn: UpstreamConnection, reused: bool) -> bool | int | None:
        waiter: asyncio.Future[bool | int | None] = self.session.loop.create_future()
        self.waiter = waiter
        self._send(conn, reused)
        try:
            await self._pump_body(conn)
        except OSError:
            pass  # the backend went away mid-body; the response side reports it
        except asyncio.CancelledError:
            conn.detach()
            raise
        self.sent_at = time.monotonic()
        return await waiter

    async def _pump_body(self, conn: UpstreamConnection) -> None:
        req = self.req
        if req.upgrade:
            return
        chunked = req.chunked
        while True:
            data = await req.body.read()
            if data is None or self.settled:
                break
            if not conn.usable:
                return
            if chunked:
                conn.write(b"%x\r\n%s\r\n" % (len(data), data))
            else:
                conn.write(data)
            await conn.drain()
        if req.body.truncated:
            # A cut upload must not reach the app looking complete (a chunked body
            # would get its final 0-chunk): reset the backend connection instead.
            self.fail("request_body_incomplete", 400)
            return
        if chunked and conn.usable and not self.settled:
            conn.write(b"0\r\n\r\n")

    # -- outcomes -------------------------------------------------------------------
    def _settle(self, outcome: bool | int | None) -> None:
        """The attempt ended: keep-alive (bool), a status to answer with, or None (the
        backend dropped the connection before answering)."""
        if self.settled:
            return
        self.settled = True
        waiter, self.waiter = self.waiter, None
        if waiter is not None:
            if not waiter.done():
                waiter.set_result(outcome)
            return
        if not self.fast:
            self.early = outcome  # no attempt running: `_relay` answers with it
            return
        if isinstance(outcome, bool):
            self._finish(outcome)
        elif isinstance(outcome, int):
            self._finish(self.refuse(outcome, "upstream failure or client limit"))
        elif self._may_resend():
            # A pooled connection the backend had closed: the task path resends.
            self.fast = False
            self.task = self.session.loop.create_task(self._run_task(), name="exchange")
        else:
            self._finish(self.refuse(502, "no backend answered"))

    # -- timeouts -------------------------------------------------------------------
    def watch(self, now: float) -> float | None:
        """Called from the client side's one timer per connection (no call_later and
        cancel per exchange, ~0.7 us measured): fail what is overdue, else the seconds
        until the next check (None: nothing to time)."""
        conn = self.conn
        if conn is None or self.settled or conn.tunnel:
            return None
        limits = self.session.live.limits
        if not self.got_head:
            if self.sent_at == 0.0:  # still uploading: the client side times that
                return limits.upstream_first_byte_timeout
            left = limits.upstream_first_byte_timeout - (now - self.sent_at)
            if left > 0:
                return left
            self.fail("upstream_first_byte_timeout", 504)
            return None
        if self.upstream_paused:  # the client reads slowly; that is not the backend
            return limits.upstream_read_timeout
        left = limits.upstream_read_timeout - (now - conn.last_read)
        if left > 0:
            return left
        self.fail("upstream_read_timeout", 504)
        return None

    def fail(self, limit: str | None, status: int) -> None:
        """Give up on this exchange: a limit fired (timeout, body size, bad body)."""
        if limit is not None:
            metrics.LIMITS_HIT.labels(limit).inc()
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.detach()
        if self.settled:
            return
        if self.got_head:
            # Part of the response is on the wire: cutting is the only honest signal.
            self.session.abort()
            self._settle(False)
        else:
            self._settle(status)

    # -- ResponseSink -----------------------------------------------------------------
    def response_head(self, status: int, reason: bytes, version: str,
                      headers: list[tuple[bytes, bytes]], keep_alive: bool,
                      framing: str) -> None:
        req = self.req
        if 100 <= status < 200 and status != 101:
            self.session.send_interim(req, status, reason)
            return
        self.status = status
        self.got_head = True
        # `headers` arrive without hop-by-hop ones and without `dropped_headers` (the
        # connection sorts them as they are parsed); this list is ours to extend.
        out = headers
        app = self.app
        if app is not None:
            _observe_upstream(app.name, time.monotonic() - self.upstream_started)
            if app.force_https and self.session.scheme == "https":
                out.append(_HSTS)
        if status == 101:
            out.append((b"connection", b"upgrade"))
            out.append((b"upgrade", b"websocket"))
        self.session.send_head(req, status, reason, out, framing, keep_alive)
        if status == 101:
            self.session.start_tunnel(self)
            if req.tunnel_early and self.conn is not None:
                self.conn.write(req.tunnel_early)
                req.tunnel_early = b""

    def response_body(self, data: bytes) -> None:
        self.bytes_out += len(data)
        self.session.send_body(data)

    def response_done(self, reusable: bool) -> None:
        conn, self.conn = self.conn, None
        if not self.req.upgrade or self.status != 101:
            self.session.end_body()
        if conn is not None:
            if reusable and self.req.body.done and not self.settled:
                self.session.pool.release(conn)
            elif conn.transport is not None:
                conn.transport.close()
        count(self.app.name if self.app else "", self.status)
        self._settle(self.req.body.done and self.status != 101)

    def response_failed(self, exc: BaseException | None, got_head: bool) -> None:
        app = self.app.name if self.app else ""
        kind = ("protocol" if isinstance(exc, BadResponse)
                else "reset" if exc is None or isinstance(exc, OSError) else "protocol")
        metrics.UPSTREAM_ERRORS.labels(app, kind).inc()
        if isinstance(exc, BadResponse):
            log.info("refused a response from a backend of %s: %s", app, exc)
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.detach()
        if self.settled:
            return
        if got_head or self.got_head:
            # Part of the response is on the wire: cut the client connection.
            count(app, self.status)
            self.session.abort()
            self._settle(False)
        elif isinstance(exc, BadResponse):
            self._settle(502)
        else:
            self._settle(None)

    def tunnel_data(self, data: bytes) -> None:
        self.bytes_out += len(data)
        self.session.tunnel_to_client(data)

    def upstream_write_paused(self, paused: bool) -> None:
        if paused:
            self.session.pause_reading_client()
        else:
            self.session.resume_reading_client()

    # -- used by the client side ----------------------------------------------------
    def tunnel_from_client(self, data: bytes) -> None:
        conn = self.conn
        if conn is not None and conn.usable:
            conn.write(data)

    def pause_upstream(self) -> None:
        self.upstream_paused = True
        conn = self.conn
        if conn is not None and conn.transport is not None:
            conn.transport.pause_reading()

    def resume_upstream(self) -> None:
        self.upstream_paused = False
        conn = self.conn
        if conn is not None and conn.transport is not None and not conn.transport.is_closing():
            conn.transport.resume_reading()

    def client_gone(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            if conn.tunnel and conn.transport is not None:
                conn.sink = None
                conn.transport.close()
            else:
                conn.detach()
        task = self.task
        if task is not None:
            task.cancel()  # _run_task finishes the exchange
        else:
            self.settled = True
            self._finish(False)
