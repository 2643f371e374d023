"""The supervisor's view of the store (BriefState): one compact brief per domain, and
the tallies kept from them as they change (Tally: domains by certificate in use and
status, the names in each status, certificate expiry by source, role and hour, the
soonest-expiring certificates), so that metrics, counts and filtered listings never
walk a million domains. The supervisor serves no TLS: no key material is kept here.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import itertools
import logging
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import ClassVar, TypeVar

import msgspec

from proxy.store import records as rec
from proxy.store.base import Item, Store
from proxy.sync.state import no_gc

log = logging.getLogger("tlsedge.sync")

HOUR = 3600.0
_WORKER_PREFIXES = (rec.DOMAINS, rec.APPS, rec.CHALLENGES, rec.CERTS, rec.PEM)
View = tuple[str, str]  # (in_use, status): what tlsedge_domains counts, what views show


class _Uncounted:
    """The type of UNCOUNTED."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "UNCOUNTED"


# `touched`'s "view before" of a domain the start-up read had found but not counted yet
# when an event changed it: a domain before, its view unknown (no View equals it).
UNCOUNTED = _Uncounted()


class CertBrief(msgspec.Struct, frozen=True, gc=False):
    """A certificate as the supervisor keeps it: its validity (the serving choice and
    the expiry tallies need no more; views read the record). 80 bytes where the
    record's metadata is ~0.7 kB decoded."""

    source: ClassVar[str] = ""
    not_before: float
    not_after: float


class CustomBrief(CertBrief, frozen=True, gc=False):
    source: ClassVar[str] = "custom"


class AcmeBrief(CertBrief, frozen=True, gc=False):
    source: ClassVar[str] = "acme"


class _CertHead(msgspec.Struct, frozen=True, gc=False):
    """The fields of a certificate record a brief is made of (msgspec skips the rest)."""

    source: str
    not_before: float
    not_after: float


class _DomainHead(msgspec.Struct, frozen=True, gc=False):
    app: str
    letsencrypt: bool = True


class _StatusHead(msgspec.Struct, frozen=True, gc=False):
    state: str


_cert_head = msgspec.json.Decoder(_CertHead).decode
_domain_head = msgspec.json.Decoder(_DomainHead).decode
_status_head = msgspec.json.Decoder(_StatusHead).decode


def cert_brief(value: bytes) -> CertBrief:
    head = _cert_head(value)
    kind = CustomBrief if head.source == "custom" else AcmeBrief
    return kind(head.not_before, head.not_after)


class DomainBrief(msgspec.Struct, gc=False):
    """What the supervisor keeps of one name's records (~270 bytes with its name and
    map entry). `app` is None while the name has certificate or status records but no
    domain record (they are written after it and removed after it)."""

    app: str | None = None
    letsencrypt: bool = True
    state: str = ""  # the lifecycle's; "" while it has written none (pending_dns)
    custom: CertBrief | None = None
    acme: CertBrief | None = None
    # As the tallies count it now: the view, and which certificate was serving.
    view: View | None = None
    serving: str = ""

    def held(self) -> Iterator[tuple[str, str, float]]:
        """(source, role, not_after) of each certificate held, as last counted."""
        for cert in (self.custom, self.acme):
            if cert is not None:
                role = "serving" if cert.source == self.serving else "standby"
                yield cert.source, role, cert.not_after


class SortedNames:
    """Names in order, kept as they come and go: blocks of about LOAD names, so an
    insert or a removal moves a block's worth of pointers (not a million), and a page
    from any name on is two bisections. For listings: with etcd 3.4, a range read costs
    the whole range however small its limit, so the supervisor pages from here."""

    LOAD = 1000

    def __init__(self, names: Iterable[str] = ()) -> None:
        ordered = sorted(names)
        self._blocks = [ordered[at:at + self.LOAD] for at in range(0, len(ordered), self.LOAD)]
        self._maxes = [block[-1] for block in self._blocks]

    def add(self, name: str) -> None:
        blocks, maxes = self._blocks, self._maxes
        if not blocks:
            blocks.append([name])
            maxes.append(name)
            return
        at = min(bisect.bisect_left(maxes, name), len(blocks) - 1)
        block = blocks[at]
        where = bisect.bisect_left(block, name)
        if where < len(block) and block[where] == name:
            return
        block.insert(where, name)
        maxes[at] = block[-1]
        if len(block) > 2 * self.LOAD:
            blocks[at:at + 1] = [block[:self.LOAD], block[self.LOAD:]]
            maxes[at:at + 1] = [block[self.LOAD - 1], block[-1]]

    def discard(self, name: str) -> None:
        blocks, maxes = self._blocks, self._maxes
        at = bisect.bisect_left(maxes, name)
        if at == len(blocks):
            return
        block = blocks[at]
        where = bisect.bisect_left(block, name)
        if where < len(block) and block[where] == name:
            del block[where]
            if block:
                maxes[at] = block[-1]
            else:
                del blocks[at], maxes[at]

    def after(self, name: str) -> Iterator[str]:
        """The names after `name`, in order (do not change the set while iterating)."""
        at = bisect.bisect_right(self._maxes, name)
        for index in range(at, len(self._blocks)):
            block = self._blocks[index]
            start = bisect.bisect_right(block, name) if index == at else 0
            yield from block[start:]

    def __len__(self) -> int:
        return sum(map(len, self._blocks))


Classify = Callable[[DomainBrief, float], View]
D = TypeVar("D")


class Soonest:
    """The certificates of one (source, role) expiring first: (not_after, domain),
    sorted, kept to at most `keep`; `short` once removals took it below what the
    tally holds of that kind (the next sweep refills it)."""

    __slots__ = ("entries", "keep", "short")

    def __init__(self, keep: int) -> None:
        self.keep = keep
        self.entries: list[tuple[float, str]] = []
        self.short = False

    def add(self, not_after: float, name: str) -> None:
        entries = self.entries
        if len(entries) >= self.keep and not_after >= entries[-1][0]:
            return
        bisect.insort(entries, (not_after, name))
        if len(entries) > self.keep:
            entries.pop()

    def remove(self, not_after: float, name: str) -> None:
        entries = self.entries
        at = bisect.bisect_left(entries, (not_after, name))
        if at < len(entries) and entries[at] == (not_after, name):
            del entries[at]
            self.short = True


@dataclass
class Tally:
    """Counts kept as briefs change (add/remove a brief's contribution), read by the
    scrape and the admin API without walking the domains.

    Expiry is counted by (source, role) and the hour a certificate expires in: a
    scrape turns those into expires_in buckets and days-to-expiry at its own time
    (to the hour). Roles and views depend on the time too (a certificate expires, the
    other one serves): the supervisor counts every domain again in the background
    every few minutes (BriefState.sweep), which also refills the soonest lists.
    """

    keep: int = 100  # metrics.certificate_series: per-certificate series kept
    views: dict[View, int] = field(default_factory=dict)
    by_status: dict[str, set[str]] = field(default_factory=dict)
    expiry: dict[tuple[str, str], dict[int, int]] = field(default_factory=dict)
    soonest: dict[tuple[str, str], Soonest] = field(default_factory=dict)
    # Soonest lists being built again by a sweep (every change goes to both).
    refill: dict[tuple[str, str], Soonest] | None = None

    def add(self, name: str, brief: DomainBrief) -> None:
        view = brief.view
        if view is None:
            return
        self.views[view] = self.views.get(view, 0) + 1
        self.by_status.setdefault(view[1], set()).add(name)
        for source, role, not_after in brief.held():
            hours = self.expiry.setdefault((source, role), {})
            hour = int(not_after // HOUR)
            hours[hour] = hours.get(hour, 0) + 1
            for lists in (self.soonest, self.refill):
                if lists is not None:
                    self._soonest(lists, source, role).add(not_after, name)

    def remove(self, name: str, brief: DomainBrief) -> None:
        view = brief.view
        if view is None:
            return
        left = self.views.get(view, 0) - 1
        if left > 0:
            self.views[view] = left
        else:
            self.views.pop(view, None)
        self.by_status.get(view[1], set()).discard(name)
        for source, role, not_after in brief.held():
            hours = self.expiry.get((source, role), {})
            hour = int(not_after // HOUR)
            if hours.get(hour, 0) > 1:
                hours[hour] -= 1
            else:
                hours.pop(hour, None)
            for lists in (self.soonest, self.refill):
                if lists is not None:
                    self._soonest(lists, source, role).remove(not_after, name)

    def _soonest(self, lists: dict[tuple[str, str], Soonest], source: str,
                 role: str) -> Soonest:
        found = lists.get((source, role))
        if found is None:
            found = lists[(source, role)] = Soonest(2 * self.keep)
        return found

    # held() and hours() run in the scrape's thread while the loop changes the tally:
    # they read it through copies made by single C calls (atomic under the GIL).

    def held(self) -> list[tuple[str, str, str, float]]:
        """(domain, source, role, not_after) of the soonest certificates kept of each
        source and role."""
        return [(name, source, role, not_after)
                for (source, role), soonest in list(self.soonest.items())
                for not_after, name in list(soonest.entries)]

    def hours(self) -> list[tuple[str, str, int, int]]:
        """(source, role, hour, count): how many certificates expire in each hour (the
        hour as Unix time // 3600)."""
        return [(source, role, hour, count)
                for (source, role), hours in list(self.expiry.items())
                for hour, count in list(hours.items())]

    def short(self) -> bool:
        """Whether removals left a soonest list with fewer than it should hold."""
        for (source, role), soonest in self.soonest.items():
            held = sum(self.expiry.get((source, role), {}).values())
            if len(soonest.entries) < min(held, self.keep):
                return True
        return False


@dataclass
class BriefState:
    """The store as the supervisor needs it (views, counts, expiry metrics, the
    lifecycle's hints, filtered listings): one DomainBrief per name, no key material,
    and the Tally kept from them.

    A store event changes the brief it names and re-counts that brief alone
    (`classify`: the supervisor's view rule, registry.view_status). `touched` holds
    each domain changed since the owner last looked, with its view before the first
    change (None: not a domain then; UNCOUNTED: read at start-up, not counted yet),
    events during the start-up read included: the owner logs the changes and tells the
    lifecycle. `reset` says the state was read whole again (history compacted): what
    `touched` holds then is no news to log.
    """

    classify: Classify
    domains: dict[str, DomainBrief] = field(default_factory=dict)
    tally: Tally = field(default_factory=Tally)
    revision: int = 0
    count: int = 0  # names with a domain record
    touched: dict[str, View | _Uncounted | None] = field(default_factory=dict)
    reset: bool = False
    clock: Callable[[], float] = time.time
    # Changes applied to records a worker reads (domains, apps, challenges,
    # certificates): how far the workers' snapshot is behind (sync/snapshot.py).
    worker_changes: int = 0
    # While the start-up read goes on (its pages of certificates and statuses, read
    # after the follower started): the keys events changed since, whose records those
    # pages must not overwrite (the name's other records they still bring). None once
    # loaded.
    loading: set[str] | None = field(default_factory=set)
    # The domains' names in order, for listings (built once loaded).
    ordered: SortedNames | None = None
    progress: asyncio.Event | None = None  # set on each event, while someone settles

    def apply(self, key: str, value: bytes | None) -> bool:
        """Apply one change; True when it changed a brief."""
        if self.progress is not None:
            self.progress.set()  # `revision` moved (the follower sets it first)
        if key.startswith(_WORKER_PREFIXES):
            self.worker_changes += 1
        if self.loading is not None:
            self.loading.add(key)
        try:
            if key.startswith(rec.DOMAINS):
                name = key[len(rec.DOMAINS):]
                head = None if value is None else _domain_head(value)
                with self._changing(name) as brief:
                    self._set_domain(brief, head)
            elif key.startswith(rec.CERTS):
                parsed = rec.parse_cert_key(key)
                if parsed is None:
                    return False
                cert = None if value is None else cert_brief(value)
                with self._changing(parsed[0]) as brief:
                    if parsed[1] == "custom":
                        brief.custom = cert
                    else:
                        brief.acme = cert
            elif key.startswith(rec.STATUS):
                state = "" if value is None else sys.intern(_status_head(value).state)
                with self._changing(key[len(rec.STATUS):]) as brief:
                    brief.state = state
            else:
                return False
        except ValueError as exc:  # an unreadable record must not stop the others
            log.error("ignoring unreadable store record %s: %s", key, exc)
            return False
        return True

    def _set_domain(self, brief: DomainBrief, head: _DomainHead | None) -> None:
        self.count += (head is not None) - (brief.app is not None)
        if head is None:
            brief.app = None
        else:
            brief.app, brief.letsencrypt = sys.intern(head.app), head.letsencrypt

    def _listed(self, name: str, brief: DomainBrief) -> None:
        """Keep `ordered` in step with whether `name` is a domain now."""
        if self.ordered is not None:
            if brief.app is None:
                self.ordered.discard(name)
            else:
                self.ordered.add(name)

    def _changing(self, name: str) -> _Change:
        return _Change(self, name)

    # -- the node's index for listings (listing.DomainIndex) ----------------------------

    def with_status(self, status: str) -> set[str]:
        """The names in `status` now: the tally's live set (copy it before awaiting)."""
        return self.tally.by_status.get(status, set())

    def domain_count(self) -> int:
        return self.count

    def status_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for (_, status), n in list(self.tally.views.items()):
            counts[status] = counts.get(status, 0) + n
        return counts

    def loaded(self) -> None:
        """The start-up read is done (and counted): the events seen while it went on
        stay in `touched` for the owner to log. Sorts the names once (~1 s at a million,
        off the workers' path)."""
        self.loading = None
        self.ordered = SortedNames(n for n, b in self.domains.items() if b.app is not None)

    def names(self, after: str, prefix: str) -> Iterator[str]:
        """Domain names after `after` that start with `prefix`, in order (listings)."""
        if self.ordered is None:
            return iter(())
        start = max(after, prefix[:-1] + chr(ord(prefix[-1]) - 1) + "\x7f") if prefix else after
        return itertools.takewhile(lambda n: n.startswith(prefix), self.ordered.after(start))

    async def settle(self, revision: int, within: float = 1.0) -> None:
        """Return once `revision` is applied (a write the admin API just made: the
        follower brings it within milliseconds), or after `within` seconds."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while self.revision < revision and (left := deadline - loop.time()) > 0:
            if self.progress is None:
                self.progress = asyncio.Event()
            self.progress.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.progress.wait(), left)

    def describe(self, name: str) -> View | None:
        """(app, status) of a domain now, for listings' filters."""
        brief = self.domains.get(name)
        if brief is None or brief.app is None or brief.view is None:
            return None
        return brief.app, brief.view[1]

    def recount(self, name: str, brief: DomainBrief, now: float) -> None:
        """Count `brief` as it is now (its old contribution is taken out first)."""
        self.tally.remove(name, brief)
        self._count(brief, now)
        self.tally.add(name, brief)

    def _count(self, brief: DomainBrief, now: float) -> None:
        if brief.app is None:
            brief.view, brief.serving = None, ""
            return
        brief.view = _interned(self.classify(brief, now))
        serving = rec.serving_certificate(brief.custom, brief.acme, now)
        brief.serving = "" if serving is None else serving.source

    def load(self, prefix: str, items: list[Item]) -> None:
        """Apply a page of a start-up scan (domains, certificates, statuses): briefs only;
        `finish` counts them all."""
        domains = self.domains
        with no_gc():
            if prefix == rec.DOMAINS:
                self.load_domains(items)
            elif prefix == rec.CERTS:
                newer = self.loading or ()
                for item in items:
                    parsed = rec.parse_cert_key(item.key)
                    if parsed is None or item.key in newer:
                        continue
                    cert = self._decoded(item, cert_brief)
                    if cert is None:
                        continue
                    brief = domains.get(parsed[0]) or domains.setdefault(parsed[0],
                                                                          DomainBrief())
                    if parsed[1] == "custom":
                        brief.custom = cert
                    else:
                        brief.acme = cert
            elif prefix == rec.STATUS:
                cut, newer = len(rec.STATUS), self.loading or ()
                for item in items:
                    status = self._decoded(item, _status_head)
                    if status is not None and item.key not in newer:
                        name = item.key[cut:]
                        brief = domains.get(name) or domains.setdefault(name, DomainBrief())
                        brief.state = sys.intern(status.state)

    def load_domains(self, items: list[Item]) -> list[tuple[str, str]]:
        """`load` of a page of domain records; (name, app) of each one read."""
        try:
            heads = [_domain_head(i.value) for i in items]
        except ValueError:  # one by one, so an unreadable record is logged and skipped
            decoded = [(i, self._decoded(i, _domain_head)) for i in items]
            return self._load_heads([i for i, h in decoded if h is not None],
                                    [h for _, h in decoded if h is not None])
        return self._load_heads(items, heads)

    def _load_heads(self, items: list[Item], heads: list[_DomainHead]
                    ) -> list[tuple[str, str]]:
        domains, cut, intern = self.domains, len(rec.DOMAINS), sys.intern
        found = []
        for item, head in zip(items, heads, strict=True):
            name, app = item.key[cut:], intern(head.app)
            brief = domains.get(name)
            if brief is None:  # the start-up read: a new name, the common case
                domains[name] = DomainBrief(app, head.letsencrypt)
                self.count += 1
            else:
                self._set_domain(brief, head)
            found.append((name, app))
        return found

    @staticmethod
    def _decoded(item: Item, decode: Callable[[bytes], D]) -> D | None:
        try:
            return decode(item.value)
        except ValueError as exc:
            log.error("ignoring unreadable store record %s: %s", item.key, exc)
            return None

    def sweep(self, step: int = 1000) -> Iterator[int]:
        """Count every domain again (yields every `step` domains, so the caller lets its
        loop run, and applies events meanwhile): after a load, and every few minutes
        for what time alone changes (a certificate expired, another one serves).
        Refills the soonest lists."""
        tally = self.tally
        tally.refill = {}
        names = list(self.domains)
        now = self.clock()
        try:
            for at in range(0, len(names), step):
                with no_gc():
                    for name in names[at:at + step]:
                        brief = self.domains.get(name)
                        if brief is not None:
                            self.recount(name, brief, now)
                yield at
            tally.soonest = tally.refill
        finally:
            tally.refill = None

    async def keep_counting(self, every: float = 300.0, check: float = 10.0) -> None:
        """Sweep every `every` seconds, and sooner (at most once a minute) when removals
        left a soonest list short: a node task of the supervisor."""
        last = time.monotonic()
        while True:
            await asyncio.sleep(check)
            since = time.monotonic() - last
            if since >= every or (since >= 60.0 and self.tally.short()):
                for _ in self.sweep():
                    await asyncio.sleep(0)
                last = time.monotonic()

    async def reload(self, store: Store) -> None:
        """Read the store whole again (its history no longer reaches `revision`)."""
        fresh = BriefState(self.classify, tally=Tally(keep=self.tally.keep),
                           clock=self.clock, loading=None)
        fresh.revision = await store.revision()
        for prefix in (rec.DOMAINS, rec.CERTS, rec.STATUS):
            async for items in store.scan_pages(prefix):
                fresh.load(prefix, items)
        for _ in fresh.sweep():
            await asyncio.sleep(0)
        self.domains, self.tally, self.count = fresh.domains, fresh.tally, fresh.count
        self.revision = fresh.revision
        self.ordered = SortedNames(n for n, b in self.domains.items() if b.app is not None)
        self.reset = True  # the owner re-reads everything it derived


class _Change:
    """`with state._changing(name) as brief`: the brief of `name` (made if missing), its
    old contribution taken out of the tally before the change and its new one added
    after; the name noted in `touched` with its view before; a brief left with no
    record at all forgotten."""

    __slots__ = ("brief", "name", "state")

    def __init__(self, state: BriefState, name: str) -> None:
        self.state, self.name = state, name
        brief = state.domains.get(name)
        if brief is None:
            brief = state.domains[name] = DomainBrief()
        self.brief = brief

    def __enter__(self) -> DomainBrief:
        state, brief = self.state, self.brief
        if self.name not in state.touched:  # None: not a domain before (no record yet)
            before = brief.view if brief.view is not None else UNCOUNTED
            state.touched[self.name] = before if brief.app is not None else None
        state.tally.remove(self.name, brief)
        return brief

    def __exit__(self, *exc: object) -> None:
        state, brief = self.state, self.brief
        state._count(brief, state.clock())
        state.tally.add(self.name, brief)
        state._listed(self.name, brief)
        if brief.app is None and brief.custom is None and brief.acme is None \
                and not brief.state:
            del state.domains[self.name]


_views: dict[View, View] = {}


def _interned(view: View) -> View:
    """One tuple per distinct view, shared by every brief that has it."""
    return _views.setdefault(view, view)


def briefs_of(state: BriefState, names: Iterable[str]) -> dict[str, DomainBrief]:
    """The briefs of `names` that are domains (for a listing page)."""
    found = {}
    for name in names:
        brief = state.domains.get(name)
        if brief is not None and brief.app is not None:
            found[name] = brief
    return found
