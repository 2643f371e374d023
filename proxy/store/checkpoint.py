"""FileStore checkpoints: every record of one top-level key segment at one revision, in
one file, so that a scan of 100,000 certificates is one sequential read instead of
100,000 small files. Owns the file format and the change-log replay; no locking here
(store/files.py decides when to call what). Never logs a value.

Format of `checkpoints/<segment>.ckpt` (0600, written to a temporary name, fsync-ed,
then renamed over the old one, so a reader sees a whole file or the previous one):

    "tlsedge-checkpoint 1 <revision> <count> <index length>\\n"
    <count> index lines "<revision> <value length> <key>\\n", sorted by key
    the <count> values, concatenated in index order

A checkpoint is only an accelerator: a file that is damaged, or older than what the
change log still holds, is ignored and the segment's record files are walked instead.
"""

from __future__ import annotations

import bisect
import contextlib
import os
import secrets
from collections.abc import Iterable
from typing import BinaryIO

from proxy.store.base import Item

MAGIC = b"tlsedge-checkpoint 1 "
SUFFIX = ".ckpt"
_TMP = ".tmp"
_BUFFER = 1 << 20  # values are read one by one through this buffer: no 100 MB bytes object


def read(path: str) -> tuple[int, list[Item]] | None:
    """(revision, items) of the checkpoint at `path`; None when absent or damaged."""
    try:
        f = open(path, "rb", buffering=_BUFFER)  # noqa: SIM115 (closed below)
    except (FileNotFoundError, NotADirectoryError):
        return None
    with f:
        try:
            head = f.readline(200)
            if not head.startswith(MAGIC) or not head.endswith(b"\n"):
                return None
            revision, count, index_length = (int(x) for x in head[len(MAGIC):].split())
            index = f.read(index_length)
            if len(index) != index_length or (count and not index.endswith(b"\n")):
                return None
            # Whole-index splits and maps run in C: ~1 us an item, Item() included.
            fields = index.decode().split()
            if len(fields) != 3 * count:
                return None
            keys = fields[2::3]
            revisions = list(map(int, fields[0::3]))
            sizes = list(map(int, fields[1::3]))
            read_value = f.read
            values = [read_value(size) for size in sizes]
            if sum(map(len, values)) != sum(sizes) or f.read(1):
                return None
            items = list(map(Item, keys, values, revisions))
        except ValueError:
            return None
    return revision, items


class Reader:
    """A checkpoint opened to be read a page at a time, in key order (FileStore's
    scan_pages): the index is held, each value is read when its page is taken. The
    open file stays readable when a newer checkpoint is renamed over it."""

    __slots__ = ("_f", "_next", "keys", "revision", "revisions", "sizes")

    def __init__(self, f: BinaryIO, revision: int, keys: list[str], revisions: list[int],
                 sizes: list[int]) -> None:
        self._f = f
        self.revision = revision
        self.keys = keys
        self.revisions = revisions
        self.sizes = sizes
        self._next = 0

    @classmethod
    def open(cls, path: str) -> Reader | None:
        """None when absent or damaged (its size is checked against its index)."""
        try:
            f = open(path, "rb", buffering=_BUFFER)  # noqa: SIM115 (closed by close())
        except (FileNotFoundError, NotADirectoryError):
            return None
        try:
            head = f.readline(200)
            if not head.startswith(MAGIC) or not head.endswith(b"\n"):
                raise ValueError
            revision, count, index_length = (int(x) for x in head[len(MAGIC):].split())
            index = f.read(index_length)
            fields = index.decode().split()
            if len(index) != index_length or len(fields) != 3 * count:
                raise ValueError
            sizes = list(map(int, fields[1::3]))
            if os.fstat(f.fileno()).st_size != len(head) + index_length + sum(sizes):
                raise ValueError
            return cls(f, revision, fields[2::3], list(map(int, fields[0::3])), sizes)
        except ValueError:
            f.close()
            return None

    def skip_to(self, after: str) -> None:
        """Start at the first key after `after`."""
        at = bisect.bisect_right(self.keys, after)
        self._f.seek(sum(self.sizes[self._next:at]), os.SEEK_CUR)
        self._next = at

    def take(self, count: int) -> list[Item]:
        """The next `count` items (fewer at the end; [] once done)."""
        start, end = self._next, min(self._next + count, len(self.keys))
        read = self._f.read
        values = [read(size) for size in self.sizes[start:end]]
        if sum(map(len, values)) != sum(self.sizes[start:end]):
            raise OSError("checkpoint file shrank while read")
        self._next = end
        return list(map(Item, self.keys[start:end], values, self.revisions[start:end]))

    def close(self) -> None:
        self._f.close()


def write(path: str, revision: int, items: Iterable[Item]) -> None:
    """Write a checkpoint of `items` (sorted by key) at `revision`, atomically and durably.

    Safe to run in several processes at once: each writes its own temporary file and the
    last rename wins (all of them describe the same store at their own revision).
    """
    items = list(items)
    index = b"".join([b"%d %d %s\n" % (i.revision, len(i.value), i.key.encode())
                      for i in items])
    tmp = f"{path}.{os.getpid()}-{secrets.token_hex(4)}{_TMP}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600)
    try:
        with os.fdopen(fd, "wb", buffering=_BUFFER, closefd=False) as f:
            f.write(b"%s%d %d %d\n" % (MAGIC, revision, len(items), len(index)))
            f.write(index)
            for item in items:
                f.write(item.value)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    os.close(fd)
    os.replace(tmp, path)


def remove_stale_temporaries(directory: str, older_than: float) -> None:
    """Temporary files left by a writer that died (mtime before `older_than`)."""
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(directory):
            if entry.name.endswith(_TMP):
                with contextlib.suppress(OSError):
                    if entry.stat().st_mtime < older_than:
                        os.unlink(entry.path)


def changed_since(log: bytes, entries_at: int, base: int, after: int,
                  prefix: str) -> tuple[int, set[str]] | None:
    """The log's last revision and the keys under `prefix` it names after `after`.

    `log` is the whole change log, its entries starting at byte `entries_at`, the first
    holding revision base + 1. None when the log does not cover every revision after
    `after` (compacted past it, or older than it). ValueError for a damaged log.
    """
    end = log.rfind(b"\n") + 1  # a crashed writer may leave half a line
    if after < base:
        return None
    # Revisions are contiguous (line i holds base + 1 + i): the lines after `after`
    # start at the line of revision after + 1, found by one search (a line starts after
    # a newline, and no key holds one) instead of splitting the whole log.
    if after == base:
        start = entries_at
    else:
        start = log.find(b"\n%d " % (after + 1), entries_at - 1, end)
        start = end if start < 0 else start + 1
    lines = log[start:end].split(b"\n")[:-1]
    if start == end:  # nothing after `after`: is `after` the last revision, or past it?
        last = base
        if end > entries_at:
            last_line = log[log.rfind(b"\n", entries_at - 1, end - 1) + 1:end - 1]
            last = int(last_line.split(b" ", 1)[0])
        return (last, set()) if after == last else None
    last = after + len(lines)
    if not lines[0].startswith(b"%d " % (after + 1)) or \
            not lines[-1].startswith(b"%d " % last):
        raise ValueError("change log revisions are not contiguous")
    wanted = prefix.encode()
    changed: set[str] = set()
    for line in lines:
        key = line.split(b" ", 2)[2]
        if key.startswith(wanted):
            changed.add(key.decode())
    return last, changed
