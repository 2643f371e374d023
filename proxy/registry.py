"""The domain rules in one place: add/remove a domain, upload/remove a custom
certificate (validated before anything is written), and the per-domain views.

Used by the CLI, the admin API and the lifecycle alike, so a rule is written once.
Talks to any Store; never imports the data plane or a store backend.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection
from dataclasses import asdict, dataclass
from typing import Any

import msgspec

from proxy import names
from proxy.certs.bundle import CertBundle, load_bundle
from proxy.errors import ConflictError, InvalidName, RegistryError
from proxy.store import records as rec
from proxy.store.base import Store

STATUS_LABELS = {
    "pending_dns": "Pending DNS",
    "creating": "Creating",
    "in_use": "In use",
    "not_used": "Not used",
    "error": "Error",
    "disabled": "Disabled",
}


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

    @property
    def status_label(self) -> str:
        return STATUS_LABELS[self.status]

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["status_label"] = self.status_label
        return data


def view_status(letsencrypt: bool, custom: rec.Validity | None, acme: rec.Validity | None,
                state: str, now: float) -> tuple[str, str]:
    """(in_use, status) of a domain now: the two columns every view and the domain
    metrics show. `state` is the lifecycle's (pending_dns when it has written none)."""
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
        label = "pending_dns"  # issued once, now expired: the lifecycle starts over
    else:
        label = state
    in_use = ("custom" if custom_serving else "letsencrypt" if serving is not None
              else "platform")
    return in_use, label


def derive_view(domain: rec.DomainRecord, custom: rec.CertMeta | None,
                acme: rec.CertMeta | None, status: rec.StatusRecord | None,
                now: float) -> DomainView:
    """Combine the stored records into what is true now (serving choice + status)."""
    serving = rec.serving_certificate(custom, acme, now)
    in_use, label = view_status(domain.letsencrypt, custom, acme,
                                status.state if status is not None else "pending_dns", now)
    return DomainView(
        name=domain.name, app=domain.app, letsencrypt=domain.letsencrypt,
        in_use=in_use,
        expires_at=serving.not_after if serving is not None else None,
        status=label,
        message=status.message if status is not None else "",
        last_error=status.last_error if status is not None else "",
        custom=CertView.of(custom) if custom is not None else None,
        acme=CertView.of(acme) if acme is not None else None,
    )


class Registry:
    """Domain operations over a Store. Every method validates fully before writing."""

    def __init__(self, store: Store, *, platform_domain: str, apps: Collection[str],
                 clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.platform_domain = platform_domain
        self.config_apps = frozenset(apps)
        self.clock = clock

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
        if domain is None:
            raise RegistryError(f"domain {name} does not exist")
        return derive_view(domain, await self.certificate(name, "custom"),
                           await self.certificate(name, "acme"), await self.status(name),
                           self.clock())

    async def views(self) -> list[DomainView]:
        domains = [rec.decode(i.value, rec.DomainRecord)
                   for i in await self.store.scan(rec.DOMAINS)]
        certs: dict[str, rec.CertMeta] = {}  # metadata only: no key is decoded for a view
        for item in await self.store.scan(rec.CERTS):
            certs[item.key] = rec.decode(item.value, rec.CertMeta)
        statuses = {i.key: rec.decode(i.value, rec.StatusRecord)
                    for i in await self.store.scan(rec.STATUS)}
        now = self.clock()
        return [derive_view(d, certs.get(rec.cert_key(d.name, "custom")),
                            certs.get(rec.cert_key(d.name, "acme")),
                            statuses.get(rec.status_key(d.name)), now) for d in domains]

    async def apps(self) -> set[str]:
        stored = {k[len(rec.APPS):] for k in await self.store.keys(rec.APPS)}
        return set(self.config_apps) | stored

    # -- writes ---------------------------------------------------------------------
    async def add_domain(self, name: str, app: str, *, letsencrypt: bool = True,
                         chain: bytes | None = None, key: bytes | None = None) -> DomainView:
        name = self._name(name)
        if name == self.platform_domain or name.endswith("." + self.platform_domain):
            raise RegistryError(
                f"{name} is under the platform domain {self.platform_domain}; "
                "it is served with the platform certificate")
        if app not in await self.apps():
            raise RegistryError(f"app {app!r} does not exist")
        bundle = self._validate(name, chain, key) if chain is not None or key is not None \
            else None
        now = self.clock()
        record = rec.DomainRecord(name=name, app=app, letsencrypt=letsencrypt, created_at=now)
        try:
            await self.store.put(rec.domain_key(name), rec.encode(record), expect=0)
        except ConflictError:
            raise RegistryError(f"domain {name} already exists") from None
        if bundle is not None:
            await self._put_custom(name, bundle)
        state: rec.State = "pending_dns" if letsencrypt else "disabled"
        await self.set_status(name, state=state, message="added", next_dns_check=0.0)
        return await self.view(name)

    async def remove_domain(self, name: str) -> None:
        name = self._name(name)
        if not await self.store.delete(rec.domain_key(name)):
            raise RegistryError(f"domain {name} does not exist")
        for source in ("custom", "acme"):
            await self.store.delete(rec.cert_key(name, source))
        await self._drop_material(name)
        await self.store.delete(rec.status_key(name))

    async def set_custom_certificate(self, name: str, chain: bytes, key: bytes) -> DomainView:
        """Validate and store an uploaded certificate; it serves on the next handshake."""
        name = self._name(name)
        if await self.domain(name) is None:
            raise RegistryError(f"domain {name} does not exist")
        await self._put_custom(name, self._validate(name, chain, key))
        return await self.view(name)

    async def remove_custom_certificate(self, name: str) -> DomainView:
        name = self._name(name)
        if await self.domain(name) is None:
            raise RegistryError(f"domain {name} does not exist")
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

    async def store_acme_certificate(self, name: str, bundle: CertBundle) -> None:
        await self._put_certificate(name, "acme", bundle)

    # -- helpers --------------------------------------------------------------------
    def _name(self, name: str) -> str:
        try:
            return names.normalize(name)
        except InvalidName as exc:
            raise RegistryError(str(exc)) from None

    def _validate(self, name: str, chain: bytes | None, key: bytes | None) -> CertBundle:
        if chain is None or key is None:
            raise RegistryError("a custom certificate needs both the chain and the key")
        return load_bundle(chain, key, domain=name, now=self.clock())

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
