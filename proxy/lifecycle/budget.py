"""The order budget: the CA's published rate limits, kept cluster-wide in the store, and
the queue of orders waiting for them.

Each limit of an issuer (acme.limits; Let's Encrypt's by default) is a token bucket:
new orders per account, new certificates per registered domain (Public Suffix List),
duplicate certificates per exact set of names, failed validations per hostname. A
bucket is kept as GCRA, one number: its theoretical arrival time `tat`. It holds
`count` tokens when `tat` is past and none when `tat` is `period` ahead; each token
taken moves `tat` on by `period / count` (Let's Encrypt's own model: 300 orders per 3 h
is one every 36 s, up to 300 at once).

Where (store/records.py, BudgetRecord): `budget/<issuer id>/account` holds the account's
bucket and the pauses the CA asked for the whole issuer (a 503) or the account (a 429);
`budget/<issuer id>/s0`..`s7` hold the other buckets and the per-domain pauses, spread by
a hash so that no record grows with the platform. A bucket back to full, or a pause
over, is left out. Every change is a compare-and-swap of the records it touches, in one
store transaction: the nodes of a cluster share one budget, never spend one token
twice, and a restart forgets nothing. The orders that ask at once on a node are decided
together: one read, one transaction.

An order that finds its budget spent waits: the caller writes the reason and the time
(`waiting: account budget until 2026-12-10T10:00:36Z`) in its status and it comes due
again then. This node keeps its waiting orders in urgency order (renewals of the
certificates closest to expiry first, then new domains first come, first served), and
the tokens that come back go to the most urgent: a less urgent order that asks first is
told to wait its turn, and each waiting order is told when its own turn comes.

What is spent: the account's token when an order is placed (not for an ARI-guided
renewal, or when the CA took no order); the registered domain's (not for a renewal)
and the name set's until the order fails; a failed-validation token per name of an
order whose validation failed. A 429 pauses the account (or the registered domain) and
a 503 the issuer, until the CA's Retry-After.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import time
import zlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import msgspec

from proxy import metrics, names
from proxy.config import AcmeLimits, Limit
from proxy.errors import ConflictError, StoreError
from proxy.lifecycle.acme import AuthorizationFailed, IssuerUnavailable, RateLimited
from proxy.store import records as rec
from proxy.store.base import Item, Store, Write

__all__ = ["Ask", "Budget", "BudgetIssuer", "Grant", "Wait", "urgency"]

log = logging.getLogger("tlsedge.lifecycle.budget")

SHARDS = 8
_ACCOUNT = "account"  # the record of the account's bucket and the issuer's pauses
_ROUNDS = 20  # compare-and-swap rounds before giving up (other nodes writing meanwhile)
_FORGET = 600.0  # a waiting order that has not asked again this long after its turn
_PAUSE_503 = 60.0  # a 503 without Retry-After pauses the issuer this long
_PAUSE_429 = 3600.0  # a 429 without Retry-After (Let's Encrypt always sends one)
_WORDS = {"account": "account", "registered_domain": "registered-domain",
          "name_set": "duplicate-certificate", "failed_authorization": "failed-validation"}

Urgency = tuple[int, float, str]


def urgency(name: str, *, expires: float | None, created_at: float) -> Urgency:
    """Queue order: renewals by their certificate's expiry, then new domains by age."""
    return (0, expires, name) if expires is not None else (1, created_at, name)


@dataclass(frozen=True)
class BudgetIssuer:
    id: str  # the store key segment (issuers.py)
    name: str  # in metrics
    limits: AcmeLimits


@dataclass(frozen=True)
class Ask:
    """An order asking one issuer's budget for `names` (the domain `name` first)."""

    issuer: str
    name: str
    names: tuple[str, ...]
    urgency: Urgency
    renewal: bool = False  # the same names as the certificate it replaces
    ari: bool = False  # a renewal inside the CA's ARI window: no new-order token


@dataclass(frozen=True)
class Grant:
    ask: Ask
    spent: tuple[str, ...]  # bucket ids taken


@dataclass(frozen=True)
class Wait:
    until: float
    reason: str  # "waiting: account budget until 2026-12-10T10:00:36Z"
    unavailable: bool = False  # the issuer asked for a pause: another one may serve


def iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def _shard(bucket: str) -> str:
    return f"s{zlib.crc32(bucket.encode()) % SHARDS}"


def _part(bucket: str) -> str:
    """The record part holding a bucket or pause id."""
    return _ACCOUNT if bucket in ("a", "issuer", "account") else _shard(bucket)


def _name_set(names_: Iterable[str]) -> str:
    return "n:" + hashlib.sha256(",".join(sorted(names_)).encode()).hexdigest()[:24]


def _room(tat: float, now: float, limit: Limit) -> float:
    """Tokens a bucket holds now (fractions: the next one is on its way)."""
    interval = limit.period / limit.count
    return (limit.period - (max(tat, now) - now)) / interval


@dataclass
class _State:
    """The budget records of the issuers a flush looks at, as read, with what it changes.
    `held` counts tokens waiting orders hold in their queue order: never written."""

    now: float
    items: dict[str, Item | None]
    records: dict[str, rec.BudgetRecord]
    tats: dict[tuple[str, str], float] = field(default_factory=dict)
    pauses: dict[tuple[str, str], rec.Pause] = field(default_factory=dict)
    held: dict[tuple[str, str], int] = field(default_factory=dict)
    dirty: set[str] = field(default_factory=set)  # record keys to write

    def tat(self, issuer: str, bucket: str) -> float:
        found = self.tats.get((issuer, bucket))
        if found is None:
            record = self.records.get(rec.budget_key(issuer, _part(bucket)))
            found = record.tats.get(bucket, 0.0) if record is not None else 0.0
        return max(found, self.now)

    def effective(self, issuer: str, bucket: str, limit: Limit) -> float:
        return (self.tat(issuer, bucket)
                + self.held.get((issuer, bucket), 0) * limit.period / limit.count)

    def spend(self, issuer: str, bucket: str, limit: Limit, n: float = 1.0) -> None:
        tat = self.tat(issuer, bucket) + n * limit.period / limit.count
        # A refund never fills past full; a spend on an empty bucket (a failure the CA
        # counted anyway) never owes more than a whole period.
        self.tats[(issuer, bucket)] = min(max(tat, self.now), self.now + limit.period)
        self.dirty.add(rec.budget_key(issuer, _part(bucket)))

    def pause(self, issuer: str, pause: str) -> rec.Pause | None:
        found = self.pauses.get((issuer, pause))
        if found is None:
            record = self.records.get(rec.budget_key(issuer, _part(pause)))
            found = record.pauses.get(pause) if record is not None else None
        return found if found is not None and found.until > self.now else None

    def set_pause(self, issuer: str, pause: str, until: float, why: str) -> None:
        current = self.pause(issuer, pause)
        if current is None or current.until < until:
            self.pauses[(issuer, pause)] = rec.Pause(until=until, why=why)
            self.dirty.add(rec.budget_key(issuer, _part(pause)))

    def writes(self) -> list[Write]:
        """The changed records, with what is past left out, each expecting the
        revision it was read at."""
        out = []
        for key in sorted(self.dirty):
            issuer, part = key[len(rec.BUDGET):].split("/")
            old = self.records.get(key) or rec.BudgetRecord()
            tats = {b: t for b, t in old.tats.items() if t > self.now}
            pauses = {p: v for p, v in old.pauses.items() if v.until > self.now}
            tats.update({b: t for (i, b), t in self.tats.items()
                         if i == issuer and _part(b) == part})
            pauses.update({p: v for (i, p), v in self.pauses.items()
                           if i == issuer and _part(p) == part})
            tats = {b: t for b, t in tats.items() if t > self.now}
            item = self.items.get(key)
            out.append(Write(key, rec.encode(rec.BudgetRecord(tats=tats, pauses=pauses)),
                             expect=item.revision if item is not None else 0))
        return out


@dataclass
class _Job:
    """A request to the flusher: an Ask to decide, or the outcome of a granted order."""

    ask: Ask | None = None
    grant: Grant | None = None
    error: BaseException | None = None
    future: asyncio.Future[Grant | Wait | None] | None = None


class Budget:
    """The order budget of every issuer of a lifecycle (see the module docstring)."""

    def __init__(self, store: Store, issuers: Iterable[BudgetIssuer], *,
                 clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.issuers = {i.id: i for i in issuers}
        self.clock = clock
        self._waiting: dict[str, tuple[Ask, float, str]] = {}  # name -> (ask, turn, why)
        self._jobs: list[_Job] = []
        self._flusher: asyncio.Task[None] | None = None
        self._psl_read = False

    @property
    def waiting(self) -> Mapping[str, tuple[Ask, float, str]]:
        """The orders this node has told to wait, by domain: (what they ask, their turn,
        why they wait)."""
        return self._waiting

    def queue(self) -> list[tuple[str, str, float]]:
        """This node's waiting orders in queue order, most urgent first: (domain, why
        it waits, until when). For the dashboard; as long as the queue (thousands at
        most: orders wait only while the CA's limits hold them back)."""
        order = sorted(self._waiting.items(), key=lambda entry: entry[1][0].urgency)
        return [(name, why, until) for name, (_, until, why) in order]

    async def reserve(self, ask: Ask) -> Grant | Wait:
        """Take what `ask` needs, or say until when it waits and why."""
        if not self._psl_read:  # the first look-up reads the list (~60 ms): off the loop
            await asyncio.to_thread(names.registered_domain, ask.name)
            self._psl_read = True
        decision = await self._submit(_Job(ask=ask))
        assert decision is not None
        return decision

    async def settle(self, grant: Grant, error: BaseException | None) -> Wait | None:
        """After the order of `grant`: give back what the CA did not count, spend the
        failed validations, pause what a 429 or a 503 asks. A Wait when the CA asked
        the domain's orders to pause (the order is not a failure of the domain)."""
        if error is None:
            return None
        wait = await self._submit(_Job(grant=grant, error=error))
        assert wait is None or isinstance(wait, Wait)
        return wait

    async def _submit(self, job: _Job) -> Grant | Wait | None:
        job.future = asyncio.get_running_loop().create_future()
        self._jobs.append(job)
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush_all(), name="order budget")
        return await job.future

    async def _flush_all(self) -> None:
        # Group commit: the jobs that came while a flush ran go together in the next.
        while self._jobs:
            jobs, self._jobs = self._jobs, []
            try:
                results = await self._flush(jobs)
            except Exception as exc:
                for job in jobs:
                    assert job.future is not None
                    if not job.future.done():
                        job.future.set_exception(exc)
                continue
            for job, result in zip(jobs, results, strict=True):
                assert job.future is not None
                if not job.future.done():
                    job.future.set_result(result)

    async def _flush(self, jobs: list[_Job]) -> list[Grant | Wait | None]:
        asked = {j.ask.name for j in jobs if j.ask is not None}
        now = self.clock()
        self._waiting = {n: w for n, w in self._waiting.items() if w[1] + _FORGET > now}
        queued = [a for n, (a, _, _) in self._waiting.items() if n not in asked]
        involved = {a.issuer for a in queued} | {
            (j.ask or j.grant.ask).issuer for j in jobs  # type: ignore[union-attr]
        }
        keys = [rec.budget_key(i, p) for i in sorted(involved)
                for p in (_ACCOUNT, *(f"s{n}" for n in range(SHARDS)))]
        for _ in range(_ROUNDS):
            items = dict(zip(keys, await asyncio.gather(*(self.store.get(k) for k in keys)),
                             strict=True))
            state = _State(now, items, self._decode(items))
            results = self._plan(jobs, queued, state)
            writes = state.writes()
            try:
                if writes:
                    await self.store.put_all(writes)
            except ConflictError:
                now = self.clock()
                continue  # another node spent meanwhile: decide again on what it wrote
            self._after(jobs, results, state)
            return results
        raise StoreError("the order budget records kept changing; trying again later")

    @staticmethod
    def _decode(items: Mapping[str, Item | None]) -> dict[str, rec.BudgetRecord]:
        records = {}
        for key, item in items.items():
            if item is None:
                continue
            try:
                records[key] = rec.decode(item.value, rec.BudgetRecord)
            except msgspec.DecodeError as exc:  # rewritten whole at the next spend
                log.error("ignoring unreadable order budget record %s: %s", key, exc)
        return records

    def _plan(self, jobs: list[_Job], queued: list[Ask],
              state: _State) -> list[Grant | Wait | None]:
        """Outcomes first (they give back and pause), then every ask, asking and
        waiting alike, in urgency order: only the asking ones are written."""
        results: dict[int, Grant | Wait | None] = {}
        for index, job in enumerate(jobs):
            if job.grant is not None:
                results[index] = self._outcome(job.grant, job.error, state)
        asking = [(job.ask.urgency, 0, index, job.ask) for index, job in enumerate(jobs)
                  if job.ask is not None]
        waiting = [(a.urgency, 1, -1, a) for a in queued]
        for _, _, index, ask in sorted(asking + waiting, key=lambda e: e[:3]):
            decision = self._decide(ask, state, real=index >= 0)
            if index >= 0:
                results[index] = decision
        return [results[i] for i in range(len(jobs))]

    def _needs(self, ask: Ask) -> list[tuple[str, str]]:
        """(bucket id, limit kind) of what the order spends."""
        needs = [] if ask.ari else [("a", "account")]
        if not ask.renewal:
            needs.append((f"r:{names.registered_domain(ask.name) or ask.name}",
                          "registered_domain"))
        needs.append((_name_set(ask.names), "name_set"))
        return needs

    def _decide(self, ask: Ask, state: _State, *, real: bool) -> Grant | Wait:
        limits = self.issuers[ask.issuer].limits
        issuer = ask.issuer
        waits: list[tuple[float, str, bool]] = []
        registered = f"r:{names.registered_domain(ask.name) or ask.name}"
        for pause in ("issuer", "account", registered):
            found = state.pause(issuer, pause)
            if found is not None:
                waits.append((found.until, f"waiting: {found.why} until {iso(found.until)}",
                              pause == "issuer"))
        lacking = []
        checks = [(f"f:{n}", "failed_authorization") for n in ask.names]
        for bucket, kind in self._needs(ask) + checks:
            limit: Limit = getattr(limits, kind)
            if limit.count and _room(state.effective(issuer, bucket, limit),
                                     state.now, limit) < 1 - 1e-9:
                turn = (state.effective(issuer, bucket, limit) + limit.period / limit.count
                        - limit.period)
                waits.append((turn, f"waiting: {_WORDS[kind]} budget until {iso(turn)}",
                              False))
                lacking.append((bucket, kind))
        if waits:
            # Its place in the queue: the next token of each bucket it lacks is its.
            for bucket, kind in lacking:
                if kind != "failed_authorization":
                    state.held[(issuer, bucket)] = state.held.get((issuer, bucket), 0) + 1
            until, reason, _ = max(waits)
            return Wait(until, reason, unavailable=all(w[2] for w in waits))
        spent = []
        for bucket, kind in self._needs(ask):
            limit = getattr(limits, kind)
            if not limit.count:
                continue
            if real:
                state.spend(issuer, bucket, limit)
            else:
                state.held[(issuer, bucket)] = state.held.get((issuer, bucket), 0) + 1
            spent.append(bucket)
        return Grant(ask, tuple(spent))

    def _outcome(self, grant: Grant, error: BaseException | None,
                 state: _State) -> Wait | None:
        ask, issuer = grant.ask, grant.ask.issuer
        limits = self.issuers[issuer].limits
        kinds = dict(self._needs(ask))
        # The CA counts the order it took (the account's token) and, for a failed
        # validation, a failed authorization per name; never a certificate not issued.
        took_order = not isinstance(error, RateLimited | IssuerUnavailable)
        for bucket in grant.spent:
            if not (bucket == "a" and took_order):
                state.spend(issuer, bucket, getattr(limits, kinds[bucket]), -1.0)
        if isinstance(error, AuthorizationFailed) and limits.failed_authorization.count:
            for name in ask.names:
                state.spend(issuer, f"f:{name}", limits.failed_authorization)
        now = state.now
        if isinstance(error, RateLimited):
            until = now + (error.retry_after if error.retry_after is not None else _PAUSE_429)
            registered = f"r:{names.registered_domain(ask.name) or ask.name}"
            pause, why = (("account", "CA rate limit (429) for the account") if error.account
                          else (registered, f"CA rate limit (429) for {registered[2:]}"))
            state.set_pause(issuer, pause, until, why)
            return Wait(until, f"waiting: {why} until {iso(until)}")
        if isinstance(error, IssuerUnavailable) and error.status >= 500:
            until = now + (error.retry_after if error.retry_after is not None else _PAUSE_503)
            why = f"{self.issuers[issuer].name} unavailable (HTTP {error.status})"
            state.set_pause(issuer, "issuer", until, why)
            return Wait(until, f"waiting: {why} until {iso(until)}", unavailable=True)
        return None

    def _after(self, jobs: list[_Job], results: list[Grant | Wait | None],
               state: _State) -> None:
        """The queue and the gauges once a flush is written."""
        for job, result in zip(jobs, results, strict=True):
            if job.ask is None:
                continue
            if isinstance(result, Wait):
                self._waiting[job.ask.name] = (job.ask, result.until, result.reason)
            else:
                self._waiting.pop(job.ask.name, None)
        metrics.ACME_QUEUE.set(len(self._waiting))
        for issuer in {k[len(rec.BUDGET):].split("/")[0] for k in state.items}:
            self._gauge(issuer, state)

    def _gauge(self, issuer: str, state: _State) -> None:
        """Tokens left per limit kind: the account's, and the lowest bucket's of the
        other kinds (the registered domain, name set or hostname closest to its limit)."""
        about = self.issuers[issuer]
        lowest: dict[str, float] = {}
        prefixes = {"a": "account", "r:": "registered_domain", "n:": "name_set",
                    "f:": "failed_authorization"}
        buckets = {b for (i, b) in state.tats if i == issuer}
        for key, record in state.records.items():
            if key.startswith(rec.budget_key(issuer, "")):
                buckets.update(record.tats)
        for bucket in buckets:
            kind = prefixes.get(bucket[:2]) or prefixes.get(bucket[:1])
            if kind is None:
                continue
            limit: Limit = getattr(about.limits, kind)
            if limit.count:
                room = math.floor(_room(state.tat(issuer, bucket), state.now, limit) + 1e-9)
                lowest[kind] = min(lowest.get(kind, room), room)
        for kind in _WORDS:
            limit = getattr(about.limits, kind)
            metrics.ACME_BUDGET.labels(about.name, kind).set(
                lowest.get(kind, limit.count))
