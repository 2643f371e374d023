"""Response trailers on the real `tlsedge run`: a backend's chunked trailer section
reaches an HTTP/2 client that sent `te: trailers` as a trailing HEADERS frame with
END_STREAM (and an HTTP/1.1 client in the last chunk), bounded like a request head.

The backend is a raw socket server (the recording backend never sends trailers).
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.certgen import CA
from tests.support.backend import Backend, pattern
from tests.support.edge import Edge
from tests.support.h2client import H2Client
from tests.support.rawserver import RawServer
from tests.test_http2 import APP, edge_config

TRAILERS = (b"x-checksum: 5eb63bbbe01eeed093cb22bb8f5acdc3\r\n"
            b"grpc-status: 0\r\n"
            # Not allowed in a trailer section (RFC 9110 6.5.1): never relayed.
            b"Set-Cookie: a=b\r\nHost: elsewhere.example\r\nKeep-Alive: 5\r\n")
BODY = b"hello world" * 3000  # several chunks, several DATA frames
BIG = 12 * 1024 * 1024  # `/big`: more than the kernel buffers (4 MiB), spooled by the edge


class TrailerBackend(RawServer):
    """HTTP/1.1 keep-alive server: every response is chunked and ends with a trailer
    section (`/many`: 150 fields, over the edge's 100-field bound; `/big`: a 12 MiB
    body)."""

    def __init__(self) -> None:
        self.requests = 0
        self.sent = 0  # responses written whole
        super().__init__()

    def serve(self, conn: socket.socket) -> None:
        buf = b""
        with conn:
            while True:
                while b"\r\n\r\n" not in buf:
                    data = conn.recv(65536)
                    if not data:
                        return
                    buf += data
                head, _, buf = buf.partition(b"\r\n\r\n")
                self.requests += 1
                path = head.split(b" ")[1]
                trailers = (b"".join(b"x-t%d: v\r\n" % i for i in range(150))
                            if path == b"/many" else TRAILERS)
                body = pattern(BIG) if path == b"/big" else BODY
                chunks = b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + 10000]), body[i:i + 10000])
                                  for i in range(0, len(body), 10000))
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
                             b"Trailer: x-checksum, grpc-status\r\n"
                             b"Transfer-Encoding: chunked\r\n\r\n" + chunks
                             + b"0\r\n" + trailers + b"\r\n")
                self.sent += 1

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(scope="module")
def backend() -> Iterator[TrailerBackend]:
    b = TrailerBackend()
    yield b
    b.close()


@pytest.fixture(scope="module")
def edge(ca: CA, tmp_path_factory: pytest.TempPathFactory,
         backend: TrailerBackend) -> Iterator[Edge]:
    workdir: Path = tmp_path_factory.mktemp("edge-trailers")
    with Backend("other") as other, Backend("shop") as shop, \
            Edge(workdir, edge_config(workdir, ca, backend, other, shop)) as e:  # type: ignore[arg-type]
        yield e


def _get(edge: Edge, path: str, te: bool) -> Any:
    with H2Client(edge.https_port, APP) as c:
        assert c.alpn == "h2"
        r = c.get(APP, path, headers=[("te", "trailers")] if te else [], timeout=20)
        assert c.goaway is None
        return r


def test_chunked_trailers_reach_an_h2_client_that_sent_te_trailers(edge: Edge) -> None:
    r = _get(edge, "/t", te=True)
    assert r.status == 200 and r.ended and bytes(r.body) == BODY
    assert r.trailers == [(b"x-checksum", b"5eb63bbbe01eeed093cb22bb8f5acdc3"),
                          (b"grpc-status", b"0")]
    assert r.header(b"trailer") is None  # hop-by-hop: the head never announces them


def test_trailers_are_dropped_for_an_h2_client_without_te_trailers(edge: Edge) -> None:
    r = _get(edge, "/t", te=False)
    assert r.status == 200 and r.ended and bytes(r.body) == BODY
    assert r.trailers is None


def test_trailers_follow_a_body_the_edge_spooled_for_a_stalled_client(
        edge: Edge, backend: TrailerBackend) -> None:
    with H2Client(edge.https_port, APP, window=65_535) as c:
        c.auto_ack = False
        sid = c.request(APP, "/big", headers=[("te", "trailers")])
        before = backend.sent
        # The client takes one window's worth; the edge reads the rest into its spool.
        assert c.pump(lambda: len(c.responses[sid].body) >= 65_535, timeout=20)
        deadline = time.monotonic() + 30
        while backend.sent == before and time.monotonic() < deadline:
            c.pump(lambda: False, timeout=0.2)
        assert backend.sent == before + 1
        assert c.responses[sid].trailers is None and not c.responses[sid].ended
        c.auto_ack = True
        c.conn.increment_flow_control_window(64 * BIG, sid)
        c.conn.increment_flow_control_window(64 * BIG)
        c.flush()
        assert c.pump(lambda: c.responses[sid].finished, timeout=60)
        r = c.responses[sid]
        assert r.ended and bytes(r.body) == pattern(BIG)
        assert r.trailers == [(b"x-checksum", b"5eb63bbbe01eeed093cb22bb8f5acdc3"),
                              (b"grpc-status", b"0")]


def test_a_trailer_section_over_the_head_limits_is_dropped(edge: Edge) -> None:
    before = edge.metric("tlsedge_limits_hit_total", limit="response_trailers")
    r = _get(edge, "/many", te=True)
    assert r.status == 200 and r.ended and bytes(r.body) == BODY
    assert r.trailers is None
    assert edge.metric("tlsedge_limits_hit_total", limit="response_trailers") >= before + 1
    assert _get(edge, "/after", te=True).trailers is not None  # the connection was fine


def test_chunked_trailers_reach_an_http11_client_in_the_last_chunk(edge: Edge) -> None:
    with contextlib.closing(_tls_http11().wrap_socket(
            socket.create_connection(("127.0.0.1", edge.https_port), timeout=20),
            server_hostname=APP)) as s:
        s.sendall(f"GET /t HTTP/1.1\r\nHost: {APP}\r\nTE: trailers\r\n\r\n".encode())
        body, trailers = _read_chunked(s)
    assert body == BODY
    assert trailers == (b"x-checksum: 5eb63bbbe01eeed093cb22bb8f5acdc3\r\n"
                        b"grpc-status: 0\r\n")


def test_trailers_follow_a_body_the_edge_spooled_for_a_slow_http11_client(
        edge: Edge, backend: TrailerBackend) -> None:
    raw = socket.socket()
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 * 1024)  # a small window
    raw.settimeout(30)
    raw.connect(("127.0.0.1", edge.https_port))
    with contextlib.closing(_tls_http11().wrap_socket(raw, server_hostname=APP)) as s:
        before = backend.sent
        s.sendall(f"GET /big HTTP/1.1\r\nHost: {APP}\r\nTE: trailers\r\n\r\n".encode())
        # Reading nothing: the edge reads the backend's response into its spool.
        deadline = time.monotonic() + 30
        while backend.sent == before and time.monotonic() < deadline:
            time.sleep(0.05)
        assert backend.sent == before + 1
        body, trailers = _read_chunked(s)
    assert body == pattern(BIG)
    assert trailers == (b"x-checksum: 5eb63bbbe01eeed093cb22bb8f5acdc3\r\n"
                        b"grpc-status: 0\r\n")


def _tls_http11() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


def _read_chunked(s: ssl.SSLSocket) -> tuple[bytes, bytes]:
    """A chunked response's body and trailer section, read to its end."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += s.recv(65536)
    head, _, rest = data.partition(b"\r\n\r\n")
    assert b"transfer-encoding: chunked" in head.lower()
    buf = bytearray(rest)
    body = bytearray()

    def need(n: int) -> None:
        while len(buf) < n:
            more = s.recv(1 << 20)
            assert more, "the response ended early"
            buf.extend(more)

    while True:
        while b"\r\n" not in buf:
            need(len(buf) + 1)
        line = bytes(buf).partition(b"\r\n")[0]
        size = int(line, 16)
        del buf[:len(line) + 2]
        if not size:  # the trailer section, up to the empty line
            while not buf.startswith(b"\r\n") and b"\r\n\r\n" not in buf:
                need(len(buf) + 1)
            end = 0 if buf.startswith(b"\r\n") else buf.find(b"\r\n\r\n") + 2
            return bytes(body), bytes(buf[:end])
        need(size + 2)
        body += buf[:size]
        del buf[:size + 2]
