"""EtcdStore: the Store contract on an etcd v3 cluster, shared by every edge node.

Owns the key layout under one prefix (`/tlsedge/` + store key), the gRPC channel, the
watches and the lease-backed locks. It never logs a value and never retries a write on
its own: a failed call raises StoreError and the caller decides (sync reconnects).

Built on aetcd's generated gRPC stubs (`aetcd.rpc`) over a channel of our own: aetcd's
Client only opens plaintext channels and hides the response headers whose revisions
this contract is about.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
import grpc.aio
from aetcd import rpc

from proxy import metrics
from proxy.errors import ConflictError, LockTimeout, StoreError
from proxy.store.base import MAX_WRITES, Compacted, Event, Item, Write, conflict
from proxy.store.keys import check_prefix, split_key
from proxy.store.records import LOCKS

log = logging.getLogger("tlsedge.store.etcd")

MIN_LEASE_TTL = 2  # etcd refuses (rounds up) shorter leases: 1.5 x election timeout
_PAGE = 1000  # keys per Range call of a scan: one call never carries the whole store
# Keys per Range call of scan_pages, whose caller folds each page in and drops it: ~4 MB
# of certificate metadata, ~12 MB of key material (the channel accepts 256 MB). At a
# million domains, 100 calls instead of 1,000 for the domains.
_BIG_PAGE = 10_000
_BOUNDS = 100_000  # keys per call of the keys-only walk that bounds those pages (~5 MB)
_LOCK_POLL = (0.05, 0.5)  # first and longest pause between two tries of a held lock
# get_many's transactions in flight at once: a listing page (400 keys, 4 transactions)
# waits for one round trip, not four in a row.
_READS_IN_FLIGHT = 4
T = TypeVar("T")

# Reconnect quickly after an outage (gRPC's default backoff grows to 120 s), find a
# dead TCP peer within ~15 s even with no call in flight (a watch only reads), and
# accept large pages of certificates.
_CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2000),
    ("grpc.keepalive_time_ms", 10_000),  # etcd accepts pings every 5 s or slower
    ("grpc.keepalive_timeout_ms", 5_000),
    # Only while a call is open (a node always has its watch open): etcd does not
    # permit pings without a stream, and answered a million-domain start-up's pings
    # with GOAWAY too_many_pings.
    ("grpc.keepalive_permit_without_calls", 0),
    ("grpc.max_receive_message_length", 256 * 1024 * 1024),
]


@dataclass(frozen=True, slots=True)
class EtcdSettings:
    """How to reach etcd (store section of the config, resolved)."""

    endpoints: tuple[str, ...]
    prefix: str = "/tlsedge/"
    ca: str | None = None
    cert: str | None = None
    key: str | None = None
    username: str | None = None
    password_file: str | None = None
    timeout: float = 5.0
    node: str = ""


def _range_end(prefix: bytes) -> bytes:
    """The first key after every key starting with `prefix` (etcd's prefix range)."""
    end = bytearray(prefix)
    while end:
        if end[-1] < 0xFF:
            end[-1] += 1
            return bytes(end)
        end.pop()
    return b"\0"  # the prefix was all 0xff: to the end of the keyspace


def _target(endpoints: Sequence[str]) -> tuple[str, bool]:
    """(gRPC target, whether an endpoint asked for TLS with https://)."""
    tls = any(e.startswith("https://") for e in endpoints)
    hosts = [e.split("://", 1)[-1].rstrip("/") for e in endpoints]
    if len(hosts) == 1:
        return f"dns:///{hosts[0]}", tls
    # Several endpoints: gRPC fails over between them when given as one address list.
    return "ipv4:" + ",".join(hosts), tls


def _compare(raw: bytes, expect: int) -> Any:
    """The etcd condition "the key's revision is `expect`" (0: the key is absent)."""
    if expect == 0:
        return rpc.Compare(key=raw, result=rpc.Compare.CompareResult.EQUAL,
                           target=rpc.Compare.CompareTarget.CREATE, create_revision=0)
    return rpc.Compare(key=raw, result=rpc.Compare.CompareResult.EQUAL,
                       target=rpc.Compare.CompareTarget.MOD, mod_revision=expect)


def _put_all_request(writes: list[tuple[bytes, Write]]) -> Any:
    """One transaction of every (raw key, write): each `expect` compared, the puts on
    success, on failure a read of each compared key (to say which one changed)."""
    checked = [(raw, w.expect) for raw, w in writes if w.expect is not None]
    return rpc.TxnRequest(
        compare=[_compare(raw, expect) for raw, expect in checked],
        success=[rpc.RequestOp(request_put=rpc.PutRequest(key=raw, value=bytes(w.value)))
                 for raw, w in writes],
        failure=[rpc.RequestOp(request_range=rpc.RangeRequest(key=raw, keys_only=True))
                 for raw, _ in checked])


def _found(kvs: Sequence[Any]) -> int | None:
    """The revision of the key a Range read (None: it is absent)."""
    return int(kvs[0].mod_revision) if kvs else None


def _describe(exc: grpc.aio.AioRpcError) -> str:
    code = exc.code()
    details = (exc.details() or "").splitlines()[0][:200] if exc.details() else ""
    name = code.name.lower().replace("_", " ") if code is not None else "error"
    return f"{name}: {details}" if details else name


class EtcdStore:
    """A Store in etcd. Keys are `prefix + key`; revisions are etcd's.

    An item's revision is its etcd mod_revision and the store's revision is the etcd
    cluster's, which also counts writes outside our prefix: revisions strictly increase
    but may skip numbers. Values are stored as given; `secret=True` changes nothing here
    (protect etcd itself: TLS, auth, no shared access).

    Every method may be called concurrently from the loop that first used the store
    (the gRPC channel binds to it). close() ends every watch, revokes every lease this
    client holds (its locks are freed at once) and closes the channel.
    """

    def __init__(self, settings: EtcdSettings) -> None:
        if not settings.endpoints:
            raise StoreError("etcd store: no endpoints configured")
        self.settings = settings
        self.where = ", ".join(settings.endpoints)
        self._prefix = settings.prefix.encode()
        self._timeout = settings.timeout
        self._channel: grpc.aio.Channel | None = None
        self._metadata: tuple[tuple[str, str], ...] = ()
        self._auth_lock = asyncio.Lock()
        self._closed = False
        self._watches: set[grpc.aio.StreamStreamCall] = set()
        self._leases: set[int] = set()
        self._password = ""
        if settings.username and settings.password_file:
            try:
                with open(settings.password_file, encoding="utf-8") as f:
                    self._password = f.read().strip()
            except OSError as exc:
                raise StoreError(f"etcd: cannot read password_file {settings.password_file}:"
                                 f" {exc.strerror}") from None
        self._holder = (f"node {settings.node}, " if settings.node else "") + \
            f"pid {os.getpid()} on {socket.gethostname()}"

    def __repr__(self) -> str:
        return f"EtcdStore({self.where!r}, prefix={self.settings.prefix!r})"

    # -- the channel -----------------------------------------------------------------------

    def _open_channel(self) -> grpc.aio.Channel:
        if self._closed:  # never a new channel after close(): nothing would close it
            raise StoreError("the store is closed")
        if self._channel is None:
            target, want_tls = _target(self.settings.endpoints)
            s = self.settings
            if want_tls or s.ca or s.cert:
                def read(path: str | None) -> bytes | None:
                    if path is None:
                        return None
                    with open(path, "rb") as f:
                        return f.read()
                try:
                    creds = grpc.ssl_channel_credentials(read(s.ca), read(s.key), read(s.cert))
                except OSError as exc:
                    raise StoreError(f"etcd at {self.where}: cannot read TLS files: {exc}"
                                     ) from None
                self._channel = grpc.aio.secure_channel(target, creds, _CHANNEL_OPTIONS)
            else:
                self._channel = grpc.aio.insecure_channel(target, _CHANNEL_OPTIONS)
        return self._channel

    async def _authenticate(self) -> None:
        if not self.settings.username:
            return
        stub = rpc.AuthStub(self._open_channel())
        response = await stub.Authenticate(
            rpc.AuthenticateRequest(name=self.settings.username, password=self._password),
            timeout=self._timeout)
        self._metadata = (("token", response.token),)

    async def _call(self, op: str, what: str, fn: Callable[[], Awaitable[T]]) -> T:
        """Run one etcd call: timed, authenticated (again once if the token expired),
        with gRPC errors turned into StoreError naming the endpoint and the operation."""
        if self._closed:
            raise StoreError("the store is closed")
        started = time.monotonic()
        try:
            for attempt in (1, 2):
                try:
                    if not self._metadata and self.settings.username:
                        async with self._auth_lock:
                            if not self._metadata:
                                await self._authenticate()
                    return await fn()
                except grpc.aio.AioRpcError as exc:
                    token_expired = "invalid auth token" in (exc.details() or "")
                    if attempt == 1 and token_expired and self.settings.username:
                        self._metadata = ()
                        continue
                    metrics.STORE_ERRORS.labels(op).inc()
                    if exc.code() in (grpc.StatusCode.UNAVAILABLE,
                                      grpc.StatusCode.DEADLINE_EXCEEDED):
                        raise StoreError(f"cannot reach etcd at {self.where}: "
                                         f"{_describe(exc)} ({what})") from None
                    raise StoreError(f"etcd at {self.where}: cannot {what}: "
                                     f"{_describe(exc)}") from None
            raise AssertionError("unreachable")
        finally:
            metrics.STORE_OP_SECONDS.labels(op).observe(time.monotonic() - started)

    async def _unary(self, op: str, what: str, method: Callable[..., Awaitable[T]],
                     request: Any) -> T:
        """One unary call, `method` a stub's (`self._kv().Range`), through _call: the
        token is read when the call is made, so a retry after re-authenticating sends
        the new one."""
        async def call() -> T:
            return await method(request, timeout=self._timeout, metadata=self._metadata)
        return await self._call(op, what, call)

    def _kv(self) -> Any:
        return rpc.KVStub(self._open_channel())

    def _lease_stub(self) -> Any:
        return rpc.LeaseStub(self._open_channel())

    def _key(self, key: str) -> bytes:
        split_key(key)
        return self._prefix + key.encode()

    def _unkey(self, raw: bytes) -> str:
        return raw[len(self._prefix):].decode()

    # -- reads -----------------------------------------------------------------------------

    async def get(self, key: str) -> Item | None:
        response = await self._unary("get", f"read {key}", self._kv().Range,
                                     rpc.RangeRequest(key=self._key(key)))
        if not response.kvs:
            return None
        kv = response.kvs[0]
        return Item(key, bytes(kv.value), kv.mod_revision)

    async def get_many(self, keys: Sequence[str]) -> list[Item | None]:
        """The items of `keys`, in their order: a transaction per MAX_WRITES keys, up to
        _READS_IN_FLIGHT of them at once."""
        chunks = [keys[at:at + MAX_WRITES] for at in range(0, len(keys), MAX_WRITES)]
        found: list[Item | None] = []
        for at in range(0, len(chunks), _READS_IN_FLIGHT):
            for part in await asyncio.gather(*map(self._get_chunk,
                                                  chunks[at:at + _READS_IN_FLIGHT])):
                found += part
        return found

    async def _get_chunk(self, chunk: Sequence[str]) -> list[Item | None]:
        request = rpc.TxnRequest(success=[
            rpc.RequestOp(request_range=rpc.RangeRequest(key=self._key(key)))
            for key in chunk])
        response = await self._unary("get", f"read {chunk[0]} and {len(chunk) - 1} more",
                                     self._kv().Txn, request)
        return [Item(key, bytes(kvs[0].value), kvs[0].mod_revision) if (
                    kvs := answer.response_range.kvs) else None
                for key, answer in zip(chunk, response.responses, strict=True)]

    async def revision(self) -> int:
        # The cheapest request that returns the cluster's header revision.
        response = await self._unary("revision", "read the revision", self._kv().Range,
                                     rpc.RangeRequest(key=self._prefix, limit=1,
                                                      count_only=True))
        return int(response.header.revision)

    async def scan(self, prefix: str) -> list[Item]:
        check_prefix(prefix)
        return [Item(self._unkey(kv.key), bytes(kv.value), kv.mod_revision)
                for kv in await self._range(prefix, keys_only=False)]

    async def keys(self, prefix: str) -> list[str]:
        check_prefix(prefix)
        return [self._unkey(kv.key) for kv in await self._range(prefix, keys_only=True)]

    def scan_pages(self, prefix: str, *, after: str = "", before: str = "", page: int = 0
                   ) -> AsyncIterator[list[Item]]:
        check_prefix(prefix)
        span = self._span(prefix, after, before)
        if page:
            return self._item_pages(prefix, span, page)
        return self._bounded_pages(prefix, span)

    def _span(self, prefix: str, after: str, before: str) -> tuple[bytes, bytes]:
        """[start, end) of the keys under `prefix`, after `after`, before `before`."""
        start = self._prefix + prefix.encode()
        end = _range_end(start)
        if after:
            start = max(start, self._prefix + after.encode() + b"\0")
        if before:
            end = min(end, self._prefix + before.encode())
        return start, end

    async def _item_pages(self, prefix: str, span: tuple[bytes, bytes], page: int
                          ) -> AsyncIterator[list[Item]]:
        unkey = self._unkey
        async for _, kvs in self._pages(prefix, span, page=page, keys_only=False):
            yield [Item(unkey(kv.key), bytes(kv.value), kv.mod_revision) for kv in kvs]

    async def _bounded_pages(self, prefix: str, span: tuple[bytes, bytes]
                             ) -> AsyncIterator[list[Item]]:
        """Pages of _BIG_PAGE, each read over its own exact key range. etcd 3.4 walks a
        range whole however small its limit (it gathers every key of the range, then
        cuts): paging from a key to the prefix's end cost the rest of the prefix per
        page, 50 million keys walked for a million domains (36 s, measured). A keys-only
        walk in pages of _BOUNDS first marks where each page starts (10 calls for a
        million), all at that walk's revision."""
        starts, end, revision = await self._bounds(prefix, span)
        unkey = self._unkey
        for at, start in enumerate(starts):
            stop = starts[at + 1] if at + 1 < len(starts) else end
            response = await self._unary(
                "scan", f"scan {prefix!r}", self._kv().Range,
                rpc.RangeRequest(key=start, range_end=stop, revision=revision))
            if response.kvs:
                yield [Item(unkey(kv.key), bytes(kv.value), kv.mod_revision)
                       for kv in response.kvs]

    async def _bounds(self, prefix: str, span: tuple[bytes, bytes]
                      ) -> tuple[list[bytes], bytes, int]:
        """(the first key of every _BIG_PAGE keys in `span`, its end, the revision)."""
        starts: list[bytes] = []
        seen, revision = 0, 0
        async for read_at, kvs in self._pages(prefix, span, page=_BOUNDS, keys_only=True):
            starts += [kv.key for kv in kvs[(-seen) % _BIG_PAGE::_BIG_PAGE]]
            seen += len(kvs)
            revision = read_at
        return starts, span[1], revision

    async def _range(self, prefix: str, *, keys_only: bool) -> list[Any]:
        """Every key-value under `prefix` (see _pages)."""
        found: list[Any] = []
        async for _, kvs in self._pages(prefix, self._span(prefix, "", ""), page=_PAGE,
                                        keys_only=keys_only):
            found.extend(kvs)
        return found

    async def _pages(self, prefix: str, span: tuple[bytes, bytes], *, page: int,
                     keys_only: bool) -> AsyncIterator[tuple[int, Sequence[Any]]]:
        """(revision, key-values) of `span`, `page` per Range call, all read at the first
        call's revision (one consistent view however long the caller takes)."""
        start, end = span
        if start >= end:
            return
        revision = 0
        while True:
            # No sort_order: etcd returns a range in key order anyway, and any sort
            # order (even ASCEND by KEY) makes etcd 3.4 read the whole range for every
            # page and truncate after: a 100,000-domain start-up took 48 s (measured).
            request = rpc.RangeRequest(key=start, range_end=end, limit=page,
                                       revision=revision, keys_only=keys_only)
            response = await self._unary("scan", f"scan {prefix!r}", self._kv().Range,
                                         request)
            revision = revision or response.header.revision
            if response.kvs:
                yield revision, response.kvs
            if not response.more or not response.kvs:
                return
            start = response.kvs[-1].key + b"\0"

    # -- writes ----------------------------------------------------------------------------

    async def put(self, key: str, value: bytes, *, expect: int | None = None,
                  secret: bool = False) -> int:
        raw = self._key(key)
        request = rpc.PutRequest(key=raw, value=bytes(value))
        if expect is None:
            response = await self._unary("put", f"write {key}", self._kv().Put, request)
            return int(response.header.revision)
        response = await self._txn("put", f"write {key}", raw, expect,
                                   rpc.RequestOp(request_put=request))
        return int(response.header.revision)

    async def delete(self, key: str, *, expect: int | None = None) -> bool:
        raw = self._key(key)
        request = rpc.DeleteRangeRequest(key=raw)
        if expect is None:
            response = await self._unary("delete", f"delete {key}", self._kv().DeleteRange,
                                         request)
            return bool(response.deleted)
        response = await self._txn("delete", f"delete {key}", raw, expect,
                                   rpc.RequestOp(request_delete_range=request))
        return bool(response.responses[0].response_delete_range.deleted)

    async def put_all(self, writes: Sequence[Write]) -> int:
        if len(writes) > MAX_WRITES or len({w.key for w in writes}) != len(writes):
            raise StoreError(f"put_all takes at most {MAX_WRITES} writes of distinct keys")
        request = _put_all_request([(self._key(w.key), w) for w in writes])
        what = f"write {writes[0].key} and {len(writes) - 1} more" if writes else "write"
        response = await self._unary("put", what, self._kv().Txn, request)
        if response.succeeded:
            return int(response.header.revision)
        checked = [w for w in writes if w.expect is not None]
        for write, answer in zip(checked, response.responses, strict=True):
            assert write.expect is not None
            error = conflict(write.key, write.expect, _found(answer.response_range.kvs))
            if error is not None:
                raise error
        raise ConflictError(f"{what}: changed during the transaction")

    async def _txn(self, op: str, what: str, raw: bytes, expect: int, then: Any) -> Any:
        """`then` if the key's revision is `expect` (0: absent), else ConflictError."""
        compare = _compare(raw, expect)
        request = rpc.TxnRequest(
            compare=[compare], success=[then],
            failure=[rpc.RequestOp(request_range=rpc.RangeRequest(key=raw, keys_only=True))])
        response = await self._unary(op, what, self._kv().Txn, request)
        if response.succeeded:
            return response
        key = self._unkey(raw)
        raise (conflict(key, expect, _found(response.responses[0].response_range.kvs))
               or ConflictError(f"{key}: changed during the transaction"))

    # -- watch -----------------------------------------------------------------------------

    async def watch(self, prefix: str, after: int) -> AsyncIterator[Event]:
        """One etcd watch stream from revision `after + 1`: etcd replays what was missed,
        in order, then streams new changes. A lost connection ends it with StoreError (the
        caller resumes from the last revision it applied); close() ends it quietly."""
        check_prefix(prefix)
        if self._closed:
            raise StoreError("the store is closed")
        start = self._prefix + prefix.encode()
        create = rpc.WatchCreateRequest(key=start, range_end=_range_end(start),
                                        start_revision=after + 1)
        call = None
        try:
            try:
                if self.settings.username and not self._metadata:
                    await self._call("watch", "authenticate", self._authenticate)
                call = rpc.WatchStub(self._open_channel()).Watch(metadata=self._metadata)
                self._watches.add(call)
                await call.write(rpc.WatchRequest(create_request=create))
                while True:
                    for event in self._events(await call.read()):
                        yield event
            except grpc.aio.AioRpcError as exc:
                metrics.STORE_ERRORS.labels("watch").inc()
                raise StoreError(f"etcd watch at {self.where} lost: {_describe(exc)}"
                                 ) from None
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if self._closed and (task is None or not task.cancelling()):
                    return  # close() cancelled the call, not someone our task
                raise
        finally:
            if call is not None:
                self._watches.discard(call)
                call.cancel()

    def _events(self, response: Any) -> list[Event]:
        """The changes one watch response carries; Compacted, or StoreError when etcd
        ended or cancelled the watch."""
        if response is grpc.aio.EOF:
            raise StoreError(f"etcd at {self.where} ended the watch")
        if response.compact_revision:
            raise Compacted(response.compact_revision)
        if response.canceled:
            raise StoreError(f"etcd at {self.where} cancelled the watch: "
                             f"{response.cancel_reason or 'no reason given'}")
        delete = rpc.Event.EventType.DELETE
        return [Event(self._unkey(e.kv.key), None if e.type == delete else bytes(e.kv.value),
                      e.kv.mod_revision) for e in response.events]

    # -- locks -----------------------------------------------------------------------------

    async def lock(self, name: str, *, ttl: float, wait: float = 0.0) -> EtcdLease:
        """Creates `locks/<name>` attached to a new lease of max(ttl, 2 s): the creating
        write's revision is the fencing token; the key goes when the lease does."""
        key = LOCKS + name
        if len(split_key(key)) != 2:
            raise StoreError(f"invalid lock name {name[:80]!r}: one key segment, no '/'")
        raw = self._key(key)
        lease_ttl = max(MIN_LEASE_TTL, math.ceil(ttl))
        value = json.dumps({"holder": self._holder, "taken_at": time.time(),
                            "ttl": lease_ttl}).encode()
        started = time.monotonic()
        deadline = started + wait
        pause = _LOCK_POLL[0]
        while True:
            lease_id = await self._grant(lease_ttl)
            request = rpc.TxnRequest(
                compare=[rpc.Compare(key=raw, result=rpc.Compare.CompareResult.EQUAL,
                                     target=rpc.Compare.CompareTarget.CREATE,
                                     create_revision=0)],
                success=[rpc.RequestOp(request_put=rpc.PutRequest(key=raw, value=value,
                                                                  lease=lease_id))],
                failure=[rpc.RequestOp(request_range=rpc.RangeRequest(key=raw))])
            try:
                response = await self._unary("lock", f"take lock {name}", self._kv().Txn,
                                             request)
            except StoreError:
                await self._revoke(lease_id)
                raise
            if response.succeeded:
                metrics.STORE_LOCK_WAIT_SECONDS.observe(time.monotonic() - started)
                return EtcdLease(self, raw, lease_id, int(response.header.revision))
            await self._revoke(lease_id)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                kvs = response.responses[0].response_range.kvs
                metrics.STORE_LOCK_TIMEOUTS.inc()
                raise LockTimeout(f"lock {name} is held by {self._describe_holder(kvs)}; "
                                  f"gave up after {wait:g} s")
            await asyncio.sleep(min(pause, remaining))
            pause = min(pause * 2, _LOCK_POLL[1])

    @staticmethod
    def _describe_holder(kvs: Sequence[Any]) -> str:
        if not kvs:
            return "another client (just released)"
        try:
            record = json.loads(kvs[0].value)
            return str(record.get("holder", "another client"))
        except ValueError:
            return "another client"

    async def _grant(self, ttl: int) -> int:
        response = await self._unary("lease", "grant a lease", self._lease_stub().LeaseGrant,
                                     rpc.LeaseGrantRequest(TTL=ttl))
        self._leases.add(response.ID)
        return int(response.ID)

    async def _revoke(self, lease_id: int) -> None:
        """Revoke (deleting the keys attached to it); a lease already gone is fine."""
        self._leases.discard(lease_id)

        async def call() -> Any:
            try:
                return await self._lease_stub().LeaseRevoke(
                    rpc.LeaseRevokeRequest(ID=lease_id), timeout=self._timeout,
                    metadata=self._metadata)
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.NOT_FOUND:
                    return None
                raise
        await self._call("release", "release a lease", call)

    async def _keepalive(self, lease_id: int) -> int:
        """One keep-alive: the lease's remaining TTL, 0 when it has expired."""
        async def call() -> Any:
            stream = self._lease_stub().LeaseKeepAlive(timeout=self._timeout,
                                                       metadata=self._metadata)
            try:
                await stream.write(rpc.LeaseKeepAliveRequest(ID=lease_id))
                return await stream.read()
            finally:
                stream.cancel()
        response = await self._call("refresh", "refresh a lease", call)
        return 0 if response is grpc.aio.EOF else int(response.TTL)

    async def _owns(self, raw: bytes, lease_id: int) -> bool:
        response = await self._unary("refresh", "read a lock", self._kv().Range,
                                     rpc.RangeRequest(key=raw))
        return bool(response.kvs) and response.kvs[0].lease == lease_id

    async def health(self) -> str:
        """One line about the etcd member we talk to (version, leader, db size)."""
        status = await self._unary("status", "read its status",
                                   rpc.MaintenanceStub(self._open_channel()).Status,
                                   rpc.StatusRequest())
        leader = "has a leader" if status.leader else "NO LEADER"
        return (f"etcd {status.version} at {self.where}: {leader}, raft term "
                f"{status.raftTerm}, db {status.dbSize / 1e6:.1f} MB")

    async def close(self) -> None:
        if self._closed:
            return
        for lease_id in list(self._leases):
            try:
                await self._revoke(lease_id)
            except StoreError as exc:
                log.warning("could not release a lease at close (it expires by itself): "
                            "%s", exc)
        self._closed = True
        for call in list(self._watches):
            call.cancel()
        if self._channel is not None:
            await self._channel.close(grace=0.5)


class EtcdLease:
    """A lock held in an EtcdStore. `token` is the revision that created the lock key."""

    __slots__ = ("_lease_id", "_raw", "_store", "token")

    def __init__(self, store: EtcdStore, raw: bytes, lease_id: int, token: int) -> None:
        self._store, self._raw, self._lease_id = store, raw, lease_id
        self.token = token

    def __repr__(self) -> str:
        return f"EtcdLease({self._store._unkey(self._raw)!r}, token={self.token})"

    async def refresh(self) -> bool:
        """Keep the lease alive; False once it expired or the key is no longer ours."""
        if self._lease_id not in self._store._leases:
            return False  # released
        if await self._store._keepalive(self._lease_id) <= 0:
            self._store._leases.discard(self._lease_id)
            return False
        return await self._store._owns(self._raw, self._lease_id)

    async def release(self) -> None:
        """Revoking the lease deletes the lock key if (and only if) it is still ours."""
        if self._lease_id in self._store._leases:
            await self._store._revoke(self._lease_id)
