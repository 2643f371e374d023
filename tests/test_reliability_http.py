"""HTTP session reliability on the real `tlsedge run` (issue #10): a certificate change
is invisible to connections opened before it (421 only for names their own
certificate does not cover), SIGTERM waits for requests in flight and not for idle
clients to close their side, and an idle WebSocket tunnel is closed at
`limits.tunnel_idle_timeout` while a busy one stays open.
"""

from __future__ import annotations

import hashlib
import json
import os
import select
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import pytest

from proxy.names import NameSet, covers
from tests.certgen import CA, Issued
from tests.conftest import PLATFORM
from tests.support.backend import Backend, ws_frame, ws_read
from tests.support.dnsserver import DNSServer
from tests.support.edge import Edge, read_response, send_request
from tests.test_lifecycle_e2e import acme_node, issued_acme, show

pytestmark = pytest.mark.timeout(180)

APP = f"my-app.{PLATFORM}"
SHOP = "www.shop.test"
CUSTOM = "custom.example.test"
ROOT = Path(__file__).resolve().parent.parent


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


def replace_file(path: str, data: bytes) -> None:
    """Write like ops tools do: a new file renamed over the old one."""
    tmp = Path(path + ".new")
    tmp.write_bytes(data)
    tmp.replace(path)


def domains(edge: Edge, *args: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "proxy.cli", "domains", *args, "-c", str(edge.config_path)],
        capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert done.returncode == 0, f"{args}: exit {done.returncode}: {done.stderr}"


class Held:
    """A client connection kept open across a change, with a reader for its answers."""

    def __init__(self, edge: Edge, server_name: str) -> None:
        self.sock = edge.tls_connect(server_name, timeout=10)
        self.reader: BinaryIO = self.sock.makefile("rb")

    def fingerprint(self) -> str:
        der = self.sock.getpeercert(binary_form=True)
        assert der is not None
        return hashlib.sha256(der).hexdigest()

    def get(self, host: str, path: str = "/") -> tuple[int, dict[str, str], bytes]:
        send_request(self.sock, host, path)
        return read_response(self.reader)

    def close(self) -> None:
        self.reader.close()
        self.sock.close()


@pytest.fixture
def held() -> Iterator[Callable[[Edge, str], Held]]:
    opened: list[Held] = []

    def hold(edge: Edge, server_name: str) -> Held:
        conn = Held(edge, server_name)
        opened.append(conn)
        return conn

    yield hold
    for conn in opened:
        conn.close()


def served(edge: Edge, name: str, issued: Issued) -> bool:
    return edge.fingerprint(name) == issued.fingerprint


# -- 421 decided by the connection's own certificate -------------------------------


def test_connection_opened_before_a_file_reload_is_served_after_it_and_421_elsewhere(
        edge: Edge, edge_config: tuple[dict[str, Any], dict[str, Issued]], ca: CA,
        held: Callable[[Edge, str], Held]) -> None:
    config, issued = edge_config
    shop = issued["shop"]
    old = held(edge, SHOP)  # handshake done, first request only after the change
    assert old.fingerprint() == shop.fingerprint
    fresh = ca.issue([SHOP, "shop.test"])
    entry = config["tls"]["certificates"][0]
    replace_file(entry["key"], fresh.key_pem)
    replace_file(entry["cert"], fresh.chain_pem)
    edge.reload(wait_for="reloaded")
    wait_for(lambda: served(edge, SHOP, fresh), 10, "the new certificate on new handshakes")

    status, _, body = old.get(SHOP, "/first-after-reload")
    assert status == 200 and json.loads(body)["path"] == "/first-after-reload"
    # The certificate's other name is not misdirected either (no app routes it: 404).
    assert old.get("shop.test")[0] == 404
    assert old.get(APP)[0] == 421  # a name the connection's certificate does not cover


@pytest.fixture
def store_edge(tmp_path: Path, ca: CA, backend: Backend) -> Iterator[tuple[Edge, Issued]]:
    """An edge with no ACME: a store domain serves its custom certificate, else the
    platform certificate."""
    platform = ca.issue([f"*.{PLATFORM}"])
    pcert, pkey = platform.write(tmp_path, "platform")
    config = {
        "platform_domain": PLATFORM,
        "workers": 1,
        "tls": {"platform_certificate": {"cert": pcert, "key": pkey}},
        "store": {"path": "store"},
        "apps": {"my-app": {"backends": [backend.address]}},
        "limits": {"drain_timeout": 2.0},
    }
    with Edge(tmp_path, config) as edge:
        yield edge, platform


def upload(edge: Edge, issued: Issued, stem: str, *first: str) -> None:
    cert, key = issued.write(edge.workdir, stem)
    domains(edge, *first, "--cert", cert, "--key", key)


def test_connections_opened_before_an_upload_a_removal_and_an_expiry_keep_being_served(
        store_edge: tuple[Edge, Issued], ca: CA, held: Callable[[Edge, str], Held]) -> None:
    edge, platform = store_edge
    first = ca.issue([CUSTOM])
    upload(edge, first, "first", "add", CUSTOM, "--app", "my-app", "--no-letsencrypt")
    wait_for(lambda: served(edge, CUSTOM, first), 10, "the first custom certificate")

    # Upload: a connection that got the first certificate, first request after it.
    on_first = held(edge, CUSTOM)
    assert on_first.fingerprint() == first.fingerprint
    second = ca.issue([CUSTOM])
    upload(edge, second, "second", "ssl", CUSTOM)
    wait_for(lambda: served(edge, CUSTOM, second), 10, "the uploaded certificate")
    assert on_first.get(CUSTOM, "/after-upload")[0] == 200
    assert on_first.get(APP)[0] == 421

    # Removal: the custom certificate goes, the platform one is served instead.
    on_second = held(edge, CUSTOM)
    assert on_second.fingerprint() == second.fingerprint
    domains(edge, "ssl", CUSTOM, "disable")
    wait_for(lambda: served(edge, CUSTOM, platform), 10, "the platform certificate back")
    assert on_second.get(CUSTOM, "/after-removal")[0] == 200
    assert on_second.get(APP)[0] == 421
    # A name without a certificate of its own is served on the default (platform)
    # certificate, as before: not misdirected there.
    on_platform = held(edge, CUSTOM)
    assert on_platform.fingerprint() == platform.fingerprint
    assert on_platform.get(CUSTOM)[0] == 200
    assert on_platform.get(APP)[0] == 200

    # Expiry: a custom certificate valid for a few more seconds, then the platform one.
    not_after = float(int(time.time()) + 8)
    short = ca.issue([CUSTOM], not_after=not_after)
    upload(edge, short, "short", "ssl", CUSTOM)
    wait_for(lambda: served(edge, CUSTOM, short), 10, "the short-lived certificate")
    on_short = held(edge, CUSTOM)
    assert on_short.fingerprint() == short.fingerprint  # opened before the expiry
    wait_for(lambda: served(edge, CUSTOM, platform), not_after - time.time() + 10,
             "the platform certificate after the expiry", interval=0.2)
    assert on_short.get(CUSTOM, "/after-expiry")[0] == 200
    assert on_short.get(APP)[0] == 421


def test_connection_opened_before_a_renewal_gets_200_on_its_first_request_after_it(
        tmp_path: Path, ca: CA, backend: Backend, held: Callable[[Edge, str], Held]) -> None:
    name = "renewed.example.test"
    with DNSServer() as dns, acme_node(tmp_path, dns, ca, backend, validity=15) as node:
        node.point(name)
        domains(node.edge, "add", name, "--app", "my-app")
        first = issued_acme(node, name)
        old = held(node.edge, name)
        assert old.fingerprint() == first
        not_after = show(node.edge, name)["acme"]["not_after"]
        wait_for(lambda: node.edge.fingerprint(name) != first, not_after - time.time() + 5,
                 "the renewed certificate on new handshakes", interval=0.2)
        assert old.get(name, "/first-after-renewal")[0] == 200
        assert old.get(APP)[0] == 421


# -- SIGTERM waits for requests in flight, not for idle clients --------------------


def closed_by_server(sock: ssl.SSLSocket) -> bool:
    """Whether the server ended this (idle) connection: EOF or a close_notify."""
    try:
        return sock.recv(1) == b""
    except TimeoutError:
        return False
    except (ssl.SSLError, OSError):
        return True


def test_sigterm_exits_once_the_request_in_flight_is_answered_despite_idle_clients(
        tmp_path: Path, ca: CA) -> None:
    pcert, pkey = ca.issue([f"*.{PLATFORM}"]).write(tmp_path, "platform")
    slow_for = 5.0
    config = {
        "platform_domain": PLATFORM,
        "workers": 1,
        "tls": {"platform_certificate": {"cert": pcert, "key": pkey}},
        "store": {"path": "store"},
        "limits": {"drain_timeout": 30.0},
    }
    idle: list[ssl.SSLSocket] = []
    with Backend("app") as app:
        config["apps"] = {"my-app": {"backends": [app.address]}}
        with Edge(tmp_path, config) as edge:
            try:
                # 100 keep-alive clients that were served once and now say nothing and
                # never close their side (they do not even read the close_notify).
                for i in range(100):
                    s = edge.tls_connect(APP, timeout=10)
                    idle.append(s)
                    send_request(s, APP, f"/idle/{i}")
                    assert read_response(s)[0] == 200
                slow = edge.tls_connect(APP, timeout=60)
                idle.append(slow)
                send_request(slow, APP, f"/slow?{slow_for}")
                wait_for(lambda: any(x.path.startswith("/slow") for x in app.seen), 10,
                         "the backend to get the slow request")
                signalled = time.monotonic()
                edge.signal(signal.SIGTERM)

                # The idle ones are closed at once, while the slow one is in flight.
                for s in idle[:-1]:
                    s.settimeout(0.1)
                wait_for(lambda: all(closed_by_server(s) for s in idle[:-1]), slow_for,
                         "every idle connection to be closed", interval=0.01)
                closed_idle = time.monotonic() - signalled
                assert closed_idle < slow_for, closed_idle

                status, headers, body = read_response(slow)
                answered = time.monotonic()
                assert status == 200 and json.loads(body)["path"] == f"/slow?{slow_for}"
                assert headers["connection"] == "close"
                assert edge.proc is not None
                code = edge.proc.wait(timeout=40)
                exited = time.monotonic()
            finally:
                for s in idle:
                    s.close()
    assert code == 0
    # drain_timeout is 30 s: the exit follows the answer, not the idle clients.
    assert exited - answered < 10, (
        f"exited {exited - answered:.1f} s after the last answer "
        f"({exited - signalled:.1f} s after SIGTERM)")


def test_sigterm_answers_a_request_whose_head_was_half_received_then_exits(
        tmp_path: Path, ca: CA, backend: Backend) -> None:
    pcert, pkey = ca.issue([f"*.{PLATFORM}"]).write(tmp_path, "platform")
    config = {
        "platform_domain": PLATFORM,
        "workers": 1,
        "tls": {"platform_certificate": {"cert": pcert, "key": pkey}},
        "store": {"path": "store"},
        "apps": {"my-app": {"backends": [backend.address]}},
        "limits": {"drain_timeout": 30.0},
    }
    with Edge(tmp_path, config) as edge:
        with edge.tls_connect(APP, timeout=20) as s:
            f = s.makefile("rb")
            # One write, one TLS record, one read on the edge: once the first answer
            # is here, the edge has parsed the start of the second request too.
            s.sendall(f"GET /first HTTP/1.1\r\nHost: {APP}\r\n\r\n"
                      f"GET /half HTTP/1.1\r\nHost: {APP}\r\n".encode())
            assert read_response(f)[0] == 200
            edge.signal(signal.SIGTERM)
            # Once the listener refuses, the worker has begun draining (it closes its
            # listener first): the rest of the head still arrives and is answered.
            wait_for(lambda: refused(edge.https_port), 10, "the listener to close")
            s.sendall(b"X-Late: 1\r\n\r\n")
            status, headers, body = read_response(f)
            answered = time.monotonic()
            assert status == 200 and json.loads(body)["path"] == "/half"
            assert headers["connection"] == "close"
        assert edge.proc is not None
        assert edge.proc.wait(timeout=40) == 0
        exited = time.monotonic()
    assert exited - answered < 10, exited - answered


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    return False


# -- WebSocket tunnel idle timeout -----------------------------------------------------


def ws_open(edge: Edge) -> tuple[ssl.SSLSocket, BinaryIO]:
    s = edge.tls_connect(APP, timeout=10)
    send_request(s, APP, "/ws", headers={
        "Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Version": "13",
        "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="})
    f = s.makefile("rb")
    assert f.readline().split()[1] == b"101"
    while f.readline() != b"\r\n":
        pass
    return s, f


def echo(s: ssl.SSLSocket, f: BinaryIO, message: bytes) -> None:
    s.sendall(ws_frame(message, mask=os.urandom(4)))
    assert ws_read(f.read) == (1, message)


def test_idle_tunnel_is_closed_at_its_timeout_and_a_busy_one_stays_open(
        tmp_path: Path, ca: CA, backend: Backend) -> None:
    pcert, pkey = ca.issue([f"*.{PLATFORM}"]).write(tmp_path, "platform")
    timeout = 3.0
    config = {
        "platform_domain": PLATFORM,
        "workers": 1,
        "tls": {"platform_certificate": {"cert": pcert, "key": pkey}},
        "store": {"path": "store"},
        "apps": {"my-app": {"backends": [backend.address]}},
        "limits": {"drain_timeout": 2.0, "tunnel_idle_timeout": timeout},
    }
    with Edge(tmp_path, config) as edge:
        idle_sock, idle_file = ws_open(edge)
        busy_sock, busy_file = ws_open(edge)
        try:
            echo(idle_sock, idle_file, b"hello")
            echo(busy_sock, busy_file, b"hello")
            went_idle = time.monotonic()
            closed_at = None
            # The busy tunnel carries a message every 0.2 s for 2.5 timeouts, while
            # the other one says nothing: it becomes readable when the edge closes it.
            while time.monotonic() - went_idle < 2.5 * timeout:
                echo(busy_sock, busy_file, b"still here")
                if closed_at is None and select.select([idle_sock], [], [], 0)[0]:
                    closed_at = time.monotonic()
                time.sleep(0.2)
            echo(busy_sock, busy_file, b"and still open")
            idle_sock.settimeout(10)
            assert idle_file.read() == b""  # the end, not data; a timeout would raise
        finally:
            for f, sock in ((idle_file, idle_sock), (busy_file, busy_sock)):
                f.close()
                sock.close()
        assert closed_at is not None, "the idle tunnel was still open"
        assert closed_at - went_idle >= timeout * 0.9, closed_at - went_idle
        assert edge.metric("tlsedge_limits_hit_total", limit="tunnel_idle_timeout") == 1


def test_tunnel_idle_timeout_must_be_positive(tmp_path: Path, ca: CA) -> None:
    pcert, pkey = ca.issue([f"*.{PLATFORM}"]).write(tmp_path, "platform")
    config = {"platform_domain": PLATFORM,
              "tls": {"platform_certificate": {"cert": pcert, "key": pkey}},
              "limits": {"tunnel_idle_timeout": 0}}
    path = tmp_path / "tlsedge.yaml"
    path.write_text(json.dumps(config))
    done = subprocess.run([sys.executable, "-m", "proxy.cli", "check-config", "-c", str(path)],
                          capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "limits.tunnel_idle_timeout" in lines[0], done.stderr


def test_name_set_answers_as_names_covers_for_every_pattern_and_name() -> None:
    patterns = ["www.shop.test", "*.shop.test", "*.test", "Shop.Test.", "*.a.b.example",
                "xn--bcher-kva.example"]
    hosts = ["www.shop.test", "WWW.shop.test.", "a.shop.test", "shop.test", "a.b.shop.test",
             "*.shop.test", ".shop.test", "x.test", "test", "q.a.b.example", "a.b.example",
             "xn--bcher-kva.example", "", "shop.test.evil", "*.a.b.example"]
    for n in range(len(patterns) + 1):
        matcher = NameSet(patterns[:n])
        for host in hosts:
            expected = any(covers(p, host) for p in patterns[:n])
            assert matcher.covers(host) == expected, (patterns[:n], host)
    assert NameSet(["a.test", "*.b.test"]) == NameSet(["*.b.test", "A.test."])
    assert NameSet(["a.test"]) != NameSet(["a.test", "b.test"])
