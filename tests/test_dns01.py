"""Wildcard custom domains and DNS-01 through RFC 2136 (issue #18, part 2).

Real components on loopback: BIND 9 (`named`, tests/support/bind.py) authoritative for
the platform's dynamic zone `acme.osc-fr1.scalingo.test` (TSIG key) and for the
customers' zones, pebble resolving through it, the real `tlsedge run` with the store
encrypted, the `tlsedge domains` CLI, Python ssl and `openssl s_client`. Every wait is a
bounded poll.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from proxy.lifecycle.dns01 import Dns01, Dns01Settings, TxtPublisher
from proxy.lifecycle.dnscheck import DnsChecker, DnsSettings
from proxy.store import records as rec
from proxy.store.files import FileStore
from proxy.store.sealing import MAGIC
from tests.certgen import CA
from tests.conftest import PLATFORM
from tests.support.admin import AdminClient, admin_token
from tests.support.backend import Backend
from tests.support.bind import BindServer, Zone
from tests.support.edge import Edge
from tests.support.pebble import Pebble

pytestmark = pytest.mark.timeout(240)

ROOT = Path(__file__).resolve().parent.parent
ZONE = f"acme.{PLATFORM}"
CUSTOMERS = ["shop.example.test", "two.example.test", "bad.example.test",
             "kill.example.test", "plain.example.test", "fallback.example.test"]


# --------------------------------------------------------------------------- helpers

def wait_for(check: Callable[[], Any], timeout: float, what: str,
             interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what} (last: {last!r})")


def tlsedge(edge: Edge, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "proxy.cli", "domains", *args, "-c",
                           str(edge.config_path)], capture_output=True, text=True, timeout=30,
                          cwd=ROOT)


def ok(edge: Edge, *args: str) -> str:
    done = tlsedge(edge, *args)
    assert done.returncode == 0, f"{args}: exit {done.returncode}: {done.stderr}"
    return done.stdout


def show(edge: Edge, name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(ok(edge, "show", name, "--json"))
    return data


def status_is(edge: Edge, name: str, status: str) -> dict[str, Any] | None:
    view = show(edge, name)
    return view if view["status"] == status else None


def in_use(edge: Edge, name: str) -> dict[str, Any] | None:
    view = show(edge, name)
    return view if view["status"] == "in_use" and view["in_use"] == "letsencrypt" else None


def challenge_txt(bind: BindServer, base: str) -> set[str]:
    return bind.txt(f"{base}.{ZONE}")


def delegate(bind: BindServer, base: str) -> None:
    """What the customer does: _acme-challenge.<base> CNAME <base>.<our zone>."""
    bind.update(base, "customer", add=(f"_acme-challenge.{base}.", 5, "CNAME",
                                       f"{base}.{ZONE}."))


@dataclass
class Site:
    bind: BindServer
    pebble: Pebble
    edge: Edge
    root: Path
    ca: CA


@pytest.fixture(scope="module")
def bind() -> Iterator[BindServer]:
    zones = [Zone(ZONE, update_key="tlsedge-acme")]
    zones += [Zone(c, ["@ IN A 127.0.0.1", "* IN A 127.0.0.1"], update_key="customer")
              for c in CUSTOMERS]
    with BindServer(zones, ["tlsedge-acme", "customer"]) as server:
        yield server


@pytest.fixture(scope="module")
def backends() -> Iterator[tuple[Backend, Backend]]:
    with Backend("b1") as one, Backend("b2") as two:
        yield one, two


def secret_file(path: Path, secret: str) -> str:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secret + "\n")
    return str(path)


def node_config(workdir: Path, ca: CA, backends: tuple[Backend, Backend], bind: BindServer,
                pebble: Pebble | None, *, secret: str | None = None,
                nameservers: list[str] | None = None,
                edge_addresses: tuple[str, ...] = ("127.0.0.1",), **dns01: Any
                ) -> dict[str, Any]:
    platform = ca.issue([f"*.{PLATFORM}"])
    cert, key = platform.write(workdir, "platform")
    key_file = workdir / "store.key"
    fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(b"k" * 32)
    config: dict[str, Any] = {
        "platform_domain": PLATFORM, "workers": 1,
        "tls": {"platform_certificate": {"cert": cert, "key": key}},
        "store": {"path": str(workdir / "store"), "encryption": {"key_files": [str(key_file)]}},
        "apps": {"shop": {"backends": [backends[0].address]},
                 "other": {"backends": [backends[1].address]}},
        "limits": {"drain_timeout": 2.0},
    }
    if pebble is not None:
        config["acme"] = {
            "directory": pebble.directory_url, "email": "ops@example.test",
            "ca_bundle": str(pebble.ca_bundle_path), "lock_ttl": 2,
            "dns": {"edge_addresses": list(edge_addresses), "resolvers": [bind.address],
                    "check_interval": 1},
            "dns01": {"server": bind.address, "zone": ZONE,
                      "tsig": {"name": "tlsedge-acme", "secret_file": secret_file(
                          workdir / "tsig.secret", secret or bind.secrets["tlsedge-acme"])},
                      "nameservers": nameservers or [bind.address],
                      "propagation_timeout": 20, **dns01}}
    return config


@contextmanager
def site(workdir: Path, bind: BindServer, ca: CA, backends: tuple[Backend, Backend],
         **options: Any) -> Iterator[Site]:
    workdir.mkdir(parents=True, exist_ok=True)
    edge = Edge(workdir, {}, start=False)
    try:
        with Pebble(http_port=edge.http_port, dns_port=bind.port) as pebble:
            edge.write_config({**node_config(workdir, ca, backends, bind, pebble, **options),
                               "listen": edge.config["listen"]})
            edge.start()
            root = workdir / "pebble-root.pem"
            root.write_bytes(pebble.issuing_root())
            yield Site(bind, pebble, edge, root, ca)
    finally:
        edge.__exit__(None, None, None)


def verified(edge: Edge, name: str, root: Path) -> str | None:
    """The leaf fingerprint served for `name` if it verifies against pebble's root."""
    import hashlib
    import ssl

    try:
        with edge.tls_connect(name, cafile=str(root), timeout=3) as s:
            der = s.getpeercert(binary_form=True)
    except (ssl.SSLError, OSError):
        return None
    assert der is not None
    return hashlib.sha256(der).hexdigest()


def raw_store(workdir: Path) -> bytes:
    return b"".join(p.read_bytes() for p in (workdir / "store").rglob("*") if p.is_file())


def raw_record(workdir: Path, key: str) -> bytes:
    async def get() -> bytes:
        store = FileStore(workdir / "store")
        try:
            item = await store.get(key)
            assert item is not None, key
            return item.value
        finally:
            await store.close()
    return asyncio.run(get())


def dns01_records(workdir: Path) -> list[str]:
    async def keys() -> list[str]:
        store = FileStore(workdir / "store")
        try:
            return await store.keys(rec.DNS01)
        finally:
            await store.close()
    return asyncio.run(keys())


# --------------------------------------------------------------------------- end to end

def test_wildcard_domain_goes_pending_dns_then_in_use_and_serves_every_subdomain(
        tmp_path: Path, bind: BindServer, ca: CA, backends: tuple[Backend, Backend]) -> None:
    with site(tmp_path, bind, ca, backends) as s:
        edge = s.edge
        name = "*.shop.example.test"
        ok(edge, "add", name, "--app", "shop")
        record = f"_acme-challenge.shop.example.test. CNAME shop.example.test.{ZONE}."
        view = wait_for(lambda: (v := show(edge, name))["message"] != "added" and v, 10,
                        "the first delegation check")
        assert view["status"] == "pending_dns", view
        assert f"create the DNS record {record}" in view["message"]
        assert s.pebble.order_count() == 0
        delegate(bind, "shop.example.test")
        view = wait_for(lambda: in_use(edge, name), 60, f"{name} In use")
        assert view["acme"]["names"] == ["*.shop.example.test"]
        assert ("pending_dns", "creating") in transitions(edge, name)
        assert ("creating", "issued") in transitions(edge, name)
        fingerprint = view["acme"]["fingerprint"]
        for host in ("a.shop.example.test", "b.shop.example.test"):
            # In use in the store first; each worker serves it once its watch has it.
            wait_for(lambda h=host: verified(edge, h, s.root) == fingerprint, 20,  # type: ignore[misc]
                     f"{host} served the wildcard certificate")
            assert edge.openssl_fingerprint(host) == fingerprint
            status, headers, _ = edge.request(host, "/")
            assert status == 200 and headers["x-backend"] == "b1"
        # Two labels down is not covered, and not routed to the app.
        assert edge.fingerprint("x.y.shop.example.test") != fingerprint
        # The challenge record is gone, in DNS and in the store's bookkeeping.
        wait_for(lambda: not challenge_txt(bind, "shop.example.test"), 10, "TXT removed")
        assert dns01_records(tmp_path) == []
        listing = ok(edge, "list")
        assert listing.count("shop.example.test") == 1 and "*.shop.example.test" in listing
        # The store is encrypted: the ACME account key and the certificate's key too.
        assert b"PRIVATE KEY" not in raw_store(tmp_path)
        assert raw_record(tmp_path, rec.ACME_ACCOUNT).startswith(MAGIC)
        # The apex attached later: the wildcard is ordered again, for both.
        ok(edge, "add", "shop.example.test", "--app", "other")
        apex = wait_for(lambda: in_use(edge, "shop.example.test"), 60, "the apex In use")
        assert sorted(apex["acme"]["names"]) == ["*.shop.example.test", "shop.example.test"]
        assert show(edge, name)["acme"]["fingerprint"] == apex["acme"]["fingerprint"]
        status, headers, _ = edge.request("shop.example.test", "/")
        assert status == 200 and headers["x-backend"] == "b2"


def test_a_wildcard_and_its_apex_are_ordered_together_with_both_values_in_dns(
        tmp_path: Path, bind: BindServer, ca: CA, backends: tuple[Backend, Backend]) -> None:
    with site(tmp_path, bind, ca, backends) as s:
        edge = s.edge
        ok(edge, "add", "*.two.example.test", "--app", "shop")
        wait_for(lambda: "create the DNS record" in show(edge, "*.two.example.test")["message"],
                 10, "the wildcard waiting for its delegation")
        ok(edge, "add", "two.example.test", "--app", "shop")  # it points at us already
        wait_for(lambda: show(edge, "two.example.test")["message"] ==
                 "ordered together with *.two.example.test", 10, "the apex waiting")
        assert s.pebble.order_count() == 0
        delegate(bind, "two.example.test")
        wild = wait_for(lambda: in_use(edge, "*.two.example.test"), 60, "the wildcard")
        apex = wait_for(lambda: in_use(edge, "two.example.test"), 10, "the apex")
        assert sorted(wild["acme"]["names"]) == ["*.two.example.test", "two.example.test"]
        assert apex["acme"]["fingerprint"] == wild["acme"]["fingerprint"]
        assert s.pebble.order_count() == 1
        for host in ("two.example.test", "www.two.example.test"):
            assert verified(edge, host, s.root) == wild["acme"]["fingerprint"]
        wait_for(lambda: not challenge_txt(bind, "two.example.test"), 10, "TXT removed")

    # The two values of such an order live side by side at one name.
    async def publish_two() -> set[str]:
        checker = DnsChecker(DnsSettings(edge_addresses=("127.0.0.1",),
                                         resolvers=(bind.address,)))
        dns01 = Dns01(Dns01Settings(server=("127.0.0.1", bind.port), zone=ZONE,
                                    tsig_name="tlsedge-acme", tsig_algorithm="hmac-sha256",
                                    tsig_secret=bind.secrets["tlsedge-acme"],
                                    nameservers=(("127.0.0.1", bind.port),)), checker)
        store = FileStore(tmp_path / "unit-store")
        publisher = TxtPublisher(dns01, store, "*.two.example.test")
        try:
            await publisher.publish_txt("two.example.test", "value-one")
            await publisher.publish_txt("two.example.test", "value-two")
            both = challenge_txt(bind, "two.example.test")
            await publisher.withdraw_txt("two.example.test", "value-one")
            assert challenge_txt(bind, "two.example.test") == {"value-two"}
            await publisher.withdraw_txt("two.example.test", "value-two")
            assert await store.keys(rec.DNS01) == []
            return both
        finally:
            await store.close()
    assert asyncio.run(publish_two()) == {"value-one", "value-two"}
    assert challenge_txt(bind, "two.example.test") == set()


def test_a_wrong_tsig_secret_is_an_error_with_the_reason_and_disturbs_nothing_else(
        tmp_path: Path, bind: BindServer, ca: CA, backends: tuple[Backend, Backend]) -> None:
    delegate(bind, "bad.example.test")
    wrong = bind.secrets["customer"]  # a real key, just not the one with that name
    with site(tmp_path, bind, ca, backends, secret=wrong) as s:
        edge = s.edge
        ok(edge, "add", "*.bad.example.test", "--app", "shop")
        ok(edge, "add", "plain.example.test", "--app", "other")  # HTTP-01, unaffected
        view = wait_for(lambda: status_is(edge, "*.bad.example.test", "error"), 60,
                        "the wildcard in Error")
        assert "refused: the server rejects TSIG key tlsedge-acme: bad signature" in \
            view["last_error"], view
        assert "retrying at" in view["message"]
        assert wait_for(lambda: in_use(edge, "plain.example.test"), 60, "plain In use")
        assert challenge_txt(bind, "bad.example.test") == set()
        wait_for(lambda: dns01_records(tmp_path) == [], 10, "no dns01 record left")


def test_a_process_killed_between_adding_and_removing_the_txt_record_has_it_removed_at_the_next_start(  # noqa: E501
        tmp_path: Path, bind: BindServer, ca: CA, backends: tuple[Backend, Backend]) -> None:
    delegate(bind, "kill.example.test")
    unreachable = "127.0.0.1:9"  # the propagation check never succeeds: the order waits
    with site(tmp_path, bind, ca, backends, nameservers=[unreachable]) as s:
        edge = s.edge
        ok(edge, "add", "*.kill.example.test", "--app", "shop")
        wait_for(lambda: challenge_txt(bind, "kill.example.test"), 30, "the TXT record added")
        assert dns01_records(tmp_path) == [f"dns01/kill.example.test.{ZONE}"]
        edge.kill()  # the supervisor and its workers, at once
        edge.stop()
        [stale] = challenge_txt(bind, "kill.example.test")  # left behind
        config = edge.config
        config["acme"]["dns01"]["nameservers"] = [bind.address]
        edge.write_config(config)
        edge.start()
        wait_for(lambda: "removed 1 stale DNS-01 value(s) at kill.example.test." in edge.log(),
                 20, "the stale TXT record removed")
        assert stale not in challenge_txt(bind, "kill.example.test")
        # ... and the order, tried again, goes through.
        assert wait_for(lambda: in_use(edge, "*.kill.example.test"), 60, "In use")
        wait_for(lambda: dns01_records(tmp_path) == [], 10, "no dns01 record left")


def test_challenge_per_domain_dns01_on_request_and_as_the_fallback_of_http01(
        tmp_path: Path, bind: BindServer, ca: CA, backends: tuple[Backend, Backend]) -> None:
    delegate(bind, "fallback.example.test")
    # Points at an edge address where nothing answers port 80: HTTP-01 must fail.
    bind.update("fallback.example.test", "customer",
                delete=("fallback.example.test.", "A"))
    bind.update("fallback.example.test", "customer",
                add=("fallback.example.test.", 5, "A", "127.0.0.2"))
    delegate(bind, "plain.example.test")
    with site(tmp_path, bind, ca, backends, fallback=True,
              edge_addresses=("127.0.0.1", "127.0.0.2")) as s:
        edge = s.edge
        ok(edge, "add", "plain.example.test", "--app", "shop", "--challenge", "dns-01")
        ok(edge, "add", "fallback.example.test", "--app", "shop")
        view = wait_for(lambda: in_use(edge, "plain.example.test"), 60, "DNS-01 on request")
        assert verified(edge, "plain.example.test", s.root) == view["acme"]["fingerprint"]
        wait_for(lambda: in_use(edge, "fallback.example.test"), 90, "the DNS-01 fallback")
        assert "HTTP-01 order for fallback.example.test failed" in edge.log()
        assert "ordering with DNS-01" in edge.log()


def test_exact_domains_under_a_wildcard_route_to_their_own_app_and_bad_wildcards_are_refused(
        tmp_path: Path, bind: BindServer, ca: CA, backends: tuple[Backend, Backend]) -> None:
    edge = Edge(tmp_path, {}, start=False, admin=True)
    edge.write_config({**node_config(tmp_path, ca, backends, bind, None),
                       "listen": edge.config["listen"]})
    wildcard = ca.issue(["*.shop.example.test"])
    special = ca.issue(["special.shop.example.test"])
    chain, key = wildcard.write(tmp_path, "wild")
    ok(edge, "add", "*.shop.example.test", "--app", "shop", "--cert", str(chain), "--key",
       str(key), "--no-letsencrypt")
    chain, key = special.write(tmp_path, "special")
    ok(edge, "add", "special.shop.example.test", "--app", "other", "--cert", str(chain),
       "--key", str(key), "--no-letsencrypt")
    edge.start()
    try:
        for host in ("a.shop.example.test", "b.shop.example.test"):
            assert edge.fingerprint(host) == wildcard.fingerprint
            status, headers, _ = edge.request(host, "/")
            assert status == 200 and headers["x-backend"] == "b1"
        assert edge.openssl_fingerprint("special.shop.example.test") == special.fingerprint
        status, headers, _ = edge.request("special.shop.example.test", "/")
        assert status == 200 and headers["x-backend"] == "b2"
        status, _, _ = edge.request("shop.example.test", "/",
                                    server_name="a.shop.example.test")
        assert status != 200  # the apex is not under its wildcard
        # One domain in the admin API and the dashboard, with a page of its own.
        admin = AdminClient(edge, token=admin_token(edge))
        listed = [d["name"] for d in admin.request("GET", "/api/v1/domains").json()["domains"]]
        assert sorted(listed) == ["*.shop.example.test", "special.shop.example.test"]
        reply = admin.request("GET", "/api/v1/domains/%2A.shop.example.test")
        assert reply.status == 200 and reply.json()["in_use"] == "custom"
        dashboard = AdminClient(edge)
        assert dashboard.login(admin_token(edge)).status in (200, 303)
        assert dashboard.request("GET", "/domains").text.count("*.shop.example.test") >= 1
        page = dashboard.request("GET", "/domains/%2A.shop.example.test")
        assert page.status == 200 and wildcard.fingerprint[:16] in page.text.replace(":", "")
    finally:
        edge.stop()
    for name, why in ((f"*.{PLATFORM}", f"is under the platform domain {PLATFORM}"),
                      ("*.co.uk", "co.uk is a public suffix"),
                      ("*.github.io", "github.io is a public suffix"),
                      ("a.*.example.test", "'*' is only allowed as the whole first label"),
                      ("*.shop.example.test", "already exists")):
        done = tlsedge(edge, "add", name, "--app", "shop")
        assert done.returncode == 1, done
        assert why in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    done = tlsedge(edge, "add", "*.new.example.test", "--app", "shop", "--challenge", "http-01")
    assert done.returncode == 1 and "only be obtained with the DNS-01 challenge" in done.stderr


def transitions(edge: Edge, name: str) -> list[tuple[str, str]]:
    import re

    return re.findall(rf"status of {re.escape(name)}: (\w+) -> (\w+)", edge.log())
