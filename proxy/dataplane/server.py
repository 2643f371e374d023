"""Listeners of one worker: accept TCP, upgrade to TLS, hand over to the HTTP session.

The HTTPS listener accepts plain TCP and upgrades with `loop.start_tls()`, so bytes
before the handshake can be inspected later (PROXY protocol) and every handshake has
a result and a duration. Owns connection accounting and draining; never reads the
store and never does slow work in a handshake.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import time
from collections.abc import Awaitable
from typing import Any, cast

from proxy import metrics
from proxy.certs.clienthello import MAX_HELLO, MORE, NOT_HELLO, server_name
from proxy.dataplane.accesslog import AccessLog
from proxy.dataplane.http80 import PlainHttpSession
from proxy.dataplane.https import HttpSession
from proxy.dataplane.state import Live
from proxy.dataplane.upstream import UpstreamPool

log = logging.getLogger("tlsedge.server")



class TlsAccept(asyncio.Protocol):
    """A freshly accepted HTTPS-listener connection, until its handshake ends.

    Reads the ClientHello first (never past it: the client sends nothing more before
    the server's reply) and looks its server name up, so that a store certificate
    not in memory yet is read before the handshake (the SNI callback must not do
    I/O); then upgrades with start_tls and hands the bytes it read to the TLS side.
    """

    __slots__ = ("_early", "_started", "_task", "_timer", "session", "transport", "worker")

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.transport: asyncio.Transport | None = None
        self.session: HttpSession | None = None
        self._early = bytearray()
        self._started = 0.0
        self._task: asyncio.Task[Any] | None = None
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        worker = self.worker
        tcp = cast(asyncio.Transport, transport)
        if worker.open_connections >= worker.live.limits.max_connections:
            metrics.LIMITS_HIT.labels("max_connections").inc()
            tcp.abort()
            return
        worker.open_connections += 1
        self.transport = tcp
        self._started = time.monotonic()
        self._timer = worker.loop.call_later(worker.live.handshake_timeout, self._too_slow)

    def data_received(self, data: bytes) -> None:
        self._early += data
        if self._task is not None or self._timer is None:
            return  # upgrading: these bytes go over with the rest
        name = server_name(self._early)
        if name == MORE and len(self._early) <= MAX_HELLO + 512:
            return
        live = self.worker.live
        entry = None
        if name != MORE and name != NOT_HELLO and live.prepare_certificate is not None:
            entry, _ = live.selector.table.lookup(name)
        waiting = (live.prepare_certificate(entry)
                   if entry is not None and live.prepare_certificate is not None else None)
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
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        worker = self.worker
        tcp = self.transport
        assert tcp is not None
        peer = tcp.get_extra_info("peername")
        session = HttpSession(worker.live, worker.pool, scheme="https",
                              port=worker.live.https_port,
                              peer=peer[0] if peer else "", on_lost=worker.session_closed,
                              access_log=worker.access_log)
        self.session = session
        loop = worker.loop
        task = loop.create_task(
            loop.start_tls(tcp, session, worker.live.tls_context, server_side=True,
                           ssl_handshake_timeout=worker.live.handshake_timeout),
            name="tls-handshake")
        self._task = task
        task.add_done_callback(self._handshake_done)
        # start_tls swaps the transport's protocol in the task's first step and
        # schedules the TLS protocol's connection_made; the bytes we read (the
        # ClientHello, and anything after it) must reach the TLS side after that, so
        # hand them over two loop turns from now.
        loop.call_soon(loop.call_soon, self._hand_over_early_bytes)

    def _too_slow(self) -> None:
        """No whole ClientHello within the handshake timeout."""
        self._timer = None
        if self._task is not None or self.transport is None:
            return
        metrics.LIMITS_HIT.labels("handshake_timeout").inc()
        metrics.HANDSHAKES.labels("timeout", "").inc()
        self.transport.abort()

    def connection_lost(self, exc: BaseException | None) -> None:
        # Only called while we are still the protocol: before the upgrade.
        if self.transport is None:
            return
        if self._timer is not None:  # left before its handshake started
            self._timer.cancel()
            self._timer = None
            metrics.HANDSHAKES.labels("failed", "").inc()
            if self._task is not None:
                self._task.cancel()  # waiting for its certificate: the read goes on
        if self.session is None:
            self.worker.open_connections -= 1
            self.transport = None

    def _hand_over_early_bytes(self) -> None:
        if not self._early or self.transport is None or self.transport.is_closing():
            return
        tls = self.transport.get_protocol()
        data, self._early = bytes(self._early), bytearray()
        # Both asyncio's and uvloop's TLS protocols are buffered protocols (uvloop's
        # is a Cython class, so no isinstance check): copy into the buffers they lend.
        view = memoryview(data)
        while view:
            buf = tls.get_buffer(len(view))  # type: ignore[attr-defined]
            n = min(len(buf), len(view))
            buf[:n] = view[:n]
            tls.buffer_updated(n)  # type: ignore[attr-defined]
            view = view[n:]

    def _handshake_done(self, task: asyncio.Task[asyncio.Transport | None]) -> None:
        self._task = None
        worker = self.worker
        if task.cancelled():
            worker.open_connections -= 1
            return
        exc = task.exception()
        if exc is not None:
            worker.open_connections -= 1
            if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
                result = "timeout"
                metrics.LIMITS_HIT.labels("handshake_timeout").inc()
            elif isinstance(exc, ssl.SSLError) and "UNRECOGNIZED_NAME" in str(exc).upper():
                result = "rejected"
            else:
                result = "failed"
            metrics.HANDSHAKES.labels(result, "").inc()
            return
        tls_transport = task.result()
        if tls_transport is None:
            worker.open_connections -= 1
            return
        session = self.session
        if session is None or session.closed or tls_transport.is_closing():
            # uvloop hands back a transport even when the peer left mid-handshake, and
            # may already have called the session's connection_lost (which counted the
            # connection closed). Not a session: adding it would leak it in `sessions`
            # and hold every drain until its deadline.
            metrics.HANDSHAKES.labels("failed", "").inc()
            return
        sslobj = tls_transport.get_extra_info("ssl_object")
        version = sslobj.version() if sslobj is not None else ""
        version = version or ""
        ok = worker.handshakes_ok.get(version)
        if ok is None:
            ok = worker.handshakes_ok[version] = metrics.batched_counter(
                metrics.HANDSHAKES, "ok", version)
        ok.pending += 1
        worker.handshake_seconds.observe(time.monotonic() - self._started)
        worker.active.pending += 1
        session.tls_version = version
        worker.sessions.add(session)
        session.connection_made(tls_transport)
        if worker.draining:
            # Accepted just before the listener closed: serve nothing new on it.
            session.drain()


class Worker:
    """The listeners of one data-plane process and the connections they hold."""

    def __init__(self, live: Live, https_sock: socket.socket, http_sock: socket.socket) -> None:
        self.live = live
        self.loop = asyncio.get_running_loop()
        limits = live.limits
        self.pool = UpstreamPool(connect_timeout=limits.upstream_connect_timeout,
                                 idle_timeout=limits.upstream_idle_timeout,
                                 max_connections=limits.backend_max_connections,
                                 queue=limits.backend_queue,
                                 quarantine_for=limits.backend_quarantine)
        settings = live.access_log
        self.access_log = (AccessLog(settings.path) if settings is not None and settings.enabled
                           else None)
        self.sessions: set[HttpSession] = set()
        self.open_connections = 0
        # Per-connection metrics, batched (see metrics.py): three labels() lookups
        # (~0.9 us each), three counter writes (~0.7 us) and a histogram observe
        # (~1.5 us) were ~6 us per connection.
        self.handshakes_ok: dict[str, metrics.BatchedCounter] = {}
        self.handshake_seconds = metrics.batched_histogram(metrics.HANDSHAKE_SECONDS)
        self.active = metrics.batched_counter(metrics.ACTIVE_CONNECTIONS, "https")
        self.draining = False
        self._https_sock = https_sock
        self._http_sock = http_sock
        self._servers: list[asyncio.Server] = []

    async def start(self) -> None:
        loop = self.loop
        metrics.start_flushing(loop)
        self._servers.append(await loop.create_server(
            lambda: TlsAccept(self), sock=self._https_sock, backlog=1024))
        self._servers.append(await loop.create_server(
            lambda: PlainHttpSession(self.live), sock=self._http_sock, backlog=1024))

    def session_closed(self, session: HttpSession) -> None:
        if session in self.sessions:
            self.sessions.discard(session)
            self.active.pending -= 1
        self.open_connections -= 1

    async def drain(self, deadline: float) -> None:
        """Stop accepting, let in-flight requests finish, close the rest at `deadline`."""
        self.draining = True
        for server in self._servers:
            server.close()
        for session in list(self.sessions):
            session.drain()
        # Polled rather than signalled: drain runs once per process lifetime.
        while self.sessions and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        for session in list(self.sessions):
            session.abort()
        self.pool.close()
        metrics.stop_flushing()
        if self.access_log is not None:
            self.access_log.close()
