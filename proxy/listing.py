"""Paged listings of the domains (the admin API, the dashboard, `tlsedge domains list`),
read a page at a time: never the whole store per request, whatever its size.

`page` answers one page in name order after a cursor (`after`: the last name of the
previous page), filtered by status, app and name prefix. Its domains come from one range
read of `domains/` (the prefix narrows the range), their certificates and statuses from
one range read each, covering the page's names. A status few domains have is answered
from the node's index (registry.DomainIndex: the supervisor keeps the names in each
status as store events change them), each of its page's domains read on its own;
a filter many domains pass (a common status, an app) walks the range, at most
WALK_BUDGET domains a request: a page may then hold fewer than `limit` domains, and
`next` says where to go on. `stream` yields every domain, a page at a time (the CLI).

The config file's own domains (registry: source "config") come with the first page.
"""

from __future__ import annotations

import asyncio
import heapq
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass

from proxy.errors import RegistryError
from proxy.registry import STATUS_LABELS, DomainView, Registry, derive_view
from proxy.store import records as rec
from proxy.store.base import Item

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


async def page(registry: Registry, query: Query) -> Page:
    """One page of domains in name order (see the module's docstring)."""
    after, status, app, prefix = query.after, query.status, query.app, query.prefix
    limit, index = query.limit, registry.index
    extra = [] if after else _config_views(registry, status, app, prefix)
    if status == "config":  # the config's own: no store domain has it
        return Page(extra, None)
    if status is not None and index is not None:
        names = index.with_status(status)
        if len(names) * 8 <= index.domain_count():  # few: from the index
            found = await _from_index(registry, list(names), after, limit, app, prefix)
            return Page(found.views + extra, found.next)
    found = await _walk(registry, after, limit, status, app, prefix)
    return Page(found.views + extra, found.next)


async def _from_index(registry: Registry, names: list[str], after: str, limit: int,
                      app: str | None, prefix: str) -> Page:
    picked = heapq.nsmallest(limit + 1, (n for n in names if n > after and n.startswith(prefix)))
    more = len(picked) > limit
    views = [v for v in await _named_views(registry, picked[:limit])
             if app is None or v.app == app]
    return Page(views, picked[limit - 1] if more else None)


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


async def stream(registry: Registry, *, size: int = 1000) -> AsyncIterator[list[DomainView]]:
    """Every domain, `size` at a time, in name order, the config's own at the end."""
    async for items in registry.store.scan_pages(rec.DOMAINS, page=size):
        yield await _range_views(registry, [rec.decode(i.value, rec.DomainRecord)
                                            for i in items])
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
    """The items with keys from `first` to `last` (both included)."""
    prefix = first[:first.index("/") + 1]
    found: list[Item] = []
    pages = registry.store.scan_pages(prefix, after=_just_before(first), page=size + 1)
    try:
        async for items in pages:
            for item in items:
                if item.key > last:
                    return found
                found.append(item)
    finally:
        await pages.aclose()  # type: ignore[attr-defined]
    return found


def _just_before(key: str) -> str:
    """A key that sorts right before `key`: nothing a store key can be lies between."""
    return key[:-1] + chr(ord(key[-1]) - 1) + "\x7f"


async def _named_views(registry: Registry, names: Iterable[str]) -> list[DomainView]:
    """Views of domains anywhere in the store: each one's records read on their own,
    32 domains at a time."""
    slots = asyncio.Semaphore(32)

    async def one(name: str) -> DomainView | None:
        async with slots:
            domain, certs, status = await asyncio.gather(
                registry.store.get(rec.domain_key(name)),
                registry.store.scan(f"{rec.CERTS}{name}/"),
                registry.store.get(rec.status_key(name)))
        if domain is None:
            return None  # removed meanwhile
        by_key = {i.key: i for i in certs}
        return derive_view(rec.decode(domain.value, rec.DomainRecord),
                           _meta(by_key.get(rec.cert_key(name, "custom"))),
                           _meta(by_key.get(rec.cert_key(name, "acme"))),
                           _status(status), registry.clock(), acme_on=registry.acme)

    return [v for v in await asyncio.gather(*(one(n) for n in names)) if v is not None]


def _meta(item: Item | None) -> rec.CertMeta | None:
    return rec.decode(item.value, rec.CertMeta) if item is not None else None


def _status(item: Item | None) -> rec.StatusRecord | None:
    return rec.decode(item.value, rec.StatusRecord) if item is not None else None
