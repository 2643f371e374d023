"""The data plane's HTTPS listener in this process, and a loop that counts what is
scheduled on it: for tests and benchmarks that count what a connection costs the
worker (timers, tasks, callbacks), which a separate `tlsedge run` hides.

The listener is the real one (`proxy.dataplane.server.Worker`: accept, TLS with the
SNI callback, the HTTP session) on 127.0.0.1, with one certificate and no backend.
Imports `proxy` when called, not when imported: a benchmark puts the code tree it
measures on sys.path first.
"""

from __future__ import annotations

import socket
from typing import Any

import uvloop


class CountingLoop(uvloop.Loop):  # type: ignore[misc]
    """A uvloop loop counting call_later, call_at, call_soon, create_task and
    create_future calls. uvloop's own Cython code reaches these through attribute
    lookup too (its TLS handshake timer), where a profiler sees nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: dict[str, int] = {}

    def _count(self, name: str) -> None:
        self.counts[name] = self.counts.get(name, 0) + 1

    def call_later(self, *args: Any, **kw: Any) -> Any:
        self._count("call_later")
        return super().call_later(*args, **kw)

    def call_at(self, *args: Any, **kw: Any) -> Any:
        self._count("call_at")
        return super().call_at(*args, **kw)

    def call_soon(self, *args: Any, **kw: Any) -> Any:
        self._count("call_soon")
        return super().call_soon(*args, **kw)

    def create_task(self, *args: Any, **kw: Any) -> Any:
        self._count("create_task")
        return super().create_task(*args, **kw)

    def create_future(self) -> Any:
        self._count("create_future")
        return super().create_future()


async def start_listener(chain_pem: bytes, key_pem: bytes, *, connections_per_client: int = 256,
                         alpn: tuple[str, ...] = ("h2", "http/1.1"),
                         platform: str = "inproc.test", backend: int = 9) -> Any:
    """A started `Worker` serving this certificate (as the default too) on 127.0.0.1;
    its HTTPS port is `worker.live.https_port`. Host `app.<platform>` goes to the
    backend on 127.0.0.1:`backend` (none by default). Stop it with
    `await worker.drain(0)`."""
    from proxy.certs.bundle import load_bundle
    from proxy.certs.table import CertEntry, CertSelector, CertTable, ContextCache
    from proxy.certs.tls import TlsSettings, base_context
    from proxy.config import Limits
    from proxy.dataplane.server import Worker
    from proxy.dataplane.state import Live
    from proxy.routing import App, Backend, RouteTable

    settings = TlsSettings(alpn=alpn)
    entry = CertEntry(load_bundle(chain_pem, key_pem), "static")
    selector = CertSelector(CertTable.from_entries([entry], entry), ContextCache(settings))
    ctx = base_context(settings)
    ctx.sni_callback = selector.sni_callback
    socks = []
    for _ in range(2):
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen(1024)
        sock.setblocking(False)
        socks.append(sock)
    routes = RouteTable(platform, {"app": App("app", (Backend("127.0.0.1", backend),))}, {})
    live = Live(selector=selector, tls_context=ctx, routes=routes,
                limits=Limits(connections_per_client=connections_per_client),
                https_port=socks[0].getsockname()[1])
    worker = Worker(live, socks[0], socks[1])
    await worker.start()
    return worker
