"""A store certificate as a worker holds it: StoredEntry (record bytes, decoded on a
context build), DomainSlot (a domain's certificate, changed in place), and Resident
(the bounded set of loaded slots).
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable

import msgspec

from proxy import metrics
from proxy.certs.bundle import CertBundle
from proxy.certs.table import CertEntry
from proxy.errors import BundleError
from proxy.store import records as rec

log = logging.getLogger("tlsedge.sync")


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
    off the hot path). Never does I/O.

    Its `context_key` is the bytes the chain and key are read from: the material
    record (or the record itself, with inline PEM). The same leaf stored again with
    another chain has new material, so a new key and a context of its own."""

    __slots__ = ("_material", "_record")

    def __init__(self, record: bytes, material: bytes | None = None) -> None:
        head = _serving_decoder.decode(record)  # the base's __init__ wants a bundle
        self._record = record
        self.material = material  # None: a record with inline PEM (or material to come)
        self.fingerprint = head.fingerprint
        self.source = head.source
        self.not_before = head.not_before
        self.not_after = head.not_after

    @property
    def material(self) -> bytes | None:
        return self._material

    @material.setter
    def material(self, value: bytes | None) -> None:
        self._material = value
        self.context_key = value if value is not None else self._record

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

    __slots__ = ("acme", "built_key", "chosen", "custom", "loaded", "name", "pems",
                 "pending", "used")

    def __init__(self, name: str) -> None:  # the base's __init__ wants a bundle
        self.name = name
        self.custom: StoredEntry | None = None
        self.acme: StoredEntry | None = None
        # Key material by fingerprint that came before the metadata pointing at it
        # (the registry writes it first); once an entry holds it, it is dropped here.
        self.pems: dict[str, bytes] | None = None
        self.chosen: StoredEntry | None = None
        self.loaded = False
        # While a read of the domain's records is in flight: the certificate events seen
        # meanwhile, (key, value, revision), those newer than what the read returned
        # replayed in order on top of it (follow.SlotLoader): no event costs a re-read.
        self.pending: list[tuple[str, bytes | None, int]] | None = None
        self.used = 0.0  # time.monotonic() of the last handshake prepared for it
        # The context_key the context cache last built for this slot (it drops that
        # context when the slot's certificate changes: see ContextCache.get).
        self.built_key = b""
        self._clear()

    def _clear(self) -> None:
        self.chosen = None
        self.context_key = b""
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
                entry.material = value  # the same leaf, maybe another chain: see StoredEntry
                if entry is self.chosen:
                    self.context_key = entry.context_key
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
            self.context_key = chosen.context_key
            self.fingerprint = chosen.fingerprint
            self.source = chosen.source
            self.not_before = chosen.not_before
            self.not_after = chosen.not_after
        return min((t for r in (self.custom, self.acme) if r is not None
                    for t in (r.not_before, r.not_after) if t > now), default=None)

    def replay(self, events: list[tuple[str, bytes | None, int]],
               read: dict[str, int]) -> None:
        """Apply the events seen while a read was in flight (see `pending`) that are
        newer than the records it returned (`read`: key -> revision)."""
        for key, value, revision in events:
            if revision <= read.get(key, 0):
                continue  # the read has this change, or a later one
            last = key.rpartition("/")[2]  # a certificate's source, a material's fingerprint
            if key.startswith(rec.PEM):
                self.set_material(last, value)
            else:
                self.set(last, value)

    def unload(self) -> None:
        self.custom = self.acme = None
        self.pems = None
        self.loaded = False
        self._clear()

    def retire(self) -> None:
        """The domain went away: hold no certificate, as loaded. A table not swapped
        yet still maps the name here; a handshake reading it falls back (the
        platform or default certificate) instead of serving what was removed, and
        needs no read."""
        self.unload()
        self.loaded = True

    @property
    def bundle(self) -> CertBundle:
        if self.chosen is None:
            raise BundleError(f"no certificate loaded for {self.name}")
        return self.chosen.bundle

    def __repr__(self) -> str:
        return f"DomainSlot({self.name!r}, loaded={self.loaded}, {self.fingerprint[:16]!r})"


class Resident:
    """The loaded slots, least recently used first; past `capacity` the oldest one not
    used in the last `hold` seconds is unloaded (a slot just prepared for a handshake
    is not dropped before that handshake picks it: a few loop turns later), and
    handed to `dropped` (the state lets go of it: an unloaded slot is made again on
    its name's next handshake, so a million names never hold a million slots)."""

    def __init__(self, capacity: int, hold: float = 1.0,
                 dropped: Callable[[DomainSlot], None] | None = None) -> None:
        self.capacity = capacity
        self.hold = hold
        self.slots: OrderedDict[str, DomainSlot] = OrderedDict()
        self.dropped = dropped

    def add(self, slot: DomainSlot, *, count: bool = True) -> None:
        self.slots[slot.name] = slot
        self.slots.move_to_end(slot.name)
        if len(self.slots) > self.capacity:
            self._evict()
        if count:
            self.count()

    def count(self) -> None:
        """Set the gauge (a bulk fill calls it once per step, not per slot)."""
        metrics.CERTIFICATES_RESIDENT.set(len(self.slots))

    def touch(self, slot: DomainSlot, now: float) -> None:
        """A handshake is prepared for `slot`. It may be one no longer held (its
        domain removed, or removed and added again as a new slot) that a table not
        swapped yet still maps: then there is nothing to reorder."""
        slot.used = now
        if self.slots.get(slot.name) is not slot:
            return
        self.slots.move_to_end(slot.name)
        if len(self.slots) > self.capacity:  # over since the hold kept some: trim now
            self._evict()
            metrics.CERTIFICATES_RESIDENT.set(len(self.slots))

    def discard(self, slot: DomainSlot) -> None:
        """`slot`'s domain was removed: drop it, and retire it (see DomainSlot.retire)."""
        slot.retire()
        if self.slots.get(slot.name) is slot:
            del self.slots[slot.name]
            metrics.CERTIFICATES_RESIDENT.set(len(self.slots))

    def forget(self, slot: DomainSlot) -> None:
        """Let go of `slot`, unloaded by its owner (read again on its next handshake)."""
        if self.slots.get(slot.name) is slot:
            del self.slots[slot.name]
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
            if self.dropped is not None:
                self.dropped(slot)
