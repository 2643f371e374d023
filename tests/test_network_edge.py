"""The edge in a real network (issue #15), on the real `tlsedge run`: the PROXY protocol
from a load balancer (v1 and v2, over TLS and plain HTTP, a real HAProxy in front),
PROXY v2 to an app's backends, plain HTTP served per app (force_https, ACME first,
changed live through the admin API), the TLS policy from the config (versions,
ciphers, groups: checked with openssl s_client) and IPv6 listeners.

Client addresses: everything runs on loopback, where every 127.0.0.0/8 address is
this machine's. The PROXY edge trusts 127.0.0.1 (the tests) and 127.0.0.3 (HAProxy's
source); a connection from 127.0.0.2 is an untrusted one.
"""

from __future__ import annotations

import contextlib
import json
import socket
import ssl
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.certgen import CA
from tests.conftest import PLATFORM
from tests.support.admin import AdminClient, admin_token, in_store
from tests.support.backend import Backend, Seen, pattern
from tests.support.edge import Edge, read_response, send_request
from tests.support.ports import free_port

APP = f"my-app.{PLATFORM}"
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
HAPROXY_SOURCE = "127.0.0.3"
UNTRUSTED = "127.0.0.2"
TRUSTED = ["127.0.0.1/32", f"{HAPROXY_SOURCE}/32", "::1/128"]


def wait_for(check: Callable[[], Any], what: str, timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def v1(client: str, port: int = 40001) -> bytes:
    proto = "TCP6" if ":" in client else "TCP4"
    server = "::1" if proto == "TCP6" else "127.0.0.1"
    return f"PROXY {proto} {client} {server} {port} 443\r\n".encode()


def v2(client: str | None, *, port: int = 40002, tlvs: bytes = b"") -> bytes:
    """A PROXY v2 header (built here, apart from the product's encoder); client None:
    LOCAL, as a balancer's health check sends it."""
    if client is None:
        return V2_SIGNATURE + struct.pack("!BBH", 0x20, 0x00, len(tlvs)) + tlvs
    if ":" in client:
        block = (socket.inet_pton(socket.AF_INET6, client)
                 + socket.inet_pton(socket.AF_INET6, "::1") + struct.pack("!HH", port, 443))
        family = 0x21
    else:
        block = (socket.inet_aton(client) + socket.inet_aton("127.0.0.1")
                 + struct.pack("!HH", port, 443))
        family = 0x11
    block += tlvs
    return V2_SIGNATURE + struct.pack("!BBH", 0x21, family, len(block)) + block


def tlv(kind: int, value: bytes) -> bytes:
    return struct.pack("!BH", kind, len(value)) + value


def client_context(cafile: str | None = None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if cafile:
        ctx.load_verify_locations(cafile)
    else:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def connect(port: int, *, source: str = "127.0.0.1", host: str = "127.0.0.1"
            ) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    raw = socket.socket(family, socket.SOCK_STREAM)
    raw.settimeout(15)
    raw.bind((source, 0))
    raw.connect((host, port))
    return raw


def exchange(port: int, preface: bytes, host: str, path: str = "/", *, tls: bool,
             method: str = "GET", body: bytes | None = None, source: str = "127.0.0.1",
             address: str = "127.0.0.1") -> tuple[int, dict[str, str], bytes]:
    """One request on a fresh connection that starts with `preface` (a PROXY header)."""
    raw = connect(port, source=source, host=address)
    with contextlib.closing(raw):
        raw.sendall(preface)
        sock: socket.socket = (client_context().wrap_socket(raw, server_hostname=host)
                               if tls else raw)
        send_request(sock, host, path, method=method, body=body,
                     headers={"Connection": "close"})
        return read_response(sock, head_only=method == "HEAD")


def closed_unread(sock: socket.socket) -> bool:
    """The peer closed (FIN or reset) without sending a byte."""
    try:
        return sock.recv(65536) == b""
    except ConnectionResetError:
        return True


def last_seen(backend: Backend, before: int) -> Seen:
    new = backend.seen[before:]
    assert len(new) == 1, new
    return new[0]


def access_entry(path: Path, request_id: str) -> dict[str, Any]:
    def find() -> dict[str, Any] | None:
        if not path.exists():
            return None
        for line in path.read_text().splitlines():
            entry: dict[str, Any] = json.loads(line)
            if entry["request_id"] == request_id:
                return entry
        return None

    found: dict[str, Any] = wait_for(find, f"access log line of {request_id}")
    return found


# -- a real HAProxy ------------------------------------------------------------------

class Haproxy:
    """`haproxy -db` (foreground) with a config of frontends given as text."""

    def __init__(self, workdir: Path, sections: str, ports: list[int]) -> None:
        self.config = workdir / "haproxy.cfg"
        self.config.write_text(
            "global\n    maxconn 256\n"
            "defaults\n    timeout connect 5s\n    timeout client 30s\n"
            "    timeout server 30s\n" + sections)
        self.log = (workdir / "haproxy.log").open("wb")
        self.proc = subprocess.Popen(["haproxy", "-db", "-f", str(self.config)],
                                     stdout=self.log, stderr=subprocess.STDOUT)
        for port in ports:
            wait_for(lambda p=port: self._answers(p), f"haproxy on port {port}")

    def _answers(self, port: int) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"haproxy exited: {Path(self.log.name).read_text()}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
            return True
        return False

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


# -- the PROXY edge: both listeners take the header ------------------------------------

class Proxied:
    def __init__(self, edge: Edge, backend: Backend, pp_backend: Backend, cafile: str,
                 access_log: Path, haproxy_https: int, haproxy_http: int) -> None:
        self.edge, self.backend, self.pp_backend = edge, backend, pp_backend
        self.cafile, self.access_log = cafile, access_log
        self.haproxy_https, self.haproxy_http = haproxy_https, haproxy_http

    def request(self, preface: bytes, *, tls: bool, host: str = APP, path: str = "/",
                **kw: Any) -> tuple[int, dict[str, str], bytes]:
        port = self.edge.https_port if tls else self.edge.http_port
        return exchange(port, preface, host, path, tls=tls, **kw)

    def counted(self, result: str) -> float:
        return self.edge.metric("tlsedge_proxy_protocol_total", result=result)


@pytest.fixture(scope="module")
def proxied(ca: CA, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxied]:
    workdir = tmp_path_factory.mktemp("proxy-protocol")
    cert, key = ca.issue([f"*.{PLATFORM}"]).write(workdir, "platform")
    cafile = str(ca.write_ca(workdir / "ca.pem"))
    haproxy_https, haproxy_http, accept_proxy = free_port(), free_port(), free_port()
    access_log = workdir / "access.log"
    with Backend("app") as backend, Backend("pp-app") as pp_backend:
        edge = Edge(workdir, {
            "platform_domain": PLATFORM,
            "workers": 1,
            "tls": {"platform_certificate": {"cert": cert, "key": key},
                    "handshake_timeout": 2},
            "store": {"path": "store"},
            "apps": {"my-app": {"backends": [backend.address]},
                     # Its backend is HAProxy with accept-proxy: it reads our PROXY v2
                     # header and tells the recording backend what it said.
                     "pp-app": {"backends": [f"127.0.0.1:{accept_proxy}"],
                                "send_proxy_protocol": "v2"}},
            "access_log": {"enabled": True, "path": str(access_log)},
            "limits": {"drain_timeout": 2, "connections_per_client": 2},
        }, start=False)
        for key_ in ("https", "http"):
            edge.config["listen"][key_] = {"address": edge.config["listen"][key_],
                                           "proxy_protocol": True, "trusted": TRUSTED}
        edge.write_config()
        haproxy = Haproxy(workdir, f"""
frontend tls_in
    mode tcp
    bind 127.0.0.1:{haproxy_https}
    default_backend tlsedge_https
backend tlsedge_https
    mode tcp
    server s1 127.0.0.1:{edge.https_port} send-proxy-v2 source {HAPROXY_SOURCE}
frontend plain_in
    mode tcp
    bind 127.0.0.1:{haproxy_http}
    default_backend tlsedge_http
backend tlsedge_http
    mode tcp
    server s1 127.0.0.1:{edge.http_port} send-proxy-v2 source {HAPROXY_SOURCE}
frontend pp_app
    mode http
    bind 127.0.0.1:{accept_proxy} accept-proxy
    http-request set-header X-Proxy-Header-Source %[src]
    default_backend pp_app_backend
backend pp_app_backend
    mode http
    server s1 {pp_backend.address}
""", [haproxy_https, haproxy_http, accept_proxy])
        try:
            edge.start()
            with edge:
                yield Proxied(edge, backend, pp_backend, cafile, access_log,
                              haproxy_https, haproxy_http)
        finally:
            haproxy.close()


HEADERS = [
    ("v1 TCP4", v1("198.51.100.7"), "198.51.100.7"),
    ("v1 TCP6", v1("2001:db8::7"), "2001:db8::7"),
    ("v2 TCP4", v2("198.51.100.8"), "198.51.100.8"),
    ("v2 TCP6", v2("2001:db8::8"), "2001:db8::8"),
    ("v2 TCP4 with TLVs", v2("198.51.100.9", tlvs=tlv(0xEA, b"\x01vpce-0123456789abcdef")
                                + tlv(0x01, b"http/1.1") + tlv(0x04, b"")), "198.51.100.9"),
    ("v2 LOCAL", v2(None), "127.0.0.1"),  # the balancer's own: the peer stands
]


@pytest.mark.parametrize("tls", [True, False], ids=["tls", "plain"])
@pytest.mark.parametrize(("case", "header", "client"), HEADERS, ids=[h[0] for h in HEADERS])
def test_proxy_header_client_is_what_the_backend_and_the_access_log_see(
        proxied: Proxied, tls: bool, case: str, header: bytes, client: str) -> None:
    before = len(proxied.backend.seen)
    status, _, body = proxied.request(header, tls=tls,
                                            path=f"/who?{case.replace(' ', '-')}")
    assert status == 200, body
    seen = last_seen(proxied.backend, before)
    assert seen.header("X-Forwarded-For") == client
    assert seen.header("X-Forwarded-Proto") == ("https" if tls else "http")
    entry = access_entry(proxied.access_log, seen.header("X-Request-Id") or "")
    assert entry["client"] == client
    assert (entry["tls"] != "") == tls


def test_proxy_headers_read_are_counted_ok_and_local(proxied: Proxied) -> None:
    ok, local = proxied.counted("ok"), proxied.counted("local")
    assert proxied.request(v2("198.51.100.10"), tls=True)[0] == 200
    assert proxied.request(v2(None), tls=False)[0] == 200
    wait_for(lambda: proxied.counted("ok") >= ok + 1 and proxied.counted("local") >= local + 1,
             "ok and local counted")


def test_header_split_over_many_reads_is_still_read(proxied: Proxied) -> None:
    before = len(proxied.backend.seen)
    header = v2("198.51.100.11", tlvs=tlv(0xEA, b"x" * 40))
    raw = connect(proxied.edge.https_port)
    with contextlib.closing(raw):
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for i in range(0, len(header), 7):
            raw.sendall(header[i:i + 7])
            time.sleep(0.01)
        with client_context().wrap_socket(raw, server_hostname=APP) as tls:
            send_request(tls, APP, "/split", headers={"Connection": "close"})
            assert read_response(tls)[0] == 200
    assert last_seen(proxied.backend, before).header("X-Forwarded-For") == "198.51.100.11"


def _long_v1() -> bytes:
    return b"PROXY UNKNOWN " + b"x" * 100 + b"\r\n"


BAD = [
    ("garbage", b"\x00\x01garbage that is no header at all\r\n", "missing"),
    ("HTTP request first", f"GET / HTTP/1.1\r\nHost: {APP}\r\n\r\n".encode(), "missing"),
    ("v2 bad signature", v2("198.51.100.12")[:11] + b"X" + v2("198.51.100.12")[12:],
     "missing"),
    ("v2 wrong length", V2_SIGNATURE + struct.pack("!BBH", 0x21, 0x11, 4) + b"\x01\x02\x03\x04",
     "invalid"),
    ("v2 length past the bound", V2_SIGNATURE + struct.pack("!BBH", 0x21, 0x11, 60000),
     "invalid"),
    ("v2 TLV past its header", v2("198.51.100.12", tlvs=b"\xea\x00\x40xx"), "invalid"),
    ("v1 line over 107 bytes", _long_v1(), "invalid"),
    ("v1 bad address", b"PROXY TCP4 198.51.100.300 127.0.0.1 1 443\r\n", "invalid"),
]


@pytest.mark.parametrize("tls", [True, False], ids=["tls", "plain"])
@pytest.mark.parametrize(("case", "data", "result"), BAD, ids=[b[0] for b in BAD])
def test_malformed_header_closes_the_connection_unread_and_is_counted(
        proxied: Proxied, tls: bool, case: str, data: bytes, result: str) -> None:
    port = proxied.edge.https_port if tls else proxied.edge.http_port
    before_seen, before = len(proxied.backend.seen), proxied.counted(result)
    raw = connect(port)
    with contextlib.closing(raw):
        # A valid request after the bad bytes: never parsed as TLS or HTTP.
        raw.sendall(data + f"GET /x HTTP/1.1\r\nHost: {APP}\r\n\r\n".encode())
        assert closed_unread(raw), case
    wait_for(lambda: proxied.counted(result) >= before + 1, f"{result} counted")
    assert len(proxied.backend.seen) == before_seen
    # Other clients are served meanwhile.
    assert proxied.request(v1("198.51.100.13"), tls=tls)[0] == 200


def test_tls_client_hello_without_a_header_is_refused_and_counted_missing(
        proxied: Proxied) -> None:
    before_seen, before = len(proxied.backend.seen), proxied.counted("missing")
    raw = connect(proxied.edge.https_port)
    with contextlib.closing(raw), pytest.raises((ssl.SSLError, OSError)):
        client_context().wrap_socket(raw, server_hostname=APP)
    wait_for(lambda: proxied.counted("missing") >= before + 1, "missing counted")
    assert len(proxied.backend.seen) == before_seen


@pytest.mark.parametrize("tls", [True, False], ids=["tls", "plain"])
def test_connection_from_an_untrusted_source_is_closed_before_reading(
        proxied: Proxied, tls: bool) -> None:
    before_seen, before = len(proxied.backend.seen), proxied.counted("untrusted")
    with pytest.raises((ConnectionError, ssl.SSLError, OSError)):
        # A perfectly good header, from an address outside `trusted`.
        proxied.request(v1("198.51.100.14"), tls=tls, source=UNTRUSTED)
    wait_for(lambda: proxied.counted("untrusted") >= before + 1, "untrusted counted")
    assert len(proxied.backend.seen) == before_seen


def test_header_cut_short_by_the_client_is_counted_truncated(proxied: Proxied) -> None:
    before_seen, before = len(proxied.backend.seen), proxied.counted("truncated")
    raw = connect(proxied.edge.https_port)
    raw.sendall(v2("198.51.100.15")[:20])
    raw.close()
    wait_for(lambda: proxied.counted("truncated") >= before + 1, "truncated counted")
    assert len(proxied.backend.seen) == before_seen


def test_header_not_finished_within_the_handshake_timeout_is_cut(proxied: Proxied) -> None:
    before = proxied.counted("timeout")
    raw = connect(proxied.edge.https_port)
    with contextlib.closing(raw):
        raw.sendall(b"PROXY TCP4 198.51.100.16 ")
        started = time.monotonic()
        assert closed_unread(raw)  # the socket's own timeout (15 s) would raise
        assert time.monotonic() - started >= 1.0  # tls.handshake_timeout is 2 s
    wait_for(lambda: proxied.counted("timeout") >= before + 1, "timeout counted")


def test_per_client_connection_limit_counts_the_header_address(proxied: Proxied) -> None:
    """limits.connections_per_client is 2: every connection comes from 127.0.0.1, but
    the limit holds per address the balancer names."""
    held = []
    try:
        for _ in range(2):
            raw = connect(proxied.edge.https_port)
            raw.sendall(v1("198.51.100.20"))
            held.append(client_context().wrap_socket(raw, server_hostname=APP))
        with pytest.raises((ConnectionError, ssl.SSLError, OSError)):
            proxied.request(v1("198.51.100.20"), tls=True)
        status, _, _ = proxied.request(v1("198.51.100.21"), tls=True)
        assert status == 200
    finally:
        for sock in held:
            sock.close()
    # Once they closed, the address is admitted again.
    wait_for(lambda: _status_or_none(proxied, v1("198.51.100.20")) == 200,
             "the address admitted again")


def _status_or_none(proxied: Proxied, header: bytes) -> int | None:
    try:
        return proxied.request(header, tls=True)[0]
    except (OSError, ssl.SSLError):
        return None


@pytest.mark.parametrize("tls", [True, False], ids=["tls", "plain"])
def test_haproxy_with_send_proxy_v2_carries_curl_and_the_backend_sees_curls_address(
        proxied: Proxied, tls: bool) -> None:
    """curl (from 127.0.0.5) -> HAProxy (mode tcp, send-proxy-v2, from 127.0.0.3) ->
    tlsedge -> backend: the backend sees curl's address, not HAProxy's."""
    before = len(proxied.backend.seen)
    port = proxied.haproxy_https if tls else proxied.haproxy_http
    scheme = "https" if tls else "http"
    out = subprocess.run(
        ["curl", "-sS", "--interface", "127.0.0.5", "--cacert", proxied.cafile,
         "--resolve", f"{APP}:{port}:127.0.0.1", "-o", "-", "-w", "\n%{http_code}",
         f"{scheme}://{APP}:{port}/through-haproxy"],
        capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert out.stdout.rsplit("\n", 1)[1] == "200"
    seen = last_seen(proxied.backend, before)
    assert seen.path == "/through-haproxy"
    assert seen.header("X-Forwarded-For") == "127.0.0.5"


def test_app_with_send_proxy_protocol_v2_tells_its_backend_each_client(
        proxied: Proxied) -> None:
    """A real PROXY v2 reader (HAProxy, accept-proxy) in front of the app's backend says
    which client each request came from; a backend connection carrying one client's
    header never carries another client's request."""
    backend = proxied.pp_backend
    for client in ("198.51.100.40", "2001:db8::40", "198.51.100.41", "198.51.100.40"):
        before = len(backend.seen)
        status, _, body = proxied.request(v1(client), tls=True, host=f"pp-app.{PLATFORM}")
        assert status == 200, body
        seen = last_seen(backend, before)
        assert seen.header("X-Proxy-Header-Source") == client
        assert seen.header("X-Forwarded-For") == client


# -- plain HTTP served per app ---------------------------------------------------------

class Plain:
    def __init__(self, edge: Edge, backend: Backend, access_log: Path) -> None:
        self.edge, self.backend, self.access_log = edge, backend, access_log

    def get(self, host: str, path: str = "/", **kw: Any) -> tuple[int, dict[str, str], bytes]:
        return exchange(self.edge.http_port, b"", host, path, tls=False, **kw)


@pytest.fixture(scope="module")
def plain(ca: CA, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Plain]:
    workdir = tmp_path_factory.mktemp("plain-http")
    cert, key = ca.issue([f"*.{PLATFORM}"]).write(workdir, "platform")
    scert, skey = ca.issue(["www.shop.test"]).write(workdir, "shop")
    access_log = workdir / "access.log"
    with Backend("plain") as backend:
        config = {
            "platform_domain": PLATFORM,
            "workers": 1,
            "tls": {"platform_certificate": {"cert": cert, "key": key},
                    "certificates": [{"cert": scert, "key": skey}]},
            "store": {"path": "store"},
            "apps": {"open": {"backends": [backend.address]},
                     "secure": {"backends": [backend.address], "force_https": True},
                     "toggled": {"backends": [backend.address]}},
            "domains": {"www.shop.test": "open"},
            "access_log": {"enabled": True, "path": str(access_log)},
            "limits": {"drain_timeout": 2},
        }
        with Edge(workdir, config, admin=True) as edge:
            yield Plain(edge, backend, access_log)


@pytest.mark.parametrize("host", [f"open.{PLATFORM}", "www.shop.test"])
def test_app_without_force_https_is_proxied_on_plain_http_byte_exact(
        plain: Plain, host: str) -> None:
    before = len(plain.backend.seen)
    status, headers, body = plain.get(host, "/bytes/300000")
    assert status == 200
    assert body == pattern(300000)
    assert "strict-transport-security" not in headers
    seen = last_seen(plain.backend, before)
    assert seen.header("X-Forwarded-Proto") == "http"
    assert seen.header("X-Forwarded-Port") == str(plain.edge.http_port)
    assert seen.header("X-Forwarded-For") == "127.0.0.1"
    assert seen.header("X-Forwarded-Host") == host
    entry = access_entry(plain.access_log, seen.header("X-Request-Id") or "")
    assert (entry["host"], entry["status"], entry["tls"]) == (host, 200, "")
    # A body goes up byte-exact too.
    upload = pattern(100_000)
    status, _, echoed = plain.get(host, "/echo", method="POST", body=upload)
    assert status == 200 and echoed == upload


def test_unknown_host_on_plain_http_gets_404_and_reaches_no_backend(plain: Plain) -> None:
    before = len(plain.backend.seen)
    status, headers, body = plain.get("nobody.example.test")
    assert status == 404
    assert headers["x-request-id"].encode() in body
    assert len(plain.backend.seen) == before


@pytest.mark.parametrize(("method", "status"), [("GET", 301), ("HEAD", 301), ("POST", 308),
                                                ("PUT", 308), ("DELETE", 308)])
def test_force_https_app_is_redirected_301_or_308_on_plain_http(
        plain: Plain, method: str, status: int) -> None:
    edge = plain.edge
    before = len(plain.backend.seen)
    got, headers, _ = plain.get(f"secure.{PLATFORM}", "/a/b?x=1", method=method,
                                body=b"data" if method in ("POST", "PUT") else None)
    assert got == status
    assert headers["location"] == f"https://secure.{PLATFORM}:{edge.https_port}/a/b?x=1"
    assert "strict-transport-security" not in headers
    assert len(plain.backend.seen) == before
    # Over HTTPS the app is served, with HSTS.
    status, headers, _ = edge.request(f"secure.{PLATFORM}", "/")
    assert status == 200 and headers["strict-transport-security"] == "max-age=31536000"


def test_redirect_to_a_head_request_has_no_body_and_the_connection_goes_on(
        plain: Plain) -> None:
    host = f"secure.{PLATFORM}"
    with socket.create_connection(("127.0.0.1", plain.edge.http_port), timeout=10) as s:
        f = s.makefile("rb")
        for method in ("HEAD", "GET", "HEAD", "POST"):
            send_request(s, host, "/k", method=method,
                         body=b"x" if method == "POST" else None)
            status, headers, _ = read_response(f, head_only=method == "HEAD")
            assert status == (308 if method == "POST" else 301), method
            assert headers["location"].endswith("/k")


def test_acme_challenge_is_answered_before_the_app_force_https_or_not(plain: Plain) -> None:
    token = "tok_" + "A" * 40
    authorization = f"{token}.thumbprint"

    async def put(registry: Any) -> None:
        from proxy.store import records as rec
        await registry.store.put(rec.challenge_key(token), authorization.encode())

    in_store(plain.edge, put)
    before = len(plain.backend.seen)
    for host in (f"secure.{PLATFORM}", f"open.{PLATFORM}", "unknown.example.test"):
        status, headers, body = plain.get(host, f"/.well-known/acme-challenge/{token}")
        assert (status, body) == (200, authorization.encode()), host
        assert headers["content-type"] == "text/plain"
    status, _, _ = plain.get(f"open.{PLATFORM}", "/.well-known/acme-challenge/other")
    assert status == 404
    assert len(plain.backend.seen) == before


def test_force_https_turned_on_through_the_admin_api_applies_without_a_reload(
        plain: Plain) -> None:
    edge, host = plain.edge, f"toggled.{PLATFORM}"
    admin = AdminClient(edge, token=admin_token(edge))
    reloads = edge.metric("tlsedge_reloads_total")
    assert plain.get(host)[0] == 200
    reply = admin.request("PUT", "/api/v1/apps/toggled", json_body={"force_https": True})
    assert reply.status == 200, reply.text
    assert reply.json()["force_https"] is True
    wait_for(lambda: plain.get(host)[0] == 301, "the redirect")
    assert edge.request(host, "/")[1]["strict-transport-security"] == "max-age=31536000"
    assert admin.request("GET", "/api/v1/apps/toggled").json()["force_https"] is True
    reply = admin.request("PUT", "/api/v1/apps/toggled", json_body={"force_https": False})
    assert reply.status == 200, reply.text
    wait_for(lambda: plain.get(host)[0] == 200, "plain HTTP served again")
    assert edge.metric("tlsedge_reloads_total") == reloads
    assert "reloaded" not in edge.log()


def test_admin_api_refuses_an_unknown_app_or_setting_and_changes_nothing(plain: Plain) -> None:
    edge = plain.edge
    admin = AdminClient(edge, token=admin_token(edge))
    reply = admin.request("PUT", "/api/v1/apps/nope", json_body={"force_https": True})
    assert reply.status == 404, reply.text
    for body in ({"force_https": "yes"}, {"backends": ["127.0.0.1:1"]}, {}):
        reply = admin.request("PUT", "/api/v1/apps/open", json_body=body)
        assert reply.status == 400, (body, reply.text)
        assert "\n" not in reply.json()["error"].strip()
    assert plain.get(f"open.{PLATFORM}")[0] == 200


# -- TLS policy from the config, IPv6 listeners ------------------------------------------

class Policy:
    def __init__(self, edge: Edge, backend: Backend, access_log: Path) -> None:
        self.edge, self.backend, self.access_log = edge, backend, access_log

    def s_client(self, *args: str) -> bool:
        """Whether `openssl s_client` completes a handshake with these options."""
        done = subprocess.run(
            ["openssl", "s_client", "-connect", f"[::1]:{self.edge.https_port}",
             "-servername", APP, *args], input=b"", capture_output=True, timeout=20)
        # The exit code races with the server's close: judge by what it printed.
        return b"Server public key" in done.stdout and b"Cipher is (NONE)" not in done.stdout


@pytest.fixture(scope="module")
def policy(ca: CA, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Policy]:
    workdir = tmp_path_factory.mktemp("tls-policy")
    # An RSA key: with an ECDSA one, TLS 1.2 would also need the key's curve among the
    # client's groups, and a refusal would not be the groups setting's.
    cert, key = ca.issue([f"*.{PLATFORM}"], key_type="rsa").write(workdir, "platform")
    access_log = workdir / "access.log"
    with Backend("v6") as backend:
        edge = Edge(workdir, {
            "platform_domain": PLATFORM,
            "workers": 1,
            "tls": {"platform_certificate": {"cert": cert, "key": key},
                    "max_version": "1.2",
                    "ciphers": "ECDHE-RSA-AES256-GCM-SHA384:ECDHE-RSA-CHACHA20-POLY1305",
                    "groups": ["P-384"]},
            "store": {"path": "store"},
            "apps": {"my-app": {"backends": [backend.address]}},
            "access_log": {"enabled": True, "path": str(access_log)},
            "limits": {"drain_timeout": 2},
        }, start=False)
        edge.config["listen"]["https"] = f"[::1]:{edge.https_port}"
        edge.config["listen"]["http"] = f"[::1]:{edge.http_port}"
        edge.write_config()
        edge.start()
        with edge:
            yield Policy(edge, backend, access_log)


def test_max_version_1_2_refuses_tls_1_3(policy: Policy) -> None:
    assert policy.s_client("-tls1_2")
    assert not policy.s_client("-tls1_3")


def test_only_the_configured_tls12_ciphers_are_accepted(policy: Policy) -> None:
    assert policy.s_client("-tls1_2", "-cipher", "ECDHE-RSA-AES256-GCM-SHA384")
    assert policy.s_client("-tls1_2", "-cipher", "ECDHE-RSA-CHACHA20-POLY1305")
    assert not policy.s_client("-tls1_2", "-cipher", "ECDHE-RSA-AES128-GCM-SHA256")


def test_only_the_configured_groups_are_accepted(policy: Policy) -> None:
    assert policy.s_client("-groups", "P-384")
    assert not policy.s_client("-groups", "X25519")
    assert not policy.s_client("-groups", "P-256")


@pytest.mark.parametrize("tls", [True, False], ids=["https", "http"])
def test_ipv6_listener_serves_and_the_backend_sees_the_ipv6_client(
        policy: Policy, tls: bool) -> None:
    edge = policy.edge
    before = len(policy.backend.seen)
    port = edge.https_port if tls else edge.http_port
    status, _, _ = exchange(port, b"", APP, "/v6", tls=tls, source="::1", address="::1")
    assert status == 200
    seen = last_seen(policy.backend, before)
    assert seen.header("X-Forwarded-For") == "::1"
    assert access_entry(policy.access_log, seen.header("X-Request-Id") or "")["client"] == "::1"


def test_ipv6_listener_socket_is_made_dual_stack_before_it_binds(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """"[::]:443" takes IPv4 too, whatever net.ipv6.bindv6only says: IPV6_V6ONLY is off
    when the socket binds. Sockets start as on a machine with bindv6only = 1; checked
    on [::1] (tests bind loopback only; Linux then sets the option by itself, so it is
    read at bind time)."""
    from proxy import app

    at_bind: list[int] = []

    class Recording(socket.socket):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            if self.family == socket.AF_INET6:
                self.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)

        def bind(self, address: Any) -> None:
            if self.family == socket.AF_INET6:
                at_bind.append(self.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY))
            super().bind(address)

    monkeypatch.setattr(app.socket, "socket", Recording)
    sock = app._listen_socket(f"[::1]:{free_port()}", reuse_port=False, key="listen.https")
    sock.close()
    assert at_bind == [0]


@pytest.mark.parametrize(("seen", "address"), [
    ("::ffff:203.0.113.7", "203.0.113.7"), ("203.0.113.7", "203.0.113.7"),
    ("2001:db8::7", "2001:db8::7"), ("::ffff:0:1", "::ffff:0:1"), ("::1", "::1")])
def test_ipv4_client_of_a_dual_stack_listener_is_known_by_its_ipv4_address(
        seen: str, address: str) -> None:
    """What the listeners and the admin login limit count, log and forward."""
    from proxy.names import unmapped_ip

    assert unmapped_ip(seen) == address


# -- config: one clear line per mistake; check-config shows the policy -------------------

def check_config(tmp_path: Path, ca: CA, **changes: Any) -> subprocess.CompletedProcess[str]:
    cert, key = ca.issue([f"*.{PLATFORM}"]).write(tmp_path, "platform")
    config: dict[str, Any] = {
        "platform_domain": PLATFORM,
        "listen": {"https": f"127.0.0.1:{free_port()}", "http": f"127.0.0.1:{free_port()}",
                   "metrics": None},
        "tls": {"platform_certificate": {"cert": cert, "key": key}},
        "store": {"path": str(tmp_path / "store")},
        "apps": {"my-app": {"backends": ["127.0.0.1:9"]}},
    }
    for path, value in changes.items():
        node = config
        *parents, last = path.split("__")
        for part in parents:
            node = node[part]
        node[last] = value
    import yaml
    (tmp_path / "tlsedge.yaml").write_text(yaml.safe_dump(config))
    return subprocess.run([sys.executable, "-m", "proxy.cli", "check-config", "-c",
                           str(tmp_path / "tlsedge.yaml")], capture_output=True, text=True,
                          timeout=60)


@pytest.mark.parametrize(("changes", "line"), [
    ({"tls__ciphers": "ECDHE-ECDSA-AES128-GCM-SHA256:NOPE-AES-GCM"},
     "tlsedge.yaml: tls.ciphers: unknown TLS 1.2 cipher 'NOPE-AES-GCM'"),
    ({"tls__ciphers": "NULL-SHA256"}, "tlsedge.yaml: tls.ciphers: NULL-SHA256 has no "),
    ({"tls__groups": ["X25519", "X999"]}, "tlsedge.yaml: tls.groups[1]: must be one of: "),
    ({"tls__min_version": "1.1"}, "tlsedge.yaml: tls.min_version: must be one of: 1.2, 1.3"),
    ({"tls__max_version": "1.0"}, "tlsedge.yaml: tls.max_version: must be one of: 1.2, 1.3"),
    ({"tls__min_version": "1.3", "tls__max_version": "1.2"},
     "tlsedge.yaml: tls.min_version: 1.3 is above tls.max_version"),
    ({"listen__https": {"address": "127.0.0.1:8443", "proxy_protocol": True}},
     "tlsedge.yaml: listen.https.trusted: give the addresses of the load balancers"),
    ({"listen__http": {"address": "127.0.0.1:8080", "proxy_protocol": True,
                       "trusted": ["10.0.0.0/33"]}},
     "tlsedge.yaml: listen.http.trusted[0]: '10.0.0.0/33' is not an address or network"),
    ({"listen__https": {"address": "127.0.0.1:8443", "proxy_protocol": "yes"}},
     "tlsedge.yaml: listen.https.proxy_protocol: "),
    ({"apps": {"a": {"backends": ["127.0.0.1:9"], "send_proxy_protocol": "v1"}}},
     'tlsedge.yaml: apps.a.send_proxy_protocol: must be null or "v2" (got \'v1\')'),
])
def test_bad_network_setting_is_one_line_naming_the_key(
        tmp_path: Path, ca: CA, changes: dict[str, Any], line: str) -> None:
    out = check_config(tmp_path, ca, **changes)
    assert out.returncode == 1, out.stdout
    assert out.stdout == ""
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"tlsedge: {line}"), out.stderr


def test_check_config_shows_the_listeners_and_the_tls_policy(tmp_path: Path, ca: CA) -> None:
    out = check_config(tmp_path, ca, tls__max_version="1.2", tls__groups=["P-256", "X25519"],
                       listen__https={"address": "[::1]:8443", "proxy_protocol": True,
                                      "trusted": ["10.0.0.0/8", "2001:db8::/32"]})
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert "listen.https: [::1]:8443, PROXY protocol from 10.0.0.0/8, 2001:db8::/32" in lines
    assert any(line.startswith("listen.http: 127.0.0.1:") for line in lines)
    assert ("tls: TLS 1.2; TLS 1.2 ciphers ECDHE-ECDSA-AES128-GCM-SHA256:"
            "ECDHE-RSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES256-GCM-SHA384:"
            "ECDHE-RSA-AES256-GCM-SHA384:ECDHE-ECDSA-CHACHA20-POLY1305:"
            "ECDHE-RSA-CHACHA20-POLY1305; groups P-256, X25519") in lines
