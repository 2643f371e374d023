"""Group commit for the lifecycle's writes: the puts that many orders running at once
make at the same moment (statuses, challenge tokens, certificates) reach the store
together, in one transaction (Store.put_all), instead of one write each.

A file store pays three fsyncs per write; a burst of 200 orders made ~1,000 puts and
spent most of its time waiting for them in turn. Here a put waits only for the
transaction that carries it: while one is being written, the next one fills up.
Semantics stay those of put(): each write keeps its own `expect`; when one of a batch
fails its condition, the batch is written again one put at a time, so only that
caller gets the ConflictError. The revision returned is the transaction's (with a
file store, that of its last write: callers must not take it as `expect` for a later
write of the same key; the lifecycle never does). Everything else goes straight to
the store.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any, cast

from proxy.errors import ConflictError
from proxy.store.base import MAX_WRITES, Item, Lease, Store, Write

__all__ = ["GroupCommitStore", "group_commit"]


@dataclass
class _Put:
    write: Write
    secret: bool
    future: asyncio.Future[int]


class GroupCommitStore:
    """A Store whose puts are written in batches (see the module docstring)."""

    def __init__(self, inner: Store) -> None:
        self.inner = inner
        self._queue: list[_Put] = []
        self._writer: asyncio.Task[None] | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)  # what the contract gains later, as it is

    async def put(self, key: str, value: bytes, *, expect: int | None = None,
                  secret: bool = False) -> int:
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._queue.append(_Put(Write(key, value, expect), secret, future))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write_all(), name="group commit")
        return await future

    async def _write_all(self) -> None:
        while self._queue:
            batch: list[_Put] = []
            rest: list[_Put] = []
            seen: set[str] = set()
            for put in self._queue:  # one write per key per transaction, in order
                if put.write.key in seen or len(batch) == MAX_WRITES:
                    rest.append(put)
                else:
                    seen.add(put.write.key)
                    batch.append(put)
            self._queue = rest
            await self._commit(batch)

    async def _commit(self, batch: list[_Put]) -> None:
        try:
            if len(batch) == 1:
                put = batch[0]
                revision = await self.inner.put(put.write.key, put.write.value,
                                                expect=put.write.expect, secret=put.secret)
            else:
                revision = await self.inner.put_all([p.write for p in batch])
        except ConflictError as exc:
            if len(batch) == 1:
                _settle(batch, exc)
                return
            for put in batch:  # only the writes whose condition failed fail
                await self._commit([put])
            return
        except BaseException as exc:  # the store failed, or the writer was cancelled
            _settle(batch, exc)
            if isinstance(exc, asyncio.CancelledError):
                raise
            return
        for put in batch:
            if not put.future.done():
                put.future.set_result(revision)

    # -- the rest of the contract, straight through -----------------------------------

    async def get(self, key: str) -> Item | None:
        return await self.inner.get(key)

    async def scan(self, prefix: str) -> list[Item]:
        return await self.inner.scan(prefix)

    async def keys(self, prefix: str) -> list[str]:
        return await self.inner.keys(prefix)

    async def delete(self, key: str, *, expect: int | None = None) -> bool:
        return await self.inner.delete(key, expect=expect)

    async def put_all(self, writes: Sequence[Write]) -> int:
        return await self.inner.put_all(writes)

    async def revision(self) -> int:
        return await self.inner.revision()

    def watch(self, prefix: str, after: int) -> AsyncIterator[Any]:
        return self.inner.watch(prefix, after)

    async def lock(self, name: str, *, ttl: float, wait: float = 0.0) -> Lease:
        return await self.inner.lock(name, ttl=ttl, wait=wait)

    async def close(self) -> None:
        await self.inner.close()


def _settle(batch: list[_Put], exc: BaseException) -> None:
    for put in batch:
        if not put.future.done():
            put.future.set_exception(exc)


def group_commit(store: Store) -> Store:
    """`store` with its puts grouped. The wrapper passes every other method through as
    it is, the ones the Store protocol may gain later included (hence the cast)."""
    return cast(Store, GroupCommitStore(store))
