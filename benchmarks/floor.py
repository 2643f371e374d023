"""The floor: a bare TLS relay in Python, run beside tlsedge so the cost of tlsedge's
features is the distance floor -> tlsedge (issue 14).

What it shares with tlsedge: uvloop, asyncio.Protocol, one listening socket per
worker process (SO_REUSEPORT when there are several, backlog 1024, TCP_NODELAY), and
the TLS policy of proxy/certs/tls.py: TLS 1.2 and 1.3, the same TLS 1.2 suites
(--ciphers), the client's cipher order, no session tickets (tlsedge's default
`session_tickets: 0`), no compression or renegotiation, no automatic chain building,
no server-side session store, ALPN http/1.1, key-exchange groups X25519:P-256:P-384
(peers.py points OPENSSL_CONF at proxy/certs/openssl.cnf, as tlsedge's CLI does), and
an SNI callback that picks the context of the certificate covering the name. Keep it
in step with tls.py.

What it leaves out: HTTP. Each client connection gets its own new backend connection
and bytes go both ways unchanged, with flow control; no parsing, routing, headers,
limits, metrics or logs. One consequence: a client's `Connection: close` reaches the
backend, which closes, so every full handshake also costs the floor a backend
connect (nginx and tlsedge reuse pooled backend connections).

With --http it is the HTTP floor ("floor-http" in the benchmarks): the same relay,
with the least any HTTP/1.1 proxy built on httptools must do per request besides: the
client's bytes go through a request parser (its Host field read, as routing needs) and
the backend's through a response parser (where each response ends, as keep-alive
pooling needs), and both are still relayed unchanged. tlsedge's cost above it is its
features (routing, header rewrite, limits, metrics, pooling), not parsing HTTP in
Python.

    OPENSSL_CONF=proxy/certs/openssl.cnf python benchmarks/floor.py \\
        --listen 127.0.0.1:8443 --backend 127.0.0.1:8080 --ciphers SUITES \\
        --cert NAMES CHAIN KEY [--cert ...] [--workers N] [--http]

Stands alone: never imports proxy/ (a floor must not share what it measures).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import sys
from typing import Any


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def _listen(address: tuple[str, int], reuse_port: bool) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind(address)
    sock.listen(1024)
    sock.setblocking(False)
    return sock


def _lean(ctx: Any) -> None:
    """No automatic chain building and no server-side session store, as tlsedge's
    contexts (proxy/certs/tls.py, not imported: the floor stands alone). Python has
    no API for either: SSL_CTX_ctrl through ctypes, on the SSL_CTX pointer CPython's
    SSLContext holds right after its object header, checked once by reading the
    options back through OpenSSL."""
    import _ssl
    import ctypes

    lib = ctypes.CDLL(_ssl.__file__)
    lib.SSL_CTX_ctrl.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_long,
                                 ctypes.c_void_p]
    lib.SSL_CTX_get_options.argtypes = [ctypes.c_void_p]
    lib.SSL_CTX_get_options.restype = ctypes.c_uint64
    pointer = ctypes.c_void_p.from_address(id(ctx) + object.__basicsize__).value
    if lib.SSL_CTX_get_options(pointer) != int(ctx.options):
        raise RuntimeError("cannot reach the SSL_CTX behind ssl.SSLContext here")
    lib.SSL_CTX_ctrl(pointer, 33, 0x8, None)  # SSL_CTX_set_mode(SSL_MODE_NO_AUTO_CHAIN)
    # SSL_CTX_set_session_cache_mode(SERVER | NO_INTERNAL_STORE)
    lib.SSL_CTX_ctrl(pointer, 44, 0x2 | 0x200, None)


def _contexts(certs: list[list[str]], ciphers: str) -> Any:
    """The listener's context: no certificate of its own; the SNI callback hands each
    connection the context of its name's certificate (the first one by default)."""
    import ssl

    def policy(ctx: ssl.SSLContext) -> ssl.SSLContext:
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.maximum_version = ssl.TLSVersion.TLSv1_3
        ctx.set_ciphers(ciphers)
        ctx.options &= ~ssl.OP_CIPHER_SERVER_PREFERENCE
        ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
        ctx.set_alpn_protocols(["http/1.1"])
        ctx.num_tickets = 0
        _lean(ctx)
        return ctx

    by_name: dict[str | None, ssl.SSLContext] = {}
    for names, chain, key in certs:
        ctx = policy(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
        ctx.load_cert_chain(chain, key)
        by_name.setdefault(None, ctx)
        for name in names.split(","):
            by_name.setdefault(name.lower(), ctx)

    def pick(sslobj: Any, name: str | None, _: ssl.SSLContext) -> None:
        ctx = by_name.get(name)
        if ctx is None and name:  # one wildcard level, as a certificate covers
            ctx = by_name.get("*" + name[name.find("."):]) or by_name[None]
        sslobj.context = ctx or by_name[None]

    listener = policy(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    listener.sni_callback = pick
    return listener


def _upstream_protocol(http: bool) -> Any:
    """The backend side of a relay: bytes to the client, flow control both ways (with
    `http`, through a response parser first)."""
    import asyncio

    import httptools

    class Upstream(asyncio.Protocol):
        __slots__ = ("client", "feed", "responses")

        def __init__(self, client: Any) -> None:
            self.client = client
            self.responses = 0
            self.feed = httptools.HttpResponseParser(self).feed_data if http else None

        def on_message_complete(self) -> None:
            self.responses += 1  # a pool would take the connection back here

        def data_received(self, data: bytes) -> None:
            if self.feed is not None:
                try:
                    self.feed(data)
                except httptools.HttpParserError:
                    self.client.transport.abort()  # nothing broken reaches the client
                    return
            self.client.transport.write(data)

        def pause_writing(self) -> None:
            self.client.transport.pause_reading()

        def resume_writing(self) -> None:
            self.client.transport.resume_reading()

        def connection_lost(self, exc: Exception | None) -> None:
            self.feed = None  # the parser holds our methods: free both now, not at a GC
            self.client.transport.close()  # after what is buffered (close_notify)

    return Upstream


def _client_protocol(loop: Any, backend: tuple[str, int], http: bool) -> Any:
    """The client side: a backend connection of its own, bytes to it unchanged (with
    `http`, through a request parser first, its Host field read)."""
    import asyncio

    import httptools

    upstream_protocol = _upstream_protocol(http)

    class Client(asyncio.Protocol):
        __slots__ = ("feed", "host", "pending", "transport", "upstream")

        def connection_made(self, transport: Any) -> None:
            self.transport = transport
            self.upstream: Any = None
            self.pending: list[bytes] = []
            self.host = b""
            self.feed = httptools.HttpRequestParser(self).feed_data if http else None
            # uvloop connects only in a coroutine: one task per client connection.
            loop.create_task(self._connect())

        async def _connect(self) -> None:
            try:
                upstream, _ = await loop.create_connection(
                    lambda: upstream_protocol(self), *backend)
            except OSError:
                self.transport.abort()
                return
            if self.transport.is_closing():
                upstream.close()
                return
            self.upstream = upstream
            if self.pending:
                upstream.write(b"".join(self.pending))
                self.pending = []

        def on_header(self, name: bytes, value: bytes) -> None:
            if name.lower() == b"host":
                self.host = value  # what a router would look up

        def data_received(self, data: bytes) -> None:
            if self.feed is not None:
                try:
                    self.feed(data)
                except httptools.HttpParserError:
                    self.transport.abort()  # nothing broken reaches the backend
                    return
            if self.upstream is None:
                self.pending.append(data)
            else:
                self.upstream.write(data)

        def pause_writing(self) -> None:
            if self.upstream is not None:
                self.upstream.pause_reading()

        def resume_writing(self) -> None:
            if self.upstream is not None:
                self.upstream.resume_reading()

        def connection_lost(self, exc: Exception | None) -> None:
            self.feed = None  # the parser holds our methods: free both now, not at a GC
            if self.upstream is not None:
                self.upstream.close()

    return Client


def _serve(sock: socket.socket, backend: tuple[str, int], certs: list[list[str]],
           ciphers: str, http: bool) -> None:
    """One worker: asyncio is imported here, in the child, to keep the master small."""
    import asyncio

    import uvloop

    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    client = _client_protocol(loop, backend, http)
    loop.run_until_complete(loop.create_server(client, sock=sock, ssl=_contexts(certs, ciphers),
                                               backlog=1024, ssl_handshake_timeout=10.0))
    loop.run_forever()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--listen", type=_address, required=True)
    p.add_argument("--backend", type=_address, required=True)
    p.add_argument("--cert", nargs=3, action="append", required=True,
                   metavar=("NAMES", "CHAIN", "KEY"), help="NAMES: comma-separated")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--ciphers", required=True, help="TLS 1.2 suites (OpenSSL names)")
    p.add_argument("--http", action="store_true",
                   help="the HTTP floor: requests and responses through httptools parsers")
    opts = p.parse_args()
    # One socket per worker, bound here before the fork (as tlsedge's supervisor does).
    socks = [_listen(opts.listen, opts.workers > 1) for _ in range(opts.workers)]
    children = []
    for sock in socks:
        pid = os.fork()
        if pid == 0:
            for other in socks:
                if other is not sock:
                    other.close()
            _serve(sock, opts.backend, opts.cert, opts.ciphers, opts.http)
            os._exit(0)
        children.append(pid)
        sock.close()

    def stop(signum: int, frame: object) -> None:
        for child in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    for _ in children:  # a worker that dies ends the floor (a benchmark sees it)
        os.wait()
        stop(signal.SIGTERM, None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
