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
import gc
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field

import msgspec
from immutables import Map, MapMutation

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
    immutable copies; the one mutable thing they point at is a domain's slot.

    Certificates are kept in one of two forms, chosen by `with_pem`:
    - a worker (True) keeps `slots`: domain name -> DomainSlot, created for every
      store domain. A slot holds the domain's certificate records as the store
      returned them (~1.7 kB each) once loaded; `resident` bounds how many are (LRU,
      store.resident_certificates). A store with no more domains than that is read
      whole at start; past it, a slot is loaded on its name's first handshake (the
      listener reads the ClientHello's SNI and waits for `SlotLoader.prepare`).
    - the supervisor (False) keeps `certs`: store key -> CertMeta, no PEM at all: it
      serves no TLS and needs the metadata only (views, expiry metrics).
    """

    domains: dict[str, rec.DomainRecord] = field(default_factory=dict)
    certs: dict[str, CertBrief] = field(default_factory=dict)  # by store key
    slots: dict[str, DomainSlot] = field(default_factory=dict)  # by domain name
    apps: dict[str, rec.AppRecord] = field(default_factory=dict)
    challenges: dict[str, str] = field(default_factory=dict)
    # Kept for views and metrics (the supervisor only); never affects what is served.
    statuses: dict[str, StatusBrief] = field(default_factory=dict)
    revision: int = 0
    with_pem: bool = True
    resident: Resident = field(default_factory=lambda: Resident(100_000))
    # What changed since a Composer last looked: in a worker, the domains added or
    # removed (a certificate change touches no table: it changes its slot in place),
    # whether routes may differ, and `reset` when everything was (re)loaded; in the
    # supervisor, every domain whose record, certificates or status changed.
    touched: set[str] = field(default_factory=set)
    routes_touched: bool = False
    reset: bool = True
    # The earliest time a resident certificate starts or stops being valid (may be
    # stale-early: then one re-check finds nothing to change).
    next_change: float | None = None
    # Slots created by a domain event, to load in the background while `resident`
    # has room (so a store under the limit stays fully in memory).
    fresh: list[DomainSlot] = field(default_factory=list)

    def apply(self, key: str, value: bytes | None) -> bool:
        """Apply one change; True when it matters to the data plane."""
        try:
            if key.startswith(rec.DOMAINS):
                name = key[len(rec.DOMAINS):]
                _put(self.domains, name, value, rec.DomainRecord)
                if self.with_pem:
                    self._domain_changed(name, value is not None)
                else:
                    self.touched.add(name)
            elif key.startswith(rec.CERTS):
                if self.with_pem:
                    return self._slot_cert(key, value)
                if value is None:
                    self.certs.pop(key, None)
                else:
                    self.certs[key] = _brief_decoder.decode(value)
                self.touched.add(key[len(rec.CERTS):].rpartition("/")[0])
            elif key.startswith(rec.PEM):
                return self.with_pem and self._slot_material(key, value)
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
                if self.with_pem:
                    return False  # never changes what is served
                name = key[len(rec.STATUS):]
                _put(self.statuses, name, value, StatusBrief)
                self.touched.add(name)
            else:
                return False
        except (ValueError, BundleError) as exc:  # an unreadable record must not stop the others
            log.error("ignoring unreadable store record %s: %s", key, exc)
            return False
        return True

    def _domain_changed(self, name: str, present: bool) -> None:
        self.touched.add(name)  # its certificate index and its route
        if not present:
            slot = self.slots.pop(name, None)
            if slot is not None:
                self.resident.discard(slot)
        elif name not in self.slots:
            slot = self.slots[name] = DomainSlot(name)
            self.fresh.append(slot)

    def _slot_cert(self, key: str, value: bytes | None) -> bool:
        """A certificate record changed: a loaded slot takes it in place (the table
        keeps pointing at the slot); one not loaded reads it on first use."""
        name, _, source = key[len(rec.CERTS):].rpartition("/")
        slot = self.slots.get(name)
        if slot is None or source not in ("custom", "acme"):
            return False
        slot.generation += 1  # a load in flight re-reads
        if not slot.loaded:
            return False
        slot.set(source, value)
        self.note(slot.choose(time.time()))
        return True

    def _slot_material(self, key: str, value: bytes | None) -> bool:
        parsed = rec.parse_pem_key(key)
        slot = self.slots.get(parsed[0]) if parsed is not None else None
        if slot is None or parsed is None:
            return False
        slot.generation += 1
        if slot.loaded:
            slot.set_material(parsed[2], value)
        return False  # the metadata event that follows switches the certificate

    def note(self, boundary: float | None) -> None:
        if boundary is not None and (self.next_change is None or boundary < self.next_change):
            self.next_change = boundary

    def rechoose(self, now: float) -> None:
        """A certificate started or stopped being valid: re-pick every resident slot."""
        self.next_change = None
        for slot in self.resident.slots.values():
            self.note(slot.choose(now))

    def load(self, prefix: str, items: list[Item]) -> None:
        """Apply a whole scan of `prefix`: one comprehension instead of a dispatch per
        record (load_state's path; ~3x faster at 100,000 records)."""
        try:
            if prefix == rec.DOMAINS:
                decode, cut = _domain_decoder.decode, len(rec.DOMAINS)
                self.domains.update({i.key[cut:]: decode(i.value) for i in items})
                if self.with_pem:
                    slots = self.slots
                    for name in self.domains:
                        if name not in slots:
                            slots[name] = DomainSlot(name)
            elif prefix == rec.CERTS and not self.with_pem:  # a worker: fill_all
                meta = _brief_decoder.decode
                self.certs.update({i.key: meta(i.value) for i in items})
            else:
                raise ValueError("no bulk path")
        except ValueError:  # record by record, so an unreadable one is logged and skipped
            for item in items:
                self.apply(item.key, item.value)

    def fill_all(self, certs: list[Item], pems: list[Item]) -> None:
        """The whole certs/ and pem/ scans (a store within the resident limit): every
        slot loaded, those without a certificate too (nothing left to read)."""
        records: dict[str, dict[str, bytes]] = {}
        cut = len(rec.CERTS)
        for item in certs:
            name, _, source = item.key[cut:].rpartition("/")
            records.setdefault(name, {})[source] = item.value
        materials: dict[str, dict[str, bytes]] = {}
        for item in pems:
            parsed = rec.parse_pem_key(item.key)
            if parsed is not None:
                materials.setdefault(parsed[0], {})[parsed[2]] = item.value
        now = time.time()
        for name, slot in self.slots.items():
            self.note(slot.fill(records.get(name, {}), materials.get(name, {}), now))
            self.resident.add(slot)


class Resident:
    """The loaded slots, least recently used first; past `capacity` the oldest one not
    used in the last `hold` seconds is unloaded (a slot just prepared for a handshake
    is not dropped before that handshake picks it: a few loop turns later)."""

    def __init__(self, capacity: int, hold: float = 1.0) -> None:
        self.capacity = capacity
        self.hold = hold
        self.slots: OrderedDict[str, DomainSlot] = OrderedDict()

    def add(self, slot: DomainSlot) -> None:
        self.slots[slot.name] = slot
        self.slots.move_to_end(slot.name)
        if len(self.slots) > self.capacity:
            self._evict()
        metrics.CERTIFICATES_RESIDENT.set(len(self.slots))

    def touch(self, slot: DomainSlot, now: float) -> None:
        slot.used = now
        self.slots.move_to_end(slot.name)
        if len(self.slots) > self.capacity:  # over since the hold kept some: trim now
            self._evict()
            metrics.CERTIFICATES_RESIDENT.set(len(self.slots))

    def discard(self, slot: DomainSlot) -> None:
        if self.slots.pop(slot.name, None) is not None:
            metrics.CERTIFICATES_RESIDENT.set(len(self.slots))

    def has_room(self) -> bool:
        return len(self.slots) < self.capacity

    def _evict(self) -> None:
        recent = time.monotonic() - self.hold
        slots = self.slots
        while len(slots) > self.capacity:
            name, slot = next(iter(slots.items()))
            if slot.used > recent:
                return  # all the rest were used more recently still: over, for now
            del slots[name]
            slot.unload()


_domain_decoder = msgspec.json.Decoder(rec.DomainRecord)
class CertBrief(rec.Record, frozen=True, gc=False):
    """What the supervisor keeps of a certificate record: the serving choice and the
    expiry metric need no more. ~0.2 kB where a CertMeta (names, issuer, key type)
    was ~0.7 kB: at 1,000,000 domains, 0.5 GB."""

    source: rec.CertSource
    not_before: float
    not_after: float
    fingerprint: str


class StatusBrief(rec.Record, frozen=True, gc=False):
    """What the supervisor keeps of a status record (its messages are read per view)."""

    state: rec.State


_brief_decoder = msgspec.json.Decoder(CertBrief)


class _Serving(msgspec.Struct, frozen=True, gc=False):
    """The fields of a CertRecord that choose and identify a served certificate; msgspec
    skips the rest (PEM included) without building it: ~1 us a record."""

    source: rec.CertSource
    not_before: float
    not_after: float
    fingerprint: str


_serving_decoder = msgspec.json.Decoder(_Serving)


class StoredEntry(CertEntry):
    """A store certificate as a worker holds it: the metadata record's JSON bytes and
    its key material's (records.CertRecord), decoded into a CertBundle only when
    `bundle` is read (a context build on a cache miss, ~5 us from memory; or a view
    off the hot path). Never does I/O."""

    __slots__ = ("_record", "material")

    def __init__(self, record: bytes, material: bytes | None = None) -> None:
        head = _serving_decoder.decode(record)  # the base's __init__ wants a bundle
        self._record = record
        self.material = material  # None: a record with inline PEM (or material to come)
        self.fingerprint = head.fingerprint
        self.source = head.source
        self.not_before = head.not_before
        self.not_after = head.not_after

    @property
    def bundle(self) -> CertBundle:
        material = (rec.decode(self.material, rec.KeyMaterial)
                    if self.material is not None else None)
        bundle = rec.decode(self._record, rec.CertRecord).bundle(material)
        if bundle.fingerprint != self.fingerprint:  # bytes are immutable: cannot happen
            raise BundleError("certificate record changed under its entry")
        return bundle


class DomainSlot(CertEntry):
    """One store domain's certificate as a worker's tables hold it: the table maps the
    name to this slot for as long as the domain exists, and the slot changes in place
    (on the loop thread, between handshakes) as its records are loaded, replaced,
    become valid or expire, or are unloaded to bound memory. The SNI callback reads it
    like any entry: `fingerprint` set = serve it; "" and loaded = no certificate (the
    table falls back); not loaded = the listener must load it first.

    Holds the custom and ACME records as StoredEntry (bytes; PEM decoded only when a
    context is built) and serves what records.serving_certificate picks.
    """

    __slots__ = ("acme", "chosen", "custom", "generation", "loaded", "name", "pems", "used")

    def __init__(self, name: str) -> None:  # the base's __init__ wants a bundle
        self.name = name
        self.custom: StoredEntry | None = None
        self.acme: StoredEntry | None = None
        # Key material by fingerprint that came before the metadata pointing at it
        # (the registry writes it first); once an entry holds it, it is dropped here.
        self.pems: dict[str, bytes] | None = None
        self.chosen: StoredEntry | None = None
        self.loaded = False
        self.generation = 0  # bumped by every certificate event for this domain
        self.used = 0.0  # time.monotonic() of the last handshake prepared for it
        self._clear()

    def _clear(self) -> None:
        self.chosen = None
        self.fingerprint = ""
        self.source = "acme"
        self.not_before = self.not_after = 0.0

    def fill(self, records: dict[str, bytes], pems: dict[str, bytes],
             now: float) -> float | None:
        """Load from the domain's records (source -> metadata bytes) and key material
        (fingerprint -> bytes); an unreadable record is logged and left out."""
        self.pems = pems or None
        self.custom = self.acme = None
        for source, value in records.items():
            self.set(source, value)
        self.loaded = True
        return self.choose(now)

    def set(self, source: str, value: bytes | None) -> None:
        """One certificate record changed (None: deleted)."""
        entry = None
        if value is not None:
            try:
                entry = StoredEntry(value)
            except (ValueError, BundleError) as exc:
                log.error("ignoring unreadable store record %s%s/%s: %s", rec.CERTS,
                          self.name, source, exc)
            else:
                entry.material = self._material(entry.fingerprint)
        if source == "custom":
            self.custom = entry
        elif source == "acme":
            self.acme = entry

    def _material(self, fingerprint: str) -> bytes | None:
        if self.pems is not None and fingerprint in self.pems:
            material = self.pems.pop(fingerprint)
            if not self.pems:
                self.pems = None
            return material
        for held in (self.custom, self.acme):  # the same certificate written again
            if held is not None and held.fingerprint == fingerprint:
                return held.material
        return None

    def set_material(self, fingerprint: str, value: bytes | None) -> None:
        if value is None:  # replaced, or its domain removed: the entries keep their copy
            if self.pems is not None:
                self.pems.pop(fingerprint, None)
            return
        for entry in (self.custom, self.acme):
            if entry is not None and entry.fingerprint == fingerprint:
                entry.material = value
                return
        if self.pems is None:
            self.pems = {}
        self.pems[fingerprint] = value

    def choose(self, now: float) -> float | None:
        """Serve what the product rule picks now; the next time that may change."""
        chosen = rec.serving_certificate(self.custom, self.acme, now)
        if chosen is None:
            self._clear()
        else:
            self.chosen = chosen
            self.fingerprint = chosen.fingerprint
            self.source = chosen.source
            self.not_before = chosen.not_before
            self.not_after = chosen.not_after
        return min((t for r in (self.custom, self.acme) if r is not None
                    for t in (r.not_before, r.not_after) if t > now), default=None)

    def unload(self) -> None:
        self.custom = self.acme = None
        self.pems = None
        self.loaded = False
        self._clear()

    @property
    def bundle(self) -> CertBundle:
        if self.chosen is None:
            raise BundleError(f"no certificate loaded for {self.name}")
        return self.chosen.bundle

    def __repr__(self) -> str:
        return f"DomainSlot({self.name!r}, loaded={self.loaded}, {self.fingerprint[:16]!r})"


def _put(table: dict[str, rec.T], name: str, value: bytes | None, kind: type[rec.T]) -> None:
    if value is None:
        table.pop(name, None)
    else:
        table[name] = rec.decode(value, kind)


async def load_state(store: Store, *, with_pem: bool = True,
                     resident: int = 100_000) -> StoreState:
    """Everything the data plane needs, read at one revision (or slightly after:
    replaying the watch from `revision` re-applies those changes idempotently).

    A worker (with_pem) skips statuses: they never change what is served; and reads
    certificates only when the store holds at most `resident` domains (otherwise
    each on first use, see StoreState).
    """
    state = StoreState(revision=await store.revision(), with_pem=with_pem,
                       resident=Resident(resident))
    prefixes = [rec.DOMAINS, rec.APPS, rec.CHALLENGES]
    if not with_pem:
        prefixes += [rec.CERTS, rec.STATUS]
    for prefix in prefixes:
        items = await store.scan(prefix)
        with _no_gc():
            state.load(prefix, items)
        del items
    if with_pem and len(state.domains) <= resident:
        certs, pems = await store.scan(rec.CERTS), await store.scan(rec.PEM)
        with _no_gc():
            state.fill_all(certs, pems)
        del certs, pems
    _trim_heap()
    return state


@contextlib.contextmanager
def _no_gc() -> Iterator[None]:
    """Millions of new objects set off collection after collection, each walking all
    of them: at 1,000,000 domains that was 4 s of a 7 s load (measured). Nothing a
    load builds is garbage, so collect nothing until it is done."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


class SlotLoader:
    """Reads a slot's certificate records from the store before its first handshake
    (the listener awaits `prepare`), and in the background for domains added while
    the worker has room to hold them all."""

    def __init__(self, store: Store, state: StoreState) -> None:
        self.store = store
        self.state = state
        self._loading: dict[str, asyncio.Task[None]] = {}
        self._background: asyncio.Task[None] | None = None

    def prepare(self, entry: CertEntry) -> Awaitable[None] | None:
        """Called by the listener with the entry a ClientHello's name looked up: None
        when the handshake can go ahead (most calls: one type check), else what to
        await first. Marks the slot used."""
        if type(entry) is not DomainSlot:
            return None
        if entry.loaded:
            self.state.resident.touch(entry, time.monotonic())
            return None
        entry.used = time.monotonic()
        return self.load(entry)

    def load(self, slot: DomainSlot) -> Awaitable[None]:
        """Read the slot's records (one read in flight per domain, shared); cancelling
        what this returns stops the wait, not the read."""
        task = self._loading.get(slot.name)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._load(slot),
                                                          name="certificate-read")
            self._loading[slot.name] = task
        return asyncio.shield(task)

    async def _load(self, slot: DomainSlot) -> None:
        started = time.monotonic()
        try:
            await self._read(slot)
        except StoreError as exc:
            metrics.CERTIFICATE_LOADS.labels("failed").inc()
            log.warning("could not read the certificate of %s for a handshake: %s",
                        slot.name, exc)
        else:
            metrics.CERTIFICATE_LOADS.labels("ok").inc()
            metrics.CERTIFICATE_LOAD_SECONDS.observe(time.monotonic() - started)
        finally:
            del self._loading[slot.name]

    async def _read(self, slot: DomainSlot) -> None:
        while True:
            generation = slot.generation
            certs, pems = await asyncio.gather(self.store.scan(f"{rec.CERTS}{slot.name}/"),
                                               self.store.scan(f"{rec.PEM}{slot.name}/"))
            if slot.generation == generation:
                break  # else an event for this domain came in meanwhile: read again
        if self.state.slots.get(slot.name) is not slot or slot.loaded:
            return  # the domain went away, or an event filled it meanwhile
        records = {item.key.rpartition("/")[2]: item.value for item in certs}
        materials = {item.key.rpartition("/")[2]: item.value for item in pems}
        self.state.note(slot.fill(records, materials, time.time()))
        self.state.resident.add(slot)

    def load_fresh(self) -> None:
        """Load, in the background, the slots domain events created, while there is room."""
        if self.state.fresh and (self._background is None or self._background.done()):
            self._background = asyncio.get_running_loop().create_task(
                self._load_fresh(), name="load-new-domains")

    async def _load_fresh(self) -> None:
        state = self.state
        while state.fresh:
            slot = state.fresh.pop()
            if not slot.loaded and state.resident.has_room():
                await self.load(slot)


def _trim_heap() -> None:
    """Hand the pages freed by a bulk load back to the kernel (glibc keeps them).

    The supervisor decodes 100,000 records and drops their values: ~130 MB of freed
    heap that RSS would otherwise keep. Best effort; a no-op without glibc.
    """
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).malloc_trim(0)


def store_expiry(state: StoreState, now: float) -> list[tuple[str, str, float]]:
    """(domain, source, not_after) of every store certificate served now, from a
    metadata-only state (with_pem=False: the supervisor's). A certificate several
    domains share is listed once, under the first of them."""
    seen: dict[str, tuple[str, str, float]] = {}
    certs = state.certs
    for name in state.domains:
        chosen = rec.serving_certificate(certs.get(rec.cert_key(name, "custom")),
                                         certs.get(rec.cert_key(name, "acme")), now)
        if chosen is not None:
            seen.setdefault(chosen.fingerprint,
                            (name, chosen.source, chosen.not_after))
    return list(seen.values())


@dataclass(frozen=True, slots=True)
class Composed:
    certs: CertTable
    routes: RouteTable
    challenges: dict[str, str]
    next_change: float | None  # when a certificate starts or stops being valid


def compose(static: Snapshot, state: StoreState, now: float) -> Composed:
    """Merge config and store into the tables a worker serves from (`state` must be a
    worker's: with_pem=True). Builds no SSLContext and reads no record: every store
    domain's name points at its slot, which wins over the ops certificate files
    while it has a certificate (the table falls back to them when it has none).
    ~0.15 s at 100,000 domains: a worker runs it at start and on SIGHUP; store events
    go through Composer.update.
    """
    del now  # kept for the callers' symmetry with Composer.update
    static_names = _static_names(static)
    names: dict[str, CertEntry] = dict(static_names)
    names.update(state.slots)
    table = CertTable.build(names, static.default, reject_unknown=static.reject_unknown,
                            fallback=CertTable.build(static_names, None).indexes())
    return Composed(table, compose_routes(static.config, state), dict(state.challenges),
                    state.next_change)


def _static_names(static: Snapshot) -> dict[str, CertEntry]:
    names: dict[str, CertEntry] = {}
    for entry in static.static_entries:
        for name in entry.bundle.names:
            names.setdefault(name, entry)
    return names


class Composer:
    """A worker's composition, kept between rounds so that a batch of store events
    costs what it names. Its indexes are immutables.Map (a HAMT): each new table
    shares all but the changed paths with the last one, so adding a domain to a
    million-name table costs ~10 us instead of copying three million-entry dicts
    (~40 ms each, measured) and every table stays an immutable snapshot. A batch of
    certificate events alone costs nothing here: slots change in place.

    full() is compose() into Maps (start, store reload); update() re-indexes only the
    domains in `state.touched` (added or removed), rebuilds the app list on
    `routes_touched` (an app changed: a few entries), or falls back to full() after
    a store reload (`state.reset`); restatic() (SIGHUP) changes only the names the
    config's certificate files and domains changed. Worker loop only, not
    thread-safe.
    """

    def __init__(self) -> None:
        self._exact: Map[str, CertEntry] = Map()
        self._wild: Map[str, CertEntry] = Map()
        self._domains: Map[str, str] = Map()
        self._static: dict[str, CertEntry] = {}
        self._snapshot: Snapshot | None = None
        self._fallback: tuple[dict[str, CertEntry], dict[str, CertEntry]] = ({}, {})
        self._composed: Composed | None = None

    def full(self, static: Snapshot, state: StoreState, now: float) -> Composed:
        """~3 s at 1,000,000 domains (measured: building the Maps is most of it)."""
        state.touched.clear()
        state.routes_touched = state.reset = False
        names = _static_names(static)
        fallback = CertTable.build(names, None).indexes()
        exact, wild = dict(fallback[0]), dict(fallback[1])
        for name, slot in state.slots.items():
            if not name.startswith("*."):
                exact[name] = slot
            elif name.count(".") >= 2:
                wild[name[1:]] = slot
        with _no_gc():
            self._exact, self._wild = Map(exact), Map(wild)
            self._domains = Map(route_domains(static.config, state))
        del exact, wild
        self._static, self._snapshot, self._fallback = names, static, fallback
        return self._compose(static, state, compose_apps(static.config, state))

    def restatic(self, static: Snapshot, state: StoreState, now: float) -> Composed:
        """A new config snapshot (SIGHUP): re-index the names whose ops certificate or
        configured domain changed; store domains keep their slots."""
        old = self._snapshot
        if old is None or state.reset:
            return self.full(static, state, now)
        names = _static_names(static)
        before, configured = self._static, static.config.domains
        with self._exact.mutate() as exact, self._wild.mutate() as wild, \
                self._domains.mutate() as domains:
            for name in before.keys() | names.keys():
                if before.get(name) is not names.get(name):
                    _index(exact, wild, name, state.slots.get(name) or names.get(name))
            for name in old.config.domains.keys() | configured.keys():
                if name not in state.domains:
                    app = configured.get(name)
                    if app is None:
                        domains.pop(name, None)
                    else:
                        domains[name] = app
            self._exact, self._wild = exact.finish(), wild.finish()
            self._domains = domains.finish()
        self._static, self._snapshot = names, static
        self._fallback = CertTable.build(names, None).indexes()
        state.routes_touched = True  # the config's apps may differ
        return self.update(static, state, now)  # with the store events not yet applied

    def _compose(self, static: Snapshot, state: StoreState,
                 apps: Mapping[str, App]) -> Composed:
        certs = CertTable(self._exact, self._wild, static.default, static.reject_unknown,
                          self._fallback)
        routes = RouteTable(static.config.platform_domain, apps, self._domains)
        self._composed = Composed(certs, routes, dict(state.challenges), state.next_change)
        return self._composed

    def update(self, static: Snapshot, state: StoreState, now: float) -> Composed:
        last = self._composed
        if state.reset or last is None:
            return self.full(static, state, now)
        apps = last.routes.apps
        if state.routes_touched:
            state.routes_touched = False
            apps = compose_apps(static.config, state)
        if state.touched:
            touched, state.touched = state.touched, set()
            configured = static.config.domains
            with self._exact.mutate() as exact, self._wild.mutate() as wild, \
                    self._domains.mutate() as domains:
                for name in touched:
                    entry = state.slots.get(name) or self._static.get(name)
                    _index(exact, wild, name, entry)
                    record = state.domains.get(name)
                    app = record.app if record is not None else configured.get(name)
                    if app is None:
                        domains.pop(name, None)
                    else:
                        domains[name] = app
                self._exact, self._wild = exact.finish(), wild.finish()
                self._domains = domains.finish()
        return self._compose(static, state, apps)


def _index(exact: MapMutation[str, CertEntry], wild: MapMutation[str, CertEntry],
           name: str, entry: CertEntry | None) -> None:
    """Put (or, entry None, remove) `name` the way CertTable.build indexes it."""
    if name.startswith("*."):
        if name.count(".") < 2:
            return
        index, key = wild, name[1:]
    else:
        index, key = exact, name
    if entry is None:
        index.pop(key, None)
    else:
        index[key] = entry


def compose_routes(config: Config, state: StoreState) -> RouteTable:
    return RouteTable(config.platform_domain, compose_apps(config, state),
                      route_domains(config, state))


def compose_apps(config: Config, state: StoreState) -> dict[str, App]:
    apps = {name: App.from_config(name, spec) for name, spec in config.apps.items()}
    for name, record in state.apps.items():
        backends = tuple(Backend(*config_mod.parse_address(b, where=f"apps/{name}"))
                         for b in record.backends)
        apps[name] = App(name, backends, force_https=record.force_https,
                         canonical_domain=record.canonical_domain)
    return apps


def route_domains(config: Config, state: StoreState) -> dict[str, str]:
    """Custom domain -> app name: the config's, then the store's over them."""
    domains = dict(config.domains)
    domains.update({d: r.app for d, r in state.domains.items()})
    return domains


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
                fresh = await load_state(self.store, with_pem=self.state.with_pem,
                                         resident=self.state.resident.capacity)
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
