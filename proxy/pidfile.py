"""The running supervisor's pid file: `tlsedge.pid` in the store folder (`store.path`,
with either store backend), written when `run` starts and removed when it stops.

`tlsedge reload` (without `listen.admin`) signals the pid it names, and
`check-config` leaves the ports alone while it names a live tlsedge: that node
holds them. A pid is trusted only while /proc says it is a tlsedge supervisor, so a
stale file never gets an unrelated process signalled.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path

from proxy.atomicfile import write_atomic
from proxy.config import Config

NAME = "tlsedge.pid"
log = logging.getLogger("tlsedge")


def path(config: Config) -> Path:
    return Path(config.store.path) / NAME


def _is_supervisor(pid: int) -> bool:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    words = [os.path.basename(a.decode(errors="replace")) for a in argv]
    named = any(w in ("tlsedge", "proxy.cli", "proxy") for w in words)
    return named and any(w in ("run", "demo") for w in words)


def live_pid(config: Config) -> int | None:
    """The pid of the supervisor serving `config`'s store folder, or None."""
    try:
        text = path(config).read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None
    if not text.isdigit() or int(text) == os.getpid():
        return None
    pid = int(text)
    return pid if _is_supervisor(pid) else None


@contextlib.contextmanager
def held(config: Config) -> Iterator[None]:
    """Write our pid for as long as the block runs; a folder we cannot write to costs
    only the pid file (one warning), never the start."""
    file = path(config)
    written = False
    try:
        file.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        write_atomic(file, f"{os.getpid()}\n".encode(), mode=0o600)
        written = True
    except OSError as exc:
        log.warning("no pid file (%s: %s): `tlsedge reload` needs listen.admin to reach "
                    "this node", file, exc.strerror)
    try:
        yield
    finally:
        if written:
            with contextlib.suppress(OSError, ValueError):
                if int(file.read_text(encoding="ascii")) == os.getpid():
                    file.unlink()
