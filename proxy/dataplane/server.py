"""Listeners of one worker: accept TCP, read the PROXY header where the listener takes
one, upgrade to TLS on the HTTPS listener, hand over to the HTTP session.

Both traffic listeners end in the same HTTP/1.1 session (`https.HttpSession`; with
scheme "http" on the plain listener). The HTTPS listener accepts plain TCP, so that
the bytes before the handshake (the PROXY header; the ClientHello, when a
certificate may have to be read first) can be read, then puts the loop's TLS
protocol on the connection itself (what `loop.start_tls()` does, without its task);
every handshake has a result and a duration. Owns connection accounting, draining
and the worker's heap trimming; never reads the store and never does slow work in a
handshake.
"""

from __future__ import annotations

import asyncio
import asyncio.sslproto
import ctypes
import ipaddress
import logging
import os
import socket
import ssl
import time
from collections.abc import Awaitable, Callable, Iterable
from functools import partial
from typing import Any

import uvloop
import uvloop.loop

from proxy import metrics
from proxy.certs.clienthello import MAX_HELLO, MORE, Unread, server_name
from proxy.certs.table import count_lookups_at_once, count_lookups_in_batches
from proxy.certs.tls import alert_sink
from proxy.config import Listener
from proxy.dataplane import proxyproto
from proxy.dataplane.accesslog import AccessLog
from proxy.dataplane.clients import Clients
from proxy.dataplane.h2session import H2Session
from proxy.dataplane.https import HttpSession
from proxy.dataplane.state import Live
from proxy.dataplane.upstream import UpstreamPool
from proxy.names import unmapped_ip

log = logging.getLogger("tlsedge.server")



class TrustedSources:
    """Who may send a listener's PROXY header (`listen.<name>.trusted`): the load
    balancers. Answers are remembered per address (a node sees a few balancers)."""

    __slots__ = ("_known", "_networks")

    def __init__(self, cidrs: Iterable[str]) -> None:
        self._networks = tuple(ipaddress.ip_network(c, strict=False) for c in cidrs)
        self._known: dict[str, bool] = {}

    @classmethod
    def of(cls, listener: Listener) -> TrustedSources | None:
        """The listener's sources when it takes the PROXY protocol, else None."""
        return cls(listener.trusted) if listener.proxy_protocol else None

    def trusts(self, host: str) -> bool:
        ok = self._known.get(host)
        if ok is None:
            try:
                address = ipaddress.ip_address(host)
            except ValueError:
                ok = False
            else:
                ok = any(address in network for network in self._networks)
            if len(self._known) < 1024:
                self._known[host] = ok
        return ok


Endpoints = tuple[tuple[str, int], tuple[str, int]]




class _Accept(asyncio.Protocol):
    """A connection a traffic listener accepted, until its HTTP session takes it over:
    the connection limits, and on a listener with `proxy_protocol` the PROXY header,
    read before anything else from a trusted source only. The header's client address
    is the connection's from then on: per-client limits, X-Forwarded-For, the access
    log. A connection without a whole, valid header within the handshake timeout is
    closed and counted, and none of its bytes is read as TLS or HTTP.
    """

    __slots__ = ("_early", "_header", "_origin", "_timer", "client", "transport", "worker")

    def __init__(self, worker: Worker, proxy: TrustedSources | None = None) -> None:
        self.worker = worker
        # The client address once admitted (counted in worker.clients), else None.
        self.client: str | None = None
        self.transport: asyncio.Transport | None = None
        self._early = bytearray()
        # Who may send the PROXY header while it is awaited; None once read (or off).
        self._header = proxy
        # (client address, port), (address, port) it reached: the peer's until a PROXY
        # header names others.
        self._origin: Endpoints = (("", 0), ("", 0))
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        worker = self.worker
        tcp: asyncio.Transport = transport  # type: ignore[assignment]  # cast() is a call
        if worker.open_connections >= worker.live.limits.max_connections:
            metrics.LIMITS_HIT.labels("max_connections").inc()
            tcp.abort()
            return
        # getpeername once (~1.7 us on uvloop): the address and port stay at hand.
        peername = tcp.get_extra_info("peername") or ("", 0)
        peer = unmapped_ip(peername[0])
        self._origin = ((peer, peername[1]), self._origin[1])
        if self._header is not None:
            if not self._header.trusts(peer):
                metrics.PROXY_PROTOCOL.labels("untrusted").inc()
                tcp.abort()
                return
        elif not self._admit(peer, tcp):
            return
        worker.open_connections += 1
        self.transport = tcp
        if self._header is None:
            self._start()
        if self._awaits_bytes() and self.transport is tcp:
            self._timer = worker.loop.call_later(worker.live.handshake_timeout, self._too_slow)

    def _admit(self, client: str, tcp: asyncio.Transport) -> bool:
        worker = self.worker
        if not worker.clients.admit(client, worker.live.limits.connections_per_client):
            metrics.LIMITS_HIT.labels("connections_per_client").inc()
            if self._timer is not None:  # refused after its PROXY header: no handshake
                self._timer.cancel()
                self._timer = None
            tcp.abort()
            return False
        self.client = client
        return True

    def data_received(self, data: bytes) -> None:
        if self._header is None:
            self._more(data)
            return
        self._early += data
        try:
            header = proxyproto.parse(self._early)
        except proxyproto.BadHeader as exc:
            self._refuse_header(exc.result, str(exc))
            return
        if header is proxyproto.MORE:
            return
        self._header = None
        self.worker.proxy_results[header.local].pending += 1
        rest = bytes(self._early[header.length:])
        self._early = bytearray()
        tcp = self.transport
        assert tcp is not None
        if header.source is not None and header.destination is not None:
            self._origin = (header.source, header.destination)
        if self._admit(self._origin[0][0], tcp):
            self._start()
            if rest:
                self._more(rest)

    def _refuse_header(self, result: str, why: str) -> None:
        """Close a connection whose PROXY header is missing, invalid or late, unread."""
        metrics.PROXY_PROTOCOL.labels(result).inc()
        log.debug("PROXY header refused: %s", why)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._early = bytearray()  # not "truncated" too, when the close is reported
        if self.transport is not None:
            self.transport.abort()

    def _header_lost(self) -> bool:
        """In connection_lost: True when the connection left while its PROXY header was
        awaited (then it is counted closed here)."""
        if self._header is None or self.transport is None:
            return False
        if self._early:
            metrics.PROXY_PROTOCOL.labels("truncated").inc()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.worker.connection_closed(None)
        self.transport = None
        return True

    def _too_slow(self) -> None:
        self._timer = None
        if self._header is not None:
            self._refuse_header("timeout", "no whole PROXY header within the handshake "
                                "timeout")

    def _session(self, scheme: str, port: int) -> HttpSession:
        """The connection's HTTP session, for the admitted client."""
        worker, tcp = self.worker, self.transport
        assert tcp is not None and self.client is not None
        session = HttpSession(worker.live, worker.pool, scheme=scheme, port=port,
                              peer=self.client, on_lost=worker.session_closed,
                              access_log=worker.access_log, clients=worker.clients)
        source, destination = self._origin
        if not destination[0]:  # the listener's side of the connection (~0.5 us)
            ours = tcp.get_extra_info("sockname") or ("", 0)
            destination = (unmapped_ip(ours[0]), ours[1])
        session.client.origin = (source, destination)
        session.tcp = tcp
        return session

    def _start(self) -> None:
        """The connection is admitted (its PROXY header, if any, read)."""

    def _awaits_bytes(self) -> bool:
        """Whether the connection, just accepted, waits for bytes of ours to read (its
        PROXY header, its ClientHello): then they are due within the handshake timeout."""
        return self._header is not None

    def _more(self, data: bytes) -> None:
        """Bytes after the PROXY header."""


class PlainAccept(_Accept):
    """The plain-HTTP listener's side of `_Accept`: once admitted, the connection is
    the HTTP/1.1 session's (the same as HTTPS, without TLS)."""

    __slots__ = ("session",)

    def __init__(self, worker: Worker, proxy: TrustedSources | None = None) -> None:
        super().__init__(worker, proxy)
        self.session: HttpSession | None = None

    def _start(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        worker, tcp = self.worker, self.transport
        assert tcp is not None
        session = self.session = self._session("http", worker.http_port)
        worker.sessions.add(session)
        worker.active_http.pending += 1
        tcp.set_protocol(session)
        session.connection_made(tcp)
        if worker.draining:
            session.drain()

    def _more(self, data: bytes) -> None:
        if self.session is not None:
            self.session.data_received(data)

    def connection_lost(self, exc: BaseException | None) -> None:
        # Only called while we are still the protocol: before the session took over.
        if not self._header_lost() and self.transport is not None:
            self.worker.connection_closed(self.client)
            self.transport = None


class TlsAccept(_Accept):
    """The HTTPS listener's side of `_Accept`, until the handshake ends.

    When every certificate is in memory (`Live.all_resident`), the connection goes to
    TLS as soon as it is admitted: its bytes then reach OpenSSL straight from the
    socket, and the SNI callback picks the certificate. Otherwise the ClientHello is
    read first (never past it: the client sends nothing more before the server's
    reply) and its server name looked up, so that a store certificate not in memory
    yet is read before the handshake (the SNI callback must not do I/O); the bytes
    read are then handed to the TLS side.

    The TLS side is the loop's own TLS protocol (what `loop.start_tls` makes), built
    here without start_tls's task, future and two scheduled callbacks per
    connection: this object is its waiter, told the handshake's result
    (`set_result` / `set_exception`) in the same call that completes it.
    """

    __slots__ = ("_app", "_started", "_task", "session")

    def __init__(self, worker: Worker, proxy: TrustedSources | None = None) -> None:
        super().__init__(worker, proxy)
        self.session: HttpSession | None = None
        # The TLS transport the session gets, from the upgrade until the handshake's end.
        self._app: asyncio.Transport | None = None
        self._started = 0.0
        self._task: asyncio.Task[Any] | None = None

    def _start(self) -> None:
        self._started = time.monotonic()
        live = self.worker.live
        if live.prepare_certificate is None or (live.all_resident is not None
                                                and live.all_resident()):
            self._upgrade()

    def _awaits_bytes(self) -> bool:
        return self._header is not None or self.session is None

    def _more(self, data: bytes) -> None:
        if self.session is not None:  # upgraded after the PROXY header: TLS bytes
            self._feed(data)
            return
        self._early += data
        if self._task is not None or self._timer is None:
            return  # upgrading: these bytes go over with the rest
        name = server_name(self._early)
        if name is MORE and len(self._early) <= MAX_HELLO + 512:
            return
        prepare = self.worker.live.prepare_certificate
        waiting = None
        if prepare is not None and not isinstance(name, Unread):
            entry, _ = self.worker.live.selector.table.lookup(name)
            if entry is not None:
                try:
                    waiting = prepare(entry)
                except Exception as exc:  # never the connection's end: the SNI callback picks
                    log.error("could not prepare the certificate of %s for a handshake: "
                              "%s: %s", name, type(exc).__name__, exc)
        if waiting is None:
            self._upgrade()
        else:
            self._task = self.worker.loop.create_task(self._upgrade_after(waiting),
                                                      name="certificate-load")

    async def _upgrade_after(self, waiting: Awaitable[None]) -> None:
        await waiting  # a failed read leaves the slot unloaded: the SNI callback refuses
        self._task = None
        if self.transport is not None and not self.transport.is_closing():
            self._upgrade()

    def _upgrade(self) -> None:
        """Put the loop's TLS protocol on the connection; hand it what was read."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        worker = self.worker
        tcp = self.transport
        assert tcp is not None
        session = self.session = self._session("https", worker.live.https_port)
        tls = worker.tls_protocol(worker.loop, session, worker.live.tls_context, self,
                                  server_side=True, call_connection_made=False,
                                  ssl_handshake_timeout=worker.live.handshake_timeout)
        self._app = tls._get_app_transport()
        tcp.set_protocol(tls)
        # A handshake that fails (protocol version, ciphers, groups, unknown name)
        # fails inside the TLS protocol, which then closes without sending the alert
        # OpenSSL queued: the TLS object, made here, hands it to us first
        # (certs.tls.alert_sink), as nginx sends it.
        sink = alert_sink.set(self)
        try:
            tls.connection_made(tcp)
        finally:
            alert_sink.reset(sink)
        if self._early:
            data, self._early = bytes(self._early), bytearray()
            self._feed(data)

    def __call__(self, alert: bytes) -> None:
        """The alert of a handshake that failed (see `_upgrade`)."""
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(alert)

    def _feed(self, data: bytes) -> None:
        """Bytes read before the TLS protocol took the connection, to it."""
        tcp = self.transport
        if tcp is None or tcp.is_closing():
            return
        tls = tcp.get_protocol()
        # Both asyncio's and uvloop's TLS protocols are buffered protocols (uvloop's
        # is a Cython class, so no isinstance check): copy into the buffers they lend.
        view = memoryview(data)
        while view:
            buf = tls.get_buffer(len(view))  # type: ignore[attr-defined]
            n = min(len(buf), len(view))
            buf[:n] = view[:n]
            tls.buffer_updated(n)  # type: ignore[attr-defined]
            view = view[n:]

    def _too_slow(self) -> None:
        """No whole PROXY header or ClientHello within the handshake timeout."""
        if self._header is not None:
            super()._too_slow()
            return
        self._timer = None
        if self._task is not None or self.transport is None:
            return
        metrics.LIMITS_HIT.labels("handshake_timeout").inc()
        metrics.HANDSHAKES.labels("timeout", "").inc()
        self.transport.abort()

    def connection_lost(self, exc: BaseException | None) -> None:
        # Only called while we are still the protocol: before the upgrade.
        if self.transport is None or self._header_lost():
            return
        if self._timer is not None:  # left before its handshake started
            self._timer.cancel()
            self._timer = None
            metrics.HANDSHAKES.labels("failed", "").inc()
            if self._task is not None:
                self._task.cancel()  # waiting for its certificate: the read goes on
        if self.session is None:
            self.worker.connection_closed(self.client)
            self.transport = None

    # -- the TLS protocol's waiter ------------------------------------------------------
    def cancelled(self) -> bool:
        return False

    def set_exception(self, exc: BaseException) -> None:
        """The handshake failed, timed out, or the connection was lost during it."""
        self.transport = self.session = self._app = None
        self.worker.connection_closed(self.client)
        if isinstance(exc, (ConnectionAbortedError, TimeoutError)):
            # The TLS protocol's own handshake timer (tls.handshake_timeout) aborted it.
            result = "timeout"
            metrics.LIMITS_HIT.labels("handshake_timeout").inc()
        elif isinstance(exc, ssl.SSLError) and "UNRECOGNIZED_NAME" in str(exc).upper():
            result = "rejected"
        else:
            result = "failed"
        metrics.HANDSHAKES.labels(result, "").inc()

    def set_result(self, _: None) -> None:
        """The handshake completed, or the connection was lost during it (no TLS
        object then). Called inside the TLS protocol's handshake step: the session
        is connected before any of its data is delivered."""
        worker, session, tls = self.worker, self.session, self._app
        self._app = self.session = None
        sslobj = tls.get_extra_info("ssl_object") if tls is not None else None
        if sslobj is None or session is None or session.closed or tls is None \
                or tls.is_closing():
            self.transport = None
            worker.connection_closed(self.client)
            metrics.HANDSHAKES.labels("failed", "").inc()
            return
        sslobj.alert_to = None  # no cycle through us for the connection's life
        try:
            self._serve(session, tls, sslobj)
        except Exception:  # inside the TLS protocol's read: log it here, end the connection
            log.exception("could not start serving a connection from %s", self.client)
            if self.transport is not None:  # not a served session yet: ours to count
                self.transport = None
                worker.connection_closed(self.client)
            tls.abort()

    def _serve(self, session: HttpSession, tls: asyncio.Transport, sslobj: Any) -> None:
        """The handshake completed: count it, hand the connection to its session."""
        worker = self.worker
        version = sslobj.version() or ""
        ok = worker.handshakes_ok.get(version)
        if ok is None:
            ok = worker.handshakes_ok[version] = metrics.batched_counter(
                metrics.HANDSHAKES, "ok", version)
        ok.pending += 1
        worker.handshake_seconds.observe(time.monotonic() - self._started)
        worker.active.pending += 1
        served: HttpSession | H2Session = session
        if sslobj.selected_alpn_protocol() == "h2":
            served = self._to_h2(session, tls, version)
        else:
            session.client.tls_version = version
        served.tcp = self.transport
        self.transport = None
        worker.sessions.add(served)
        served.connection_made(tls)
        if worker.draining:
            # Accepted just before the listener closed: serve nothing new on it.
            served.drain()

    def _to_h2(self, h1: HttpSession, tls: asyncio.Transport, version: str) -> H2Session:
        """ALPN chose h2: an HTTP/2 session takes the connection over, with the bytes
        the HTTP/1.1 one (the TLS protocol needed one) was handed before its
        connection_made."""
        worker = self.worker
        h2 = H2Session(worker.live, worker.pool, port=worker.live.https_port, peer=h1.peer,
                       tls_version=version, on_lost=worker.session_closed,
                       access_log=worker.access_log, clients=worker.clients)
        h2.client.origin = h1.client.origin
        h2.early = h1.hand_over()
        tls.set_protocol(h2)
        return h2


class _MallInfo2(ctypes.Structure):
    """glibc's struct mallinfo2 (malloc.h)."""

    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]


class HeapTrim:
    """Hands the heap's free pages back to the system when `slack` bytes or more of it
    are free (checked every `interval` seconds).

    Each TLS connection's protocol (uvloop's) holds a 256 kB read buffer, and every
    TLS read allocates another 256 kB for the moment; glibc serves both from its heap,
    and the pages they touched stay resident after they are freed, at offsets the
    next allocations do not reuse exactly. Measured: a worker holding 1,000 idle TLS
    connections, then none, again and again, grew 52 -> 235 MB in 7 rounds, all of it
    free memory (malloc_trim gave it back: 57 MB). A check costs ~10 us (mallinfo2), a
    trim ~1 ms per 10 MB handed back; glibc only (elsewhere this does nothing).
    """

    __slots__ = ("_floor", "_info", "_interval", "_loop", "_slack", "_timer", "_trim")

    def __init__(self, loop: asyncio.AbstractEventLoop, *, interval: float = 10.0,
                 slack: int = 16 << 20) -> None:
        self._loop = loop
        self._interval = interval
        self._slack = slack
        self._floor = 0
        self._timer: asyncio.TimerHandle | None = None
        try:
            libc = ctypes.CDLL(None)
            self._trim: Callable[[int], int] | None = libc.malloc_trim
            self._info: Callable[[], _MallInfo2] | None = libc.mallinfo2
            libc.mallinfo2.restype = _MallInfo2
        except (OSError, AttributeError):  # not glibc (>= 2.33): nothing to trim this way
            self._trim = self._info = None

    @staticmethod
    def rss() -> int:
        """This process's resident bytes."""
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def start(self) -> None:
        if self._trim is not None and self._timer is None:
            self._timer = self._loop.call_later(self._interval, self._check)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _check(self) -> None:
        self._timer = self._loop.call_later(self._interval, self._check)
        if self._info is None:
            return
        free = self._info().fordblks
        # Free bytes a trim left (free in glibc's books, not resident): not a reason
        # to trim again, only what was freed since is.
        if free >= self._floor + self._slack:
            self.trim()
            self._floor = self._info().fordblks
        elif free < self._floor:
            self._floor = free

    def trim(self) -> int:
        """Trim now; the resident bytes handed back."""
        before = self.rss()
        if self._trim is not None:
            self._trim(0)
        after = self.rss()
        log.debug("heap trimmed: RSS %.1f -> %.1f MB", before / 2**20, after / 2**20)
        return before - after


class Worker:
    """The listeners of one data-plane process and the connections they hold."""

    def __init__(self, live: Live, https_sock: socket.socket, http_sock: socket.socket, *,
                 https_proxy: TrustedSources | None = None,
                 http_proxy: TrustedSources | None = None) -> None:
        self.live = live
        self.loop = asyncio.get_running_loop()
        # The TLS protocol `loop.start_tls` would put on a connection (TlsAccept makes it
        # itself): uvloop's, or asyncio's on another loop (the same constructor).
        self.tls_protocol: Callable[..., Any] = (
            uvloop.loop.SSLProtocol  # type: ignore[attr-defined]  # not in its stubs
            if isinstance(self.loop, uvloop.Loop)
            else asyncio.sslproto.SSLProtocol)
        limits = live.limits
        self.pool = UpstreamPool(connect_timeout=limits.upstream_connect_timeout,
                                 idle_timeout=limits.upstream_idle_timeout,
                                 max_connections=limits.backend_max_connections,
                                 queue=limits.backend_queue,
                                 quarantine_for=limits.backend_quarantine)
        settings = live.access_log
        self.access_log = (AccessLog(settings.path) if settings is not None and settings.enabled
                           else None)
        self.sessions: set[HttpSession | H2Session] = set()
        self.open_connections = 0
        self.clients = Clients()
        # Per-connection metrics, batched (see metrics.py): three labels() lookups
        # (~0.9 us each), three counter writes (~0.7 us) and a histogram observe
        # (~1.5 us) were ~6 us per connection.
        self.handshakes_ok: dict[str, metrics.BatchedCounter] = {}
        self.handshake_seconds = metrics.batched_histogram(metrics.HANDSHAKE_SECONDS)
        self.active = metrics.batched_counter(metrics.ACTIVE_CONNECTIONS, "https")
        self.active_http = metrics.batched_counter(metrics.ACTIVE_CONNECTIONS, "http")
        # PROXY headers read, by whether they were LOCAL.
        self.proxy_results = {
            False: metrics.batched_counter(metrics.PROXY_PROTOCOL, "ok"),
            True: metrics.batched_counter(metrics.PROXY_PROTOCOL, "local")}
        self.http_port = http_sock.getsockname()[1]
        self._https_proxy = https_proxy
        self._http_proxy = http_proxy
        self.draining = False
        self._https_sock = https_sock
        self._http_sock = http_sock
        self._servers: list[asyncio.Server] = []
        self.heap = HeapTrim(self.loop)

    async def start(self) -> None:
        loop = self.loop
        metrics.start_flushing(loop)
        self.heap.start()
        count_lookups_in_batches()
        # partial, not a lambda: no Python frame per accepted connection.
        self._servers.append(await loop.create_server(
            partial(TlsAccept, self, self._https_proxy), sock=self._https_sock, backlog=1024))
        self._servers.append(await loop.create_server(
            partial(PlainAccept, self, self._http_proxy), sock=self._http_sock, backlog=1024))

    def alpn_changed(self, alpn: tuple[str, ...]) -> None:
        """A reload changed what ALPN offers. An HTTP/2 connection that negotiated what
        is no longer offered gets GOAWAY: its streams finish, the client takes new
        requests to a new connection (which negotiates what is offered now)."""
        if "h2" in alpn:
            return
        for session in list(self.sessions):
            if isinstance(session, H2Session):
                session.drain()

    def session_closed(self, session: HttpSession | H2Session) -> None:
        """A session's connection closed. Only a session that was served (in
        `sessions`) counts it: one whose handshake failed is told too (the TLS
        protocol tells its app protocol, after a failed handshake, that the connection
        was lost), and the acceptor counted that connection closed already (each
        refused handshake once lowered the count twice, eroding the connection
        limits)."""
        if session in self.sessions:
            self.sessions.discard(session)
            (self.active if session.scheme == "https" else self.active_http).pending -= 1
            self.connection_closed(session.peer)

    def connection_closed(self, client: str | None) -> None:
        """An accepted connection (counted in open_connections and, once admitted, per
        client: None before) closed."""
        self.open_connections -= 1
        if client is not None:
            self.clients.release(client)

    async def drain(self, deadline: float) -> None:
        """Stop accepting, let in-flight requests finish, close the rest at `deadline`.

        Waits for requests in flight, never for clients to close their side: idle
        connections are closed at once, and each connection's TCP side is closed as
        soon as our last byte has been handed to it (`HttpSession.release`).
        """
        self.draining = True
        for server in self._servers:
            server.close()
        for session in list(self.sessions):
            session.drain()
        # Polled rather than signalled: drain runs once per process lifetime.
        while self.sessions and time.monotonic() < deadline:
            for session in list(self.sessions):
                session.release()
            await asyncio.sleep(0.05)
        for session in list(self.sessions):
            session.abort()
        self.pool.close()
        metrics.stop_flushing()
        count_lookups_at_once()
        self.heap.stop()
        if self.access_log is not None:
            self.access_log.close()
