"""The domain rules in one place: add/remove a domain, upload/remove a custom
certificate (validated before anything is written), and the per-domain views.

Used by the CLI, the admin API and the lifecycle alike, so a rule is written once.
Talks to any Store; never imports the data plane or a store backend. Parsing and
checking uploads runs on a thread, so the caller's event loop never waits on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator, Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import msgspec

from proxy import names
from proxy.certs import trust
from proxy.certs.bundle import CertBundle, load_bundle
from proxy.config import Config
from proxy.errors import BundleError, ConflictError, InvalidName, RegistryError
from proxy.store import check_store, open_store
from proxy.store import records as rec
from proxy.store.base import MAX_WRITES, Store, Write

STATUS_LABELS = {
    "pending_dns": "Pending DNS",
    "creating": "Creating",
    "in_use": "In use",
    "not_used": "Not used",
    "error": "Error",
    "disabled": "Disabled",
    "acme_off": "ACME off",
    "config": "Config",
}
ACME_OFF = ("the config has no acme: section: no Let's Encrypt certificate is ordered "
            "(the platform certificate answers)")


class UnknownDomain(RegistryError):
    """No domain of that name, in the store or the config file."""


class ConfigDomain(RegistryError):
    """A change asked for a domain of the config file's `domains:`: read-only here."""


@dataclass(frozen=True, slots=True)
class CertView:
    source: str
    names: tuple[str, ...]
    issuer: str
    not_before: float
    not_after: float
    fingerprint: str

    @classmethod
    def of(cls, record: rec.CertMeta) -> CertView:
        return cls(record.source, record.names, record.issuer, record.not_before,
                   record.not_after, record.fingerprint)


@dataclass(frozen=True, slots=True)
class DomainView:
    """What a person sees for one domain (CLI table, admin API, dashboard)."""

    name: str
    app: str
    letsencrypt: bool
    in_use: str              # custom | letsencrypt | platform
    expires_at: float | None  # of the certificate in use (None: the platform's)
    status: str              # pending_dns | creating | in_use | not_used | error | disabled
    message: str
    last_error: str
    custom: CertView | None
    acme: CertView | None
    # Why browsers would refuse the custom certificate in use (an incomplete chain),
    # or that a domain just added is the config file's too: checked for one domain's
    # view (show, add and upload answers), never for the listing.
    warnings: tuple[str, ...] = ()
    # store (added with the CLI or the API) or config (the config file's `domains:`,
    # read-only here: served with the config's certificates, changed by a reload).
    source: str = "store"

    @property
    def status_label(self) -> str:
        return STATUS_LABELS[self.status]

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["status_label"] = self.status_label
        return data


def view_status(letsencrypt: bool, custom: rec.Validity | None, acme: rec.Validity | None,
                state: str, now: float, *, acme_on: bool = True) -> tuple[str, str]:
    """(in_use, status) of a domain now: the two columns every view and the domain
    metrics show. `state` is the lifecycle's (pending_dns when it has written none);
    `acme_on` False (no acme: section) turns Pending DNS into acme_off."""
    serving = rec.serving_certificate(custom, acme, now)
    custom_serving = serving is not None and serving.source == "custom"
    if not letsencrypt:
        label = "disabled"
    elif acme is not None and acme.not_before <= now < acme.not_after:
        # An issued ACME certificate is "In use" unless a valid custom one wins;
        # a renewal in flight or a failed renewal does not change that.
        label = "not_used" if custom_serving else "in_use"
    elif acme is not None and now < acme.not_before and state != "error":
        label = "creating"  # issued, valid in a moment (the CA's clock is ahead)
    elif state == "issued":
        # Issued once and expired before a renewal: no longer served, an error (not
        # "Pending DNS": DNS has nothing to do with it). derive_view says why.
        label = "error"
    else:
        label = state
    if not acme_on and label == "pending_dns":  # nothing will ever be ordered
        label = "acme_off"
    in_use = ("custom" if custom_serving else "letsencrypt" if serving is not None
              else "platform")
    return in_use, label


def derive_view(domain: rec.DomainRecord, custom: rec.CertMeta | None,
                acme: rec.CertMeta | None, status: rec.StatusRecord | None,
                now: float, *, acme_on: bool = True) -> DomainView:
    """Combine the stored records into what is true now (serving choice + status)."""
    serving = rec.serving_certificate(custom, acme, now)
    in_use, label = view_status(domain.letsencrypt, custom, acme,
                                status.state if status is not None else "pending_dns", now,
                                acme_on=acme_on)
    message = status.message if status is not None else ""
    if label == "acme_off":
        message = ACME_OFF
    if status is not None and status.state == "issued" and label == "error":
        message = _expired_message(acme, in_use, status, now)
    return DomainView(
        name=domain.name, app=domain.app, letsencrypt=domain.letsencrypt,
        in_use=in_use,
        expires_at=serving.not_after if serving is not None else None,
        status=label,
        message=message,
        last_error=status.last_error if status is not None else "",
        custom=CertView.of(custom) if custom is not None else None,
        acme=CertView.of(acme) if acme is not None else None,
    )


def expiry_words(expires_at: float, now: float) -> str:
    """When a certificate expires, as the dashboard and the CLI say it: 'in 12 days',
    'in less than a day', 'expired 3 days ago', 'expired less than a day ago'."""
    days = int(abs(expires_at - now) // 86400)
    span = "less than a day" if days == 0 else f"{days} day{'' if days == 1 else 's'}"
    return f"expired {span} ago" if expires_at < now else f"in {span}"


def utc_text(ts: float) -> str:
    """A time as statuses write it: '2025-01-31 12:00:00 UTC'."""
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ts))


def _expired_message(acme: rec.CertMeta | None, in_use: str, status: rec.StatusRecord,
                     now: float) -> str:
    """The status message of a Let's Encrypt certificate that expired while the lifecycle's
    last word was "issued" (its renewal kept failing, or no lifecycle ran): the stored
    message spoke of a certificate that was still serving."""
    served = {"custom": "the custom certificate is served",
              "platform": "the platform certificate is served"}.get(in_use, "")
    parts = [f"certificate expired on {utc_text(acme.not_after)}" if acme is not None
             else "certificate missing", served]
    if status.retry_at > now:
        parts.append(f"retrying at {utc_text(status.retry_at)}")
    return "; ".join(p for p in parts if p)


@dataclass(frozen=True, slots=True)
class Added:
    """One name of a bulk add: its view when it was added, else why not (one line)."""

    name: str
    view: DomainView | None
    error: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "added": self.view is not None, "error": self.error,
                "domain": self.view.to_json() if self.view is not None else None}


@dataclass(slots=True)
class _Candidate:
    """A name of a bulk add on its way: `checked` is its challenge once it passed."""

    name: str
    checked: rec.Challenge | None = None
    error: str = ""
    view: DomainView | None = None


class DomainIndex(Protocol):
    """What a node keeps of its domains for listings (the supervisor's: sync.BriefState):
    proxy/listing.py answers a page filtered by a rare status from it."""

    def with_status(self, status: str) -> Collection[str]:
        """The names of the domains whose status is `status` now."""
        ...

    def domain_count(self) -> int:
        ...

    def status_counts(self) -> dict[str, int]:
        """Domains by status, kept as they change (no scan)."""
        ...

    def names(self, after: str, prefix: str) -> Iterator[str]:
        """Domain names after `after` that start with `prefix`, in order."""
        ...

    def describe(self, name: str) -> tuple[str, str] | None:
        """(app, status) of a domain now; None for no domain."""
        ...

    async def settle(self, revision: int) -> None:
        """Return once the index has applied `revision` (a write this node just made),
        or after a short wait."""
        ...


class Registry:
    """Domain operations over a Store. Every method validates fully before writing."""

    def __init__(self, store: Store, *, platform_domain: str, apps: Collection[str],
                 clock: Callable[[], float] = time.time,
                 trusted_ca_file: str | None = None, acme: bool = True,
                 config_domains: Mapping[str, str] | None = None,
                 config_force_https: Mapping[str, bool] | None = None,
                 config_path: str = "") -> None:
        self.store = store
        self.config_path = config_path  # named in the refusal of a change to its domains
        # The config's force_https per app: what an app without a store record has.
        self.config_force_https = dict(config_force_https or {})
        self.config_domains = dict(config_domains or {})  # the config's domains: -> app
        self.acme = acme  # the config has an acme: section (else statuses say ACME off)
        self.platform_domain = platform_domain
        self.config_apps = frozenset(apps)
        self.clock = clock
        self.trusted_ca_file = trusted_ca_file  # tls.trusted_ca_file: roots for uploads
        self.index: DomainIndex | None = None  # the supervisor sets it for its admin API

    @classmethod
    def for_config(cls, store: Store, config: Config) -> Registry:
        """The node's Registry over `store` as `config` sets it up: the one place the
        CLI, the admin API (per request: apps follow reloads) and the lifecycle get it.
        """
        return cls(store, platform_domain=config.platform_domain, apps=config.apps.keys(),
                   trusted_ca_file=config.tls.trusted_ca_file, acme=config.acme is not None,
                   config_domains=config.domains, config_path=config.source,
                   config_force_https={n: a.force_https for n, a in config.apps.items()})

    # -- reads ----------------------------------------------------------------------
    async def domain(self, name: str) -> rec.DomainRecord | None:
        item = await self.store.get(rec.domain_key(name))
        return rec.decode(item.value, rec.DomainRecord) if item else None

    async def certificate(self, name: str, source: rec.CertSource) -> rec.CertRecord | None:
        item = await self.store.get(rec.cert_key(name, source))
        return rec.decode(item.value, rec.CertRecord) if item else None

    async def certificate_bundle(self, name: str,
                                 source: rec.CertSource) -> CertBundle | None:
        """The certificate with its chain and key (metadata and key material records
        read together); BundleError when the material it points at is missing."""
        record = await self.certificate(name, source)
        if record is None:
            return None
        item = await self.store.get(rec.pem_key(name, source, record.fingerprint))
        material = rec.decode(item.value, rec.KeyMaterial) if item is not None else None
        return record.bundle(material)

    async def status(self, name: str) -> rec.StatusRecord | None:
        item = await self.store.get(rec.status_key(name))
        return rec.decode(item.value, rec.StatusRecord) if item else None

    async def view(self, name: str) -> DomainView:
        name = self._name(name)
        domain = await self.domain(name)
        if domain is None and name in self.config_domains:
            return self.config_view(name)
        if domain is None:
            raise UnknownDomain(f"domain {name} does not exist")
        view = derive_view(domain, await self.certificate(name, "custom"),
                           await self.certificate(name, "acme"), await self.status(name),
                           self.clock(), acme_on=self.acme)
        if view.in_use != "custom":
            return view
        return dataclasses.replace(view, warnings=await self._chain_warnings(name))

    async def views(self) -> list[DomainView]:
        domains = [rec.decode(i.value, rec.DomainRecord)
                   for i in await self.store.scan(rec.DOMAINS)]
        certs: dict[str, rec.CertMeta] = {}  # metadata only: no key is decoded for a view
        for item in await self.store.scan(rec.CERTS):
            certs[item.key] = rec.decode(item.value, rec.CertMeta)
        statuses = {i.key: rec.decode(i.value, rec.StatusRecord)
                    for i in await self.store.scan(rec.STATUS)}
        now = self.clock()
        views = [derive_view(d, certs.get(rec.cert_key(d.name, "custom")),
                             certs.get(rec.cert_key(d.name, "acme")),
                             statuses.get(rec.status_key(d.name)), now, acme_on=self.acme)
                 for d in domains]
        stored = {d.name for d in domains}
        return views + [self.config_view(n) for n in sorted(self.config_domains)
                        if n not in stored]

    def config_view(self, name: str) -> DomainView:
        """The view of a domain of the config file (read-only here)."""
        return DomainView(
            name=name, app=self.config_domains[name], letsencrypt=False, in_use="config",
            expires_at=None, status="config",
            message="set in the config file (domains:): served with the config's "
                    "certificates; change it there and reload",
            last_error="", custom=None, acme=None, source="config")

    def _missing(self, name: str) -> RegistryError:
        """The refusal for a change to a domain the store does not hold."""
        if name in self.config_domains:
            return ConfigDomain(
                f"domain {name} is defined in the config file {self.config_path or '(domains:)'}"
                "; change or remove it there, then reload (`tlsedge reload`)")
        return UnknownDomain(f"domain {name} does not exist")

    async def require(self, name: str, *, change: bool = False) -> None:
        """`name` (in normal form) is a domain here: one of the store's, or, to be read,
        one of the config file's. UnknownDomain if not; ConfigDomain for a change to a
        config one (the admin API answers 404 and 409)."""
        if await self.domain(name) is None and (change or name not in self.config_domains):
            raise self._missing(name)

    async def apps(self) -> set[str]:
        stored = {k[len(rec.APPS):] for k in await self.store.keys(rec.APPS)}
        return set(self.config_apps) | stored

    async def app_settings(self, app: str) -> dict[str, Any]:
        """An app's live settings: its store record's over the config's."""
        if app not in await self.apps():
            raise RegistryError(f"app {app!r} does not exist")
        item = await self.store.get(rec.app_key(app))
        if item is not None:
            return {"name": app, "force_https": rec.decode(item.value, rec.AppRecord).force_https}
        return {"name": app, "force_https": self.config_force_https.get(app, False)}

    async def set_force_https(self, app: str, force_https: bool) -> dict[str, Any]:
        """Redirect the app's plain-HTTP requests to HTTPS (and send HSTS), or serve
        them: an app setting in the store, applied by every worker without a reload.
        A config app gets a record of settings only (its backends stay the config's)."""
        if app not in await self.apps():
            raise RegistryError(f"app {app!r} does not exist")
        key = rec.app_key(app)
        for _ in range(8):
            item = await self.store.get(key)
            current = (rec.decode(item.value, rec.AppRecord) if item is not None
                       else rec.AppRecord(name=app))
            updated = msgspec.structs.replace(current, force_https=force_https)
            try:
                await self.store.put(key, rec.encode(updated),
                                     expect=item.revision if item is not None else 0)
            except ConflictError:
                continue
            return {"name": app, "force_https": force_https}
        raise RegistryError(f"settings of app {app} keep changing under us; try again")

    # -- writes ---------------------------------------------------------------------
    async def add_domain(self, name: str, app: str, *, letsencrypt: bool = True,
                         chain: bytes | None = None, key: bytes | None = None,
                         challenge: rec.Challenge | None = None) -> DomainView:
        """A host name, or a one-label wildcard `*.shop.example.com` (every subdomain
        one label down; its certificate needs DNS-01, the CA's only way for wildcards)."""
        # The first check reads the Public Suffix List (~60 ms): off the loop.
        name, challenge = await asyncio.to_thread(self._new_name, name, challenge)
        known = await self.apps()
        if app not in known:
            raise RegistryError(f"app {app!r} does not exist (apps: "
                                f"{', '.join(sorted(known)) or 'none'})")
        bundle = (await self._validate(name, chain, key)
                  if chain is not None or key is not None else None)
        now = self.clock()
        record = rec.DomainRecord(name=name, app=app, letsencrypt=letsencrypt, created_at=now,
                                  challenge=challenge or "http-01")
        try:
            await self.store.put(rec.domain_key(name), rec.encode(record), expect=0)
        except ConflictError:
            raise RegistryError(f"domain {name} already exists") from None
        if bundle is not None:
            await self._put_custom(name, bundle)
        state: rec.State = "pending_dns" if letsencrypt else "disabled"
        await self.set_status(name, state=state, message="added", next_dns_check=0.0)
        view = await self.view(name)
        if name not in self.config_domains:
            return view
        return dataclasses.replace(view, warnings=(*view.warnings, (
            f"{name} is also in the config file {self.config_path or '(domains:)'}: the "
            "store's domain wins from now on (its app, its certificate once it has one); "
            "remove it from the config file")))

    async def add_domains(self, raw_names: Sequence[str], app: str, *,
                          letsencrypt: bool = True,
                          challenge: rec.Challenge | None = None) -> list[Added]:
        """Add many domains to `app` at once (a migration, a customer's shops): each
        name is checked on its own by add_domain's rules, and the valid ones are
        written in one store transaction per batch. One result per name, in order; an
        unknown app refuses the whole call (nothing is written)."""
        known = await self.apps()
        if app not in known:
            raise RegistryError(f"app {app!r} does not exist (apps: "
                                f"{', '.join(sorted(known)) or 'none'})")
        results = await asyncio.to_thread(self._check_names, raw_names, challenge)
        valid = [r for r in results if r.checked is not None]
        found = await asyncio.gather(*(self.store.get(rec.domain_key(r.name)) for r in valid))
        fresh = [r for r, item in zip(valid, found, strict=True) if item is None]
        for r, item in zip(valid, found, strict=True):
            if item is not None:
                r.error, r.checked = f"domain {r.name} already exists", None
        size = MAX_WRITES // 2  # a domain and its status each
        for start in range(0, len(fresh), size):
            await self._create(fresh[start:start + size], app, letsencrypt)
        return [Added(r.name, r.view, r.error) for r in results]

    def _check_names(self, raw_names: Sequence[str],
                     challenge: rec.Challenge | None) -> list[_Candidate]:
        seen: set[str] = set()
        results = []
        for raw in raw_names:
            try:
                name, chosen = self._new_name(raw, challenge)
            except RegistryError as exc:
                results.append(_Candidate(raw.strip(), error=str(exc)))
                continue
            if name in seen:
                results.append(_Candidate(name, error=f"{name} is listed more than once"))
                continue
            seen.add(name)
            results.append(_Candidate(name, checked=chosen or "http-01"))
        return results

    async def _create(self, batch: list[_Candidate], app: str, letsencrypt: bool) -> None:
        """One transaction for a batch of new domains and their statuses; a name added
        meanwhile by someone else makes that batch go name by name."""
        now = self.clock()
        state: rec.State = "pending_dns" if letsencrypt else "disabled"
        writes: dict[str, list[Write]] = {}
        for r in batch:
            assert r.checked is not None
            domain = rec.DomainRecord(name=r.name, app=app, letsencrypt=letsencrypt,
                                      created_at=now, challenge=r.checked)
            status = rec.StatusRecord(domain=r.name, state=state, message="added",
                                      updated_at=now)
            writes[r.name] = [Write(rec.domain_key(r.name), rec.encode(domain), expect=0),
                              Write(rec.status_key(r.name), rec.encode(status))]
            r.view = derive_view(domain, None, None, status, now, acme_on=self.acme)
        try:
            await self.store.put_all([w for pair in writes.values() for w in pair])
            return
        except ConflictError:
            pass
        for r in batch:
            try:
                await self.store.put_all(writes[r.name])
            except ConflictError:
                r.error, r.view = f"domain {r.name} already exists", None

    async def remove_domain(self, name: str) -> None:
        name = self._name(name)
        if not await self.store.delete(rec.domain_key(name)):
            raise self._missing(name)
        for source in ("custom", "acme"):
            await self.store.delete(rec.cert_key(name, source))
        await self._drop_material(name)
        await self.store.delete(rec.status_key(name))

    async def set_custom_certificate(self, name: str, chain: bytes, key: bytes) -> DomainView:
        """Validate and store an uploaded certificate; it serves on the next handshake."""
        name = self._name(name)
        if await self.domain(name) is None:
            raise self._missing(name)
        await self._put_custom(name, await self._validate(name, chain, key))
        return await self.view(name)

    async def remove_custom_certificate(self, name: str) -> DomainView:
        name = self._name(name)
        if await self.domain(name) is None:
            raise self._missing(name)
        if not await self.store.delete(rec.cert_key(name, "custom")):
            raise RegistryError(f"domain {name} has no custom certificate")
        await self._drop_material(name, "custom")
        return await self.view(name)

    async def set_status(self, name: str, **changes: Any) -> rec.StatusRecord:
        """Merge `changes` into the domain's status record (the lifecycle's writes).

        Read-merge-write with compare-and-swap, so two lifecycles (processes or
        nodes) writing the same status never lose each other's fields.
        """
        key = rec.status_key(name)
        for _ in range(8):
            item = await self.store.get(key)
            current = (rec.decode(item.value, rec.StatusRecord) if item is not None
                       else rec.StatusRecord(domain=name, state="pending_dns"))
            updated = msgspec.structs.replace(current, updated_at=self.clock(), **changes)
            try:
                await self.store.put(key, rec.encode(updated),
                                     expect=item.revision if item is not None else 0)
            except ConflictError:
                continue
            return updated
        raise RegistryError(f"status of {name} keeps changing under us; try again")

    async def retry(self, name: str) -> DomainView:
        """Have the lifecycle work on `name` now: order a certificate for a domain in
        Error (or whose renewal failed) without waiting out its backoff, or check the
        DNS of one Pending DNS at once. The running lifecycle sees the status change."""
        name = self._name(name)
        domain = await self.domain(name)
        if domain is None:
            raise self._missing(name)
        if not domain.letsencrypt:
            raise RegistryError(f"domain {name} does not use Let's Encrypt; nothing to retry")
        status = await self.status(name)
        view = await self.view(name)
        if view.status in ("in_use", "not_used") and (status is None or not status.failures):
            raise RegistryError(f"domain {name} has a valid Let's Encrypt certificate and no "
                                "failed order; nothing to retry")
        await self.set_status(name, retry_at=0.0, next_dns_check=0.0,
                              message="retry requested; the lifecycle starts at once")
        return await self.view(name)

    async def store_acme_certificate(self, name: str, bundle: CertBundle) -> None:
        await self._put_certificate(name, "acme", bundle)

    # -- helpers --------------------------------------------------------------------
    def _new_name(self, name: str,
                  challenge: rec.Challenge | None) -> tuple[str, rec.Challenge | None]:
        """A name a domain may be added under, and its challenge; RegistryError saying
        why not. Reads the Public Suffix List on its first call: run it on a thread."""
        name = self._name(name)
        if name.startswith("*."):
            if challenge == "http-01":
                raise RegistryError(f"{name}: a wildcard certificate can only be obtained "
                                    "with the DNS-01 challenge")
            challenge = "dns-01"
        if name == self.platform_domain or name.endswith("." + self.platform_domain):
            raise RegistryError(
                f"{name} is under the platform domain {self.platform_domain}; "
                "it is served with the platform certificate")
        try:
            names.require_registrable(name)
        except InvalidName as exc:
            raise RegistryError(str(exc)) from None
        return name, challenge

    def _name(self, name: str) -> str:
        try:
            return names.normalize(name, allow_wildcard=True)
        except InvalidName as exc:
            raise RegistryError(str(exc)) from None

    async def _validate(self, name: str, chain: bytes | None,
                        key: bytes | None) -> CertBundle:
        if chain is None or key is None:
            raise RegistryError("a custom certificate needs both the chain and the key")
        # Up to 1 MiB of PEM and an RSA key check: milliseconds, so on a thread.
        return await asyncio.to_thread(load_bundle, chain, key, domain=name,
                                       now=self.clock())

    async def _chain_warnings(self, name: str) -> tuple[str, ...]:
        """What browsers would say about the custom certificate's chain (on a thread:
        the first check of a trust store version reads its files)."""
        try:
            bundle = await self.certificate_bundle(name, "custom")
        except BundleError:
            return ()  # replaced while we read: the next view checks the new one
        if bundle is None:
            return ()
        warning = await asyncio.to_thread(self._chain_warning, bundle.chain_pem, name,
                                          self.clock())
        return (warning,) if warning is not None else ()

    def _chain_warning(self, chain_pem: bytes, name: str, now: float) -> str | None:
        # A browser checks a wildcard's certificate for a name under it, never for "*.x".
        host = "www" + name[1:] if name.startswith("*.") else name
        return trust.chain_warning(chain_pem, host, trust.anchors(self.trusted_ca_file), now)

    async def _put_custom(self, name: str, bundle: CertBundle) -> None:
        await self._put_certificate(name, "custom", bundle)

    async def _put_certificate(self, name: str, source: rec.CertSource,
                               bundle: CertBundle) -> None:
        """Key material first, then the metadata that points at it, then the material
        it replaces (records.CertRecord says why)."""
        await self.store.put(rec.pem_key(name, source, bundle.fingerprint),
                             rec.encode(rec.KeyMaterial.from_bundle(bundle)), secret=True)
        record = rec.CertRecord.from_bundle(name, source, bundle, self.clock())
        await self.store.put(rec.cert_key(name, source), rec.encode(record), secret=True)
        await self._drop_material(name, source, keep=bundle.fingerprint)

    async def _drop_material(self, name: str, source: rec.CertSource | None = None,
                             keep: str = "") -> None:
        """Delete `name`'s key material records (of `source`, or all), but `keep`'s:
        also sweeps what a writer that died mid-replacement left behind."""
        prefix = f"{rec.PEM}{name}/" + (f"{source}/" if source else "")
        for key in await self.store.keys(prefix):
            parsed = rec.parse_pem_key(key)
            if parsed is not None and parsed[2] != keep:
                await self.store.delete(key)


@contextlib.asynccontextmanager
async def open_registry(config: Config) -> AsyncIterator[Registry]:
    """A Registry over the configured store (for the CLI), closed after; StoreError
    before any change when the store cannot be used (unreachable, or its private keys
    are encrypted with a key this config does not hold)."""
    store = open_store(config)
    try:
        await check_store(store)
        yield Registry.for_config(store, config)
    finally:
        await store.close()
