"""The supervisor's change log around its start-up read: a domain added while the node
still reads the store is logged "added" once the read is done, a domain removed then is
logged "removed", and the first change after the read is logged like any other.

Runs the node's real read (sync.read_node into the supervisor's BriefState) over a real
file store, with the real StoreFollower applying the store's watch meanwhile, and the
supervisor's DomainCounts turning what changed into log lines; the records the read
brings after an event changed another record of the same name still count.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path

import pytest

from proxy.app import DomainCounts, domain_view
from proxy.certs.bundle import load_bundle
from proxy.registry import Registry
from proxy.store.files import FileStore
from proxy.sync import BriefState, SnapshotFile, StoreFollower, read_node
from tests.certgen import CA

pytestmark = pytest.mark.timeout(60)


def change_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "tlsedge" and r.getMessage().startswith("domain ")]


async def until(check: Callable[[], object], what: str, within: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while not check():
        assert asyncio.get_running_loop().time() < deadline, f"timed out: {what}"
        await asyncio.sleep(0.02)


def test_domains_changed_during_the_start_up_read_are_logged_once_it_is_done(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, ca: CA) -> None:
    caplog.set_level(logging.INFO, logger="tlsedge")
    issued = ca.issue(["moved.example.com"])

    async def scenario() -> None:
        store = FileStore(tmp_path / "store", poll_interval=0.02)
        registry = Registry(store, platform_domain="edge.example", apps=["shop"], acme=False)
        for name in ("kept.example.com", "gone.example.com", "moved.example.com"):
            await registry.add_domain(name, "shop")
        await registry.store_acme_certificate("moved.example.com", load_bundle(
            issued.chain_pem, issued.key_pem, domain="moved.example.com"))
        state = BriefState(domain_view(acme_on=False))
        counts = DomainCounts(state)
        follower = StoreFollower(store, state, counts.changed)
        following: asyncio.Task[None] | None = None

        async def during_the_read() -> None:
            """The names are read: the follower starts (as the supervisor's does), and
            the store changes before the rest of the read (certificates, statuses) is done."""
            nonlocal following
            following = asyncio.create_task(follower.run())
            await registry.add_domain("new.example.com", "shop")
            await registry.remove_domain("gone.example.com")
            await registry.set_status("moved.example.com", state="creating")
            assert await follower.reach(await store.revision(), within=10)
            assert state.loading is not None  # still reading: nothing logged yet
            assert change_lines(caplog) == []

        snapshot = SnapshotFile()
        try:
            await read_node(store, snapshot, resident=100, briefs=state,
                            names_ready=during_the_read)
            for _ in state.sweep():
                pass
            state.loaded()
            counts.changed()  # as the supervisor does once its read is done
            assert change_lines(caplog) == [
                "domain new.example.com added to shop (certificate in use: platform, "
                "status: acme_off)",
                "domain gone.example.com removed"]
            caplog.clear()
            await registry.add_domain("later.example.com", "shop")  # the first news after
            await until(lambda: change_lines(caplog), "the change line of later.example.com")
            assert change_lines(caplog) == [
                "domain later.example.com added to shop (certificate in use: platform, "
                "status: acme_off)"]
            # The status changed during the read; its certificate, read by the read's
            # later pages, still counts: served, so In use.
            assert state.status_counts() == {"acme_off": 3, "in_use": 1}
        finally:
            if following is not None:
                following.cancel()
            snapshot.close()
            await store.close()

    asyncio.run(scenario())
