"""The per-domain status machine of the sidecar: DNS check -> lock -> ACME order ->
store, then renewals. One lifecycle per node; per-domain locks in the store keep two
lifecycles (two processes or two nodes) from ordering the same certificate.

Never touches the data plane: it writes certificates, statuses and challenge tokens
to the store, and the workers pick them up from there. Time comes from `clock`, so
tests move time instead of sleeping.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from proxy import metrics
from proxy.certs.bundle import load_bundle
from proxy.errors import BundleError, IssuanceError, LockTimeout, StoreError
from proxy.lifecycle import renewal
from proxy.lifecycle.acme import Account, AcmeClient
from proxy.lifecycle.dnscheck import DnsChecker
from proxy.registry import Registry
from proxy.store import records as rec
from proxy.store.base import Lease, Store

log = logging.getLogger("tlsedge.lifecycle")


class StoreChallenges:
    """Publishes HTTP-01 tokens through the store, where every worker reads them."""

    def __init__(self, store: Store) -> None:
        self.store = store

    async def publish(self, token: str, key_authorization: str) -> None:
        await self.store.put(rec.challenge_key(token), key_authorization.encode())
        # Workers follow the store with a watch (~0.1 s); the plain-HTTP listener
        # also reads the store on a miss, so a token is never answered 404.

    async def withdraw(self, token: str) -> None:
        await self.store.delete(rec.challenge_key(token))


@dataclass(frozen=True)
class LifecycleSettings:
    check_interval: float = 60.0   # DNS re-check while Pending DNS
    lock_ttl: float = 30.0
    concurrency: int = 4
    tick: float = 1.0
    # Seconds between full passes over the store (one scan of domains, one of
    # statuses). 0: every tick. A node's supervisor sets it and calls `notify` with
    # the domains its store watch saw change, so a tick costs what changed, not
    # what exists (a million domains read every second was the whole CPU).
    rescan: float = 0.0


class Lifecycle:
    """Drives every Let's Encrypt-enabled domain to a valid, renewed certificate."""

    def __init__(self, store: Store, registry: Registry, acme: AcmeClient, dns: DnsChecker,
                 settings: LifecycleSettings, *, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.registry = registry
        self.acme = acme
        self.dns = dns
        self.settings = settings
        self.clock = clock
        self._account: Account | None = None
        self._inflight: dict[str, asyncio.Task[None]] = {}
        self._due: dict[str, float] = {}  # name -> when it next needs work
        self._heap: list[tuple[float, str]] = []  # (due, name), stale entries skipped
        self._dirty: set[str] = set()
        self._scanned_at: float | None = None
        self._slots = asyncio.Semaphore(settings.concurrency)

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self.tick()
            except StoreError as exc:
                metrics.STORE_ERRORS.labels("read").inc()
                log.warning("lifecycle pass failed: %s", exc)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), self.settings.tick)
        for task in self._inflight.values():
            task.cancel()

    def notify(self, names: Iterable[str]) -> None:
        """These domains (or their statuses or certificates) changed in the store."""
        self._dirty.update(names)

    async def tick(self) -> list[asyncio.Task[None]]:
        """One pass: start work for every domain that needs it; returns the new tasks.

        Each domain has a due time (when it next needs a look: now, its DNS re-check,
        its retry after a failure, its renewal), kept in a heap; a tick pops what is
        due. A domain's due time is recomputed when it changes (notify), when its work
        ends, and on every full pass (settings.rescan).
        """
        now = self.clock()
        if self._scanned_at is None or now - self._scanned_at >= self.settings.rescan:
            await self._rescan(now)
        elif self._dirty:
            names, self._dirty = self._dirty, set()
            for name in names:
                if name not in self._inflight:
                    await self._refresh(name, now)
        started = []
        heap = self._heap
        while heap and heap[0][0] <= now:
            due, name = heapq.heappop(heap)
            if self._due.get(name) != due or name in self._inflight:
                continue  # superseded by a later due time, or already being worked on
            del self._due[name]
            task = asyncio.create_task(self._work(name), name=f"lifecycle {name}")
            self._inflight[name] = task
            task.add_done_callback(self._forget)
            started.append(task)
        metrics.RENEWALS_DUE.set(len(self._inflight))
        return started

    async def _rescan(self, now: float) -> None:
        self._dirty.clear()  # what changes from here on is seen by the scans or marked again
        domains = [rec.decode(i.value, rec.DomainRecord)
                   for i in await self.store.scan(rec.DOMAINS)]
        cut = len(rec.STATUS)
        statuses = {i.key[cut:]: rec.decode(i.value, rec.StatusRecord)
                    for i in await self.store.scan(rec.STATUS)}
        self._due.clear()
        self._heap = []
        for domain in domains:
            if domain.letsencrypt and domain.name not in self._inflight:
                due = await self._due_time(domain.name, statuses.get(domain.name), now)
                if due is not None:
                    self._due[domain.name] = due
        self._heap = [(due, name) for name, due in self._due.items()]
        heapq.heapify(self._heap)
        self._scanned_at = now

    async def _refresh(self, name: str, now: float) -> None:
        domain = await self.registry.domain(name)
        due = None
        if domain is not None and domain.letsencrypt:
            due = await self._due_time(name, await self.registry.status(name), now)
        if due is None:
            self._due.pop(name, None)
        else:
            self._due[name] = due
            heapq.heappush(self._heap, (due, name))

    def _forget(self, task: asyncio.Task[None]) -> None:
        for name, t in list(self._inflight.items()):
            if t is task:
                del self._inflight[name]
                self._dirty.add(name)  # its status changed: look at it again

    async def settle(self) -> None:
        """Wait for the work in flight (tests)."""
        while self._inflight:
            await asyncio.gather(*self._inflight.values(), return_exceptions=True)

    async def _due_time(self, name: str, status: rec.StatusRecord | None,
                        now: float) -> float:
        """When `name` next needs work; `now` or earlier means at once."""
        if status is not None and status.retry_at > now:
            return status.retry_at  # backing off after a failure
        if status is not None and status.state == "issued" and status.renew_at > now:
            # Written with the certificate: no need to read it (PEM and all) to know
            # it is valid and not due.
            return status.renew_at
        acme = await self.registry.certificate(name, "acme")
        if acme is not None and now < acme.not_after:
            # Valid, or valid in a moment (a CA clock slightly ahead of ours): either
            # way we hold it, and only its renewal time says when to order again.
            return status.renew_at if status is not None and status.renew_at else \
                renewal.renew_at(acme.not_before, acme.not_after)
        if status is None or status.state != "pending_dns":
            return now
        return status.next_dns_check

    async def _work(self, name: str) -> None:
        async with self._slots:
            try:
                await self._obtain(name)
            except Exception:  # one domain's bug must not stop the others
                log.exception("lifecycle work for %s failed", name)

    async def _obtain(self, name: str) -> None:
        verdict = await self.dns.check(name)
        metrics.DNS_CHECKS.labels("ok" if verdict.points_at_us else "not_pointing").inc()
        now = self.clock()
        if not verdict.points_at_us:
            await self._note(name, state="pending_dns", message=verdict.reason,
                             next_dns_check=now + self.settings.check_interval)
            return
        try:
            lease = await self.store.lock(rec.lock_name(name), ttl=self.settings.lock_ttl)
        except LockTimeout:
            return  # another lifecycle (process or node) is on it
        try:
            await self._order_locked(name, lease)
        finally:
            await lease.release()

    async def _order_locked(self, name: str, lease: Lease) -> None:
        # Lock, then check again: another node may have finished while we waited.
        domain = await self.registry.domain(name)
        if domain is None or not domain.letsencrypt:
            return
        now = self.clock()
        if await self._due_time(name, await self.registry.status(name), now) > now:
            return
        acme = await self.registry.certificate(name, "acme")
        renewing = acme is not None and self.clock() < acme.not_after
        await self._note(name, state="creating",
                         message="renewing" if renewing else "ordering a certificate")
        started = time.monotonic()
        keeper = asyncio.create_task(self._keep(lease), name=f"lease {name}")
        try:
            account = await self._ensure_account()
            issued = await self.acme.order(account, name, StoreChallenges(self.store))
            # No time check: the CA just issued it, and a CA clock a second ahead of
            # ours makes not_before "in the future"; rejecting it would waste the order.
            # The data plane serves it from not_before on (serving_certificate).
            bundle = load_bundle(issued.chain_pem, issued.key_pem, domain=name,
                                 check_time=False)
        except (IssuanceError, BundleError) as exc:
            metrics.ACME_ORDERS.labels("failed").inc()
            await self._failed(name, exc, renewing)
            return
        finally:
            keeper.cancel()
        metrics.ACME_ORDERS.labels("ok").inc()
        metrics.ACME_ORDER_SECONDS.observe(time.monotonic() - started)
        if not await lease.refresh():
            # Fencing: our lease expired while we worked and someone else may hold
            # the lock now; their result wins, ours is dropped.
            log.warning("lost the lock for %s during the order; discarding the result", name)
            return
        if await self.registry.domain(name) is None:
            # `domains remove` ran while the CA answered: storing now would leave a
            # certificate (and its key) behind for a domain nobody has.
            log.info("%s was removed during its order; discarding the certificate", name)
            return
        ari = None
        with contextlib.suppress(IssuanceError):
            ari = await self.acme.renewal_time(account, issued.chain_pem)
        await self.registry.store_acme_certificate(name, bundle)
        await self._note(name, state="issued", message="certificate issued", last_error="",
                         failures=0, retry_at=0.0,
                         renew_at=renewal.renew_at(bundle.not_before, bundle.not_after, ari))
        log.info("certificate for %s issued, valid until %s", name,
                 time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(bundle.not_after)))

    async def _failed(self, name: str, exc: Exception, renewing: bool) -> None:
        status = await self.registry.status(name)
        failures = (status.failures if status is not None else 0) + 1
        retry_after = exc.retry_after if isinstance(exc, IssuanceError) else None
        # A problem the CA says will not go away by itself (CAA forbids us, the name
        # is rejected) is retried at the slowest step straight away.
        permanent = isinstance(exc, IssuanceError) and exc.permanent
        delay = renewal.retry_delay(len(renewal.BACKOFF) if permanent else failures,
                                    retry_after)
        message = str(exc)
        log.warning("certificate order for %s failed (%d in a row), retrying in %.0fs: %s",
                    name, failures, delay, message)
        # A renewal failure keeps the old certificate serving: state stays "issued".
        await self._note(name, state="issued" if renewing else "error",
                         message="renewal failed; the current certificate keeps serving"
                         if renewing else "order failed",
                         last_error=message, failures=failures,
                         retry_at=self.clock() + delay)

    async def _note(self, name: str, **changes: object) -> None:
        if await self.registry.domain(name) is None:
            return  # removed meanwhile: leave no status behind
        before = await self.registry.status(name)
        after = await self.registry.set_status(name, **changes)
        if before is None or before.state != after.state:
            # One line per transition: operators (and the e2e tests) follow a domain
            # through Pending DNS -> Creating -> issued in the log.
            log.info("status of %s: %s -> %s (%s)", name,
                     before.state if before is not None else "none", after.state,
                     after.last_error or after.message)

    async def _keep(self, lease: Lease) -> None:
        """Refresh the domain lock while the order runs (a dead holder stops doing so)."""
        while True:
            await asyncio.sleep(self.settings.lock_ttl / 3)
            if not await lease.refresh():
                return

    async def _ensure_account(self) -> Account:
        if self._account is not None:
            return self._account
        # The account is shared by every lifecycle on this store: take it from the
        # store, and create it under a lock so two nodes do not register two.
        lease = await self.store.lock("acme-account", ttl=self.settings.lock_ttl, wait=60.0)
        try:
            item = await self.store.get(rec.ACME_ACCOUNT)
            existing = None
            if item is not None:
                record = rec.decode(item.value, rec.AccountRecord)
                existing = Account(directory=record.directory, uri=record.uri,
                                   key_pem=record.key_pem, email=record.email)
            account = await self.acme.ensure_account(existing)
            if account != existing:
                record = rec.AccountRecord(directory=account.directory, uri=account.uri,
                                           key_pem=account.key_pem, email=account.email)
                await self.store.put(rec.ACME_ACCOUNT, rec.encode(record), secret=True)
        finally:
            await lease.release()
        self._account = account
        return account
