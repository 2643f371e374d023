"""Sources -> immutable snapshots (CertTable, RouteTable, challenges) ready to swap in.

Two sources: the config file with its certificate files (re-read on SIGHUP) and the
store (followed with a watch). A snapshot is built whole and validated before
anyone sees it; a failure raises and leaves whatever is serving untouched. Nothing
here swaps: the composition root assigns the result. Never imports the data plane.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import msgspec

from proxy import config as config_mod
from proxy import metrics
from proxy.certs.bundle import CertBundle, load_bundle_files
from proxy.certs.table import CertEntry, CertTable
from proxy.certs.tls import TlsSettings
from proxy.config import Config
from proxy.errors import BundleError, ConfigError, StoreError
from proxy.routing import App, Backend, RouteTable
from proxy.store import records as rec
from proxy.store.base import Compacted, Event, Item, Store

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

    Certificates are kept in one of two forms, chosen by `with_pem`:
    - a worker (True) keeps `entries`: store key -> StoredEntry, the record's bytes as
      the store returned them plus the four fields compose reads (~1.7 kB a certificate
      with its keys; a decoded record and a bundle copy took ~4 kB). The PEM is decoded
      from those bytes only when a context is built, in memory, on a cache miss.
    - the supervisor (False) keeps `certs`: store key -> CertMeta, no PEM at all: it
      serves no TLS and needs the metadata only (views, expiry metrics).
    """

    domains: dict[str, rec.DomainRecord] = field(default_factory=dict)
    certs: dict[str, rec.CertMeta] = field(default_factory=dict)  # by store key
    entries: dict[str, CertEntry] = field(default_factory=dict)  # by store key
    apps: dict[str, rec.AppRecord] = field(default_factory=dict)
    challenges: dict[str, str] = field(default_factory=dict)
    # Kept for views and metrics (the supervisor only); never affects what is served.
    statuses: dict[str, rec.StatusRecord] = field(default_factory=dict)
    revision: int = 0
    with_pem: bool = True
    # What changed since a Composer last looked (a worker's state only): the domains
    # whose certificate choice may differ, whether routes may differ, and `reset` when
    # everything was (re)loaded.
    touched: set[str] = field(default_factory=set)
    routes_touched: bool = False
    reset: bool = True

    def apply(self, key: str, value: bytes | None) -> bool:
        """Apply one change; True when it matters to the data plane."""
        try:
            if key.startswith(rec.DOMAINS):
                name = key[len(rec.DOMAINS):]
                _put(self.domains, name, value, rec.DomainRecord)
                if self.with_pem:
                    self.touched.add(name)
                    self.routes_touched = True
            elif key.startswith(rec.CERTS):
                self._apply_cert(key, value)
                if self.with_pem:
                    self.touched.add(key[len(rec.CERTS):].rpartition("/")[0])
            elif key.startswith(rec.APPS):
                _put(self.apps, key[len(rec.APPS):], value, rec.AppRecord)
                self.routes_touched = self.with_pem
            elif key.startswith(rec.CHALLENGES):
                token = rec.parse_challenge_key(key)
                if value is None:
                    self.challenges.pop(token, None)
                else:
                    self.challenges[token] = value.decode()
            elif key.startswith(rec.STATUS):
                if not self.with_pem:
                    _put(self.statuses, key[len(rec.STATUS):], value, rec.StatusRecord)
                return False
            else:
                return False
        except (ValueError, BundleError) as exc:  # an unreadable record must not stop the others
            log.error("ignoring unreadable store record %s: %s", key, exc)
            return False
        return True

    def load(self, prefix: str, items: list[Item]) -> None:
        """Apply a whole scan of `prefix`: one comprehension instead of a dispatch per
        record (load_state's path; ~3x faster at 100,000 records)."""
        try:
            if prefix == rec.DOMAINS:
                decode, cut = _domain_decoder.decode, len(rec.DOMAINS)
                self.domains.update({i.key[cut:]: decode(i.value) for i in items})
            elif prefix == rec.CERTS and self.with_pem:
                self.entries.update({i.key: StoredEntry(i.value) for i in items})
            elif prefix == rec.CERTS:
                meta = _meta_decoder.decode
                self.certs.update({i.key: meta(i.value) for i in items})
            else:
                raise ValueError("no bulk path")
        except ValueError:  # record by record, so an unreadable one is logged and skipped
            for item in items:
                self.apply(item.key, item.value)

    def _apply_cert(self, key: str, value: bytes | None) -> None:
        if value is None:
            self.certs.pop(key, None)
            self.entries.pop(key, None)
        elif not self.with_pem:
            self.certs[key] = rec.decode(value, rec.CertMeta)  # skips the PEM fields
        else:
            self.entries[key] = StoredEntry(value)


_domain_decoder = msgspec.json.Decoder(rec.DomainRecord)
_meta_decoder = msgspec.json.Decoder(rec.CertMeta)


class _Serving(msgspec.Struct, frozen=True, gc=False):
    """The fields of a CertRecord that choose and identify a served certificate; msgspec
    skips the rest (PEM included) without building it: ~1 us a record."""

    source: rec.CertSource
    not_before: float
    not_after: float
    fingerprint: str


_serving_decoder = msgspec.json.Decoder(_Serving)


class StoredEntry(CertEntry):
    """A store certificate as a worker holds it: the record's JSON bytes, decoded into a
    CertBundle only when `bundle` is read (a context build on a cache miss, ~5 us from
    memory; or a view off the hot path). Never does I/O."""

    __slots__ = ("_record",)

    def __init__(self, record: bytes) -> None:  # the base's __init__ wants a bundle
        head = _serving_decoder.decode(record)
        self._record = record
        self.fingerprint = head.fingerprint
        self.source = head.source
        self.not_before = head.not_before
        self.not_after = head.not_after

    @property
    def bundle(self) -> CertBundle:
        bundle = rec.decode(self._record, rec.CertRecord).bundle()
        if bundle.fingerprint != self.fingerprint:  # bytes are immutable: cannot happen
            raise BundleError("certificate record changed under its entry")
        return bundle


def _put(table: dict[str, rec.T], name: str, value: bytes | None, kind: type[rec.T]) -> None:
    if value is None:
        table.pop(name, None)
    else:
        table[name] = rec.decode(value, kind)


async def load_state(store: Store, *, with_pem: bool = True) -> StoreState:
    """Everything the data plane needs, read at one revision (or slightly after:
    replaying the watch from `revision` re-applies those changes idempotently).

    A worker (with_pem) skips statuses: they never change what is served.
    """
    state = StoreState(revision=await store.revision(), with_pem=with_pem)
    prefixes = [rec.DOMAINS, rec.CERTS, rec.APPS, rec.CHALLENGES]
    for prefix in prefixes if with_pem else [*prefixes, rec.STATUS]:
        items = await store.scan(prefix)
        state.load(prefix, items)
        del items
    _trim_heap()
    return state


def _trim_heap() -> None:
    """Hand the pages freed by a bulk load back to the kernel (glibc keeps them).

    The supervisor decodes 100,000 records and drops their values: ~130 MB of freed
    heap that RSS would otherwise keep. Best effort; a no-op without glibc.
    """
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).malloc_trim(0)


def store_expiry(state: StoreState, now: float) -> list[tuple[str, str, float]]:
    """(primary name, source, not_after) of every store certificate served now, from a
    metadata-only state (with_pem=False: the supervisor's)."""
    seen: dict[str, tuple[str, str, float]] = {}
    certs = state.certs
    for name in state.domains:
        chosen = rec.serving_certificate(certs.get(rec.cert_key(name, "custom")),
                                         certs.get(rec.cert_key(name, "acme")), now)
        if chosen is not None:
            seen.setdefault(chosen.fingerprint,
                            (chosen.names[0], chosen.source, chosen.not_after))
    return list(seen.values())


@dataclass(frozen=True, slots=True)
class Composed:
    certs: CertTable
    routes: RouteTable
    challenges: dict[str, str]
    next_change: float | None  # when a certificate starts or stops being valid


def compose(static: Snapshot, state: StoreState, now: float) -> Composed:
    """Merge config and store into the tables a worker serves from (`state` must hold
    PEM: with_pem=True). Builds no SSLContext and copies no PEM: each domain points
    at the CertEntry its state holds, so an unchanged certificate keeps its identity.
    ~0.15 s at 100,000 domains: a worker runs it at start, on SIGHUP and when a
    certificate starts or stops being valid; store events go through Composer.update.
    """
    names = _static_names(static)
    entries = state.entries
    serving = rec.serving_certificate
    certs = rec.CERTS
    for name in state.domains:
        chosen = serving(entries.get(f"{certs}{name}/custom"),
                         entries.get(f"{certs}{name}/acme"), now)
        if chosen is not None:
            names[name] = chosen  # a domain's own certificate wins over ops files
    # When a certificate starts or stops being valid: over every stored one (one of a
    # deleted domain only makes the timer fire once for nothing).
    next_change = min((t for e in entries.values() for t in (e.not_before, e.not_after)
                       if t > now), default=None)
    table = CertTable.build(names, static.default, reject_unknown=static.reject_unknown)
    return Composed(table, compose_routes(static.config, state), dict(state.challenges),
                    next_change)


def _static_names(static: Snapshot) -> dict[str, CertEntry]:
    names: dict[str, CertEntry] = {}
    for entry in static.static_entries:
        for name in entry.bundle.names:
            names.setdefault(name, entry)
    return names


class Composer:
    """A worker's composition, kept between rounds so that a batch of store events
    costs what it names: ~5 us a touched domain plus ~3 ms to copy the table's dicts
    at 100,000 names, where compose() takes ~0.15 s (and blocks the loop as long).

    full() is compose() and remembers its result; update() re-derives only the
    domains in `state.touched` (routes only when `routes_touched`), or falls back to
    full() after a reload (`state.reset`). Worker loop only, not thread-safe.
    """

    def __init__(self) -> None:
        self._exact: dict[str, CertEntry] = {}
        self._wild: dict[str, CertEntry] = {}
        self._static: dict[str, CertEntry] = {}
        self._routes: RouteTable | None = None
        self._next_change: float | None = None

    def full(self, static: Snapshot, state: StoreState, now: float) -> Composed:
        state.touched.clear()
        state.routes_touched = state.reset = False
        composed = compose(static, state, now)
        self._static = _static_names(static)
        self._exact, self._wild = composed.certs.indexes()
        self._routes = composed.routes
        self._next_change = composed.next_change
        return composed

    def update(self, static: Snapshot, state: StoreState, now: float) -> Composed:
        if state.reset or self._routes is None:
            return self.full(static, state, now)
        touched, state.touched = state.touched, set()
        entries, certs = state.entries, rec.CERTS
        next_change = self._next_change if (self._next_change or 0.0) > now else None
        for name in touched:
            chosen: CertEntry | None = None
            if name in state.domains:
                custom = entries.get(f"{certs}{name}/custom")
                acme = entries.get(f"{certs}{name}/acme")
                chosen = rec.serving_certificate(custom, acme, now)
                for entry in (custom, acme):
                    for t in (entry.not_before, entry.not_after) if entry else ():
                        if t > now and (next_change is None or t < next_change):
                            next_change = t
            self._index(name, chosen or self._static.get(name))
        self._next_change = next_change
        if state.routes_touched:
            state.routes_touched = False
            self._routes = compose_routes(static.config, state)
        table = CertTable(dict(self._exact), dict(self._wild), static.default,
                          static.reject_unknown)
        return Composed(table, self._routes, dict(state.challenges), next_change)

    def _index(self, name: str, entry: CertEntry | None) -> None:
        """Put (or, entry None, remove) `name` the way CertTable.build indexes it."""
        if name.startswith("*."):
            if name.count(".") < 2:
                return
            index, key = self._wild, name[1:]
        else:
            index, key = self._exact, name
        if entry is None:
            index.pop(key, None)
        else:
            index[key] = entry


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
                fresh = await load_state(self.store, with_pem=self.state.with_pem)
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
