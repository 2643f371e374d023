"""A worker past its resident limit (store.resident_certificates) and a certificate
uploaded for one of its names: served from the store's watch events themselves, with
no store read on the way, and a read already in flight for the name when the events
come is not made again (the events are replayed on what it returns).

A worker's real StoreState, SlotLoader and StoreFollower over a real file store, written
by the real Registry; the loader's reads go through a gate that holds them, so what is
served before any read returns is seen, and the reads are counted.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from proxy.certs.bundle import load_bundle
from proxy.errors import StoreError
from proxy.registry import Registry
from proxy.store import records as rec
from proxy.store.base import Item
from proxy.store.files import FileStore
from proxy.sync import DomainSlot, SlotLoader, StoreFollower, StoreState, load_state
from tests.certgen import CA, Issued

pytestmark = pytest.mark.timeout(60)

NAME = "www.never-served.example.com"
OTHERS = ["a.resident.example.com", "b.resident.example.com", "c.resident.example.com"]


class GatedReads:
    """The store as the loader sees it: each scan counted, its answer held until `open`
    (an answer read before what happens meanwhile)."""

    def __init__(self, store: FileStore) -> None:
        self.store = store
        self.scans: list[str] = []
        self.answered = 0  # scans whose answer is read, held or handed over
        self.open = asyncio.Event()
        self.down = False  # the store unreachable: each scan fails

    async def scan(self, prefix: str) -> list[Item]:
        self.scans.append(prefix)
        if self.down:
            raise StoreError("cannot reach the store (test)")
        items = await self.store.scan(prefix)
        self.answered += 1
        await self.open.wait()
        return items

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)


async def until(check: Callable[[], object], what: str, within: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while not check():
        assert asyncio.get_running_loop().time() < deadline, f"timed out: {what}"
        await asyncio.sleep(0.01)


Scenario = Callable[[Registry, FileStore, StoreState, SlotLoader, StoreFollower, GatedReads],
                    Awaitable[None]]


def run(tmp_path: Path, acme: Issued, scenario: Scenario) -> None:
    """A store of four domains (NAME with an ACME certificate), a worker's state over
    it past its resident limit (2: no certificate read at start), following the store."""
    async def main() -> None:
        store = FileStore(tmp_path / "store", poll_interval=0.01)
        registry = Registry(store, platform_domain="edge.example", apps=["shop"], acme=False)
        for name in [NAME, *OTHERS]:
            await registry.add_domain(name, "shop")
        await registry.store_acme_certificate(NAME, load_bundle(acme.chain_pem, acme.key_pem,
                                                                domain=NAME))
        state = await load_state(store, resident=2)
        assert not state.slots  # past the limit: each read on its name's first use
        gated = GatedReads(store)
        loader = SlotLoader(gated, state)  # type: ignore[arg-type]
        follower = StoreFollower(store, state, loader.load_fresh)  # as a worker's batch
        following = asyncio.create_task(follower.run())
        try:
            await scenario(registry, store, state, loader, follower, gated)
        finally:
            following.cancel()
            gated.open.set()
            await asyncio.sleep(0)
            await store.close()

    asyncio.run(main())


def test_custom_certificate_of_a_name_never_served_is_served_from_the_watch_events(
        tmp_path: Path, ca: CA) -> None:
    acme, custom = ca.issue([NAME]), ca.issue([NAME])

    async def scenario(registry: Registry, store: FileStore, state: StoreState,
                       loader: SlotLoader, follower: StoreFollower, gated: GatedReads) -> None:
        await registry.set_custom_certificate(NAME, custom.chain_pem, custom.key_pem)
        assert await follower.reach(await store.revision(), within=10)
        slot = state.slots.get(NAME)
        assert slot is not None and slot.loaded, "the upload is not served from its events"
        assert slot.fingerprint == custom.fingerprint and slot.source == "custom"
        assert loader.prepare(slot) is None  # a handshake goes ahead: nothing to read first
        assert slot.bundle.fingerprint == custom.fingerprint  # a context builds from it
        # Its ACME record, not in the events, is read in the background (one read).
        await until(lambda: len(gated.scans) == 2, "the background read of the rest")
        gated.open.set()
        await until(lambda: slot.acme is not None, "the ACME record read in")
        assert slot.acme is not None and slot.acme.fingerprint == acme.fingerprint
        assert slot.fingerprint == custom.fingerprint
        # Complete: with the custom certificate removed, the ACME one serves.
        await registry.remove_custom_certificate(NAME)
        assert await follower.reach(await store.revision(), within=10)
        assert slot.fingerprint == acme.fingerprint and slot.source == "acme"
        assert len(gated.scans) == 2

    run(tmp_path, acme, scenario)


def test_events_during_a_certificate_read_are_replayed_on_it_not_read_again(
        tmp_path: Path, ca: CA) -> None:
    acme, custom = ca.issue([NAME]), ca.issue([NAME])

    async def scenario(registry: Registry, store: FileStore, state: StoreState,
                       loader: SlotLoader, follower: StoreFollower, gated: GatedReads) -> None:
        reading = loader.load(DomainSlot(NAME))  # a handshake for NAME: its first read
        assert reading is not None
        await until(lambda: gated.answered == 2, "the read's answer")
        # The upload lands while that read is held: its answer predates the upload.
        await registry.set_custom_certificate(NAME, custom.chain_pem, custom.key_pem)
        assert await follower.reach(await store.revision(), within=10)
        gated.open.set()
        await reading
        slot = state.slots[NAME]
        assert slot.loaded and slot.fingerprint == custom.fingerprint
        assert slot.acme is not None and slot.acme.fingerprint == acme.fingerprint
        assert sorted(gated.scans) == [f"{rec.CERTS}{NAME}/", f"{rec.PEM}{NAME}/"]

    run(tmp_path, acme, scenario)


def test_a_slot_made_from_events_is_let_go_when_the_rest_cannot_be_read(
        tmp_path: Path, ca: CA) -> None:
    acme, custom = ca.issue([NAME]), ca.issue([NAME])

    async def scenario(registry: Registry, store: FileStore, state: StoreState,
                       loader: SlotLoader, follower: StoreFollower, gated: GatedReads) -> None:
        gated.down = True
        await registry.set_custom_certificate(NAME, custom.chain_pem, custom.key_pem)
        assert await follower.reach(await store.revision(), within=10)
        slot = state.slots[NAME]
        assert slot.loaded and slot.fingerprint == custom.fingerprint
        # Without its ACME record it is incomplete: not kept; the next handshake reads
        # the domain whole (here once the store is back).
        await until(lambda: NAME not in state.slots, "the incomplete slot let go")
        assert not slot.loaded and NAME not in state.resident.slots
        gated.down = False
        gated.open.set()
        reading = loader.load(DomainSlot(NAME))
        assert reading is not None
        await reading
        again = state.slots[NAME]
        assert again.fingerprint == custom.fingerprint
        assert again.acme is not None and again.acme.fingerprint == acme.fingerprint

    run(tmp_path, acme, scenario)
