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

import contextlib
import os
import secrets
from collections.abc import Iterable

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
    body = log[entries_at:log.rfind(b"\n") + 1]  # a crashed writer may leave half a line
    lines = body.split(b"\n")[:-1]
    last = base + len(lines)
    if not base <= after <= last:
        return None
    # Revisions are contiguous (line i holds base + 1 + i), so the lines after `after`
    # start at a known index; check the first one instead of parsing them all.
    start = after - base
    if start < len(lines) and not lines[start].startswith(b"%d " % (after + 1)):
        raise ValueError("change log revisions are not contiguous")
    wanted = prefix.encode()
    changed: set[str] = set()
    for line in lines[start:]:
        key = line.split(b" ", 2)[2]
        if key.startswith(wanted):
            changed.add(key.decode())
    return last, changed
