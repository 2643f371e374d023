"""DnsChecker against the in-process test DNS server: verdicts and their reasons."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator

import pytest

from proxy.lifecycle.dnscheck import DnsChecker, DnsSettings, DnsVerdict
from tests.support.dnsserver import DNSServer
from tests.support.ports import free_port

EDGE_V4 = "192.0.2.10"
EDGE_V6 = "2001:db8::10"
TARGET = "osc-fr1.scalingo.test"


@pytest.fixture
def dns_server() -> Iterator[DNSServer]:
    with DNSServer() as server:
        yield server


def checker_for(server: DNSServer, *, timeout: float = 2.0) -> DnsChecker:
    return DnsChecker(DnsSettings(edge_addresses=(EDGE_V4, EDGE_V6), cname_targets=(TARGET,),
                                  resolvers=(server.address,)), timeout=timeout)


def check(checker: DnsChecker, domain: str) -> DnsVerdict:
    return asyncio.run(checker.check(domain))


def test_a_record_at_the_edge_points_at_us(dns_server: DNSServer) -> None:
    dns_server.set_a("shop.test", [EDGE_V4])
    verdict = check(checker_for(dns_server), "shop.test")
    assert verdict == DnsVerdict(True, f"resolves to {EDGE_V4}")


def test_a_record_elsewhere_does_not_point_at_us(dns_server: DNSServer) -> None:
    dns_server.set_a("shop.test", ["203.0.113.9"])
    verdict = check(checker_for(dns_server), "shop.test")
    assert not verdict.points_at_us
    assert verdict.reason == f"resolves to 203.0.113.9, not to the edge ({EDGE_V4}, {EDGE_V6})"


def test_one_foreign_address_among_edge_ones_is_not_enough(dns_server: DNSServer) -> None:
    dns_server.set_a("shop.test", [EDGE_V4, "203.0.113.9"])
    verdict = check(checker_for(dns_server), "shop.test")
    assert not verdict.points_at_us
    assert "203.0.113.9 is not the edge" in verdict.reason


def test_aaaa_records_count_too(dns_server: DNSServer) -> None:
    checker = checker_for(dns_server)
    dns_server.set_aaaa("v6only.test", ["2001:0db8:0::10"])  # same address, other spelling
    assert check(checker, "v6only.test") == DnsVerdict(True, f"resolves to {EDGE_V6}")

    dns_server.set_a("dual.test", [EDGE_V4])
    dns_server.set_aaaa("dual.test", ["2001:db8::99"])
    verdict = check(checker, "dual.test")
    assert not verdict.points_at_us
    assert "2001:db8::99 is not the edge" in verdict.reason


def test_cname_to_a_platform_name_points_at_us(dns_server: DNSServer) -> None:
    dns_server.set_a(f"my-app.{TARGET}", [EDGE_V4])
    dns_server.set_cname("www.shop.test", f"my-app.{TARGET}")
    dns_server.set_cname("deep.shop.test", "www.shop.test")  # the target is the second hop
    dns_server.set_cname("exact.shop.test", TARGET)
    dns_server.set_a(TARGET, ["198.51.100.7"])  # our zone decides the addresses
    checker = checker_for(dns_server)
    assert check(checker, "www.shop.test") == DnsVerdict(True, f"CNAME to my-app.{TARGET}")
    assert check(checker, "deep.shop.test") == DnsVerdict(True, f"CNAME to my-app.{TARGET}")
    assert check(checker, "exact.shop.test") == DnsVerdict(True, f"CNAME to {TARGET}")


def test_cname_to_a_lookalike_name_is_judged_by_its_addresses(dns_server: DNSServer) -> None:
    dns_server.set_a(f"evil-{TARGET}", ["203.0.113.66"])
    dns_server.set_cname("www.shop.test", f"evil-{TARGET}")
    verdict = check(checker_for(dns_server), "www.shop.test")
    assert not verdict.points_at_us
    assert verdict.reason.startswith(f"resolves to 203.0.113.66 (via CNAME evil-{TARGET})")


def test_cname_to_a_platform_name_that_does_not_exist_is_reported(
    dns_server: DNSServer,
) -> None:
    dns_server.set_cname("www.shop.test", f"gone.{TARGET}")
    verdict = check(checker_for(dns_server), "www.shop.test")
    assert verdict == DnsVerdict(
        False, f"CNAME to gone.{TARGET}, which has no A/AAAA record (NXDOMAIN)")


def test_unknown_name_is_nxdomain(dns_server: DNSServer) -> None:
    verdict = check(checker_for(dns_server), "nothing-here.test")
    assert verdict == DnsVerdict(False, "no A/AAAA record (NXDOMAIN)")


def test_name_without_addresses_says_so(dns_server: DNSServer) -> None:
    dns_server.set_txt("txt-only.test", ["hello"])
    verdict = check(checker_for(dns_server), "txt-only.test")
    assert verdict == DnsVerdict(False, "no A/AAAA record")


def test_resolver_down_fails_within_the_timeout() -> None:
    # A UDP port nobody listens on (and no TCP either): every query goes unanswered.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as hold:
        hold.bind(("127.0.0.1", 0))  # bound, never read: queries vanish, no ICMP refusal
        port = hold.getsockname()[1]
        checker = DnsChecker(DnsSettings(edge_addresses=(EDGE_V4,),
                                         resolvers=(f"127.0.0.1:{port}",)), timeout=0.5)
        started = time.perf_counter()
        verdict = asyncio.run(checker.check("shop.test"))
        elapsed = time.perf_counter() - started
    assert not verdict.points_at_us
    assert verdict.reason.startswith("DNS lookup failed: ")
    assert elapsed < 0.5 + 0.3


def test_closed_resolver_port_fails_within_the_timeout() -> None:
    checker = DnsChecker(DnsSettings(edge_addresses=(EDGE_V4,),
                                     resolvers=(f"127.0.0.1:{free_port(socket.SOCK_DGRAM)}",)),
                         timeout=1.0)
    started = time.perf_counter()
    verdict = asyncio.run(checker.check("shop.test"))
    assert not verdict.points_at_us
    assert verdict.reason.startswith("DNS lookup failed: ")
    assert time.perf_counter() - started < 1.0 + 0.3


def test_invalid_name_is_a_verdict_not_an_exception(dns_server: DNSServer) -> None:
    verdict = check(checker_for(dns_server), "a" * 70 + ".test")
    assert not verdict.points_at_us
    assert verdict.reason.startswith("not a valid DNS name")
