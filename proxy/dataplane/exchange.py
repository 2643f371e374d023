"""One request from routing to the end of its response, independent of the client's
protocol: Host vs certificate (421), app lookup, canonical-domain redirect, backend
choice (round robin, quarantine, queue), the request head the backend sees, the
response headers the client sees, upstream timeouts and the WebSocket tunnel. And
buffering, so that a slow client never holds a backend connection: a request body
still arriving is held (a `BodySpool`) until complete before a connection is taken,
and a response whose client pushes back is read on into a `ResponseSpool` (memory,
then a temp file: `buffer`), the connection going back to the pool when it is done.

The client side (the HTTP/1.1 session, or one HTTP/2 stream) implements `ClientSide`
and owns framing; what its connection knows (peer, TLS, the certificate's names) it
hands over once as a `Client`. Nothing here writes client bytes directly, blocks or
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
import enum
import ipaddress
import itertools
import logging
import operator
import os
import re
import time
from collections import deque
from collections.abc import Sequence
from typing import TYPE_CHECKING, Final, Protocol, final

from proxy import metrics, routing
from proxy.certs.tls import CertContext
from proxy.dataplane import buffer, http80, proxyproto
from proxy.dataplane.accesslog import AccessLog, Entry
from proxy.dataplane.buffer import Spool
from proxy.dataplane.clients import Clients
from proxy.dataplane.upstream import (
    HOP_BY_HOP,
    BadResponse,
    PoolFull,
    UpstreamConnection,
    UpstreamPool,
)
from proxy.names import NameSet
from proxy.routing import App, Backend, RouteTable

if TYPE_CHECKING:
    from proxy.dataplane.state import Live

log = logging.getLogger("tlsedge.http")

# Set by us; from a peer outside trusted_proxies they are dropped. (Hop-by-hop request
# headers, RFC 9110 7.6.1, are dropped whoever sent them.)
_FORWARDING = frozenset({
    b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"x-forwarded-port",
    b"forwarded", b"x-real-ip", b"x-request-id",
})
_REQUEST_DROP_UNTRUSTED = HOP_BY_HOP | _FORWARDING | {b"x-request-start"}
_REQUEST_DROP_TRUSTED = HOP_BY_HOP | {b"x-request-start"}
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
# Most bytes fed to the client from a response spool in one loop turn.
_DRAIN_STEP = 1024 * 1024


_NO_NAMES = NameSet(())


class Client:
    """What every exchange of one client connection shares, handed over by its session:
    facts fixed once the handshake is done (peer, TLS version, protocol, the names of
    the certificate the connection presented) and the connection's memos. An HTTP/1.1
    session has one; an HTTP/2 session one for all its streams.
    """

    __slots__ = ("access_log", "clients", "covered", "live", "loop", "names", "origin", "peer",
                 "pool", "port", "protocol", "route_memo", "scheme", "tls_version", "trusted")

    def __init__(self, live: Live, pool: UpstreamPool, *, scheme: str, port: int, peer: str,
                 protocol: str = "http/1.1", tls_version: str = "",
                 access_log: AccessLog | None = None, clients: Clients | None = None) -> None:
        self.live = live
        self.pool = pool
        self.scheme = scheme
        self.port = port
        self.peer = peer
        # ((client address, port), (address, port) it reached), as the listener saw
        # them (or the PROXY header said): what a backend with send_proxy_protocol is told.
        self.origin: tuple[tuple[str, int], tuple[str, int]] | None = None
        self.trusted = _is_trusted(peer, live)
        self.protocol = protocol  # "http/1.1" or "h2": access log and metrics
        self.tls_version = tls_version
        self.access_log = access_log
        # The worker's per-client counters (a set of its own when run alone).
        self.clients = clients if clients is not None else Clients()
        self.loop = asyncio.get_running_loop()
        # The names of the certificate the connection presented (`set_certificate`);
        # None: not TLS, no Host is misdirected.
        self.names: NameSet | None = None
        self.covered: dict[str, bool] | None = None  # host -> names cover it (421 memo)
        # The last (Host value, route table, host, app) resolved: a connection asks for
        # the same host again and again (split_host alone measured ~0.3 us).
        self.route_memo: tuple[bytes | None, RouteTable, str, App | None] | None = None

    def set_certificate(self, transport: asyncio.BaseTransport) -> None:
        """Note the names of the certificate the (handshaken) connection presented.

        Read from the connection's own context (the SNI callback set it, and it carries
        its certificate's names), not from the current table: a certificate replaced,
        uploaded, removed or expired since the handshake stays invisible to the
        clients already connected. Python does not expose the SNI on the server side.
        """
        sslobj = transport.get_extra_info("ssl_object")
        if sslobj is None:
            self.names = None
            return
        ctx = sslobj.context
        self.names = ctx.names if isinstance(ctx, CertContext) else _NO_NAMES

    def misdirected(self, host: str) -> bool:
        """Whether `host` is outside the certificate this connection presented (421)."""
        names = self.names
        if names is None or not self.live.reject_misdirected:
            return False
        cache = self.covered
        if cache is None:
            cache = self.covered = {}
        ok = cache.get(host)
        if ok is None:
            ok = names.covers(host) or self._default_serves(host, names)
            if len(cache) < 16:
                cache[host] = ok
        return not ok

    def _default_serves(self, host: str, names: NameSet) -> bool:
        """A name with no certificate of its own gets the default one: on a connection
        that presented the default certificate (by its names, so a renewed one still
        is) such a Host is not misdirected: an unknown name gets its 404, a domain
        still waiting for its certificate is served, as on a connection of its own."""
        table = self.live.selector.table
        default = table.default
        return (default is not None and table.lookup(host)[1] == "default"
                and names == NameSet(default.bundle.names))


def _is_trusted(peer: str, live: Live) -> bool:
    if not live.trusted_proxies or not peer:
        return False
    try:
        address = ipaddress.ip_address(peer)
    except ValueError:
        return False
    return any(address in net for net in live.trusted_proxies)


class ClientSide(Protocol):
    """The client end of one exchange: the HTTP/1.1 session (one exchange at a time)
    or one HTTP/2 stream. The contract, both ways:

    - Response: `send_head` (1xx interim heads any number of times, then the final
      head once), `send_body` any number of times, `end` once when the response is
      complete. `headers` are end-to-end only; `framing` says how the backend
      delimited the body (none, length, chunked, close). A 101 (HTTP/1.1 only: an
      HTTP/2 request never asks for an upgrade) makes the connection a tunnel: from
      then on `send_body` carries the backend's bytes and the session hands the
      client's to `Exchange.tunnel_from_client`.
    - `send_trailers`: the backend's chunked trailer fields, at most once, after the
      last `send_body` and before `end`; a side that cannot carry them drops them.
    - Answers of our own: `send_error` and `send_redirect` write a whole response and
      return whether the connection may carry another request.
    - `abort`: the response cannot end well (part of it is on the wire): the HTTP/1.1
      connection is cut, an HTTP/2 stream reset; other streams live on.
    - `done(exchange, keep)`: exactly once per exchange, last; `keep` False ends an
      HTTP/1.1 connection after what is written.
    - Flow control is backpressure, not buffering: `write_paused` is True while the
      client does not take what is written, and the client side calls
      `Exchange.pause_upstream` / `resume_upstream` when that changes; the exchange
      calls `pause` / `resume` to stop and restart the request body.
    - `watch_by(delay, now)`: have `Exchange.watch` called within `delay` seconds.
    - Writes between `cork` and `uncork` leave together (one backend read, one write).
    - `client`: the connection's facts; routing and the 421 question are answered
      from it, with no call back into the session.
    """

    client: Client
    # An attribute, not a call: it is read on every request.
    write_paused: bool

    def send_head(self, req: Request, status: int, reason: bytes,
                  headers: list[tuple[bytes, bytes]], framing: str) -> None: ...

    def send_body(self, data: bytes) -> None: ...

    def send_trailers(self, trailers: list[tuple[bytes, bytes]]) -> None: ...

    def end(self) -> None: ...

    def send_error(self, req: Request, status: int, request_id: str, why: str) -> bool: ...

    def send_redirect(self, req: Request, location: str, status: int = 301) -> bool: ...

    def abort(self) -> None: ...

    def pause(self) -> None: ...

    def resume(self) -> None: ...

    def done(self, exchange: Exchange, keep: bool) -> None: ...

    def watch_by(self, delay: float, now: float) -> None: ...

    def cork(self) -> None: ...

    def uncork(self) -> None: ...


class Body:
    """A request body in flight: the client side feeds it, the exchange reads it.

    Buffered (`start_buffering`), it goes into a spool without back-pressure until it
    is complete, and the exchange waits (`buffered`) before taking a backend
    connection; when the spool is full (the worker's temp space), the rest streams.
    """

    __slots__ = ("chunks", "consumed", "done", "last", "session", "size", "spool", "total",
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
        # Read before `chunks`; new bytes go to it too while it is `filling`.
        self.spool: BodySpool | None = None

    @property
    def buffering(self) -> bool:
        """Whether the body is being held until complete (no backend connection yet)."""
        return self.spool is not None and self.spool.filling

    def start_buffering(self, spool: BodySpool) -> None:
        for data in self.chunks:
            spool.write(data)
        self.chunks.clear()
        self.size = 0
        self.spool = spool
        spool.filling = not spool.full
        self.session.resume()  # paused if it queued behind another

    async def buffered(self) -> None:
        """Wait until the buffered body is complete (or cut, or the spool is full)."""
        while self.buffering and not self.done:
            self.waiter = self.session.client.loop.create_future()
            await self.waiter

    def feed(self, data: bytes) -> None:
        spool = self.spool
        if spool is not None and spool.filling:
            self.total += len(data)
            spool.write(data)
            if spool.full:
                spool.filling = False  # the rest streams: the relay starts now
                self._wake()
            return
        self.chunks.append(data)
        self.size += len(data)
        self.total += len(data)
        self._wake()
        if self.size > _BODY_HIGH:
            self.session.pause()

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
        spool = self.spool
        if spool is not None and spool.size:
            self.consumed = True
            return spool.read()
        while not self.chunks:
            if self.done:
                return None
            self.waiter = self.session.client.loop.create_future()
            await self.waiter
        data = self.chunks.popleft()
        self.consumed = True
        self.size -= len(data)
        if self.size <= _BODY_HIGH // 2:
            self.session.resume()
        return data


class BodySpool(Spool):
    """A request body held until complete; `filling` while new bytes go to it."""

    __slots__ = ("filling",)

    def __init__(self, *, memory: int, file_cap: int, space_cap: int, folder: str) -> None:
        super().__init__(memory=memory, file_cap=file_cap, space_cap=space_cap, folder=folder)
        self.filling = False


class ResponseSpool(Spool):
    """A response a slow client is fed from: when it last took bytes (`taken_at`), and
    the exchange's outcome (and the response's trailers) held back while it drains
    after the backend is done."""

    __slots__ = ("pending", "taken_at", "trailers")

    def __init__(self, *, memory: int, file_cap: int, space_cap: int, folder: str) -> None:
        super().__init__(memory=memory, file_cap=file_cap, space_cap=space_cap, folder=folder)
        self.taken_at = 0.0
        self.pending: bool | None = None
        self.trailers: list[tuple[bytes, bytes]] | None = None


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


_REQUESTS_CHILDREN: dict[tuple[str, int, str], metrics.BatchedCounter] = {}
_UPSTREAM_SECONDS: dict[str, metrics.BatchedHistogram] = {}


# Request ids: a random per-process prefix and a counter. Unique and cheap (no
# getrandom syscall per request); they identify requests, they are not secrets.
_ID_PREFIX = os.urandom(8).hex()
_id_counter = itertools.count(1)


def _next_request_id() -> str:
    return f"{_ID_PREFIX}{next(_id_counter):016x}"


def count(app: str, status: int, protocol: str) -> None:
    """Count one answered request (batched: ~0.1 us instead of ~0.7 us of mmap write)."""
    key = (app, status // 100, protocol)
    child = _REQUESTS_CHILDREN.get(key)
    if child is None:
        child = metrics.batched_counter(metrics.REQUESTS, app,
                                        _CODE_CLASS.get(status // 100, "5xx"), protocol)
        _REQUESTS_CHILDREN[key] = child
    child.pending += 1


def _observe_upstream(app: str, seconds: float) -> None:
    batch = _UPSTREAM_SECONDS.get(app)
    if batch is None:
        batch = _UPSTREAM_SECONDS[app] = metrics.batched_histogram(metrics.UPSTREAM_SECONDS, app)
    batch.observe(seconds)


def _streamed(name: bytes, value: bytes) -> bool:
    """Whether a response header (lower-cased) says the response must not be buffered."""
    return ((name == b"content-type" and value.startswith(b"text/event-stream"))
            or (name == b"x-accel-buffering" and value == b"no"))


def _tokens(connection: bytes) -> frozenset[bytes]:
    """The header names a Connection value lists (they are hop-by-hop too)."""
    return frozenset(t.strip() for t in connection.lower().split(b","))


def split_host(value: bytes) -> str:
    """Host header bytes -> lower-case host without port or trailing dot."""
    return routing.split_host(value.decode("latin-1"))


class _Passing:
    """Which request headers pass to the backend, when some must be dropped or merged
    (see Exchange.forwarded_head): never hop-by-hop ones nor those the Connection header
    names; from a peer outside trusted_proxies none of the forwarding headers we set;
    from a trusted one its X-Forwarded-* (`present`), with X-Forwarded-For merged into
    one chain (`xff`) and X-Request-Id left to us (Exchange.request_id took it)."""

    __slots__ = ("lines", "present", "xff")

    def __init__(self, headers: list[tuple[bytes, bytes]], connection: bytes | None,
                 trusted: bool) -> None:
        drop = _REQUEST_DROP_TRUSTED if trusted else _REQUEST_DROP_UNTRUSTED
        named = _tokens(connection) if connection is not None else _NO_TOKENS
        self.lines: list[bytes] = []  # "name: value\r\n" pieces, in order
        self.xff: bytes | None = None
        self.present: set[bytes] = set()
        for name, value in headers:
            lname = name.lower()
            if lname in drop or lname in named:
                continue
            if trusted and lname in _FORWARDING:
                self.present.add(lname)
                if lname == b"x-forwarded-for":
                    self.xff = value if self.xff is None else self.xff + b", " + value
                    continue
                if lname == b"x-request-id":
                    continue
            self.lines += (name, b": ", value, b"\r\n")


class State(enum.IntEnum):
    """Where an exchange is (`Exchange.state`). Ordered: from SETTLED on, the attempt
    is over and what the backend or a limit says next is ignored."""

    WAITING = 0  # deciding; on the task path, before an attempt and between two
    FAST = 1  # an attempt in flight, driven by the protocol callbacks (no task)
    RELAYING = 2  # an attempt in flight, driven by the exchange's task
    SETTLED = 3  # the attempt ended (`Exchange.outcome`), or the client left
    FINISHED = 4  # the client side was told (`done`); nothing happens any more


# Module names for the members: the comparisons on the request path are then one
# global load each.
WAITING, FAST, RELAYING, SETTLED, FINISHED = State


@final
class Answer:
    """An attempt's outcome: the exchange answers the client itself with `status` (a
    limit fired, or the backend failed before any of its response was sent)."""

    __slots__ = ("status",)

    def __init__(self, status: int) -> None:
        self.status = status

    def __repr__(self) -> str:
        return f"Answer({self.status})"


@final
class _Resend:
    __slots__ = ()

    def __repr__(self) -> str:
        return "RESEND"


# The backend dropped the connection before answering: resent when nothing can arrive
# twice (Exchange._may_resend), else answered 502.
RESEND: Final = _Resend()
# How an attempt ended. A bool: the response was relayed, and whether the client's
# connection may carry another request (keep-alive); an Answer; or RESEND.
Outcome = bool | Answer | _Resend


class Exchange:
    """One request relayed to one backend, and its response relayed back.

    `start` answers, or starts relaying; either way the client side's
    `done(exchange, keep)` is called exactly once (possibly before `start`
    returns), `keep` saying whether the connection may carry another request. While
    in flight the client side calls `watch` from its timer and `client_gone` when the
    client leaves.

    One field says where it is (`state`: WAITING -> FAST or RELAYING per attempt ->
    SETTLED -> FINISHED); each attempt ends with one Outcome (`_settle`), the first
    word winning, and `_answer` turns it into what the client is told.
    """

    # A backend's HSTS never reaches the client: ours is added for force_https apps.
    dropped_headers = frozenset({b"strict-transport-security"})

    __slots__ = ("app", "backends", "bytes_out", "client", "conn", "got_head", "head", "host",
                 "outcome", "req", "request_id", "resp_headers", "reused", "sent_at",
                 "session", "spool", "state", "status", "task", "upstream_paused",
                 "upstream_started", "waiter")

    def __init__(self, session: ClientSide, req: Request) -> None:
        self.session = session
        self.client = session.client
        self.req = req
        self.app: App | None = None
        self.host = ""
        self.conn: UpstreamConnection | None = None
        self.backends: Sequence[Backend] = ()
        self.head = b""
        # Task path only: what `_attempt` awaits, and the task that runs `_relay`.
        self.waiter: asyncio.Future[Outcome] | None = None
        self.task: asyncio.Task[None] | None = None
        self.state = WAITING
        # Settled while the task had no attempt running (before it started, while
        # connecting): the task answers with it instead of relaying.
        self.outcome: Outcome | None = None
        self.reused = False
        self.status = 0
        self.got_head = False
        self.upstream_paused = False
        self.sent_at = 0.0
        self.upstream_started = 0.0
        self.bytes_out = 0
        self.request_id = ""
        # Response buffering: the spool a slow client is fed from. (`resp_headers`, set
        # with the response head, is read only once the client pushes back.)
        self.spool: ResponseSpool | None = None
        req.exchange = self

    # -- decisions ------------------------------------------------------------------
    def start(self) -> None:
        keep = self._decide()
        if keep is not None:
            self._finish(keep)
        elif self.task is not None:
            return  # an answer of our own awaits a store read (`_challenge_later`)
        elif not self._start_fast():
            self._buffer_request()
            self.task = self.client.loop.create_task(self._run_task(), name="exchange")

    def _decide(self) -> bool | None:
        """Answer what needs no backend (keep-alive as result); None: relay it.

        Complexity 22, kept: one test per answer, in request order, inline on the
        request path (a helper call per request would cost more than it reads better).
        """
        client, req = self.client, self.req
        self.request_id = self._request_id() if client.trusted else _next_request_id()
        if req.error is not None:
            return self.refuse(req.error[0], req.error[1])
        if client.scheme == "http" and req.url.startswith(http80.CHALLENGE_PREFIX):
            return self._challenge()  # ACME HTTP-01, before any routing
        raw, routes = req.host, client.live.routes
        memo = client.route_memo
        if memo is not None and memo[0] == raw and memo[1] is routes:
            host, app = memo[2], memo[3]
        else:
            host = split_host(raw) if raw is not None else ""
            app = routes.resolve(host)
            client.route_memo = (raw, routes, host, app)
        self.host = host
        if host and client.misdirected(host):
            metrics.LIMITS_HIT.labels("misdirected").inc()
            return self.refuse(421, "Host not covered by the connection's certificate")
        if app is None:
            return self.refuse(404, "no app serves this host")
        self.app = app
        canonical = app.canonical_domain
        if app.force_https and client.scheme == "http":
            # 308 keeps the method and body of what is not a GET or HEAD.
            return self._redirect(canonical or host, "https", client.live.https_port,
                                  301 if req.method in (b"GET", b"HEAD") else 308)
        if canonical is not None and host != canonical:
            return self._redirect(canonical, client.scheme, client.port, 301)
        limits = client.live.limits
        if limits.client_request_rate and not client.clients.allow_request(
                client.peer, app.name, limits.client_request_rate,
                limits.client_request_burst):
            metrics.LIMITS_HIT.labels("client_request_rate").inc()
            return self.refuse(429, "too many requests from this client to this app")
        # One backend (the usual app): no rotation list and modulo arithmetic.
        rotation = app.backends if len(app.backends) == 1 else app.rotation()
        self.backends = client.pool.available(rotation)
        if not self.backends:
            return self.refuse(503, "every backend is quarantined")
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
        conn = self.client.pool.take_idle(self.backends[0])
        if conn is None:
            return False
        self.state = FAST
        self.head = self.forwarded_head()
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
        spool = self.req.body.spool
        try:
            keep = await (self._relay() if spool is None else self._relay_buffered())
        except asyncio.CancelledError:
            keep = False  # the client left (client_gone)
        except Exception:
            log.exception("exchange %s failed", self.request_id)
            self.session.abort()
            keep = False
        if spool is not None:
            spool.close()
        self._finish(keep)

    # -- request buffering ----------------------------------------------------------
    def _buffer_request(self) -> None:
        """Hold a body still arriving until it is complete (apps with request_buffering):
        a slow upload then holds no backend connection. Answers 100-continue itself."""
        req, app = self.req, self.app
        body = req.body
        if body.done or req.upgrade or app is None or not app.request_buffering:
            return
        session = self.session
        limits = self.client.live.limits
        body.start_buffering(BodySpool(memory=limits.request_buffer_memory,
                                       file_cap=limits.max_body_bytes,
                                       space_cap=limits.max_temp_space,
                                       folder=limits.temp_dir))
        if not body.total and any(len(n) == 6 and n.lower() == b"expect"
                                  and v.strip().lower() == b"100-continue"
                                  for n, v in req.headers):
            session.send_head(req, 100, b"Continue", [], "none")
        if limits.body_min_rate:
            session.watch_by(limits.body_rate_grace, time.monotonic())

    async def _relay_buffered(self) -> bool:
        body = self.req.body
        await body.buffered()
        if self.state is not SETTLED and body.truncated:
            return self.refuse(400, "request body incomplete")
        self._reframe()
        return await self._relay()

    def _reframe(self) -> None:
        """The backend gets a buffered body without Expect (answered here), and a
        complete chunked one with Content-Length instead."""
        req = self.req
        headers = [h for h in req.headers if len(h[0]) != 6 or h[0].lower() != b"expect"]
        if req.chunked and req.body.done:
            req.chunked = False
            req.content_length = b"%d" % req.body.total
            headers.append((b"content-length", req.content_length))
        req.headers = headers

    def _finish(self, keep: bool) -> None:
        if self.state is FINISHED:
            return
        self.state = FINISHED
        self.task = None
        req = self.req
        req.exchange = None
        if self.spool is not None:
            self.spool.close()
        client = self.client
        if client.access_log is not None:
            client.access_log.request(Entry(
                self.request_id, self.app.name if self.app is not None else "", self.host,
                req.method, req.url, self.status, req.body.total, self.bytes_out,
                req.started, self.upstream_started, client.tls_version, client.peer,
                client.protocol))
        self.session.done(self, keep)

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
        count(self.app.name if self.app else "", status, self.client.protocol)
        if status >= 500:  # the operator's business (a backend down, a queue full)
            log.warning("%s for request %s: %s", status, self.request_id, why,
                        extra={"status": status, "reason": why,
                               "request_id": self.request_id})
        else:  # the client's: one line per bad request would let anyone fill the log
            log.debug("%s %s: %s", status, self.request_id, why)
        return self.session.send_error(self.req, status, self.request_id, why)

    def _redirect(self, host: str, scheme: str, port: int, status: int) -> bool:
        default = 443 if scheme == "https" else 80
        authority = host if port == default else f"{host}:{port}"
        path = self.req.url.decode("latin-1")
        self.status = status
        count(self.app.name if self.app else "", status, self.client.protocol)
        return self.session.send_redirect(self.req, f"{scheme}://{authority}{path}", status)

    def _challenge(self) -> bool | None:
        """The plain listener's ACME HTTP-01 answer (http80); None while the store is
        asked for a token this worker does not have yet (a task answers then)."""
        authorization = http80.challenge(self.client.live, self.req.url)
        if authorization is http80.ASK_STORE:
            self.task = self.client.loop.create_task(self._challenge_later(),
                                                     name="challenge-lookup")
            return None
        return self._answer_challenge(authorization)

    async def _challenge_later(self) -> None:
        try:
            authorization = await http80.from_store(self.client.live, self.req.url)
        except asyncio.CancelledError:  # the client left (client_gone)
            self._finish(False)
            return
        self._finish(self._answer_challenge(authorization))

    def _answer_challenge(self, authorization: str | None) -> bool:
        if authorization is None:
            http80.missed()
            return self.refuse(404, "unknown ACME challenge token")
        self.status = 200
        count("", 200, self.client.protocol)
        return http80.answer(self.session, self.req, authorization)

    async def _relay(self) -> bool:
        app = self.app
        assert app is not None
        if not self.head:
            self.head = self.forwarded_head()
        pool = self.client.pool
        backends = self.backends
        i = 0
        while i < len(backends):
            if self.state is SETTLED:  # a limit fired while no attempt was running
                return self._answer(self.outcome, "client limit")
            backend = backends[i]
            try:
                conn, reused = await pool.acquire(backend, self.client.peer)
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
            if self.state is SETTLED:
                pool.release(conn)  # nothing was sent on it
                return self._answer(self.outcome, "client limit")
            if backend.send_proxy and not reused:  # the connection is this client's
                conn.write(self._proxy_header())
            outcome = await self._attempt(conn, reused)
            if outcome is not RESEND or not self._may_resend():
                return self._answer(outcome, "upstream failure or client limit")
            # Resent to the same backend on its next pooled connection or a new one:
            # the pool is finite, and a failing new connection ends the loop.
            self.state = WAITING
        return self.refuse(502, "no backend answered")

    def _proxy_header(self) -> bytes:
        """The PROXY v2 header that opens a connection to a send_proxy_protocol backend."""
        client = self.client
        origin = client.origin or ((client.peer, 0), ("::" if ":" in client.peer
                                                      else "0.0.0.0", client.port))
        return proxyproto.encode_v2(*origin)

    def _answer(self, outcome: Outcome | None, why: str) -> bool:
        """Tell the client how the exchange ended (keep-alive as result): the relayed
        response's keep-alive, our answer (`why` for an Answer), or 502 for a RESEND
        that is not resent."""
        if isinstance(outcome, bool):
            return outcome
        if isinstance(outcome, Answer):
            return self.refuse(outcome.status, why)
        return self.refuse(502, "no backend answered")

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
        client, req = self.client, self.req
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
                client.peer.encode(), client.scheme.encode(),
                self.host.encode("latin-1"), client.port, self.request_id.encode(),
                int(time.time() * 1_000_000))
        passing = _Passing(headers, req.connection, client.trusted)
        return self._format_head(passing)

    def _format_head(self, passing: _Passing) -> bytes:
        """The head from the headers that pass, with our framing and forwarding
        headers; a trusted proxy's X-Forwarded-* are kept and its chain extended."""
        client, req = self.client, self.req
        out = [req.method, b" ", req.url, b" HTTP/1.1\r\n", *passing.lines]
        if req.chunked:
            out.append(b"transfer-encoding: chunked\r\n")
        if req.upgrade:
            out.append(b"connection: upgrade\r\nupgrade: websocket\r\n")
        peer = client.peer.encode()
        xff = peer if passing.xff is None else passing.xff + b", " + peer
        host = self.host.encode("latin-1")
        start = int(time.time() * 1_000_000)
        present = passing.present
        if not present:
            out.append(_FORWARDED % (xff, client.scheme.encode(), host, client.port,
                                     self.request_id.encode(), start))
            return b"".join(out)
        out += (b"x-forwarded-for: ", xff, b"\r\n")
        if b"x-forwarded-proto" not in present:
            out += (b"x-forwarded-proto: ", client.scheme.encode(), b"\r\n")
        if b"x-forwarded-host" not in present:
            out += (b"x-forwarded-host: ", host, b"\r\n")
        if b"x-forwarded-port" not in present:
            out += (b"x-forwarded-port: ", str(client.port).encode(), b"\r\n")
        out.append(b"x-request-id: %s\r\nx-request-start: t=%d\r\n\r\n"
                   % (self.request_id.encode(), start))
        return b"".join(out)

    def _send(self, conn: UpstreamConnection, reused: bool) -> None:
        """Begin an attempt on `conn`: the head is written, its response comes to us."""
        req = self.req
        self.conn = conn
        self.reused = reused
        self.got_head = False
        now = time.monotonic()
        session = self.session
        conn.start(self, session, req.method == b"HEAD", req.upgrade, now)
        self.upstream_started = now
        self.sent_at = now if self.state is FAST else 0.0
        conn.write(self.head)
        if session.write_paused:
            self.pause_upstream()
        session.watch_by(self.client.live.limits.upstream_first_byte_timeout, now)

    async def _attempt(self, conn: UpstreamConnection, reused: bool) -> Outcome:
        waiter: asyncio.Future[Outcome] = self.client.loop.create_future()
        self.waiter = waiter
        self.state = RELAYING
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
            if data is None or self.state is not RELAYING:
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
        if chunked and conn.usable and self.state is RELAYING:
            conn.write(b"0\r\n\r\n")

    # -- outcomes -------------------------------------------------------------------
    def _settle(self, outcome: Outcome) -> None:
        """The attempt ended with `outcome` (or, on the task path, a limit fired before
        one ran); the first word counts."""
        state = self.state
        if state >= SETTLED:
            return
        self.state = SETTLED
        if state is FAST:  # no task, so no waiter: the callbacks finish it here
            if isinstance(outcome, bool):
                self._finish(outcome)
            elif outcome is RESEND and self._may_resend():
                # A pooled connection the backend had closed: the task path resends.
                self.state = WAITING
                self.task = self.client.loop.create_task(self._run_task(), name="exchange")
            else:
                self._finish(self._answer(outcome, "upstream failure or client limit"))
            return
        waiter, self.waiter = self.waiter, None
        if waiter is None:
            self.outcome = outcome  # no attempt running: `_relay` answers with it
        elif not waiter.done():
            waiter.set_result(outcome)

    # -- timeouts -------------------------------------------------------------------
    def watch(self, now: float) -> float | None:
        """Called from the client side's one timer per connection (no call_later and
        cancel per exchange, ~0.7 us measured): fail what is overdue, else the seconds
        until the next check (None: nothing to time)."""
        if self.spool is not None and self.spool.size and self.state < SETTLED:
            left = self._watch_send(now)
            if left is None or self.conn is None:
                return left
        conn = self.conn
        if conn is None or self.state >= SETTLED or conn.tunnel:
            return None
        limits = self.client.live.limits
        if not self.got_head:
            if self.sent_at == 0.0:  # still uploading: the client side times that
                return limits.upstream_first_byte_timeout
            return self._overdue("upstream_first_byte_timeout",
                                 limits.upstream_first_byte_timeout, self.sent_at, now)
        if self.upstream_paused:  # the client reads slowly; that is not the backend
            return limits.upstream_read_timeout
        return self._overdue("upstream_read_timeout", limits.upstream_read_timeout,
                             conn.last_read, now)

    def _overdue(self, limit: str, timeout: float, since: float, now: float) -> float | None:
        """The seconds left of `timeout` counted from `since`; once none are, the
        exchange fails with 504 (counted as `limit`) and None."""
        left = timeout - (now - since)
        if left > 0:
            return left
        self.fail(limit, 504)
        return None

    def _watch_send(self, now: float) -> float | None:
        """A client that takes nothing from its spool for send_timeout is cut."""
        send_timeout = self.client.live.limits.send_timeout
        if not self.session.write_paused:
            return send_timeout
        assert self.spool is not None
        return self._overdue("send_timeout", send_timeout, self.spool.taken_at, now)

    def fail(self, limit: str | None, status: int) -> None:
        """Give up on this exchange: a limit fired (timeout, body size, bad body)."""
        if limit is not None:
            metrics.LIMITS_HIT.labels(limit).inc()
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.detach()
        if self.state >= SETTLED:
            return
        if self.got_head:
            # Part of the response is on the wire: cutting is the only honest signal.
            self.session.abort()
            self._settle(False)
        else:
            self._settle(Answer(status))

    # -- ResponseSink -----------------------------------------------------------------
    def response_head(self, status: int, reason: bytes, version: str,
                      headers: list[tuple[bytes, bytes]], keep_alive: bool,
                      framing: str) -> None:
        req = self.req
        if 100 <= status < 200 and status != 101:
            self.session.send_head(req, status, reason, headers, "none")
            return
        self.status = status
        self.got_head = True
        # `headers` arrive without hop-by-hop ones and without `dropped_headers` (the
        # connection sorts them as they are parsed); this list is ours to extend.
        out = headers
        app = self.app
        if app is not None:
            _observe_upstream(app.name, time.monotonic() - self.upstream_started)
            if app.force_https and self.client.scheme == "https":
                out.append(_HSTS)
        if status == 101:
            out.append((b"connection", b"upgrade"))
            out.append((b"upgrade", b"websocket"))
        self.resp_headers = out
        session = self.session
        session.send_head(req, status, reason, out, framing)
        if status == 101:  # the session is a tunnel now
            if req.tunnel_early and self.conn is not None:
                self.conn.write(req.tunnel_early)
                req.tunnel_early = b""
        elif session.write_paused:
            self.pause_upstream()  # decided now that the headers say what this is

    def response_body(self, data: bytes) -> None:
        self.bytes_out += len(data)
        spool = self.spool
        if spool is None or not (spool.size or self.session.write_paused):
            self.session.send_body(data)
            return
        spool.write(data)  # behind what the client has not taken yet
        if spool.full and not self.upstream_paused:
            self.pause_upstream()

    def trailer_limits(self) -> tuple[int, int]:
        limits = self.client.live.limits
        return limits.max_head_bytes, limits.max_headers

    def response_trailers(self, trailers: list[tuple[bytes, bytes]]) -> None:
        spool = self.spool
        if spool is not None and spool.size:
            spool.trailers = trailers  # after the body the client has still to take
        else:
            self.session.send_trailers(trailers)

    def response_done(self, reusable: bool) -> None:
        conn, self.conn = self.conn, None
        spool = self.spool
        if spool is not None and spool.size:
            # The backend is free at once; the client is fed the rest from the spool
            # and the exchange ends when it has taken it all (`_drain`).
            spool.pending = self.req.body.done
        elif not self.req.upgrade or self.status != 101:
            self.session.end()
        if conn is not None:
            if reusable and self.req.body.done and self.state < SETTLED:
                self.client.pool.release(conn)
            elif conn.transport is not None:
                conn.transport.close()
        count(self.app.name if self.app else "", self.status, self.client.protocol)
        if spool is None or spool.pending is None:
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
        if self.state >= SETTLED:
            return
        if got_head or self.got_head:
            # Part of the response is on the wire: cut the client connection.
            count(app, self.status, self.client.protocol)
            self.session.abort()
            self._settle(False)
        elif isinstance(exc, BadResponse):
            self._settle(Answer(502))
        else:
            self._settle(RESEND)

    def tunnel_data(self, data: bytes) -> None:
        self.bytes_out += len(data)
        self.session.send_body(data)

    def upstream_write_paused(self, paused: bool) -> None:
        if paused:
            self.session.pause()
        else:
            self.session.resume()

    # -- used by the client side ----------------------------------------------------
    def tunnel_from_client(self, data: bytes) -> None:
        conn = self.conn
        if conn is not None and conn.usable:
            conn.write(data)

    def pause_upstream(self) -> None:
        """The client pushes back: a buffered response goes on into its spool, anything
        else makes the backend wait."""
        spool = self.spool
        if spool is None:
            if self.got_head:
                spool = self.spool = self._response_spool()
            elif self.app is not None and self.app.response_buffering and not self.req.upgrade:
                return  # decided when the head arrives (response_head)
        if spool is not None:
            spool.taken_at = time.monotonic()
            if not spool.full:
                return
        self.upstream_paused = True
        conn = self.conn
        if conn is not None and conn.transport is not None:
            conn.transport.pause_reading()

    def _response_spool(self) -> ResponseSpool | None:
        """A spool for this response, or None when it must stream: the app says so, an
        upgrade, server-sent events, `X-Accel-Buffering: no` (as nginx), or this
        worker's temp space is full."""
        app = self.app
        if app is None or not app.response_buffering or self.status == 101:
            return None
        if any(_streamed(name.lower(), value.strip().lower())
               for name, value in self.resp_headers):
            return None
        limits = self.client.live.limits
        if buffer.SPACE.used >= limits.max_temp_space:
            return None
        return ResponseSpool(memory=limits.response_buffer_memory,
                             file_cap=limits.max_temp_file, space_cap=limits.max_temp_space,
                             folder=limits.temp_dir)

    def _drain(self, spool: ResponseSpool) -> bool:
        """Feed the client from the spool until it pushes back; True once emptied."""
        session = self.session
        sent = 0
        try:
            while spool.size and not session.write_paused:
                if sent >= _DRAIN_STEP:
                    # The client takes bytes faster than we read the file: let the
                    # loop run, go on at its next turn.
                    self.client.loop.call_soon(self.resume_upstream)
                    return False
                data = spool.read()
                sent += len(data)
                session.send_body(data)
        except OSError as exc:
            log.warning("exchange %s: buffered response unreadable: %s", self.request_id, exc)
            self.fail(None, 502)
            return False
        if spool.size:
            return False
        outcome, spool.pending = spool.pending, None
        if outcome is not None:  # the backend was done: so is the exchange
            if spool.trailers is not None:
                self.session.send_trailers(spool.trailers)
            self.session.end()
            self._settle(outcome)
            return False
        return True

    def resume_upstream(self) -> None:
        spool = self.spool
        if spool is not None and spool.size:
            if self.state is FINISHED:
                return
            spool.taken_at = time.monotonic()
            if not self._drain(spool):
                return
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
            self.state = SETTLED
            self._finish(False)
