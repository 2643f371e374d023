"""Malformed requests get a 4xx and never reach a backend; malformed backend responses
give 502 and never reach the client. Raw bytes on real TLS sockets to `tlsedge run`.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from tests.certgen import CA
from tests.conftest import PLATFORM
from tests.support.backend import Backend
from tests.support.edge import Edge, read_response
from tests.support.rawserver import RawServer

APP = f"my-app.{PLATFORM}"
RAW = f"raw.{PLATFORM}"


class CannedBackend(RawServer):
    """Answers every connection with fixed bytes (after reading the request head)."""

    def __init__(self) -> None:
        self.answer = b""
        super().__init__()

    def serve(self, conn: socket.socket) -> None:
        with conn:
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = conn.recv(65536)
                if not chunk:
                    break
                data += chunk
            conn.sendall(self.answer)


class Setup:
    def __init__(self, edge: Edge, app: Backend, raw: CannedBackend) -> None:
        self.edge, self.app, self.raw = edge, app, raw


@pytest.fixture(scope="module")
def setup(ca: CA, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    workdir = tmp_path_factory.mktemp("edge-malformed")
    pcert, pkey = ca.issue([f"*.{PLATFORM}"]).write(workdir, "platform")
    raw = CannedBackend()
    with Backend("app") as app:
        config = {
            "platform_domain": PLATFORM,
            "workers": 1,
            "tls": {"platform_certificate": {"cert": pcert, "key": pkey}},
            "store": {"path": "store"},
            "apps": {"my-app": {"backends": [app.address]},
                     "raw": {"backends": [f"127.0.0.1:{raw.port}"]}},
            "limits": {"drain_timeout": 2, "max_body_bytes": 100_000,
                       "max_head_bytes": 8192, "max_headers": 20},
        }
        with Edge(workdir, config) as edge:
            yield Setup(edge, app, raw)
    raw.sock.close()


def exchange(edge: Edge, wire: bytes) -> tuple[int, dict[str, str], bytes]:
    with edge.tls_connect(APP) as s:
        s.sendall(wire)
        return read_response(s)


H = f"Host: {APP}\r\n"
CASES = {
    "cl-and-te": f"POST / HTTP/1.1\r\n{H}Content-Length: 3\r\nTransfer-Encoding: chunked"
                 "\r\n\r\n0\r\n\r\n",
    "duplicate-cl": f"POST / HTTP/1.1\r\n{H}Content-Length: 3\r\nContent-Length: 3\r\n\r\nabc",
    "list-cl": f"POST / HTTP/1.1\r\n{H}Content-Length: 3, 3\r\n\r\nabc",
    "cl-plus": f"POST / HTTP/1.1\r\n{H}Content-Length: +3\r\n\r\nabc",
    "cl-minus": f"POST / HTTP/1.1\r\n{H}Content-Length: -3\r\n\r\nabc",
    "cl-hex": f"POST / HTTP/1.1\r\n{H}Content-Length: 0x3\r\n\r\nabc",
    "cl-inner-space": f"POST / HTTP/1.1\r\n{H}Content-Length: 1 2\r\n\r\nabc",
    "cl-overflow": f"POST / HTTP/1.1\r\n{H}Content-Length: 99999999999999999999999\r\n\r\n",
    "te-gzip": f"POST / HTTP/1.1\r\n{H}Transfer-Encoding: gzip\r\n\r\nabc",
    "te-gzip-chunked": f"POST / HTTP/1.1\r\n{H}Transfer-Encoding: gzip, chunked\r\n\r\n"
                       "0\r\n\r\n",
    "te-on-http10": f"POST / HTTP/1.0\r\n{H}Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "space-before-colon": f"GET / HTTP/1.1\r\n{H}X-A : b\r\n\r\n",
    "obs-fold": f"GET / HTTP/1.1\r\n{H}X-A: b\r\n c\r\n\r\n",
    "bare-cr": f"GET / HTTP/1.1\r\n{H}X-A: b\rc\r\n\r\n",
    "nul": f"GET / HTTP/1.1\r\n{H}X-A: b\x00c\r\n\r\n",
    "control-byte": f"GET / HTTP/1.1\r\n{H}X-A: b\x01c\r\n\r\n",
    "bare-lf": f"GET / HTTP/1.1\n{H}\n",
    "bare-lf-header": f"GET / HTTP/1.1\r\nHost: {APP}\nX-A: b\r\n\r\n",
    "bad-chunk-size": f"POST / HTTP/1.1\r\n{H}Transfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n",
    "missing-host": "GET / HTTP/1.1\r\nX-A: b\r\n\r\n",
    "two-hosts": f"GET / HTTP/1.1\r\n{H}{H}\r\n",
    "host-with-slash": f"GET / HTTP/1.1\r\nHost: {APP}/x\r\n\r\n",
    "host-with-at": f"GET / HTTP/1.1\r\nHost: user@{APP}\r\n\r\n",
    "underscore-name": f"GET / HTTP/1.1\r\n{H}X_Forwarded_For: 1.2.3.4\r\n\r\n",
    "absolute-other-authority": f"GET http://evil.test/ HTTP/1.1\r\n{H}\r\n",
    "http-0.9": f"GET / HTTP/0.9\r\n{H}\r\n",
    "http-2.0": f"GET / HTTP/2.0\r\n{H}\r\n",
    "http-1.2": f"GET / HTTP/1.2\r\n{H}\r\n",
    "relative-target": f"GET foo HTTP/1.1\r\n{H}\r\n",
}


@pytest.mark.parametrize("name", list(CASES))
def test_malformed_request_gets_400_and_the_backend_receives_nothing(
        setup: Setup, name: str) -> None:
    before = len(setup.app.seen)
    status, headers, body = exchange(setup.edge, CASES[name].encode("latin-1"))
    assert status == 400, (name, body)
    assert headers["connection"] == "close"
    assert headers["x-request-id"].encode() in body
    assert len(setup.app.seen) == before


def test_absolute_form_with_the_same_authority_is_relayed_in_origin_form(setup: Setup) -> None:
    before = len(setup.app.seen)
    status, _, _ = exchange(setup.edge, f"GET https://{APP}/abs?q=1 HTTP/1.1\r\n{H}"
                                        "Connection: close\r\n\r\n".encode())
    assert status == 200
    [seen] = setup.app.seen[before:]
    assert seen.path == "/abs?q=1"


@pytest.mark.parametrize(("wire", "status"), [
    (f"POST / HTTP/1.1\r\n{H}Content-Length: 100001\r\n\r\n", 413),
    (f"GET / HTTP/1.1\r\n{H}X-Big: {'a' * 9000}\r\n\r\n", 431),
    (f"GET / HTTP/1.1\r\n{H}" + "".join(f"X-H{i}: v\r\n" for i in range(25)) + "\r\n", 431),
], ids=["body-over-max", "head-over-max", "too-many-headers"])
def test_limit_breaking_head_gets_its_4xx_and_is_not_forwarded(
        setup: Setup, wire: str, status: int) -> None:
    before = len(setup.app.seen)
    assert exchange(setup.edge, wire.encode())[0] == status
    assert len(setup.app.seen) == before


def test_one_endless_header_is_cut_with_431_before_it_completes(setup: Setup) -> None:
    with setup.edge.tls_connect(APP) as s:
        s.sendall(f"GET / HTTP/1.1\r\n{H}X-Endless: ".encode())
        for _ in range(5):
            s.sendall(b"a" * 4096)
        status, _, _ = read_response(s)
    assert status == 431


def test_chunked_body_over_the_limit_is_413_and_the_request_never_completes_upstream(
        setup: Setup) -> None:
    before = len(setup.app.seen)
    with setup.edge.tls_connect(APP) as s:
        s.sendall(f"POST /echo HTTP/1.1\r\n{H}Transfer-Encoding: chunked\r\n\r\n".encode())
        piece = b"x" * 30_000
        for _ in range(4):
            s.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
        status, _, _ = read_response(s)
    assert status == 413
    # The backend may have seen the head but never a complete request.
    assert len(setup.app.seen) == before


def test_trailers_of_a_chunked_request_are_not_forwarded(setup: Setup) -> None:
    before = len(setup.app.seen)
    status, _, _ = exchange(setup.edge, (
        f"POST / HTTP/1.1\r\n{H}Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        "3\r\nabc\r\n0\r\nX-Trailer: sneaky\r\n\r\n").encode())
    assert status == 200
    [seen] = setup.app.seen[before:]
    assert seen.body == b"abc" and seen.header("X-Trailer") is None


BAD_RESPONSES = {
    "cl-and-te": b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
    "duplicate-cl": b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
    "te-gzip": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nabc",
    "obs-fold": b"HTTP/1.1 200 OK\r\nX-A: b\r\n c\r\nContent-Length: 0\r\n\r\n",
    "nul": b"HTTP/1.1 200 OK\r\nX-A: b\x00\r\nContent-Length: 0\r\n\r\n",
    "bare-lf": b"HTTP/1.1 200 OK\nContent-Length: 0\n\n",
    "space-before-colon": b"HTTP/1.1 200 OK\r\nContent-Length : 0\r\n\r\n",
    "underscore": b"HTTP/1.1 200 OK\r\nX_A: b\r\nContent-Length: 0\r\n\r\n",
    "http-2.0": b"HTTP/2.0 200 OK\r\nContent-Length: 0\r\n\r\n",
    "status-999": b"HTTP/1.1 999 Odd\r\nContent-Length: 0\r\n\r\n",
    "reason-control": b"HTTP/1.1 200 O\x01K\r\nContent-Length: 0\r\n\r\n",
    "unasked-101": b"HTTP/1.1 101 Switching\r\nUpgrade: websocket\r\nConnection: upgrade"
                   b"\r\n\r\n",
    "garbage": b"NOT HTTP\r\n\r\n",
}


@pytest.mark.parametrize("name", list(BAD_RESPONSES))
def test_malformed_backend_response_gives_502_and_nothing_of_it(setup: Setup, name: str) -> None:
    setup.raw.answer = BAD_RESPONSES[name]
    with setup.edge.tls_connect(RAW) as s:
        s.sendall(f"GET / HTTP/1.1\r\nHost: {RAW}\r\n\r\n".encode())
        status, headers, body = read_response(s)
    assert status == 502, name
    assert "x-a" not in headers and b"abc" not in body


def test_backend_body_breaking_framing_after_the_head_cuts_the_client_connection(
        setup: Setup) -> None:
    # The head is already relayed: the only honest signal left is to cut, so the
    # client never reads a body it could take for complete.
    setup.raw.answer = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                        b"3\r\nabc\r\nzz\r\n")
    with setup.edge.tls_connect(RAW) as s:
        s.sendall(f"GET / HTTP/1.1\r\nHost: {RAW}\r\n\r\n".encode())
        with pytest.raises((ValueError, ConnectionError, OSError)):
            read_response(s)
