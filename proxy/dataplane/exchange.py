"""One request from routing to the end of its response, independent of the client's
protocol: Host vs certificate (421), app lookup, canonical-domain redirect, backend
choice (round robin, quarantine, queue), the request head the backend sees, the
response headers the client sees, upstream timeouts and the WebSocket tunnel.

The client side (today the HTTP/1.1 session; later an HTTP/2 stream) implements
`ClientSide` and owns framing. Nothing here writes client bytes directly, blocks or
touches the store.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import re
import time
from collections import deque
from typing import TYPE_CHECKING, Protocol

from prometheus_client import Counter

from proxy import metrics
from proxy.dataplane.accesslog import AccessLog
from proxy.dataplane.upstream import BadResponse, PoolFull, UpstreamConnection, UpstreamPool
from proxy.routing import App

if TYPE_CHECKING:
    from proxy.dataplane.state import Live

log = logging.getLogger("tlsedge.http")

# Request headers a client may not pass through us: hop-by-hop (RFC 9110 7.6.1).
_HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"te", b"trailer", b"transfer-encoding", b"upgrade",
    b"proxy-connection", b"proxy-authorization", b"proxy-authenticate",
})
# Set by us; from a peer outside trusted_proxies they are dropped.
_FORWARDING = frozenset({
    b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"x-forwarded-port",
    b"forwarded", b"x-real-ip", b"x-request-id",
})
_REQUEST_DROP_UNTRUSTED = _HOP_BY_HOP | _FORWARDING | {b"x-request-start"}
_REQUEST_DROP_TRUSTED = _HOP_BY_HOP | {b"x-request-start"}
_RESPONSE_DROP = _HOP_BY_HOP | {b"content-length"}
_REQUEST_ID = re.compile(rb"[A-Za-z0-9._:+/=-]{8,128}")
_BODY_HIGH = 256 * 1024
_CODE_CLASS = {1: "1xx", 2: "2xx", 3: "3xx", 4: "4xx", 5: "5xx"}
_HSTS = (b"strict-transport-security", b"max-age=31536000")


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

    def send_interim(self, req: Request, status: int, reason: bytes) -> None: ...

    def send_head(self, req: Request, status: int, reason: bytes,
                  headers: list[tuple[bytes, bytes]], framing: str,
                  upstream_keep: bool) -> None: ...

    def send_body(self, data: bytes) -> None: ...

    def end_body(self) -> None: ...

    def send_error(self, req: Request, status: int, request_id: str, why: str) -> bool: ...

    def send_redirect(self, req: Request, location: str) -> bool: ...

    def start_tunnel(self, exchange: Exchange) -> None: ...

    def tunnel_to_client(self, data: bytes) -> None: ...

    def pause_reading_client(self) -> None: ...

    def resume_reading_client(self) -> None: ...

    def client_paused(self) -> bool: ...

    def abort(self) -> None: ...

    def misdirected(self, host: str) -> bool: ...

    def cork(self) -> None: ...

    def uncork(self) -> None: ...

    @property
    def loop(self) -> asyncio.AbstractEventLoop: ...


class Body:
    """A request body in flight: the client side feeds it, the exchange reads it."""

    __slots__ = ("chunks", "consumed", "done", "last", "session", "size", "total",
                 "waiter")

    def __init__(self, session: ClientSide) -> None:
        self.session = session
        self.chunks: deque[bytes] = deque()
        self.size = 0
        self.total = 0
        self.last = 0.0
        self.consumed = False
        self.done = False
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
        self._wake()

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

    __slots__ = ("body", "chunked", "content_length", "error", "exchange", "headers",
                 "host", "keep_alive", "method", "started", "tunnel_early", "upgrade",
                 "url", "version")

    def __init__(self, session: ClientSide) -> None:
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.method = b""
        self.version = "1.1"
        self.keep_alive = True
        self.host: bytes | None = None
        self.chunked = False
        self.content_length: bytes | None = None
        self.upgrade = False
        self.tunnel_early = b""
        self.started = 0.0
        self.body = Body(session)
        self.exchange: Exchange | None = None
        # Set when this request must be refused, not relayed: (status, why).
        self.error: tuple[int, str] | None = None


_REQUESTS_CHILDREN: dict[tuple[str, int], Counter] = {}


# Request ids: a random per-process prefix and a counter. Unique and cheap (no
# getrandom syscall per request); they identify requests, they are not secrets.
_ID_PREFIX = os.urandom(8).hex()
_id_counter = itertools.count(1)


def _next_request_id() -> str:
    return f"{_ID_PREFIX}{next(_id_counter):016x}"


def count(app: str, status: int) -> None:
    """Count one answered request; label children are cached (labels() costs ~1 us)."""
    key = (app, status // 100)
    child = _REQUESTS_CHILDREN.get(key)
    if child is None:
        child = metrics.REQUESTS.labels(app, _CODE_CLASS.get(status // 100, "5xx"))
        _REQUESTS_CHILDREN[key] = child
    child.inc()


def split_host(value: bytes) -> str:
    """Host header value -> lower-case host without port or trailing dot."""
    host = value.strip().lower().decode("latin-1")
    if host.startswith("["):
        end = host.find("]")
        return host[: end + 1] if end > 0 else host
    colon = host.rfind(":")
    if colon >= 0:
        host = host[:colon]
    return host.rstrip(".")


class Exchange:
    """One request relayed to one backend, and its response relayed back.

    `run` resolves to whether the client connection may carry another request.
    """

    __slots__ = ("app", "bytes_out", "conn", "done", "got_head", "host", "req",
                 "request_id", "sent_at", "session", "status", "upstream_paused",
                 "upstream_started", "watchdog")

    def __init__(self, session: ClientSide, req: Request) -> None:
        self.session = session
        self.req = req
        self.app: App | None = None
        self.host = ""
        self.conn: UpstreamConnection | None = None
        self.done: asyncio.Future[bool | int | None] = session.loop.create_future()
        self.status = 0
        self.got_head = False
        self.upstream_paused = False
        self.sent_at = 0.0
        self.upstream_started = 0.0
        self.bytes_out = 0
        self.watchdog: asyncio.TimerHandle | None = None
        self.request_id = ""
        req.exchange = self

    # -- decisions ------------------------------------------------------------------
    async def run(self) -> bool:
        session, req = self.session, self.req
        live = session.live
        self.request_id = self._request_id()
        try:
            if req.error is not None:
                return self.refuse(req.error[0], req.error[1])
            host = split_host(req.host) if req.host is not None else ""
            self.host = host
            if host and session.misdirected(host):
                metrics.LIMITS_HIT.labels("misdirected").inc()
                return self.refuse(421, "Host not covered by the connection's certificate")
            app = live.routes.resolve(host)
            if app is None:
                return self.refuse(404, "no app serves this host")
            self.app = app
            canonical = app.canonical_domain
            if canonical is not None and host != canonical:
                return self._redirect(canonical)
            return await self._relay(app)
        finally:
            if self.watchdog is not None:
                self.watchdog.cancel()
            req.exchange = None
            if session.access_log is not None:
                session.access_log.request(session, self)

    def _request_id(self) -> str:
        if self.session.trusted:
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

    async def _relay(self, app: App) -> bool:
        session, req = self.session, self.req
        pool = session.pool
        backends = [b for b in app.rotation() if not pool.quarantined(b)]
        if not backends:
            return self.refuse(503, "every backend is quarantined")
        head = self.forwarded_head()
        for backend in backends:
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
                continue
            outcome = await self._attempt(conn, head)
            if isinstance(outcome, bool):
                return outcome
            if isinstance(outcome, int):
                return self.refuse(outcome, "upstream failure or client limit")
            # The backend dropped the connection before answering. A pooled connection
            # the backend had already closed is the usual cause; resend only when no
            # body bytes were consumed, so nothing is sent twice.
            if not (reused and req.body.done and not req.body.consumed):
                break
        return self.refuse(502, "no backend answered")

    # -- the request to the backend ------------------------------------------------
    def forwarded_head(self) -> bytes:
        """The request head as the backend sees it."""
        session, req = self.session, self.req
        trusted = session.trusted
        drop = _REQUEST_DROP_TRUSTED if trusted else _REQUEST_DROP_UNTRUSTED
        out = [req.method, b" ", req.url, b" HTTP/1.1\r\n"]
        named: set[bytes] = set()
        for name, value in req.headers:
            if len(name) == 10 and name.lower() == b"connection":
                named.update(t.strip().lower() for t in value.split(b","))
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
        out += (b"x-forwarded-for: ", peer if xff is None else xff + b", " + peer, b"\r\n")
        if b"x-forwarded-proto" not in present:
            out += (b"x-forwarded-proto: ", session.scheme.encode(), b"\r\n")
        if b"x-forwarded-host" not in present:
            out += (b"x-forwarded-host: ", self.host.encode("latin-1"), b"\r\n")
        if b"x-forwarded-port" not in present:
            out += (b"x-forwarded-port: ", str(session.port).encode(), b"\r\n")
        out += (
            b"x-request-id: ", self.request_id.encode(), b"\r\n",
            b"x-request-start: t=", str(int(time.time() * 1_000_000)).encode(), b"\r\n\r\n",
        )
        return b"".join(out)

    async def _attempt(self, conn: UpstreamConnection, head: bytes) -> bool | int | None:
        req = self.req
        self.conn = conn
        self.got_head = False
        if self.done.done():  # a retry on another connection
            self.done = self.session.loop.create_future()
        conn.start(self, head_only=req.method == b"HEAD", upgrade=req.upgrade)
        self.upstream_started = time.monotonic()
        self.sent_at = 0.0
        conn.write(head)
        if self.session.client_paused():
            self.pause_upstream()
        self._arm(self.session.live.limits.upstream_first_byte_timeout)
        try:
            await self._pump_body(conn)
        except OSError:
            pass  # the backend went away mid-body; the response side reports it
        except asyncio.CancelledError:
            conn.detach()
            raise
        self.sent_at = time.monotonic()
        return await self.done

    async def _pump_body(self, conn: UpstreamConnection) -> None:
        req = self.req
        if req.upgrade:
            return
        chunked = req.chunked
        while True:
            data = await req.body.read()
            if data is None or self.done.done():
                break
            if not conn.usable:
                return
            if chunked:
                conn.write(b"%x\r\n%s\r\n" % (len(data), data))
            else:
                conn.write(data)
            await conn.drain()
        if chunked and conn.usable and not self.done.done():
            conn.write(b"0\r\n\r\n")

    # -- timeouts -------------------------------------------------------------------
    def _arm(self, delay: float) -> None:
        self.watchdog = self.session.loop.call_later(max(delay, 0.01), self._watch)

    def _watch(self) -> None:
        """One timer per exchange, re-armed for what remains (no per-read timers)."""
        self.watchdog = None
        conn = self.conn
        if conn is None or self.done.done() or conn.tunnel:
            return
        limits = self.session.live.limits
        now = time.monotonic()
        if not self.got_head:
            if self.sent_at == 0.0:  # still uploading: the client side times that
                self._arm(limits.upstream_first_byte_timeout)
                return
            left = limits.upstream_first_byte_timeout - (now - self.sent_at)
            if left > 0:
                self._arm(left)
                return
            self.fail("upstream_first_byte_timeout", 504)
            return
        if self.upstream_paused:  # the client reads slowly; that is not the backend
            self._arm(limits.upstream_read_timeout)
            return
        left = limits.upstream_read_timeout - (now - conn.last_read)
        if left > 0:
            self._arm(left)
            return
        self.fail("upstream_read_timeout", 504)

    def fail(self, limit: str | None, status: int) -> None:
        """Give up on this exchange: a limit fired (timeout, body size, bad body)."""
        if limit is not None:
            metrics.LIMITS_HIT.labels(limit).inc()
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.detach()
        if self.done.done():
            return
        if self.got_head:
            # Part of the response is on the wire: cutting is the only honest signal.
            self.session.abort()
            self.done.set_result(False)
        else:
            self.done.set_result(status)

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
        if self.app is not None:
            metrics.UPSTREAM_SECONDS.labels(self.app.name).observe(
                time.monotonic() - self.upstream_started)
        named: set[bytes] = set()
        for name, value in headers:
            if len(name) == 10 and name.lower() == b"connection":
                named.update(t.strip().lower() for t in value.split(b","))
        out: list[tuple[bytes, bytes]] = []
        for name, value in headers:
            lname = name.lower()
            if lname in _RESPONSE_DROP or lname in named:
                if lname == b"content-length" and framing in ("length", "none"):
                    out.append((name, value))
                continue
            if lname == b"strict-transport-security":
                continue
            out.append((name, value))
        if self.app is not None and self.app.force_https and self.session.scheme == "https":
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
            if reusable and self.req.body.done and not self.done.done():
                self.session.pool.release(conn)
            elif conn.transport is not None:
                conn.transport.close()
        count(self.app.name if self.app else "", self.status)
        if not self.done.done():
            self.done.set_result(self.req.body.done and self.status != 101)

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
        if self.done.done():
            return
        if got_head or self.got_head:
            # Part of the response is on the wire: cut the client connection.
            count(app, self.status)
            self.session.abort()
            self.done.set_result(False)
        elif isinstance(exc, BadResponse):
            self.done.set_result(502)
        else:
            self.done.set_result(None)

    def cork(self) -> None:
        self.session.cork()

    def uncork(self) -> None:
        self.session.uncork()

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
        if not self.done.done():
            self.done.set_result(False)
