"""The per-domain status machine of the sidecar: DNS check -> lock -> ACME order ->
store, then renewals (and the CA's renewal window, asked for again as the CA says).
One lifecycle per node; per-domain locks in the store keep two lifecycles (two
processes or two nodes) from ordering the same certificate. An order asks the order
budget first (the CA's rate limits, lifecycle/budget.py: it may wait its turn, said in
the status) and goes to the CAs of acme.issuers in turn (lifecycle/issuers.py).

It keeps going whatever one domain or one pass does: a store record it cannot decode
is logged, counted and skipped (its domain waits until the record is fixed); an
unexpected error in a domain's work puts that domain in Error with a retry time; a
pass that fails is logged and the next one comes after a backoff. When the CA no
longer knows the ACME account, a new one is registered (stored for every node, under
the account lock) and the order is sent again at once.

Never touches the data plane: it writes certificates, statuses and challenge tokens
to the store, and the workers pick them up from there. Time comes from `clock`, so
tests move time instead of sleeping.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TypeVar

import msgspec

from proxy import metrics
from proxy.certs.bundle import CertBundle, load_bundle
from proxy.errors import BundleError, IssuanceError, LockTimeout, StoreError
from proxy.lifecycle import renewal
from proxy.lifecycle.acme import Account, AccountUnknown, AcmeClient, Issued, ari_cert_id
from proxy.lifecycle.budget import Ask, Budget, Wait, urgency
from proxy.lifecycle.dns01 import Dns01
from proxy.lifecycle.dnscheck import DnsChecker, DnsVerdict
from proxy.lifecycle.issuers import Issuers, current, dispatch
from proxy.registry import Registry, utc_text
from proxy.store import records as rec
from proxy.store.base import Item, Lease, Store

log = logging.getLogger("tlsedge.lifecycle")

R = TypeVar("R", bound=rec.Record)

PASS_BACKOFF_MAX = 60.0  # a pass that keeps failing is tried at least once a minute


class Unreadable(Exception):
    """A store record of a domain cannot be decoded (already logged and counted): the
    domain is left alone until the record changes."""


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

    def __init__(self, store: Store, registry: Registry, acme: AcmeClient | Issuers,
                 dns: DnsChecker, settings: LifecycleSettings, *,
                 clock: Callable[[], float] = time.time, dns01: Dns01 | None = None,
                 budget: Budget | None = None) -> None:
        self.store = store
        # The CAs (acme.issuers) and the order budget that keeps to their rate limits
        # (none: orders go out as they come, as a lifecycle built for tests has it).
        self.issuers = acme if isinstance(acme, Issuers) else Issuers.single(
            store, acme, lock_ttl=settings.lock_ttl)
        self.budget = budget
        self.dns01 = dns01  # DNS-01 through the platform's zone (acme.dns01), if set
        self._sweep_at = 0.0  # when to look for TXT records orders left behind
        self.registry = registry
        self.dns = dns
        self.settings = settings
        self.clock = clock
        self._inflight: dict[str, asyncio.Task[None]] = {}
        self._due: dict[str, float] = {}  # name -> when it next needs work
        self._heap: list[tuple[float, str]] = []  # (due, name), stale entries skipped
        self._dirty: set[str] = set()
        self._scanned_at: float | None = None
        self._slots = asyncio.Semaphore(settings.concurrency)
        self._reported: set[tuple[str, str]] = set()  # (key, error) already logged
        self._wake = asyncio.Event()  # notify() saw a change: the next pass comes now

    @property
    def acme(self) -> AcmeClient:
        """The client of the CA this domain's task orders from (issuers.current)."""
        return (current.get() or self.issuers.preferred).client

    async def run(self, stop: asyncio.Event) -> None:
        """Pass after pass until `stop`. No error ends it: one pass that fails is logged
        and the next comes after a backoff (as certmagic's maintenance loop recovers
        from panics): a bug met by one pass must not end issuance and renewal for every
        domain of the node."""
        failures = 0
        try:
            while not stop.is_set():
                wait = self.settings.tick
                try:
                    await self.tick()
                    failures = 0
                except StoreError as exc:
                    metrics.STORE_ERRORS.labels("read").inc()
                    log.warning("lifecycle pass failed: %s", exc)
                except Exception:
                    failures += 1
                    metrics.LIFECYCLE_PASS_FAILURES.inc()
                    wait = min(self.settings.tick * 2 ** min(failures, 10), PASS_BACKOFF_MAX)
                    log.exception("lifecycle pass failed unexpectedly (%d in a row); "
                                  "next pass in %.0f s", failures, wait)
                await self._pause(stop, wait, early=failures == 0)
        finally:
            for task in self._inflight.values():
                task.cancel()

    async def _pause(self, stop: asyncio.Event, seconds: float, *, early: bool) -> None:
        """Until the next pass: `seconds`, or less when stopped or, unless backing off
        after a failed pass (`early` False), when notify() saw a change: a domain just
        added is looked at now, not up to a tick later."""
        waiters = [asyncio.ensure_future(stop.wait())]
        if early:
            waiters.append(asyncio.ensure_future(self._wake.wait()))
        try:
            await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()
        self._wake.clear()

    def notify(self, names: Iterable[str]) -> None:
        """These domains (or their statuses or certificates) changed in the store: the
        next pass looks at them. It comes at once when one of them is new to this
        lifecycle (a domain just added); the changes of domains it knows, such as the
        statuses another node writes while it orders one, wait for the next tick."""
        new = False
        for name in names:
            new = new or not (name in self._dirty or name in self._due
                              or name in self._inflight)
            self._dirty.add(name)
        if new:
            self._wake.set()

    async def tick(self) -> list[asyncio.Task[None]]:
        """One pass: start work for every domain that needs it; returns the new tasks.

        Each domain has a due time (when it next needs a look: now, its DNS re-check,
        its retry after a failure, its renewal, its next ARI poll), kept in a heap; a
        tick pops what is due. A domain's due time is recomputed when it changes
        (notify), when its work ends, and on every full pass (settings.rescan).
        """
        now = self.clock()
        if self.dns01 is not None and now >= self._sweep_at:
            await self._sweep_dns01(now)
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
        """Every domain's due time again, a page of domains at a time with their
        statuses in one batched read: at a million domains the whole store read as
        raw records at once (domains and statuses, ~2 million items) was ~800 MB for a
        moment every `rescan` seconds."""
        self._dirty.clear()  # what changes from here on is seen by the scans or marked again
        due: dict[str, float] = {}
        async for items in self.store.scan_pages(rec.DOMAINS):
            domains = [d for d in self._decoded(items, rec.DomainRecord).values()
                       if d.letsencrypt and d.name not in self._inflight]
            keys = [rec.status_key(d.name) for d in domains]
            found = await self.store.get_many(keys) if keys else []
            for domain, key, item in zip(domains, keys, found, strict=True):
                status = None
                if item is not None:
                    try:
                        status = rec.decode(item.value, rec.StatusRecord)
                    except msgspec.DecodeError as exc:
                        self._unreadable(key, exc)
                        continue
                try:
                    due[domain.name] = await self._due_time(domain.name, status, now)
                except Unreadable:
                    continue
        self._due = due
        self._heap = [(when, name) for name, when in due.items()]
        heapq.heapify(self._heap)
        self._scanned_at = now

    async def _sweep_dns01(self, now: float) -> None:
        """Remove the DNS-01 TXT records an order left when its process died: at start,
        then again once the locks that kept some of them have expired, else every 5 min."""
        assert self.dns01 is not None
        try:
            left = await self.dns01.sweep(self.store, self.settings.lock_ttl)
        except StoreError as exc:
            log.warning("could not look for stale DNS-01 records: %s", exc)
            left = 1
        self._sweep_at = now + (self.settings.lock_ttl if left else 300.0)

    async def _refresh(self, name: str, now: float) -> None:
        due = None
        try:
            domain = await self._read(rec.domain_key(name), rec.DomainRecord)
            if domain is not None and domain.letsencrypt:
                status = await self._read(rec.status_key(name), rec.StatusRecord)
                due = await self._due_time(name, status, now)
        except Unreadable:
            due = None
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

    # -- reading the store ----------------------------------------------------------

    def _decoded(self, items: list[Item], kind: type[R]) -> dict[str, R]:
        """A scan's records by key; an unreadable one is reported and left out."""
        found = {}
        for item in items:
            try:
                found[item.key] = rec.decode(item.value, kind)
            except msgspec.DecodeError as exc:
                self._unreadable(item.key, exc)
        return found

    async def _read(self, key: str, kind: type[R]) -> R | None:
        """One record, or None; Unreadable (reported) when it cannot be decoded."""
        item = await self.store.get(key)
        if item is None:
            return None
        try:
            return rec.decode(item.value, kind)
        except msgspec.DecodeError as exc:
            self._unreadable(key, exc)
            raise Unreadable(key) from None

    def _unreadable(self, key: str, exc: Exception) -> None:
        # The sync side (StoreState.apply) skips such a record too; here its domain is
        # not ordered or renewed, so it is said once per record and error, and counted
        # each time it is skipped (an alert sees it still there).
        prefix = key.split("/", 1)[0] if key.startswith((rec.DOMAINS, rec.STATUS)) else "other"
        metrics.LIFECYCLE_SKIPPED_RECORDS.labels(prefix).inc()
        if (key, str(exc)) not in self._reported:
            self._reported.add((key, str(exc)))
            log.error("skipping unreadable store record %s: %s (its domain is not ordered "
                      "or renewed until the record is fixed)", key, exc)

    # -- when ---------------------------------------------------------------------------

    async def _due_time(self, name: str, status: rec.StatusRecord | None,
                        now: float, *, ari: bool = True) -> float:
        """When `name` next needs work; `now` or earlier means at once. Without `ari`:
        when it next needs an order (an ARI poll alone is not one)."""
        if status is not None and status.retry_at > now:
            return status.retry_at  # backing off after a failure
        if status is not None and status.state == "issued" and status.renew_at > now:
            # Written with the certificate: no need to read it (PEM and all) to know
            # it is valid and not due.
            if ari and 0 < status.ari_at < status.renew_at:
                return status.ari_at  # ask the CA whether its window moved
            return status.renew_at
        acme = await self._read(rec.cert_key(name, "acme"), rec.CertMeta)
        if acme is not None and now < acme.not_after:
            # Valid, or valid in a moment (a CA clock slightly ahead of ours): either
            # way we hold it, and only its renewal time says when to order again.
            return status.renew_at if status is not None and status.renew_at else \
                renewal.renew_at(acme.not_before, acme.not_after)
        if status is None or status.state != "pending_dns":
            return now
        return status.next_dns_check

    # -- the work -----------------------------------------------------------------------

    async def _work(self, name: str) -> None:
        async with self._slots:
            try:
                await self._obtain(name)
            except Unreadable:
                pass  # reported where read; looked at again when the record changes
            except StoreError as exc:  # nothing to record it in: the next pass looks again
                log.warning("lifecycle work for %s stopped: %s", name, exc)
            except Exception as exc:  # one domain's bug must not stop the others
                log.exception("lifecycle work for %s failed", name)
                try:
                    await self._failed(name, exc)
                except Exception as again:  # the store is down: the next pass retries
                    log.warning("could not record the failure of %s: %s", name, again)

    async def _obtain(self, name: str) -> None:
        if not await self._follow_ari(name) or await self._ordered_with_wildcard(name):
            return
        verdict = await self._check_dns(name)
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

    async def _check_dns(self, name: str) -> DnsVerdict:
        """HTTP-01: the domain points at the edge. DNS-01: its challenge is delegated to
        the platform's zone (the reason names the record to create)."""
        domain = await self._read(rec.domain_key(name), rec.DomainRecord)
        if domain is None or domain.challenge != "dns-01":
            return await self.dns.check(name)
        if self.dns01 is None:
            return DnsVerdict(False, "DNS-01 is not set up on this platform (acme.dns01)")
        return await self.dns01.check(name)

    async def _ordered_with_wildcard(self, name: str) -> bool:
        """`x` is ordered with `*.x` when both are attached (one order, one certificate):
        its own work takes the wildcard's certificate when it covers `x`, has the
        wildcard ordered again when it does not (`x` came after), or waits."""
        wildcard = None if name.startswith("*.") or self.dns01 is None else \
            await self._read(rec.domain_key("*." + name), rec.DomainRecord)
        if wildcard is None or not wildcard.letsencrypt:
            return False
        now = self.clock()
        cert = await self._read(rec.cert_key(wildcard.name, "acme"), rec.CertMeta)
        if cert is not None and now < cert.not_after:
            if name in cert.names:
                await self._share_certificate(wildcard.name, name, cert.fingerprint)
            else:  # renewed now, with its apex (_place asks for both)
                await self._note(wildcard.name, renew_at=now, retry_at=0.0, ari_at=0.0)
        await self._note(name, retry_at=now + self.settings.check_interval,
                         message=f"ordered together with {wildcard.name}")
        return True

    async def _share_certificate(self, wildcard: str, apex: str, fingerprint: str) -> None:
        """Serve `apex` with its wildcard's certificate (which covers it), once."""
        mine = await self._read(rec.cert_key(apex, "acme"), rec.CertMeta)
        bundle = await self.registry.certificate_bundle(wildcard, "acme")
        if bundle is None or (mine is not None and mine.fingerprint == fingerprint):
            return
        status = await self._read(rec.status_key(wildcard), rec.StatusRecord)
        await self.registry.store_acme_certificate(apex, bundle)
        await self._note(apex, state="issued", message="certificate issued", last_error="",
                         failures=0, renew_at=status.renew_at if status is not None else 0.0)

    async def _apex(self, name: str) -> tuple[str, ...]:
        """The apex `x` of a wildcard `*.x` when it is attached too (same order)."""
        if not name.startswith("*."):
            return ()
        apex = await self._read(rec.domain_key(name[2:]), rec.DomainRecord)
        return (apex.name,) if apex is not None and apex.letsencrypt else ()

    async def _follow_ari(self, name: str) -> bool:
        """When it is time, ask the CA for the renewal window of `name`'s certificate
        again and follow it; whether to go on and order now."""
        now = self.clock()
        status = await self._read(rec.status_key(name), rec.StatusRecord)
        if (status is None or status.state != "issued" or status.retry_at > now
                or status.renew_at <= now or not 0 < status.ari_at <= now):
            return True  # not an ARI poll: the usual work
        current.set(self.issuers.named(status.issuer))  # the CA that issued it knows
        try:
            bundle = await self.registry.certificate_bundle(name, "acme")
        except BundleError as exc:
            log.warning("cannot ask for the renewal window of %s: %s", name, exc)
            bundle = None
        if bundle is None:
            await self._note(name, ari_at=0.0)
            return False
        window, ari_at = await self._ask_ari(name, bundle.chain_pem, now)
        renew_at = renewal.follow_window(status.renew_at, bundle.not_before,
                                         bundle.not_after, window)
        if renew_at != status.renew_at:
            log.info("the CA moved the renewal window of %s: renewing at %s", name,
                     utc_text(renew_at))
        await self._note(name, renew_at=renew_at, ari_at=ari_at)
        return renew_at <= now

    async def _ask_ari(self, name: str, chain_pem: bytes,
                       now: float) -> tuple[tuple[float, float] | None, float]:
        """The CA's renewal window for a certificate of `name` (None: it has none) and
        when to ask again (0: never)."""
        try:
            info = await self.acme.renewal_info(await self._ensure_account(), chain_pem)
        except IssuanceError as exc:
            log.warning("could not ask the CA for the renewal window of %s: %s", name, exc)
            return None, now + renewal.ARI_AFTER_ERROR
        if info is None:
            return None, 0.0
        return info.window, now + renewal.ari_delay(info.retry_after)

    async def _order_locked(self, name: str, lease: Lease) -> None:
        # Lock, then check again: another node may have finished while we waited.
        domain = await self._read(rec.domain_key(name), rec.DomainRecord)
        if domain is None or not domain.letsencrypt:
            return
        now = self.clock()
        status = await self._read(rec.status_key(name), rec.StatusRecord)
        if await self._due_time(name, status, now, ari=False) > now:
            return
        acme = await self._read(rec.cert_key(name, "acme"), rec.CertMeta)
        renewing = acme is not None and now < acme.not_after
        replaces: str | None = None

        async def attempt() -> tuple[Account, Issued]:
            await self._note(name, state="creating",
                             message="renewing" if renewing else "ordering a certificate")
            # Only the CA that issued the certificate knows what `replaces` names.
            issuer = status.issuer if status is not None else ""
            return await self._order(name, replaces if self._issuer_name() == issuer else None)

        started = time.monotonic()
        keeper = asyncio.create_task(self._keep(lease), name=f"lease {name}")
        try:
            ask = await self._ask(domain, status, acme, now)
            replaces = await self._replaces(name, ask)
            outcome = await dispatch(self.issuers, self.budget, ask,
                                     status.failures if status is not None else 0, attempt)
            if isinstance(outcome, Wait):
                await self._wait(name, outcome, renewing)
                return
            _, (account, issued) = outcome
            # No time check: the CA just issued it, and a CA clock a second ahead of
            # ours makes not_before "in the future"; rejecting it would waste the order.
            # The data plane serves it from not_before on (serving_certificate).
            bundle = load_bundle(issued.chain_pem, issued.key_pem, domain=name,
                                 check_time=False)
        except (IssuanceError, BundleError) as exc:
            metrics.ACME_ORDERS.labels(self._issuer_name(), "failed").inc()
            await self._failed(name, exc)
            return
        finally:
            keeper.cancel()
        metrics.ACME_ORDERS.labels(self._issuer_name(), "ok").inc()
        metrics.ACME_ORDER_SECONDS.observe(time.monotonic() - started)
        if not await lease.refresh():
            # Fencing: our lease expired while we worked and someone else may hold
            # the lock now; their result wins, ours is dropped.
            log.warning("lost the lock for %s during the order; discarding the result", name)
            return
        if await self._read(rec.domain_key(name), rec.DomainRecord) is None:
            # `domains remove` ran while the CA answered: storing now would leave a
            # certificate (and its key) behind for a domain nobody has.
            log.info("%s was removed during its order; discarding the certificate", name)
            return
        await self._issued(name, account, bundle)

    async def _ask(self, domain: rec.DomainRecord, status: rec.StatusRecord | None,
                   acme: rec.CertMeta | None, now: float) -> Ask:
        """What an order for `domain` asks of the budget, and its place in the queue."""
        name = domain.name
        names = (name, *await self._apex(name))
        renewing = acme is not None and now < acme.not_after
        return Ask(issuer="", name=name, names=names,
                   urgency=urgency(name, expires=acme.not_after if acme else None,
                                   created_at=domain.created_at),
                   renewal=acme is not None and set(acme.names) == set(names),
                   ari=renewing and status is not None and status.ari_at > 0)

    async def _replaces(self, name: str, ask: Ask) -> str | None:
        """The ARI id of the certificate an ARI-guided renewal replaces (RFC 9773 5): the
        order names it, so the CA links the two and counts no new order for it."""
        if not ask.ari:
            return None
        try:
            bundle = await self.registry.certificate_bundle(name, "acme")
        except BundleError as exc:
            log.warning("renewing %s without `replaces`: %s", name, exc)
            return None
        return None if bundle is None else ari_cert_id(bundle.chain_pem)

    async def _wait(self, name: str, wait: Wait, renewing: bool) -> None:
        """The order waits for the budget or a pause the CA asked for: said in the
        status (its state unchanged: no failure) and due again at its turn."""
        if not renewing:
            await self._note(name, message=wait.reason, retry_at=wait.until)
            return
        acme = await self._read(rec.cert_key(name, "acme"), rec.CertMeta)
        serving = (f"; the current certificate keeps serving until {utc_text(acme.not_after)}"
                   if acme is not None else "")
        await self._note(name, message=f"renewal {wait.reason}{serving}", retry_at=wait.until)

    def _issuer_name(self) -> str:
        return (current.get() or self.issuers.preferred).name

    async def _order(self, name: str, replaces: str | None = None) -> tuple[Account, Issued]:
        """Order with the node's account. When the CA no longer knows it (restarted,
        database reset, account deactivated), register a new one and order again at
        once; a second refusal is an ordinary failure, retried with backoff."""
        account = await self._ensure_account()
        try:
            return account, await self._place(account, name, replaces)
        except AccountUnknown as exc:
            log.warning("the CA refused ACME account %s (%s); registering a new account",
                        account.uri, exc)
        account = await self._replace_account(account)
        return account, await self._place(account, name, replaces)

    async def _place(self, account: Account, name: str, replaces: str | None) -> Issued:
        """One order: DNS-01 for a domain that asks for it (with its apex, when both are
        attached), else HTTP-01, then DNS-01 if that failed and acme.dns01.fallback.
        `replaces`: the ARI id of the certificate it renews (_replaces)."""
        challenges = StoreChallenges(self.store)
        domain = await self._read(rec.domain_key(name), rec.DomainRecord)
        dns01 = self.dns01
        if dns01 is not None and domain is not None and domain.challenge == "dns-01":
            return await self.acme.order(account, name, challenges, also=await self._apex(name),
                                         dns=dns01.publisher(self.store, name),
                                         replaces=replaces)
        try:
            return await self.acme.order(account, name, challenges, replaces=replaces)
        except AccountUnknown:
            raise
        except IssuanceError as exc:
            if dns01 is None or not dns01.settings.fallback:
                raise
            verdict = await dns01.check(name)
            if not verdict.points_at_us:
                raise IssuanceError(f"{exc}; no DNS-01 fallback: {verdict.reason}",
                                    retry_after=exc.retry_after,
                                    permanent=exc.permanent) from None
            log.info("HTTP-01 order for %s failed (%s); ordering with DNS-01", name, exc)
        return await self.acme.order(account, name, challenges,
                                     dns=dns01.publisher(self.store, name), replaces=replaces)

    async def _issued(self, name: str, account: Account, bundle: CertBundle) -> None:
        window, ari_at = await self._ask_ari(name, bundle.chain_pem, self.clock())
        renew_at = renewal.renew_at(bundle.not_before, bundle.not_after, window)
        # A wildcard's order covered its apex too when both are attached: both serve it.
        for each in (name, *[a for a in await self._apex(name) if bundle.covers(a)]):
            await self.registry.store_acme_certificate(each, bundle)
            await self._note(each, state="issued",
                             message=f"certificate issued by {self._issuer_name()}",
                             last_error="", failures=0, retry_at=0.0, ari_at=ari_at,
                             renew_at=renew_at, issuer=self._issuer_name())
        log.info("certificate for %s issued, valid until %s", name, utc_text(bundle.not_after),
                 extra={"domain": name, "issuer": bundle.issuer,
                        "not_after": utc_text(bundle.not_after)})

    async def _failed(self, name: str, exc: Exception) -> None:
        """Record a failed order (or an unexpected error in a domain's work) with its
        retry time, in words that say what is served meanwhile."""
        status = await self._read(rec.status_key(name), rec.StatusRecord)
        acme = await self._read(rec.cert_key(name, "acme"), rec.CertMeta)
        failures = (status.failures if status is not None else 0) + 1
        retry_after = exc.retry_after if isinstance(exc, IssuanceError) else None
        # A problem the CA says will not go away by itself (CAA forbids us, the name
        # is rejected) is retried at the slowest step straight away.
        permanent = isinstance(exc, IssuanceError) and exc.permanent
        delay = renewal.retry_delay(len(renewal.BACKOFF) if permanent else failures,
                                    retry_after)
        error = str(exc) if isinstance(exc, IssuanceError | BundleError) else \
            f"internal error: {type(exc).__name__}: {exc}"
        now = self.clock()
        retrying = f"retrying at {utc_text(now + delay)}"
        log.warning("certificate order for %s failed (%d in a row), retrying in %.0fs: %s",
                    name, failures, delay, error,
                    extra={"domain": name, "reason": str(error), "failures": failures})
        if acme is not None and now < acme.not_after:
            # A renewal failure keeps the old certificate serving: state stays "issued".
            state: rec.State = "issued"
            message = (f"renewal failed; the current certificate keeps serving until "
                       f"{utc_text(acme.not_after)}; {retrying}")
        elif acme is not None:
            custom = await self._read(rec.cert_key(name, "custom"), rec.CertMeta)
            served = "custom" if rec.serving_certificate(custom, None, now) else "platform"
            state = "error"
            message = (f"certificate expired on {utc_text(acme.not_after)}; the {served} "
                       f"certificate is served; order failed; {retrying}")
        else:
            state, message = "error", f"order failed; {retrying}"
        await self._note(name, state=state, message=message, last_error=error,
                         failures=failures, retry_at=now + delay)

    async def _note(self, name: str, **changes: object) -> None:
        if await self._read(rec.domain_key(name), rec.DomainRecord) is None:
            return  # removed meanwhile: leave no status behind
        before = await self._read(rec.status_key(name), rec.StatusRecord)
        after = await self.registry.set_status(name, **changes)
        if before is None or before.state != after.state:
            # One line per transition: operators (and the e2e tests) follow a domain
            # through Pending DNS -> Creating -> issued in the log.
            log.info("status of %s: %s -> %s (%s)", name,
                     before.state if before is not None else "none", after.state,
                     after.last_error or after.message,
                     extra={"domain": name, "status": after.state,
                            "reason": after.last_error or after.message})

    async def _keep(self, lease: Lease) -> None:
        """Refresh the domain lock while the order runs (a dead holder stops doing so)."""
        while True:
            await asyncio.sleep(self.settings.lock_ttl / 3)
            if not await lease.refresh():
                return

    # -- the account ----------------------------------------------------------------------

    async def _ensure_account(self) -> Account:
        return await self.issuers.account(current.get() or self.issuers.preferred)

    async def _replace_account(self, refused: Account) -> Account:
        """A new account in place of one the CA refused, for every node of the store."""
        return await self.issuers.replace_account(current.get() or self.issuers.preferred,
                                                  refused)
