"""DNS-01 challenges answered in the platform's own DNS zone, by RFC 2136 updates.

A customer delegates the challenge once: `_acme-challenge.<domain>` CNAME
`<domain>.<zone>` (the zone of `acme.dns01`; a wildcard `*.x` delegates `x`). For each
order this module adds the TXT value at `<domain>.<zone>` with a TSIG-signed dynamic
update to the zone's primary, waits until every authoritative server of the zone has
it, and removes it afterwards. Owns those names, the updates (dnspython `dns.update`,
`dns.tsig`), the propagation check, and the `dns01/` store records that say which
values are in DNS: written before a value is added, deleted after it is removed, so
`sweep` removes what an order that died in between left. Never blocks the loop
(dnspython's async queries); never logs the TSIG secret.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

import dns.asyncquery
import dns.asyncresolver
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
import dns.resolver
import dns.tsig
import dns.tsigkeyring
import dns.update
import msgspec

from proxy.config import AcmeDns01, parse_address
from proxy.errors import ConfigError, ConflictError, IssuanceError, LockTimeout, StoreError
from proxy.lifecycle.dnscheck import DnsChecker, DnsVerdict, nameserver
from proxy.store import records as rec
from proxy.store.base import Store

__all__ = ["Dns01", "Dns01Settings", "challenge_name", "txt_name"]

log = logging.getLogger("tlsedge.lifecycle.dns01")

TTL = 60  # seconds a resolver may keep a challenge value
_POLL = 0.5  # between two looks at the authoritative servers
_QUERY_TIMEOUT = 3.0


class UpdateRefused(IssuanceError):
    """The server answered the update with a refusal (a TSIG error, REFUSED, NOTAUTH):
    it changed nothing."""


def challenge_name(domain: str) -> str:
    """Where the CA looks: `_acme-challenge.shop.example.com` (for `*.shop...` too)."""
    return "_acme-challenge." + domain.removeprefix("*.")


def txt_name(domain: str, zone: str) -> str:
    """Where the TXT value goes, the CNAME target the customer creates."""
    return f"{domain.removeprefix('*.')}.{zone}"


@dataclass(frozen=True)
class Dns01Settings:
    server: tuple[str, int]
    zone: str
    tsig_name: str
    tsig_algorithm: str
    tsig_secret: str = field(repr=False)
    propagation_timeout: float = 60.0
    nameservers: tuple[tuple[str, int], ...] = ()  # empty: the zone's NS records, port 53
    fallback: bool = False

    @classmethod
    def from_config(cls, config: AcmeDns01) -> Dns01Settings:
        """ConfigError when the TSIG secret file cannot be read."""
        try:
            with open(config.tsig.secret_file, encoding="ascii") as f:
                secret = f.read().strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"acme.dns01.tsig.secret_file: cannot read "
                              f"{config.tsig.secret_file}: {exc}") from None
        return cls(server=parse_address(config.server, where="acme.dns01.server"),
                   zone=config.zone, tsig_name=config.tsig.name,
                   tsig_algorithm=config.tsig.algorithm, tsig_secret=secret,
                   propagation_timeout=config.propagation_timeout,
                   nameservers=tuple(parse_address(s, where="acme.dns01.nameservers")
                                     for s in config.nameservers),
                   fallback=config.fallback)


class Dns01:
    """The DNS-01 side of the lifecycle: delegation checks, TXT records, the sweep."""

    def __init__(self, settings: Dns01Settings, checker: DnsChecker) -> None:
        self.settings = settings
        self.checker = checker
        try:
            self._keyring = dns.tsigkeyring.from_text(
                {settings.tsig_name: (settings.tsig_algorithm, settings.tsig_secret)})
        except (ValueError, dns.exception.DNSException):
            raise ConfigError("acme.dns01.tsig.secret_file: not a base64 TSIG secret "
                              "(make one with `tsig-keygen -a hmac-sha256 NAME`)") from None
        resolvers = checker.settings.resolvers
        self._resolver = dns.asyncresolver.Resolver(configure=not resolvers)
        if resolvers:
            self._resolver.nameservers = [nameserver(r) for r in resolvers]
        self._resolver.cache = None
        self._resolver.lifetime = _QUERY_TIMEOUT

    @property
    def timeout(self) -> float:
        """How long publishing one value may take (the propagation wait and updates)."""
        return self.settings.propagation_timeout + 4 * _QUERY_TIMEOUT

    def delegation(self, domain: str) -> str:
        """The record a customer creates: `_acme-challenge.x. CNAME x.<zone>.`"""
        return f"{challenge_name(domain)}. CNAME {txt_name(domain, self.settings.zone)}."

    async def check(self, domain: str) -> DnsVerdict:
        """Whether `domain`'s challenge is delegated to our zone (never raises)."""
        return await self.checker.check_delegation(challenge_name(domain),
                                                txt_name(domain, self.settings.zone))

    def publisher(self, store: Store, domain: str) -> TxtPublisher:
        """Publishes the values of `domain`'s order (whose lock the caller holds)."""
        return TxtPublisher(self, store, domain)

    # -- dynamic updates ----------------------------------------------------------------

    async def add(self, name: str, value: str) -> None:
        await self._update(name, value, add=True)

    async def remove(self, name: str, value: str) -> None:
        await self._update(name, value, add=False)

    async def _update(self, name: str, value: str, *, add: bool) -> None:
        """One TSIG-signed update of the TXT value `value` at `name` (the other values
        there stay: a wildcard and its apex are validated with two at once)."""
        s = self.settings
        update = dns.update.UpdateMessage(s.zone + ".", keyring=self._keyring,
                                          keyname=dns.name.from_text(s.tsig_name),
                                          keyalgorithm=s.tsig_algorithm)
        rdata = f'"{value}"'
        if add:
            update.add(name + ".", TTL, "TXT", rdata)
        else:
            update.delete(name + ".", "TXT", rdata)
        what = f"DNS update of {name} at {s.server[0]}:{s.server[1]}"
        try:
            response = await dns.asyncquery.tcp(update, s.server[0], port=s.server[1],
                                                timeout=_QUERY_TIMEOUT)
        except dns.tsig.PeerError as exc:
            raise UpdateRefused(f"{what} refused: the server rejects TSIG key "
                                f"{s.tsig_name}: {_tsig_reason(exc)} (is "
                                "acme.dns01.tsig the key the server has?)") from None
        except (OSError, dns.exception.DNSException) as exc:
            raise IssuanceError(f"{what} failed: {str(exc) or type(exc).__name__}") from None
        if response.rcode() != dns.rcode.NOERROR:
            raise UpdateRefused(f"{what} refused: {dns.rcode.to_text(response.rcode())} "
                                f"(may key {s.tsig_name} update TXT records in zone "
                                f"{s.zone}?)")

    # -- propagation --------------------------------------------------------------------

    async def wait_propagated(self, name: str, value: str) -> None:
        """Return once every authoritative server of the zone answers `value` at `name`;
        IssuanceError naming the servers without it after propagation_timeout."""
        servers = await self._authoritative()
        deadline = time.monotonic() + self.settings.propagation_timeout
        while True:
            answers = await asyncio.gather(*(self._txt_at(server, name)
                                             for server in servers))
            missing = [f"{host}:{port}" for (host, port), values in zip(servers, answers,
                                                                        strict=True)
                       if value not in values]
            if not missing:
                return
            if time.monotonic() >= deadline:
                raise IssuanceError(f"the TXT record {name} did not reach "
                                    f"{', '.join(missing)} within "
                                    f"{self.settings.propagation_timeout:g} s")
            await asyncio.sleep(_POLL)

    async def _authoritative(self) -> list[tuple[str, int]]:
        if self.settings.nameservers:
            return list(self.settings.nameservers)
        zone = self.settings.zone
        try:
            answer = await self._resolver.resolve(zone, dns.rdatatype.NS, search=False)
            servers = []
            for ns in answer:
                for address in await self._resolver.resolve(ns.target, dns.rdatatype.A,
                                                            search=False):
                    servers.append((address.to_text(), 53))
        except dns.exception.DNSException as exc:
            raise IssuanceError(f"cannot find the authoritative servers of {zone}: "
                                f"{str(exc) or type(exc).__name__}") from None
        return servers

    async def _txt_at(self, server: tuple[str, int], name: str) -> set[str]:
        query = dns.message.make_query(name + ".", dns.rdatatype.TXT)
        query.flags &= ~dns.flags.RD  # the server's own data, not a recursion
        try:
            response = await dns.asyncquery.udp(query, server[0], port=server[1],
                                                timeout=_QUERY_TIMEOUT)
        except (OSError, dns.exception.DNSException):
            return set()  # not there yet, as far as we can tell: asked again
        return {b"".join(rd.strings).decode("ascii", "replace")
                for rrset in response.answer if rrset.rdtype == dns.rdatatype.TXT
                for rd in rrset}

    # -- what orders that died left -----------------------------------------------------

    async def sweep(self, store: Store, lock_ttl: float) -> int:
        """Remove the TXT values orders left in DNS when their process died between
        adding and removing them (dns01/ records), for every domain whose lock is
        free (none of its orders runs). The number of records left (a lock held, a
        failure): the caller looks again once locks may have expired."""
        left = 0
        for item in await store.scan(rec.DNS01):
            try:
                record = rec.decode(item.value, rec.Dns01Record)
            except msgspec.DecodeError as exc:
                log.error("ignoring unreadable store record %s: %s", item.key, exc)
                continue
            try:
                lease = await store.lock(rec.lock_name(record.domain), ttl=lock_ttl)
            except LockTimeout:
                left += 1  # an order runs (it removes them itself), or its holder died
                continue
            try:
                await self._sweep_one(store, item.key)
            except (IssuanceError, StoreError) as exc:
                left += 1
                log.warning("could not remove the stale DNS-01 record %s: %s",
                            record.name, exc)
            finally:
                await lease.release()
        return left

    async def _sweep_one(self, store: Store, key: str) -> None:
        item = await store.get(key)  # again, under the lock
        if item is None:
            return
        record = rec.decode(item.value, rec.Dns01Record)
        for value in record.values:
            await self.remove(record.name, value)
        try:
            await store.delete(key, expect=item.revision)
        except ConflictError:
            return  # an order began meanwhile (a lock that expired): it has it now
        log.info("removed %d stale DNS-01 value(s) at %s (left by %s's order)",
                 len(record.values), record.name, record.domain)


class TxtPublisher:
    """The DNS-01 challenge publisher of one order (acme.Dns01Publisher): notes a value
    in the store, adds it to DNS and waits until it has propagated; the reverse after."""

    def __init__(self, dns01: Dns01, store: Store, domain: str) -> None:
        self.dns01 = dns01
        self.store = store
        self.domain = domain
        self.timeout = dns01.timeout

    async def publish_txt(self, identifier: str, value: str) -> None:
        name = txt_name(identifier, self.dns01.settings.zone)
        await self._note(name, value, add=True)  # first: a crash after leaves a trace
        try:
            await self.dns01.add(name, value)
        except UpdateRefused:
            await self._note(name, value, add=False)  # nothing reached DNS
            raise
        await self.dns01.wait_propagated(name, value)

    async def withdraw_txt(self, identifier: str, value: str) -> None:
        name = txt_name(identifier, self.dns01.settings.zone)
        if not await self._note(name, value, add=False, dry=True):
            return  # never reached DNS (the update was refused)
        await self.dns01.remove(name, value)
        await self._note(name, value, add=False)

    async def _note(self, name: str, value: str, *, add: bool, dry: bool = False) -> bool:
        """Add `value` to (or remove it from) the record of what is in DNS at `name`;
        whether it was there. `dry`: only say."""
        key = rec.dns01_key(name)
        for _ in range(8):
            item = await self.store.get(key)
            record = (rec.decode(item.value, rec.Dns01Record) if item is not None
                      else rec.Dns01Record(name=name, domain=self.domain))
            values = tuple(v for v in record.values if v != value) + ((value,) if add else ())
            if dry:
                return value in record.values
            try:
                if values:
                    await self.store.put(key, rec.encode(msgspec.structs.replace(
                        record, domain=self.domain, values=values, updated_at=time.time())),
                        expect=item.revision if item is not None else 0)
                elif item is not None:
                    await self.store.delete(key, expect=item.revision)
                return value in record.values
            except ConflictError:
                continue
        raise StoreError(f"the store record {key} keeps changing; try again")


def _tsig_reason(exc: dns.tsig.PeerError) -> str:
    return {dns.tsig.PeerBadKey: "unknown key name", dns.tsig.PeerBadSignature:
            "bad signature (wrong secret)", dns.tsig.PeerBadTime: "clocks too far apart",
            dns.tsig.PeerBadTruncation: "bad truncation"}.get(type(exc), str(exc))
