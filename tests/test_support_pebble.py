"""Smoke tests: the DNS server, Pebble and the HTTP-01 responder work with the real `acme` client.

Timings are printed (run with `-s` to see them); nothing here asserts on speed.
"""

from __future__ import annotations

import asyncio
import datetime
import itertools
import logging
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import dns.asyncresolver
import dns.resolver
import pytest
import requests
from acme import challenges, messages
from acme.client import ClientNetwork, ClientV2
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from josepy import jwa, jwk

from tests.support.dnsserver import DNSServer
from tests.support.http01 import HTTP01Responder
from tests.support.pebble import Pebble, verify_fullchain

POLL = 0.02  # seconds between our own polls of an order


# --------------------------------------------------------------------------- fixtures


@pytest.fixture
def dns_server() -> Iterator[DNSServer]:
    with DNSServer() as server:
        yield server


@pytest.fixture
def http01() -> Iterator[HTTP01Responder]:
    with HTTP01Responder() as responder:
        yield responder


@pytest.fixture
def pebble(dns_server: DNSServer, http01: HTTP01Responder) -> Iterator[Pebble]:
    # Default PEBBLE_WFE_NONCEREJECT (5 %) and PEBBLE_AUTHZREUSE (50 %) on purpose.
    with Pebble(http_port=http01.port, dns_port=dns_server.port) as ca:
        yield ca


# --------------------------------------------------------------------------- ACME helpers


class PatientNetwork(ClientNetwork):
    """ClientNetwork that survives repeated badNonce answers.

    acme 5.x retries a badNonce once; with pebble's default 5 % rejection two in a row
    happen for about 1 POST in 400, i.e. now and then in a suite. A badNonce request was
    not processed (RFC 8555 6.5), so sending it again is safe.
    """

    ATTEMPTS = 4  # each one is acme's own try + retry
    extra_retries = 0

    def post(self, *args: Any, **kwargs: Any) -> requests.Response:
        for _ in range(self.ATTEMPTS - 1):
            try:
                return super().post(*args, **kwargs)
            except messages.Error as error:
                if error.code != "badNonce":
                    raise
                self.extra_retries += 1
        return super().post(*args, **kwargs)


@dataclass
class Account:
    """An ACME client bound to one registered account."""

    client: ClientV2
    key: jwk.JWKEC


@dataclass
class Issued:
    """One finished order and how long its phases took."""

    fullchain_pem: bytes
    timings: dict[str, float] = field(default_factory=dict)
    reused_authz: int = 0


def register(ca: Pebble) -> Account:
    """A fresh ES256 account on `ca`."""
    key = jwk.JWKEC(key=ec.generate_private_key(ec.SECP256R1()))
    ca_path: Any = str(ca.ca_bundle_path)  # acme types verify_ssl as bool; requests takes a path
    net = PatientNetwork(key, alg=jwa.ES256, verify_ssl=ca_path,
                        user_agent="tlsedge-tests")
    client = ClientV2(ClientV2.get_directory(ca.directory_url, net), net)
    client.net.account = client.new_account(
        messages.NewRegistration.from_data(
            email="ops@example.test", terms_of_service_agreed=True
        )
    )
    return Account(client, key)


def csr_for(name: str) -> bytes:
    """PEM CSR for `name` with a new ECDSA P-256 key."""
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM)


def post_as_get(client: ClientV2, url: str) -> messages.Order:
    """POST-as-GET an order URL (ClientV2 keeps its own helper private)."""
    response = client.net.post(url, None, new_nonce_url=client.directory["newNonce"])
    order: messages.Order = messages.Order.from_json(response.json())
    return order


def issue(account: Account, http01: HTTP01Responder, name: str, *, fast: bool) -> Issued:
    """Run one HTTP-01 order for `name`; `fast` polls ourselves instead of poll_and_finalize."""
    client = account.client
    marks = [("start", time.perf_counter())]
    order = client.new_order(csr_for(name))
    marks.append(("new_order", time.perf_counter()))
    reused = 0
    for authz in order.authorizations:
        if authz.body.status == messages.STATUS_VALID:
            reused += 1
            continue
        challb = next(c for c in authz.body.challenges if isinstance(c.chall, challenges.HTTP01))
        response, validation = challb.response_and_validation(account.key)
        http01.set(challb.chall.encode("token"), validation)
        client.answer_challenge(challb, response)
    marks.append(("answer", time.perf_counter()))
    deadline = datetime.datetime.now() + datetime.timedelta(seconds=30)
    if not fast:
        done = client.poll_and_finalize(order, deadline)
        marks.append(("poll_and_finalize", time.perf_counter()))
        fullchain = done.fullchain_pem.encode()
    else:
        body = post_as_get(client, order.uri)
        while body.status not in (messages.STATUS_READY, messages.STATUS_VALID):
            assert body.status != messages.STATUS_INVALID, body.error
            assert datetime.datetime.now() < deadline, "order never became ready"
            time.sleep(POLL)
            body = post_as_get(client, order.uri)
        marks.append(("ready", time.perf_counter()))
        if body.status == messages.STATUS_READY:
            body = client.begin_finalization(order).body
        while body.status != messages.STATUS_VALID or body.certificate is None:
            assert body.status != messages.STATUS_INVALID, body.error
            assert datetime.datetime.now() < deadline, "order never became valid"
            time.sleep(POLL)
            body = post_as_get(client, order.uri)
        marks.append(("finalized", time.perf_counter()))
        fullchain = client.net.post(
            body.certificate, None, new_nonce_url=client.directory["newNonce"]
        ).content
        marks.append(("download", time.perf_counter()))
    timings = {b[0]: b[1] - a[1] for a, b in itertools.pairwise(marks)}
    timings["total"] = marks[-1][1] - marks[0][1]
    return Issued(fullchain, timings, reused)


# --------------------------------------------------------------------------- tests


def test_dns_server_answers_a_cname_and_nxdomain(dns_server: DNSServer) -> None:
    dns_server.set_a("app.example.test", ["127.0.0.1"])
    dns_server.set_cname("www.example.test", "app.example.test.")
    dns_server.set_txt("_acme-challenge.app.example.test", ["token-1", "token-2"])

    async def lookups() -> None:
        resolver = dns.asyncresolver.Resolver(configure=False)
        resolver.nameservers = ["127.0.0.1"]
        resolver.port = dns_server.port
        resolver.lifetime = 2.0
        resolver.cache = None

        answer = await resolver.resolve("app.example.test", "A")
        assert [r.to_text() for r in answer] == ["127.0.0.1"]
        answer = await resolver.resolve("www.example.test", "A")
        assert [r.to_text() for r in answer] == ["127.0.0.1"]
        assert answer.canonical_name.to_text() == "app.example.test."
        cname = await resolver.resolve("www.example.test", "CNAME")
        assert [r.to_text() for r in cname] == ["app.example.test."]
        txt = await resolver.resolve("_acme-challenge.app.example.test", "TXT")
        assert sorted(b"".join(r.strings).decode() for r in txt) == ["token-1", "token-2"]
        # the same over TCP
        answer = await resolver.resolve("app.example.test", "A", tcp=True)
        assert [r.to_text() for r in answer] == ["127.0.0.1"]
        with pytest.raises(dns.resolver.NoAnswer):
            await resolver.resolve("app.example.test", "AAAA")
        with pytest.raises(dns.resolver.NXDOMAIN):
            await resolver.resolve("unknown.example.test", "A")

        dns_server.remove("app.example.test")
        with pytest.raises(dns.resolver.NXDOMAIN):
            await resolver.resolve("app.example.test", "A")
        # the CNAME is still there, but its target is gone
        with pytest.raises(dns.resolver.NXDOMAIN):
            await resolver.resolve("www.example.test", "A")

        dns_server.set_a("app.example.test", ["127.0.0.2"])
        answer = await resolver.resolve("www.example.test", "A")
        assert [r.to_text() for r in answer] == ["127.0.0.2"]

    asyncio.run(lookups())
    assert ("tcp", "app.example.test.", "A") in dns_server.queries


def test_full_acme_order_against_pebble(
    pebble: Pebble,
    dns_server: DNSServer,
    http01: HTTP01Responder,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="acme.client")
    root_pem, intermediate_pem = pebble.issuing_roots()
    account = register(pebble)

    results: dict[str, list[Issued]] = {"poll_and_finalize": [], "own polling": []}
    # poll_and_finalize sleeps ~2 s per order, so it runs once; our own polling three times.
    plan = [("poll_and_finalize", False)] + [("own polling", True)] * 3
    for round_no, (label, fast) in enumerate(plan):
        name = f"{label[:3]}-{round_no}-{uuid.uuid4().hex[:8]}.example.test"
        dns_server.set_a(name, ["127.0.0.1"])
        issued = issue(account, http01, name, fast=fast)
        results[label].append(issued)

        chain = verify_fullchain(issued.fullchain_pem, root_pem, dns_name=name)
        leaf, intermediate = chain
        assert intermediate.public_bytes(serialization.Encoding.PEM) == intermediate_pem
        leaf.verify_directly_issued_by(intermediate)
        intermediate.verify_directly_issued_by(x509.load_pem_x509_certificate(root_pem))
        assert isinstance(leaf.public_key(), ec.EllipticCurvePublicKey)
        assert pebble.cert_status(leaf.serial_number)["Status"] == "Valid"
        # pebble resolved the name with our DNS server and fetched the token from us
        assert ("udp", name + ".", "A") in dns_server.queries
        assert any(host.split(":")[0] == name and status == 200
                   for host, _, status in http01.requests) or issued.reused_authz

    # A new order for a name this account already validated may reuse the authorization.
    reused = issue(account, http01, name, fast=True)
    verify_fullchain(reused.fullchain_pem, root_pem, dns_name=name)

    retries = sum("Retrying request after error" in r.getMessage() for r in caplog.records)
    assert pebble.order_count() == 5
    assert len(pebble.issued()) == 5
    for label, runs in results.items():
        totals = ", ".join(f"{r.timings['total']:.3f}" for r in runs)
        phases = {k: round(v, 3) for k, v in runs[-1].timings.items()}
        print(f"\n{label}: totals [{totals}] s; last run phases {phases}")
    assert isinstance(account.client.net, PatientNetwork)
    print(f"badNonce retries by acme.client: {retries}, "
          f"extra ones by PatientNetwork: {account.client.net.extra_retries}; "
          f"re-order of {name} reused {reused.reused_authz} authz")


def test_pebble_restart_changes_issuing_hierarchy_and_forgets_state(pebble: Pebble) -> None:
    before = pebble.issuing_roots()
    pebble.stop()
    assert not pebble.running
    with pytest.raises(OSError):
        ClientV2.get_directory(
            pebble.directory_url,
            ClientNetwork(None, verify_ssl=True),
        )
    started = time.perf_counter()
    pebble.start()
    print(f"\npebble restart took {time.perf_counter() - started:.3f} s")
    after = pebble.issuing_roots()
    assert after[0] != before[0] and after[1] != before[1]
    assert pebble.order_count() == 0
    assert "Starting Pebble ACME server" in pebble.log_text(current_run=True)
