"""The store as a node needs it (StoreState), read whole at start (load_state) and kept
current by the follower's events.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import msgspec

from proxy.errors import BundleError
from proxy.store import records as rec
from proxy.store.base import Item, Store
from proxy.sync.entries import DomainSlot, Resident

log = logging.getLogger("tlsedge.sync")


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
        for _ in self.fill_steps(certs, pems):
            pass

    def fill_steps(self, certs: list[Item], pems: list[Item],
                   generations: dict[str, int] | None = None,
                   step: int = 2000) -> Iterator[int]:
        """fill_all a `step` of slots at a time (yields the count so far), for a caller
        that lets the loop run between steps. With `generations` (each slot's
        generation when the scans began), a slot that changed since, or is loaded,
        or is gone, is left as it is: its own read or events have it right."""
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
        names = list(self.slots) if generations is None else list(generations)
        empty: dict[str, bytes] = {}
        now, done = time.time(), 0
        for at in range(0, len(names), step):
            for name in names[at:at + step]:
                slot = self.slots.get(name)
                if slot is None or (generations is not None and (
                        slot.loaded or slot.generation != generations[name])):
                    continue
                self.note(slot.fill(records.get(name, empty), materials.get(name, empty),
                                    now))
                self.resident.add(slot, count=False)
                done += 1
            self.resident.count()
            yield done


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


def _put(table: dict[str, rec.T], name: str, value: bytes | None, kind: type[rec.T]) -> None:
    if value is None:
        table.pop(name, None)
    else:
        table[name] = rec.decode(value, kind)


async def load_state(store: Store, *, with_pem: bool = True, resident: int = 100_000,
                     certificates: bool = True) -> StoreState:
    """Everything the data plane needs, read at one revision (or slightly after:
    replaying the watch from `revision` re-applies those changes idempotently).

    A worker (with_pem) skips statuses: they never change what is served; and reads
    certificates only when the store holds at most `resident` domains (otherwise
    each on first use, see StoreState), and `certificates` (a worker passes False
    and reads them after its listeners serve: SlotLoader.warm).
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
    if with_pem and certificates and len(state.domains) <= resident:
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
