"""Sources -> immutable snapshots (CertTable, RouteTable, challenges) ready to swap in.

Two sources: the config file with its certificate files (re-read on SIGHUP) and the
store (followed with a watch). A snapshot is built whole and validated before
anyone sees it; a failure raises and leaves whatever is serving untouched. Nothing
here swaps: the composition root assigns the result. Never imports the data plane.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from proxy import config as config_mod
from proxy import metrics
from proxy.certs.bundle import load_bundle_files
from proxy.certs.table import CertEntry, CertTable
from proxy.certs.tls import TlsSettings
from proxy.config import Config
from proxy.errors import BundleError, ConfigError, StoreError
from proxy.routing import App, Backend, RouteTable
from proxy.store import records as rec
from proxy.store.base import Compacted, Event, Store

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


def tls_settings(config: Config) -> TlsSettings:
    return TlsSettings(num_tickets=config.tls.session_tickets)


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

@dataclass
class StoreState:
    """The store as the data plane needs it; sync's private, mutable working copy.

    A watch event touches only the entry it names. Snapshots built from it are
    immutable copies.
    """

    domains: dict[str, rec.DomainRecord] = field(default_factory=dict)
    certs: dict[str, rec.CertRecord] = field(default_factory=dict)  # by store key
    apps: dict[str, rec.AppRecord] = field(default_factory=dict)
    challenges: dict[str, str] = field(default_factory=dict)
    # Kept for views and metrics (the supervisor); never affects what is served.
    statuses: dict[str, rec.StatusRecord] = field(default_factory=dict)
    revision: int = 0

    def apply(self, key: str, value: bytes | None) -> bool:
        """Apply one change; True when it matters to the data plane."""
        try:
            if key.startswith(rec.DOMAINS):
                _put(self.domains, key[len(rec.DOMAINS):], value, rec.DomainRecord)
            elif key.startswith(rec.CERTS):
                _put(self.certs, key, value, rec.CertRecord)
            elif key.startswith(rec.APPS):
                _put(self.apps, key[len(rec.APPS):], value, rec.AppRecord)
            elif key.startswith(rec.CHALLENGES):
                token = rec.parse_challenge_key(key)
                if value is None:
                    self.challenges.pop(token, None)
                else:
                    self.challenges[token] = value.decode()
            elif key.startswith(rec.STATUS):
                _put(self.statuses, key[len(rec.STATUS):], value, rec.StatusRecord)
                return False
            else:
                return False
        except ValueError as exc:  # a record we cannot decode must not stop the others
            log.error("ignoring unreadable store record %s: %s", key, exc)
            return False
        return True


def _put(table: dict[str, rec.T], name: str, value: bytes | None, kind: type[rec.T]) -> None:
    if value is None:
        table.pop(name, None)
    else:
        table[name] = rec.decode(value, kind)


async def load_state(store: Store) -> StoreState:
    """Everything the data plane needs, read at one revision (or slightly after:
    replaying the watch from `revision` re-applies those changes idempotently)."""
    state = StoreState(revision=await store.revision())
    for prefix in (rec.DOMAINS, rec.CERTS, rec.APPS, rec.CHALLENGES, rec.STATUS):
        for item in await store.scan(prefix):
            state.apply(item.key, item.value)
    return state


@dataclass(frozen=True, slots=True)
class Composed:
    certs: CertTable
    routes: RouteTable
    challenges: dict[str, str]
    next_change: float | None  # when a certificate starts or stops being valid


def compose(static: Snapshot, state: StoreState, entries: dict[str, CertEntry],
            now: float) -> Composed:
    """Merge config and store into the tables a worker serves from.

    `entries` caches CertEntry objects by fingerprint across calls, so an unchanged
    certificate keeps its identity (and its built SSLContext).
    """
    names: dict[str, CertEntry] = {}
    for static_entry in static.static_entries:
        for name in static_entry.bundle.names:
            names.setdefault(name, static_entry)
    next_change: float | None = None
    used: dict[str, CertEntry] = {}
    for name in state.domains:
        custom = state.certs.get(rec.cert_key(name, "custom"))
        acme = state.certs.get(rec.cert_key(name, "acme"))
        for record in (custom, acme):
            if record is None:
                continue
            for t in (record.not_before, record.not_after):
                if t > now and (next_change is None or t < next_change):
                    next_change = t
        chosen = rec.serving_certificate(custom, acme, now)
        if chosen is None:
            continue
        entry = entries.get(chosen.fingerprint)
        if entry is None:
            entry = CertEntry(chosen.bundle(), chosen.source)
        used[chosen.fingerprint] = entry
        names[name] = entry  # a domain's own certificate wins over ops files
    entries.clear()
    entries.update(used)
    table = CertTable.build(names, static.default, reject_unknown=static.reject_unknown)
    return Composed(table, compose_routes(static.config, state), dict(state.challenges),
                    next_change)


def compose_routes(config: Config, state: StoreState) -> RouteTable:
    apps = {name: App.from_config(name, spec) for name, spec in config.apps.items()}
    for name, record in state.apps.items():
        backends = tuple(Backend(*config_mod.parse_address(b, where=f"apps/{name}"))
                         for b in record.backends)
        apps[name] = App(name, backends, force_https=record.force_https,
                         canonical_domain=record.canonical_domain)
    domains = dict(config.domains)
    domains.update({d: r.app for d, r in state.domains.items()})
    return RouteTable(config.platform_domain, apps, domains)


class StoreFollower:
    """Keeps a StoreState current from the store's watch; calls `changed` after each
    batch of relevant events. Survives store outages: keeps the last state, retries
    with backoff and resumes from the last revision it applied.
    """

    def __init__(self, store: Store, state: StoreState,
                 changed: Callable[[], None]) -> None:
        self.store = store
        self.state = state
        self.changed = changed
        self._pending: asyncio.TimerHandle | None = None

    async def run(self) -> None:
        delay = 0.1
        while True:
            try:
                async for event in self.store.watch("", self.state.revision):
                    self._apply(event)
                    delay = 0.1
            except Compacted:
                log.warning("store history compacted past revision %d; reloading",
                            self.state.revision)
                fresh = await load_state(self.store)
                self.state.__dict__.update(fresh.__dict__)
                self._schedule()
            except StoreError as exc:
                metrics.STORE_ERRORS.labels("watch").inc()
                log.warning("store watch failed (%s); serving the last snapshot, "
                            "retrying in %.1fs", exc, delay)
                await asyncio.sleep(delay)
                # Capped low: retrying a watch is one cheap call, and a node should catch
                # up within seconds of the store coming back.
                delay = min(delay * 2, 2.0)
                metrics.STORE_RECONNECTS.inc()
                log.info("store watch resuming from revision %d", self.state.revision)

    def _apply(self, event: Event) -> None:
        self.state.revision = max(self.state.revision, event.revision)
        if self.state.apply(event.key, event.value):
            self._schedule()

    def _schedule(self) -> None:
        # Coalesce a burst of events into one rebuild, a few ms later.
        if self._pending is None:
            self._pending = asyncio.get_running_loop().call_later(0.005, self._fire)

    def _fire(self) -> None:
        self._pending = None
        try:
            self.changed()
        except (ConfigError, BundleError, ValueError) as exc:
            metrics.RELOADS.labels("failed").inc()
            log.error("store change not applied, still serving the previous snapshot: %s",
                      exc)
