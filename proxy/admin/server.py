"""The admin listener: its own socket on `listen.admin`, bound by the supervisor before
any worker starts, serving HTTP/1.1 (over TLS when `admin.certificate` is set) to
AdminApp. The socket is never passed to a worker, so no public listener can reach it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
import ssl
from collections.abc import Callable

from proxy.admin.api import AdminApp
from proxy.admin.auth import Auth, load_or_create_token
from proxy.admin.dashboard import Reload
from proxy.admin.wire import (
    MAX_HEAD,
    HttpError,
    Request,
    Response,
    encode_response,
    read_request,
)
from proxy.certs.bundle import load_bundle_files
from proxy.certs.tls import TlsSettings, server_context
from proxy.config import Config, parse_address
from proxy.errors import TlsEdgeError
from proxy.registry import Registry

log = logging.getLogger("tlsedge.admin")

MAX_CONNECTIONS = 64
IDLE_TIMEOUT = 30.0
BODY_TIMEOUT = 30.0
# After refusing a body unread, swallow at most this much of it (for at most
# LINGER_SECONDS) so the client reads our answer instead of a connection reset.
LINGER_BYTES = 1 << 20
LINGER_SECONDS = 2.0


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


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
        self._writers: set[asyncio.StreamWriter] = set()
        self._app: AdminApp | None = None

    async def serve(self, registry: Callable[[], Registry], reload: Reload) -> None:
        """Serve until cancelled; then stop accepting and close open connections."""
        self._app = AdminApp(self.auth, registry, reload, secure=self.tls is not None)
        server = await asyncio.start_server(self._connection, sock=self.sock, ssl=self.tls,
                                            limit=MAX_HEAD,
                                            ssl_handshake_timeout=10.0 if self.tls else None)
        if self.token_created:  # said here: logging is set up after the bind
            log.info("created the admin token file %s (mode 0600)",
                     self.settings.token_file)
        log.info("admin API and dashboard on %s://%s", "https" if self.tls else "http",
                 self.address)
        try:
            await asyncio.Event().wait()
        finally:
            server.close()
            for writer in list(self._writers):
                writer.close()

    async def _connection(self, reader: asyncio.StreamReader,
                          writer: asyncio.StreamWriter) -> None:
        if len(self._writers) >= MAX_CONNECTIONS:
            writer.close()
            return
        self._writers.add(writer)
        peer = writer.get_extra_info("peername")
        client = str(peer[0]) if peer else "-"
        try:
            while await self._exchange(reader, writer, client):
                pass
        except (ConnectionError, ssl.SSLError, TimeoutError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()

    async def _exchange(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                        client: str) -> bool:
        """One request and its answer; whether the connection may carry another."""
        try:
            request = await read_request(reader, writer, client=client,
                                         tls=self.tls is not None, idle_timeout=IDLE_TIMEOUT,
                                         body_timeout=BODY_TIMEOUT)
        except HttpError as exc:
            await self._refuse(reader, writer, exc)
            return False
        if request is None:
            return False
        response = await self._answer(request)
        keep = request.keep_alive and not response.close
        writer.write(encode_response(response, head_only=request.method == "HEAD",
                                     keep_alive=keep))
        await writer.drain()
        return keep

    async def _answer(self, request: Request) -> Response:
        assert self._app is not None
        try:
            return await self._app.handle(request)
        except Exception:
            log.exception("admin: %s %s failed", request.method, request.path)
            return Response(500, b"internal error; see the tlsedge log\n", close=True)

    @staticmethod
    async def _refuse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                      exc: HttpError) -> None:
        response = Response(exc.status, f"{exc.message}\n".encode(),
                            headers=[*exc.headers, ("X-Content-Type-Options", "nosniff")])
        writer.write(encode_response(response, head_only=False, keep_alive=False))
        with contextlib.suppress(ConnectionError, TimeoutError, ssl.SSLError):
            await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()
            left = LINGER_BYTES
            loop = asyncio.get_running_loop()
            deadline = loop.time() + LINGER_SECONDS
            while left > 0 and (remaining := deadline - loop.time()) > 0:
                chunk = await asyncio.wait_for(reader.read(min(65536, left)), remaining)
                if not chunk:
                    break
                left -= len(chunk)
