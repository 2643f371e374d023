"""Following the store: the watch (StoreFollower), and a worker's reads of certificates
(SlotLoader: a domain's on its first handshake, all of them at start within the
resident limit, and the rest of a slot made from an upload's events: StoreState says
why). Events that come while a domain's read is in flight are replayed on what it
returns (DomainSlot.pending): an event never costs a second read.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Protocol

from proxy import metrics
from proxy.certs.table import CertEntry
from proxy.errors import BundleError, ConfigError, StoreError
from proxy.store import records as rec
from proxy.store.base import Compacted, Event, Item, Store
from proxy.sync.entries import DomainSlot
from proxy.sync.snapshot import CERTS, SnapshotReader
from proxy.sync.state import StoreState, no_gc, trim_heap

log = logging.getLogger("tlsedge.sync")


class SlotLoader:
    """Reads a domain's certificate records from the store before its first handshake
    (the listener awaits `prepare`), and in the background for domains added while
    the worker has room to hold them all; fills every slot at start from records read
    for it (the supervisor's snapshot, or the store: `fill`, `warm`)."""

    def __init__(self, store: Store, state: StoreState,
                 loaded: Callable[[], None] = lambda: None) -> None:
        self.store = store
        self.state = state
        # Called after slots were loaded: a certificate now in memory may start or
        # stop being valid before the time the owner's timer is set for.
        self.loaded = loaded
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

    def load(self, slot: DomainSlot) -> Awaitable[None] | None:
        """Read the certificate of `slot`'s domain (one read in flight per domain,
        shared); None when there is nothing to read (the domain is gone, or its slot
        is loaded already). The state keeps the slot from now on, so that events for
        the domain reach it during the read; a lookup finds it. Cancelling what this
        returns stops the wait, not the read."""
        name = slot.name
        task = self._loading.get(name)
        if task is None:
            state = self.state
            held = state.slots.get(name)
            if held is None:
                if not state.is_domain(name):
                    return None
                held = state.slots[name] = slot
            elif held.loaded:
                return None
            task = asyncio.get_running_loop().create_task(self._load(held),
                                                          name="certificate-read")
            self._loading[name] = task
        return asyncio.shield(task)

    async def _load(self, slot: DomainSlot) -> None:
        started = time.monotonic()
        try:
            await self._read(slot)
        except StoreError as exc:
            metrics.CERTIFICATE_LOADS.labels("failed").inc()
            log.warning("could not read the certificate of %s for a handshake: %s",
                        slot.name, exc)
            if self.state.slots.get(slot.name) is slot:  # one made from events is
                slot.unload()  # incomplete: read whole on its name's next handshake
        else:
            metrics.CERTIFICATE_LOADS.labels("ok").inc()
            metrics.CERTIFICATE_LOAD_SECONDS.observe(time.monotonic() - started)
        finally:
            del self._loading[slot.name]
            slot.pending = None
            if not slot.loaded and self.state.slots.get(slot.name) is slot:
                del self.state.slots[slot.name]  # read again on the next handshake
                self.state.resident.forget(slot)

    async def _read(self, slot: DomainSlot) -> None:
        """Read the domain's records once; the events that came meanwhile (the slot's
        `pending`) are replayed on top (they are newer, or re-apply what was read)."""
        if slot.pending is None:
            slot.pending = []
        certs, pems = await asyncio.gather(self.store.scan(f"{rec.CERTS}{slot.name}/"),
                                           self.store.scan(f"{rec.PEM}{slot.name}/"))
        if self.state.slots.get(slot.name) is not slot:
            return  # the domain went away (or its slot was unloaded) meanwhile
        records = {item.key.rpartition("/")[2]: item.value for item in certs}
        materials = {item.key.rpartition("/")[2]: item.value for item in pems}
        events, slot.pending = slot.pending or [], None
        now = time.time()
        slot.fill(records, materials, now)
        slot.replay(events, {item.key: item.revision for part in (certs, pems)
                             for item in part})
        self.state.note(slot.choose(now))
        self.state.resident.add(slot)
        self.loaded()

    async def fill(self, certs: Iterable[Item], pems: Iterable[Item]) -> int:
        """Load every domain's slot from these records (whole certs/ and pem/ reads),
        5 ms of work per loop turn; the count filled. A domain read meanwhile for a
        handshake keeps what it read."""
        filled = 0
        # No collection until the slots are frozen: each full one would walk every slot
        # filled so far (0.1 to 0.3 s stalls at 100,000, measured), and none of it is
        # garbage.
        with no_gc():
            for done in self.state.fill_steps(certs, pems):
                filled = done
                await asyncio.sleep(0)
            gc.freeze()  # long-lived, like the rest of the start-up state
        self.loaded()
        self.state.filling = None
        return filled

    async def fill_from(self, snapshot: SnapshotReader) -> int | None:
        """fill() from the certificate sections of the supervisor's snapshot, as they
        are announced (one section of 500 records decoded per loop turn, no
        collection meanwhile); None when the worker holds more domains than it keeps
        certificates (then each is read on its name's first handshake)."""
        loop = asyncio.get_running_loop()
        certs: list[Item] = []
        pems: list[Item] = []
        with no_gc():
            try:
                while section := await loop.run_in_executor(None, snapshot.next_section):
                    (certs if section.kind == CERTS else pems).extend(snapshot.items(section))
                    await asyncio.sleep(0)
            except (OSError, ValueError) as exc:
                log.warning("the snapshot's certificates cannot be read (%s); each is read "
                            "on its name's first handshake", exc)
                certs, pems = [], []
            if self.state.domain_count() > self.state.resident.capacity:
                self.state.filling = None
                return None
            return await self.fill(certs, pems)

    async def warm(self) -> None:
        """Read every certificate from the store, in the background once the listeners
        serve, when the store holds no more domains than the resident limit and no
        snapshot brought them (a name asked for meanwhile is read on its own)."""
        state = self.state
        if state.domain_count() > state.resident.capacity:
            return
        started = time.monotonic()
        try:
            certs = [i async for page in self.store.scan_pages(rec.CERTS) for i in page]
            pems = [i async for page in self.store.scan_pages(rec.PEM) for i in page]
        except StoreError as exc:
            log.warning("could not read the certificates in advance (%s); each is read "
                        "on its name's first handshake", exc)
            return
        filled = await self.fill(certs, pems)
        del certs, pems
        trim_heap()  # the scans' pages are garbage now: give them back (not on a fill
        #              from the snapshot: its pages are big buffers, freed as they go)
        log.info("read %d certificates in advance in %.2f s", filled,
                 time.monotonic() - started)

    def load_fresh(self) -> None:
        """Load, in the background, the domains events added, while there is room, and
        complete the slots events made (their ACME record)."""
        for slot in self.state.incomplete:
            if self.state.slots.get(slot.name) is slot and slot.name not in self._loading:
                self._loading[slot.name] = asyncio.get_running_loop().create_task(
                    self._complete(slot), name="certificate-read")
            else:
                self.state.completing = max(0, self.state.completing - 1)
        self.state.incomplete.clear()
        if self.state.fresh and (self._background is None or self._background.done()):
            self._background = asyncio.get_running_loop().create_task(
                self._load_fresh(), name="load-new-domains")

    async def _complete(self, slot: DomainSlot) -> None:
        try:
            await self._load(slot)
        finally:
            self.state.completing = max(0, self.state.completing - 1)

    async def _load_fresh(self) -> None:
        state = self.state
        while state.fresh:
            name = state.fresh.pop()
            if name in state.slots or not state.resident.has_room():
                continue
            waiting = self.load(DomainSlot(name))
            if waiting is not None:
                await waiting


class Followed(Protocol):
    """What a StoreFollower keeps current: a worker's StoreState or the supervisor's
    BriefState."""

    revision: int

    def apply(self, key: str, value: bytes | None) -> bool:
        """Apply one change; True when the owner should hear of it."""
        ...

    async def reload(self, store: Store) -> None:
        """Read everything again (the store's history no longer reaches `revision`)."""
        ...


class StoreFollower:
    """Keeps a state current from the store's watch; calls `changed` after each batch
    of relevant events. Survives store outages: keeps the last state, retries with
    backoff and resumes from the last revision it applied.
    """

    def __init__(self, store: Store, state: Followed, changed: Callable[[], None]) -> None:
        self.store = store
        self.state = state
        self.changed = changed
        self._pending: asyncio.TimerHandle | None = None
        self._progress = asyncio.Event()

    async def reach(self, revision: int, within: float) -> bool:
        """Wait until the state has applied `revision` (run() must be running); False
        when `within` seconds passed first. Calls `changed` before returning."""
        deadline = asyncio.get_running_loop().time() + within
        while self.state.revision < revision:
            self._progress.clear()
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._progress.wait(), remaining)
        if self._pending is not None:
            self._pending.cancel()
            self._fire()
        return self.state.revision >= revision

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
                await self.state.reload(self.store)
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
        self._progress.set()

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
