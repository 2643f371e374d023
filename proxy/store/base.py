"""The Store contract: a small revisioned key-value store every backend implements.

The store is the one source of truth (domains, apps, certificates, the ACME account,
challenge tokens, statuses, locks). This module holds the protocol and the value
types only; the typed records live in store/records.py. Backends: store/files.py
(one node) and store/etcd.py (a cluster). Both pass tests/test_store_contract.py.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from proxy.errors import ConflictError


@dataclass(frozen=True, slots=True)
class Item:
    """One stored value. `revision` is the store revision of its last write."""

    key: str
    value: bytes
    revision: int


@dataclass(frozen=True, slots=True)
class Write:
    """One write of a `put_all` transaction; `expect` as in Store.put."""

    key: str
    value: bytes
    expect: int | None = None


MAX_WRITES = 128  # writes per put_all: etcd's default --max-txn-ops


@dataclass(frozen=True, slots=True)
class Event:
    """One change seen by a watch: `value` is None for a delete."""

    key: str
    value: bytes | None
    revision: int


def conflict(key: str, expect: int, current: int | None) -> ConflictError | None:
    """The ConflictError of a write to `key` that expected revision `expect` (0: that
    the key is absent) and found `current` (None: absent); None when it held."""
    if expect == (current or 0):
        return None
    if expect == 0:
        return ConflictError(f"{key} already exists (revision {current})")
    state = "is absent" if current is None else f"is at revision {current}"
    return ConflictError(f"{key} changed: expected revision {expect}, it {state}")


class Compacted(Exception):
    """A watch asked for revisions the store no longer keeps: reload everything."""

    def __init__(self, oldest: int) -> None:
        super().__init__(f"revisions before {oldest} were compacted")
        self.oldest = oldest


@runtime_checkable
class Lease(Protocol):
    """A held lock. `token` is a fencing token: it increases with every acquisition
    of any lock, so a write guarded by it can be refused once a newer holder exists.
    """

    token: int

    async def refresh(self) -> bool:
        """Extend the lease; False when it was lost (expired and taken by another)."""
        ...

    async def release(self) -> None:
        """Give the lock up; safe to call twice and after the lease was lost."""
        ...


@runtime_checkable
class Store(Protocol):
    """A revisioned key-value store shared by every process of a node (or cluster).

    Keys are `/`-separated paths of DNS-safe segments (`domains/www.example.com`).
    Every write moves the store's revision up and stamps the written item with it;
    revisions never go back. FileStore moves it by exactly one per write (0 for an empty
    store); EtcdStore's revision is the etcd cluster's, which every write in that cluster
    moves (other prefixes too), so it may skip numbers: never assume +1. Methods are
    coroutines run on the caller's event loop; a backend may use threads inside but
    never blocks the loop. Errors
    are StoreError (ConflictError, LockTimeout are subclasses); a missing key is no
    error (get() returns None, delete() False).

    Secrets: values written with `secret=True` (anything holding a private key) are
    stored readable by the owner only (files: mode 0600) and never logged. With
    `store.encryption`, the records at records.SECRET_PREFIXES are also encrypted, by
    the SealedStore wrapped around the backend (store/sealing.py).
    """

    async def get(self, key: str) -> Item | None:
        """The item at `key`, or None."""
        ...

    async def get_many(self, keys: Sequence[str]) -> list[Item | None]:
        """The items at `keys`, in their order (None where absent): one call for what
        would be len(keys) get() calls (etcd: a read-only transaction per MAX_WRITES
        keys, each at one revision; files: one thread hop). For a listing's page."""
        ...

    async def scan(self, prefix: str) -> list[Item]:
        """Every item whose key starts with `prefix`, sorted by key."""
        ...

    def scan_pages(self, prefix: str, *, after: str = "", before: str = "", page: int = 0
                   ) -> AsyncIterator[list[Item]]:
        """What scan(prefix) returns, restricted to keys after `after` and before `before`
        (whole keys; "": no bound), as successive lists of at most `page` items (0: the
        backend's own size, as large as it serves well), sorted by key across pages.
        A bounded range costs what it holds (etcd 3.4 walks a range whole, whatever the
        page: a caller that wants a few keys bounds both ends).

        For a caller that folds a large prefix into its own state (a node's start-up,
        a listing) page by page instead of holding every raw record at once. The pages
        together are the store at one revision, the one of the first page's read
        (changes made while the caller works through them are not in later pages). A
        caller may stop early: a listing takes one page and closes the iterator.
        """
        ...

    async def keys(self, prefix: str) -> list[str]:
        """The keys under `prefix`, sorted; cheaper than scan() for large values."""
        ...

    async def put(self, key: str, value: bytes, *, expect: int | None = None,
                  secret: bool = False) -> int:
        """Write `value`; return the new revision.

        `expect` makes the write conditional: 0 means "only if absent" (create), a
        positive number means "only if the item's revision is still this one"
        (compare-and-swap). A failed condition raises ConflictError and writes nothing.
        """
        ...

    async def delete(self, key: str, *, expect: int | None = None) -> bool:
        """Remove `key`; False when it did not exist. `expect` as in put()."""
        ...

    async def put_all(self, writes: Sequence[Write]) -> int:
        """Every write of `writes` (distinct keys, at most MAX_WRITES) or none, in one
        transaction; return the store's revision after it. One failed `expect` raises
        ConflictError naming its key and writes nothing. Values at secret keys
        (records.SECRET_PREFIXES) are treated as put(secret=True) would."""
        ...

    async def revision(self) -> int:
        """The store's current revision (files: 0 for an empty store)."""
        ...

    def watch(self, prefix: str, after: int) -> AsyncIterator[Event]:
        """Every change under `prefix` with revision > `after`, in revision order,
        without gaps, then new changes as they happen (within 1 s).

        A backend may skip intermediate values of a key that changed several times
        in one batch; what is guaranteed is that a watcher that has applied every
        event holds exactly what a fresh scan() returns at that revision.

        Raises Compacted when `after` is older than what the store keeps; the
        watcher then reads revision() first, scans, and watches from that revision
        (changes made during the scan are replayed, idempotently).
        """
        ...

    async def lock(self, name: str, *, ttl: float, wait: float = 0.0) -> Lease:
        """Take the lock `name` for `ttl` seconds (the holder refreshes it).

        A holder that dies stops refreshing and the lock frees itself after `ttl`
        (a backend may round a short ttl up: etcd leases last at least 2 s).
        Waits up to `wait` seconds, then raises LockTimeout.
        """
        ...

    async def close(self) -> None:
        """Release resources; the store is unusable afterwards."""
        ...


# Optional extras of a backend, beside the Store protocol: test with isinstance (a
# SealedStore has one when its inner store has it).

@runtime_checkable
class HasHealth(Protocol):
    """A backend that can describe its server in one line (etcd: version, leader, db
    size), for `tlsedge cluster status`."""

    async def health(self) -> str: ...


@runtime_checkable
class Checkpointing(Protocol):
    """A backend that keeps scan checkpoints and writes them all on demand (files:
    for a tool that just wrote many records, so the next start-up reads one file per
    segment)."""

    async def checkpoint(self) -> None: ...
