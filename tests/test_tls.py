"""The TLS policy: base/server contexts with the configured versions, ciphers and
key-exchange groups, and openssl.cnf restricting the groups of every other context."""

from __future__ import annotations

import os
import ssl
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import pytest

from proxy.certs.tls import (
    TLS12_CIPHERS,
    TlsSettings,
    base_context,
    openssl_conf_path,
    server_context,
)
from proxy.errors import BundleError
from tests.certgen import CA, Issued

ROOT = Path(__file__).resolve().parent.parent

SERVER = """
import socket, ssl, sys
from proxy.certs.tls import TlsSettings, server_context
cert, key, groups = sys.argv[1:4]
if groups == 'plain':  # a context of no policy of ours: OpenSSL's defaults and config
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
else:
    ctx = server_context(open(cert, 'rb').read(), open(key, 'rb').read(),
                         TlsSettings(groups=tuple(groups.split(':'))))
listener = socket.create_server(('127.0.0.1', 0))
print(listener.getsockname()[1], flush=True)
while True:
    conn, _ = listener.accept()
    try:
        with ctx.wrap_socket(conn, server_side=True) as tls:
            tls.sendall(b'ok')
    except OSError:
        conn.close()
"""


@pytest.fixture(scope="module")
def issued() -> Issued:
    return CA.new("tls test CA").issue(["tls.example.com"])


def test_base_context_follows_the_intermediate_profile() -> None:
    ctx = base_context(TlsSettings(num_tickets=0, alpn=("h2", "http/1.1")))
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    assert not ctx.options & ssl.OP_CIPHER_SERVER_PREFERENCE
    assert ctx.options & ssl.OP_NO_COMPRESSION and ctx.options & ssl.OP_NO_RENEGOTIATION
    assert ctx.num_tickets == 0
    tls12 = {c["name"] for c in ctx.get_ciphers() if c["protocol"] == "TLSv1.2"}
    assert tls12 == set(TLS12_CIPHERS.split(":"))


def test_server_context_loads_from_memory_and_serves_with_alpn(issued: Issued) -> None:
    ctx = server_context(issued.chain_pem, issued.key_pem, TlsSettings())
    fds_before = len(os.listdir("/proc/self/fd"))
    server_context(issued.chain_pem, issued.key_pem, TlsSettings())
    assert len(os.listdir("/proc/self/fd")) == fds_before  # the memfd is closed
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.check_hostname = False
    client.verify_mode = ssl.CERT_NONE
    client.set_alpn_protocols(["http/1.1"])
    cin, cout, sin, sout = (ssl.MemoryBIO() for _ in range(4))
    c = client.wrap_bio(cin, cout, server_hostname="tls.example.com")
    s = ctx.wrap_bio(sin, sout, server_side=True)
    for _ in range(10):
        for obj in (c, s):
            with suppress(ssl.SSLWantReadError):
                obj.do_handshake()
        sin.write(cout.read())
        cin.write(sout.read())
    assert c.selected_alpn_protocol() == "http/1.1"
    assert c.cipher() is not None


def test_server_context_refusal_is_a_bundle_error_without_key_material(issued: Issued) -> None:
    other = CA.new("other").issue(["tls.example.com"])
    with pytest.raises(BundleError) as info:
        server_context(issued.chain_pem, other.key_pem, TlsSettings())
    assert "PRIVATE" not in str(info.value)


@contextmanager
def _server(issued: Issued, tmp: Path, conf: str | None,
            groups: str = "plain") -> Iterator[int]:
    cert, key = issued.write(tmp, "srv")
    env = {k: v for k, v in os.environ.items() if k != "OPENSSL_CONF"}
    env["PYTHONPATH"] = str(ROOT)
    if conf:
        env["OPENSSL_CONF"] = conf
    proc = subprocess.Popen([sys.executable, "-c", SERVER, cert, key, groups], env=env,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        yield int(proc.stdout.readline())
    finally:
        proc.kill()
        proc.wait(5)


def _s_client(port: int, group: str) -> bool:
    env = {k: v for k, v in os.environ.items() if k != "OPENSSL_CONF"}
    done = subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{port}",
                           "-servername", "tls.example.com", "-groups", group],
                          input=b"", capture_output=True, env=env, timeout=10)
    # The exit code races with the server closing without close_notify: judge the
    # handshake by what s_client printed about it.
    return b"Server public key" in done.stdout and b"Cipher is (NONE)" not in done.stdout


def test_openssl_conf_restricts_the_groups_of_contexts_without_our_policy(
        issued: Issued, tmp_path: Path) -> None:
    with _server(issued, tmp_path, None) as port:
        assert _s_client(port, "X448"), "without the conf X448 should be accepted"
    with _server(issued, tmp_path, openssl_conf_path()) as port:
        assert not _s_client(port, "X448")
        assert _s_client(port, "X25519")
        assert _s_client(port, "P-256")


def test_server_context_offers_exactly_its_configured_groups_whatever_the_conf(
        issued: Issued, tmp_path: Path) -> None:
    """tls.groups reach OpenSSL per context (Python 3.11 has no API for it): without
    OPENSSL_CONF the defaults still hold, and a configured list replaces them."""
    with _server(issued, tmp_path, None, "X25519:P-256:P-384") as port:
        assert not _s_client(port, "X448")
        assert _s_client(port, "X25519") and _s_client(port, "P-384")
    with _server(issued, tmp_path, openssl_conf_path(), "X448:P-521") as port:
        assert _s_client(port, "X448") and _s_client(port, "P-521")
        assert not _s_client(port, "X25519")
        assert not _s_client(port, "P-256")


def test_unknown_group_is_refused_by_openssl_with_a_clear_error() -> None:
    with pytest.raises(ValueError, match="OpenSSL refused the key-exchange groups X999"):
        base_context(TlsSettings(groups=("X999",)))


def test_versions_and_ciphers_come_from_the_settings() -> None:
    ctx = base_context(TlsSettings(min_version=ssl.TLSVersion.TLSv1_3,
                                   max_version=ssl.TLSVersion.TLSv1_3,
                                   ciphers="ECDHE-RSA-AES256-GCM-SHA384"))
    assert ctx.minimum_version == ctx.maximum_version == ssl.TLSVersion.TLSv1_3
    tls12 = {c["name"] for c in ctx.get_ciphers() if c["protocol"] == "TLSv1.2"}
    assert tls12 == {"ECDHE-RSA-AES256-GCM-SHA384"}
