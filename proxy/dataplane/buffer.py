"""Bytes held for a slow peer: memory up to a bound, then an unlinked temp file.

A `Spool` is a FIFO of bytes, used for a request body read before a backend
connection is taken and for a response read from the backend faster than its client
takes it. Its first `memory` bytes stay in memory; past that they go to a temp file
(`tempfile.TemporaryFile`: created 0600 in the configured folder and unlinked at
once, so nothing is left behind whatever happens to the process), which grows at
most to `file_cap` bytes outstanding. This module also owns the worker's temp-file
space: the bytes in every spool's file, bounded by the caller's `space_cap`.

Reads and writes of a local file are blocking syscalls: each call here moves at most
`CHUNK` bytes, so none takes long. The producer stops (pauses its peer) when `full`
says so; a write is always accepted, so the bytes of one read already in flight are
never lost. A file that cannot be created or written (disk full, folder gone) is
logged once and the spool keeps the rest in memory and reports itself full, so the
producer waits for the consumer, as without buffering.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections import deque
from typing import IO

log = logging.getLogger("tlsedge.http")

# Most bytes one file read or write moves (one call stays well under a millisecond).
CHUNK = 64 * 1024


class _Space:
    """Bytes in this worker's temp files, all spools together."""

    __slots__ = ("used", "warned")

    def __init__(self) -> None:
        self.used = 0
        self.warned = False


SPACE = _Space()


class Spool:
    """Bytes in order: memory first, then the temp file, then (only after the file
    failed) memory again."""

    __slots__ = ("_file", "_head", "_read_at", "_tail", "_write_at", "file_cap", "folder",
                 "memory", "size", "space_cap", "spilled")

    def __init__(self, *, memory: int, file_cap: int, space_cap: int, folder: str) -> None:
        self.memory = memory
        self.file_cap = file_cap
        self.space_cap = space_cap
        self.folder = folder or None
        # Bytes held, wherever they are.
        self.size = 0
        # Whether a temp file was ever used (tests and the access log read it).
        self.spilled = False
        self._head: deque[bytes] = deque()
        self._file: IO[bytes] | None = None
        # The file holds the bytes [_read_at, _write_at); reset to 0 when emptied.
        self._read_at = 0
        self._write_at = 0
        # After a failed file write: the rest, in memory, behind the file's bytes.
        self._tail: deque[bytes] | None = None

    @property
    def in_file(self) -> int:
        return self._write_at - self._read_at

    @property
    def full(self) -> bool:
        """Whether the producer should wait for the consumer before writing more."""
        if self._tail is not None:
            return True
        if not self.in_file and self.size < self.memory:
            return False
        return self.in_file >= self.file_cap or SPACE.used >= self.space_cap

    def write(self, data: bytes) -> None:
        n = len(data)
        if not n:
            return
        self.size += n
        if self._tail is not None:
            self._tail.append(data)
        elif not self.in_file and self.size <= self.memory:
            self._head.append(data)
        else:
            self._to_file(data)

    def _to_file(self, data: bytes) -> None:
        view = memoryview(data)
        done = 0
        try:
            if self._file is None:
                self._file = tempfile.TemporaryFile(dir=self.folder)  # noqa: SIM115
                self.spilled = True
            fd = self._file.fileno()
            while done < len(view):
                written = os.pwrite(fd, view[done:done + CHUNK], self._write_at)
                self._write_at += written
                SPACE.used += written
                done += written
        except OSError as exc:
            if not SPACE.warned:
                SPACE.warned = True
                log.warning("cannot buffer in a temp file in %s (%s): slow clients now "
                            "hold their backend connection",
                            self.folder or tempfile.gettempdir(), exc.strerror or exc)
            # What reached the file stays readable from it; the rest waits behind it.
            self._tail = deque((data[done:],))

    def read(self) -> bytes:
        """The next piece (at most CHUNK bytes from the file); b"" when empty."""
        if self._head:
            data = self._head.popleft()
        elif self.in_file:
            assert self._file is not None
            want = min(CHUNK, self.in_file)
            data = os.pread(self._file.fileno(), want, self._read_at)
            if not data:
                raise OSError("temp file shorter than what was written to it")
            self._read_at += len(data)
            SPACE.used -= len(data)
            if self._read_at == self._write_at:
                # Emptied: start again at offset 0, and give the blocks back.
                os.ftruncate(self._file.fileno(), 0)
                self._read_at = self._write_at = 0
        elif self._tail:
            data = self._tail.popleft()
            if not self._tail:
                self._tail = None  # everything was read: the next write tries the file again
        else:
            return b""
        self.size -= len(data)
        return data

    def close(self) -> None:
        """Forget everything held (idempotent); the file's space is freed at once."""
        SPACE.used -= self.in_file
        self._read_at = self._write_at = 0
        self._head.clear()
        self._tail = None
        self.size = 0
        file, self._file = self._file, None
        if file is not None:
            file.close()
