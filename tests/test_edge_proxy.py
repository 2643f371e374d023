"""HTTP relay on the real `tlsedge run`: routing by Host, error pages, forwarding
headers, bodies both ways, keep-alive and pipelining, and the plain-HTTP listener.

One edge serves the whole module (starting one costs ~0.5 s); tests compare what
the recording backends saw before and after their own requests.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
from collections.abc import Iterator

import pytest

from tests.certgen import CA
from tests.conftest import PLATFORM
from tests.support.backend import Backend, Seen
from tests.support.edge import Edge, read_response, send_request
from tests.support.ports import free_port

APP_HOST = f"my-app.{PLATFORM}"
SHOP_HOST = "www.shop.test"


class Setup:
    def __init__(self, edge: Edge, app: Backend, shop: Backend, cafile: str,
                 dead_port: int) -> None:
        self.edge, self.app, self.shop = edge, app, shop
        self.cafile = cafile
        self.dead_port = dead_port


@pytest.fixture(scope="module")
def setup(ca: CA, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    workdir = tmp_path_factory.mktemp("edge-proxy")
    pcert, pkey = ca.issue([f"*.{PLATFORM}"]).write(workdir, "platform")
    scert, skey = ca.issue([SHOP_HOST, "shop.test"]).write(workdir, "shop")
    cafile = ca.write_ca(workdir / "ca.pem")
    dead_port = free_port()  # nothing listens there: connecting is refused
    with Backend("app-backend") as app, Backend("shop-backend") as shop:
        config = {
            "platform_domain": PLATFORM,
            "workers": 1,
            "tls": {"platform_certificate": {"cert": pcert, "key": pkey},
                    "certificates": [{"cert": scert, "key": skey}]},
            "store": {"path": "store"},
            # force_https: the plain-HTTP listener redirects them (test_network_edge.py
            # has apps served on plain HTTP).
            "apps": {"my-app": {"backends": [app.address], "force_https": True},
                     "shop": {"backends": [shop.address], "force_https": True},
                     "down": {"backends": [f"127.0.0.1:{dead_port}"]}},
            "domains": {SHOP_HOST: "shop"},
            "limits": {"drain_timeout": 5},
        }
        with Edge(workdir, config) as edge:
            yield Setup(edge, app, shop, cafile, dead_port)


def new_requests(backend: Backend, before: int) -> list[Seen]:
    return backend.seen[before:]


# -- routing and error pages -------------------------------------------------------

def test_platform_host_and_custom_domain_reach_their_own_app_backend(setup: Setup) -> None:
    edge = setup.edge
    status, _, body = edge.request(APP_HOST, "/where")
    assert status == 200
    assert json.loads(body)["backend"] == "app-backend"
    status, _, body = edge.request(SHOP_HOST, "/where")
    assert status == 200
    assert json.loads(body)["backend"] == "shop-backend"
    # Host decides, not SNI, among the names the connection's certificate covers; a
    # host outside it is 421 (tests/test_dataplane_routing.py).
    status, _, body = edge.request(APP_HOST, "/where", server_name=f"down.{PLATFORM}")
    assert json.loads(body)["backend"] == "app-backend"
    # Upper case and an explicit port in Host route the same.
    status, _, body = edge.request(f"MY-APP.{PLATFORM.upper()}:{edge.https_port}", "/x",
                                   server_name=APP_HOST)
    assert status == 200 and json.loads(body)["backend"] == "app-backend"


def test_curl_through_the_edge_verifies_the_certificate_and_reaches_the_backend(
        setup: Setup) -> None:
    edge = setup.edge
    for host, expected in ((APP_HOST, "app-backend"), (SHOP_HOST, "shop-backend")):
        out = subprocess.run(
            ["curl", "-sS", "--max-time", "10", "--resolve",
             f"{host}:{edge.https_port}:127.0.0.1", "--cacert", setup.cafile,
             "-H", "X-Curl: yes", f"https://{host}:{edge.https_port}/via-curl?q=1"],
            capture_output=True, timeout=15)
        assert out.returncode == 0, out.stderr.decode()
        answer = json.loads(out.stdout)
        assert answer["backend"] == expected
        assert answer["path"] == "/via-curl?q=1"
        # curl speaks HTTP/2 to the edge (field names lower-case), HTTP/1.1 reaches it.
        assert {k.lower(): v for k, v in answer["headers"].items()}["x-curl"] == "yes"


def test_unknown_host_gets_404_page_with_request_id_and_no_backend_address(
        setup: Setup) -> None:
    edge = setup.edge
    before = len(setup.app.seen) + len(setup.shop.seen)
    status, headers, body = edge.request("nobody.example.test", "/")
    assert status == 404
    request_id = headers["x-request-id"]
    assert len(request_id) == 32
    assert request_id.encode() in body
    for backend in (setup.app, setup.shop):
        assert str(backend.port).encode() not in body
    assert b"127.0.0.1" not in body
    assert len(setup.app.seen) + len(setup.shop.seen) == before


def test_backend_down_gives_502_page_without_its_address(setup: Setup) -> None:
    status, headers, body = setup.edge.request(f"down.{PLATFORM}", "/")
    assert status == 502
    assert headers["x-request-id"].encode() in body
    assert str(setup.dead_port).encode() not in body
    assert b"127.0.0.1" not in body


# -- headers -----------------------------------------------------------------------

def test_forwarding_headers_are_set_by_the_edge_and_client_values_replaced(
        setup: Setup) -> None:
    edge = setup.edge
    before = len(setup.app.seen)
    status, _, _ = edge.request(APP_HOST, "/fwd", headers={
        "X-Forwarded-For": "6.6.6.6", "X-Forwarded-Proto": "http",
        "X-Forwarded-Host": "evil.test", "X-Forwarded-Port": "1",
        "Forwarded": "for=6.6.6.6", "X-Real-IP": "6.6.6.6"})
    assert status == 200
    [seen] = new_requests(setup.app, before)
    names = [k.lower() for k, _ in seen.headers]
    for name in ("x-forwarded-for", "x-forwarded-proto", "x-forwarded-host",
                 "x-forwarded-port"):
        assert names.count(name) == 1, name
    assert seen.header("X-Forwarded-For") == "127.0.0.1"
    assert seen.header("X-Forwarded-Proto") == "https"
    assert seen.header("X-Forwarded-Host") == APP_HOST
    assert seen.header("X-Forwarded-Port") == str(edge.https_port)
    assert "forwarded" not in names and "x-real-ip" not in names


def test_hop_by_hop_headers_never_reach_the_backend(setup: Setup) -> None:
    before = len(setup.app.seen)
    status, _, _ = setup.edge.request(APP_HOST, "/hop", headers={
        "Connection": "keep-alive, X-Hop-Secret", "X-Hop-Secret": "drop me",
        "Keep-Alive": "timeout=5", "TE": "trailers", "Proxy-Connection": "keep-alive",
        "Proxy-Authorization": "Basic Zm9vOmJhcg==", "Trailer": "X-Checksum",
        "X-Kept": "yes"})
    assert status == 200
    [seen] = new_requests(setup.app, before)
    names = seen.header_names()
    for hop in ("x-hop-secret", "keep-alive", "te", "proxy-connection",
                "proxy-authorization", "trailer"):
        assert hop not in names, hop
    # The edge may state its own connection policy to the backend, never the client's.
    assert "x-hop-secret" not in (seen.header("Connection") or "").lower()
    assert seen.header("X-Kept") == "yes"


# -- bodies ------------------------------------------------------------------------

@pytest.mark.parametrize("size", [1, 64 * 1024, 5 * 1024 * 1024], ids=["1B", "64KiB", "5MiB"])
@pytest.mark.parametrize("method", ["POST", "PUT"])
def test_content_length_request_body_arrives_byte_exact_and_echo_returns_it(
        setup: Setup, size: int, method: str) -> None:
    body = os.urandom(size)
    digest = hashlib.sha256(body).hexdigest()
    before = len(setup.app.seen)
    status, _, echoed = setup.edge.request(APP_HOST, "/echo", method=method, body=body)
    assert status == 200
    [seen] = new_requests(setup.app, before)
    assert seen.header("Content-Length") == str(size)
    assert hashlib.sha256(seen.body).hexdigest() == digest
    assert len(echoed) == size and hashlib.sha256(echoed).hexdigest() == digest


def test_get_with_a_body_is_relayed(setup: Setup) -> None:
    before = len(setup.app.seen)
    status, _, body = setup.edge.request(APP_HOST, "/", method="GET", body=b"x" * 100)
    assert status == 200 and json.loads(body)["body_length"] == 100
    assert new_requests(setup.app, before)[0].body == b"x" * 100


def test_chunked_request_body_arrives_byte_exact(setup: Setup) -> None:
    parts = [os.urandom(n) for n in (1, 10, 4096, 300_000, 7)]
    wire = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n"
    before = len(setup.app.seen)
    with setup.edge.tls_connect(APP_HOST) as s:
        send_request(s, APP_HOST, "/upload", method="POST",
                     headers={"Transfer-Encoding": "chunked"})
        s.sendall(wire)
        status, _, body = read_response(s)
    assert status == 200
    [seen] = new_requests(setup.app, before)
    assert seen.body == b"".join(parts)
    assert json.loads(body)["body_sha256"] == hashlib.sha256(b"".join(parts)).hexdigest()


def test_chunked_response_is_relayed_intact(setup: Setup) -> None:
    status, headers, body = setup.edge.request(APP_HOST, "/chunked")
    assert status == 200
    assert body == b"".join(setup.app.chunks)
    assert headers.get("transfer-encoding") == "chunked"


# -- connection reuse --------------------------------------------------------------

def test_head_204_and_304_have_no_body_and_the_connection_stays_usable(
        setup: Setup) -> None:
    with setup.edge.tls_connect(APP_HOST) as s:
        f = s.makefile("rb")
        send_request(s, APP_HOST, "/", method="HEAD")
        status, headers, _ = read_response(f, head_only=True)
        assert status == 200 and int(headers["content-length"]) > 0
        for code in (204, 304):
            send_request(s, APP_HOST, f"/status/{code}")
            status, headers, _ = read_response(f)
            assert status == code
            assert "transfer-encoding" not in headers
        # Any stray body byte from above would be read here as a broken status line.
        send_request(s, APP_HOST, "/after")
        status, _, body = read_response(f)
        assert status == 200 and json.loads(body)["path"] == "/after"


def test_keepalive_serves_many_requests_on_one_connection_and_reuses_the_backend_one(
        setup: Setup) -> None:
    before = len(setup.app.seen)
    with setup.edge.tls_connect(APP_HOST) as s:
        f = s.makefile("rb")
        for i in range(6):
            send_request(s, APP_HOST, f"/ka/{i}")
            status, headers, body = read_response(f)
            assert status == 200 and json.loads(body)["path"] == f"/ka/{i}"
            assert headers.get("connection", "").lower() != "close"
    seen = new_requests(setup.app, before)
    assert [x.path for x in seen] == [f"/ka/{i}" for i in range(6)]
    assert len(setup.app.connections(seen)) == 1


def test_pipelined_requests_are_answered_in_order(setup: Setup) -> None:
    with setup.edge.tls_connect(APP_HOST) as s:
        f = s.makefile("rb")
        wire = b""
        for i in range(5):
            body = b"b" * (i * 1000)
            wire += (f"POST /pipe/{i} HTTP/1.1\r\nHost: {APP_HOST}\r\n"
                     f"Content-Length: {len(body)}\r\n\r\n").encode() + body
        wire += f"GET /status/204 HTTP/1.1\r\nHost: {APP_HOST}\r\n\r\n".encode()
        wire += f"GET /last HTTP/1.1\r\nHost: {APP_HOST}\r\n\r\n".encode()
        s.sendall(wire)
        for i in range(5):
            status, _, body = read_response(f)
            answer = json.loads(body)
            assert (status, answer["path"], answer["body_length"]) == (200, f"/pipe/{i}",
                                                                       i * 1000)
        assert read_response(f)[0] == 204
        status, _, body = read_response(f)
        assert json.loads(body)["path"] == "/last"


# -- malformed input ---------------------------------------------------------------

@pytest.mark.parametrize("line", [b"GET /a b c HTTP/1.1", b"GARBAGE", b"GET / HTTP/9.x"])
def test_malformed_request_line_gets_400_and_the_backend_receives_nothing(
        setup: Setup, line: bytes) -> None:
    before = len(setup.app.seen)
    with setup.edge.tls_connect(APP_HOST) as s:
        s.sendall(line + f"\r\nHost: {APP_HOST}\r\n\r\n".encode())
        status, headers, _ = read_response(s)
    assert status == 400
    assert headers["connection"] == "close"
    assert len(setup.app.seen) == before


def test_garbage_after_a_pipelined_request_is_answered_after_it_in_order(
        setup: Setup) -> None:
    before = len(setup.app.seen)
    with setup.edge.tls_connect(APP_HOST) as s:
        f = s.makefile("rb")
        s.sendall(f"GET /slow?0.3 HTTP/1.1\r\nHost: {APP_HOST}\r\n\r\n".encode()
                  + b"GARBAGE\r\n\r\n")
        status, _, body = read_response(f)
        assert status == 200 and json.loads(body)["path"] == "/slow?0.3"
        status, headers, _ = read_response(f)
        assert status == 400 and headers["connection"] == "close"
        assert f.read() == b""  # then the edge closes
    assert [x.path for x in new_requests(setup.app, before)] == ["/slow?0.3"]


def test_non_websocket_upgrade_is_refused_with_501_and_never_relayed(setup: Setup) -> None:
    before = len(setup.app.seen)
    with setup.edge.tls_connect(APP_HOST) as s:
        send_request(s, APP_HOST, "/ws", headers={"Connection": "Upgrade",
                                                   "Upgrade": "h2c"})
        status, headers, _ = read_response(s)
    assert status == 501 and headers["connection"] == "close"
    # A request after it, on the same worker, is the only one the backend sees.
    assert setup.edge.request(APP_HOST, "/after-upgrade")[0] == 200
    assert [x.path for x in new_requests(setup.app, before)] == ["/after-upgrade"]


# -- plain HTTP listener -----------------------------------------------------------

def plain_request(edge: Edge, raw: bytes) -> tuple[int, dict[str, str], bytes]:
    with socket.create_connection(("127.0.0.1", edge.http_port), timeout=5) as s:
        s.sendall(raw)
        return read_response(s)


def test_plain_http_unknown_challenge_token_is_404(setup: Setup) -> None:
    before = len(setup.app.seen)
    status, _, _ = plain_request(
        setup.edge, f"GET /.well-known/acme-challenge/nope HTTP/1.1\r\nHost: {APP_HOST}\r\n"
                    "Connection: close\r\n\r\n".encode())
    assert status == 404
    assert len(setup.app.seen) == before


@pytest.mark.parametrize("target", ["/", "/some/path?x=1&y=%20z", "/.well-known/other"])
def test_plain_http_redirects_to_https_keeping_path_query_and_port(
        setup: Setup, target: str) -> None:
    edge = setup.edge
    status, headers, _ = plain_request(
        edge, f"GET {target} HTTP/1.1\r\nHost: {SHOP_HOST}:{edge.http_port}\r\n"
              "Connection: close\r\n\r\n".encode())
    assert status == 301
    assert headers["location"] == f"https://{SHOP_HOST}:{edge.https_port}{target}"


def test_plain_http_keeps_the_connection_for_a_second_request(setup: Setup) -> None:
    edge = setup.edge
    with socket.create_connection(("127.0.0.1", edge.http_port), timeout=5) as s:
        f = s.makefile("rb")
        for path in ("/one", "/two"):
            s.sendall(f"GET {path} HTTP/1.1\r\nHost: {APP_HOST}\r\n\r\n".encode())
            status, headers, _ = read_response(f)
            assert status == 301
            assert headers["location"] == f"https://{APP_HOST}:{edge.https_port}{path}"


def test_plain_http_malformed_request_gets_400(setup: Setup) -> None:
    status, _, _ = plain_request(setup.edge, b"NOT HTTP AT ALL\r\n\r\n")
    assert status == 400
