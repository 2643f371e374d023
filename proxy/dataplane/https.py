"""The HTTP/1.1 session of one client connection: parse, check, frame, relay in order.

Requests are parsed with httptools in the protocol callbacks and checked strictly
(`checks`), queued, and their exchanges started one at a time in order (pipelining
keeps order); an exchange runs in callbacks or in its own task, as `exchange` decides.
This module owns HTTP/1.1 framing and the client-side limits (head size and time,
body size and pace, keep-alive idle, a WebSocket tunnel's idle time) and times the
exchange in flight from its one timer; routing and the backend side live in
`exchange`. It is the HTTP/1.1 implementation of `exchange.ClientSide` (HTTP/2 is
`h2session`). It never touches the store, never blocks, and never forwards a request
that was refused.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable

import httptools

from proxy import metrics
from proxy.dataplane import checks, closing, pages
from proxy.dataplane.accesslog import AccessLog
from proxy.dataplane.checks import UNDERSCORE
from proxy.dataplane.clients import Clients
from proxy.dataplane.exchange import Client, Exchange, Request
from proxy.dataplane.state import Live
from proxy.dataplane.upstream import WRITE_HIGH, UpstreamPool

log = logging.getLogger("tlsedge.http")
_TRANSFER_CHUNKED = b"transfer-encoding: chunked\r\n"
# What a lost connection's `parser` becomes: a parser calls none of our methods, so
# the session is no longer in a cycle with its own (see connection_lost).
_LOST_PARSER = httptools.HttpRequestParser(None)


class _Refuse(Exception):
    """Raised in a parser callback: the request is refused, stop parsing here."""


class HttpSession(asyncio.Protocol):
    """One client connection speaking HTTP/1.1 to us: after TLS on the HTTPS listener,
    as it comes on the plain-HTTP one (`scheme` says which)."""

    __slots__ = (  # noqa: RUF023 (grouped by lifetime, not sorted)
        # The connection's, for its whole life.
        "_broken", "_done", "_draining", "_early", "_idle_since", "_loop", "_on_lost", "_out",
        "_read_at", "_read_paused", "_served", "_timer", "_timer_due", "client", "closed",
        "live", "parser", "peer", "scheme", "tcp", "transport", "write_paused",
        # The requests': the one being parsed, those queued, the one being answered.
        "_chunked_out", "_connection_upgrade", "_current", "_dispatching", "_head_bytes",
        "_head_size", "_head_started", "_hosts", "_in_head", "_queue", "_resp", "_te",
        "_tunnel", "_upgrade",
    )

    def __init__(self, live: Live, pool: UpstreamPool, *, scheme: str, port: int,
                 peer: str, tls_version: str = "",
                 on_lost: Callable[[HttpSession], None] | None = None,
                 access_log: AccessLog | None = None, clients: Clients | None = None) -> None:
        self.live = live
        # What the exchanges of this connection read (its peer, TLS, certificate names).
        self.client = Client(live, pool, scheme=scheme, port=port, peer=peer,
                             tls_version=tls_version, access_log=access_log, clients=clients)
        self._on_lost = on_lost
        self.closed = False
        self._early: list[bytes] = []
        self.scheme = scheme
        self.peer = peer
        self.transport: asyncio.Transport | None = None
        # The TCP connection under the TLS transport (the acceptor sets it): closed
        # directly at shutdown, see `release`.
        self.tcp: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self._loop = self.client.loop
        # While corked (one backend read being relayed), writes collect here and go
        # out as one TLS record and one send: head + body of a small response cost
        # one syscall instead of two or three (syscalls dominate our CPU profile).
        self._out: list[bytes] | None = None
        self._queue: deque[Request] = deque()
        self._current: Request | None = None
        # The exchange in flight (at most one: HTTP/1.1 answers in order).
        self._resp: Exchange | None = None
        self._dispatching = False
        self._tunnel: Exchange | None = None
        self._read_paused = False
        self.write_paused = False
        self._chunked_out = False
        self._done = False
        self._draining = False
        self._broken = False
        self._in_head = False
        self._head_bytes = 0
        self._head_size = 0
        self._head_started = 0.0
        self._hosts: list[bytes] = []
        self._te: bytes | None = None
        self._upgrade = self._connection_upgrade = False
        self._idle_since = 0.0
        self._read_at = 0.0
        self._served = 0
        self._timer: asyncio.TimerHandle | None = None
        self._timer_due = 0.0

    # -- asyncio.Protocol ---------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        tls: asyncio.Transport = transport  # type: ignore[assignment]  # cast() is a call
        self.transport = tls
        tls.set_write_buffer_limits(high=WRITE_HIGH)
        self.client.set_certificate(transport)
        # No task per connection: exchanges start from the callbacks (`_dispatch`).
        # The task that was here cost ~3 us per connection to create and start, and a
        # future and a wake-up per request (the queue waiter).
        now = self._idle_since = time.monotonic()
        self._schedule(self.live.limits.request_head_timeout, now)
        early, self._early = self._early, []
        for data in early:
            self.data_received(data)

    def connection_lost(self, exc: BaseException | None) -> None:
        self._done = True
        self.closed = True
        if self._on_lost is not None:
            self._on_lost(self)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._current is not None:
            self._current.body.cut()
        if self._resp is not None:
            self._resp.client_gone()
        # Let refcounting free the connection now. The parser holds this session's bound
        # methods (a cycle), and the transport holds the TLS protocol and OpenSSL's SSL
        # object with its buffers: left to the cycle collector, every closed connection
        # kept them until a full collection, and worker RSS grew ~1.5 kB per handshake.
        self.transport = self.tcp = None
        self.parser = _LOST_PARSER

    def data_received(self, data: bytes) -> None:
        if self.transport is None:
            # start_tls() does not call connection_made(): the acceptor does it when
            # the handshake task completes, which can be after the first bytes.
            self._early.append(data)
            return
        tunnel = self._tunnel
        if tunnel is not None:
            self._read_at = time.monotonic()  # for limits.tunnel_idle_timeout
            tunnel.tunnel_from_client(data)
            return
        if self._broken:
            return  # refused earlier bytes; nothing after them is read
        # One clock read per read, for every timestamp the parser callbacks set.
        now = self._read_at = time.monotonic()
        if self._in_head or self._current is None:
            self._head_bytes += len(data)
            if not self._in_head:
                self._head_started = now
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            if not isinstance(exc.__context__, _Refuse):
                log.exception("parser callback failed for %s", self.peer)
                self._reject(400, "malformed request")
        except httptools.HttpParserUpgrade as exc:
            self._upgraded(data, exc)
        except (httptools.HttpParserError, httptools.HttpParserInvalidMethodError,
                httptools.HttpParserInvalidURLError) as exc:
            log.debug("bad request from %s: %s", self.peer, exc)
            self._reject(400, "malformed request")
        else:
            if self._in_head:
                limits = self.live.limits
                if self._head_bytes > limits.max_head_bytes:
                    # One header growing without end: httptools buffers it whole.
                    metrics.LIMITS_HIT.labels("max_head_bytes").inc()
                    self._reject(431, "request head too large")
                else:  # a head split over reads: the slow path that needs the timer
                    self._due_by(limits.request_head_timeout, now)
            elif self._current is not None:
                self._due_by(self.live.limits.request_body_timeout, now)
        if self._queue and self._resp is None:
            self._dispatch()

    def _upgraded(self, data: bytes, exc: httptools.HttpParserUpgrade) -> None:
        """httptools stops at an upgrade (after queueing that request) or a CONNECT."""
        req = self._queue[-1] if self._queue else None
        if req is None or req.error is not None:
            return
        if req.upgrade:
            req.tunnel_early = data[exc.args[0]:] if exc.args else b""
            self._broken = True  # no more HTTP on this connection
            self.pause()
            return
        self._reject(501, "only WebSocket upgrades are supported", req)

    def hand_over(self) -> list[bytes]:
        """ALPN chose another protocol: the bytes read so far, for the session that
        takes the connection over (this one is never used)."""
        early, self._early = self._early, []
        self.closed = True
        return early

    def eof_received(self) -> bool | None:
        if self._tunnel is not None:
            return None  # half-close ends the tunnel: connection_lost tells the backend
        # The client half-closed: finish what is in flight, then close. A body still
        # being received is incomplete, not finished.
        if self._current is not None:
            self._current.body.cut()
        if not self._queue and self._resp is None and self.transport is not None:
            self.transport.close()
        # A TLS transport cannot stay half-open (returning True there only logs a
        # warning per connection); plain TCP keeps the write side for the answers.
        return None if self.scheme == "https" else True

    def pause_writing(self) -> None:
        self.write_paused = True
        if self._resp is not None:
            self._resp.pause_upstream()

    def resume_writing(self) -> None:
        self.write_paused = False
        if self._resp is not None:
            self._resp.resume_upstream()

    def drain(self) -> None:
        """At shutdown: close an idle connection now; else answer the request in flight,
        or the one being received, with `connection: close`, then close."""
        if self._resp is not None:
            self._done = True  # the exchange's end closes (done)
        elif self._current is None and not self._queue:
            self._done = True
            if self.transport is not None:
                self.transport.close()
        else:
            self._draining = True  # served by _dispatch, as the connection's last

    def release(self) -> None:
        """At shutdown, polled after `drain` (see closing.release)."""
        closing.release(self.transport, self.tcp)

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def pause(self) -> None:
        if not self._read_paused and self.transport is not None:
            self._read_paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        if self._read_paused and self.transport is not None and not self._done:
            if self._broken and self._tunnel is None:
                return
            self._read_paused = False
            self.transport.resume_reading()

    # -- httptools callbacks ------------------------------------------------------
    def on_message_begin(self) -> None:
        self._current = Request(self, self._read_at)
        self._in_head = True
        self._head_size = 0
        self._hosts = []
        self._te = None
        self._upgrade = self._connection_upgrade = False

    def on_url(self, url: bytes) -> None:
        req = self._current
        assert req is not None
        req.url += url
        self._head_size += len(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        req = self._current
        assert req is not None
        if not self._in_head:
            return  # a trailer: dropped, never forwarded
        limits = self.live.limits
        self._head_size += len(name) + len(value) + 4
        headers = req.headers
        headers.append((name, value))
        if self._head_size > limits.max_head_bytes:
            metrics.LIMITS_HIT.labels("max_head_bytes").inc()
            self._refuse(431, "request head too large")
        if len(headers) > limits.max_headers:
            metrics.LIMITS_HIT.labels("max_headers").inc()
            self._refuse(431, "too many request headers")
        if UNDERSCORE in name:
            self._refuse(400, "underscore in a header name")
        # The headers the session itself reads are noted here, by length first, so
        # on_headers_complete needs no second pass over them.
        n = len(name)
        if n == 4:
            if name.lower() == b"host":
                self._hosts.append(value)
        elif n == 17:
            if name.lower() == b"transfer-encoding":
                self._te = value
        elif n == 14:
            if name.lower() == b"content-length":
                req.content_length = value
        elif n == 10:
            if name.lower() == b"connection":
                # find, not `in`: see UNDERSCORE.
                self._connection_upgrade = value.lower().find(b"upgrade") >= 0
                req.connection = (value if req.connection is None
                                  else req.connection + b"," + value)
        elif n == 7 and name.lower() == b"upgrade":
            self._upgrade = value.strip().lower() == b"websocket"

    def on_headers_complete(self) -> None:
        req = self._current
        assert req is not None
        p = self.parser
        self._in_head = False
        self._head_bytes = 0
        req.method = p.get_method()
        req.version = p.get_http_version()
        req.keep_alive = p.should_keep_alive()
        hosts = self._hosts
        content_length = req.content_length
        refusal = checks.request_head(req.version, req.url, hosts, self._te, content_length,
                                      self.live.limits.max_body_bytes)
        if refusal is not None:
            if refusal[0] == 413:
                metrics.LIMITS_HIT.labels("max_body_bytes").inc()
            self._refuse(*refusal)
        req.host = hosts[0] if hosts else None
        req.chunked = self._te is not None
        req.url = checks.origin_form(req.url)
        if self._upgrade and self._connection_upgrade and req.method == b"GET":
            req.upgrade = True
            req.keep_alive = False
        self._queue.append(req)  # data_received starts it once this read is parsed

    def on_body(self, body: bytes) -> None:
        req = self._current
        if req is None:
            return
        req.body.feed(body)
        req.body.last = self._read_at
        if req.body.total > self.live.limits.max_body_bytes:
            self._client_failed(req, 413, "max_body_bytes")
            raise _Refuse

    def on_message_complete(self) -> None:
        if self._current is not None:
            self._current.body.finish()
            self._current = None

    # -- refusals -----------------------------------------------------------------
    def _refuse(self, status: int, why: str) -> None:
        """From a head callback: queue the refusal in order and stop parsing."""
        self._reject(status, why)
        raise _Refuse

    def _reject(self, status: int, why: str, req: Request | None = None) -> None:
        """Refuse what cannot be accepted, in order behind earlier requests, then close."""
        self._broken = True
        self.pause()
        current = self._current
        self._current = None
        if req is None and current is not None and (
                current.exchange is not None or current in self._queue):
            # The head was accepted and queued or relayed; its body is broken.
            self._client_failed(current, status, None)
            return
        if req is None:
            req = current or Request(self)
            self._queue.append(req)
        req.error = (status, why)
        req.keep_alive = False
        req.body.done = True

    def _client_failed(self, req: Request, status: int, limit: str | None) -> None:
        """A request already accepted broke a limit or its body was malformed."""
        self._broken = True
        self.pause()
        req.keep_alive = False
        if limit is not None:
            metrics.LIMITS_HIT.labels(limit).inc()
        exchange = req.exchange
        if exchange is not None:
            exchange.fail(None, status)
        else:
            req.error = (status, "request body refused")
        req.body.finish()

    # -- relay --------------------------------------------------------------------
    def _dispatch(self) -> None:
        """Start queued requests in order while none is in flight."""
        if self._dispatching:
            return  # an exchange finished inside start(): the loop below goes on
        self._dispatching = True
        try:
            while self._resp is None and self._queue and not self._done and not self.closed:
                req = self._queue.popleft()
                if self._draining:
                    req.keep_alive = False
                self._idle_since = 0.0
                exchange = self._resp = Exchange(self, req)
                exchange.start()
        except Exception:
            log.exception("session for %s failed", self.peer)
            if self.transport is not None:
                self.transport.abort()
        finally:
            self._dispatching = False

    def done(self, exchange: Exchange, keep: bool) -> None:
        if self._resp is exchange:
            self._resp = None
        self._tunnel = None
        if self.closed:
            return
        self._served += 1
        if not keep or not exchange.req.keep_alive or self._done:
            self._close_after_flush()
        elif not self._queue:
            self._idle_since = time.monotonic()
        elif not self._dispatching:
            # Pipelined requests: start the next one after the callback that ended
            # this exchange (maybe inside the backend's parser) has returned.
            self._loop.call_soon(self._dispatch)

    # -- ClientSide: what the exchange writes ----------------------------------------
    def cork(self) -> None:
        if self._out is None:
            self._out = []

    def uncork(self) -> None:
        out, self._out = self._out, None
        transport = self.transport
        if out and transport is not None and not transport.is_closing():
            transport.write(out[0] if len(out) == 1 else b"".join(out))

    def _write(self, data: bytes) -> None:
        out = self._out
        if out is not None:
            out.append(data)
        elif self.transport is not None:
            self.transport.write(data)

    def send_head(self, req: Request, status: int, reason: bytes,
                  headers: list[tuple[bytes, bytes]], framing: str) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if status < 200 and status != 101:  # interim: to HTTP/1.1 clients only
            if req.version == "1.1":
                self._write(b"HTTP/1.1 %d %s\r\n\r\n" % (status, reason))
            return
        keep = req.keep_alive and not self._done and status != 101
        chunked = False
        if framing == "chunked" or framing == "close":
            if req.version == "1.1":
                chunked = True
            else:
                keep = False
        self._chunked_out = chunked
        ours = _TRANSFER_CHUNKED if chunked else b""
        if status == 101:
            pass
        elif not keep:
            ours += b"connection: close\r\n"
            self._done = True
        elif req.version == "1.0":
            ours += b"connection: keep-alive\r\n"
        # One format, the header lines joined in C (map over the pairs): a Python loop
        # adding four pieces per header cost ~0.6 us for nginx's four headers.
        head = b"HTTP/1.1 %d %s\r\n%s%s\r\n" % (
            status, reason,
            b"\r\n".join(map(b": ".join, headers)) + b"\r\n" if headers else b"", ours)
        out = self._out  # `_write` inline here and in send_body: a call fewer each
        if out is not None:
            out.append(head)
        else:
            transport.write(head)
        if status == 101:
            self._start_tunnel()

    def send_body(self, data: bytes) -> None:
        transport = self.transport
        if transport is None or transport.is_closing() or not data:
            return
        if self._chunked_out:
            data = b"%x\r\n%s\r\n" % (len(data), data)
        out = self._out
        if out is not None:
            out.append(data)
        else:
            transport.write(data)

    def send_trailers(self, trailers: list[tuple[bytes, bytes]]) -> None:
        # In the last chunk of a chunked response (`end` then adds none); else dropped.
        transport = self.transport
        if self._chunked_out and transport is not None and not transport.is_closing():
            self._write(b"0\r\n%s\r\n" % b"".join(n + b": " + v + b"\r\n" for n, v in trailers))
            self._chunked_out = False

    def end(self) -> None:
        transport = self.transport
        if self._chunked_out and transport is not None and not transport.is_closing():
            self._write(b"0\r\n\r\n")
        self._chunked_out = False

    def send_error(self, req: Request, status: int, request_id: str, why: str) -> bool:
        keep = req.body.done and req.keep_alive and req.error is None and not self._done
        head, body = pages.error(status, request_id, keep_alive=keep,
                                 head_only=req.method == b"HEAD")
        if self.transport is not None and not self.transport.is_closing():
            self._write(head + body)
        return keep

    def send_redirect(self, req: Request, location: str, status: int = 301) -> bool:
        keep = req.body.done and req.keep_alive and not self._done
        if self.transport is not None and not self.transport.is_closing():
            self._write(pages.redirect(location, status=status, keep_alive=keep,
                                       head_only=req.method == b"HEAD"))
        return keep

    def _start_tunnel(self) -> None:
        """A 101 went out: the client's bytes go to the exchange's backend from now."""
        self._tunnel = self._resp
        self._broken = False
        self.resume()
        # The timer may be set for a later deadline of the request: bring it in.
        self._due_by(self.live.limits.tunnel_idle_timeout, time.monotonic())

    # -- timers -------------------------------------------------------------------
    def _close_after_flush(self) -> None:
        self.uncork()
        self._done = True
        if self.transport is not None:
            self.transport.close()

    def _schedule(self, delay: float, now: float) -> None:
        # Never further out than the shortest limit: then an exchange starting does not
        # move the timer (`_due_by` returns at once), and a connection's timer fires
        # every few seconds at most, re-checking every deadline.
        limits = self.live.limits
        delay = max(min(delay, limits.request_head_timeout, limits.keepalive_timeout,
                        limits.upstream_first_byte_timeout, limits.upstream_read_timeout,
                        limits.request_body_timeout), 0.01)
        self._timer_due = now + delay
        self._timer = self._loop.call_later(delay, self._on_timer)

    def _due_by(self, delay: float, now: float) -> None:
        """Make the timer fire within `delay`; only slow clients ever move it."""
        if self._timer is not None:
            if self._timer_due <= now + delay:
                return
            self._timer.cancel()
        self._schedule(delay, now)

    # What the exchange calls to be timed (the same method: one call fewer per request).
    watch_by = _due_by

    def _on_timer(self) -> None:
        """One timer per connection, re-armed for the nearest deadline.

        Requests only set timestamps (head start, last body byte, idle since, sent to
        the backend, last backend read; in a tunnel, each side's last read); no timer
        is created or cancelled per request or per read.
        """
        self._timer = None
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        now = time.monotonic()
        tunnel = self._tunnel
        if tunnel is not None:
            delay = self._tunnel_deadline(now, tunnel, transport)
        else:
            delay = self._client_deadlines(now, transport)
            resp = self._resp
            if delay is not None and resp is not None:
                left = resp.watch(now)
                if left is not None:
                    delay = min(delay, left)
        if delay is not None and self._timer is None and not transport.is_closing():
            self._schedule(delay, now)

    def _tunnel_deadline(self, now: float, tunnel: Exchange,
                         transport: asyncio.Transport) -> float | None:
        """Close a tunnel silent both ways for tunnel_idle_timeout (None), else seconds
        to the next check. Reads only timestamps: the client side's last read, and the
        backend connection's (set on each of its reads)."""
        conn = tunnel.conn
        last = max(self._read_at, conn.last_read if conn is not None else 0.0)
        left = self.live.limits.tunnel_idle_timeout - (now - last)
        if left > 0:
            return left
        metrics.LIMITS_HIT.labels("tunnel_idle_timeout").inc()
        transport.close()  # connection_lost closes the backend side (client_gone)
        return None

    def _client_deadlines(self, now: float, transport: asyncio.Transport) -> float | None:
        """Act on the client side's overdue deadline (None), else seconds to the next."""
        limits = self.live.limits
        if self._in_head:
            left = limits.request_head_timeout - (now - self._head_started)
            if left <= 0:
                metrics.LIMITS_HIT.labels("request_head_timeout").inc()
                if self._resp is None and not self._queue:
                    self._reject(408, "request head timed out")
                    self._dispatch()
                else:
                    transport.close()
                return None
            return left
        current = self._current
        if current is not None and not current.body.done:
            body = current.body
            last = body.last or current.started
            left = limits.request_body_timeout - (now - last)
            if left <= 0 and not self._read_paused:
                self._client_failed(current, 408, "request_body_timeout")
                return None
            if body.buffering and limits.body_min_rate:
                # Held by us, a body may take body_rate_grace seconds, plus one second
                # per body_min_rate bytes received: a trickle is cut, not kept forever.
                left = min(left, limits.body_rate_grace + body.total / limits.body_min_rate
                           - (now - current.started))
                if left <= 0:
                    self._client_failed(current, 408, "body_min_rate")
                    return None
            return max(left, 0.5)
        if self._idle_since and self._resp is None and not self._queue:
            limit = limits.keepalive_timeout if self._served else limits.request_head_timeout
            left = limit - (now - self._idle_since)
            if left <= 0:
                metrics.LIMITS_HIT.labels("keepalive_timeout" if self._served
                                          else "request_head_timeout").inc()
                transport.close()
                return None
            return left
        return min(limits.request_head_timeout, limits.keepalive_timeout)


__all__ = ["HttpSession"]
