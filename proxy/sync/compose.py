"""Config and store -> the tables a worker serves from: the static snapshot (config and
certificate files), compose() and the incremental Composer.
"""

from __future__ import annotations

import logging
import ssl
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import msgspec

from proxy import config as config_mod
from proxy.certs.bundle import load_bundle_files
from proxy.certs.table import CertEntry, CertTable
from proxy.certs.tls import TlsSettings
from proxy.config import Config
from proxy.errors import BundleError, ConfigError
from proxy.routing import App, Backend, RouteTable
from proxy.sync.entries import DomainSlot
from proxy.sync.state import StoreState

log = logging.getLogger("tlsedge.sync")


@dataclass(frozen=True, slots=True)
class Snapshot:
    """What the config file and its certificate files say, validated."""

    config: Config
    static_entries: tuple[CertEntry, ...]  # ops certificates first, the platform one last
    default: CertEntry | None
    reject_unknown: bool
    tls: TlsSettings
    certs: CertTable  # the static part alone (before store certificates are merged in)
    routes: RouteTable

    def expiry(self) -> list[tuple[str, str, float]]:
        """(primary name, source, not_after) of every loaded certificate."""
        return [(e.bundle.primary_name, e.source, e.bundle.not_after)
                for e in self.certs.entries()]


_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


def tls_settings(config: Config) -> TlsSettings:
    tls = config.tls
    return TlsSettings(num_tickets=tls.session_tickets, alpn=tls.alpn,
                       min_version=_VERSIONS[tls.min_version],
                       max_version=_VERSIONS[tls.max_version], ciphers=tls.ciphers,
                       groups=tls.groups)


def load_static(path: str) -> Snapshot:
    """Read the config file and every certificate file it names; validate all of it.

    Raises ConfigError with one line naming the file and what is wrong.
    """
    config = config_mod.load(path)
    label = config.source.rsplit("/", 1)[-1]
    now = time.time()

    def entry(files: config_mod.CertFiles, key: str, source: str) -> CertEntry:
        try:
            bundle = load_bundle_files(files.cert, files.key, check_time=False)
        except BundleError as exc:
            raise ConfigError(f"{label}: {key}: {exc}") from None
        if not bundle.is_valid_at(now):
            log.warning("%s: %s: certificate for %s is outside its validity period",
                        label, key, bundle.primary_name)
        return CertEntry(bundle, source)

    platform = entry(config.tls.platform_certificate, "tls.platform_certificate", "platform")
    if not platform.bundle.covers(f"x.{config.platform_domain}"):
        raise ConfigError(
            f"{label}: tls.platform_certificate: certificate does not cover "
            f"*.{config.platform_domain} (it covers {', '.join(platform.bundle.names)})")
    statics = [entry(c, f"tls.certificates[{i}]", "static")
               for i, c in enumerate(config.tls.certificates)]
    reject = config.tls.unknown_sni == "reject"
    default = None if reject else platform
    # Ops-managed certificates win over the platform wildcard for the names they cover.
    entries = (*statics, platform)
    table = CertTable.from_entries(entries, default, reject_unknown=reject)
    routes = compose_routes(config, StoreState())
    return Snapshot(config=config, static_entries=entries, default=default,
                    reject_unknown=reject, tls=tls_settings(config), certs=table,
                    routes=routes)


# -- the store side --------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Composed:
    certs: CertTable
    routes: RouteTable
    challenges: dict[str, str]
    next_change: float | None  # when a certificate starts or stops being valid


def compose(static: Snapshot, state: StoreState) -> Composed:
    """Merge config and store into the tables a worker serves from (Composer.full, for
    one round). Builds no SSLContext and reads no record."""
    return Composer().full(static, state)


def _static_names(static: Snapshot) -> dict[str, CertEntry]:
    names: dict[str, CertEntry] = {}
    for entry in static.static_entries:
        for name in entry.bundle.names:
            names.setdefault(name, entry)
    return names


class StoreNames(Mapping[str, CertEntry]):
    """One index of a worker's certificate table (exact names, or with `wild` the
    one-label wildcards, keyed ".rest" as CertTable wants) over the store state,
    then the ops certificate files' names.

    A store domain's name gives its slot, which wins over the ops certificate files
    while it has a certificate (the table falls back to them when it has none). A
    domain without a slot gives a new, unloaded one: the listener reads its
    certificate before the handshake (follow.SlotLoader), which keeps the slot.
    Nothing is indexed per domain: a million domains cost no second map, and a
    store event changes what a lookup finds as soon as it is applied, with no table
    to rebuild or swap.
    """

    __slots__ = ("_state", "_static", "_wild")

    def __init__(self, state: StoreState, static: dict[str, CertEntry], *,
                 wild: bool) -> None:
        self._state = state
        self._static = static
        self._wild = wild

    def get(self, key: str, default: CertEntry | None = None) -> CertEntry | None:  # type: ignore[override]
        state = self._state
        if self._wild:
            name = "*" + key
            domain = key.count(".") >= 2 and state.is_domain(name)
        else:
            name = key
            domain = state.is_domain(key) and not key.startswith("*")
        if domain:
            return state.slots.get(name) or DomainSlot(name)
        return self._static.get(key, default)

    def __getitem__(self, key: str) -> CertEntry:
        entry = self.get(key)
        if entry is None:
            raise KeyError(key)
        return entry

    def __iter__(self) -> Iterator[str]:
        state, wild = self._state, self._wild
        for name in state.domains:
            if not state.is_domain(name):
                continue
            if not wild and not name.startswith("*"):
                yield name
            elif wild and name.startswith("*.") and name.count(".") >= 2:
                yield name[1:]
        for key in self._static:
            if not state.is_domain("*" + key if wild else key):
                yield key

    def __len__(self) -> int:
        """Approximate (a name both in the store and in the ops files counts twice):
        for log lines, never a walk over a million names."""
        return (0 if self._wild else self._state.domain_count()) + len(self._static)


class Composer:
    """A worker's composition: the tables its listeners read, over the store state.

    The certificate table's indexes are StoreNames views and the route table's custom
    domains are the state's own map (StoreState says why), so a store event that adds,
    removes or re-routes a domain, or changes a certificate, costs a dict write when
    the follower applies it and nothing here; update() (after a batch of events) only
    rebuilds the app list when an app changed (a few entries) and hands the current
    challenges over. full() builds from the config snapshot (start, store reload);
    restatic() is full() for a new config (SIGHUP): the config's certificate files and
    domains. Worker loop only, not thread-safe.
    """

    def __init__(self) -> None:
        self._composed: Composed | None = None

    def full(self, static: Snapshot, state: StoreState) -> Composed:
        state.routes_touched = state.reset = False
        state.configure(dict(static.config.domains))
        names = _static_names(static)
        fallback = CertTable.build(names, None).indexes()
        certs = CertTable(StoreNames(state, fallback[0], wild=False),
                          StoreNames(state, fallback[1], wild=True), static.default,
                          static.reject_unknown, fallback)
        return self._compose(certs, static, state, compose_apps(static.config, state))

    def restatic(self, static: Snapshot, state: StoreState) -> Composed:
        """A new config snapshot (SIGHUP): its certificate files, domains and apps."""
        return self.full(static, state)

    def update(self, static: Snapshot, state: StoreState) -> Composed:
        last = self._composed
        if state.reset or last is None:
            return self.full(static, state)
        apps = last.routes.apps
        if state.routes_touched:
            state.routes_touched = False
            apps = compose_apps(static.config, state)
        return self._compose(last.certs, static, state, apps)

    def _compose(self, certs: CertTable, static: Snapshot, state: StoreState,
                 apps: Mapping[str, App]) -> Composed:
        routes = RouteTable(static.config.platform_domain, apps, state.domains)
        self._composed = Composed(certs, routes, dict(state.challenges), state.next_change)
        return self._composed


def compose_routes(config: Config, state: StoreState) -> RouteTable:
    return RouteTable(config.platform_domain, compose_apps(config, state),
                      route_domains(config, state))


def compose_apps(config: Config, state: StoreState) -> dict[str, App]:
    apps = {name: App.from_config(name, spec) for name, spec in config.apps.items()}
    for name, record in state.apps.items():
        if not record.backends:  # settings only, over the config's app
            spec = config.apps.get(name)
            if spec is not None:
                apps[name] = App.from_config(name, msgspec.structs.replace(
                    spec, force_https=record.force_https))
            continue
        backends = tuple(Backend(*config_mod.parse_address(b, where=f"apps/{name}"))
                         for b in record.backends)
        apps[name] = App(name, backends, force_https=record.force_https,
                         canonical_domain=record.canonical_domain)
    return apps


def route_domains(config: Config, state: StoreState) -> dict[str, str]:
    """Custom domain -> app name: the config's, then the store's over them."""
    domains = dict(config.domains)
    domains.update({d: a for d, a in state.domains.items() if d not in state.config_only})
    return domains
