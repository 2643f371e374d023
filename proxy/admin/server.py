"""The admin listener: its own socket on `listen.admin`, bound by the supervisor before
any worker starts, serving HTTP/1.1 with aiohttp (over TLS when `admin.certificate` is
set) on the supervisor's event loop. The socket is never passed to a worker, so no
public listener can reach it.

Owns the limits that protect the supervisor at the connection level: at most
MAX_CONNECTIONS open, a request head within IDLE_TIMEOUT and MAX_LINE/MAX_HEADERS, a TLS
handshake within 10 s. Bodies are judged in bodies.py, before they are read.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import ssl
from collections.abc import Callable
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from proxy.admin import bodies
from proxy.admin.api import AdminApp
from proxy.admin.auth import Auth, load_or_create_token
from proxy.admin.dashboard import OrderQueue, Reload
from proxy.certs.bundle import load_bundle_files
from proxy.certs.tls import TlsSettings, server_context
from proxy.config import Config, parse_address
from proxy.errors import TlsEdgeError
from proxy.registry import Registry

log = logging.getLogger("tlsedge.admin")

MAX_CONNECTIONS = 64
# An idle connection, or one whose request head has not arrived, closes after this.
IDLE_TIMEOUT = 30.0
HANDSHAKE_TIMEOUT = 10.0
# The request line and each header at most 8 KiB, and at most 64 headers.
MAX_LINE = 8190
MAX_HEADERS = 64
# After refusing a body unread, swallow the rest of it for at most this long, so the
# client reads our answer instead of a connection reset.
LINGER_SECONDS = 2.0


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


class _ProtocolLog(logging.LoggerAdapter[logging.Logger]):
    """aiohttp's protocol log: a malformed request (anyone who reaches the port can send
    one) is answered 400 and logged at debug level only, so a flood stays out of the
    log; anything else keeps its traceback."""

    def exception(self, msg: object, *args: object, exc_info: Any = True,
                  **kwargs: Any) -> None:
        if isinstance(exc_info, HttpProcessingError):
            self.debug("admin: refused a malformed request (%s %s)",
                       type(exc_info).__name__, exc_info.message)
            return
        self.error(msg, *args, exc_info=exc_info, **kwargs)


class _Refused(asyncio.Protocol):
    """A connection over MAX_CONNECTIONS: closed as soon as it is accepted."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.close()


class _Site(web.BaseSite):
    """aiohttp's SockSite, plus the connection cap and the TLS handshake timeout."""

    __slots__ = ("_sock",)

    def __init__(self, runner: web.AppRunner, sock: socket.socket,
                 tls: ssl.SSLContext | None) -> None:
        super().__init__(runner, ssl_context=tls)
        self._sock = sock

    @property
    def name(self) -> str:
        host, port = self._sock.getsockname()[:2]
        return f"{'https' if self._ssl_context else 'http'}://{host}:{port}"

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None

        def protocol() -> asyncio.BaseProtocol:
            if len(server.connections) >= MAX_CONNECTIONS:
                return _Refused()
            return server()

        self._server = await asyncio.get_running_loop().create_server(
            protocol, sock=self._sock, ssl=self._ssl_context, backlog=64,
            ssl_handshake_timeout=HANDSHAKE_TIMEOUT if self._ssl_context else None)


class AdminServer:
    """Bound at construction (errors before the workers start); serves in `serve()`."""

    def __init__(self, config: Config) -> None:
        address = config.listen.admin
        if address is None:
            raise TlsEdgeError("listen.admin is not set")
        self.address = address
        self.settings = config.admin
        token, self.token_created = load_or_create_token(config.admin.token_file)
        self.auth = Auth(token, session_ttl=config.admin.session_ttl)
        self.tls: ssl.SSLContext | None = None
        if config.admin.certificate is not None:
            files = config.admin.certificate
            bundle = load_bundle_files(files.cert, files.key)
            self.tls = server_context(bundle.chain_pem, bundle.key_pem, TlsSettings())
        host, port = parse_address(address, where="listen.admin")
        if self.tls is None and not _is_loopback(host):
            log.warning("admin listener on %s without TLS: the token and session cookies "
                        "cross the network in clear; set admin.certificate", address)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        try:
            self.sock = socket.create_server((host, port), family=family, backlog=64)
        except OSError as exc:
            raise TlsEdgeError(f"cannot listen on {address}: {exc.strerror}") from None
        self.sock.setblocking(False)

    async def serve(self, registry: Callable[[], Registry], reload: Reload,
                    queue: OrderQueue | None = None) -> None:
        """Serve until cancelled; then stop accepting and close open connections."""
        admin = AdminApp(self.auth, registry, reload, secure=self.tls is not None,
                         queue=queue)
        # client_max_size: request.read() and every multipart part stop there too.
        app = web.Application(client_max_size=bodies.MAX_BODY)
        app.router.add_route("*", "/{path:.*}", admin.handle,
                             expect_handler=bodies.continue_if_acceptable)
        runner = web.AppRunner(app, access_log=None, logger=_ProtocolLog(log, {}),
                               handle_signals=False,
                               keepalive_timeout=IDLE_TIMEOUT, lingering_time=LINGER_SECONDS,
                               shutdown_timeout=1.0, max_line_size=MAX_LINE,
                               max_field_size=MAX_LINE, max_headers=MAX_HEADERS)
        await runner.setup()
        try:
            await _Site(runner, self.sock, self.tls).start()
            if self.token_created:  # said here: logging is set up after the bind
                log.info("created the admin token file %s (mode 0600)",
                         self.settings.token_file)
            log.info("admin API and dashboard on %s://%s", "https" if self.tls else "http",
                     self.address)
            await asyncio.Event().wait()
        finally:
            await runner.cleanup()
