"""ACME at platform scale (issue #16): bulk add, the order budget and its queue, several
CAs, External Account Binding, many orders at once.

Real pebble (always_valid for the in-process lifecycles, which answer no HTTP-01; real
HTTP-01 through the edge for the `tlsedge run` tests), the test DNS server, real
FileStore and etcd, the real CLI. In-process lifecycles take time from a Clock the test
moves, so "three hours later" takes no three hours; every wait is a bounded poll.
"""

from __future__ import annotations

import asyncio
import base64
import html
import http.client
import json
import re
import ssl
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from prometheus_client import REGISTRY

from proxy.config import Acme, AcmeLimits, Eab, Issuer, Limit
from proxy.errors import ConfigError, ConflictError, RegistryError, StoreError
from proxy.lifecycle.batching import group_commit
from proxy.lifecycle.budget import Budget
from proxy.lifecycle.dnscheck import DnsChecker, DnsSettings
from proxy.lifecycle.domains import Lifecycle, LifecycleSettings
from proxy.lifecycle.issuers import Issuers
from proxy.registry import Registry
from proxy.store import records as rec
from proxy.store.base import Store, Write
from proxy.store.etcd import EtcdSettings, EtcdStore
from proxy.store.files import FileStore
from tests.certgen import CA
from tests.conftest import PLATFORM
from tests.support.admin import AdminClient, admin_token, edge_settings
from tests.support.backend import Backend
from tests.support.dnsserver import DNSServer
from tests.support.edge import Edge
from tests.support.etcd import EtcdServer
from tests.support.pebble import Pebble, verify_fullchain
from tests.support.ports import free_port
from tests.test_lifecycle_e2e import (
    base_config,
    ok,
    served_chain,
    show,
    verified_fingerprint,
    wait_for,
    write_root,
)

pytestmark = pytest.mark.timeout(300)

ROOT = Path(__file__).resolve().parent.parent
HOUR, DAY = 3600.0, 86400.0


class Clock:
    """Time the test moves by hand. It starts ten minutes ahead of the real time: the
    certificates are real, and issued during the test they are already valid by it."""

    def __init__(self) -> None:
        self.now = time.time() + 600

    def __call__(self) -> float:
        return self.now


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def dns() -> Iterator[DNSServer]:
    with DNSServer() as server:
        yield server


@pytest.fixture(scope="module")
def pebble(dns: DNSServer) -> Iterator[Pebble]:
    # In-process lifecycles answer no HTTP-01: pebble marks every challenge valid.
    with Pebble(http_port=free_port(), dns_port=dns.port, always_valid=True) as ca:
        yield ca


@pytest.fixture(scope="module")
def etcd_server() -> Iterator[EtcdServer]:
    with EtcdServer() as server:
        yield server


@pytest.fixture
def shm(tmp_path: Path) -> Iterator[Path]:
    """A folder in memory for FileStores that take thousands of writes (a real FileStore;
    only its disk is RAM, so fsync costs nothing on a shared test machine)."""
    folder = Path("/dev/shm") / f"tlsedge-test-{uuid.uuid4().hex}"
    folder.mkdir(mode=0o700)
    try:
        yield folder
    finally:
        subprocess.run(["rm", "-rf", str(folder)], check=False)


def acme_config(*issuers: Pebble, limits: AcmeLimits | None = None,
                fallback_after: int = 2, concurrency: int = 16) -> Acme:
    """A resolved acme: section for these pebbles (each its own issuer)."""
    return Acme(issuers=tuple(
        Issuer(directory=p.directory_url, name=f"pebble-{i + 1}", ca_bundle=str(p.ca_bundle_path),
               limits=limits or AcmeLimits()) for i, p in enumerate(issuers)),
        directory=issuers[0].directory_url, fallback_after=fallback_after,
        concurrency=concurrency)


class Node:
    """One in-process lifecycle with its issuers, budget and registry."""

    def __init__(self, store: Store, acme: Acme, dns: DNSServer, clock: Clock) -> None:
        store = group_commit(store)  # as the supervisor runs it
        self.store = store
        self.clock = clock
        self.registry = Registry(store, platform_domain=PLATFORM, apps={"my-app"}, clock=clock)
        self.issuers = Issuers.from_config(store, acme, lock_ttl=30.0)
        self.budget = Budget(store, self.issuers.budgets, clock=clock)
        checker = DnsChecker(DnsSettings(edge_addresses=("127.0.0.1",),
                                         resolvers=(dns.address,)), timeout=5.0)
        self.lifecycle = Lifecycle(
            store, self.registry, self.issuers, checker,
            LifecycleSettings(check_interval=1.0, concurrency=acme.concurrency), clock=clock,
            budget=self.budget)

    async def one_pass(self) -> int:
        started = await self.lifecycle.tick()
        await self.lifecycle.settle()
        return len(started)

    def close(self) -> None:
        self.issuers.close()


def on_files(path: Path, scenario: Callable[[Store], Awaitable[None]]) -> None:
    async def main() -> None:
        store = FileStore(path / "store")
        try:
            await scenario(store)
        finally:
            await store.close()

    asyncio.run(main())


async def issued(registry: Registry, names: list[str]) -> list[str]:
    found = await asyncio.gather(*(registry.certificate(n, "acme") for n in names))
    return [n for n, cert in zip(names, found, strict=True) if cert is not None]


async def statuses(registry: Registry, names: list[str]) -> dict[str, rec.StatusRecord]:
    found = await asyncio.gather(*(registry.status(n) for n in names))
    return {n: s for n, s in zip(names, found, strict=True) if s is not None}


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def assert_orders(pebble: Pebble, expected: int) -> None:
    """Pebble logs an order as it takes it, a moment after answering: look until the log
    says `expected` (seconds; longer on a busy machine), then that it says no more."""
    deadline = time.monotonic() + 60
    while pebble.order_count() < expected and time.monotonic() < deadline:
        time.sleep(0.05)
    assert pebble.order_count() == expected


def point(dns: DNSServer, names: list[str]) -> None:
    for name in names:
        dns.set_a(name, ["127.0.0.1"])


# ----------------------------------------------------------- 2. the budget, with a clock


def test_400_new_domains_order_300_in_the_first_window_then_as_tokens_come_back_renewals_first(
        shm: Path, pebble: Pebble, dns: DNSServer) -> None:
    async def scenario(store: Store) -> None:
        clock = Clock()
        node = Node(store, acme_config(pebble), dns, clock)
        names = [f"shop{i:03d}.test" for i in range(400)]  # 400 registered domains
        point(dns, names)
        before = pebble.order_count()
        ok_before = sample("tlsedge_acme_orders_total", issuer="pebble-1", result="ok")
        added = await node.registry.add_domains(names, "my-app")
        assert all(a.view is not None for a in added)
        try:
            spent_at = clock.now  # the account's 300 tokens go in this pass
            await node.one_pass()
            assert_orders(pebble, before + 300)
            assert sample("tlsedge_acme_orders_total", issuer="pebble-1",
                          result="ok") - ok_before == 300
            assert sample("tlsedge_acme_queue_length") == 100
            left = {kind: sample("tlsedge_acme_budget_remaining", issuer="pebble-1",
                                 kind=kind)
                    for kind in ("account", "registered_domain", "name_set",
                                 "failed_authorization")}
            assert left == {"account": 0, "registered_domain": 49, "name_set": 4,
                            "failed_authorization": 5}
            done = await issued(node.registry, names)
            assert len(done) == 300
            waiting = {n: s for n, s in (await statuses(node.registry, names)).items()
                       if n not in done}
            assert len(waiting) == 100 and len(node.budget.waiting) == 100
            for name, status in waiting.items():
                view = await node.registry.view(name)
                assert view.status_label == "Pending DNS", view
                assert view.message.startswith("waiting: account budget until "), view.message
                assert clock.now < status.retry_at <= clock.now + 3 * HOUR + 1
            first = min(waiting, key=lambda n: waiting[n].retry_at)
            # One order every 36 s comes back (300 per 3 h): the first in line's turn.
            assert waiting[first].retry_at == pytest.approx(clock.now + 36, abs=1)
        finally:
            node.close()

        # A restart forgets nothing: a retry asked now still finds the budget spent.
        node = Node(store, acme_config(pebble), dns, clock)
        try:
            await node.registry.retry(first)
            await node.one_pass()
            assert_orders(pebble, before + 300)
            status = await node.registry.status(first)
            assert status is not None and status.retry_at > clock.now

            # A renewal that comes due now waits too, but goes before every new domain.
            renewing = done[0]
            old = await node.registry.certificate(renewing, "acme")
            await node.registry.set_status(renewing, renew_at=clock.now)
            await node.one_pass()
            view = await node.registry.view(renewing)
            assert view.status_label == "In use", view
            assert view.message.startswith("renewal waiting: account budget until "), view
            status = await node.registry.status(renewing)
            assert status is not None
            assert status.retry_at == pytest.approx(waiting[first].retry_at, abs=1)
            clock.now = waiting[first].retry_at + 0.5
            await node.one_pass()
            assert_orders(pebble, before + 301)
            new = await node.registry.certificate(renewing, "acme")
            assert old is not None and new is not None and new.fingerprint != old.fingerprint
            assert await node.registry.certificate(first, "acme") is None
            status = await node.registry.status(first)
            assert status is not None and status.retry_at > clock.now  # the next turn

            # By when the account has a token for each of the 100 and the renewal: one
            # every 36 s from the first pass. (A turn told to a waiting order is its place
            # in the queue when it asked; one asking later with more urgency goes ahead,
            # so the latest turn told may be a token early: it is told to wait again.)
            latest = max(s.retry_at for s in (await statuses(node.registry, names)).values())
            clock.now = max(spent_at + (len(waiting) + 1) * 36, latest) + 1
            for _ in range(3):  # those told to wait for the ones ahead, at their turn
                await node.one_pass()
            assert_orders(pebble, before + 401)
            assert len(await issued(node.registry, names)) == 400
            assert not node.budget.waiting
        finally:
            node.close()

    on_files(shm, scenario)


def test_60_subdomains_of_one_registered_domain_get_50_certificates_across_two_nodes(
        etcd_server: EtcdServer, pebble: Pebble, dns: DNSServer) -> None:
    async def scenario() -> None:
        settings = EtcdSettings(endpoints=(etcd_server.endpoint,),
                                prefix=f"/t-{uuid.uuid4().hex}/")
        stores = [EtcdStore(settings), EtcdStore(settings)]  # two nodes, one cluster
        clock = Clock()
        nodes = [Node(store, acme_config(pebble), dns, clock) for store in stores]
        names = [f"shop{i:02d}.brand.example" for i in range(60)]
        point(dns, names)
        before = pebble.order_count()
        await nodes[0].registry.add_domains(names, "my-app")
        try:
            await asyncio.gather(*(node.one_pass() for node in nodes))
            assert_orders(pebble, before + 50)
            done = await issued(nodes[0].registry, names)
            assert len(done) == 50
            waiting = {n: s for n, s in (await statuses(nodes[1].registry, names)).items()
                       if n not in done}
            assert len(waiting) == 10
            for status in waiting.values():
                assert status.message.startswith("waiting: registered-domain budget until ")
                # 50 a week: one back every 3 h 21 min 36 s, the first at the earliest.
                assert status.retry_at >= clock.now + 7 * DAY / 50 - 1

            start, interval = clock.now, 7 * DAY / 50
            for _ in range(12):  # each node's queue is its own: turns may need a look again
                left = [n for n in names if n not in await issued(nodes[0].registry, names)]
                if not left:
                    break
                later = await statuses(nodes[0].registry, left)
                clock.now = max(s.retry_at for s in later.values()) + 1
                await asyncio.gather(*(node.one_pass() for node in nodes))
                # Never more than the bucket allows: 50, then one per interval.
                allowed = 50 + int((clock.now - start) / interval)
                assert pebble.order_count() - before <= allowed
            assert_orders(pebble, before + 60)
            assert len(await issued(nodes[0].registry, names)) == 60
        finally:
            for node in nodes:
                node.close()
            for store in stores:
                await store.close()

    asyncio.run(scenario())


# ------------------------------------------------- 2. the CA says 429 or 503: pause exactly


class CaFront:
    """HTTPS in front of pebble, forwarding every request with its Host header (so the
    URLs pebble writes are the front's), that answers for pebble when told to: a 429
    with Retry-After to one account's new orders, a 503 with Retry-After to everything.
    Counts the requests of each account (by the JWS key id) and all, and keeps the
    payload of every new order. With `window` set it adds what pebble 2.4 lacks, ARI:
    a renewalInfo URL in the directory, answered with that window (Retry-After 1 h)."""

    def __init__(self, pebble: Pebble) -> None:
        self.pebble = pebble
        self.limited: tuple[str, int] | None = None  # (account URL, Retry-After)
        self.unavailable: int | None = None  # Retry-After of the 503
        self.window: tuple[float, float] | None = None  # ARI's suggested window
        self.new_orders: list[dict[str, Any]] = []  # JWS payloads, in order
        self.requests: dict[str, int] = {}
        self.refused = 0
        self._lock = threading.Lock()
        upstream = ssl.create_default_context(cafile=str(pebble.ca_bundle_path))
        front = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_HEAD(self) -> None:
                self.relay()

            def do_GET(self) -> None:
                self.relay()

            def do_POST(self) -> None:
                self.relay()

            def relay(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                answer = front.decide(self.command, self.path, body)
                if answer is None:
                    answer = front.with_ari(self.path, *self.forward(body))
                status, headers, data = answer
                self.send_response(status)
                for name, value in headers:
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            def forward(self, body: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
                conn = http.client.HTTPSConnection("127.0.0.1", front.pebble.listen_port,
                                                   context=upstream, timeout=30)
                try:
                    headers = {k: v for k, v in self.headers.items()
                               if k.lower() not in ("content-length", "connection")}
                    conn.request(self.command, self.path, body=body or None, headers=headers)
                    response = conn.getresponse()
                    data = response.read()
                    kept = [(k, v) for k, v in response.getheaders()
                            if k.lower() not in ("content-length", "connection",
                                                 "transfer-encoding")]
                    return response.status, kept, data
                finally:
                    conn.close()

            def log_message(self, format: str, *args: object) -> None:
                return

        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(pebble.workdir / "listener-cert.pem",
                                pebble.workdir / "listener-key.pem")
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.directory = f"https://127.0.0.1:{self.server.server_address[1]}/dir"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @staticmethod
    def account_of(body: bytes) -> str:
        """The JWS key id (the account URL) of a POST, '' for none (new account)."""
        try:
            protected = json.loads(body)["protected"]
            header = json.loads(base64.urlsafe_b64decode(protected + "=" * (-len(protected) % 4)))
        except (ValueError, KeyError, TypeError):
            return ""
        return str(header.get("kid", ""))

    @staticmethod
    def payload_of(body: bytes) -> dict[str, Any]:
        payload = json.loads(body)["payload"]
        decoded = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        assert isinstance(decoded, dict)
        return decoded

    def with_ari(self, path: str, status: int, headers: list[tuple[str, str]],
                 data: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
        """Pebble's answer, with renewalInfo in the directory when `window` is set."""
        if path == "/dir" and self.window is not None and status == 200:
            directory = json.loads(data)
            directory["renewalInfo"] = self.directory.removesuffix("/dir") + "/ari"
            data = json.dumps(directory).encode()
        return status, headers, data

    def decide(self, method: str, path: str,
               body: bytes) -> tuple[int, list[tuple[str, str]], bytes] | None:
        account = self.account_of(body) if method == "POST" else ""
        if method == "POST" and path.startswith("/order-plz"):
            self.new_orders.append(self.payload_of(body))
        if path.startswith("/ari/") and self.window is not None:
            start, end = (time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))
                          for t in self.window)
            return 200, [("Retry-After", "3600"), ("Content-Type", "application/json")], \
                json.dumps({"suggestedWindow": {"start": start, "end": end}}).encode()
        with self._lock:
            self.requests[account] = self.requests.get(account, 0) + 1
            if self.unavailable is not None:
                self.refused += 1
                return 503, [("Retry-After", str(self.unavailable)),
                             ("Content-Type", "text/plain")], b"down for maintenance\n"
            if (self.limited is not None and account == self.limited[0]
                    and path.startswith("/order-plz")):
                self.refused += 1
                problem = {"type": "urn:ietf:params:acme:error:rateLimited", "status": 429,
                           "detail": "too many new orders (300) from this account in the "
                                     "last 3h0m0s"}
                return 429, [("Retry-After", str(self.limited[1])),
                             ("Content-Type", "application/problem+json")], \
                    json.dumps(problem).encode()
        return None

    def count(self, account: str = "") -> int:
        with self._lock:
            return sum(self.requests.values()) if not account else \
                self.requests.get(account, 0)

    def __enter__(self) -> CaFront:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def front_config(front: CaFront, pebble: Pebble, limits: AcmeLimits | None = None) -> Acme:
    return Acme(issuers=(Issuer(directory=front.directory, name="front",
                                ca_bundle=str(pebble.ca_bundle_path),
                                limits=limits or AcmeLimits()),),
                directory=front.directory)


def test_a_429_pauses_that_accounts_orders_until_retry_after_and_nothing_else(
        tmp_path: Path, pebble: Pebble, dns: DNSServer) -> None:
    async def scenario(front: CaFront) -> None:
        clock = Clock()
        stores = [FileStore(tmp_path / "a"), FileStore(tmp_path / "b")]  # two platforms
        limited, other = (Node(s, front_config(front, pebble), dns, clock) for s in stores)
        point(dns, ["kept.a.example", "new1.a.example", "new2.a.example", "b.example"])
        try:
            await limited.registry.add_domain("kept.a.example", "my-app")
            await limited.one_pass()
            kept = await limited.registry.certificate("kept.a.example", "acme")
            assert kept is not None
            account = limited.issuers.preferred.account
            assert account is not None

            front.limited = (account.uri, 3600)
            await limited.registry.add_domains(["new1.a.example", "new2.a.example"], "my-app")
            await limited.registry.set_status("kept.a.example", renew_at=clock.now)
            await other.registry.add_domain("b.example", "my-app")
            await asyncio.gather(limited.one_pass(), other.one_pass())
            until = clock.now + 3600
            assert await other.registry.certificate("b.example", "acme") is not None
            for name in ("new1.a.example", "new2.a.example", "kept.a.example"):
                status = await limited.registry.status(name)
                assert status is not None and status.failures == 0
                assert status.retry_at == pytest.approx(until, abs=1)
                assert "CA rate limit (429) for the account until" in status.message
            view = await limited.registry.view("kept.a.example")
            assert (view.status_label, view.in_use) == ("In use", "letsencrypt")
            assert view.acme is not None and view.acme.fingerprint == kept.fingerprint

            asked = front.count(account.uri)
            clock.now = until - 5  # paused: not one request of that account, even for a
            await limited.registry.retry("new1.a.example")  # retry or a new domain
            point(dns, ["new3.a.example"])
            await limited.registry.add_domain("new3.a.example", "my-app")
            await limited.one_pass()
            assert front.count(account.uri) == asked
            status = await limited.registry.status("new3.a.example")
            assert status is not None and status.retry_at == pytest.approx(until, abs=1)
            assert "CA rate limit (429) for the account until" in status.message

            front.limited = None
            clock.now = until + 1
            await limited.one_pass()
            assert len(await issued(limited.registry, ["new1.a.example", "new2.a.example",
                                                       "new3.a.example"])) == 3
            renewed = await limited.registry.certificate("kept.a.example", "acme")
            assert renewed is not None and renewed.fingerprint != kept.fingerprint
        finally:
            for node in (limited, other):
                node.close()
            for store in stores:
                await store.close()

    with CaFront(pebble) as front:
        asyncio.run(scenario(front))


def test_a_503_pauses_the_whole_issuer_until_retry_after_and_keeps_every_certificate(
        tmp_path: Path, pebble: Pebble, dns: DNSServer) -> None:
    async def scenario(front: CaFront) -> None:
        clock = Clock()
        store = FileStore(tmp_path / "store")
        node = Node(store, front_config(front, pebble), dns, clock)
        point(dns, ["kept.c.example", "new.c.example", "new.d.example"])
        try:
            await node.registry.add_domain("kept.c.example", "my-app")
            await node.one_pass()
            kept = await node.registry.certificate("kept.c.example", "acme")
            assert kept is not None

            front.unavailable = 120
            await node.registry.add_domains(["new.c.example", "new.d.example"], "my-app")
            await node.registry.set_status("kept.c.example", renew_at=clock.now)
            await node.one_pass()
            until = clock.now + 120
            for name in ("new.c.example", "new.d.example", "kept.c.example"):
                status = await node.registry.status(name)
                assert status is not None and status.failures == 0, status
                assert status.retry_at == pytest.approx(until, abs=1)
                assert "front unavailable (HTTP 503) until" in status.message
            view = await node.registry.view("kept.c.example")
            assert (view.status_label, view.in_use) == ("In use", "letsencrypt")
            assert view.acme is not None and view.acme.fingerprint == kept.fingerprint

            asked = front.count()
            clock.now = until - 5  # the whole issuer paused: not one request
            await node.registry.retry("new.c.example")  # not even when asked for
            await node.one_pass()
            assert front.count() == asked

            front.unavailable = None
            clock.now = until + 1
            await node.one_pass()
            assert len(await issued(node.registry, ["new.c.example", "new.d.example"])) == 2
            renewed = await node.registry.certificate("kept.c.example", "acme")
            assert renewed is not None and renewed.fingerprint != kept.fingerprint
        finally:
            node.close()
            await store.close()

    with CaFront(pebble) as front:
        asyncio.run(scenario(front))


# --------------------------------------------------------------------- 0. bulk add


@pytest.fixture(params=["files", "etcd"])
def open_store(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[[], Store]:
    if request.param == "files":
        return lambda: FileStore(tmp_path / "store")
    server: EtcdServer = request.getfixturevalue("etcd_server")
    settings = EtcdSettings(endpoints=(server.endpoint,), prefix=f"/t-{uuid.uuid4().hex}/")
    return lambda: EtcdStore(settings)


def test_put_all_writes_every_item_or_none(open_store: Callable[[], Store]) -> None:
    async def scenario() -> None:
        store = open_store()
        try:
            first = await store.put("domains/taken.example", b"1")
            writes = [Write(f"domains/n{i}.example", b"x", expect=0) for i in range(100)]
            revision = await store.put_all(
                [*writes, Write("status/n0.example", b"s"),
                 Write("domains/taken.example", b"2", expect=first)])
            assert revision == await store.revision()
            got = await asyncio.gather(*(store.get(w.key) for w in writes))
            assert all(i is not None and i.value == b"x" for i in got)
            taken = await store.get("domains/taken.example")
            assert taken is not None and taken.value == b"2"

            # One condition that fails: nothing is written, the error names the key.
            with pytest.raises(ConflictError, match=r"domains/n5\.example already exists"):
                await store.put_all([Write("domains/fresh.example", b"x", expect=0),
                                     Write("domains/n5.example", b"y", expect=0)])
            assert await store.get("domains/fresh.example") is None
            with pytest.raises(ConflictError, match=r"taken\.example changed"):
                await store.put_all([Write("domains/fresh.example", b"x"),
                                     Write("domains/taken.example", b"3", expect=first)])
            assert await store.get("domains/fresh.example") is None
            assert await store.revision() == revision
            with pytest.raises(StoreError, match="at most 128"):
                await store.put_all([Write(f"x/{i}", b"") for i in range(129)])
        finally:
            await store.close()

    asyncio.run(scenario())


def test_bulk_add_checks_each_name_and_adds_the_valid_ones_in_one_transaction_per_batch(
        etcd_server: EtcdServer) -> None:
    async def scenario() -> None:
        store = EtcdStore(EtcdSettings(endpoints=(etcd_server.endpoint,),
                                       prefix=f"/t-{uuid.uuid4().hex}/"))
        registry = Registry(store, platform_domain=PLATFORM, apps={"my-app"})
        try:
            await registry.add_domain("taken.example", "my-app")
            good = [f"shop{i}.example" for i in range(100)]
            names = [*good[:50], "taken.example", "co.uk", f"x.{PLATFORM}", "bad..name",
                     "Shop1.Example.", *good[50:]]
            results = await registry.add_domains(names, "my-app")
            assert [r.name for r in results][:50] == good[:50]
            errors = {r.name: r.error for r in results if r.view is None}
            assert errors == {
                "taken.example": "domain taken.example already exists",
                "co.uk": "co.uk cannot be a custom domain: it is a public suffix (names "
                         "under it, such as example.co.uk, belong to different owners)",
                f"x.{PLATFORM}": f"x.{PLATFORM} is under the platform domain {PLATFORM}; "
                                 "it is served with the platform certificate",
                "bad..name": "'bad..name' is not a valid hostname: it has an empty label",
                "shop1.example": "shop1.example is listed more than once"}
            added = [r for r in results if r.view is not None]
            assert [r.name for r in added] == good
            assert all(r.view is not None and r.view.status_label == "Pending DNS"
                       for r in added)
            # Two transactions (64 names, then 36): etcd gives each one revision.
            items = await asyncio.gather(*(store.get(rec.domain_key(n)) for n in good))
            assert len({i.revision for i in items if i is not None}) == 2
            assert all(await asyncio.gather(*(registry.status(n) for n in good)))

            with pytest.raises(RegistryError, match="app 'nope' does not exist"):
                await registry.add_domains(["new.example"], "nope")
            assert await registry.domain("new.example") is None
        finally:
            await store.close()

    asyncio.run(scenario())


def run_cli(config: Path, *args: str, stdin: str | None = None
            ) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy.cli", "domains", *args, "-c", str(config)],
        capture_output=True, text=True, timeout=60, cwd=ROOT, input=stdin)


def test_domains_add_takes_many_names_and_a_file_and_reports_each(
        tmp_path: Path, edge_config: tuple[dict[str, Any], Any]) -> None:
    config = tmp_path / "tlsedge.yaml"
    config.write_text(yaml.safe_dump(edge_config[0]))
    names = tmp_path / "names.txt"
    names.write_text("# a customer's shops\nshop1.example\n\nshop2.example  # the second\n"
                     "co.uk\nshop1.example\n")
    done = run_cli(config, "add", "a.example", "b.example", "--from-file", str(names),
                   "--app", "my-app")
    assert done.returncode == 1, done.stderr  # one was rejected: said, the others added
    assert done.stdout.splitlines() == [
        "a.example added to my-app; Let's Encrypt: ACME off",
        "b.example added to my-app; Let's Encrypt: ACME off",
        "shop1.example added to my-app; Let's Encrypt: ACME off",
        "shop2.example added to my-app; Let's Encrypt: ACME off",
        "co.uk: not added: co.uk cannot be a custom domain: it is a public suffix (names "
        "under it, such as example.co.uk, belong to different owners)",
        "shop1.example: not added: shop1.example is listed more than once"]
    assert done.stderr == "4 added, 2 rejected\n"

    done = run_cli(config, "add", "-", "--from-file", "-", "--app", "my-app", "--json",
                   stdin="c.example\na.example\n")
    assert done.returncode == 1, done.stderr
    report = json.loads(done.stdout)
    assert [(r["name"], r["added"], r["error"]) for r in report] == [
        ("-", False, "'-' is not a valid hostname: label '-' may hold only letters, digits "
                     "and inner hyphens"),
        ("c.example", True, ""), ("a.example", False, "domain a.example already exists")]
    assert report[1]["domain"]["status_label"] == "ACME off"  # no acme: section

    listed = json.loads(run_cli(config, "list", "--json").stdout)
    assert sorted(v["name"] for v in listed if v.get("source", "store") == "store") == [
        "a.example", "b.example", "c.example", "shop1.example", "shop2.example"]

    # A wrong app refuses the whole call: one line, exit 1, nothing written.
    done = run_cli(config, "add", "d.example", "e.example", "--app", "nope")
    assert (done.returncode, done.stdout) == (1, "")
    assert done.stderr.startswith("tlsedge: app 'nope' does not exist"), done.stderr
    assert len(done.stderr.splitlines()) == 1
    assert "d.example" not in run_cli(config, "list").stdout


# ------------------------------------------------------ 3. a second CA when the first fails


@pytest.fixture(scope="module")
def backend_mod() -> Iterator[Backend]:
    with Backend("b1") as b:
        yield b


def issuers_section(dns: DNSServer, *pebbles: Pebble, **more: Any) -> dict[str, Any]:
    return {"email": "ops@example.test",
            "issuers": [{"directory": p.directory_url, "name": f"pebble-{i + 1}",
                         "ca_bundle": str(p.ca_bundle_path), **more}
                        for i, p in enumerate(pebbles)],
            "dns": {"edge_addresses": ["127.0.0.1"], "resolvers": [dns.address],
                    "check_interval": 1}}


def served_from(edge: Edge, name: str, root: Path) -> dict[str, Any] | None:
    """`name`'s view once the edge serves it a chain that verifies up to `root` (leaf,
    then the intermediate signed by it) and its status says so; else None."""
    fingerprint = verified_fingerprint(edge, name, root)
    if fingerprint is None:
        return None
    chain = served_chain(edge, name)
    pem = b"".join(x509.load_der_x509_certificate(d).public_bytes(serialization.Encoding.PEM)
                   for d in chain)
    verify_fullchain(pem, root.read_bytes(), name)
    view = show(edge, name)
    if view["acme"] is None or view["acme"]["fingerprint"] != fingerprint:
        return None
    return view


def test_second_issuer_serves_while_the_first_is_unreachable_and_renewals_go_back_to_it(
        tmp_path: Path, dns: DNSServer, ca: CA, backend_mod: Backend) -> None:
    config = base_config(ca, tmp_path, backend_mod, str(tmp_path / "store"))
    edge = Edge(tmp_path, config, start=False)
    try:
        # 40 s certificates: renewed 27 s after issuance, so the test sees one renewal.
        with Pebble(http_port=edge.http_port, dns_port=dns.port, validity_seconds=40) as first, \
                Pebble(http_port=edge.http_port, dns_port=dns.port,
                       validity_seconds=40) as second:
            edge.config["acme"] = issuers_section(dns, first, second)
            edge.write_config()
            edge.start()
            roots = {"first": write_root(first, tmp_path / "first.pem"),
                     "second": write_root(second, tmp_path / "second.pem")}
            point(dns, ["one.example", "two.example"])
            ok(edge, "add", "one.example", "--app", "my-app")
            view = wait_for(lambda: served_from(edge, "one.example", roots["first"]),
                            30, "one.example from the first pebble")
            assert view["message"] == "certificate issued by pebble-1"

            first.stop()  # unreachable: new domains go to the second at once
            ok(edge, "add", "two.example", "--app", "my-app")
            view = wait_for(lambda: served_from(edge, "two.example", roots["second"]),
                            30, "two.example from the second pebble")
            assert view["message"] == "certificate issued by pebble-2"
            assert served_from(edge, "one.example", roots["first"])  # still served
            assert "pebble-1 cannot take the order for two.example" in edge.log()

            first.start()  # back (a new root, and it forgot our account)
            roots["first"] = write_root(first, tmp_path / "first-again.pem")
            view = wait_for(lambda: served_from(edge, "two.example", roots["first"]),
                            60, "two.example renewed by the first pebble")
            assert view["message"] == "certificate issued by pebble-1"
            assert edge.metric("tlsedge_acme_orders_total", issuer="pebble-2",
                               result="ok") == 1
    finally:
        edge.__exit__(None, None, None)


# ------------------------------------------------------------ 4. External Account Binding


def test_eab_account_registers_and_orders_and_a_wrong_key_is_one_clear_error(
        tmp_path: Path, dns: DNSServer, caplog: pytest.LogCaptureFixture) -> None:
    key = base64.urlsafe_b64encode(bytes(range(32))).decode().rstrip("=")
    right, wrong = tmp_path / "eab.key", tmp_path / "wrong.key"
    right.write_text(key + "\n")
    wrong.write_text(base64.urlsafe_b64encode(bytes(32)).decode().rstrip("=") + "\n")
    for path in (right, wrong):
        path.chmod(0o600)

    def acme(pebble: Pebble, key_file: Path) -> Acme:
        return Acme(issuers=(Issuer(directory=pebble.directory_url, name="eab-ca",
                                    ca_bundle=str(pebble.ca_bundle_path), limits=AcmeLimits(),
                                    eab=Eab(kid="kid-1", hmac_key_file=str(key_file))),),
                    directory=pebble.directory_url)

    async def scenario(pebble: Pebble) -> None:
        clock = Clock()
        for key_file, name in ((right, "eab.example"), (wrong, "wrong-eab.example")):
            store = FileStore(tmp_path / f"store-{name}")
            node = Node(store, acme(pebble, key_file), dns, clock)
            point(dns, [name])
            try:
                await node.registry.add_domain(name, "my-app")
                await node.one_pass()
                view = await node.registry.view(name)
            finally:
                node.close()
                await store.close()
            if key_file == right:
                assert (view.status_label, view.in_use) == ("In use", "letsencrypt"), view
                continue
            assert view.status_label == "Error" and view.in_use == "platform"
            assert view.last_error.startswith(
                f"{pebble.directory_url} refused the External Account Binding (kid 'kid-1'; "
                "check the issuer's eab.kid and eab.hmac_key_file): ACME account "
                "registration: urn:ietf:params:acme:error:unauthorized: "), view.last_error
            assert "\n" not in view.last_error
            status = await registry_status(tmp_path / f"store-{name}", name)
            assert status.retry_at - clock.now >= 0.9 * DAY  # a person must act: daily

    with Pebble(http_port=free_port(), dns_port=dns.port, always_valid=True,
                config_overrides={"externalAccountBindingRequired": True,
                                  "externalAccountMACKeys": {"kid-1": key}}) as pebble:
        asyncio.run(scenario(pebble))
    said = [r.getMessage() for r in caplog.records
            if "refused the External Account Binding" in r.getMessage()]
    assert len(said) == 1, said

    # A key file others may read is refused before anything is sent.
    wrong.chmod(0o644)
    with pytest.raises(ConfigError, match=r"may be read by group or others; chmod 600"):
        Issuers.from_config(FileStore(tmp_path / "s"), acme_config_eab(wrong), lock_ttl=30)


def acme_config_eab(key_file: Path) -> Acme:
    return Acme(issuers=(Issuer(directory="https://ca.invalid/dir", name="ca",
                                limits=AcmeLimits(),
                                eab=Eab(kid="k", hmac_key_file=str(key_file))),),
                directory="https://ca.invalid/dir")


async def registry_status(path: Path, name: str) -> rec.StatusRecord:
    store = FileStore(path)
    try:
        status = await Registry(store, platform_domain=PLATFORM, apps=()).status(name)
    finally:
        await store.close()
    assert status is not None
    return status


def test_api_adds_a_list_of_domains_and_reports_each(tmp_path: Path, ca: CA,
                                                      backend_mod: Backend) -> None:
    with Edge(tmp_path, edge_settings(tmp_path, ca, backend_mod), admin=True) as edge:
        api = AdminClient(edge, token=admin_token(edge))
        reply = api.request("POST", "/api/v1/domains", json_body={
            "names": ["one.example", "Two.Example", "co.uk", "one.example"],
            "app": "my-app"})
        assert reply.status == 200, reply.text
        body = reply.json()
        assert (body["added"], body["rejected"]) == (2, 2)
        assert [(r["name"], r["added"], r["error"]) for r in body["results"]] == [
            ("one.example", True, ""), ("two.example", True, ""),
            ("co.uk", False, "co.uk cannot be a custom domain: it is a public suffix (names "
                             "under it, such as example.co.uk, belong to different owners)"),
            ("one.example", False, "one.example is listed more than once")]
        assert body["results"][0]["domain"]["app"] == "my-app"
        for name in ("one.example", "two.example"):
            shown = api.request("GET", f"/api/v1/domains/{name}")
            assert shown.status == 200 and shown.json()["app"] == "my-app"

        # A wrong shape or app: 400 with one line, nothing added.
        for payload, words in (({"names": "three.example", "app": "my-app"},
                                 "invalid JSON body: Expected `array`, got `str` - at "
                                 "`$.names`"),
                               ({"names": ["three.example"], "app": "nope"},
                                "app 'nope' does not exist (apps: my-app, other)")):
            refused = api.request("POST", "/api/v1/domains", json_body=payload)
            assert (refused.status, refused.json()) == (400, {"error": words})
        assert api.request("GET", "/api/v1/domains/three.example").status == 404


# ------------------------------------------------------------ 5. the queue on the dashboard


def queue_rows(page: str) -> list[tuple[str, str, str]]:
    """(domain, reason, until) of each row of an order-queue page."""
    rows = re.findall(r'<tr data-domain="([^"]+)">.*?<td data-field="reason">([^<]*)</td>'
                      r'<td class="nowrap" data-field="until">([^<]*)</td>', page, re.S)
    return [(name, html.unescape(why), html.unescape(until)) for name, why, until in rows]


def test_dashboard_shows_the_order_queue_paged_with_each_domains_reason_and_turn(
        tmp_path: Path, dns: DNSServer, ca: CA, backend_mod: Backend) -> None:
    """An account budget of 2 orders per 3 hours and 103 domains added at once: 2 are
    ordered, 101 wait. The queue page says how many, lists them most urgent first
    (new domains first come, first served; added together, by name), 100 a page, each
    with its reason and turn; a waiting domain's page says where it stands."""
    settings = edge_settings(tmp_path, ca, backend_mod)
    edge = Edge(tmp_path, settings, admin=True, start=False)
    names = [f"q{i:03d}.example" for i in range(103)]
    try:
        with Pebble(http_port=edge.http_port, dns_port=dns.port) as pebble:
            edge.config["acme"] = {
                **issuers_section(dns, pebble),
                "limits": {"account": {"count": 2, "period": 10800}}}
            edge.write_config()
            edge.start()
            point(dns, names)
            api = AdminClient(edge, token=admin_token(edge))
            added = api.request("POST", "/api/v1/domains",
                                json_body={"names": names, "app": "my-app"})
            assert added.status == 200 and added.json()["added"] == 103, added.text

            def queue_full() -> str | None:
                page = api.request("GET", "/queue")
                assert page.status == 200, page.text
                return page.text if "<b>101</b> orders waiting" in page.text else None
            first = wait_for(queue_full, 120, "101 orders in the queue")
            rows = queue_rows(first)
            assert len(rows) == 100 and 'id="next" href="/queue?page=2"' in first
            second = api.request("GET", "/queue?page=2").text
            rest = queue_rows(second)
            assert len(rest) == 1 and 'id="prev" href="/queue?page=1"' in second
            waiting = [name for name, _, _ in rows + rest]
            assert waiting == sorted(waiting) and len(set(waiting)) == 101
            ordered = sorted(set(names) - set(waiting))
            assert len(ordered) == 2
            for _, why, until in rows + rest:
                assert re.fullmatch(r"waiting: account budget until \d{4}-\d\d-\d\dT"
                                    r"\d\d:\d\d:\d\dZ", why), why
                assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC · in \d+ "
                                    r"(min|h|days)", until), until
            for name, why, _ in (rows[0], rest[0]):  # the reason its status says too
                wait_for(lambda n=name, w=why: api.request(  # type: ignore[misc]
                    "GET", f"/api/v1/domains/{n}").json()["message"] == w, 20,
                         f"{name}'s status saying {why}")

            page = api.request("GET", f"/domains/{waiting[0]}").text
            place = re.search(r'<dd id="queue-place">(.*?)</dd>', page, re.S)
            assert place is not None
            assert place.group(1).startswith(
                f"Number 1 of 101 in <a href=\"/queue\">this node's queue</a>: "
                f"{html.escape(rows[0][1])}"), place.group(1)
            assert 'id="queue-place"' not in api.request("GET",
                                                         f"/domains/{ordered[0]}").text
            listing = api.request("GET", "/domains").text
            assert '<a id="queue-link" href="/queue">Order queue: 101 waiting</a>' in listing
            refused = api.request("GET", "/queue?page=0")
            assert refused.status == 400 and "page must be a whole number from 1" in \
                refused.text
            # The same queue through the API, a page at a time.
            listed = api.request("GET", "/api/v1/queue?limit=60&offset=50").json()
            assert listed["acme"] is True and listed["waiting"] == 101
            assert [o["domain"] for o in listed["orders"]] == waiting[50:101]
            assert all(o["reason"].startswith("waiting: account budget until ")
                       and o["until"] > time.time() for o in listed["orders"])
            assert len(api.request("GET", "/api/v1/queue").json()["orders"]) == 100
            too_many = api.request("GET", "/api/v1/queue?limit=1001")
            assert too_many.status == 400 and too_many.json()["error"] == \
                "limit must be a whole number from 1 to 1000"
            assert_orders(pebble, 2)
    finally:
        edge.__exit__(None, None, None)



# ------------------------------------------------------------ 6. ARI renewals: `replaces`


def ari_id(chain_pem: bytes) -> str:
    """RFC 9773's certificate id of a chain's leaf, computed here on its own:
    base64url(AKI keyIdentifier) "." base64url(DER serial), without padding."""
    cert = x509.load_pem_x509_certificate(chain_pem)
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier is not None
    serial = cert.serial_number.to_bytes((cert.serial_number.bit_length() + 8) // 8, "big")
    return ".".join(base64.urlsafe_b64encode(part).decode().rstrip("=")
                    for part in (aki.key_identifier, serial))


def test_an_ari_renewal_names_the_certificate_it_replaces_and_spends_no_new_order(
        tmp_path: Path, pebble: Pebble, dns: DNSServer) -> None:
    """A CA with ARI (pebble 2.4 behind a front that adds it), an account budget of one
    new order per 3 hours: the first order spends it (no `replaces`), a second domain
    waits for the account budget; when the CA opens the first certificate's window, its
    renewal goes out at once, carrying `replaces` with that certificate's id, and the
    second domain still waits (the renewal took no token)."""
    async def scenario(store: Store) -> None:
        clock = Clock()
        limits = AcmeLimits(account=Limit(count=1, period=3 * HOUR))
        node = Node(store, front_config(front, pebble, limits), dns, clock)
        first, second = "ari-replaces.example", "ari-waits.example"
        point(dns, [first, second])
        front.window = (clock.now + 30 * DAY, clock.now + 31 * DAY)
        try:
            await node.registry.add_domain(first, "my-app")
            assert await node.one_pass() == 1
            issued_first = await node.registry.certificate_bundle(first, "acme")
            status = await node.registry.status(first)
            assert issued_first is not None and status is not None
            assert status.state == "issued" and status.ari_at > 0
            assert len(front.new_orders) == 1 and "replaces" not in front.new_orders[0]

            await node.registry.add_domain(second, "my-app")
            assert await node.one_pass() == 1
            waiting = await node.registry.view(second)
            assert waiting.message.startswith("waiting: account budget until "), waiting
            assert len(front.new_orders) == 1

            clock.now = status.ari_at + 1  # an hour on: the CA moved the window, open now
            front.window = (clock.now - 1200, clock.now - 60)
            assert await node.one_pass() == 1  # the ARI poll, then the renewal
            renewed = await node.registry.certificate_bundle(first, "acme")
            assert renewed is not None and renewed.fingerprint != issued_first.fingerprint
            assert len(front.new_orders) == 2
            assert front.new_orders[1]["replaces"] == ari_id(issued_first.chain_pem)
            assert [i["value"] for i in front.new_orders[1]["identifiers"]] == [first]
            still = await node.registry.view(second)
            assert still.message == waiting.message  # its turn has not come
            assert second in node.budget.waiting and first not in node.budget.waiting
        finally:
            node.close()

    with CaFront(pebble) as front:
        on_files(tmp_path, scenario)


# ------------------------------------------------------------ 7. no waiting for the tick


def test_a_domain_added_is_ordered_at_once_not_at_the_next_tick(
        tmp_path: Path, pebble: Pebble, dns: DNSServer) -> None:
    """With passes a minute apart, a domain the store follower reports (notify) is
    looked at by a pass that comes at once: issued in seconds, not after the minute."""
    async def scenario(store: Store) -> None:
        clock = Clock()
        registry = Registry(store, platform_domain=PLATFORM, apps={"my-app"}, clock=clock)
        issuers = Issuers.from_config(store, acme_config(pebble), lock_ttl=30.0)
        checker = DnsChecker(DnsSettings(edge_addresses=("127.0.0.1",),
                                         resolvers=(dns.address,)), timeout=5.0)
        lifecycle = Lifecycle(store, registry, issuers, checker,
                              LifecycleSettings(tick=60.0, rescan=3600.0), clock=clock)
        name = "at-once.example"
        point(dns, [name])
        stop = asyncio.Event()
        running = asyncio.create_task(lifecycle.run(stop))
        try:
            deadline = time.monotonic() + 20
            while lifecycle._scanned_at is None:  # its first pass: the next is a minute off
                assert time.monotonic() < deadline, "no first pass within 20 s"
                await asyncio.sleep(0.02)
            await registry.add_domain(name, "my-app")
            lifecycle.notify([name])  # as the supervisor's store follower does
            deadline = time.monotonic() + 20
            while await registry.certificate(name, "acme") is None:
                assert time.monotonic() < deadline, "not issued within 20 s"
                await asyncio.sleep(0.05)
            assert not running.done()
        finally:
            stop.set()
            await asyncio.wait_for(running, 30)
            await lifecycle.settle()
            issuers.close()

    on_files(tmp_path, scenario)
