"""FileStore: the Store contract on one local directory, shared by every process of a node.

Owns the on-disk layout (records, change log, inter-process lock). It never logs a value,
never creates a file anyone but the owner can read, and does its file I/O in threads.

Layout of the store directory (0700; every file 0600, created so, never chmod-ed):

    lock          flock(2) target: LOCK_EX around every write, LOCK_SH around log reads
    changes.log   "tlsedge-changes 1 <base>\\n", then one "<revision> put|del <key>\\n" per
                  write; revisions are contiguous from base+1, so the last line is the
                  store's revision and `revision - base` is the number of entries kept
    data/         one file per record: `certs/a.example/acme` -> data/certs.d/a.example.d/acme.rec
                  holding "tlsedge-record 1 <revision> <length>\\n" + the raw value
    checkpoints/  `<segment>.ckpt`: every record under `<segment>/` at one revision, in one
                  file (store/checkpoint.py). A scan of a whole segment reads it and then
                  only the records the change log names after that revision: 100,000
                  certificates cost one sequential read (~0.3 s) instead of a walk over
                  200,000 files (~3 s warm, far more cold). Rewritten when the log is
                  compacted and when a scan finds it far behind (once that scan's
                  caller has its pages: serve first, checkpoint after); never needed for
                  correctness (missing, damaged or too old: the scan walks the files,
                  reading ahead: 100,000 domains in ~2 s from a cold page cache).

Distinct suffixes (".d", ".rec", ".tmp") keep a key and the keys below it (`a`, `a/b`) and
temporary files from ever sharing a name. A write, under LOCK_EX: append + fdatasync the
log entry (an intent), then tmp file + fsync + rename + fsync of the directory. A writer
killed in between consumed a revision without changing the record; readers and watchers
treat that entry as a no-op (the record's own revision is older than the entry's).
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import contextlib
import fcntl
import functools
import json
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ParamSpec, TypeVar

from proxy.atomicfile import fsync_dir, write_atomic, write_new
from proxy.errors import LockTimeout, StoreError
from proxy.store import checkpoint
from proxy.store.base import MAX_WRITES, Compacted, Event, Item, Write, conflict
from proxy.store.keys import MAX_KEY
from proxy.store.keys import check_prefix as _check_prefix
from proxy.store.keys import split_key as _split_key
from proxy.store.records import LOCKS

log = logging.getLogger("tlsedge.store.files")

_LOG_MAGIC = b"tlsedge-changes 1 "
_REC_MAGIC = b"tlsedge-record 1 "
_REC, _DIR, _TMP = ".rec", ".d", ".tmp"
_TAIL = 4096
_LOCK_POLL = 0.05
_PAGE = 10_000  # items per page of scan_pages
_BATCH = 4096  # log entries handled per LOCK_SH hold, so a catching-up watcher never
#                holds writers off for long
_READ_MAX = 1 << 20
_FIRST_READ = 1 << 16  # bytes of a record file's first read (most records are < 4 KiB)
_AHEAD = 128  # record files a walk opens and starts reading ahead of the one it reads
_ENTRY_MAX = MAX_KEY + 32  # bytes of a change-log line at most: revision, op, key
# A scan that walked a segment of at least this many records, or replayed more changed
# keys than this on top of its checkpoint, writes a fresh checkpoint (outside the lock).
_CHECKPOINT_AFTER = 1_000

P = ParamSpec("P")
T = TypeVar("T")


def _encode_record(revision: int, value: bytes) -> bytes:
    return b"%s%d %d\n" % (_REC_MAGIC, revision, len(value)) + value


def _open_record(path: str) -> int | None:
    """A descriptor of the record file at `path`, or None when there is none."""
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        return None


def _read_open(fd: int, path: str, *, header_only: bool = False) -> tuple[int, bytes]:
    """(revision, value) of the record file open at `fd` (which this closes).

    One read(2) for a whole record up to _FIRST_READ bytes (a short read of a regular
    file is its end): half the cost of a buffered file object, which a walk over
    100,000 records pays 100,000 times."""
    try:
        data = os.read(fd, 64 if header_only else _FIRST_READ)
        if len(data) == _FIRST_READ and not header_only:
            chunks = [data]
            while chunk := os.read(fd, _READ_MAX):
                chunks.append(chunk)
            data = b"".join(chunks)
    finally:
        os.close(fd)
    return _parse_record(path, data, header_only)


def _read_record(path: str, *, header_only: bool = False) -> tuple[int, bytes] | None:
    """(revision, value) of the record file at `path`, or None when there is none."""
    fd = _open_record(path)
    return None if fd is None else _read_open(fd, path, header_only=header_only)


def _read_records(paths: Iterable[str]) -> Iterator[tuple[int, bytes] | None]:
    """_read_record of each path, in order, with the reads of the next _AHEAD files
    started (POSIX_FADV_WILLNEED on a descriptor opened ahead) before each one waits
    for its own: on a cold page cache (a store restored from a backup, a node after a
    reboot) the disk then serves them together, not one at a time (~90 us a record
    file -> ~20 us, measured; no slower warm)."""
    ahead: collections.deque[tuple[str, int | None]] = collections.deque()
    try:
        for path in paths:
            fd = _open_record(path)
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
            ahead.append((path, fd))
            if len(ahead) > _AHEAD:
                path, fd = ahead.popleft()
                yield None if fd is None else _read_open(fd, path)
        while ahead:
            path, fd = ahead.popleft()
            yield None if fd is None else _read_open(fd, path)
    finally:  # stopped early (or a damaged record): the descriptors opened ahead
        for _, fd in ahead:
            if fd is not None:
                os.close(fd)


def _parse_record(path: str, data: bytes, header_only: bool) -> tuple[int, bytes]:
    nl = data.find(b"\n", 0, 64)
    try:
        if nl < 0 or not data.startswith(_REC_MAGIC):
            raise ValueError
        revision, length = (int(x) for x in data[len(_REC_MAGIC):nl].split())
    except ValueError:
        raise StoreError(f"record file {path} is not a tlsedge record") from None
    value = data[nl + 1:]
    if not header_only and len(value) != length:
        raise StoreError(f"record file {path} is damaged ({len(value)} of {length} bytes)")
    return revision, value


def _item_key(item: Item) -> str:
    return item.key


def _parse_entry(line: bytes) -> tuple[int, bool, str]:
    """(revision, deleted, key) of one change-log line."""
    revision, op, key = line.split(b" ", 2)
    return int(revision), op == b"del", key.decode()


@dataclass(frozen=True, slots=True)
class _Tail:
    base: int
    revision: int
    good_size: int  # where the last complete line ends
    last_key: str | None
    last_deleted: bool = False


_DAMAGED_LOG = "the store's changes.log is damaged"


def _read_header(fd: int) -> tuple[int, int]:
    """(base revision, where the entries start) of the change log open at `fd`."""
    head = os.pread(fd, 64, 0)
    nl = head.find(b"\n")
    try:
        if nl < 0 or not head.startswith(_LOG_MAGIC):
            raise ValueError
        return int(head[len(_LOG_MAGIC):nl]), nl + 1
    except ValueError:
        raise StoreError(_DAMAGED_LOG) from None


def _read_tail(fd: int) -> _Tail:
    """The log's base and revision, read from its header and its last complete line."""
    base, entries = _read_header(fd)
    size = os.fstat(fd).st_size
    start = max(entries, size - _TAIL)
    window = os.pread(fd, size - start, start)
    end = window.rfind(b"\n")
    prev = window.rfind(b"\n", 0, max(end, 0))
    if end < 0 or prev < 0:
        if start != entries:  # no complete entry in a window wider than any entry
            raise StoreError(_DAMAGED_LOG)
        if end < 0:
            return _Tail(base, base, start, None)
    try:
        revision, deleted, key = _parse_entry(window[prev + 1:end])
    except ValueError:
        raise StoreError(_DAMAGED_LOG) from None
    return _Tail(base, revision, start + end + 1, key, deleted)


class FileStore:
    """A Store on a local directory, safe to open from many processes at once.

    Thread and loop safety: every method may be called concurrently from one loop (or
    several loops and processes); each write takes the directory's flock for itself.
    `secret=True` changes nothing here: every file is 0600 already. Values are never
    logged. close() ends every watch of this instance.
    """

    def __init__(self, path: str | Path, *, poll_interval: float = 0.1,
                 keep_changes: int = 100_000) -> None:
        if keep_changes < 2:
            raise StoreError("keep_changes must be at least 2")
        self._root = str(Path(path).absolute())
        self._data = os.path.join(self._root, "data")
        self._lock_path = os.path.join(self._root, "lock")
        self._checkpoints = os.path.join(self._root, "checkpoints")
        self._log_path = os.path.join(self._root, "changes.log")
        self._poll_interval = poll_interval
        self._keep_changes = keep_changes
        self._closed = False
        try:
            self._setup()
        except OSError as exc:
            raise StoreError(f"cannot open the store at {self._root}: {exc}") from None

    @classmethod
    async def open(cls, path: str | Path, *, poll_interval: float = 0.1,
                   keep_changes: int = 100_000) -> FileStore:
        """The constructor, run in a thread."""
        return await asyncio.to_thread(cls, path, poll_interval=poll_interval,
                                       keep_changes=keep_changes)

    def __repr__(self) -> str:
        return f"FileStore({self._root!r})"

    def _setup(self) -> None:
        for d in (self._root, self._data):
            with contextlib.suppress(FileExistsError):
                os.mkdir(d, 0o700)
        if os.stat(self._root).st_mode & 0o077:
            log.warning("store directory %s is accessible to other users; it should be 0700",
                        self._root)
        with self._flock(fcntl.LOCK_EX):
            if not os.path.exists(self._log_path):
                self._replace_log(_LOG_MAGIC + b"0\n")

    # -- the inter-process lock ------------------------------------------------------------

    @contextlib.contextmanager
    def _flock(self, mode: int) -> Iterator[None]:
        # A descriptor per use: flock belongs to the open file description, so threads of
        # one process exclude each other only through descriptors of their own.
        fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, mode)
            yield
        finally:
            os.close(fd)  # releases the flock

    async def _call(self, what: str, fn: Callable[P, T], *args: P.args,
                    **kwargs: P.kwargs) -> T:
        if self._closed:
            raise StoreError("the store is closed")
        try:
            return await asyncio.to_thread(fn, *args, **kwargs)
        except OSError as exc:
            raise StoreError(f"store {self._root}: cannot {what}: {exc.strerror or exc}"
                             ) from None

    # -- paths -----------------------------------------------------------------------------

    def _dir_of(self, parts: list[str]) -> str:
        return os.path.join(self._data, *(p + _DIR for p in parts))

    def _record_path(self, parts: list[str]) -> str:
        return os.path.join(self._dir_of(parts[:-1]), parts[-1] + _REC)

    # -- reads -----------------------------------------------------------------------------

    async def get(self, key: str) -> Item | None:
        path = self._record_path(_split_key(key))
        found = await self._call(f"read {key}", _read_record, path)
        return None if found is None else Item(key, found[1], found[0])

    async def get_many(self, keys: Sequence[str]) -> list[Item | None]:
        paths = [self._record_path(_split_key(key)) for key in keys]
        return await self._call(f"read {len(keys)} records", self._get_many_sync, list(keys),
                                paths)

    @staticmethod
    def _get_many_sync(keys: list[str], paths: list[str]) -> list[Item | None]:
        return [None if record is None else Item(key, record[1], record[0])
                for key, record in zip(keys, _read_records(paths), strict=True)]

    async def scan(self, prefix: str) -> list[Item]:
        _check_prefix(prefix)
        return await self._call(f"scan {prefix!r}", self._scan_sync, prefix)

    def scan_pages(self, prefix: str, *, after: str = "", before: str = "", page: int = 0
                   ) -> AsyncIterator[list[Item]]:
        """A segment's checkpoint is read a page at a time (its index held, each value
        read with its page), merged with the records the log changed after it; other
        prefixes (inside one segment, or across segments) are read whole first."""
        _check_prefix(prefix)
        return self._pages(prefix, after, before, page or _PAGE)

    async def _pages(self, prefix: str, after: str, before: str, page: int
                     ) -> AsyncIterator[list[Item]]:
        what = f"scan {prefix!r}"
        pager = await self._call(what, self._pager, prefix, after)
        # The next page is read (in a thread) while the caller folds this one in.
        taking = asyncio.ensure_future(self._call(what, pager.take, page))
        try:
            while items := await taking:
                if before and items[-1].key >= before:
                    if kept := [i for i in items if i.key < before]:
                        yield kept
                    return
                taking = asyncio.ensure_future(self._call(what, pager.take, page))
                yield items
        finally:
            if not taking.done():
                with contextlib.suppress(StoreError, asyncio.CancelledError):
                    await taking  # the pager is one reader's: let its read end first
            pager.close()

    def _pager(self, prefix: str, after: str) -> _ListPager | _CheckpointPager:
        """Serve first, checkpoint after: a checkpoint this scan finds worth writing is
        written once its caller is done with the pages (the pager's close), so that a
        node starting on a store without checkpoints has its names first, not the disk
        and CPU busy writing them."""
        head, slash, rest = prefix.partition("/")
        if slash and not rest:
            pager = self._checkpoint_pager(head, after)
            if pager is not None:
                return pager
            items, write = self._read_segment(head)
            return _ListPager(items, after, then=write)
        return _ListPager(self._scan_sync(prefix), after)

    def _checkpoint_pager(self, segment: str, after: str) -> _CheckpointPager | None:
        """None when the segment has no usable checkpoint (then it is read whole)."""
        reader = checkpoint.Reader.open(self._checkpoint_path(segment))
        if reader is None:
            return None
        try:
            with self._flock(fcntl.LOCK_SH):
                found = self._changes_since(segment, reader.revision)
                if found is None:  # the log no longer reaches it
                    reader.close()
                    return None
                changed = {key: self._item(key) for key in found[1]}
        except BaseException:
            reader.close()
            raise
        refresh = None
        if len(changed) > _CHECKPOINT_AFTER:  # the next scans should replay less
            refresh = functools.partial(self._scan_segment, segment)
        reader.skip_to(after)
        return _CheckpointPager(reader, after, changed, then=refresh)

    def _item(self, key: str) -> Item | None:
        record = _read_record(self._record_path(key.split("/")))
        return None if record is None else Item(key, record[1], record[0])

    async def keys(self, prefix: str) -> list[str]:
        _check_prefix(prefix)
        found = await self._call(f"list {prefix!r}", self._walk, prefix)
        return [key for key, _ in found]

    async def revision(self) -> int:
        return await self._call("read the revision", self._revision_sync)

    def _revision_sync(self) -> int:
        # Under LOCK_SH: a write in flight has logged its revision before its record is in
        # place; revision() must not return it, or scan() after it could miss that write.
        with self._flock(fcntl.LOCK_SH):
            fd = os.open(self._log_path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                return _read_tail(fd).revision
            finally:
                os.close(fd)

    def _walk(self, prefix: str) -> list[tuple[str, str]]:
        """(key, file path) of every record whose key starts with `prefix`, sorted."""
        head, _, partial = prefix.rpartition("/")
        start = self._dir_of(head.split("/")) if head else self._data
        found: list[tuple[str, str]] = []
        stack = [(start, head + "/" if head else "", partial)]
        while stack:
            directory, key_prefix, want = stack.pop()
            try:
                entries = list(os.scandir(directory))
            except (FileNotFoundError, NotADirectoryError):
                continue  # removed by a delete meanwhile
            for entry in entries:
                name = entry.name
                if name.endswith(_REC):
                    segment = name[:-len(_REC)]
                    if segment.startswith(want):
                        found.append((key_prefix + segment, entry.path))
                elif name.endswith(_DIR):
                    segment = name[:-len(_DIR)]
                    if segment.startswith(want):
                        stack.append((entry.path, key_prefix + segment + "/", ""))
        found.sort()
        return found

    def _read_walk(self, prefix: str) -> list[Item]:
        found = self._walk(prefix)
        records = _read_records([path for _, path in found])
        return [Item(key, record[1], record[0])
                for (key, _), record in zip(found, records, strict=True) if record is not None]

    def _scan_sync(self, prefix: str) -> list[Item]:
        head, slash, rest = prefix.partition("/")
        if rest:  # inside one segment (say one domain's certificates): few files
            return self._read_walk(prefix)
        if slash:
            return self._scan_segment(head)
        items = []
        for segment in self._segments(head):
            items += self._scan_segment(segment)
        with contextlib.suppress(FileNotFoundError):
            for entry in os.scandir(self._data):  # one-segment keys ("domains") are files
                name = entry.name
                if name.endswith(_REC) and name.startswith(head):
                    record = _read_record(entry.path)
                    if record is not None:
                        items.append(Item(name[:-len(_REC)], record[1], record[0]))
        items.sort(key=_item_key)
        return items

    def _segments(self, partial: str) -> list[str]:
        """Top-level key segments starting with `partial` (with records or a checkpoint)."""
        names: set[str] = set()
        for directory, suffix in ((self._data, _DIR), (self._checkpoints, checkpoint.SUFFIX)):
            with contextlib.suppress(FileNotFoundError):
                for entry in os.scandir(directory):
                    if entry.name.endswith(suffix) and entry.name.startswith(partial):
                        names.add(entry.name[:-len(suffix)])
        return sorted(names)

    def _checkpoint_path(self, segment: str) -> str:
        return os.path.join(self._checkpoints, segment + checkpoint.SUFFIX)

    def _scan_segment(self, segment: str) -> list[Item]:
        """_read_segment, its checkpoint (if one is due) written in the background."""
        items, write = self._read_segment(segment)
        if write is not None:
            _in_background(write)
        return items

    def _read_segment(self, segment: str) -> tuple[list[Item], Callable[[], None] | None]:
        """Every record under `segment/`: its checkpoint (or a lock-free walk at a revision
        read first), then, under LOCK_SH, the records the log names after that revision.
        A write that lands during the walk logs its entry after that revision, so the
        catch-up re-reads its key: the result is the store as of the log's last entry.
        Also the fresh checkpoint to write when the walk was long or the replay many
        (None otherwise): the caller runs it once it has used the items, in the
        background (a node starting up would wait ~0.5 s more for 130 MB and an fsync)."""
        found = checkpoint.read(self._checkpoint_path(segment))
        walked = found is None
        if found is None:
            found = self._revision_sync(), self._read_walk(segment + "/")
        with self._flock(fcntl.LOCK_SH):
            caught_up = self._catch_up(segment, *found)
            if caught_up is None:  # the log was compacted past it: walk again, locked
                caught_up = self._tail_locked(), self._read_walk(segment + "/"), 0
                walked = True
        revision, items, replayed = caught_up
        if (walked and len(items) >= _CHECKPOINT_AFTER) or replayed > _CHECKPOINT_AFTER:
            return items, functools.partial(self._write_checkpoint, segment, revision, items)
        return items, None

    def _tail_locked(self) -> int:
        fd = os.open(self._log_path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            return _read_tail(fd).revision
        finally:
            os.close(fd)

    def _catch_up(self, segment: str, after: int, items: list[Item]
                  ) -> tuple[int, list[Item], int] | None:
        """(revision, items, keys re-read): `items` (the segment at `after`) brought up to
        the log's last entry; None when the log no longer covers `after`. The caller
        holds the lock (shared or exclusive)."""
        found = self._changes_since(segment, after)
        if found is None:
            return None
        revision, changed = found
        if not changed:
            return revision, items, 0
        merged = [item for item in items if item.key not in changed]
        for key in changed:
            item = self._item(key)
            if item is not None:
                merged.append(item)
        merged.sort(key=_item_key)
        return revision, merged, len(changed)

    def _changes_since(self, segment: str, after: int) -> tuple[int, set[str]] | None:
        """(the log's last revision, the keys under `segment/` it names after `after`);
        None when the log no longer covers `after`. The caller holds the lock."""
        fd = os.open(self._log_path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            base, entries_at = _read_header(fd)
            data = os.pread(fd, os.fstat(fd).st_size, 0)
        finally:
            os.close(fd)
        try:
            return checkpoint.changed_since(data, entries_at, base, after, segment + "/")
        except (ValueError, IndexError):
            raise StoreError(_DAMAGED_LOG) from None

    def _write_checkpoint(self, segment: str, revision: int, items: list[Item]) -> None:
        try:
            with contextlib.suppress(FileExistsError):
                os.mkdir(self._checkpoints, 0o700)
            checkpoint.write(self._checkpoint_path(segment), revision, items)
        except OSError as exc:  # an accelerator only: scans walk the files meanwhile
            log.warning("store checkpoint of %s/ not written: %s", segment,
                        exc.strerror or exc)

    async def checkpoint(self) -> None:
        """Write a fresh checkpoint of every segment now (FileStore only, not the Store
        protocol: for tools that just wrote many records, like the benchmark seeder)."""
        await self._call("write checkpoints", self._checkpoint_all)

    def _checkpoint_all(self) -> None:
        with self._flock(fcntl.LOCK_SH):
            self._checkpoint_locked(self._tail_locked(), older_than=None)

    def _checkpoint_locked(self, revision: int, older_than: int | None) -> None:
        """Checkpoint, at `revision` (the log's last), every segment whose checkpoint is
        missing or older than `older_than` (None: every segment). Caller holds the lock.
        A segment of fewer than _CHECKPOINT_AFTER records gets none: walking it is cheap."""
        for segment in self._segments(""):
            path = self._checkpoint_path(segment)
            found = checkpoint.read(path)
            if found is not None and older_than is not None and found[0] >= older_than:
                continue
            caught_up = None if found is None else self._catch_up(segment, *found)
            items = caught_up[1] if caught_up is not None else self._read_walk(segment + "/")
            if len(items) >= _CHECKPOINT_AFTER:
                self._write_checkpoint(segment, revision, items)
            elif found is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
        checkpoint.remove_stale_temporaries(self._checkpoints, time.time() - 600)

    # -- writes ----------------------------------------------------------------------------

    async def put(self, key: str, value: bytes, *, expect: int | None = None,
                  secret: bool = False) -> int:
        parts = _split_key(key)
        revision = await self._call(f"write {key}", self._write_sync, key, parts,
                                    bytes(value), expect)
        assert revision is not None
        return revision

    async def delete(self, key: str, *, expect: int | None = None) -> bool:
        parts = _split_key(key)
        revision = await self._call(f"delete {key}", self._write_sync, key, parts, None,
                                    expect)
        return revision is not None

    def _write_sync(self, key: str, parts: list[str], value: bytes | None,
                    expect: int | None) -> int | None:
        with self._flock(fcntl.LOCK_EX):
            return self._write_locked(key, parts, value, expect)

    def _open_log(self) -> tuple[int, _Tail]:
        """The change log open for appending (under LOCK_EX) and its tail, after undoing
        what a writer that died mid-append or mid-write left."""
        fd = os.open(self._log_path, os.O_RDWR | os.O_APPEND | os.O_CLOEXEC)
        try:
            tail = _read_tail(fd)
            if tail.good_size != os.fstat(fd).st_size:  # a writer died mid-append
                os.ftruncate(fd, tail.good_size)
            if tail.last_key is not None and not self._applied(tail):
                self._remove_temporaries(fd, tail)  # the last writer died mid-write
        except BaseException:
            os.close(fd)
            raise
        return fd, tail

    def _applied(self, tail: _Tail) -> bool:
        """Whether the log's last entry is in place. A put_all puts its records in place
        in the order it logged them, so then every earlier one is too."""
        assert tail.last_key is not None
        found = _read_record(self._record_path(tail.last_key.split("/")), header_only=True)
        if tail.last_deleted:
            return found is None or found[0] > tail.revision
        return found is not None and found[0] >= tail.revision

    def _remove_temporaries(self, fd: int, tail: _Tail) -> None:
        """Remove the temporary file a writer that died left beside one of its records:
        any of the keys of the last MAX_WRITES entries (a put_all writes that many; its
        death may come at any of them, not only at the last one logged)."""
        _, entries = _read_header(fd)
        start = max(entries, tail.good_size - MAX_WRITES * _ENTRY_MAX)
        lines = os.pread(fd, tail.good_size - start, start).splitlines()
        for line in lines[-MAX_WRITES:]:
            parts = line.rsplit(b" ", 1)[-1].decode(errors="replace").split("/")
            with contextlib.suppress(FileNotFoundError, NotADirectoryError):
                os.unlink(os.path.join(self._dir_of(parts[:-1]), parts[-1] + _TMP))

    @staticmethod
    def _expected(key: str, path: str, expect: int | None) -> tuple[int, bytes] | None:
        """The record's header at `path`; ConflictError when `expect` does not hold."""
        found = _read_record(path, header_only=True)
        error = None if expect is None else conflict(key, expect,
                                                     None if found is None else found[0])
        if error is not None:
            raise error
        return found

    def _write_locked(self, key: str, parts: list[str], value: bytes | None,
                      expect: int | None) -> int | None:
        """Write or delete (value None) under LOCK_EX; the new revision, or None when a
        delete found nothing to delete."""
        path = self._record_path(parts)
        fd, tail = self._open_log()
        try:
            found = self._expected(key, path, expect)
            if value is None and found is None:
                return None
            revision = tail.revision + 1
            op = b"put" if value is not None else b"del"
            os.write(fd, b"%d %s %s\n" % (revision, op, key.encode()))
            os.fdatasync(fd)
            if value is None:
                self._remove_record(parts, path)
            else:
                directory = self._make_dirs(parts[:-1])
                write_atomic(path, _encode_record(revision, value),
                             tmp=os.path.join(directory, parts[-1] + _TMP))
            if revision - tail.base > self._keep_changes:
                try:
                    self._compact(fd, revision)
                except OSError as exc:  # the write itself is done; the next one retries
                    log.warning("store change log compaction failed: %s", exc)
            return revision
        finally:
            os.close(fd)

    async def put_all(self, writes: Sequence[Write]) -> int:
        if len(writes) > MAX_WRITES or len({w.key for w in writes}) != len(writes):
            raise StoreError(f"put_all takes at most {MAX_WRITES} writes of distinct keys")
        batch = [(w, _split_key(w.key)) for w in writes]
        what = f"write {writes[0].key} and {len(writes) - 1} more" if writes else "write"
        return await self._call(what, self._put_all_sync, batch)

    def _put_all_sync(self, batch: list[tuple[Write, list[str]]]) -> int:
        """One LOCK_EX hold, one log append and fdatasync for the whole batch, then the
        records (each its own revision, as single writes get), then their folders."""
        with self._flock(fcntl.LOCK_EX):
            fd, tail = self._open_log()
            try:
                paths = [self._record_path(parts) for _, parts in batch]
                for (write, _), path in zip(batch, paths, strict=True):
                    self._expected(write.key, path, write.expect)
                if not batch:
                    return tail.revision
                first = tail.revision + 1
                os.write(fd, b"".join(b"%d put %s\n" % (first + i, w.key.encode())
                                      for i, (w, _) in enumerate(batch)))
                os.fdatasync(fd)
                folders = set()
                for i, ((write, parts), path) in enumerate(zip(batch, paths, strict=True)):
                    folder = self._make_dirs(parts[:-1])
                    tmp = os.path.join(folder, parts[-1] + _TMP)
                    write_new(tmp, _encode_record(first + i, bytes(write.value)))
                    os.replace(tmp, path)
                    folders.add(folder)
                for folder in folders:  # once each, not once per record
                    fsync_dir(folder)
                revision = first + len(batch) - 1
                if revision - tail.base > self._keep_changes:
                    try:
                        self._compact(fd, revision)
                    except OSError as exc:  # the writes are done; the next one retries
                        log.warning("store change log compaction failed: %s", exc)
                return revision
            finally:
                os.close(fd)

    def _make_dirs(self, parts: list[str]) -> str:
        directory = self._data
        for part in parts:
            parent, directory = directory, os.path.join(directory, part + _DIR)
            try:
                os.mkdir(directory, 0o700)
            except FileExistsError:
                continue
            fsync_dir(parent)
        return directory

    def _remove_record(self, parts: list[str], path: str) -> None:
        os.unlink(path)
        directory = os.path.dirname(path)
        fsync_dir(directory)
        # Empty directories go too (safe: every writer holds LOCK_EX), so deleted domains
        # leave nothing behind for scans to walk.
        while directory != self._data:
            try:
                os.rmdir(directory)
            except OSError:
                break
            directory = os.path.dirname(directory)

    def _replace_log(self, content: bytes) -> None:
        write_atomic(self._log_path, content, tmp=self._log_path + _TMP)

    def _compact(self, fd: int, revision: int) -> None:
        """Keep the newest half of the change log (under LOCK_EX), after checkpointing
        every segment whose checkpoint the shorter log would no longer reach."""
        keep_from = revision - self._keep_changes // 2 + 1
        self._checkpoint_locked(revision, older_than=keep_from - 1)
        size = os.fstat(fd).st_size
        lines = os.pread(fd, size, 0).split(b"\n")
        base = int(lines[0][len(_LOG_MAGIC):])
        kept = lines[keep_from - base:]  # line i holds revision base + i
        self._replace_log(_LOG_MAGIC + b"%d\n" % (keep_from - 1) + b"\n".join(kept))
        log.info("store change log compacted: kept revisions %d to %d", keep_from, revision)

    # -- watch -----------------------------------------------------------------------------

    async def watch(self, prefix: str, after: int) -> AsyncIterator[Event]:
        """Tails changes.log (a stat every poll_interval; reads only when it changed).

        A batch of log entries (start, end] is read under LOCK_SH, so each of them belongs
        to a finished write or to one whose writer died (which changed nothing). For each
        key named in the batch the record as it is now decides, not the entries:
        - record with revision in (start, end]: yield it, with its own revision;
        - record newer than end: skip, a later batch holds its entry;
        - record at or before start: the watcher has it already (later writes died);
        - no record: yield a delete at the batch's last delete of the key, if any (else
          a later batch holds the delete, or the put died on an absent key).
        So after the batch caught up with the log, the watcher holds exactly what scan()
        returns, revisions only go up, and every revision is yielded at most once. Values a
        key took in between inside one batch are skipped, not replayed.
        """
        _check_prefix(prefix)
        if self._closed:
            raise StoreError("the store is closed")
        cursor = _LogCursor(self, after)
        while not self._closed:
            if cursor.may_have_news():
                events, more = await self._call("read the change log", cursor.read, prefix)
                for event in events:
                    yield event
                if more:
                    continue
            await asyncio.sleep(self._poll_interval)

    # -- locks -----------------------------------------------------------------------------

    async def lock(self, name: str, *, ttl: float, wait: float = 0.0) -> FileLease:
        """Takes `locks/<name>` when absent or expired: that write's revision is the token."""
        parts = _split_key(LOCKS + name)
        if len(parts) != 2:
            raise StoreError(f"invalid lock name {name[:80]!r}: one key segment, no '/'")
        owner = secrets.token_hex(16)
        deadline = time.monotonic() + wait
        while True:
            token, holder = await self._call(f"take lock {name}", self._acquire_sync, parts,
                                             owner, ttl)
            if token is not None:
                return FileLease(self, parts, owner, token, ttl)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise LockTimeout(f"lock {name} is held by {holder}; gave up after {wait:g} s")
            await asyncio.sleep(min(_LOCK_POLL, remaining))

    def _lock_record(self, parts: list[str]) -> dict[str, object] | None:
        found = _read_record(self._record_path(parts))
        if found is None:
            return None
        try:
            record = json.loads(found[1])
            if isinstance(record, dict):
                return record
        except ValueError:
            pass
        raise StoreError(f"lock record {'/'.join(parts)} is damaged; delete it to free the lock")

    def _lock_value(self, owner: str, ttl: float) -> bytes:
        holder = f"pid {os.getpid()} on {socket.gethostname()}"
        return json.dumps({"owner": owner, "holder": holder,
                           "expires": time.time() + ttl}).encode()

    def _acquire_sync(self, parts: list[str], owner: str, ttl: float
                      ) -> tuple[int | None, str]:
        with self._flock(fcntl.LOCK_EX):
            record = self._lock_record(parts)
            now = time.time()
            if record is not None:
                expires = record.get("expires")
                if isinstance(expires, float | int) and expires > now:
                    return None, f"{record.get('holder')} for {expires - now:.1f} s more"
            revision = self._write_locked("/".join(parts), parts,
                                          self._lock_value(owner, ttl), None)
            assert revision is not None
            return revision, ""

    def _renew_sync(self, parts: list[str], owner: str, ttl: float | None) -> bool:
        """Extend (ttl) or release (None) the lock if `owner` still holds it."""
        with self._flock(fcntl.LOCK_EX):
            record = self._lock_record(parts)
            if record is None or record.get("owner") != owner:
                return False
            value = None if ttl is None else self._lock_value(owner, ttl)
            self._write_locked("/".join(parts), parts, value, None)
            return True

    async def close(self) -> None:
        self._closed = True


def _in_background(work: Callable[[], object]) -> None:
    threading.Thread(target=work, name="store-checkpoint", daemon=True).start()


class _ListPager:
    """scan_pages over a scan read whole; `then` runs in the background once closed."""

    def __init__(self, items: list[Item], after: str,
                 then: Callable[[], object] | None = None) -> None:
        self._items = items
        self._next = bisect.bisect_right(items, after, key=_item_key) if after else 0
        self._then = then

    def take(self, count: int) -> list[Item]:
        start = self._next
        self._next = min(start + count, len(self._items))
        return self._items[start:self._next]

    def close(self) -> None:
        self._items = []
        then, self._then = self._then, None
        if then is not None:
            _in_background(then)


class _CheckpointPager:
    """scan_pages over a segment's checkpoint: its items in key order, except those the
    log changed after it (`changed`: key -> the record now, None if deleted), whose
    current records are merged in at their place. `then` runs in the background once
    closed."""

    def __init__(self, reader: checkpoint.Reader, after: str,
                 changed: dict[str, Item | None],
                 then: Callable[[], object] | None = None) -> None:
        self._reader = reader
        self._then = then
        self._stale = changed.keys()
        self._fresh = sorted((i for i in changed.values() if i is not None and i.key > after),
                             key=_item_key)
        self._fresh_next = 0
        self._ready: list[Item] = []
        self._done = False

    def take(self, count: int) -> list[Item]:
        while len(self._ready) < count and not self._done:
            chunk = self._reader.take(count)
            fresh, at = self._fresh, self._fresh_next
            if chunk:
                end = bisect.bisect_right(fresh, chunk[-1].key, lo=at, key=_item_key)
                stale = self._stale
                merged = [i for i in chunk if i.key not in stale]
            else:
                end, merged, self._done = len(fresh), [], True
            if end > at:
                merged += fresh[at:end]
                merged.sort(key=_item_key)
            self._fresh_next = end
            self._ready += merged
        page, self._ready = self._ready[:count], self._ready[count:]
        return page

    def close(self) -> None:
        self._reader.close()
        then, self._then = self._then, None
        if then is not None:
            _in_background(then)


class FileLease:
    """A lock held in a FileStore. `token` is the revision that took it (fencing)."""

    __slots__ = ("_owner", "_parts", "_store", "_ttl", "token")

    def __init__(self, store: FileStore, parts: list[str], owner: str, token: int,
                 ttl: float) -> None:
        self._store, self._parts, self._owner, self._ttl = store, parts, owner, ttl
        self.token = token

    def __repr__(self) -> str:
        return f"FileLease({self._parts[-1]!r}, token={self.token})"

    async def refresh(self) -> bool:
        """Extends by ttl from now; True while still ours, even if it had expired unseen."""
        return await self._store._call("refresh a lock", self._store._renew_sync,
                                       self._parts, self._owner, self._ttl)

    async def release(self) -> None:
        await self._store._call("release a lock", self._store._renew_sync, self._parts,
                                self._owner, None)


class _LogCursor:
    """A watcher's place in changes.log: which file (inode), how far, the last revision.

    It opens the log for each read instead of keeping a descriptor: a watch cancelled
    while its read runs in a thread must not close a descriptor that thread still uses.
    """

    def __init__(self, store: FileStore, after: int) -> None:
        self._store = store
        self.position = after  # every change up to here has been handled
        self._inode = self._base = -1
        self._offset = 0

    def may_have_news(self) -> bool:
        """One stat(2) on the loop: has the log grown or been replaced since the last read?"""
        try:
            st = os.stat(self._store._log_path)
        except OSError:
            return True  # let read() report it
        return st.st_ino != self._inode or st.st_size != self._offset

    def _first_after(self, fd: int, base: int, entries: int) -> int:
        """Where the entry after `position` starts in the log open at `fd`: found by one
        search (a watcher started from a recent revision, like a worker from its
        snapshot, would otherwise parse, under the lock, the up to keep_changes entries
        it has applied already). The entries' start when unsure: then read() parses
        from there and reports a damaged log."""
        if self.position == base:
            return entries
        log = os.pread(fd, os.fstat(fd).st_size, 0)
        end = log.rfind(b"\n") + 1
        at = log.find(b"\n%d " % (self.position + 1), entries - 1, end)
        if at >= 0:
            return at + 1
        last = log[log.rfind(b"\n", entries - 1, end - 1) + 1:end - 1] if end > entries else b""
        if last and last.split(b" ", 1)[0] == b"%d" % self.position:
            return end  # every entry there is applied: read from the next one on
        return entries

    def read(self, prefix: str) -> tuple[list[Event], bool]:
        """The next batch of events and whether more entries are waiting."""
        store = self._store
        with store._flock(fcntl.LOCK_SH):
            fd = os.open(store._log_path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                # (inode, base) names one log file: a compaction replaces the file and
                # raises the base, even should a later file get an old inode number.
                base, entries = _read_header(fd)
                if (os.fstat(fd).st_ino, base) != (self._inode, self._base):
                    if self.position < base:
                        raise Compacted(base + 1)
                    self._inode, self._base = os.fstat(fd).st_ino, base
                    self._offset = self._first_after(fd, base, entries)
                data = os.pread(fd, _READ_MAX, self._offset)
            finally:
                os.close(fd)
            complete = data[:data.rfind(b"\n") + 1]  # a crashed writer may leave half a line
            start = self.position
            changed: dict[str, int | None] = {}  # key -> its last delete in this batch
            count = used = 0
            for line in complete.splitlines(keepends=True):
                if count == _BATCH:
                    break
                used += len(line)
                try:
                    revision, deleted, key = _parse_entry(line[:-1])
                except ValueError:
                    raise StoreError(_DAMAGED_LOG) from None
                if revision <= self.position:
                    continue  # seen before: the log was replaced by a compaction
                if revision != self.position + 1:
                    raise StoreError(f"the store's changes.log skips from revision "
                                     f"{self.position} to {revision}")
                self.position = revision
                count += 1
                if key.startswith(prefix):
                    changed[key] = revision if deleted else changed.get(key)
            self._offset += used
            events = []
            for key, last_delete in changed.items():
                found = _read_record(store._record_path(key.split("/")))
                if found is None:
                    if last_delete is not None:
                        events.append(Event(key, None, last_delete))
                elif start < found[0] <= self.position:
                    events.append(Event(key, found[1], found[0]))
        events.sort(key=lambda e: e.revision)
        return events, used < len(complete) or len(data) == _READ_MAX
