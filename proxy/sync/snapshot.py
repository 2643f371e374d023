"""The supervisor's read of the store, handed to its workers (one read per node).

The supervisor reads the store once, page by page (Store.scan_pages), into its own
briefs (sync/briefs.py) and, for its workers, into a SnapshotFile: an anonymous memory
file (memfd: never on disk, so key material stays in memory as it does in a worker)
that every worker process inherits. A worker builds its StoreState from it instead of
scanning the store itself, then follows the store's watch from the snapshot's revision.
A worker the supervisor restarts starts from the same file, and replays only the
revisions since; the supervisor writes a fresh one (a new read) once those grow many.

The file is a series of sections, each a msgpack document:

- `names` (first, at the read's revision): the domains by app, the apps and the
  challenges: what a worker needs before it serves.
- `certs` and `pem` (pages of certificate metadata and key material), only when the
  store holds at most store.resident_certificates domains, then `end`.

A worker learns where each section is from a pipe the supervisor writes one line to
per section (`<kind> <offset> <length>`, then `end`): it serves as soon as it has the
names, and fills certificates in when they come (the supervisor goes on reading them
while the workers start).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import mmap
import os
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass

import msgspec

from proxy.store import records as rec
from proxy.store.base import Item, Store
from proxy.sync.briefs import BriefState
from proxy.sync.state import StoreState, no_gc

log = logging.getLogger("tlsedge.sync")

NAMES, CERTS, PEM, END, APPLIED = "names", "certs", "pem", "end", "applied"
# Items per certificate section: ~0.6 MB of key material, decoded in ~2 ms.
SECTION_ITEMS = 500


class Names(msgspec.Struct, array_like=True):
    """The `names` section."""

    revision: int
    domains: dict[str, list[str]]  # app -> its domains
    apps: list[tuple[str, bytes]]  # store items (key, value)
    challenges: list[tuple[str, bytes]]


_names = msgspec.msgpack.Decoder(Names)
_items = msgspec.msgpack.Decoder(list[tuple[str, bytes]])
_encode = msgspec.msgpack.Encoder().encode


@dataclass(frozen=True, slots=True)
class Section:
    kind: str
    offset: int
    length: int

    def line(self) -> bytes:
        return b"%s %d %d\n" % (self.kind.encode(), self.offset, self.length)

    @classmethod
    def parse(cls, line: bytes) -> Section:
        kind, offset, length = line.split()
        return cls(kind.decode(), int(offset), int(length))


class SnapshotFile:
    """Supervisor side: the memfd, sections appended in order. `listeners` hear of
    each section published (the workers' pipes)."""

    def __init__(self) -> None:
        self.fd = os.memfd_create("tlsedge-snapshot", os.MFD_CLOEXEC)
        self.size = 0
        self.sections: list[Section] = []
        self.revision = 0
        self.complete = False
        self.listeners: list[Callable[[bytes], None]] = []

    def append(self, kind: str, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.pwrite(self.fd, view, self.size + len(data) - len(view)):]
        section = Section(kind, self.size, len(data))
        self.size += len(data)
        self.sections.append(section)
        self._tell(section.line())

    def finish(self) -> None:
        self.complete = True
        self._tell(END.encode() + b"\n")

    def _tell(self, line: bytes) -> None:
        for listener in list(self.listeners):
            listener(line)

    def lines(self) -> bytes:
        """What a worker started now is told at once."""
        told = b"".join(s.line() for s in self.sections)
        return told + (END.encode() + b"\n" if self.complete else b"")

    def hand_over(self, applied: int = 0) -> tuple[int, int]:
        """(the memfd, the read end of a pipe announcing its sections) for a worker about
        to be started: the caller passes both to it, then closes the pipe's end. The
        sections published so far are in the pipe already; the others follow.
        `applied`: the revision the supervisor has applied, which the worker's watch
        reaches before it serves (so a worker restarted long after the snapshot serves
        nothing older than what the node served)."""
        read, write = os.pipe()
        os.set_blocking(write, False)  # a line never waits on a worker (they are tiny)
        try:
            os.write(write, b"%s %d\n" % (APPLIED.encode(), applied) + self.lines())
        except OSError:
            os.close(read)
            os.close(write)
            raise
        if self.complete:
            os.close(write)
        else:
            self.listeners.append(_PipeWriter(self, write))
        return self.fd, read

    def close(self) -> None:
        for listener in list(self.listeners):
            if isinstance(listener, _PipeWriter):
                listener.close()
        with contextlib.suppress(OSError):
            os.close(self.fd)


class _PipeWriter:
    """One worker's pipe while its snapshot is still being written."""

    def __init__(self, snapshot: SnapshotFile, fd: int) -> None:
        self.snapshot, self.fd = snapshot, fd

    def __call__(self, line: bytes) -> None:
        try:
            os.write(self.fd, line)
        except OSError:  # the worker is gone (or hopelessly behind): it asks nothing more
            self.close()
            return
        if line == END.encode() + b"\n":
            self.close()

    def close(self) -> None:
        if self in self.snapshot.listeners:
            self.snapshot.listeners.remove(self)
        with contextlib.suppress(OSError):
            os.close(self.fd)


class SnapshotKeeper:
    """The supervisor's current SnapshotFile. Once workers started from it would replay
    many changes (REBASE_CHANGES store changes a worker reads, or any after REBASE_AGE:
    a store may forget its history), `run` reads the store again into a new one, in
    the background: a worker restarted at any time starts in about a second."""

    REBASE_CHANGES = 10_000
    REBASE_AGE = 3600.0
    CHECK = 10.0

    def __init__(self, store: Store, *, resident: int, changes: Callable[[], int]) -> None:
        self.store = store
        self.resident = resident
        self.current = SnapshotFile()
        self._changes = changes  # changes a worker reads, applied so far (ever growing)
        self._base = 0
        self._made = time.monotonic()

    async def first_read(self, briefs: BriefState,
                         names_ready: Callable[[], Awaitable[None]]) -> None:
        self._base, self._made = self._changes(), time.monotonic()
        await read_node(self.store, self.current, resident=self.resident, briefs=briefs,
                        names_ready=names_ready)

    def hand_over(self, applied: int) -> tuple[int, int]:
        return self.current.hand_over(applied)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.CHECK)
            behind = self._changes() - self._base
            if behind >= self.REBASE_CHANGES or (
                    behind and time.monotonic() - self._made > self.REBASE_AGE):
                await self.rebase()

    async def rebase(self) -> None:
        fresh = SnapshotFile()
        base, made = self._changes(), time.monotonic()
        started = time.monotonic()
        try:
            await read_node(self.store, fresh, resident=self.resident)
        except BaseException:
            fresh.close()
            raise
        old, self.current = self.current, fresh
        self._base, self._made = base, made
        old.close()
        log.info("workers' snapshot read again at revision %d in %.1f s (%d MB)",
                 fresh.revision, time.monotonic() - started, fresh.size >> 20)


async def _nothing() -> None:
    pass


async def read_node(store: Store, snapshot: SnapshotFile, *, resident: int,
                    briefs: BriefState | None = None,
                    names_ready: Callable[[], Awaitable[None]] = _nothing) -> None:
    """The one read of the store a node makes: the workers' snapshot and (when given)
    the supervisor's briefs, from the same pages. `names_ready` is awaited once the
    names are published (the supervisor starts its workers then, and lets them have
    the CPU until they serve); certificates follow (only within `resident` domains),
    then statuses (briefs only). A rebase (no briefs) reads what workers need only."""
    snapshot.revision = revision = await store.revision()
    if briefs is not None:
        briefs.revision = revision
    domains: dict[str, list[str]] = {}
    count = 0
    async for items in store.scan_pages(rec.DOMAINS):
        with no_gc():
            for name, app in _domain_pages(items, briefs):
                domains.setdefault(app, []).append(name)
                count += 1
    apps = [(i.key, i.value) async for page in store.scan_pages(rec.APPS) for i in page]
    challenges = [(i.key, i.value)
                  async for page in store.scan_pages(rec.CHALLENGES) for i in page]
    snapshot.append(NAMES, _encode(Names(revision, domains, apps, challenges)))
    del domains
    await names_ready()
    within = count <= resident
    if not within:  # the workers read each certificate on first use: nothing to wait for
        snapshot.finish()
    if within or briefs is not None:
        async for items in store.scan_pages(rec.CERTS):
            if briefs is not None:
                briefs.load(rec.CERTS, items)
            if within:
                _append_items(snapshot, CERTS, items)
    if within:
        async for items in store.scan_pages(rec.PEM):
            _append_items(snapshot, PEM, items)
        snapshot.finish()
    if briefs is not None:
        async for items in store.scan_pages(rec.STATUS):
            briefs.load(rec.STATUS, items)


def _append_items(snapshot: SnapshotFile, kind: str, items: list[Item]) -> None:
    """A page as sections of SECTION_ITEMS items: a worker decodes one per loop turn."""
    for at in range(0, len(items), SECTION_ITEMS):
        snapshot.append(kind, _encode([(i.key, i.value) for i in items[at:at + SECTION_ITEMS]]))


def _domain_pages(items: list[Item], briefs: BriefState | None
                  ) -> Iterator[tuple[str, str]]:
    """(name, app) of a page of domain records: decoded once, into the briefs when
    given (the same name objects)."""
    if briefs is not None:
        yield from briefs.load_domains(items)
        return
    state = StoreState()
    state.load(rec.DOMAINS, items)
    yield from state.domains.items()


class SnapshotReader:
    """Worker side: the inherited memfd and the pipe that says where its sections are."""

    def __init__(self, fd: int, pipe: int) -> None:
        self.fd = fd
        self.pipe = pipe
        self.applied = 0  # the revision to reach before serving (SnapshotFile.hand_over)
        self._buffer = b""

    def next_section(self) -> Section | None:
        """The next section the pipe announces (blocking); None after `end` (or when
        the supervisor went away)."""
        while True:
            while b"\n" not in self._buffer:
                chunk = os.read(self.pipe, 4096)
                if not chunk:
                    return None
                self._buffer += chunk
            line, _, self._buffer = self._buffer.partition(b"\n")
            if line == END.encode():
                return None
            if line.startswith(APPLIED.encode() + b" "):
                self.applied = int(line.split()[1])
                continue
            return Section.parse(line)

    def read(self, section: Section) -> bytes:
        return os.pread(self.fd, section.length, section.offset)

    def names(self, section: Section, state: StoreState) -> None:
        """Fill `state` from the names section (mapped, not copied: at a million domains
        the section is ~40 MB)."""
        if section.kind != NAMES:
            raise ValueError(f"snapshot starts with a {section.kind} section")
        with mmap.mmap(self.fd, section.offset + section.length, prot=mmap.PROT_READ) as mm:
            view = memoryview(mm)
            try:
                names = _names.decode(view[section.offset:section.offset + section.length])
            finally:
                view.release()
        state.revision = names.revision
        intern = sys.intern
        with no_gc():
            for app, domains in names.domains.items():
                app = intern(app)
                if not state.domains:
                    state.domains = dict.fromkeys(domains, app)
                else:
                    state.domains.update(dict.fromkeys(domains, app))
                domains.clear()
            for key, value in (*names.apps, *names.challenges):
                state.apply(key, value)
        state.routes_touched = False

    def items(self, section: Section) -> list[Item]:
        revision = 0
        return [Item(key, value, revision) for key, value in _items.decode(self.read(section))]

    def close(self) -> None:
        for fd in (self.fd, self.pipe):
            with contextlib.suppress(OSError):
                os.close(fd)
