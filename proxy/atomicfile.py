"""Durable file writes: a reader sees the old file or the new one, never a part.

The one copy of the write-then-rename dance, shared by the keys and CSRs of `certs/`,
the admin token, the pid file and the file store's records and change log. A file is
created with its final mode (0600 by default: most of them hold secrets), never
chmod-ed afterwards, and fsync-ed with its folder, so a crash or a power cut leaves a
whole file behind.
"""

from __future__ import annotations

import contextlib
import os

_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make the folder's entries (a file created, renamed or removed in it) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_new(path: str | os.PathLike[str], data: bytes, *, mode: int = 0o600) -> None:
    """Create `path` with `mode` (replacing what a writer that died left there) holding
    `data`, durably. Not atomic by itself: write_atomic renames it into place."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    fd = os.open(path, _FLAGS, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str | os.PathLike[str], data: bytes, *, mode: int = 0o600,
                 tmp: str | None = None) -> None:
    """Replace `path` with `data`: a temporary file beside it (`tmp`, default
    `.<name>.<pid>.tmp`) written and fsync-ed, renamed over it, then its folder fsync-ed.
    """
    target = os.fspath(path)
    folder, name = os.path.split(target)
    if tmp is None:
        tmp = os.path.join(folder, f".{name}.{os.getpid()}.tmp")
    try:
        write_new(tmp, data, mode=mode)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(folder or ".")
