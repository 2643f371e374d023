"""The HTTP/1.1 session of one client connection: parse, route by Host, relay.

Requests are parsed with httptools in the protocol callbacks; one task per
connection relays them in order (pipelining keeps order). Bodies stream both ways
with flow control; nothing is buffered whole. This module never touches the store,
never blocks, and never forwards a request the parser rejected.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import deque
from collections.abc import Callable
from typing import cast

import httptools
from prometheus_client import Counter

from proxy import metrics
from proxy.dataplane import pages
from proxy.dataplane.state import Live
from proxy.dataplane.upstream import WRITE_HIGH, UpstreamConnection, UpstreamPool
from proxy.routing import App, split_host

log = logging.getLogger("tlsedge.http")

# Request headers a client may not pass through us: hop-by-hop (RFC 9110 7.6.1) and
# the forwarding headers we set ourselves.
_HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"te", b"trailer", b"transfer-encoding", b"upgrade",
    b"proxy-connection", b"proxy-authorization", b"proxy-authenticate",
})
_FORWARDING = frozenset({
    b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"x-forwarded-port",
    b"forwarded", b"x-real-ip", b"x-request-start",
})
_REQUEST_DROP = _HOP_BY_HOP | _FORWARDING
_RESPONSE_DROP = _HOP_BY_HOP | {b"content-length"}
_BODY_HIGH = 256 * 1024
_CODE_CLASS = {1: "1xx", 2: "2xx", 3: "3xx", 4: "4xx", 5: "5xx"}


class Body:
    """A request body in flight: parser callbacks feed it, the relay task reads it."""

    __slots__ = ("chunks", "consumed", "done", "session", "size", "waiter")

    def __init__(self, session: HttpSession) -> None:
        self.session = session
        self.chunks: deque[bytes] = deque()
        self.size = 0
        self.consumed = False
        self.done = False
        self.waiter: asyncio.Future[None] | None = None

    def feed(self, data: bytes) -> None:
        self.chunks.append(data)
        self.size += len(data)
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
            self.waiter = asyncio.get_running_loop().create_future()
            await self.waiter
        data = self.chunks.popleft()
        self.consumed = True
        self.size -= len(data)
        if self.size <= _BODY_HIGH // 2:
            self.session.resume_reading_client()
        return data


class Request:
    __slots__ = ("body", "chunked", "content_length", "error", "headers", "host",
                 "keep_alive", "method", "url", "version")

    def __init__(self, session: HttpSession) -> None:
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.method = b""
        self.version = "1.1"
        self.keep_alive = True
        self.host: bytes | None = None
        self.chunked = False
        self.content_length: bytes | None = None
        self.body = Body(session)
        # Set when this request must be refused, not relayed: (status, why).
        self.error: tuple[int, str] | None = None


class HttpSession(asyncio.Protocol):
    """One client connection (after TLS) speaking HTTP/1.1 to us."""

    __slots__ = (
        "_broken",
        "_client_paused",
        "_current",
        "_done",
        "_early",
        "_idle_timer",
        "_loop",
        "_on_lost",
        "_queue",
        "_queue_waiter",
        "_read_paused",
        "_resp",
        "_task",
        "closed",
        "live",
        "parser",
        "peer",
        "pool",
        "port",
        "scheme",
        "tls_version",
        "transport",
    )

    def __init__(self, live: Live, pool: UpstreamPool, *, scheme: str, port: int,
                 peer: str, tls_version: str = "",
                 on_lost: Callable[[HttpSession], None] | None = None) -> None:
        self.live = live
        self._on_lost = on_lost
        self.closed = False
        self._early: list[bytes] = []
        self.pool = pool
        self.scheme = scheme
        self.port = port
        self.peer = peer
        self.tls_version = tls_version
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self._loop = asyncio.get_running_loop()
        self._queue: deque[Request] = deque()
        self._queue_waiter: asyncio.Future[None] | None = None
        self._current: Request | None = None
        self._resp: _Exchange | None = None
        self._task: asyncio.Task[None] | None = None
        self._read_paused = False
        self._client_paused = False
        self._done = False
        self._broken = False
        self._idle_timer: asyncio.TimerHandle | None = None

    # -- asyncio.Protocol ---------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(high=WRITE_HIGH)
        self._task = self._loop.create_task(self._serve(), name=f"http-session {self.peer}")
        self._arm_idle(self.live.limits.request_head_timeout)
        early, self._early = self._early, []
        for data in early:
            self.data_received(data)

    def connection_lost(self, exc: BaseException | None) -> None:
        self._done = True
        self.closed = True
        if self._on_lost is not None:
            self._on_lost(self)
        if self._idle_timer is not None:
            self._idle_timer.cancel()
        if self._queue_waiter is not None and not self._queue_waiter.done():
            self._queue_waiter.set_result(None)
        if self._current is not None:
            self._current.body.finish()
        if self._resp is not None:
            self._resp.client_gone()
        if self._task is not None and not self._task.done():
            self._task.cancel()

    def data_received(self, data: bytes) -> None:
        if self.transport is None:
            # start_tls() does not call connection_made(): the acceptor does it when
            # the handshake task completes, which can be after the first bytes.
            self._early.append(data)
            return
        if self._broken:
            return  # the parser refused earlier bytes; nothing after them is read
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # Upgrade requests (WebSocket) are relayed by the data-plane issue; refuse
            # them cleanly until then rather than half-forwarding. httptools raises
            # after the request was queued (on_message_complete ran): refuse that one.
            self._reject(501, "upgrade is not supported yet",
                         self._queue[-1] if self._queue else None)
        except (httptools.HttpParserError, httptools.HttpParserInvalidMethodError,
                httptools.HttpParserInvalidURLError) as exc:
            log.debug("bad request from %s: %s", self.peer, exc)
            self._reject(400, "malformed request")

    def eof_received(self) -> bool | None:
        # The client half-closed: finish what is in flight, then close.
        if self._current is not None:
            self._current.body.finish()
        if not self._queue and self._resp is None and self.transport is not None:
            self.transport.close()
        return True

    def pause_writing(self) -> None:
        self._client_paused = True
        if self._resp is not None:
            self._resp.pause_upstream()

    def resume_writing(self) -> None:
        self._client_paused = False
        if self._resp is not None:
            self._resp.resume_upstream()

    def drain(self) -> None:
        """Finish the request in flight (if any), then close; used at shutdown."""
        self._done = True
        if self._resp is None and self._current is None and self.transport is not None:
            self.transport.close()
        waiter, self._queue_waiter = self._queue_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def pause_reading_client(self) -> None:
        if not self._read_paused and self.transport is not None:
            self._read_paused = True
            self.transport.pause_reading()

    def resume_reading_client(self) -> None:
        if self._read_paused and self.transport is not None and not self._done:
            self._read_paused = False
            self.transport.resume_reading()

    # -- httptools callbacks ------------------------------------------------------
    def on_message_begin(self) -> None:
        self._current = Request(self)

    def on_url(self, url: bytes) -> None:
        assert self._current is not None
        self._current.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        req = self._current
        assert req is not None
        req.headers.append((name, value))

    def on_headers_complete(self) -> None:
        req = self._current
        assert req is not None
        p = self.parser
        req.method = p.get_method()
        req.version = p.get_http_version()
        req.keep_alive = p.should_keep_alive()
        for name, value in req.headers:
            lname = name.lower()
            if lname == b"host":
                req.host = value
            elif lname == b"transfer-encoding":
                req.chunked = True
            elif lname == b"content-length":
                req.content_length = value
        self._queue.append(req)
        waiter, self._queue_waiter = self._queue_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def on_body(self, body: bytes) -> None:
        if self._current is not None:
            self._current.body.feed(body)

    def on_message_complete(self) -> None:
        if self._current is not None:
            self._current.body.finish()
            self._current = None

    # -- relay --------------------------------------------------------------------
    async def _serve(self) -> None:
        try:
            while not self._done:
                if not self._queue:
                    self._queue_waiter = self._loop.create_future()
                    await self._queue_waiter
                    continue
                req = self._queue.popleft()
                keep = await self._handle(req)
                if not keep or not req.keep_alive:
                    self._close_after_flush()
                    return
                if not self._queue:
                    self._arm_idle(self.live.limits.keepalive_timeout)
        except asyncio.CancelledError:
            pass
        except Exception:
            log.exception("session for %s failed", self.peer)
            if self.transport is not None:
                self.transport.abort()

    async def _handle(self, req: Request) -> bool:
        """Relay one request; returns whether the connection may carry another."""
        started = time.monotonic()
        request_id = os.urandom(16).hex()
        if req.error is not None:
            return self._respond_error(req, req.error[0], request_id, "", req.error[1])
        if req.host is None:
            if req.version == "1.1":
                return self._respond_error(req, 400, request_id, "", "missing Host header")
            host = ""
        else:
            host = split_host(req.host.decode("latin-1"))
        app = self.live.routes.resolve(host)
        if app is None:
            return self._respond_error(req, 404, request_id, "", "no app serves this host")
        exchange = _Exchange(self, req, app, started)
        self._resp = exchange
        try:
            return await exchange.run(request_id, host)
        finally:
            self._resp = None

    def _respond_error(self, req: Request | None, status: int, request_id: str, app: str,
                       why: str) -> bool:
        keep = req is not None and req.body.done and req.keep_alive
        head, body = pages.error(status, request_id, keep_alive=keep,
                                 head_only=req is not None and req.method == b"HEAD")
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(head + body)
        count(app, status)
        log.debug("%s %s: %s", status, request_id, why)
        return keep

    def _reject(self, status: int, why: str, req: Request | None = None) -> None:
        """Refuse what the parser could not accept, in order, then close.

        Pipelined requests before the bad bytes are still answered first: the
        refusal is queued behind them, never written over a response in flight.
        """
        self._broken = True
        if self.transport is not None:
            self.transport.pause_reading()
        current = self._current
        if req is None and current is not None and current.method:
            # The head was accepted and is queued or relayed, its body is broken: the
            # backend may have part of it, so no status is honest. Cut the connection.
            if self.transport is not None:
                self.transport.abort()
            return
        self._current = None
        if req is None:
            req = Request(self)
            self._queue.append(req)
        req.error = (status, why)
        req.keep_alive = False
        req.body.done = True
        waiter, self._queue_waiter = self._queue_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _close_after_flush(self) -> None:
        self._done = True
        if self.transport is not None:
            self.transport.close()

    def _arm_idle(self, timeout: float) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
        self._idle_timer = self._loop.call_later(timeout, self._idle_expired)

    def _idle_expired(self) -> None:
        self._idle_timer = None
        if self._resp is None and not self._queue and self.transport is not None:
            metrics.LIMITS_HIT.labels("keepalive_timeout").inc()
            self.transport.close()

    def forwarded_head(self, req: Request, host: str, request_id: str) -> bytes:
        """The request head as the backend sees it."""
        out = [req.method, b" ", req.url, b" HTTP/1.1\r\n"]
        connection_named: set[bytes] = set()
        for name, value in req.headers:
            if name.lower() == b"connection":
                connection_named.update(t.strip().lower() for t in value.split(b","))
        for name, value in req.headers:
            lname = name.lower()
            if lname in _REQUEST_DROP or lname in connection_named or lname == b"x-request-id":
                continue
            out += (name, b": ", value, b"\r\n")
        if req.chunked:
            out.append(b"transfer-encoding: chunked\r\n")
        out += (
            b"x-forwarded-for: ", self.peer.encode(), b"\r\n",
            b"x-forwarded-proto: ", self.scheme.encode(), b"\r\n",
            b"x-forwarded-host: ", host.encode("latin-1"), b"\r\n",
            b"x-forwarded-port: ", str(self.port).encode(), b"\r\n",
            b"x-request-id: ", request_id.encode(), b"\r\n",
            b"x-request-start: t=", str(int(time.time() * 1_000_000)).encode(), b"\r\n\r\n",
        )
        return b"".join(out)


_REQUESTS_CHILDREN: dict[tuple[str, int], Counter] = {}


def count(app: str, status: int) -> None:
    """Count one answered request; label children are cached (labels() costs ~1 us)."""
    key = (app, status // 100)
    child = _REQUESTS_CHILDREN.get(key)
    if child is None:
        child = metrics.REQUESTS.labels(app, _CODE_CLASS.get(status // 100, "5xx"))
        _REQUESTS_CHILDREN[key] = child
    child.inc()


class _Exchange:
    """One request relayed to one backend, and its response relayed back."""

    __slots__ = ("app", "chunked_out", "conn", "done", "got_head", "req", "sent_first",
                 "session", "started", "status", "upstream_started")

    def __init__(self, session: HttpSession, req: Request, app: App, started: float) -> None:
        self.session = session
        self.req = req
        self.app = app
        self.started = started
        self.conn: UpstreamConnection | None = None
        self.done: asyncio.Future[bool | None] = session._loop.create_future()
        self.status = 0
        self.got_head = False
        self.chunked_out = False
        self.sent_first = False
        self.upstream_started = 0.0

    async def run(self, request_id: str, host: str) -> bool:
        session, req, app = self.session, self.req, self.app
        head = session.forwarded_head(req, host, request_id)
        for backend in app.rotation():
            try:
                conn, reused = await session.pool.acquire(backend)
            except (TimeoutError, OSError) as exc:
                kind = "timeout" if isinstance(exc, asyncio.TimeoutError) else "connect"
                metrics.UPSTREAM_ERRORS.labels(app.name, kind).inc()
                continue
            outcome = await self._attempt(conn, head)
            if outcome is not None:
                return outcome
            # The backend dropped the connection before answering. A pooled connection
            # the backend had already closed is the usual cause; resend only when no
            # body bytes were consumed, so nothing is sent twice.
            if not (reused and req.body.done and not req.body.consumed):
                break
        return session._respond_error(req, 502, request_id, app.name, "no backend answered")

    async def _attempt(self, conn: UpstreamConnection, head: bytes) -> bool | None:
        self.conn = conn
        self.done = self.session._loop.create_future()
        conn.start(self, head_only=self.req.method == b"HEAD")
        self.upstream_started = time.monotonic()
        conn.write(head)
        if self.session._client_paused:
            self.pause_upstream()
        try:
            await self._pump_body(conn)
        except OSError:
            pass  # the backend went away mid-body; the response side reports it
        except asyncio.CancelledError:
            if conn.transport is not None:
                conn.transport.abort()
            raise
        return await self.done

    async def _pump_body(self, conn: UpstreamConnection) -> None:
        req = self.req
        chunked = req.chunked
        while True:
            data = await req.body.read()
            if data is None:
                break
            if not conn.usable:
                return
            if chunked:
                conn.write(b"%x\r\n%s\r\n" % (len(data), data))
            else:
                conn.write(data)
            await conn.drain()
        if chunked and conn.usable:
            conn.write(b"0\r\n\r\n")

    # -- ResponseSink ---------------------------------------------------------------
    def response_head(self, status: int, reason: bytes, version: str,
                      headers: list[tuple[bytes, bytes]], keep_alive: bool,
                      framing: str) -> None:
        session, req = self.session, self.req
        transport = session.transport
        if transport is None or transport.is_closing():
            return
        if 100 <= status < 200:
            if status != 101 and req.version == "1.1":
                transport.write(b"HTTP/1.1 %d %s\r\n\r\n" % (status, reason))
            return
        self.status = status
        self.got_head = True
        metrics.UPSTREAM_SECONDS.labels(self.app.name).observe(
            time.monotonic() - self.upstream_started)
        client_keep = req.keep_alive and not session._done
        out = [b"HTTP/1.1 %d %s\r\n" % (status, reason)]
        connection_named: set[bytes] = set()
        for name, value in headers:
            if name.lower() == b"connection":
                connection_named.update(t.strip().lower() for t in value.split(b","))
        for name, value in headers:
            lname = name.lower()
            if lname in _RESPONSE_DROP or lname in connection_named:
                if lname == b"content-length" and framing in ("length", "none"):
                    out += (name, b": ", value, b"\r\n")
                continue
            out += (name, b": ", value, b"\r\n")
        if framing in ("chunked", "close"):
            if req.version == "1.1":
                out.append(b"transfer-encoding: chunked\r\n")
                self.chunked_out = True
            else:
                client_keep = False
        if not client_keep:
            out.append(b"connection: close\r\n")
            session._done = True
        elif req.version == "1.0":
            out.append(b"connection: keep-alive\r\n")
        out.append(b"\r\n")
        transport.write(b"".join(out))

    def response_body(self, data: bytes) -> None:
        transport = self.session.transport
        if transport is None or transport.is_closing() or not data:
            return
        if self.chunked_out:
            transport.write(b"%x\r\n%s\r\n" % (len(data), data))
        else:
            transport.write(data)

    def response_done(self, reusable: bool) -> None:
        session = self.session
        transport = session.transport
        if self.chunked_out and transport is not None and not transport.is_closing():
            transport.write(b"0\r\n\r\n")
        conn = self.conn
        if conn is not None:
            if reusable and self.req.body.done:
                session.pool.release(conn)
            elif conn.transport is not None:
                conn.transport.close()
        count(self.app.name, self.status)
        if not self.done.done():
            self.done.set_result(not session._done and self.req.body.done)

    def response_failed(self, exc: BaseException | None, got_head: bool) -> None:
        session = self.session
        kind = "reset" if exc is None or isinstance(exc, OSError) else "protocol"
        metrics.UPSTREAM_ERRORS.labels(self.app.name, kind).inc()
        if self.conn is not None and self.conn.transport is not None:
            self.conn.transport.abort()
        result: bool | None = None
        if got_head or self.got_head:
            # Part of the response is on the wire: the only honest signal left is to
            # cut the client connection.
            count(self.app.name, self.status)
            if session.transport is not None:
                session.transport.abort()
            result = False
        if not self.done.done():
            self.done.set_result(result)

    def upstream_pause(self) -> None:
        self.pause_upstream()

    def upstream_resume(self) -> None:
        self.resume_upstream()

    def pause_upstream(self) -> None:
        conn = self.conn
        if conn is not None and conn.transport is not None:
            conn.transport.pause_reading()

    def resume_upstream(self) -> None:
        conn = self.conn
        if conn is not None and conn.transport is not None and not conn.transport.is_closing():
            conn.transport.resume_reading()

    def client_gone(self) -> None:
        conn = self.conn
        if conn is not None and conn.transport is not None and conn.sink is self:
            conn.sink = None
            conn.transport.abort()
        if not self.done.done():
            self.done.set_result(False)
