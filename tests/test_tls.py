"""The TLS profile: base/server contexts, and openssl.cnf restricting key-exchange groups."""

from __future__ import annotations

import os
import shutil
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
import socket, sys
from proxy.certs.tls import TlsSettings, server_context
ctx = server_context(open(sys.argv[1], 'rb').read(), open(sys.argv[2], 'rb').read(),
                     TlsSettings())
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
def _server(issued: Issued, tmp: Path, conf: str | None) -> Iterator[int]:
    cert, key = issued.write(tmp, "srv")
    env = {k: v for k, v in os.environ.items() if k != "OPENSSL_CONF"}
    env["PYTHONPATH"] = str(ROOT)
    if conf:
        env["OPENSSL_CONF"] = conf
    proc = subprocess.Popen([sys.executable, "-c", SERVER, cert, key], env=env,
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


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI")
def test_openssl_conf_restricts_key_exchange_groups(issued: Issued, tmp_path: Path) -> None:
    with _server(issued, tmp_path, None) as port:
        assert _s_client(port, "X448"), "without the conf X448 should be accepted"
    with _server(issued, tmp_path, openssl_conf_path()) as port:
        assert not _s_client(port, "X448")
        assert _s_client(port, "X25519")
        assert _s_client(port, "P-256")
