"""Live: what one worker's listeners read on every connection and request.

Each attribute is an immutable snapshot replaced by one assignment (the composition
root does the swapping); listeners read the attribute afresh per connection or per
request and never mutate what they got.
"""

from __future__ import annotations

import ipaddress
import ssl
from collections.abc import Awaitable, Callable, Mapping

from proxy.certs.table import CertEntry, CertSelector
from proxy.config import AccessLogSettings, Limits
from proxy.routing import RouteTable


class Live:
    __slots__ = ("access_log", "all_resident", "challenge_fallback", "challenges",
                 "handshake_timeout", "https_port", "limits", "prepare_certificate",
                 "reject_misdirected", "routes", "selector", "tls_context",
                 "trusted_proxies")

    def __init__(self, *, selector: CertSelector, tls_context: ssl.SSLContext,
                 routes: RouteTable, limits: Limits, https_port: int,
                 handshake_timeout: float = 10.0,
                 challenges: Mapping[str, str] | None = None,
                 trusted_proxies: tuple[str, ...] = (),
                 reject_misdirected: bool = True,
                 access_log: AccessLogSettings | None = None) -> None:
        self.selector = selector
        # The context every handshake starts with; its sni_callback picks the
        # certificate's own context from `selector`.
        self.tls_context = tls_context
        self.handshake_timeout = handshake_timeout
        self.routes = routes
        self.limits = limits
        self.https_port = https_port
        self.challenges: Mapping[str, str] = challenges or {}
        # Asked on a challenge miss: a token written a moment ago may not have
        # reached this worker's snapshot yet (the composition root wires the store).
        self.challenge_fallback: Callable[[str], Awaitable[str | None]] | None = None
        # Given the entry a ClientHello's server name looked up, before the handshake
        # starts: None to go ahead, or something to await first (a store domain's
        # certificate read on first use). Wired by the composition root.
        self.prepare_certificate: Callable[[CertEntry], Awaitable[None] | None] | None = None
        # Whether every certificate a handshake may pick is in memory now (asked per
        # connection, so cheap): then no ClientHello is read before the handshake, and
        # `prepare_certificate` is not asked. None: as False when there is a
        # `prepare_certificate`.
        self.all_resident: Callable[[], bool] | None = None
        # 421 when Host is outside the certificate the SNI chose (tls.reject_misdirected).
        self.reject_misdirected = reject_misdirected
        # Read once when the worker starts its listeners.
        self.access_log = access_log
        self.trusted_proxies = tuple(ipaddress.ip_network(p, strict=False)
                                     for p in trusted_proxies)
