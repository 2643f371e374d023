"""The lifecycle's rules in-process: backoff and failed renewals (a real FileStore, the
test DNS server, pebble running or stopped, a clock the test moves), the renewal
schedule, and the registry's domain rules.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from proxy.certs.bundle import load_bundle
from proxy.errors import RegistryError
from proxy.lifecycle import renewal
from proxy.lifecycle.acme import AcmeClient, AcmeSettings, Issued
from proxy.lifecycle.dnscheck import DnsChecker, DnsSettings
from proxy.lifecycle.domains import Lifecycle, LifecycleSettings
from proxy.registry import Registry
from proxy.store import records as rec
from proxy.store.files import FileStore
from tests.certgen import CA, DAY
from tests.conftest import PLATFORM
from tests.support.dnsserver import DNSServer
from tests.support.pebble import Pebble
from tests.support.ports import free_port

pytestmark = pytest.mark.timeout(60)


class Clock:
    """Time the test moves by hand (starts at the real time: certificates are real)."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def dns() -> Iterator[DNSServer]:
    with DNSServer() as server:
        yield server


@pytest.fixture
def pebble(dns: DNSServer) -> Iterator[Pebble]:
    # Nothing answers HTTP-01 in-process: pebble marks every challenge valid.
    with Pebble(http_port=free_port(), dns_port=dns.port, always_valid=True) as ca:
        yield ca


@pytest.fixture
def store_path(tmp_path: Path) -> Path:
    return tmp_path / "store"


def in_store(path: Path, scenario: Callable[[FileStore], Awaitable[None]]) -> None:
    """Run `scenario` on a fresh loop with a FileStore at `path` (no async test plugin)."""

    async def main() -> None:
        store = FileStore(path)
        try:
            await scenario(store)
        finally:
            await store.close()

    asyncio.run(main())


def make_lifecycle(store: FileStore, pebble: Pebble, dns: DNSServer,
                   clock: Clock) -> tuple[Lifecycle, Registry, AcmeClient]:
    registry = Registry(store, platform_domain=PLATFORM, apps={"my-app"}, clock=clock)
    client = AcmeClient(AcmeSettings(directory=pebble.directory_url,
                                     ca_bundle=str(pebble.ca_bundle_path)))
    checker = DnsChecker(DnsSettings(edge_addresses=("127.0.0.1",),
                                     resolvers=(dns.address,)), timeout=2.0)
    lifecycle = Lifecycle(store, registry, client, checker,
                          LifecycleSettings(check_interval=1.0), clock=clock)
    return lifecycle, registry, client


async def one_pass(lifecycle: Lifecycle) -> int:
    started = await lifecycle.tick()
    await lifecycle.settle()
    return len(started)


# --------------------------------------------------------------------------- 7. backoff


def near(value: float, expected: float) -> bool:
    return expected * 0.9 - 0.01 <= value <= expected * 1.1 + 0.01


def test_backoff_schedule_while_the_ca_is_down(store_path: Path, pebble: Pebble,
                                              dns: DNSServer) -> None:
    async def scenario(store: FileStore) -> None:
        pebble.stop()  # the CA is down for the whole test
        clock = Clock()
        lifecycle, registry, client = make_lifecycle(store, pebble, dns, clock)
        name = "down.example.test"
        dns.set_a(name, ["127.0.0.1"])
        await registry.add_domain(name, "my-app")
        try:
            assert await one_pass(lifecycle) == 1
            status = await registry.status(name)
            assert status is not None
            assert status.state == "error" and status.failures == 1
            assert "ACME server unreachable" in status.last_error
            assert near(status.retry_at - clock.now, 60), status.retry_at - clock.now
            view = await registry.view(name)
            assert view.status_label == "Error" and "ACME server unreachable" in view.last_error

            # Before retry_at nothing starts; after it the next failure waits longer.
            for failures, expected in ((2, 600), (3, 6000), (4, 86400), (5, 86400)):
                clock.now = status.retry_at - 1
                assert await lifecycle.tick() == []
                clock.now = status.retry_at + 1
                assert await one_pass(lifecycle) == 1
                status = await registry.status(name)
                assert status is not None
                assert (status.state, status.failures) == ("error", failures)
                waits = status.retry_at - clock.now
                assert near(waits, expected), (failures, waits)
                assert "ACME server unreachable" in status.last_error
            assert await registry.certificate(name, "acme") is None
        finally:
            client.close()

    in_store(store_path, scenario)


def test_failed_renewal_keeps_the_certificate_serving(
        store_path: Path, pebble: Pebble, dns: DNSServer) -> None:
    async def scenario(store: FileStore) -> None:
        clock = Clock()
        lifecycle, registry, client = make_lifecycle(store, pebble, dns, clock)
        name = "renewfail.example.test"
        dns.set_a(name, ["127.0.0.1"])
        await registry.add_domain(name, "my-app")
        try:
            assert await one_pass(lifecycle) == 1
            issued = await registry.certificate(name, "acme")
            status = await registry.status(name)
            assert issued is not None and status is not None and status.state == "issued"
            assert status.renew_at == pytest.approx(
                issued.not_after - (issued.not_after - issued.not_before) / 3)
            assert await lifecycle.tick() == []  # valid and not due: nothing to do

            pebble.stop()
            clock.now = status.renew_at + 1
            assert clock.now < issued.not_after
            assert await one_pass(lifecycle) == 1
            status = await registry.status(name)
            kept = await registry.certificate(name, "acme")
            assert status is not None and kept is not None
            assert kept.fingerprint == issued.fingerprint
            assert status.state == "issued" and status.failures == 1
            assert "ACME server unreachable" in status.last_error
            assert near(status.retry_at - clock.now, 60)
            view = await registry.view(name)
            assert (view.status_label, view.in_use) == ("In use", "letsencrypt")
            assert view.last_error == status.last_error
            clock.now += 10
            assert await lifecycle.tick() == []  # backing off
        finally:
            client.close()

    in_store(store_path, scenario)


def test_domain_removed_during_its_order_leaves_nothing_behind(
        store_path: Path, pebble: Pebble, dns: DNSServer) -> None:
    async def scenario(store: FileStore) -> None:
        clock = Clock()
        lifecycle, registry, client = make_lifecycle(store, pebble, dns, clock)
        name = "gone.example.test"
        dns.set_a(name, ["127.0.0.1"])
        await registry.add_domain(name, "my-app")
        real_order = client.order
        ordered = []

        async def order_then_removed(*args: Any, **kwargs: Any) -> Issued:
            issued = await real_order(*args, **kwargs)
            ordered.append(name)
            await registry.remove_domain(name)  # `domains remove` while the CA answered
            return issued

        client.order = order_then_removed  # type: ignore[method-assign]
        try:
            assert await one_pass(lifecycle) == 1
            assert ordered == [name]
            assert await store.get(rec.cert_key(name, "acme")) is None
            assert await store.get(rec.status_key(name)) is None
            # No lock, no challenge token, no certificate: only the account stays.
            assert await store.keys("") == [rec.ACME_ACCOUNT]
        finally:
            client.close()

    in_store(store_path, scenario)


def test_ca_clock_ahead_of_ours_issues_once_and_serves_from_not_before(
        store_path: Path, pebble: Pebble, dns: DNSServer) -> None:
    async def scenario(store: FileStore) -> None:
        clock = Clock()
        clock.now -= 30  # our clock is 30 s behind pebble's
        lifecycle, registry, client = make_lifecycle(store, pebble, dns, clock)
        name = "skew.example.test"
        dns.set_a(name, ["127.0.0.1"])
        await registry.add_domain(name, "my-app")
        try:
            assert await one_pass(lifecycle) == 1
            issued = await registry.certificate(name, "acme")
            assert issued is not None, "a just-issued certificate was thrown away"
            assert issued.not_before > clock.now
            view = await registry.view(name)
            assert (view.status_label, view.in_use) == ("Creating", "platform")
            assert await lifecycle.tick() == []  # held, not ordered again
            clock.now = issued.not_before + 1
            view = await registry.view(name)
            assert (view.status_label, view.in_use) == ("In use", "letsencrypt")
            assert pebble.order_count() == 1
        finally:
            client.close()

    in_store(store_path, scenario)


# --------------------------------------------------------------------------- 8. schedule


def test_renew_at_one_third_of_the_lifetime_remaining() -> None:
    assert renewal.renew_at(0.0, 90 * DAY) == pytest.approx(60 * DAY)
    assert renewal.renew_at(1000.0, 1000.0 + 45 * DAY) == pytest.approx(1000.0 + 30 * DAY)


def test_renew_at_follows_the_ari_window() -> None:
    start, end = 50 * DAY, 52 * DAY
    picks = {renewal.renew_at(0.0, 90 * DAY, (start, end), random.Random(seed))
             for seed in range(20)}
    assert all(start <= p <= end for p in picks)
    assert len(picks) > 1  # a random time inside the window, not always its start
    assert renewal.renew_at(0.0, 90 * DAY, (start, start)) == start
    # The CA may ask for an early renewal (a revocation coming): ARI wins over 2/3.
    assert renewal.renew_at(0.0, 90 * DAY, (10 * DAY, 11 * DAY)) < 11 * DAY


def test_retry_delay_backs_off_with_jitter() -> None:
    rng = random.Random(7)
    for failures, base in ((1, 60), (2, 600), (3, 6000), (4, 86400), (9, 86400)):
        delays = [renewal.retry_delay(failures, rng=rng) for _ in range(50)]
        assert all(near(d, base) for d in delays), (failures, min(delays), max(delays))
        assert max(delays) - min(delays) > base * 0.05  # jittered, not fixed


def test_retry_after_wins_only_when_larger() -> None:
    assert renewal.retry_delay(1, 3600.0) == 3600.0
    assert near(renewal.retry_delay(1, 5.0), 60)
    assert near(renewal.retry_delay(4, 3600.0), 86400)


# --------------------------------------------------------------------------- 9. registry


def test_registry_refuses_platform_names_unknown_apps_and_duplicates(
        store_path: Path) -> None:
    async def scenario(store: FileStore) -> None:
        registry = Registry(store, platform_domain=PLATFORM, apps={"my-app"})
        for name in (PLATFORM, f"my-app.{PLATFORM}", f"a.b.{PLATFORM}"):
            with pytest.raises(RegistryError, match="platform domain"):
                await registry.add_domain(name, "my-app")
        with pytest.raises(RegistryError, match="app 'nope' does not exist"):
            await registry.add_domain("shop.example.test", "nope")
        await registry.add_domain("Shop.Example.Test.", "my-app")
        with pytest.raises(RegistryError, match="already exists"):
            await registry.add_domain("shop.example.test", "my-app")
        assert [v.name for v in await registry.views()] == ["shop.example.test"]
        assert await store.keys(rec.DOMAINS) == ["domains/shop.example.test"]

    in_store(store_path, scenario)


def test_remove_deletes_certificates_and_status(store_path: Path, ca: CA) -> None:
    async def scenario(store: FileStore) -> None:
        registry = Registry(store, platform_domain=PLATFORM, apps={"my-app"})
        name = "bye.example.test"
        custom = ca.issue([name])
        await registry.add_domain(name, "my-app", chain=custom.chain_pem, key=custom.key_pem)
        acme = ca.issue([name])
        await registry.store_acme_certificate(name, load_bundle(acme.chain_pem, acme.key_pem))
        await registry.set_status(name, state="issued", message="certificate issued")
        assert (await registry.view(name)).status_label == "Not used"
        for key in (rec.cert_key(name, "custom"), rec.cert_key(name, "acme"), rec.status_key(name)):
            assert await store.get(key) is not None

        await registry.remove_domain(name)
        for key in (rec.domain_key(name), rec.cert_key(name, "custom"), rec.cert_key(name, "acme"),
                    rec.status_key(name)):
            assert await store.get(key) is None, key
        with pytest.raises(RegistryError, match="does not exist"):
            await registry.view(name)
        with pytest.raises(RegistryError, match="does not exist"):
            await registry.remove_domain(name)

    in_store(store_path, scenario)


# ------------------------------------------------------------------ the due-time schedule


class CountingStore(FileStore):
    """The real file store, counting reads of single records by prefix, and noting the
    prefixes read whole (`scan`: every record at once, in memory together)."""

    reads: dict[str, int]
    whole: list[str]

    async def get(self, key: str) -> Any:
        self.reads[key.split("/", 1)[0]] = self.reads.get(key.split("/", 1)[0], 0) + 1
        return await super().get(key)

    async def scan(self, prefix: str) -> Any:
        self.whole.append(prefix)
        return await super().scan(prefix)


def test_a_tick_reads_no_certificate_of_a_domain_its_status_says_is_not_due(
        store_path: Path, pebble: Pebble, dns: DNSServer) -> None:
    """At scale the pass was the cost: every tick read every domain's status and ACME
    certificate (PEM and all). Now an issued domain's status says when it is next due;
    a tick between full passes looks only at what changed (notify) or came due."""
    async def scenario(_: FileStore) -> None:
        store = CountingStore(store_path)
        store.reads, store.whole = {}, []
        clock = Clock()
        lifecycle, registry, client = make_lifecycle(store, pebble, dns, clock)
        lifecycle.settings = LifecycleSettings(check_interval=1.0, rescan=300.0)
        letsencrypt = CA.new("Test Let's Encrypt")
        names = [f"held{i}.example.test" for i in range(150)]
        try:
            for name in names:
                await registry.add_domain(name, "my-app")
                cert = letsencrypt.issue([name], not_after=clock.now + 60 * DAY)
                bundle = load_bundle(cert.chain_pem, cert.key_pem, domain=name)
                await registry.store_acme_certificate(name, bundle)
                await registry.set_status(name, state="issued",
                                          renew_at=renewal.renew_at(bundle.not_before,
                                                                    bundle.not_after))
            store.reads.clear()
            assert await lifecycle.tick() == []  # the full pass: pages, no single reads
            assert store.reads == {}
            # A page of domains at a time, never the whole store at once (a million
            # domains and their statuses were ~800 MB in the supervisor for a moment).
            assert store.whole == []
            for _ in range(5):
                clock.now += 1
                assert await lifecycle.tick() == []
            assert store.reads == {}

            # One domain comes due (its status moved); the supervisor's watch says so.
            due = names[7]
            dns.set_a(due, ["127.0.0.1"])
            await registry.set_status(due, state="issued", renew_at=clock.now - 1)
            lifecycle.notify([due])
            started = await lifecycle.tick()
            assert [t.get_name() for t in started] == [f"lifecycle {due}"]
            await lifecycle.settle()
            renewed = await registry.status(due)
            assert renewed is not None and renewed.state == "issued"
            assert renewed.renew_at > clock.now
            # Reads were for that one domain only (its work and its new due time).
            assert store.reads.get("certs", 0) <= 4, store.reads
            store.reads.clear()
            clock.now += 1
            assert await lifecycle.tick() == []
            assert store.reads.get("certs", 0) == 0, store.reads
        finally:
            client.close()
            await store.close()

    in_store(store_path, scenario)
