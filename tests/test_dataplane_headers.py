"""Header policy both ways on the real `tlsedge run`, on a fresh backend connection and
on a pooled one (the callback fast path): hop-by-hop headers and the names a
Connection header lists never cross the proxy, a backend's HSTS never reaches the
client, repeated headers stay repeated, and a client cannot forge X-Forwarded-*.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from tests.certgen import CA
from tests.conftest import PLATFORM
from tests.support.backend import Backend
from tests.support.edge import Edge
from tests.support.rawserver import RawServer

APP = f"my-app.{PLATFORM}"
RAW = f"raw.{PLATFORM}"


class KeepAliveCanned(RawServer):
    """Answers every request head with fixed bytes, keeping the connection open."""

    def __init__(self) -> None:
        self.answer = b""
        super().__init__()

    def serve(self, conn: socket.socket) -> None:
        with conn:
            data = b""
            while True:
                while b"\r\n\r\n" not in data:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    data += chunk
                data = data.split(b"\r\n\r\n", 1)[1]
                conn.sendall(self.answer)


@pytest.fixture(scope="module")
def setup(ca: CA, tmp_path_factory: pytest.TempPathFactory
          ) -> Iterator[tuple[Edge, Backend, KeepAliveCanned]]:
    workdir = tmp_path_factory.mktemp("edge-headers")
    pcert, pkey = ca.issue([f"*.{PLATFORM}"]).write(workdir, "platform")
    raw = KeepAliveCanned()
    with Backend("app") as app:
        config = {
            "platform_domain": PLATFORM,
            "workers": 1,
            "tls": {"platform_certificate": {"cert": pcert, "key": pkey}},
            "store": {"path": "store"},
            "apps": {"my-app": {"backends": [app.address]},
                     "raw": {"backends": [f"127.0.0.1:{raw.port}"]}},
            "limits": {"drain_timeout": 2},
        }
        with Edge(workdir, config) as edge:
            yield edge, app, raw
    raw.sock.close()


def read_head_and_body(f: socket.SocketIO | object) -> tuple[list[tuple[str, str]], bytes]:
    """The response head as (lower-case name, value) lines in order, and its body
    (Content-Length framed: the canned answers always carry one)."""
    reader = f
    assert hasattr(reader, "readline") and hasattr(reader, "read")
    status = reader.readline()
    assert status.startswith(b"HTTP/1.1 200"), status
    lines: list[tuple[str, str]] = []
    while (line := reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        lines.append((name.strip().lower(), value.strip()))
    length = int(dict(lines)["content-length"])
    return lines, reader.read(length)


CANNED = (b"HTTP/1.1 200 OK\r\n"
          b"Server: canned\r\n"
          b"Connection: keep-alive, X-Internal\r\n"
          b"Keep-Alive: timeout=5\r\n"
          b"X-Internal: secret\r\n"
          b"Strict-Transport-Security: max-age=1\r\n"
          b"Set-Cookie: a=1\r\n"
          b"Set-Cookie: b=2\r\n"
          b"Content-Length: 5\r\n"
          b"\r\nhello")


def test_response_headers_keep_end_to_end_ones_only_on_new_and_pooled_connections(
        setup: tuple[Edge, Backend, KeepAliveCanned]) -> None:
    edge, _, raw = setup
    raw.answer = CANNED
    with edge.tls_connect(RAW) as s:
        f = s.makefile("rb")
        for _ in range(3):  # the first opens the backend connection, the rest reuse it
            s.sendall(f"GET / HTTP/1.1\r\nHost: {RAW}\r\n\r\n".encode())
            lines, body = read_head_and_body(f)
            assert body == b"hello"
            assert lines == [("server", "canned"), ("set-cookie", "a=1"),
                             ("set-cookie", "b=2"), ("content-length", "5")]


def test_connection_listing_content_length_does_not_unframe_the_response(
        setup: tuple[Edge, Backend, KeepAliveCanned]) -> None:
    edge, _, raw = setup
    raw.answer = (b"HTTP/1.1 200 OK\r\nConnection: Content-Length, X-A\r\nX-A: 1\r\n"
                  b"Content-Length: 5\r\n\r\nhello")
    with edge.tls_connect(RAW) as s:
        f = s.makefile("rb")
        for _ in range(2):
            s.sendall(f"GET / HTTP/1.1\r\nHost: {RAW}\r\n\r\n".encode())
            lines, body = read_head_and_body(f)
            assert body == b"hello" and lines == [("content-length", "5")]


def test_request_hop_by_hop_listed_and_forged_forwarding_headers_are_dropped(
        setup: tuple[Edge, Backend, KeepAliveCanned]) -> None:
    edge, app, _ = setup
    before = len(app.seen)
    plain = f"GET /p HTTP/1.1\r\nHost: {APP}\r\nAccept: */*\r\nX-Mine: 1\r\n\r\n"
    forged = (f"GET /f HTTP/1.1\r\nHost: {APP}\r\nConnection: X-Foo\r\nX-Foo: 1\r\n"
              "Keep-Alive: 5\r\nX-Forwarded-For: 6.6.6.6\r\nX-Request-Start: t=1\r\n"
              "X-Request-Id: forged-id-1234\r\nAccept: */*\r\n\r\n")
    with edge.tls_connect(APP) as s:
        f = s.makefile("rb")
        for wire in (plain, forged, plain, forged):
            s.sendall(wire.encode())
            head = f.readline()
            assert head.startswith(b"HTTP/1.1 200"), head
            length = 0
            while (line := f.readline()) != b"\r\n":
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            f.read(length)
    seen = app.seen[before:]
    assert len(seen) == 4
    for request in seen:
        names = [name.lower() for name, _ in request.headers]
        assert names[:2] == ["host", "accept"]
        assert request.header("X-Forwarded-For") == "127.0.0.1"
        assert request.header("X-Forwarded-Proto") == "https"
        assert request.header("X-Forwarded-Host") == APP
        request_id = request.header("X-Request-Id")
        assert request_id is not None and request_id != "forged-id-1234"
        assert (request.header("X-Request-Start") or "").startswith("t=")
        assert request.header("X-Request-Start") != "t=1"
        assert names.count("x-forwarded-for") == 1 and names.count("x-request-start") == 1
        assert not {"connection", "x-foo", "keep-alive"} & set(names)
    assert [r.header("X-Mine") for r in seen] == ["1", None, "1", None]
