"""RouteTable: the immutable Host -> app -> backends snapshot the data plane reads.

Built whole from config (and later the store), then swapped in by one assignment;
nothing here does I/O. The backend rotation counter is the only mutable state, and
it is per-worker and harmless to race.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from proxy.config import AppConfig, parse_address


@dataclass(frozen=True, slots=True)
class Backend:
    host: str
    port: int
    # Open each connection with a PROXY v2 header naming the client (the app's
    # send_proxy_protocol); such connections are never pooled between clients.
    send_proxy: bool = False

    @property
    def key(self) -> str:
        return f"{self.host}:{self.port}"


class App:
    """One app as routed: its backends and the per-app options."""

    __slots__ = ("_next", "backends", "canonical_domain", "force_https", "name",
                 "request_buffering", "response_buffering")

    def __init__(self, name: str, backends: tuple[Backend, ...], *, force_https: bool = False,
                 canonical_domain: str | None = None, request_buffering: bool = True,
                 response_buffering: bool = True) -> None:
        self.name = name
        self.backends = backends
        self.force_https = force_https
        self.canonical_domain = canonical_domain
        self.request_buffering = request_buffering
        self.response_buffering = response_buffering
        self._next = 0

    @classmethod
    def from_config(cls, name: str, spec: AppConfig) -> App:
        send_proxy = spec.send_proxy_protocol == "v2"
        backends = tuple(Backend(*parse_address(b, where=f"apps.{name}.backends"),
                                 send_proxy=send_proxy) for b in spec.backends)
        return cls(name, backends, force_https=spec.force_https,
                   canonical_domain=spec.canonical_domain,
                   request_buffering=spec.request_buffering,
                   response_buffering=spec.response_buffering)

    def rotation(self) -> list[Backend]:
        """Backends in the order to try for one request: round-robin start."""
        n = len(self.backends)
        start = self._next % n
        self._next = start + 1
        return [self.backends[(start + i) % n] for i in range(n)]


class RouteTable:
    """Immutable map from a request's Host to its app.

    `<app>.<platform_domain>` routes to app `<app>`; custom domains (and one-label
    wildcards, `*.shop.example.com`) route through the `domains` map (host -> app
    name; a worker's is its store state's own map, which store events change in place
    on the worker's loop: sync.StoreState, so a million names are never copied).
    Lookups take an already lower-cased host without port.
    """

    __slots__ = ("_apps", "_domains", "_suffix", "platform_domain")

    def __init__(self, platform_domain: str, apps: Mapping[str, App],
                 domains: Mapping[str, str]) -> None:
        self.platform_domain = platform_domain
        self._suffix = "." + platform_domain
        self._apps = dict(apps)
        self._domains = domains  # the caller's: changed only on the loop that reads it

    @property
    def apps(self) -> Mapping[str, App]:
        return self._apps

    @property
    def domains(self) -> Mapping[str, str]:
        """Custom domain -> app name (an app missing from `apps` routes nowhere)."""
        return self._domains

    def resolve(self, host: str) -> App | None:
        """Exact custom domain, then a wildcard one (`*.shop.example.com` routes every
        one-label subdomain: an exact domain under it wins), then `<app>.<platform>`."""
        name = self._domains.get(host)
        if name is None:
            dot = host.find(".")
            if dot > 0:
                name = self._domains.get("*" + host[dot:])
        if name is not None:
            app = self._apps.get(name)
            if app is not None:
                return app
        if host.endswith(self._suffix):
            label = host[: -len(self._suffix)]
            if label and "." not in label:
                return self._apps.get(label)
        return None


def split_host(value: str) -> str:
    """Host header value -> lower-case host without port or trailing dot."""
    host = value.strip().lower()
    if host.startswith("["):
        end = host.find("]")
        return host[: end + 1] if end > 0 else host
    colon = host.rfind(":")
    if colon >= 0:
        host = host[:colon]
    return host.rstrip(".")
