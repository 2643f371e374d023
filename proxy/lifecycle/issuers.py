"""The CAs a lifecycle orders from (acme.issuers), in order of preference, each with its
ACME client, its account and its External Account Binding.

A domain's orders go to the first issuer; after `fallback_after` failures in a row they
go to the next one (and on round), and an issuer that cannot be reached or asks for a
pause passes the order on to the next at once (Caddy's fallback from Let's Encrypt to
ZeroSSL). A success brings the count back to zero, so renewals start with the first
issuer again. The lifecycle records in the domain's status which issuer issued.

Each issuer has its own account, registered on first use under a store lock of its own
and kept in the store for every node: the first issuer's at `acme/account` (where a
single CA's always was), the others' at `acme/account-<issuer id>`. An account of
another directory found there is replaced (the config changed CA).
"""

from __future__ import annotations

import base64
import binascii
import contextvars
import dataclasses
import hashlib
import logging
import os
import stat
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import msgspec

from proxy import metrics
from proxy.config import Acme
from proxy.errors import ConfigError, IssuanceError
from proxy.lifecycle.acme import Account, AcmeClient, AcmeSettings, IssuerUnavailable
from proxy.lifecycle.budget import Ask, Budget, BudgetIssuer, Wait
from proxy.store import records as rec
from proxy.store.base import Store

__all__ = ["ACCOUNT_LOCK", "Issuer", "Issuers", "current", "dispatch", "hmac_key_problem",
           "issuer_id", "read_hmac_key"]

log = logging.getLogger("tlsedge.lifecycle")

T = TypeVar("T")

ACCOUNT_LOCK = "acme-account"
_ACCOUNT_WAIT = 60.0  # another process may be registering: wait for its account


def issuer_id(directory: str) -> str:
    """The issuer's segment in store keys: stable for its directory URL."""
    return hashlib.sha256(directory.encode()).hexdigest()[:16]


def read_hmac_key(path: str, where: str) -> str:
    """The EAB HMAC key in `path` (base64url, as the CA gives it); ConfigError saying
    what is wrong with the file (the key itself is never shown)."""
    key, problem = _hmac_key(path)
    if problem:
        raise ConfigError(f"{where}: {problem}")
    return key


def hmac_key_problem(path: str) -> str | None:
    """What is wrong with an EAB HMAC key file, or None (check-config, start-up)."""
    return _hmac_key(path)[1] or None


def _hmac_key(path: str) -> tuple[str, str]:
    try:
        mode = os.stat(path).st_mode
        text = Path(path).read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError) as exc:
        return "", f"cannot read {path}: {exc}"
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        return "", f"{path} may be read by group or others; chmod 600 {path}"
    try:
        key = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        key = b""
    if len(key) < 16:
        return "", f"{path} does not hold an HMAC key in base64url (as the CA gives it)"
    return text, ""


@dataclass
class Issuer:
    """One CA: `name` for people (statuses, logs, metrics), `id` for store keys."""

    name: str
    id: str
    client: AcmeClient
    account_key: str  # store key of its account
    lock: str  # store lock taken to register it
    account: Account | None = None


# The issuer the current lifecycle task orders from (each domain's work is a task).
current: contextvars.ContextVar[Issuer | None] = contextvars.ContextVar(
    "tlsedge_issuer", default=None)


class Issuers:
    """The configured CAs in order of preference, with their accounts."""

    def __init__(self, store: Store, issuers: Sequence[Issuer], *, fallback_after: int = 2,
                 lock_ttl: float = 30.0, budgets: Sequence[BudgetIssuer] = ()) -> None:
        if not issuers:
            raise ValueError("at least one issuer")
        self.store = store
        self.all = tuple(issuers)
        self.fallback_after = fallback_after
        self.lock_ttl = lock_ttl
        self.budgets = tuple(budgets)
        for issuer in self.all:
            for result in ("ok", "failed"):  # at 0: the first failure is an increase
                metrics.ACME_ORDERS.labels(issuer.name, result)

    @classmethod
    def single(cls, store: Store, client: AcmeClient, *, lock_ttl: float = 30.0) -> Issuers:
        """One CA, as a lifecycle built around one AcmeClient has."""
        directory = client.settings.directory
        return cls(store, [Issuer(directory.split("/")[2], issuer_id(directory), client,
                                  rec.ACME_ACCOUNT, ACCOUNT_LOCK)], lock_ttl=lock_ttl)

    @classmethod
    def from_config(cls, store: Store, acme: Acme, *, lock_ttl: float) -> Issuers:
        """Every issuer of a resolved acme: section, its EAB key read (ConfigError)."""
        issuers, budgets = [], []
        for index, spec in enumerate(acme.issuers):
            ident = issuer_id(spec.directory)
            eab_kid, eab_key = "", ""
            if spec.eab is not None:
                eab_kid = spec.eab.kid
                eab_key = read_hmac_key(spec.eab.hmac_key_file,
                                        f"acme.issuers[{index}].eab.hmac_key_file")
            client = AcmeClient(AcmeSettings(
                directory=spec.directory, email=acme.email, ca_bundle=spec.ca_bundle,
                key_type=acme.key_type, eab_kid=eab_kid, eab_hmac_key=eab_key),
                max_workers=acme.concurrency)
            first = index == 0
            issuers.append(Issuer(
                spec.name, ident, client,
                rec.ACME_ACCOUNT if first else f"{rec.ACME_ACCOUNT}-{ident}",
                ACCOUNT_LOCK if first else f"{ACCOUNT_LOCK}-{ident}"))
            assert spec.limits is not None  # resolved
            budgets.append(BudgetIssuer(ident, spec.name, spec.limits))
        return cls(store, issuers, fallback_after=acme.fallback_after, lock_ttl=lock_ttl,
                   budgets=budgets)

    @property
    def preferred(self) -> Issuer:
        return self.all[0]

    def candidates(self, failures: int) -> list[Issuer]:
        """The issuers to try for a domain after `failures` failed orders in a row, the
        one to try first first."""
        start = (failures // self.fallback_after) % len(self.all)
        return [*self.all[start:], *self.all[:start]]

    def named(self, name: str) -> Issuer | None:
        return next((i for i in self.all if i.name == name), None)

    def close(self) -> None:
        for issuer in self.all:
            issuer.client.close()

    # -- accounts -------------------------------------------------------------------

    async def account(self, issuer: Issuer) -> Account:
        """The issuer's account: the one known to this process, else the store's (checked
        with the CA), else a new one, registered under the issuer's lock so two nodes do
        not register two."""
        if issuer.account is not None:
            return issuer.account
        lease = await self.store.lock(issuer.lock, ttl=self.lock_ttl, wait=_ACCOUNT_WAIT)
        try:
            existing = await self._stored(issuer)
            account = await issuer.client.ensure_account(existing)
            if account != existing:
                await self._store(issuer, account)
        finally:
            await lease.release()
        issuer.account = account
        return account

    async def replace_account(self, issuer: Issuer, refused: Account) -> Account:
        """A new account in place of one the CA refused, for every node of the store."""
        lease = await self.store.lock(issuer.lock, ttl=self.lock_ttl, wait=_ACCOUNT_WAIT)
        try:
            stored = await self._stored(issuer)
            if (stored is not None and stored != refused
                    and stored.directory == issuer.client.settings.directory):
                account = stored  # another order (or node) replaced it meanwhile
            else:
                account = await issuer.client.ensure_account(None)  # a new key and account
                await self._store(issuer, account)
        finally:
            await lease.release()
        issuer.account = account
        return account

    async def _stored(self, issuer: Issuer) -> Account | None:
        item = await self.store.get(issuer.account_key)
        if item is None:
            return None
        try:
            record = rec.decode(item.value, rec.AccountRecord)
        except msgspec.DecodeError:
            raise IssuanceError(f"the stored ACME account ({issuer.account_key}) is "
                                "unreadable; fix or delete that record") from None
        return Account(directory=record.directory, uri=record.uri, key_pem=record.key_pem,
                       email=record.email)

    async def _store(self, issuer: Issuer, account: Account) -> None:
        record = rec.AccountRecord(directory=account.directory, uri=account.uri,
                                   key_pem=account.key_pem, email=account.email)
        await self.store.put(issuer.account_key, rec.encode(record), secret=True)


async def dispatch(issuers: Issuers, budget: Budget | None, ask: Ask, failures: int,
                   attempt: Callable[[], Awaitable[T]]) -> tuple[Issuer, T] | Wait:
    """Run `attempt` (one order) with the issuers in turn, each within its budget.

    The domain's preferred issuer first (after `failures` in a row, the next one); an
    issuer that cannot be reached, or paused itself with a 503, passes the order on to
    the next at once. A spent budget or a CA's rate limit makes the order wait (a Wait:
    not a failure of the domain); another error is the domain's failure (raised). The
    task's `current` issuer is the one that ordered."""
    candidates = issuers.candidates(failures)
    paused: list[Wait] = []
    for index, issuer in enumerate(candidates):
        last = index == len(candidates) - 1
        grant = None
        if budget is not None:
            decision = await budget.reserve(dataclasses.replace(ask, issuer=issuer.id))
            if isinstance(decision, Wait):
                if not decision.unavailable:
                    return decision  # its turn comes with this issuer's tokens
                paused.append(decision)
                continue
            grant = decision
        current.set(issuer)
        try:
            result = await attempt()
        except IssuanceError as exc:
            wait = await budget.settle(grant, exc) if budget and grant else None
            unavailable = isinstance(exc, IssuerUnavailable)
            if (unavailable or (wait is not None and wait.unavailable)) and not last:
                metrics.ACME_ORDERS.labels(issuer.name, "failed").inc()
                log.warning("%s cannot take the order for %s (%s); trying %s", issuer.name,
                            ask.name, exc, candidates[index + 1].name)
                continue
            if wait is not None:
                metrics.ACME_ORDERS.labels(issuer.name, "failed").inc()
                return wait
            raise
        return issuer, result
    return min(paused, key=lambda w: w.until)
