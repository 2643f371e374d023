"""A worker's store state (StoreState): what serving needs per domain, read at start
(from the supervisor's snapshot, sync/snapshot.py, or from the store: load_state) and
kept current by the follower's events.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import logging
import sys
import time
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import msgspec

from proxy.errors import BundleError
from proxy.store import records as rec
from proxy.store.base import Item, Store
from proxy.sync.entries import DomainSlot, Resident

log = logging.getLogger("tlsedge.sync")


class _DomainApp(msgspec.Struct, frozen=True, gc=False):
    """The one field of a DomainRecord a worker keeps (msgspec skips the others)."""

    app: str


_domain_app = msgspec.json.Decoder(_DomainApp).decode

STEP = 0.005  # seconds of work between two yields to the loop


class Slices:
    """`due()` is True once `length` seconds passed since it last was (or since made):
    a long loop asks it every few items and lets the event loop run then."""

    __slots__ = ("_length", "_until")

    def __init__(self, length: float = STEP) -> None:
        self._length = length
        self._until = time.perf_counter() + length

    def __call__(self) -> bool:
        now = time.perf_counter()
        if now < self._until:
            return False
        self._until = now + self._length
        return True



@dataclass
class StoreState:
    """The store as a worker needs it; sync's private, mutable working copy, changed on
    the worker's loop only.

    Per domain a worker keeps its name and app (`domains`, the app names interned:
    ~125 bytes a domain, the name and one dict entry) and, only for a domain whose
    certificate is held or being read, a DomainSlot (`slots`). `domains` is also the
    route table's map of custom domains (compose.py): the config's domains that the
    store does not have are in it too (`config_only`), so that no second
    million-entry map is built or copied. A certificate table looks names up in
    `slots` and `domains` when a handshake asks (compose.StoreNames): a domain with
    no slot gets a new, unloaded one, which the listener has read before the
    handshake (follow.SlotLoader), and which is kept while it is resident.

    With at most `resident.capacity` domains every certificate is read at start (from
    the supervisor's snapshot) and kept; past it, each on its name's first handshake,
    the most recently used ones kept.
    """

    domains: dict[str, str] = field(default_factory=dict)
    slots: dict[str, DomainSlot] = field(default_factory=dict)
    apps: dict[str, rec.AppRecord] = field(default_factory=dict)
    challenges: dict[str, str] = field(default_factory=dict)
    revision: int = 0
    resident: Resident = field(default_factory=lambda: Resident(100_000))
    # The config's custom domains (SIGHUP changes them), and those of them the store
    # does not have: routed by `domains` too, but no store domain (no slot).
    configured: dict[str, str] = field(default_factory=dict)
    config_only: set[str] = field(default_factory=set)
    # An app changed (the route table's app list is rebuilt), or everything was
    # (re)loaded (the composer starts over).
    routes_touched: bool = False
    reset: bool = True
    # The earliest time a resident certificate starts or stops being valid (may be
    # stale-early: then one re-check finds nothing to change).
    next_change: float | None = None
    # Domains added by events, to read in the background while `resident` has room
    # (so a store under the limit stays fully in memory).
    fresh: list[str] = field(default_factory=list)
    # While certificates read earlier wait to be filled in (fill_steps): the domains
    # whose certificate changed since, which the fill leaves to a read of their own.
    filling: set[str] | None = None
    # Custom key material of domains without a slot, as events brought it (the
    # registry writes it just before the metadata record): a custom certificate then
    # serves from the events themselves, no read first (custom_from_event). Bounded.
    materials: OrderedDict[str, dict[str, bytes]] = field(default_factory=OrderedDict)
    # Slots made from events that serve a custom certificate, their ACME record not
    # read yet: the loader reads it in the background (SlotLoader.load_fresh);
    # `completing` counts those not read yet (at most COMPLETING: a bulk upload of
    # certificates costs no more reads than it did, past them).
    incomplete: list[DomainSlot] = field(default_factory=list)
    completing: int = 0

    def __post_init__(self) -> None:
        self.resident.dropped = self._dropped

    def is_domain(self, name: str) -> bool:
        """Whether `name` is a store domain (not only a domain of the config)."""
        return name in self.domains and name not in self.config_only

    def domain_count(self) -> int:
        return len(self.domains) - len(self.config_only)

    def apply(self, key: str, value: bytes | None) -> bool:
        """Apply one change; True when it matters to the data plane."""
        try:
            if key.startswith(rec.DOMAINS):
                name = key[len(rec.DOMAINS):]
                app = None if value is None else sys.intern(_domain_app(value).app)
                self._domain_changed(name, app)
            elif key.startswith(rec.CERTS):
                return self._slot_cert(key, value)
            elif key.startswith(rec.PEM):
                return self._slot_material(key, value)
            elif key.startswith(rec.APPS):
                _put(self.apps, key[len(rec.APPS):], value, rec.AppRecord)
                self.routes_touched = True
            elif key.startswith(rec.CHALLENGES):
                token = rec.parse_challenge_key(key)
                if value is None:
                    self.challenges.pop(token, None)
                else:
                    self.challenges[token] = value.decode()
            else:
                return False  # statuses and the rest never change what is served
        except (ValueError, BundleError) as exc:  # an unreadable record must not stop the others
            log.error("ignoring unreadable store record %s: %s", key, exc)
            return False
        return True

    def _domain_changed(self, name: str, app: str | None) -> None:
        if app is None:
            slot = self.slots.pop(name, None)
            if slot is not None:
                self.resident.discard(slot)
            configured = self.configured.get(name)
            if configured is None:
                self.domains.pop(name, None)
            else:  # the config routes it again
                self.domains[name] = configured
                self.config_only.add(name)
            return
        if not self.is_domain(name) and self.resident.has_room():
            self.fresh.append(name)
        self.domains[name] = app
        self.config_only.discard(name)

    def configure(self, configured: dict[str, str]) -> None:
        """The config's custom domains (at start and on SIGHUP): routed where the store
        has no domain of that name; the store's win."""
        for name in self.configured.keys() | configured.keys():
            if name in self.domains and name not in self.config_only:
                continue  # a store domain
            app = configured.get(name)
            if app is None:
                self.domains.pop(name, None)
                self.config_only.discard(name)
            else:
                self.domains[name] = sys.intern(app)
                self.config_only.add(name)
        self.configured = dict(configured)

    def _slot_cert(self, key: str, value: bytes | None) -> bool:
        """A certificate record changed: a slot takes it in place (the table keeps
        pointing at the slot); a domain without a slot reads it on first use."""
        name, _, source = key[len(rec.CERTS):].rpartition("/")
        slot = self.slots.get(name)
        if slot is None or source not in ("custom", "acme"):
            if self.filling is not None:
                self.filling.add(name)
            return slot is None and source == "custom" and self.custom_from_event(name, value)
        if slot.pending is not None:  # a read in flight: replayed on top of it
            slot.pending.append((key, value, self.revision))
        if not slot.loaded:
            return False
        slot.set(source, value)
        self.note(slot.choose(time.time()))
        return True

    def _slot_material(self, key: str, value: bytes | None) -> bool:
        parsed = rec.parse_pem_key(key)
        if parsed is None:
            return False
        name, source, fingerprint = parsed
        slot = self.slots.get(name)
        if slot is None:
            if self.filling is not None:
                self.filling.add(name)
            if source == "custom":
                self._keep_material(name, fingerprint, value)
            return False
        if slot.pending is not None:
            slot.pending.append((key, value, self.revision))
        if slot.loaded:
            slot.set_material(fingerprint, value)
        return False  # the metadata event that follows switches the certificate

    MATERIALS_KEPT = 64
    COMPLETING = 32

    def _keep_material(self, name: str, fingerprint: str, value: bytes | None) -> None:
        held = self.materials.get(name)
        if value is None:
            if held is not None:
                held.pop(fingerprint, None)
            return
        if held is None:
            held = self.materials[name] = {}
            if len(self.materials) > self.MATERIALS_KEPT:
                self.materials.popitem(last=False)
        held[fingerprint] = value

    def custom_from_event(self, name: str, value: bytes | None) -> bool:
        """A custom certificate record for a domain this worker holds no slot for (a
        name not served lately): with its key material from the event before, and
        valid now, it serves at once (a valid custom certificate wins whatever the
        ACME one is), from a slot the loader completes in the background. Else False:
        read on the name's next handshake, as before."""
        materials = self.materials.pop(name, None)
        if value is None or materials is None or not self.is_domain(name) \
                or self.completing >= self.COMPLETING:
            return False
        slot = DomainSlot(name)
        slot.pems = materials
        slot.set("custom", value)
        now = time.time()
        custom = slot.custom
        if custom is None or custom.material is None \
                or rec.serving_certificate(custom, None, now) is not custom:
            return False
        slot.loaded, slot.pending = True, []  # events until the read are replayed on it
        self.slots[name] = slot
        self.resident.add(slot)
        self.note(slot.choose(now))
        self.incomplete.append(slot)
        self.completing += 1
        return True

    def _dropped(self, slot: DomainSlot) -> None:
        """`resident` unloaded `slot` to make room: let it go (made again if asked)."""
        if self.slots.get(slot.name) is slot:
            del self.slots[slot.name]

    def note(self, boundary: float | None) -> None:
        if boundary is not None and (self.next_change is None or boundary < self.next_change):
            self.next_change = boundary

    def rechoose(self, now: float) -> None:
        """A certificate started or stopped being valid: re-pick every resident slot."""
        self.next_change = None
        for slot in self.resident.slots.values():
            self.note(slot.choose(now))

    def load(self, prefix: str, items: list[Item]) -> None:
        """Apply a page of a scan of `prefix`: the domains' in one comprehension instead
        of a dispatch per record (~3x faster at 100,000 records)."""
        if prefix == rec.DOMAINS:
            try:
                self.load_domains((i.key[len(rec.DOMAINS):], _domain_app(i.value).app)
                                  for i in items)
                return
            except ValueError:
                pass  # record by record below, so an unreadable one is logged and skipped
        for item in items:
            self.apply(item.key, item.value)

    def load_domains(self, pairs: Iterable[tuple[str, str]]) -> None:
        """(name, app) of store domains, read at start (a snapshot or a scan)."""
        intern = sys.intern
        self.domains.update((name, intern(app)) for name, app in pairs)

    def fill_all(self, certs: list[Item], pems: list[Item]) -> None:
        """The whole certs/ and pem/ scans (a store within the resident limit): a slot
        for every domain, loaded, those without a certificate too."""
        for _ in self.fill_steps(certs, pems):
            pass

    def fill_steps(self, certs: Iterable[Item], pems: Iterable[Item],
                   slice_s: float = STEP) -> Iterator[int]:
        """fill_all a few milliseconds at a time (yields the count so far), for a caller
        that lets the loop run between slices: on a busy machine a slice's wall time is
        a few times its CPU time. A domain whose slot exists already (read on its own
        for a handshake) is left as it is, and so is one in `filling` (its certificate
        changed since these records were read): both are right, or read on their next
        handshake."""
        due = Slices(slice_s)
        records: dict[str, dict[str, bytes]] = {}
        cut = len(rec.CERTS)
        for n, item in enumerate(certs):
            name, _, source = item.key[cut:].rpartition("/")
            records.setdefault(name, {})[source] = item.value
            if n % 256 == 0 and due():
                yield 0
        materials: dict[str, dict[str, bytes]] = {}
        for n, item in enumerate(pems):
            parsed = rec.parse_pem_key(item.key)
            if parsed is not None:
                materials.setdefault(parsed[0], {})[parsed[2]] = item.value
            if n % 256 == 0 and due():
                yield 0
        names = [n for n in self.domains if n not in self.config_only]
        empty: dict[str, bytes] = {}
        now, done = time.time(), 0
        for n, name in enumerate(names):
            if name not in self.slots and name not in (self.filling or ()) \
                    and self.is_domain(name):
                slot = self.slots[name] = DomainSlot(name)
                self.note(slot.fill(records.get(name, empty), materials.get(name, empty),
                                    now))
                self.resident.add(slot, count=False)
                done += 1
            if n % 64 == 0 and due():
                self.resident.count()
                yield done
        self.resident.count()
        yield done

    async def reload(self, store: Store) -> None:
        """Read the store whole again (its history no longer reaches `revision`): new
        maps, so the composer builds its tables again (`reset`)."""
        fresh = await load_state(store, resident=self.resident.capacity)
        self.domains, self.slots = fresh.domains, fresh.slots
        self.apps, self.challenges = fresh.apps, fresh.challenges
        self.revision, self.next_change = fresh.revision, fresh.next_change
        self.resident = fresh.resident
        self.resident.dropped = self._dropped
        self.fresh, self.filling = [], None
        self.materials, self.incomplete, self.completing = OrderedDict(), [], 0
        self.configured, self.config_only = {}, set()  # the composer configures again
        self.reset = True


def _put(table: dict[str, rec.T], name: str, value: bytes | None, kind: type[rec.T]) -> None:
    if value is None:
        table.pop(name, None)
    else:
        table[name] = rec.decode(value, kind)


async def load_state(store: Store, *, resident: int = 100_000,
                     certificates: bool = True) -> StoreState:
    """A worker's state read from the store itself, page by page, at one revision (or
    slightly after: replaying the watch from `revision` re-applies those changes
    idempotently). A worker normally starts from the supervisor's snapshot instead;
    this is its path when the store's history no longer reaches that snapshot.

    Reads certificates only when the store holds at most `resident` domains (otherwise
    each on first use), and `certificates`.
    """
    state = StoreState(revision=await store.revision(), resident=Resident(resident))
    for prefix in (rec.DOMAINS, rec.APPS, rec.CHALLENGES):
        async for items in store.scan_pages(prefix):
            with no_gc():
                state.load(prefix, items)
    if certificates and state.domain_count() <= resident:
        certs, pems = await store.scan(rec.CERTS), await store.scan(rec.PEM)
        with no_gc():
            state.fill_all(certs, pems)
        del certs, pems
    trim_heap()
    return state


@contextlib.contextmanager
def no_gc() -> Iterator[None]:
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


def trim_heap() -> None:
    """Hand the pages freed by a bulk load back to the kernel (glibc keeps them).

    A load decodes pages of records and drops their values: freed heap that RSS would
    otherwise keep. Best effort; a no-op without glibc.
    """
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).malloc_trim(0)
