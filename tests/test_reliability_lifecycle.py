"""The lifecycle keeps going (issue #10, items 6, 11, 15, 16).

- 6: an undecodable store record is skipped and counted (files and etcd) while every
  other domain is issued and renewed; a pass that raises is survived; a node task
  killed by an injected exception is noticed and started again by the supervisor.
- 11: a CA that forgot the account (pebble restarted) gets a new one at the next order,
  without a restart; `tlsedge domains retry`, the API and the dashboard re-order a
  domain in Error at once.
- 15: a Let's Encrypt certificate that expired while the CA was unreachable shows Error,
  says it expired, what is served and when the next try is (not "Pending DNS").
- 16: the CA's ARI window is asked for again as its Retry-After says, and a window it
  moved after issuance is followed (a small HTTPS front adds renewalInfo to pebble).

Real pebble, real DNS server, real FileStore and etcd; time in-process comes from a
clock the test moves. Every wait is a bounded poll.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
import ssl
import threading
import time
import urllib.request
import uuid
from collections.abc import Awaitable, Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import REGISTRY

from proxy.app import Supervisor
from proxy.lifecycle import renewal
from proxy.lifecycle.acme import AcmeClient, AcmeSettings
from proxy.lifecycle.dnscheck import DnsChecker, DnsSettings
from proxy.lifecycle.domains import Lifecycle, LifecycleSettings
from proxy.registry import Registry, utc_text
from proxy.store import open_store as open_node_store
from proxy.store import records as rec
from proxy.store.base import Store
from proxy.store.etcd import EtcdSettings, EtcdStore
from proxy.store.files import FileStore
from tests.certgen import CA, DAY
from tests.conftest import PLATFORM
from tests.support.admin import AdminClient, admin_token, hidden_csrf
from tests.support.backend import Backend
from tests.support.dnsserver import DNSServer
from tests.support.edge import Edge
from tests.support.etcd import EtcdServer
from tests.support.pebble import Pebble
from tests.support.ports import free_port
from tests.test_lifecycle_e2e import (
    acme_section,
    base_config,
    cli,
    ok,
    read_store,
    show,
    transitions,
    verified_fingerprint,
    wait_for,
    write_root,
)
from tests.test_lifecycle_unit import Clock, one_pass

pytestmark = pytest.mark.timeout(180)

NAME_NOT_STR = b'{"name": 42, "app": "my-app"}'  # the record of the issue: $.name is an int


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def dns() -> Iterator[DNSServer]:
    with DNSServer() as server:
        yield server


@pytest.fixture
def pebble(dns: DNSServer) -> Iterator[Pebble]:
    # In-process tests answer no HTTP-01: pebble marks every challenge valid.
    with Pebble(http_port=free_port(), dns_port=dns.port, always_valid=True) as ca:
        yield ca


@pytest.fixture(scope="module")
def etcd_server() -> Iterator[EtcdServer]:
    with EtcdServer() as server:
        yield server


@pytest.fixture(params=["files", "etcd"])
def open_store(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[[], Store]:
    """Opens the test's store: a FileStore, or a fresh prefix of the module's etcd."""
    if request.param == "files":
        return lambda: FileStore(tmp_path / "store")
    server: EtcdServer = request.getfixturevalue("etcd_server")
    settings = EtcdSettings(endpoints=(server.endpoint,), prefix=f"/t-{uuid.uuid4().hex}/")
    return lambda: EtcdStore(settings)


def on_store(open_store: Callable[[], Store],
             scenario: Callable[[Store], Awaitable[None]]) -> None:
    async def main() -> None:
        store = open_store()
        try:
            await scenario(store)
        finally:
            await store.close()

    asyncio.run(main())


def lifecycle_for(store: Store, directory: str, ca_bundle: Path, dns: DNSServer,
                  clock: Callable[[], float], *, tick: float = 1.0
                  ) -> tuple[Lifecycle, Registry, AcmeClient]:
    registry = Registry(store, platform_domain=PLATFORM, apps={"my-app"}, clock=clock)
    client = AcmeClient(AcmeSettings(directory=directory, ca_bundle=str(ca_bundle)))
    checker = DnsChecker(DnsSettings(edge_addresses=("127.0.0.1",),
                                     resolvers=(dns.address,)), timeout=2.0)
    lifecycle = Lifecycle(store, registry, client, checker,
                          LifecycleSettings(check_interval=1.0, tick=tick), clock=clock)
    return lifecycle, registry, client


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def until(check: Callable[[], Awaitable[Any]], within: float, what: str) -> Any:
    """Poll an async `check` until it returns something truthy; return that."""
    deadline = time.monotonic() + within
    last: Any = None
    while time.monotonic() < deadline:
        last = await check()
        if last:
            return last
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out after {within:g} s waiting for {what} (last: {last!r})")


async def fingerprint(registry: Registry, name: str) -> str | None:
    cert = await registry.certificate(name, "acme")
    return cert.fingerprint if cert is not None else None


# --------------------------------------------------------------- 6. unreadable records


def test_unreadable_domain_record_is_skipped_and_counted_while_others_are_issued_and_renewed(
        open_store: Callable[[], Store], pebble: Pebble, dns: DNSServer,
        caplog: pytest.LogCaptureFixture) -> None:
    async def scenario(store: Store) -> None:
        clock = Clock()
        lifecycle, registry, client = lifecycle_for(
            store, pebble.directory_url, pebble.ca_bundle_path, dns, clock, tick=0.05)
        good = ["good-a.example.test", "good-b.example.test"]
        for name in [*good, "bad-status.example.test"]:
            dns.set_a(name, ["127.0.0.1"])
            await registry.add_domain(name, "my-app")
        await store.put(rec.domain_key("broken.example.test"), NAME_NOT_STR)
        await store.put(rec.status_key("bad-status.example.test"), b'{"state": 7}')
        skipped = sample("tlsedge_lifecycle_unreadable_records_total", prefix="domains")
        skipped_status = sample("tlsedge_lifecycle_unreadable_records_total", prefix="status")
        stop = asyncio.Event()
        running = asyncio.create_task(lifecycle.run(stop))
        try:
            first = {n: await until(lambda n=n: fingerprint(registry, n), 30, f"{n} issued")
                     for n in good}
            assert not running.done(), "the lifecycle ended"
            statuses = [await registry.status(n) for n in good]
            # Renewal: time moves past both renewal times; both are ordered again.
            clock.now = max(s.renew_at for s in statuses if s is not None) + 1
            for name in good:
                await until(lambda n=name: _changed(registry, n, first[n]), 30,
                            f"{name} renewed")
            assert not running.done(), "the lifecycle ended"
            assert await registry.certificate("bad-status.example.test", "acme") is None
        finally:
            stop.set()
            await asyncio.wait_for(running, 30)
            await lifecycle.settle()
            client.close()
        assert sample("tlsedge_lifecycle_unreadable_records_total",
                      prefix="domains") > skipped
        assert sample("tlsedge_lifecycle_unreadable_records_total",
                      prefix="status") > skipped_status
        said = [r.getMessage() for r in caplog.records
                if "skipping unreadable store record domains/broken.example.test" in
                r.getMessage()]
        assert len(said) == 1, said  # said once, not at every pass
        assert "Expected `str`, got `int` - at `$.name`" in said[0]

    on_store(open_store, scenario)


async def _changed(registry: Registry, name: str, before: str) -> bool:
    now = await fingerprint(registry, name)
    return now is not None and now != before


def test_a_lifecycle_pass_that_raises_is_logged_and_the_next_pass_goes_on(
        tmp_path: Path, pebble: Pebble, dns: DNSServer,
        caplog: pytest.LogCaptureFixture) -> None:
    class ExplodingScans(FileStore):
        """The real store, whose first two scans raise what no code expects."""

        explosions = 2

        def scan_pages(self, prefix: str, **how: Any) -> Any:
            if self.explosions:
                self.explosions -= 1
                raise RuntimeError("injected: scan exploded")
            return super().scan_pages(prefix, **how)

    async def scenario() -> None:
        store = ExplodingScans(tmp_path / "store")
        clock = Clock()
        lifecycle, registry, client = lifecycle_for(
            store, pebble.directory_url, pebble.ca_bundle_path, dns, clock, tick=0.05)
        name = "survivor.example.test"
        dns.set_a(name, ["127.0.0.1"])
        await registry.add_domain(name, "my-app")
        failed = sample("tlsedge_lifecycle_pass_failures_total")
        stop = asyncio.Event()
        running = asyncio.create_task(lifecycle.run(stop))
        try:
            await until(lambda: fingerprint(registry, name), 30, f"{name} issued")
            assert not running.done()
        finally:
            stop.set()
            await asyncio.wait_for(running, 30)
            client.close()
            await store.close()
        assert sample("tlsedge_lifecycle_pass_failures_total") == failed + 2
        assert sum("lifecycle pass failed unexpectedly" in r.getMessage()
                   for r in caplog.records) == 2
        assert "injected: scan exploded" in caplog.text  # with its traceback

    asyncio.run(scenario())


def test_supervisor_restarts_a_lifecycle_task_killed_by_an_injected_exception(
        tmp_path: Path, pebble: Pebble, dns: DNSServer, ca: CA,
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    platform = ca.issue([f"*.{PLATFORM}"])
    cert, key = platform.write(tmp_path, "platform")
    config_path = tmp_path / "tlsedge.yaml"
    config_path.write_text(yaml.safe_dump({
        "platform_domain": PLATFORM, "workers": 1,
        "listen": {"https": f"127.0.0.1:{free_port()}", "http": f"127.0.0.1:{free_port()}",
                   "metrics": None},
        "tls": {"platform_certificate": {"cert": cert, "key": key}},
        "store": {"path": str(tmp_path / "store")},
        "apps": {"my-app": {"backends": ["127.0.0.1:9"]}},
        "acme": {"directory": pebble.directory_url, "ca_bundle": str(pebble.ca_bundle_path),
                 "dns": {"edge_addresses": ["127.0.0.1"], "resolvers": [dns.address],
                         "check_interval": 1}}}))
    real_run = Lifecycle.run
    runs: list[Lifecycle] = []

    async def killed_once(self: Lifecycle, stop: asyncio.Event) -> None:
        runs.append(self)
        if len(runs) == 1:
            raise RuntimeError("injected: the lifecycle task is killed")
        await real_run(self, stop)

    monkeypatch.setattr(Lifecycle, "run", killed_once)
    name = "after-restart.example.test"
    dns.set_a(name, ["127.0.0.1"])

    async def scenario() -> None:
        supervisor = Supervisor(str(config_path))
        stop = asyncio.Event()
        restarts = sample("tlsedge_node_task_restarts_total", task="lifecycle")
        # The node's tasks as run() starts them: after its one read of the store.
        supervisor.store = open_node_store(supervisor.snapshot.config)
        serving = asyncio.Event()
        serving.set()
        reading = await supervisor._read_store(serving)
        tasks = [reading, *await supervisor._node_tasks(stop, reading)]
        assert supervisor.store is not None
        registry = Registry(supervisor.store, platform_domain=PLATFORM, apps={"my-app"})
        try:
            await registry.add_domain(name, "my-app")
            # Only a lifecycle started again orders it.
            await until(lambda: fingerprint(registry, name), 30, f"{name} issued")
        finally:
            stop.set()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await supervisor.store.close()
            for sock in (*supervisor.https, *supervisor.http):
                sock.close()
        assert len(runs) == 2
        assert sample("tlsedge_node_task_restarts_total", task="lifecycle") == restarts + 1

    asyncio.run(scenario())
    failed = [r for r in caplog.records if r.getMessage() == "node task lifecycle failed"]
    assert len(failed) == 1 and failed[0].exc_info is not None
    assert "injected: the lifecycle task is killed" in caplog.text
    assert "node task lifecycle failed: RuntimeError: injected: the lifecycle task is killed;" \
           " starting it again in 1 s" in caplog.text


# ------------------------------------------------------------ 11. account the CA forgot


def test_orders_running_together_after_the_ca_forgot_the_account_register_one_new_account(
        tmp_path: Path, pebble: Pebble, dns: DNSServer,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="proxy.lifecycle.acme")

    async def scenario() -> None:
        store = FileStore(tmp_path / "store")
        clock = Clock()
        lifecycle, registry, client = lifecycle_for(
            store, pebble.directory_url, pebble.ca_bundle_path, dns, clock)
        try:
            dns.set_a("first.example.test", ["127.0.0.1"])
            await registry.add_domain("first.example.test", "my-app")
            assert await one_pass(lifecycle) == 1
            before = await store.get(rec.ACME_ACCOUNT)
            assert before is not None
            caplog.clear()

            pebble.restart()  # its database is gone: our account with it
            names = [f"after{i}.example.test" for i in range(3)]
            for name in names:
                dns.set_a(name, ["127.0.0.1"])
                await registry.add_domain(name, "my-app")
            assert await one_pass(lifecycle) == 3  # ordered together (concurrency 4)
            for name in names:
                status = await registry.status(name)
                assert status is not None and status.state == "issued", status
                assert status.failures == 0
            assert pebble.order_count() == 3  # no order was refused and placed again later
            after = await store.get(rec.ACME_ACCOUNT)
            assert after is not None
            old = rec.decode(before.value, rec.AccountRecord)
            new = rec.decode(after.value, rec.AccountRecord)
            assert new.uri != old.uri and new.key_pem != old.key_pem
            registered = [r for r in caplog.records
                          if r.getMessage().startswith("registered ACME account")]
            assert len(registered) == 1, [r.getMessage() for r in registered]
            assert new.uri in registered[0].getMessage()
        finally:
            client.close()
            await store.close()

    asyncio.run(scenario())


@pytest.fixture(scope="module")
def backend_mod() -> Iterator[Backend]:
    with Backend("b1") as b:
        yield b


def test_after_a_ca_restart_the_next_order_succeeds_and_retry_reorders_an_error_domain_at_once(
        tmp_path: Path, dns: DNSServer, ca: CA, backend_mod: Backend) -> None:
    config = base_config(ca, tmp_path, backend_mod, str(tmp_path / "store"))
    edge = Edge(tmp_path, config, start=False, admin=True)
    try:
        with Pebble(http_port=edge.http_port, dns_port=dns.port) as pebble:
            edge.config["acme"] = acme_section(pebble, dns)
            edge.write_config()
            edge.start()
            _new_account_without_a_restart(edge, pebble, dns, tmp_path)
            _retry_reorders_error_domains_at_once(edge, pebble, dns, tmp_path)
    finally:
        edge.__exit__(None, None, None)


def _issued_by(edge: Edge, name: str, root: Path, timeout: float = 30.0) -> str:
    fp: str = wait_for(lambda: verified_fingerprint(edge, name, root), timeout,
                       f"a pebble certificate for {name}", interval=0.1)
    return fp


def _new_account_without_a_restart(edge: Edge, pebble: Pebble, dns: DNSServer,
                                   tmp_path: Path) -> None:
    store = edge.config["store"]["path"]
    dns.set_a("before.example.test", ["127.0.0.1"])
    ok(edge, "add", "before.example.test", "--app", "my-app")
    _issued_by(edge, "before.example.test", write_root(pebble, tmp_path / "root-1.pem"))
    account = json.loads(read_store(store, rec.ACME_ACCOUNT) or b"{}")

    pebble.restart()  # accounts, orders and issuing root: all new
    root = write_root(pebble, tmp_path / "root-2.pem")
    name = "after-ca-restart.example.test"
    dns.set_a(name, ["127.0.0.1"])
    ok(edge, "add", name, "--app", "my-app")
    _issued_by(edge, name, root)
    assert transitions(edge, name) == [("pending_dns", "creating"), ("creating", "issued")]
    assert pebble.order_count() == 1  # the refused order was sent again at once
    stored = json.loads(read_store(store, rec.ACME_ACCOUNT) or b"{}")
    assert stored["uri"] != account["uri"]  # the new account, for every node
    assert "registering a new account" in edge.log()


def _retry_reorders_error_domains_at_once(edge: Edge, pebble: Pebble, dns: DNSServer,
                                          tmp_path: Path) -> None:
    names = {"cli": "retry-cli.example.test", "api": "retry-api.example.test",
             "dashboard": "retry-dash.example.test"}
    pebble.stop()  # unreachable: each order fails and waits out its backoff (~60 s)
    for name in names.values():
        dns.set_a(name, ["127.0.0.1"])
        ok(edge, "add", name, "--app", "my-app")
    retry_at = {}
    for name in names.values():
        view = wait_for(lambda n=name: (v := show(edge, n))["status"] == "error" and v, 20,
                        f"{name} in Error")
        assert "ACME server unreachable" in view["last_error"]
        assert "order failed; retrying at" in view["message"]
        status = json.loads(read_store(edge.config["store"]["path"],
                                       rec.status_key(name)) or b"{}")
        retry_at[name] = status["retry_at"]
        assert retry_at[name] > time.time() + 10  # ~60 s after the failure

    pebble.start()  # a fresh database again: the account is unknown once more
    root = write_root(pebble, tmp_path / "root-3.pem")
    done = cli(edge, "retry", names["cli"])
    assert done.returncode == 0, done.stderr
    assert f"retry of {names['cli']} requested" in done.stdout
    api = AdminClient(edge, token=admin_token(edge))
    reply = api.request("POST", f"/api/v1/domains/{names['api']}/retry")
    assert reply.status == 202, reply.text
    assert reply.json()["name"] == names["api"]
    browser = AdminClient(edge)
    browser.login(admin_token(edge))
    page = browser.request("GET", f"/domains/{names['dashboard']}").text
    assert 'id="retry"' in page
    form = browser.form(f"/domains/{names['dashboard']}/retry", {"csrf": hidden_csrf(page)})
    assert form.status == 303 and "done=retried" in form.headers["Location"]
    for name in names.values():
        _issued_by(edge, name, root)
        assert time.time() < retry_at[name], f"{name} waited out its backoff"
        assert show(edge, name)["status_label"] == "In use"

    # Nothing to retry, or no such domain: one line, exit 1, nothing changes.
    for args, words in (((names["cli"],), f"{names['cli']} has a valid Let's Encrypt "
                         "certificate and no failed order; nothing to retry"),
                        (("nowhere.example.test",), "nowhere.example.test does not exist")):
        refused = cli(edge, "retry", *args)
        assert refused.returncode == 1 and refused.stdout == ""
        assert refused.stderr.splitlines() == [f"tlsedge: domain {words}"]
    refused_api = api.request("POST", "/api/v1/domains/nowhere.example.test/retry")
    assert refused_api.status == 404


# ------------------------------------------------------ 15. a status that says the truth


def test_certificate_expired_while_the_ca_is_unreachable_shows_error_not_pending_dns(
        tmp_path: Path, pebble: Pebble, dns: DNSServer) -> None:
    async def scenario() -> None:
        store = FileStore(tmp_path / "store")
        clock = Clock()
        lifecycle, registry, client = lifecycle_for(
            store, pebble.directory_url, pebble.ca_bundle_path, dns, clock)
        name = "expiring.example.test"
        dns.set_a(name, ["127.0.0.1"])  # DNS stays fine all along
        await registry.add_domain(name, "my-app")
        try:
            assert await one_pass(lifecycle) == 1
            acme = await registry.certificate(name, "acme")
            assert acme is not None

            pebble.stop()
            clock.now = acme.not_after - 10  # renewal overdue; the CA unreachable
            assert await one_pass(lifecycle) == 1
            view = await registry.view(name)
            assert (view.status_label, view.in_use) == ("In use", "letsencrypt")
            assert f"keeps serving until {utc_text(acme.not_after)}" in view.message
            status = await registry.status(name)
            assert status is not None and status.retry_at > acme.not_after

            clock.now = acme.not_after + 1  # expired before the next try
            assert await lifecycle.tick() == []
            view = await registry.view(name)
            assert (view.status, view.status_label, view.in_use) == ("error", "Error",
                                                                     "platform")
            assert view.message == (f"certificate expired on {utc_text(acme.not_after)}; "
                                    f"the platform certificate is served; retrying at "
                                    f"{utc_text(status.retry_at)}")
            assert "ACME server unreachable" in view.last_error

            clock.now = status.retry_at + 1  # the next try fails too
            assert await one_pass(lifecycle) == 1
            status = await registry.status(name)
            assert status is not None and status.state == "error"
            view = await registry.view(name)
            assert (view.status_label, view.in_use) == ("Error", "platform")
            assert view.message == (f"certificate expired on {utc_text(acme.not_after)}; "
                                    f"the platform certificate is served; order failed; "
                                    f"retrying at {utc_text(status.retry_at)}")
            assert "ACME server unreachable" in view.last_error
        finally:
            client.close()
            await store.close()

    asyncio.run(scenario())


# ---------------------------------------------------------------- 16. ARI asked again


def test_ari_is_asked_again_as_retry_after_says_between_a_minute_and_a_day() -> None:
    assert renewal.ari_delay(None) == 6 * 3600  # the CA said nothing
    assert renewal.ari_delay(7200.0) == 7200
    assert renewal.ari_delay(1.0) == 60  # not hammered
    assert renewal.ari_delay(30 * DAY) == DAY  # not forgotten
    # Asked again, the same window keeps the time drawn in it; a moved one draws anew.
    assert renewal.follow_window(50 * DAY, 0.0, 90 * DAY, (49 * DAY, 51 * DAY)) == 50 * DAY
    moved = renewal.follow_window(50 * DAY, 0.0, 90 * DAY, (10 * DAY, 11 * DAY))
    assert 10 * DAY <= moved <= 11 * DAY
    assert renewal.follow_window(50 * DAY, 0.0, 90 * DAY, None) == 50 * DAY


def _iso(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class AriFront:
    """HTTPS in front of pebble (2.4 has no ARI): serves pebble's directory with a
    renewalInfo URL added, and answers it with the window and Retry-After the test
    sets. Every other URL of the directory is pebble's own, so orders go straight to it.
    """

    def __init__(self, pebble: Pebble) -> None:
        self.window = (0.0, 0.0)
        self.retry_after = 3600
        self.asked: list[str] = []
        upstream = ssl.create_default_context(cafile=str(pebble.ca_bundle_path))
        front = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                headers = {"Content-Type": "application/json"}
                if self.path == "/dir":
                    with urllib.request.urlopen(pebble.directory_url, context=upstream,
                                                timeout=5) as answer:
                        body = json.loads(answer.read())
                    body["renewalInfo"] = f"{front.base}/ari"
                elif self.path.startswith("/ari/"):
                    front.asked.append(self.path.removeprefix("/ari/"))
                    start, end = front.window
                    body = {"suggestedWindow": {"start": _iso(start), "end": _iso(end)}}
                    headers["Retry-After"] = str(front.retry_after)
                else:
                    self.send_error(404)
                    return
                data = json.dumps(body).encode()
                self.send_response(200)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: object) -> None:
                return

        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(pebble.workdir / "listener-cert.pem",
                                pebble.workdir / "listener-key.pem")
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.base = f"https://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def directory(self) -> str:
        return f"{self.base}/dir"

    def __enter__(self) -> AriFront:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_ari_window_moved_by_the_ca_after_issuance_is_followed(
        tmp_path: Path, pebble: Pebble, dns: DNSServer) -> None:
    async def scenario(front: AriFront) -> None:
        store = FileStore(tmp_path / "store")
        clock = Clock()
        lifecycle, registry, client = lifecycle_for(store, front.directory,
                                                    pebble.ca_bundle_path, dns, clock)
        name = "ari.example.test"
        dns.set_a(name, ["127.0.0.1"])
        await registry.add_domain(name, "my-app")
        start, end = clock.now + 30 * DAY, clock.now + 31 * DAY
        front.window, front.retry_after = (start, end), 7200
        try:
            assert await one_pass(lifecycle) == 1
            first = await registry.certificate(name, "acme")
            status = await registry.status(name)
            assert first is not None and status is not None and status.state == "issued"
            assert start - 1 <= status.renew_at <= end + 1
            assert status.ari_at == pytest.approx(clock.now + 7200, abs=1)
            assert len(front.asked) == 1

            clock.now += 3600  # before the CA's Retry-After: nothing is asked
            assert await lifecycle.tick() == []
            assert len(front.asked) == 1

            clock.now = status.ari_at + 1  # asked again: same window, same renewal time
            assert await one_pass(lifecycle) == 1
            again = await registry.status(name)
            assert again is not None and len(front.asked) == 2
            assert front.asked[1] == front.asked[0]
            assert again.renew_at == status.renew_at
            assert again.ari_at == pytest.approx(clock.now + 7200, abs=1)
            assert pebble.order_count() == 1

            # The CA moves the window ahead (a mass revocation coming): open now. Its
            # Retry-After of 10 s is read as the minimum, one minute.
            clock.now = again.ari_at + 1
            front.window, front.retry_after = (clock.now - 3600, clock.now - 60), 10
            assert await one_pass(lifecycle) == 1
            renewed = await registry.certificate(name, "acme")
            assert renewed is not None and renewed.fingerprint != first.fingerprint
            assert pebble.order_count() == 2
            assert front.asked[2] == front.asked[0]  # the old certificate's window moved
            assert len(front.asked) == 4 and front.asked[3] != front.asked[0]  # the new one
            latest = await registry.status(name)
            assert latest is not None and latest.state == "issued"
            assert latest.ari_at == pytest.approx(clock.now + 60, abs=1)
        finally:
            client.close()
            await store.close()

    with AriFront(pebble) as front:
        asyncio.run(scenario(front))
