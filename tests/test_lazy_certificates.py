"""A worker over its resident limit (store.resident_certificates) reads no certificate
at start, reads a domain's records on its name's first handshake (the listener reads
the ClientHello's SNI before the handshake), keeps the most recently used ones, and
still serves every change. Real `tlsedge run`, real file store, Python ssl and
`openssl s_client`; the ClientHello parser is fed real ClientHellos from Python ssl.
"""

from __future__ import annotations

import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from proxy.certs.bundle import load_bundle
from proxy.certs.clienthello import MORE, NOT_HELLO, server_name
from tests.certgen import CA
from tests.support.admin import edge_settings, in_store
from tests.support.backend import Backend
from tests.support.edge import Edge, read_response, send_request

NAMES = [f"shop{i}.example" for i in range(5)]


def client_hello(name: str | None, *, version: ssl.TLSVersion = ssl.TLSVersion.TLSv1_3
                 ) -> bytes:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.maximum_version = version
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname=name)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


def records(hello: bytes, size: int) -> bytes:
    """The same handshake message re-cut into records of `size` bytes of payload."""
    body = hello[5:]
    out = b""
    for at in range(0, len(body), size):
        part = body[at:at + size]
        out += hello[:3] + len(part).to_bytes(2, "big") + part
    return out


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2])
def test_server_name_is_read_from_real_client_hellos(version: ssl.TLSVersion) -> None:
    hello = client_hello("Shop.Example", version=version)
    assert server_name(hello) == "shop.example"
    assert server_name(client_hello(None, version=version)) is None
    # One byte short at every length is "more", never a wrong answer.
    for cut in range(len(hello)):
        assert server_name(hello[:cut]) == MORE
    # A ClientHello cut over several records (allowed, rare) reads the same.
    assert server_name(records(hello, 100)) == "shop.example"
    assert server_name(records(hello, 7)[:-1]) == MORE


def test_what_is_not_a_client_hello_is_left_to_openssl() -> None:
    assert server_name(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n") == NOT_HELLO
    hello = bytearray(client_hello("shop.example"))
    hello[5] = 2  # a ServerHello where the ClientHello should be
    assert server_name(hello) == NOT_HELLO
    assert server_name(bytes([22, 3, 1, 0x40, 0x01])) == NOT_HELLO  # record over 2^14
    oversized = bytes([22, 3, 1, 0, 4, 1, 0x01, 0x00, 0x00])  # a 64 kB ClientHello
    assert server_name(oversized) == NOT_HELLO
    name = client_hello("shop.example")
    at = name.index(b"shop.example")
    bad = name[:at] + "shöp.exampl".encode() + name[at + 12:]  # 12 bytes, not ASCII
    assert server_name(bad) == NOT_HELLO


@pytest.fixture
def lazy(tmp_path: Path, ca: CA, backend: Backend) -> Iterator[tuple[Edge, dict[str, Any]]]:
    settings = edge_settings(tmp_path, ca, backend)
    settings["store"]["resident_certificates"] = 2
    edge = Edge(tmp_path, settings, start=False)
    issued = {name: ca.issue([name]) for name in NAMES}

    async def fill(registry: Any) -> None:
        for name in [*NAMES, "nocert.example"]:
            await registry.add_domain(name, "my-app")
        for name, cert in issued.items():
            await registry.store_acme_certificate(
                name, load_bundle(cert.chain_pem, cert.key_pem, domain=name))

    in_store(edge, fill)
    edge.start()
    try:
        yield edge, issued
    finally:
        edge.stop()


def settle(edge: Edge, name: str, value: float, **labels: str) -> None:
    deadline = time.monotonic() + 5
    while edge.metric(name, **labels) != value:
        assert time.monotonic() < deadline, (name, labels, edge.metric(name, **labels))
        time.sleep(0.2)


def test_over_the_limit_certificates_are_read_on_first_use_and_the_least_used_dropped(
        lazy: tuple[Edge, dict[str, Any]], ca: CA) -> None:
    edge, issued = lazy
    # Started without reading a single certificate record.
    settle(edge, "tlsedge_store_certificates_resident", 0)
    assert edge.metric("tlsedge_store_certificate_loads_total") == 0

    for name in NAMES:
        assert edge.fingerprint(name) == issued[name].fingerprint
    assert edge.openssl_fingerprint(NAMES[0]) == issued[NAMES[0]].fingerprint
    platform = edge.fingerprint(f"my-app.{edge.config['platform_domain']}")
    assert edge.fingerprint("nocert.example") == platform  # no certificate: the default
    status, _, body = edge.request(NAMES[1], "/hello")
    assert status == 200 and body
    settle(edge, "tlsedge_store_certificate_loads_total", 6, result="ok")

    # Past the limit, the least recently used are dropped once the hold has passed
    # (the next load trims), and read again when asked for.
    time.sleep(1.2)
    assert edge.fingerprint(NAMES[4]) == issued[NAMES[4]].fingerprint  # resident: no read
    assert edge.fingerprint(NAMES[0]) == issued[NAMES[0]].fingerprint  # dropped: read again
    settle(edge, "tlsedge_store_certificates_resident", 2)
    settle(edge, "tlsedge_store_certificate_loads_total", 7, result="ok")

    # A change reaches a resident domain through the watch, an unloaded one on its
    # next handshake.
    renewed = {name: ca.issue([name]) for name in (NAMES[0], NAMES[2])}

    async def renew(registry: Any) -> None:
        for name, cert in renewed.items():
            await registry.store_acme_certificate(
                name, load_bundle(cert.chain_pem, cert.key_pem, domain=name))

    in_store(edge, renew)
    for name, cert in renewed.items():
        deadline = time.monotonic() + 2
        while edge.fingerprint(name) != cert.fingerprint:
            assert time.monotonic() < deadline, f"{name} still has its old certificate"
            time.sleep(0.05)
    # The resident one was not read again: the watch event carried it.
    settle(edge, "tlsedge_store_certificate_loads_total", 8, result="ok")


def test_a_client_hello_sent_a_few_bytes_at_a_time_is_served(
        lazy: tuple[Edge, dict[str, Any]]) -> None:
    edge, issued = lazy
    name = NAMES[3]
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname=name)
    with socket.create_connection(("127.0.0.1", edge.https_port), timeout=5) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with pytest.raises(ssl.SSLWantReadError):
            obj.do_handshake()
        hello = outgoing.read()
        for at in range(0, len(hello), 40):
            sock.sendall(hello[at:at + 40])
            time.sleep(0.01)
        while True:
            try:
                obj.do_handshake()
                break
            except ssl.SSLWantReadError:
                sock.sendall(outgoing.read())
                data = sock.recv(65536)
                assert data, "the edge closed the connection during the handshake"
                incoming.write(data)
        sock.sendall(outgoing.read())
        der = obj.getpeercert(binary_form=True)
        assert der is not None
        import hashlib

        assert hashlib.sha256(der).hexdigest() == issued[name].fingerprint


def test_a_connection_that_sends_no_hello_is_closed_at_the_handshake_timeout(
        tmp_path: Path, ca: CA, backend: Backend) -> None:
    settings = edge_settings(tmp_path, ca, backend)
    settings["tls"]["handshake_timeout"] = 1.0
    with Edge(tmp_path, settings) as edge:
        with socket.create_connection(("127.0.0.1", edge.https_port), timeout=5) as sock:
            started = time.monotonic()
            sock.sendall(b"\x16\x03\x01")  # the start of a record, then nothing
            assert sock.recv(1) == b""
            assert 0.9 < time.monotonic() - started < 3
        settle(edge, "tlsedge_limits_hit_total", 1, limit="handshake_timeout")
        # The listener still serves.
        sock2 = socket.create_connection(("127.0.0.1", edge.https_port), timeout=5)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        with ctx.wrap_socket(sock2, server_hostname="my-app." + settings["platform_domain"]) as s:
            send_request(s, "my-app." + settings["platform_domain"], "/")
            assert read_response(s)[0] == 200


def test_within_the_limit_every_certificate_is_read_after_the_listeners_serve(
        tmp_path: Path, ca: CA, backend: Backend) -> None:
    """Start-up waits for names and routes only; the worker then takes every
    certificate from the supervisor's snapshot in the background (no first-use read
    needed afterwards, none of its own from the store)."""
    settings = edge_settings(tmp_path, ca, backend)
    edge = Edge(tmp_path, settings, start=False)
    issued = {name: ca.issue([name]) for name in NAMES}

    async def fill(registry: Any) -> None:
        for name, cert in issued.items():
            await registry.add_domain(name, "my-app")
            await registry.store_acme_certificate(
                name, load_bundle(cert.chain_pem, cert.key_pem, domain=name))

    in_store(edge, fill)
    edge.start()
    with edge:
        settle(edge, "tlsedge_store_certificates_resident", len(NAMES))
        for name in NAMES:
            assert edge.fingerprint(name) == issued[name].fingerprint
        assert edge.metric("tlsedge_store_certificate_loads_total") == 0
        assert "5 certificates from the supervisor's snapshot" in edge.log()
