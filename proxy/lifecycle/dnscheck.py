"""Does a domain point at the edge? One async DNS look-up, one verdict with a reason.

Uses dnspython's async resolver so the lifecycle's loop never blocks, and never raises
for DNS trouble: a failed look-up is a verdict ("DNS lookup failed: ...") like any other.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from dataclasses import dataclass

import dns.asyncresolver
import dns.exception
import dns.message
import dns.name
import dns.nameserver
import dns.rdatatype
import dns.resolver

__all__ = ["DnsChecker", "DnsSettings", "DnsVerdict", "nameserver"]

log = logging.getLogger(__name__)

_Address = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class DnsSettings:
    """The edge's public addresses, the platform names customers CNAME to, and resolvers.

    `resolvers` are "host:port" ("[::1]:53" for IPv6; the port defaults to 53); when
    empty the system resolver configuration (/etc/resolv.conf) is used.
    """

    edge_addresses: tuple[str, ...]
    cname_targets: tuple[str, ...] = ()
    resolvers: tuple[str, ...] = ()


@dataclass(frozen=True)
class DnsVerdict:
    """Whether the domain points at the edge, and why (one line for the status page)."""

    points_at_us: bool
    reason: str


class _Lookup:
    """The outcome of one A or AAAA query: addresses, CNAME hops, or what went wrong."""

    __slots__ = ("addresses", "cnames", "failure", "nxdomain")

    def __init__(self) -> None:
        self.addresses: list[_Address] = []
        self.cnames: list[dns.name.Name] = []
        self.nxdomain = False
        self.failure: str | None = None


class DnsChecker:
    """Checks domains against the edge's addresses and CNAME targets.

    Rule: a domain points at us when its CNAME chain reaches a cname_target or a name
    under one (`my-app.osc-fr1.scalingo.io` for the target `osc-fr1.scalingo.io`; whole
    labels only, so `evil-osc-fr1.scalingo.io` does not match) and that chain resolves
    to some address — our platform zone decides which; or, without such a CNAME, when
    its A and AAAA answers together are non-empty and every address is an edge address
    (one stray address sends some clients and the CA elsewhere).
    Safe for concurrent use from one loop; each check takes at most about `timeout`
    seconds (A and AAAA are asked in parallel). Answers are never cached here: the
    lifecycle re-checks to see changes.
    """

    def __init__(self, settings: DnsSettings, *, timeout: float = 3.0) -> None:
        self.settings = settings
        self.timeout = timeout
        self._edges = frozenset(ipaddress.ip_address(a) for a in settings.edge_addresses)
        self._targets = tuple(dns.name.from_text(t) for t in settings.cname_targets)
        resolver = dns.asyncresolver.Resolver(configure=not settings.resolvers)
        if settings.resolvers:
            resolver.nameservers = [nameserver(r) for r in settings.resolvers]
        resolver.cache = None
        resolver.lifetime = timeout
        resolver.timeout = timeout  # per server; lifetime bounds the whole query
        self._resolver = resolver

    async def check(self, domain: str) -> DnsVerdict:
        """Look `domain` up (A and AAAA) and judge it; never raises for DNS problems."""
        try:
            name = dns.name.from_text(domain)
        except dns.exception.DNSException as exc:
            return DnsVerdict(False, f"not a valid DNS name: {exc}")
        a, aaaa = await asyncio.gather(self._query(name, dns.rdatatype.A),
                                       self._query(name, dns.rdatatype.AAAA))
        return self._judge(a, aaaa)

    async def check_delegation(self, name: str, target: str) -> DnsVerdict:
        """Whether `name` (`_acme-challenge.<domain>`) is a CNAME to `target`: a DNS-01
        challenge delegated to the platform's zone. The reason names the record to
        create; never raises for DNS problems."""
        create = f"create the DNS record {name}. CNAME {target}."
        try:
            answer = await self._resolver.resolve(name, dns.rdatatype.CNAME, search=False,
                                                  raise_on_no_answer=False)
        except dns.resolver.NXDOMAIN:
            return DnsVerdict(False, f"{name} does not exist: {create}")
        except dns.resolver.LifetimeTimeout:
            return DnsVerdict(False, f"DNS lookup of {name} failed: no answer within "
                                     f"{self.timeout:g} s")
        except dns.resolver.NoNameservers as exc:
            return DnsVerdict(False, f"DNS lookup of {name} failed: {_no_nameservers(exc)}")
        except dns.exception.DNSException as exc:
            return DnsVerdict(False, f"DNS lookup of {name} failed: "
                                     f"{str(exc) or type(exc).__name__}")
        found = [rd.target for rd in answer.rrset] if answer.rrset is not None else []
        if dns.name.from_text(target) in found:
            return DnsVerdict(True, f"{name} is a CNAME to {target}")
        if found:
            return DnsVerdict(False, f"{name} is a CNAME to {_text(found[0])}, not to "
                                     f"{target}: {create}")
        return DnsVerdict(False, f"{name} has no CNAME record: {create}")

    def _judge(self, a: _Lookup, aaaa: _Lookup) -> DnsVerdict:
        cnames = a.cnames or aaaa.cnames
        target = next((c for c in cnames if self._is_target(c)), None)
        addresses = sorted(set(a.addresses + aaaa.addresses), key=_sort_key)
        failure = a.failure or aaaa.failure
        if target is not None:
            hop = _text(target)
            if addresses:
                return DnsVerdict(True, f"CNAME to {hop}")
            if failure is not None:
                return DnsVerdict(False, f"CNAME to {hop}, but DNS lookup failed: {failure}")
            why = " (NXDOMAIN)" if a.nxdomain else ""
            return DnsVerdict(False, f"CNAME to {hop}, which has no A/AAAA record{why}")
        if failure is not None:
            return DnsVerdict(False, f"DNS lookup failed: {failure}")
        via = f" (via CNAME {_text(cnames[-1])})" if cnames else ""
        if not addresses:
            why = " (NXDOMAIN)" if a.nxdomain and aaaa.nxdomain else ""
            return DnsVerdict(False, f"no A/AAAA record{why}{via}")
        shown = ", ".join(str(x) for x in addresses)
        edges = ", ".join(str(x) for x in sorted(self._edges, key=_sort_key))
        foreign = [x for x in addresses if x not in self._edges]
        if not foreign:
            return DnsVerdict(True, f"resolves to {shown}{via}")
        if len(foreign) == len(addresses):
            return DnsVerdict(False, f"resolves to {shown}{via}, not to the edge ({edges})")
        others = ", ".join(str(x) for x in foreign)
        return DnsVerdict(False, f"resolves to {shown}{via}; {others} is not the edge ({edges})")

    def _is_target(self, name: dns.name.Name) -> bool:
        return any(name.is_subdomain(t) for t in self._targets)

    async def _query(self, name: dns.name.Name, rdtype: dns.rdatatype.RdataType) -> _Lookup:
        result = _Lookup()
        try:
            answer = await self._resolver.resolve(name, rdtype, search=False,
                                                  raise_on_no_answer=False)
        except dns.resolver.NXDOMAIN as exc:
            result.nxdomain = True
            responses = exc.kwargs.get("responses") or {}
            for response in responses.values():
                result.cnames = result.cnames or _cname_chain(response)
            return result
        except dns.resolver.LifetimeTimeout:
            result.failure = f"no answer within {self.timeout:g} s"
            return result
        except dns.resolver.NoNameservers as exc:
            result.failure = _no_nameservers(exc)
            return result
        except dns.exception.DNSException as exc:
            result.failure = str(exc) or type(exc).__name__
            return result
        result.cnames = _cname_chain(answer.response)
        if answer.rrset is not None:
            result.addresses = [ipaddress.ip_address(r.to_text()) for r in answer.rrset]
        return result


def _cname_chain(response: dns.message.Message) -> list[dns.name.Name]:
    """The CNAME targets followed in `response`, first hop first."""
    if not isinstance(response, dns.message.QueryMessage):
        return []
    try:
        chain = response.resolve_chaining()
    except dns.exception.DNSException:
        return []
    return [rd.target for rrset in chain.cnames for rd in rrset]


def _no_nameservers(exc: dns.resolver.NoNameservers) -> str:
    """SERVFAIL/REFUSED from every server, said the way an operator reads it."""
    errors = exc.kwargs.get("errors") or []
    # err is an rcode name ("SERVFAIL") or the exception a server's query raised.
    said = [f"{server} answered {err}" for server, _tcp, _port, err, _ in errors[:3]]
    return "; ".join(said) or "every resolver failed"


def nameserver(spec: str) -> dns.nameserver.Nameserver:
    """'host:port', '[v6]:port' or a bare address (port 53) as a dnspython nameserver."""
    host, port = spec, 53
    if spec.startswith("["):
        host, _, rest = spec[1:].partition("]")
        port = int(rest.removeprefix(":") or 53)
    elif spec.count(":") == 1:
        host, _, port_text = spec.partition(":")
        port = int(port_text)
    return dns.nameserver.Do53Nameserver(host, port)


def _text(name: dns.name.Name) -> str:
    return name.to_text(omit_final_dot=True)


def _sort_key(address: _Address) -> tuple[int, int]:
    return address.version, int(address)
