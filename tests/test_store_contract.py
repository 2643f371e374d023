"""The Store contract (proxy/store/base.py), run against every backend in BACKENDS.

Adding a backend is one entry in BACKENDS: a class that opens stores sharing one
namespace (`open()` again = another process's view). The FileStore-only checks (file
modes, temporary files, damaged files) are at the end.

Each backend also runs sealed (`files-sealed`, `etcd-sealed`): wrapped in the SealedStore
that `store.encryption` puts around it (store/sealing.py), which must keep every promise
of the contract while it encrypts the records at secret paths (`pem/`, `acme/`).

Backends differ where base.py says they may: `dense` backends move the revision up by
exactly one per write (files), others only promise that it increases (etcd counts every
write of its cluster); `short_ttl` is the shortest lock TTL the backend honours (etcd
leases last at least 2 s). The etcd backend runs against one real etcd for the session,
each test in a namespace (key prefix) of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import hashlib
import itertools
import json
import os
import random
import signal
import stat
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, Protocol

import pytest

from proxy.errors import ConflictError, LockTimeout, StoreError
from proxy.store import files
from proxy.store.base import Compacted, Event, Item, Lease, Store
from proxy.store.etcd import EtcdSettings, EtcdStore
from proxy.store.files import FileStore
from proxy.store.sealing import Keyring, SealedStore
from tests.support.etcd import EtcdServer

REPO = Path(__file__).resolve().parents[1]


class StoreBackend(Protocol):
    name: str
    dense: bool
    short_ttl: float

    def __init__(self, where: Path) -> None: ...

    async def open(self, *, history: int | None = None) -> Store:
        """A new client of the same store; `history`: keep only about that many changes."""
        ...


class FilesBackend:
    name = "files"
    dense = True
    short_ttl = 0.3

    def __init__(self, where: Path) -> None:
        self.path = where / "store"

    async def open(self, *, history: int | None = None) -> Store:
        return await FileStore.open(self.path, poll_interval=0.05,
                                    keep_changes=history or 100_000)


_ETCD_ENV = "TLSEDGE_TEST_ETCD"  # the session's etcd endpoint, for child processes too


class CompactingEtcdStore(EtcdStore):
    """Keeps about `history` revisions, as etcd's auto-compaction would (much later)."""

    def __init__(self, settings: EtcdSettings, history: int) -> None:
        super().__init__(settings)
        self.history = history

    async def put(self, key: str, value: bytes, *, expect: int | None = None,
                  secret: bool = False) -> int:
        revision = await super().put(key, value, expect=expect, secret=secret)
        if revision > self.history:
            from aetcd import rpc

            await self._kv().Compact(rpc.CompactionRequest(revision=revision - self.history))
        return revision


class EtcdBackend:
    name = "etcd"
    dense = False
    short_ttl = 2.0

    def __init__(self, where: Path) -> None:
        endpoint = os.environ.get(_ETCD_ENV)
        assert endpoint, "the etcd_server fixture sets " + _ETCD_ENV
        namespace = hashlib.sha256(str(where).encode()).hexdigest()[:12]
        self.settings = EtcdSettings(endpoints=(endpoint,), prefix=f"/test-{namespace}/")

    async def open(self, *, history: int | None = None) -> Store:
        if history is not None:
            return CompactingEtcdStore(self.settings, history)
        return EtcdStore(self.settings)


def contract_keyring(where: Path) -> Keyring:
    """The key a sealed backend of `where` uses: the same in every process of a test."""
    return Keyring([hashlib.sha256(b"contract key " + str(where).encode()).digest()])


class SealedFilesBackend(FilesBackend):
    name = "files-sealed"

    def __init__(self, where: Path) -> None:
        super().__init__(where)
        self.keyring = contract_keyring(where)

    async def open(self, *, history: int | None = None) -> Store:
        return SealedStore(await super().open(history=history), self.keyring)


class SealedEtcdBackend(EtcdBackend):
    name = "etcd-sealed"

    def __init__(self, where: Path) -> None:
        super().__init__(where)
        self.keyring = contract_keyring(where)

    async def open(self, *, history: int | None = None) -> Store:
        return SealedStore(await super().open(history=history), self.keyring)


BACKENDS: dict[str, type[StoreBackend]] = {
    "files": FilesBackend, "etcd": EtcdBackend,
    "files-sealed": SealedFilesBackend, "etcd-sealed": SealedEtcdBackend}


@pytest.fixture(scope="session")
def etcd_server() -> Iterator[EtcdServer]:
    with EtcdServer() as server:
        os.environ[_ETCD_ENV] = server.endpoint
        try:
            yield server
        finally:
            os.environ.pop(_ETCD_ENV, None)


@pytest.fixture(params=sorted(BACKENDS))
def store_backend(request: pytest.FixtureRequest, tmp_path: Path) -> StoreBackend:
    if request.param.startswith("etcd"):
        request.getfixturevalue("etcd_server")
    return BACKENDS[request.param](tmp_path)


async def written_after(backend: StoreBackend, write: Awaitable[int], before: int) -> int:
    """Await a write; check its revision follows `before` as the backend promises."""
    revision = await write
    if backend.dense:
        assert revision == before + 1
    else:
        assert revision > before
    return revision


Body = Callable[[Store], Awaitable[None]]


def run(backend: StoreBackend, body: Body, *, history: int | None = None,
        timeout: float = 15.0) -> None:
    """Open a store on a fresh loop, run `body` with it, close it."""
    async def main() -> None:
        store = await backend.open(history=history)
        try:
            await asyncio.wait_for(body(store), timeout)
        finally:
            await store.close()
    asyncio.run(main())


async def next_events(events: AsyncIterator[Event], n: int, within: float = 2.0
                      ) -> list[Event]:
    return [await asyncio.wait_for(anext(events), within) for _ in range(n)]


async def drain(events: AsyncIterator[Event], idle: float = 0.5) -> list[Event]:
    """Every event until none came for `idle` seconds."""
    seen = []
    while True:
        try:
            seen.append(await asyncio.wait_for(anext(events), idle))
        except TimeoutError:
            return seen


def state_after(events: list[Event], start: dict[str, bytes] | None = None
                ) -> dict[str, bytes]:
    state = dict(start or {})
    for e in events:
        if e.value is None:
            state.pop(e.key, None)
        else:
            state[e.key] = e.value
    return state


# -- child processes (they import this module and call child_main) ---------------------

def spawn(backend: StoreBackend, where: Path, *args: str) -> subprocess.Popen[str]:
    code = "import sys; from tests.test_store_contract import child_main; child_main(sys.argv[1:])"
    return subprocess.Popen([sys.executable, "-c", code, backend.name, str(where), *args],
                            cwd=REPO, stdout=subprocess.PIPE, text=True)


def child_main(argv: list[str]) -> None:
    name, where, mode, *rest = argv
    backend = BACKENDS[name](Path(where))
    asyncio.run(_CHILD_MODES[mode](backend, *rest))


async def _child_increments(backend: StoreBackend, count: str) -> None:
    store = await backend.open()
    revisions = []
    for _ in range(int(count)):
        while True:
            item = await store.get("counter/value")
            value = 0 if item is None else int(item.value)
            try:
                revisions.append(await store.put("counter/value", b"%d" % (value + 1),
                                                 expect=0 if item is None else item.revision))
                break
            except ConflictError:
                continue
    print(json.dumps(revisions), flush=True)
    await store.close()


def checked_value(n: int, size: int) -> bytes:
    payload = random.randbytes(size)
    return b"%d:%s:" % (n, hashlib.sha256(payload).hexdigest().encode()) + payload


def verify_value(value: bytes) -> None:
    _, digest, payload = value.split(b":", 2)
    assert hashlib.sha256(payload).hexdigest().encode() == digest, "torn record"


async def _child_churn(backend: StoreBackend) -> None:
    store = await backend.open()
    n = 0
    while True:  # until SIGKILL
        await store.put(f"churn/k{n % 8}", checked_value(n, random.randint(1, 200_000)),
                        secret=True)
        if n % 9 == 4:
            await store.delete(f"churn/k{(n * 5) % 8}")
        n += 1
        if n == 10:
            print("ready", flush=True)


async def _child_acknowledged(backend: StoreBackend) -> None:
    """16 writers at once, each printing the value it wrote once put() returned, until
    SIGKILL."""
    store = await backend.open()

    async def writer(w: int) -> None:
        for n in itertools.count():
            value = checked_value(n, random.randint(1, 20_000))
            await store.put(f"acked/w{w}", value)
            print(f"w{w} {n} {hashlib.sha256(value).hexdigest()}", flush=True)
    print("ready", flush=True)
    await asyncio.gather(*(writer(w) for w in range(16)))


_CHILD_MODES: dict[str, Callable[..., Coroutine[Any, Any, None]]] = {
    "increments": _child_increments, "churn": _child_churn,
    "acknowledged": _child_acknowledged}


# -- reads, writes, revisions -----------------------------------------------------------

def test_store_satisfies_the_protocol(store_backend: StoreBackend) -> None:
    async def body(store: Store) -> None:
        assert isinstance(store, Store)
        lease = await store.lock("x", ttl=5)
        assert isinstance(lease, Lease)
    run(store_backend, body)


def test_put_stamps_the_item_with_the_new_revision(store_backend: StoreBackend) -> None:
    async def body(store: Store) -> None:
        base = await store.revision()
        assert base == 0 or not store_backend.dense
        assert await store.get("domains/a.example") is None
        rev = await written_after(store_backend, store.put("domains/a.example", b'{"app": "a"}'),
                                  base)
        assert rev == await store.revision()
        item = await store.get("domains/a.example")
        assert item is not None
        assert (item.key, item.value, item.revision) == ("domains/a.example", b'{"app": "a"}',
                                                         rev)
        binary = bytes(range(256)) + b"\n\x00"
        rev = await written_after(store_backend,
                                  store.put("certs/*.a.example/custom", binary, secret=True), rev)
        await written_after(store_backend, store.put("empty", b""), rev)
        assert (await store.get("certs/*.a.example/custom")).value == binary  # type: ignore[union-attr]
        assert (await store.get("empty")).value == b""  # type: ignore[union-attr]
    run(store_backend, body)


def test_every_write_and_delete_moves_the_revision_up(store_backend: StoreBackend) -> None:
    async def body(store: Store) -> None:
        first = await written_after(store_backend, store.put("a", b"1"), await store.revision())
        second = await written_after(store_backend, store.put("a", b"2"), first)
        assert await store.delete("a") is True
        deleted = await written_after(store_backend, store.revision(), second)
        assert await store.get("a") is None
        assert await store.delete("a") is False  # nothing to delete: no write
        assert await store.revision() == deleted
        await written_after(store_backend, store.put("a", b"3"), deleted)
    run(store_backend, body)


def test_concurrent_writes_from_one_loop_get_distinct_revisions(
        store_backend: StoreBackend) -> None:
    async def body(store: Store) -> None:
        base = await store.revision()
        writes = [store.put(f"apps/app{i}", b"x") for i in range(30)]
        writes += [store.put("status/same", b"%d" % i) for i in range(30)]
        revisions = await asyncio.gather(*writes)
        assert len(set(revisions)) == 60 and min(revisions) > base
        if store_backend.dense:
            assert sorted(revisions) == list(range(base + 1, base + 61))
        same = await store.get("status/same")
        assert same is not None and same.revision == max(revisions[30:])
    run(store_backend, body)


def test_scan_and_keys_are_sorted_and_match_a_string_prefix(
        store_backend: StoreBackend) -> None:
    async def body(store: Store) -> None:
        written = {}
        for key in ["domains/www.b.example", "domains/a.example", "domains/www.a.example",
                    "domains", "domainsx/z", "certs/a.example/custom", "certs/a.example/acme",
                    "certs/a.example.org/acme"]:
            written[key] = await store.put(key, key.encode())
        assert await store.keys("domains/") == [
            "domains/a.example", "domains/www.a.example", "domains/www.b.example"]
        assert await store.keys("domains/www") == ["domains/www.a.example",
                                                   "domains/www.b.example"]
        assert await store.keys("domains") == [
            "domains", "domains/a.example", "domains/www.a.example", "domains/www.b.example",
            "domainsx/z"]
        assert await store.keys("certs/a.example/") == ["certs/a.example/acme",
                                                        "certs/a.example/custom"]
        assert await store.keys("nothing/") == []
        everything = await store.scan("")
        assert [i.key for i in everything] == sorted(i.key for i in everything)
        assert len(everything) == 8
        assert all(i.value == i.key.encode() for i in everything)
        items = await store.scan("certs/a.example/")
        assert [(i.key, i.revision) for i in items] == [
            ("certs/a.example/acme", written["certs/a.example/acme"]),
            ("certs/a.example/custom", written["certs/a.example/custom"])]
    run(store_backend, body)


async def paged(store: Store, prefix: str, *, after: str = "", before: str = "",
                page: int = 0) -> list[list[Item]]:
    return [items async for items in store.scan_pages(prefix, after=after, before=before,
                                                      page=page)]


def test_paged_scan_returns_what_scan_returns_in_pages_of_the_asked_size(
        store_backend: StoreBackend) -> None:
    async def body(store: Store) -> None:
        for i in range(23):
            await store.put(f"certs/d{i:02}.example/acme", b"v%d" % i)
        await store.put("pem/d01.example/acme/f1", b"key material", secret=True)
        await store.put("certsx", b"beside the prefix")
        whole = await store.scan("certs/")
        pages = await paged(store, "certs/", page=10)
        assert [len(p) for p in pages] == [10, 10, 3]
        assert [i for p in pages for i in p] == whole
        after = whole[11].key
        assert [i for p in await paged(store, "certs/", after=after, page=5)
                for i in p] == whole[12:]
        assert await paged(store, "certs/", after=whole[-1].key) == []
        assert [i for p in await paged(store, "certs/", after=whole[3].key,
                                       before=whole[17].key, page=6)
                for i in p] == whole[4:17]
        assert [i for p in await paged(store, "certs/", before=whole[5].key + "\0")
                for i in p] == whole[:6]
        assert await paged(store, "nothing/") == []
        [[material]] = await paged(store, "pem/")
        assert material.value == b"key material"
        first = await anext(aiter(store.scan_pages("certs/", page=4)))
        assert first == whole[:4]  # a caller may stop after one page
    run(store_backend, body)


def test_get_many_reads_what_get_reads_in_the_keys_order(store_backend: StoreBackend) -> None:
    async def body(store: Store) -> None:
        keys = [f"domains/d{i:03}.example" for i in range(300)]
        for key in keys[::2]:
            await store.put(key, key.encode())
        await store.put("pem/d000.example/acme/f", b"key material", secret=True)
        wanted = [*reversed(keys), "pem/d000.example/acme/f", "nothing/here"]
        found = await store.get_many(wanted)  # past one etcd transaction's 128 reads
        assert found == [await store.get(key) for key in wanted]
        assert [i is not None for i in found[:300]] == [int(k[9:12]) % 2 == 0
                                                        for k in reversed(keys)]
        assert found[300] is not None and found[300].value == b"key material"
        assert await store.get_many([]) == []
    run(store_backend, body)


def test_paged_scan_is_the_store_at_one_revision_while_writes_go_on(
        store_backend: StoreBackend) -> None:
    async def body(store: Store) -> None:
        for i in range(12):
            await store.put(f"domains/d{i:02}.example", b"before")
        before = await store.scan("domains/")
        pages = store.scan_pages("domains/", page=4)
        seen = list(await anext(pages))
        await store.put("domains/d09.example", b"after")
        await store.delete("domains/d10.example")
        await store.put("domains/d11a.example", b"new")
        seen += [i async for p in pages for i in p]
        assert seen == before
    run(store_backend, body)


def test_private_key_records_read_back_exactly_as_written(
        store_backend: StoreBackend) -> None:
    """The records that hold private keys (sealed when encryption is on) behave like any
    other: get, scan, watch, compare-and-swap and delete see the value as written."""
    pem = b"-----BEGIN PRIVATE KEY-----\nMIGH\n-----END PRIVATE KEY-----\n"
    binary = bytes(range(256)) * 3

    async def body(store: Store) -> None:
        start = await store.revision()
        events = store.watch("", start)
        a = await store.put("pem/a.example/acme/f1", pem, secret=True)
        b = await store.put("pem/*.b.example/custom/f2", binary, secret=True)
        account = await store.put("acme/account", b'{"key_pem": "x"}', secret=True)
        with pytest.raises(ConflictError):
            await store.put("pem/a.example/acme/f1", b"lost", expect=a - 1 if a > 1 else 99)
        a = await store.put("pem/a.example/acme/f1", pem + b"again", expect=a)
        item = await store.get("pem/a.example/acme/f1")
        assert item is not None and (item.value, item.revision) == (pem + b"again", a)
        scanned = {i.key: (i.value, i.revision) for i in await store.scan("pem/")}
        assert scanned == {"pem/a.example/acme/f1": (pem + b"again", a),
                           "pem/*.b.example/custom/f2": (binary, b)}
        assert [i.value for i in await store.scan("acme/")] == [b'{"key_pem": "x"}']
        assert await store.keys("pem/") == ["pem/*.b.example/custom/f2",
                                            "pem/a.example/acme/f1"]
        assert await store.delete("pem/*.b.example/custom/f2", expect=b) is True
        seen = [e for e in await drain(events) if e.key.startswith(("pem/", "acme/"))]
        # A batch may skip a value a key had in between (base.py), never show another.
        assert {e.value for e in seen} <= {pem, pem + b"again", binary, None,
                                           b'{"key_pem": "x"}'}
        assert state_after(seen) == {"pem/a.example/acme/f1": pem + b"again",
                                     "acme/account": b'{"key_pem": "x"}'}
        assert account < a
    run(store_backend, body)


@pytest.mark.parametrize("key", ["", "/a", "a/", "a//b", "A", "a/../b", "..", ".", "a b",
                                 "caf\u00e9", "x" * 251, "a\\b", "a/" * 600 + "a"])
def test_invalid_keys_are_rejected(store_backend: StoreBackend, key: str) -> None:
    async def body(store: Store) -> None:
        base = await store.revision()
        with pytest.raises(StoreError, match="invalid store key"):
            await store.put(key, b"x")
        with pytest.raises(StoreError):
            await store.get(key)
        assert await store.revision() == base
    run(store_backend, body)


def test_create_if_absent_conflicts_and_writes_nothing(store_backend: StoreBackend) -> None:
    async def body(store: Store) -> None:
        rev = await written_after(store_backend, store.put("challenges/t1", b"one", expect=0),
                                  await store.revision())
        with pytest.raises(ConflictError, match="already exists"):
            await store.put("challenges/t1", b"two", expect=0)
        item = await store.get("challenges/t1")
        assert item is not None and (item.value, item.revision) == (b"one", rev)
        assert await store.revision() == rev
    run(store_backend, body)


def test_compare_and_swap_conflicts_on_a_stale_revision_and_writes_nothing(
        store_backend: StoreBackend) -> None:
    async def body(store: Store) -> None:
        first = await store.put("status/a.example", b"creating")
        second = await store.put("status/a.example", b"issued", expect=first)
        with pytest.raises(ConflictError, match=f"expected revision {first}"):
            await store.put("status/a.example", b"error", expect=first)
        with pytest.raises(ConflictError):
            await store.put("status/b.example", b"x", expect=5)  # absent
        item = await store.get("status/a.example")
        assert item is not None and (item.value, item.revision) == (b"issued", second)
        assert await store.revision() == second
        assert await store.get("status/b.example") is None
    run(store_backend, body)


def test_conditional_delete(store_backend: StoreBackend) -> None:
    async def body(store: Store) -> None:
        rev = await store.put("a", b"1")
        with pytest.raises(ConflictError):
            await store.delete("a", expect=rev + 7)
        assert await store.get("a") is not None
        assert await store.delete("a", expect=rev) is True
        await written_after(store_backend, store.revision(), rev)
    run(store_backend, body)


# -- watch ------------------------------------------------------------------------------

def test_watch_replays_missed_changes_in_order_then_live_ones(
        store_backend: StoreBackend) -> None:
    async def body(store: Store) -> None:
        await store.put("domains/old.example", b"0")
        start = await store.revision()
        for i in range(5):
            await store.put(f"domains/d{i}.example", b"%d" % i)
        await store.put("apps/other", b"ignored")  # outside the prefix
        events = store.watch("domains/", start)
        missed = await next_events(events, 5)
        assert [(e.key, e.value, e.revision) for e in missed] == [
            (f"domains/d{i}.example", b"%d" % i, start + 1 + i) for i in range(5)]
        pending = asyncio.ensure_future(anext(events))
        await asyncio.sleep(0.3)
        written = time.monotonic()
        rev = await store.put("domains/live.example", b"live")
        live = await asyncio.wait_for(pending, 2)
        assert time.monotonic() - written < 1.0
        assert (live.key, live.value, live.revision) == ("domains/live.example", b"live", rev)
    run(store_backend, body)


def test_watch_sees_deletes(store_backend: StoreBackend) -> None:
    async def body(store: Store) -> None:
        await store.put("challenges/t", b"token")
        events = store.watch("challenges/", await store.revision())
        rev = await store.delete("challenges/t") and await store.revision()
        [event] = await next_events(events, 1)
        assert (event.key, event.value, event.revision) == ("challenges/t", None, rev)
    run(store_backend, body)


def test_watch_ends_in_the_same_state_as_a_fresh_scan(store_backend: StoreBackend) -> None:
    async def body(store: Store) -> None:
        rng = random.Random(7)
        for i in range(20):
            await store.put(f"k/{i % 7}", b"seed%d" % i)
        start = await store.revision()
        initial = {i.key: i.value for i in await store.scan("k/")}
        seen: list[Event] = []

        async def follow() -> None:
            async for event in store.watch("k/", start):
                seen.append(event)

        follower = asyncio.create_task(follow())
        for i in range(150):
            key = f"k/{rng.randrange(9)}"
            if rng.random() < 0.3:
                await store.delete(key)
            else:
                await store.put(key, b"v%d" % i)
            if rng.random() < 0.1:
                await asyncio.sleep(0.06)
        final = await store.revision()
        deadline = time.monotonic() + 2
        while (not seen or seen[-1].revision < final) and time.monotonic() < deadline:
            expected = {i.key: i.value for i in await store.scan("k/")}
            if state_after(seen, initial) == expected:
                break
            await asyncio.sleep(0.05)
        follower.cancel()
        assert [e.revision for e in seen] == sorted({e.revision for e in seen})
        assert state_after(seen, initial) == {i.key: i.value for i in await store.scan("k/")}
    run(store_backend, body)


def test_watch_from_a_compacted_revision_raises_compacted(
        store_backend: StoreBackend) -> None:
    async def body(store: Store) -> None:
        base = await store.revision()
        revisions = [await store.put(f"k/{i}", b"x") for i in range(40)]
        with pytest.raises(Compacted) as raised:
            await anext(store.watch("k/", revisions[0]))
        assert revisions[1] < raised.value.oldest <= revisions[-1]
        recent = await next_events(store.watch("k/", revisions[36]), 3)
        assert [e.revision for e in recent] == revisions[37:]
        assert base < revisions[0]
    run(store_backend, body, history=10)


def test_a_watcher_keeping_up_survives_compaction(store_backend: StoreBackend) -> None:
    async def body(store: Store) -> None:
        events = store.watch("k/", await store.revision())
        for i in range(25):
            rev = await store.put(f"k/{i}", b"%d" % i)
            [event] = await next_events(events, 1)
            assert (event.key, event.revision) == (f"k/{i}", rev)
    run(store_backend, body, history=6)


def test_another_client_sees_writes_and_watch_events(store_backend: StoreBackend) -> None:
    async def body(store: Store) -> None:
        other = await store_backend.open()
        try:
            events = other.watch("domains/", await other.revision())
            rev = await store.put("domains/a.example", b"a")
            [event] = await next_events(events, 1)
            assert (event.key, event.value, event.revision) == ("domains/a.example", b"a", rev)
            item = await other.get("domains/a.example")
            assert item is not None and item.revision == rev
            assert await other.revision() == rev
            assert await other.put("domains/a.example", b"b", expect=rev) == rev + 1
            assert (await store.get("domains/a.example")).value == b"b"  # type: ignore[union-attr]
        finally:
            await other.close()
    run(store_backend, body)


def test_closed_store_refuses_calls_and_ends_its_watches(store_backend: StoreBackend) -> None:
    async def main() -> None:
        store = await store_backend.open()
        events = store.watch("", await store.revision())
        pending = asyncio.ensure_future(anext(events))
        await asyncio.sleep(0.1)
        await store.close()
        with pytest.raises(StopAsyncIteration):
            await asyncio.wait_for(pending, 2)
        with pytest.raises(StoreError):
            await store.get("a")
    asyncio.run(main())


def test_processes_doing_compare_and_swap_lose_no_update(
        store_backend: StoreBackend, tmp_path: Path) -> None:
    children = [spawn(store_backend, tmp_path, "increments", "200") for _ in range(3)]
    outputs = [c.communicate(timeout=60)[0] for c in children]
    assert all(c.returncode == 0 for c in children)
    revisions = [r for out in outputs for r in json.loads(out)]

    async def body(store: Store) -> None:
        item = await store.get("counter/value")
        assert item is not None and int(item.value) == 600
        assert item.revision == max(revisions)
    assert len(revisions) == len(set(revisions)) == 600
    run(store_backend, body)


# -- locks ------------------------------------------------------------------------------

def test_lock_excludes_other_clients(store_backend: StoreBackend) -> None:
    async def body(store: Store) -> None:
        other = await store_backend.open()
        inside: list[int] = []
        overlaps = 0

        async def worker(client: Store, n: int) -> None:
            nonlocal overlaps
            for _ in range(4):
                lease = await client.lock("domain-a.example", ttl=5, wait=5)
                inside.append(n)
                overlaps += len(inside) > 1
                await asyncio.sleep(0.01)
                inside.remove(n)
                await lease.release()

        try:
            await asyncio.gather(*(worker(c, i) for i, c in enumerate([store, other] * 2)))
        finally:
            await other.close()
        assert overlaps == 0
    run(store_backend, body)


def test_lock_wait_runs_out_with_lock_timeout_naming_the_lock(
        store_backend: StoreBackend) -> None:
    async def body(store: Store) -> None:
        other = await store_backend.open()
        try:
            await store.lock("domain-a.example", ttl=30)
            started = time.monotonic()
            with pytest.raises(LockTimeout, match=r"domain-a\.example is held by .*pid"):
                await other.lock("domain-a.example", ttl=30, wait=0.3)
            assert 0.3 <= time.monotonic() - started < 1.5
            with pytest.raises(LockTimeout):
                await other.lock("domain-a.example", ttl=30)  # wait=0: one try
            await other.lock("domain-b.example", ttl=30)  # other names are free
        finally:
            await other.close()
    run(store_backend, body)


def test_a_dead_holders_lock_frees_itself_after_ttl(store_backend: StoreBackend) -> None:
    ttl = store_backend.short_ttl

    async def body(store: Store) -> None:
        await store.lock("domain-a.example", ttl=ttl)  # never refreshed: holder "died"
        started = time.monotonic()
        lease = await store.lock("domain-a.example", ttl=5, wait=ttl + 3)
        assert ttl * 0.6 < time.monotonic() - started < ttl + 1.2
        assert await lease.refresh() is True
    run(store_backend, body)


def test_refresh_keeps_the_lock_past_its_ttl(store_backend: StoreBackend) -> None:
    ttl = store_backend.short_ttl

    async def body(store: Store) -> None:
        lease = await store.lock("domain-a.example", ttl=ttl)
        for _ in range(6):
            await asyncio.sleep(ttl / 3)
            assert await lease.refresh() is True
            with pytest.raises(LockTimeout):
                await store.lock("domain-a.example", ttl=1)
    run(store_backend, body)


def test_a_lost_lease_cannot_refresh_or_release_the_new_holders_lock(
        store_backend: StoreBackend) -> None:
    ttl = store_backend.short_ttl

    async def body(store: Store) -> None:
        old = await store.lock("domain-a.example", ttl=ttl * 0.7)
        await asyncio.sleep(ttl)
        new = await store.lock("domain-a.example", ttl=30, wait=ttl + 3)
        assert await old.refresh() is False
        await old.release()
        with pytest.raises(LockTimeout):
            await store.lock("domain-a.example", ttl=30)
        assert await new.refresh() is True
        await new.release()
        await new.release()  # twice is fine
        await store.lock("domain-a.example", ttl=30)
    run(store_backend, body)


def test_fencing_tokens_strictly_increase(store_backend: StoreBackend) -> None:
    async def body(store: Store) -> None:
        other = await store_backend.open()
        tokens = []
        try:
            for i in range(6):
                client = (store, other)[i % 2]
                lease = await client.lock("domain-a.example" if i % 3 else "domain-b.example",
                                          ttl=30, wait=2)
                await store.put("status/a.example", b"write guarded by the lease")
                tokens.append(lease.token)
                await lease.release()
        finally:
            await other.close()
        assert tokens == sorted(set(tokens))
        assert tokens[0] > 0
    run(store_backend, body)


# -- FileStore specifics ----------------------------------------------------------------

@pytest.fixture
def zero_umask() -> Iterator[None]:
    old = os.umask(0)  # files must be 0600 by how they are created, not thanks to umask
    try:
        yield
    finally:
        os.umask(old)


def tree(root: Path) -> list[Path]:
    return [root, *sorted(root.rglob("*"))]


def test_files_are_0600_and_directories_0700(tmp_path: Path, zero_umask: None) -> None:
    backend = FilesBackend(tmp_path)

    async def body(store: Store) -> None:
        await store.put("certs/a.example/acme", b"-----BEGIN PRIVATE KEY-----", secret=True)
        await store.put("acme/account", b"{}", secret=True)
        await store.lock("domain-a.example", ttl=5)
        await store.revision()
        await anext(store.watch("", await store.revision() - 1))
    run(backend, body, history=2)
    modes = {p.relative_to(tmp_path).as_posix(): stat.S_IMODE(p.stat().st_mode)
             for p in tree(backend.path)}
    assert len(modes) > 8
    assert {k: m for k, m in modes.items()
            if m != (0o700 if (tmp_path / k).is_dir() else 0o600)} == {}


def test_no_temporary_file_or_empty_directory_is_left_behind(tmp_path: Path) -> None:
    backend = FilesBackend(tmp_path)

    async def body(store: Store) -> None:
        for i in range(20):
            await store.put(f"certs/d{i % 4}.example/acme", b"x" * 3000)
        for i in range(4):
            await store.delete(f"certs/d{i}.example/acme")
        await store.put("domains/a.example", b"x")
    run(backend, body, history=8)  # compactions too
    names = [p.name for p in tree(backend.path)]
    assert not [n for n in names if n.endswith(".tmp")]
    assert sorted(p.relative_to(backend.path).as_posix() for p in tree(backend.path)[1:]) == [
        "changes.log", "data", "data/domains.d", "data/domains.d/a.example.rec", "lock"]


def test_killed_writers_leave_whole_records_and_a_working_store(tmp_path: Path) -> None:
    backend = FilesBackend(tmp_path)
    for _ in range(3):
        child = spawn(backend, tmp_path, "churn")
        assert child.stdout is not None and child.stdout.readline() == "ready\n"
        time.sleep(random.uniform(0.02, 0.2))
        child.send_signal(signal.SIGKILL)
        child.wait()
        child.stdout.close()

    async def body(store: Store) -> None:
        items = await store.scan("churn/")
        for item in items:
            verify_value(item.value)
        replayed = await drain(store.watch("churn/", 0))
        assert state_after(replayed) == {i.key: i.value for i in items}
        rev = await store.revision()
        assert await store.put("churn/k0", b"after", expect=None) == rev + 1
    run(backend, body)
    assert not [p for p in tree(backend.path) if p.name.endswith(".tmp")]


def test_a_write_that_died_half_way_changes_nothing(tmp_path: Path) -> None:
    """Simulates a writer killed after logging its revision but before the rename,
    and one killed in the middle of appending to the log."""
    backend = FilesBackend(tmp_path)

    async def body(store: Store) -> None:
        first = await store.put("domains/a.example", b"old")
        records = backend.path / "data" / "domains.d"
        (records / "a.example.tmp").write_bytes(b"tlsedge-record 1 2 3\nne")
        log = backend.path / "changes.log"
        log.write_bytes(log.read_bytes() + b"2 put domains/a.example\n3 put domains/b.ex")
        events = store.watch("domains/", first)
        assert await store.revision() == 2
        item = await store.get("domains/a.example")
        assert item is not None and (item.value, item.revision) == (b"old", first)
        assert await store.put("domains/c.example", b"c") == 3
        [event] = await next_events(events, 1)  # nothing for the dead write at 2
        assert (event.key, event.revision) == ("domains/c.example", 3)
        assert not (records / "a.example.tmp").exists()
        assert (backend.path / "changes.log").read_bytes().endswith(b"3 put domains/c.example\n")
    run(backend, body)


def test_paged_scan_reads_a_checkpoint_merged_with_the_changes_logged_after_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A segment's checkpoint is streamed a page at a time: its items the log changed
    since (updated, deleted) are replaced by the records as they are now, keys written
    since are merged in at their place, and a damaged checkpoint is not used."""
    backend = FilesBackend(tmp_path)

    async def body(store: Store) -> None:
        assert isinstance(store, FileStore)
        for i in range(0, 60, 2):
            await store.put(f"certs/d{i:02}.example/acme", b"old %d" % i)
        monkeypatch.setattr(files, "_CHECKPOINT_AFTER", 5)
        await store.checkpoint()
        assert (backend.path / "checkpoints" / "certs.ckpt").exists()
        monkeypatch.setattr(files, "_CHECKPOINT_AFTER", 10_000)  # no refresh meanwhile
        for i in range(0, 60, 6):
            await store.put(f"certs/d{i:02}.example/acme", b"new %d" % i)
        for i in range(2, 60, 10):
            await store.delete(f"certs/d{i:02}.example/acme")
        for i in range(1, 60, 4):
            await store.put(f"certs/d{i:02}.example/acme", b"added %d" % i)
        whole = await store.scan("certs/")
        assert [i.key for i in whole] == sorted(i.key for i in whole)
        assert _pairs(whole) == _pairs(store._read_walk("certs/"))
        pager = store._pager("certs/", "")
        pager.close()
        assert isinstance(pager, files._CheckpointPager)
        for page in (1, 7, 100):
            assert [i for p in await paged(store, "certs/", page=page) for i in p] == whole
        after = whole[20].key
        assert [i for p in await paged(store, "certs/", after=after, page=3)
                for i in p] == whole[21:]
        checkpointed = backend.path / "checkpoints" / "certs.ckpt"
        checkpointed.write_bytes(checkpointed.read_bytes()[:-5])
        assert store._checkpoint_pager("certs", "") is None
        assert [i for p in await paged(store, "certs/", page=9) for i in p] == whole
    run(backend, body)


def _pairs(items: list[Item]) -> list[tuple[str, bytes, int]]:
    return [(i.key, i.value, i.revision) for i in items]


def test_etcd_paged_scans_read_each_page_over_its_own_key_range(
        tmp_path: Path, etcd_server: EtcdServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """etcd 3.4 walks a range whole however small its limit: scan_pages marks each
    page's first key with a keys-only walk (in pages of its own), then reads each page
    over its exact range, all at one revision; pages and walk pages of any sizes."""
    from proxy.store import etcd

    backend = EtcdBackend(tmp_path)

    async def body(store: Store) -> None:
        for i in range(100):
            await store.put(f"domains/d{i:03}.example", b"%d" % i)
        whole = await store.scan("domains/")
        for big, bounds in ((7, 10), (10, 10), (1, 3), (64, 1000)):
            monkeypatch.setattr(etcd, "_BIG_PAGE", big)
            monkeypatch.setattr(etcd, "_BOUNDS", bounds)
            pages = await paged(store, "domains/", after=whole[4].key)
            assert [len(p) for p in pages[:-1]] == [big] * (len(pages) - 1)
            assert [i for p in pages for i in p] == whole[5:]
        monkeypatch.setattr(etcd, "_BIG_PAGE", 7)
        pages_iter = store.scan_pages("domains/")
        first = await anext(pages_iter)
        await store.delete(whole[50].key)
        await store.put("domains/d0505.example", b"new")
        assert first + [i async for p in pages_iter for i in p] == whole  # one revision
    run(backend, body)


def test_a_damaged_record_is_reported_not_returned(tmp_path: Path) -> None:
    backend = FilesBackend(tmp_path)

    async def body(store: Store) -> None:
        await store.put("domains/a.example", b"x" * 100)
        path = backend.path / "data" / "domains.d" / "a.example.rec"
        path.write_bytes(path.read_bytes()[:50])
        with pytest.raises(StoreError, match="damaged"):
            await store.get("domains/a.example")
    run(backend, body)


# -- FileStore: writes at once, writers killed ------------------------------------------

@contextlib.contextmanager
def store_lock_held(path: Path) -> Iterator[None]:
    """Hold the FileStore's inter-process write lock (as another process's write would)."""
    fd = os.open(path / "lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


async def submitted() -> None:
    """Let the tasks just created run their first step: a FileStore write is queued (or
    handed to a thread) before its first await."""
    await asyncio.sleep(0)


def test_writes_queued_together_fail_only_where_their_condition_fails(
        tmp_path: Path) -> None:
    backend = FilesBackend(tmp_path)

    async def body(store: Store) -> None:
        taken = await store.put("domains/taken.example", b"old")
        with store_lock_held(backend.path):
            writes = [asyncio.create_task(w) for w in (
                store.put("domains/a.example", b"a"),
                store.put("domains/taken.example", b"new", expect=0),  # exists: conflict
                store.put("domains/b.example", b"b", expect=0),
                store.delete("domains/missing.example"),  # nothing to delete
                store.delete("domains/taken2.example", expect=taken))]
            await submitted()
        results = await asyncio.gather(*writes, return_exceptions=True)
        assert isinstance(results[1], ConflictError)
        assert isinstance(results[4], ConflictError)
        assert results[3] is False
        # The two that succeed take the next two revisions, in whichever order their
        # threads got the lock; the failed ones take none.
        assert {results[0], results[2]} == {taken + 1, taken + 2}, results
        item = await store.get("domains/taken.example")
        assert item is not None and item.value == b"old"
        assert [i.key for i in await store.scan("domains/")] == [
            "domains/a.example", "domains/b.example", "domains/taken.example"]
        assert await store.revision() == taken + 2
    run(backend, body)


def test_lock_takers_released_together_get_the_lock_once(tmp_path: Path) -> None:
    backend = FilesBackend(tmp_path)

    async def body(store: Store) -> None:
        other = await backend.open()
        try:
            with store_lock_held(backend.path):
                takers = [asyncio.create_task(s.lock("domain-a.example", ttl=30))
                          for s in (store, store, other)]
                await submitted()
            results = await asyncio.gather(*takers, return_exceptions=True)
            leases = [r for r in results if not isinstance(r, BaseException)]
            assert len(leases) == 1
            assert all(isinstance(r, LockTimeout) for r in results if r not in leases)
            assert await leases[0].refresh()
        finally:
            await other.close()
    run(backend, body)


def test_a_put_all_killed_half_way_leaves_no_temporary_file(tmp_path: Path) -> None:
    """A put_all logged three writes and died while writing the first record: the next
    write removes what it left (not only the last logged key's temporary file), and
    the records are as they were."""
    backend = FilesBackend(tmp_path)

    async def body(store: Store) -> None:
        first = await store.put("domains/a.example", b"old")
        records = backend.path / "data" / "domains.d"
        (records / "a.example.tmp").write_bytes(b"tlsedge-record 1 2 3\nne")
        log = backend.path / "changes.log"
        log.write_bytes(log.read_bytes() + b"2 put domains/a.example\n"
                        b"3 put domains/b.example\n4 put domains/c.example\n")
        assert await store.put("domains/d.example", b"d") == 5
        assert not list(records.glob("*.tmp"))
        item = await store.get("domains/a.example")
        assert item is not None and (item.value, item.revision) == (b"old", first)
        assert [i.key for i in await store.scan("domains/")] == [
            "domains/a.example", "domains/d.example"]
    run(backend, body)


async def holds_acknowledged(store: Store, *, acked: dict[str, tuple[int, str]]) -> None:
    items = {i.key.removeprefix("acked/"): i.value for i in await store.scan("acked/")}
    for key, (n, digest) in acked.items():
        value = items[key]
        verify_value(value)
        stored = int(value.split(b":", 1)[0])
        if stored == n:
            assert hashlib.sha256(value).hexdigest() == digest
        else:  # the write after it, logged and in place, its answer not yet printed
            assert stored == n + 1, f"{key}: acknowledged write {n}, found {stored}"


def test_every_acknowledged_write_survives_its_writer_killed(tmp_path: Path) -> None:
    """16 writers at once; the process is killed at a random moment:
    each key holds the value last acknowledged for it, or the one written after it
    (logged, not yet acknowledged), whole; never an older one."""
    backend = FilesBackend(tmp_path)
    for _ in range(3):
        child = spawn(backend, tmp_path, "acknowledged")
        assert child.stdout is not None and child.stdout.readline() == "ready\n"
        # Killed a random moment after its first acknowledged write (on a busy machine
        # the first fsync alone may take longer than the random wait).
        first = child.stdout.readline()
        time.sleep(random.uniform(0.2, 0.5))
        child.send_signal(signal.SIGKILL)
        child.wait()
        acked: dict[str, tuple[int, str]] = {}
        for line in [first, *child.stdout.read().splitlines()]:
            fields = line.split()
            if len(fields) == 3:
                acked[fields[0]] = int(fields[1]), fields[2]
        child.stdout.close()
        assert acked, "the child acknowledged no write"
        run(backend, functools.partial(holds_acknowledged, acked=acked))

    async def write_once_more(store: Store) -> None:  # a write clears what a death left
        await store.put("acked/after", b"x")
    run(backend, write_once_more)
    assert not [p for p in tree(backend.path) if p.name.endswith(".tmp")]
