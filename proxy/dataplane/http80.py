"""The plain-HTTP listener: ACME HTTP-01 challenge answers and redirects to HTTPS.

Answers `/.well-known/acme-challenge/<token>` from the worker's challenge snapshot
and 301-redirects everything else to https. It never proxies to a backend and never
reads the store.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable
from typing import cast

import httptools

from proxy import metrics
from proxy.dataplane import pages
from proxy.dataplane.state import Live
from proxy.routing import split_host

log = logging.getLogger("tlsedge.http80")

_CHALLENGE_PREFIX = b"/.well-known/acme-challenge/"
_TOKEN = re.compile(r"[A-Za-z0-9_-]{1,128}")  # ACME tokens are base64url (RFC 8555 8.3)


class PlainHttpSession(asyncio.Protocol):
    __slots__ = ("_host", "_method", "_pending", "_timer", "_url", "live", "parser",
                 "transport")

    def __init__(self, live: Live) -> None:
        self.live = live
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self._url = b""
        self._host = b""
        self._method = b""
        self._timer: asyncio.TimerHandle | None = None
        self._pending: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        metrics.ACTIVE_CONNECTIONS.labels("http").inc()
        self._timer = asyncio.get_running_loop().call_later(
            self.live.limits.request_head_timeout, transport.close)

    def connection_lost(self, exc: BaseException | None) -> None:
        metrics.ACTIVE_CONNECTIONS.labels("http").dec()
        if self._timer is not None:
            self._timer.cancel()

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._write_close(pages.error(400, "-", keep_alive=False))
        except (httptools.HttpParserError, httptools.HttpParserInvalidMethodError,
                httptools.HttpParserInvalidURLError):
            self._write_close(pages.error(400, "-", keep_alive=False))

    def _write_close(self, parts: tuple[bytes, bytes]) -> None:
        if self.transport is not None:
            self.transport.write(parts[0] + parts[1])
            self.transport.close()

    def on_message_begin(self) -> None:
        self._url = b""
        self._host = b""

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() == b"host":
            self._host = value

    def on_headers_complete(self) -> None:
        self._method = self.parser.get_method()

    def on_message_complete(self) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        keep = self.parser.should_keep_alive()
        url = self._url
        if url.startswith(_CHALLENGE_PREFIX):
            token = url[len(_CHALLENGE_PREFIX):].decode("latin-1")
            answer = self.live.challenges.get(token)
            fallback = self.live.challenge_fallback
            if answer is None and fallback is not None and _TOKEN.fullmatch(token):
                # Not in our snapshot yet: ask the store, holding further requests
                # on this connection until it answers (order is kept).
                transport.pause_reading()
                self._pending = asyncio.get_running_loop().create_task(
                    self._answer_later(fallback, token, keep), name="challenge-lookup")
                return
            transport.write(self._challenge(answer, keep))
        else:
            transport.write(self._redirect(url, keep))
        if not keep:
            transport.close()

    async def _answer_later(self, fallback: Callable[[str], Awaitable[str | None]],
                            token: str, keep: bool) -> None:
        try:
            answer = await fallback(token)
        except Exception:  # the store is down: a miss, like any unknown token
            answer = None
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        transport.write(self._challenge(answer, keep))
        if keep:
            transport.resume_reading()
        else:
            transport.close()

    def _challenge(self, answer: str | None, keep: bool) -> bytes:
        if answer is None:
            metrics.CHALLENGES_SERVED.labels("miss").inc()
            head, body = pages.error(404, "-", keep_alive=keep)
            return head + body
        metrics.CHALLENGES_SERVED.labels("hit").inc()
        body = answer.encode()
        return (
            b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n"
            b"content-length: %d\r\nconnection: %s\r\n\r\n%s"
            % (len(body), b"keep-alive" if keep else b"close", body)
        )

    def _redirect(self, url: bytes, keep: bool) -> bytes:
        host = split_host(self._host.decode("latin-1")) if self._host else ""
        if not host or any(c in host for c in "/\\@ \"'<>"):
            head, body = pages.error(400, "-", keep_alive=keep)
            return head + body
        port = self.live.https_port
        authority = host if port == 443 else f"{host}:{port}"
        path = url.decode("latin-1") if url.startswith(b"/") else "/"
        location = f"https://{authority}{path}"
        return pages.redirect(location, keep_alive=keep)
