"""Paged listings of the domains (the admin API, the dashboard, `tlsedge domains list`),
read a page at a time: never the whole store per request, whatever its size.

`page` answers one page in name order after a cursor (`after`: the last name of the
previous page), filtered by status, app and name prefix.

- In the supervisor (the admin API, the dashboard), its index (registry.DomainIndex,
  sync.BriefState) knows every domain's name in order, app and status, kept as store
  events change them: a page's names come from there (a status few domains have from
  its set of names, any other filter by looking at most WALK_BUDGET names a request: a
  page may then be short, and `next` says where to go on), and their records from one
  get_many (an etcd transaction per 32 domains). No range read of `domains/`: etcd 3.4
  walks a range whole however small its limit.
- Without it (the CLI), the page's domains come from one range read of `domains/` (the
  prefix narrows it), their certificates and statuses from one range read each,
  covering the page's names (bounded ranges: they cost what they hold). `stream`
  yields every domain this way, 5,000 at a time.

The config file's own domains (registry: source "config") come with the first page.
"""

from __future__ import annotations

import heapq
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from proxy.errors import RegistryError
from proxy.registry import STATUS_LABELS, DomainIndex, DomainView, Registry, derive_view
from proxy.store import records as rec
from proxy.store.base import Event, Item, Lease, Store, Write

MAX_LIMIT = 1000
WALK_BUDGET = 20_000  # domains a filtered request looks at before it answers
STATUSES = frozenset({*STATUS_LABELS, "config"})


@dataclass(frozen=True, slots=True)
class Query:
    """A listing request's parameters (the admin API's query string, the dashboard's)."""

    after: str = ""
    limit: int = 100
    status: str | None = None
    app: str | None = None
    prefix: str = ""

    @classmethod
    def parse(cls, params: Mapping[str, str]) -> Query:
        """RegistryError with one line naming the parameter when one is wrong."""
        unknown = sorted(set(params) - {"after", "limit", "status", "app", "prefix"})
        if unknown:
            raise RegistryError(f"unknown parameter {unknown[0]!r} (a listing takes after, "
                                "limit, status, app and prefix)")
        raw = params.get("limit", "100")
        if not raw.isdigit() or not 1 <= int(raw) <= MAX_LIMIT:
            raise RegistryError(f"limit must be a whole number from 1 to {MAX_LIMIT}, "
                                f"not {raw[:40]!r}")
        status = params.get("status") or None
        if status is not None and status not in STATUSES:
            raise RegistryError(f"unknown status {status[:40]!r} (one of: "
                                f"{', '.join(sorted(STATUSES))})")
        return cls(after=params.get("after", "").strip().lower(), limit=int(raw),
                   status=status, app=params.get("app") or None,
                   prefix=params.get("prefix", "").strip().lower())


@dataclass(frozen=True, slots=True)
class Page:
    views: list[DomainView]
    next: str | None  # `after` for the next page; None after the last one


class WriteTracking:
    """A Store that notes the revision of the writes made through it (`written`): the
    admin API's, so that a listing from the node's index waits for the index to have
    them (a domain added, then listed, is in the list). Everything else passes through."""

    def __init__(self, inner: Store) -> None:
        self.inner = inner
        self.written = 0

    def __getattr__(self, name: str) -> Any:  # backend extras (health, checkpoint)
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    async def put(self, key: str, value: bytes, *, expect: int | None = None,
                  secret: bool = False) -> int:
        revision = await self.inner.put(key, value, expect=expect, secret=secret)
        self.written = max(self.written, revision)
        return revision

    async def put_all(self, writes: Sequence[Write]) -> int:
        revision = await self.inner.put_all(writes)
        self.written = max(self.written, revision)
        return revision

    async def delete(self, key: str, *, expect: int | None = None) -> bool:
        deleted = await self.inner.delete(key, expect=expect)
        if deleted:
            self.written = max(self.written, await self.inner.revision())
        return deleted

    async def get(self, key: str) -> Item | None:
        return await self.inner.get(key)

    async def get_many(self, keys: Sequence[str]) -> list[Item | None]:
        return await self.inner.get_many(keys)

    async def scan(self, prefix: str) -> list[Item]:
        return await self.inner.scan(prefix)

    def scan_pages(self, prefix: str, *, after: str = "", before: str = "", page: int = 0
                   ) -> AsyncIterator[list[Item]]:
        return self.inner.scan_pages(prefix, after=after, before=before, page=page)

    async def keys(self, prefix: str) -> list[str]:
        return await self.inner.keys(prefix)

    async def revision(self) -> int:
        return await self.inner.revision()

    def watch(self, prefix: str, after: int) -> AsyncIterator[Event]:
        return self.inner.watch(prefix, after)

    async def lock(self, name: str, *, ttl: float, wait: float = 0.0) -> Lease:
        return await self.inner.lock(name, ttl=ttl, wait=wait)

    async def close(self) -> None:
        await self.inner.close()


async def page(registry: Registry, query: Query) -> Page:
    """One page of domains in name order (see the module's docstring)."""
    after, status, app, prefix = query.after, query.status, query.app, query.prefix
    limit, index = query.limit, registry.index
    if index is not None and isinstance(registry.store, WriteTracking):
        await index.settle(registry.store.written)
    extra = [] if after else _config_views(registry, status, app, prefix)
    if status == "config":  # the config's own: no store domain has it
        return Page(extra, None)
    if index is None:
        found = await _walk(registry, after, limit, status, app, prefix)
    elif status is not None and len(index.with_status(status)) * 8 <= index.domain_count():
        found = await _from_status(registry, index, after, limit, status, app, prefix)
    else:
        found = await _from_index(registry, index, after, limit, status, app, prefix)
    return Page(found.views + extra, found.next)


async def _from_status(registry: Registry, index: DomainIndex, after: str, limit: int,
                       status: str, app: str | None, prefix: str) -> Page:
    """A status few domains have: its names from the index, sorted here."""
    names = [n for n in list(index.with_status(status))
             if n > after and n.startswith(prefix)
             and (app is None or (index.describe(n) or ("", ""))[0] == app)]
    picked = heapq.nsmallest(limit + 1, names)
    more = len(picked) > limit
    views = await _named_views(registry, picked[:limit])
    return Page(views, picked[limit - 1] if more else None)


async def _from_index(registry: Registry, index: DomainIndex, after: str, limit: int,
                      status: str | None, app: str | None, prefix: str) -> Page:
    """The index's names in order from `after`, filtered in memory: at most
    WALK_BUDGET of them looked at, then `next` says where to go on."""
    picked: list[str] = []
    last = None
    for examined, name in enumerate(index.names(after, prefix), 1):
        if status is not None or app is not None:
            seen = index.describe(name)
            if seen is None or (app is not None and seen[0] != app) or (
                    status is not None and seen[1] != status):
                if examined >= WALK_BUDGET:
                    last = name
                    break
                continue
        picked.append(name)
        if len(picked) > limit:
            break
    views = await _named_views(registry, picked[:limit])
    return Page(views, picked[limit - 1] if len(picked) > limit else last)


async def _walk(registry: Registry, after: str, limit: int, status: str | None,
                app: str | None, prefix: str) -> Page:
    """Walk `domains/<prefix>` from `after`, keeping what the filters pass."""
    filtered = status is not None or app is not None
    size = min(limit * 4, 1000) if filtered else limit + 1
    found: list[DomainView] = []
    examined = 0
    start = rec.domain_key(after) if after else ""
    pages = registry.store.scan_pages(rec.DOMAINS + prefix, after=start, page=size)
    try:
        async for items in pages:
            records = [rec.decode(i.value, rec.DomainRecord) for i in items]
            if app is not None:
                records = [r for r in records if r.app == app]
            for view in await _range_views(registry, records):
                if status is None or view.status == status:
                    found.append(view)
                    if len(found) > limit or (filtered and len(found) == limit):
                        return Page(found[:limit], found[limit - 1].name)
            examined += len(items)
            if filtered and examined >= WALK_BUDGET:
                return Page(found, items[-1].key[len(rec.DOMAINS):])
    finally:
        await pages.aclose()  # type: ignore[attr-defined]
    return Page(found, None)


async def stream(registry: Registry, *, size: int = 5000
                 ) -> AsyncIterator[list[DomainView]]:
    """Every domain, `size` at a time, in name order, the config's own at the end (the
    domains read in the store's own pages: bounded ranges)."""
    async for items in registry.store.scan_pages(rec.DOMAINS):
        for at in range(0, len(items), size):
            yield await _range_views(registry, [rec.decode(i.value, rec.DomainRecord)
                                                for i in items[at:at + size]])
    extra = _config_views(registry, None, None, "")
    if extra:
        yield extra


def _config_views(registry: Registry, status: str | None, app: str | None,
                  prefix: str) -> list[DomainView]:
    """The config's domains the store does not hold (a listing's first page): the
    registry's views of them, filtered."""
    views = [registry.config_view(n) for n in sorted(registry.config_domains)
             if n.startswith(prefix)]
    return [v for v in views if (status is None or v.status == status)
            and (app is None or v.app == app)]


async def _range_views(registry: Registry, domains: list[rec.DomainRecord]
                       ) -> list[DomainView]:
    """Views of domains contiguous in name order: their statuses and certificates read
    with one range read each (a key range covering exactly, or a little more than,
    these names)."""
    if not domains:
        return []
    names = {d.name for d in domains}
    first, last = domains[0].name, domains[-1].name
    statuses = {i.key[len(rec.STATUS):]: i for i in await _range(
        registry, rec.STATUS + first, rec.STATUS + last, len(names))}
    # Certificate keys sort by "<name>/": not the names' own order.
    low, high = min(n + "/" for n in names), max(n + "/" for n in names)
    certs: dict[str, Item] = {}
    for item in await _range(registry, rec.CERTS + low, rec.CERTS + high + "\x7f",
                             2 * len(names)):
        if item.key[len(rec.CERTS):].rpartition("/")[0] in names:
            certs[item.key] = item
    now = registry.clock()
    return [derive_view(
        d, _meta(certs.get(rec.cert_key(d.name, "custom"))),
        _meta(certs.get(rec.cert_key(d.name, "acme"))),
        _status(statuses.get(d.name)), now, acme_on=registry.acme) for d in domains]


async def _range(registry: Registry, first: str, last: str, size: int) -> list[Item]:
    """The items with keys from `first` to `last` (both included): a bounded range, so
    it costs what it holds."""
    prefix = first[:first.index("/") + 1]
    return [item async for items in registry.store.scan_pages(
        prefix, after=_just_before(first), before=last + "\0", page=size + 1)
        for item in items]


def _just_before(key: str) -> str:
    """A key that sorts right before `key`: nothing a store key can be lies between."""
    return key[:-1] + chr(ord(key[-1]) - 1) + "\x7f"


async def _named_views(registry: Registry, names: list[str]) -> list[DomainView]:
    """Views of domains anywhere in the store: their records read in one get_many (a
    transaction per 32 domains on etcd)."""
    keys = [key for name in names for key in (
        rec.domain_key(name), rec.cert_key(name, "custom"), rec.cert_key(name, "acme"),
        rec.status_key(name))]
    found = await registry.store.get_many(keys)
    now, views = registry.clock(), []
    for at, _ in enumerate(names):
        domain, custom, acme, status = found[4 * at:4 * at + 4]
        if domain is not None:  # else removed meanwhile
            views.append(derive_view(rec.decode(domain.value, rec.DomainRecord),
                                     _meta(custom), _meta(acme), _status(status), now,
                                     acme_on=registry.acme))
    return views


def _meta(item: Item | None) -> rec.CertMeta | None:
    return rec.decode(item.value, rec.CertMeta) if item is not None else None


def _status(item: Item | None) -> rec.StatusRecord | None:
    return rec.decode(item.value, rec.StatusRecord) if item is not None else None
