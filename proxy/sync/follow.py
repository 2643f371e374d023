"""Following the store: the watch (StoreFollower) and the reads of a domain's
certificate on first use (SlotLoader).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import Awaitable, Callable

from proxy import metrics
from proxy.certs.table import CertEntry
from proxy.errors import BundleError, ConfigError, StoreError
from proxy.store import records as rec
from proxy.store.base import Compacted, Event, Store
from proxy.sync.entries import DomainSlot
from proxy.sync.state import StoreState, _trim_heap, load_state

log = logging.getLogger("tlsedge.sync")


class SlotLoader:
    """Reads a slot's certificate records from the store before its first handshake
    (the listener awaits `prepare`), and in the background for domains added while
    the worker has room to hold them all."""

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
        self.loaded()

    async def warm(self) -> None:
        """Read every certificate, in the background once the listeners serve, when
        the store holds no more domains than the resident limit: start-up waits for
        names and routes only (a name asked for meanwhile is read on its own), and
        the loop runs between steps of 2,000 slots."""
        state = self.state
        if len(state.slots) > state.resident.capacity:
            return
        started = time.monotonic()
        generations = {name: slot.generation for name, slot in state.slots.items()}
        try:
            certs = await self.store.scan(rec.CERTS)
            pems = await self.store.scan(rec.PEM)
        except StoreError as exc:
            log.warning("could not read the certificates in advance (%s); each is read "
                        "on its name's first handshake", exc)
            return
        filled = 0
        for done in state.fill_steps(certs, pems, generations):
            filled = done
            await asyncio.sleep(0)
        del certs, pems
        _trim_heap()  # the scans' pages are garbage now: give them back
        self.loaded()
        gc.freeze()  # long-lived, like the rest of the start-up state
        log.info("read %d certificates in advance in %.2f s", filled,
                 time.monotonic() - started)

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
