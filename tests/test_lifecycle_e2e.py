"""The certificate lifecycle end to end: the real `tlsedge run` (supervisor + workers +
lifecycle), the `tlsedge domains` CLI as a subprocess, a real pebble and the test DNS
server, all on loopback.

One node (edge + its pebble) is shared by the first three tests, each on its own domain;
renewal, restart and the two-node test start their own. Every wait is a bounded poll.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from proxy.store import records as rec
from proxy.store.files import FileStore
from tests.certgen import CA, DAY, Issued, key_pem, new_key
from tests.conftest import PLATFORM
from tests.support.backend import Backend
from tests.support.dnsserver import DNSServer
from tests.support.edge import Edge, read_response, send_request
from tests.support.pebble import Pebble, verify_fullchain

pytestmark = pytest.mark.timeout(120)

EDGE_ADDRESS = "127.0.0.1"
ROOT = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------- helpers


def wait_for(check: Callable[[], Any], timeout: float, what: str,
             interval: float = 0.05) -> Any:
    """Poll `check` until it returns something truthy; return that."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what} (last: {last!r})")


def cli(edge: Edge, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy.cli", "domains", *args, "-c", str(edge.config_path)],
        capture_output=True, text=True, timeout=30, cwd=ROOT)


def ok(edge: Edge, *args: str) -> str:
    done = cli(edge, *args)
    assert done.returncode == 0, f"{args}: exit {done.returncode}: {done.stderr}"
    return done.stdout


def show(edge: Edge, name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(ok(edge, "show", name, "--json"))
    return data


def served_chain(edge: Edge, name: str) -> list[bytes]:
    """DER of every certificate the edge sends for SNI `name`, in the order sent."""
    out = subprocess.run(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{edge.https_port}",
         "-servername", name, "-showcerts"],
        input=b"", capture_output=True, timeout=10).stdout
    pems = re.findall(rb"-----BEGIN CERTIFICATE-----.*?-----END CERTIFICATE-----", out, re.S)
    assert pems, out.decode(errors="replace")
    return [ssl.PEM_cert_to_DER_cert(p.decode()) for p in pems]


def fp(der: bytes) -> str:
    return hashlib.sha256(der).hexdigest()


def verified_fingerprint(edge: Edge, name: str, root_file: Path) -> str | None:
    """The served leaf's fingerprint if the handshake verifies against `root_file`
    (chain and host name), else None."""
    try:
        with edge.tls_connect(name, cafile=str(root_file), timeout=3) as s:
            der = s.getpeercert(binary_form=True)
    except (ssl.SSLError, OSError):
        return None
    assert der is not None
    return fp(der)


def write_root(pebble: Pebble, path: Path) -> Path:
    path.write_bytes(pebble.issuing_root())
    return path


def read_store(path: str, key: str) -> bytes | None:
    async def get() -> bytes | None:
        store = FileStore(path)
        try:
            item = await store.get(key)
            return item.value if item is not None else None
        finally:
            await store.close()

    return asyncio.run(get())


def transitions(edge: Edge, name: str) -> list[tuple[str, str]]:
    """(from, to) of every lifecycle status transition logged for `name`, in order."""
    return re.findall(rf"status of {re.escape(name)}: (\w+) -> (\w+)", edge.log())


def in_use(edge: Edge, name: str, source: str = "letsencrypt") -> dict[str, Any] | None:
    view = show(edge, name)
    if view["status"] == "in_use" and view["in_use"] == source:
        return view
    return None


# --------------------------------------------------------------------------- fixtures


@dataclass
class Node:
    edge: Edge
    pebble: Pebble
    root: Path
    dns: DNSServer
    ca: CA
    files: Path

    def point(self, name: str, address: str = EDGE_ADDRESS) -> None:
        self.dns.set_a(name, [address])

    def write(self, issued: Issued, stem: str) -> tuple[str, str]:
        return issued.write(self.files, stem)


@pytest.fixture(scope="module")
def dns() -> Iterator[DNSServer]:
    with DNSServer() as server:
        yield server


@pytest.fixture(scope="module")
def backend_mod() -> Iterator[Backend]:
    with Backend("b1") as b:
        yield b


def base_config(ca: CA, workdir: Path, backend: Backend, store: str) -> dict[str, Any]:
    platform = ca.issue([f"*.{PLATFORM}"])
    cert, key = platform.write(workdir, "platform")
    return {
        "platform_domain": PLATFORM,
        "workers": 1,
        "tls": {"platform_certificate": {"cert": cert, "key": key}},
        "store": {"path": store},
        "apps": {"my-app": {"backends": [backend.address]}},
        "limits": {"drain_timeout": 2.0},
    }


def acme_section(pebble: Pebble, dns: DNSServer) -> dict[str, Any]:
    return {"directory": pebble.directory_url, "email": "ops@example.test",
            "ca_bundle": str(pebble.ca_bundle_path),
            "dns": {"edge_addresses": [EDGE_ADDRESS], "resolvers": [dns.address],
                    "check_interval": 1}}


@contextmanager
def acme_node(workdir: Path, dns: DNSServer, ca: CA, backend: Backend, *,
              validity: int | None = None, store: str | None = None,
              **pebble_options: Any) -> Iterator[Node]:
    """An edge with the lifecycle on, and the pebble whose HTTP-01 goes to its port 80."""
    workdir.mkdir(parents=True, exist_ok=True)
    edge = Edge(workdir, base_config(ca, workdir, backend, store or str(workdir / "store")),
                start=False)
    try:
        with Pebble(http_port=edge.http_port, dns_port=dns.port,
                    validity_seconds=validity, **pebble_options) as pebble:
            edge.config["acme"] = acme_section(pebble, dns)
            edge.write_config()
            edge.start()
            files = workdir / "uploads"
            files.mkdir(exist_ok=True)
            yield Node(edge, pebble, write_root(pebble, workdir / "pebble-root.pem"), dns, ca,
                       files)
    finally:
        edge.__exit__(None, None, None)


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory, dns: DNSServer, ca: CA,
         backend_mod: Backend) -> Iterator[Node]:
    with acme_node(tmp_path_factory.mktemp("node"), dns, ca, backend_mod) as n:
        yield n


def issued_acme(node: Node, name: str, timeout: float = 15.0) -> str:
    """Wait until `name` is In use with a pebble certificate that verifies; its fingerprint."""
    fingerprint = wait_for(lambda: verified_fingerprint(node.edge, name, node.root), timeout,
                           f"a pebble certificate for {name}")
    view = wait_for(lambda: in_use(node.edge, name), 5, f"{name} In use")
    assert view["acme"]["fingerprint"] == fingerprint
    return str(fingerprint)


# --------------------------------------------------------------------------- 1. issuance


def test_domain_goes_pending_dns_then_creating_then_in_use(node: Node) -> None:
    name = "first.example.test"
    node.point(name, "192.0.2.99")  # somewhere else: not us yet
    ok(node.edge, "add", name, "--app", "my-app")
    view = wait_for(lambda: (v := show(node.edge, name))["message"] != "added" and v, 5,
                    "the first DNS check")
    assert view["status"] == "pending_dns" and view["status_label"] == "Pending DNS"
    assert "192.0.2.99" in view["message"] and "not to the edge" in view["message"]
    assert view["in_use"] == "platform" and view["acme"] is None
    # It stays there while DNS says so: re-checked every check_interval (1 s; each
    # check asks A and AAAA), and nothing is ordered.
    asked = f"{name}."
    wait_for(lambda: sum(q[1] == asked for q in list(node.dns.queries)) >= 6, 5,
             "three DNS checks")
    assert show(node.edge, name)["status"] == "pending_dns"
    assert node.pebble.order_count() == 0

    node.point(name)
    pointed = time.monotonic()
    fingerprint = issued_acme(node, name)
    took = time.monotonic() - pointed
    assert took < 6, f"issued {took:.1f} s after DNS pointed at us"

    # The served chain is pebble's (leaf first) and verifies for the name.
    chain = served_chain(node.edge, name)
    assert fp(chain[0]) == fingerprint
    pem = b"".join(x509.load_der_x509_certificate(d).public_bytes(serialization.Encoding.PEM)
                   for d in chain)
    verify_fullchain(pem, node.pebble.issuing_root(), name)
    view = show(node.edge, name)
    assert view["status_label"] == "In use" and view["last_error"] == ""
    assert view["expires_at"] == view["acme"]["not_after"]
    assert transitions(node.edge, name) == [("pending_dns", "creating"),
                                            ("creating", "issued")]


# --------------------------------------------------------------------------- 2. custom


def test_custom_certificate_upload_disable_and_expiry_fall_back_to_acme(node: Node) -> None:
    name = "custom.example.test"
    node.point(name)
    ok(node.edge, "add", name, "--app", "my-app")
    acme_fp = issued_acme(node, name)

    custom = node.ca.issue([name])
    cert, key = node.write(custom, "custom")
    ok(node.edge, "ssl", name, "--cert", cert, "--key", key)
    wait_for(lambda: node.edge.fingerprint(name) == custom.fingerprint, 1.5,
             "the custom certificate on the next handshakes")
    view = show(node.edge, name)
    assert (view["status_label"], view["in_use"]) == ("Not used", "custom")
    assert view["custom"]["fingerprint"] == custom.fingerprint
    assert view["acme"]["fingerprint"] == acme_fp  # kept for the fallback

    ok(node.edge, "ssl", name, "disable")
    wait_for(lambda: node.edge.fingerprint(name) == acme_fp, 1.5, "the ACME certificate back")
    view = show(node.edge, name)
    assert (view["status_label"], view["in_use"], view["custom"]) == ("In use", "letsencrypt",
                                                                      None)

    # A custom certificate that expires in a few seconds: served, then the ACME one,
    # with no action from anyone (the workers re-compose at the expiry time).
    not_after = float(int(time.time()) + 4)
    short = node.ca.issue([name], not_after=not_after)
    cert, key = node.write(short, "short")
    ok(node.edge, "ssl", name, "--cert", cert, "--key", key)
    wait_for(lambda: node.edge.fingerprint(name) == short.fingerprint, 1.5,
             "the short-lived custom certificate")
    assert show(node.edge, name)["status_label"] == "Not used"
    wait_for(lambda: node.edge.fingerprint(name) == acme_fp, not_after - time.time() + 3,
             "the ACME certificate after the custom one expired")
    assert time.time() >= not_after - 0.5  # not before it expired
    view = show(node.edge, name)
    assert (view["status_label"], view["in_use"]) == ("In use", "letsencrypt")
    assert view["custom"]["fingerprint"] == short.fingerprint  # still stored, not served
    assert node.pebble.order_count() >= 1


# --------------------------------------------------------------------------- 3. bad uploads


def _bad_uploads(node: Node, name: str) -> list[tuple[str, bytes, bytes, str]]:
    """(what, chain, key, expected part of the one-line error) for each bad upload."""
    ca = node.ca
    now = time.time()
    good = ca.issue([name])
    other = ca.issue([name])
    wrong_name = ca.issue(["elsewhere.example.test"])
    expired = ca.issue([name], not_before=now - 30 * DAY, not_after=now - DAY)
    future = ca.issue([name], not_before=now + DAY, not_after=now + 30 * DAY)
    ca_leaf = ca.issue([name], is_ca=True)
    rsa1024 = ca.issue([name], key_type="rsa-1024")
    p521 = ca.issue([name], key_type="ecdsa-p521")
    ed = ca.issue([name], key_type="ed25519")
    enc_key = new_key()
    encrypted = ca.issue([name], key=enc_key)
    unrelated = CA.new("unrelated CA")
    der = good.cert.public_bytes(serialization.Encoding.DER)
    huge = good.chain_pem + b"# padding\n" * 110_000
    return [
        ("wrong key", good.chain_pem, other.key_pem, "private key does not match"),
        ("not covering", wrong_name.chain_pem, wrong_name.key_pem,
         f"certificate does not cover {name}"),
        ("expired", expired.chain_pem, expired.key_pem, "certificate expired on"),
        ("not yet valid", future.chain_pem, future.key_pem, "is not valid before"),
        ("CA:TRUE leaf", ca_leaf.chain_pem, ca_leaf.key_pem, "is a CA certificate (CA:TRUE)"),
        ("RSA 1024", rsa1024.chain_pem, rsa1024.key_pem, "RSA key of 1024 bits is too small"),
        ("P-521", p521.chain_pem, p521.key_pem, "ECDSA curve secp521r1 is not supported"),
        ("Ed25519", ed.chain_pem, ed.key_pem, "Ed25519 keys are not supported"),
        ("PKCS8 passphrase", encrypted.chain_pem, key_pem(enc_key, password=b"secret"),
         "passphrase-protected keys are not supported"),
        ("traditional passphrase", encrypted.chain_pem,
         key_pem(enc_key, "traditional", password=b"secret"),
         "passphrase-protected keys are not supported"),
        ("over 1 MiB", huge, good.key_pem, "larger than 1 MiB"),
        ("DER", der, good.key_pem, "DER-encoded; upload PEM"),
        ("unrelated cert in chain", good.chain_pem + unrelated.cert_pem, good.key_pem,
         "certificate chain is not one path"),
    ]


def test_bad_uploads_are_rejected_with_one_line_and_change_nothing(node: Node) -> None:
    name = "uploads.example.test"  # no DNS record: stays Pending DNS, custom serves
    first = node.ca.issue([name])
    cert, key = node.write(first, "first")
    ok(node.edge, "add", name, "--app", "my-app", "--cert", cert, "--key", key)
    wait_for(lambda: node.edge.fingerprint(name) == first.fingerprint, 1.5,
             "the certificate uploaded with `domains add`")

    def state() -> tuple[Any, ...]:
        v = show(node.edge, name)
        return v["custom"], v["acme"], v["in_use"], v["expires_at"], v["status"]

    before = state()
    for i, (what, chain, key_bytes, expected) in enumerate(_bad_uploads(node, name)):
        cert_path, key_path = node.files / f"bad{i}.crt", node.files / f"bad{i}.key"
        cert_path.write_bytes(chain)
        key_path.write_bytes(key_bytes)
        done = cli(node.edge, "ssl", name, "--cert", str(cert_path), "--key", str(key_path))
        assert done.returncode == 1, f"{what}: exit {done.returncode}: {done.stderr}"
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and expected in lines[0], f"{what}: {done.stderr!r}"
        assert done.stdout == "", what
        assert "PRIVATE KEY" not in done.stderr
    time.sleep(0.3)  # a wrongly accepted upload would have reached the worker by now
    assert state() == before
    assert node.edge.fingerprint(name) == first.fingerprint

    # A misordered chain (intermediate first) with a duplicate is accepted and served
    # leaf first.
    chained = node.ca.issue([name], intermediate=True)
    leaf_pem, inter_pem = chained.leaf_pem, node.ca.intermediate().cert_pem
    cert, key = node.write(
        Issued(inter_pem + b"\r\n" + leaf_pem + inter_pem, chained.key_pem,
               chained.fingerprint, chained.cert), "misordered")
    ok(node.edge, "ssl", name, "--cert", cert, "--key", key)
    wait_for(lambda: node.edge.fingerprint(name) == chained.fingerprint, 1.5,
             "the reordered chain")
    inter_der = node.ca.intermediate().cert.public_bytes(serialization.Encoding.DER)
    assert [fp(d) for d in served_chain(node.edge, name)] == [chained.fingerprint,
                                                              fp(inter_der)]
    assert show(node.edge, name)["custom"]["fingerprint"] == chained.fingerprint


# --------------------------------------------------------------------------- 4. renewal


def test_renewal_at_one_third_remaining_keeps_connections(
        tmp_path: Path, dns: DNSServer, ca: CA, backend_mod: Backend) -> None:
    with acme_node(tmp_path, dns, ca, backend_mod, validity=15) as node:
        name = "renew.example.test"
        node.point(name)
        ok(node.edge, "add", name, "--app", "my-app")
        first = issued_acme(node, name)
        view = show(node.edge, name)
        not_before, not_after = view["acme"]["not_before"], view["acme"]["not_after"]
        lifetime = not_after - not_before
        assert 10 <= lifetime <= 16, lifetime
        due = not_after - lifetime / 3

        conn = node.edge.tls_connect(name, cafile=str(node.root), timeout=10)
        try:
            reader = conn.makefile("rb")
            send_request(conn, name, "/before-renewal")
            assert read_response(reader)[0] == 200
            second = wait_for(
                lambda: (f := verified_fingerprint(node.edge, name, node.root)) != first and f,
                not_after - time.time() + 2, "a renewed certificate", interval=0.1)
            renewed_at = time.time()
            assert renewed_at >= due - 1.5, f"renewed {due - renewed_at:.1f} s early"
            assert renewed_at < not_after, "renewed only after the old one expired"
            send_request(conn, name, "/after-renewal")  # opened before, still serving
            assert read_response(reader)[0] == 200
        finally:
            conn.close()
        assert node.pebble.order_count() == 2
        view = wait_for(lambda: (v := show(node.edge, name))["acme"]["fingerprint"] == second
                        and v, 3, "the renewal recorded")
        assert view["status_label"] == "In use" and view["last_error"] == ""
        assert transitions(node.edge, name)[-2:] == [("issued", "creating"),
                                                     ("creating", "issued")]


# --------------------------------------------------------------------------- 5. restart


def test_restart_keeps_certificates_and_account_and_reorders_nothing(
        tmp_path: Path, dns: DNSServer, ca: CA, backend_mod: Backend) -> None:
    with acme_node(tmp_path, dns, ca, backend_mod) as node:
        edge, names = node.edge, ["keep-a.example.test", "keep-b.example.test"]
        for name in names:
            node.point(name)
            ok(edge, "add", name, "--app", "my-app")
        custom = ca.issue(["keep-custom.example.test"])
        cert, key = node.write(custom, "keep-custom")
        ok(edge, "add", "keep-custom.example.test", "--app", "my-app", "--no-letsencrypt",
           "--cert", cert, "--key", key)
        before = {name: issued_acme(node, name) for name in names}
        store = edge.config["store"]["path"]
        account = read_store(store, rec.ACME_ACCOUNT)
        assert account is not None
        orders = node.pebble.order_count()
        assert orders == 2

        assert edge.stop() == 0
        edge.start()
        for name, fingerprint in before.items():
            assert edge.fingerprint(name) == fingerprint
        assert edge.fingerprint("keep-custom.example.test") == custom.fingerprint
        # A few lifecycle passes (1 s apart) after the restart: nothing is ordered.
        time.sleep(3)
        assert node.pebble.order_count() == orders
        assert read_store(store, rec.ACME_ACCOUNT) == account
        for name in names:
            assert show(edge, name)["status_label"] == "In use"

        # A new domain is ordered with the stored account (no second registration).
        node.point("keep-c.example.test")
        ok(edge, "add", "keep-c.example.test", "--app", "my-app")
        issued_acme(node, "keep-c.example.test")
        assert read_store(store, rec.ACME_ACCOUNT) == account
        assert "registered ACME account" not in edge.log().split("serving https on")[-1]
        assert node.pebble.order_count() == orders + 1


# --------------------------------------------------------------------------- 6. two nodes


def test_two_lifecycles_on_one_store_order_each_domain_once(
        tmp_path: Path, dns: DNSServer, ca: CA, backend_mod: Backend) -> None:
    store = str(tmp_path / "shared-store")
    # Validations that take 0-1 s (pebble sleeps a random whole number of seconds below
    # PEBBLE_VA_SLEEPTIME): the other node's 1 s pass then sees most orders in flight,
    # so a missing lock would show as extra orders, not hide behind a fast CA.
    with acme_node(tmp_path / "a", dns, ca, backend_mod, store=store, va_nosleep=False,
                   env={"PEBBLE_VA_SLEEPTIME": "2"}) as node:
        b_dir = tmp_path / "b"
        b_dir.mkdir()
        b_config = base_config(ca, b_dir, backend_mod, store)
        b_config["acme"] = acme_section(node.pebble, dns)
        with Edge(b_dir, b_config) as second:
            names = [f"pair{i}.example.test" for i in range(5)]
            for i, name in enumerate(names):
                node.point(name)
                ok(node.edge if i % 2 else second, "add", name, "--app", "my-app")
            fingerprints = {name: issued_acme(node, name, timeout=25) for name in names}
            time.sleep(2.5)  # both lifecycles run a few more passes
            assert node.pebble.order_count() == 5
            for name in names:
                assert second.fingerprint(name) == fingerprints[name]
                assert show(second, name)["status_label"] == "In use"
