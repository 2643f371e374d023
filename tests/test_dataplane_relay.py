"""Relay completeness and client limits on the real `tlsedge run`: byte-exact bodies
both ways (fixed and chunked, up to 50 MiB), 100-continue, WebSocket, server-sent
events, slow clients cut at their timeouts while others are served, idle connections,
upstream timeouts.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import resource
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.certgen import CA
from tests.conftest import PLATFORM
from tests.support.backend import Backend, pattern, ws_frame, ws_read
from tests.support.edge import Edge, read_response, send_request

APP = f"my-app.{PLATFORM}"
MiB = 1024 * 1024


def config_for(workdir: Path, ca: CA, backend: Backend, **limits: float) -> dict[str, object]:
    pcert, pkey = ca.issue([f"*.{PLATFORM}"]).write(workdir, "platform")
    return {
        "platform_domain": PLATFORM,
        "workers": 1,
        "tls": {"platform_certificate": {"cert": pcert, "key": pkey}},
        "store": {"path": "store"},
        "apps": {"my-app": {"backends": [backend.address]}},
        "limits": {"drain_timeout": 2, **limits},
    }


@pytest.fixture(scope="module")
def app() -> Iterator[Backend]:
    with Backend("app") as b:
        yield b


@pytest.fixture(scope="module")
def edge(ca: CA, app: Backend, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Edge]:
    workdir = tmp_path_factory.mktemp("edge-relay")
    config = config_for(workdir, ca, app, request_head_timeout=1.0, request_body_timeout=1.0,
                        keepalive_timeout=1.5, upstream_first_byte_timeout=2.5,
                        max_body_bytes=60 * MiB)
    with Edge(workdir, config) as e:
        yield e


def chunked(data: bytes, piece: int = 100_000) -> bytes:
    out = b"".join(b"%x\r\n%s\r\n" % (len(data[i:i + piece]), data[i:i + piece])
                   for i in range(0, len(data), piece))
    return out + b"0\r\n\r\n"


SIZES = [1, 64 * 1024, 50 * MiB]
SIZE_IDS = ["1B", "64KiB", "50MiB"]


@pytest.mark.parametrize("size", SIZES, ids=SIZE_IDS)
@pytest.mark.parametrize("framing", ["fixed", "chunked"])
def test_upload_arrives_and_echoes_back_byte_exact(edge: Edge, app: Backend, size: int,
                                                   framing: str) -> None:
    body = pattern(size)
    before = len(app.seen)
    with edge.tls_connect(APP, timeout=30) as s:
        if framing == "fixed":
            send_request(s, APP, "/echo", method="POST", body=body)
        else:
            send_request(s, APP, "/echo", method="POST",
                         headers={"Transfer-Encoding": "chunked"})
            s.sendall(chunked(body))
        status, _, echoed = read_response(s)
    assert status == 200
    [seen] = app.seen[before:]
    assert hashlib.sha256(seen.body).digest() == hashlib.sha256(body).digest()
    assert len(echoed) == size and echoed == body


@pytest.mark.parametrize("size", SIZES, ids=SIZE_IDS)
@pytest.mark.parametrize("framing", ["bytes", "bytes-chunked"])
def test_download_arrives_byte_exact(edge: Edge, size: int, framing: str) -> None:
    with edge.tls_connect(APP, timeout=30) as s:
        f = s.makefile("rb")
        send_request(s, APP, f"/{framing}/{size}")
        status, headers, body = read_response(f)
        # The connection stays usable: the body ended exactly where it should.
        send_request(s, APP, "/after")
        assert read_response(f)[0] == 200
    assert status == 200
    assert len(body) == size and body == pattern(size)
    if framing == "bytes":
        assert headers["content-length"] == str(size)
    else:
        assert headers["transfer-encoding"] == "chunked"


def test_expect_100_continue_gets_the_interim_answer_before_the_body(edge: Edge,
                                                                    app: Backend) -> None:
    body = b"after the 100"
    with edge.tls_connect(APP) as s:
        f = s.makefile("rb")
        send_request(s, APP, "/echo", method="POST",
                     headers={"Expect": "100-continue", "Content-Length": str(len(body))})
        assert f.readline().startswith(b"HTTP/1.1 100 ")
        assert f.readline() == b"\r\n"
        s.sendall(body)
        status, _, echoed = read_response(f)
    assert status == 200 and echoed == body


def ws_connect(edge: Edge) -> ssl.SSLSocket:
    s = edge.tls_connect(APP)
    key = "dGhlIHNhbXBsZSBub25jZQ=="
    send_request(s, APP, "/ws", headers={
        "Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Version": "13",
        "Sec-WebSocket-Key": key})
    f = s.makefile("rb")
    assert f.readline().split()[1] == b"101"
    headers = {}
    while (line := f.readline()) != b"\r\n":
        name, _, value = line.decode().partition(":")
        headers[name.strip().lower()] = value.strip()
    assert headers["upgrade"].lower() == "websocket"
    assert headers["sec-websocket-accept"] == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
    s.ws_file = f  # type: ignore[attr-defined]
    return s


def test_websocket_echo_through_the_edge_for_1000_messages(edge: Edge, app: Backend) -> None:
    s = ws_connect(edge)
    f = s.ws_file  # type: ignore[attr-defined]
    with s:
        for i in range(1000):
            message = f"message {i} ".encode() * (1 + i % 50)
            s.sendall(ws_frame(message, mask=os.urandom(4)))
            opcode, data = ws_read(f.read)
            assert (opcode, data) == (1, message)
        big = os.urandom(300_000)
        s.sendall(ws_frame(big, opcode=2, mask=os.urandom(4)))
        assert ws_read(f.read) == (2, big)
        s.sendall(ws_frame(b"", opcode=8, mask=os.urandom(4)))
        assert ws_read(f.read)[0] == 8
        assert f.read() == b""  # the backend closed; the edge closed the client side
    assert edge.request(APP, "/after-ws")[0] == 200


def test_server_sent_events_arrive_one_by_one(edge: Edge) -> None:
    with edge.tls_connect(APP) as s:
        f = s.makefile("rb")
        send_request(s, APP, "/sse?5")
        assert f.readline().split()[1] == b"200"
        while f.readline() != b"\r\n":
            pass
        arrivals = []
        while len(arrivals) < 5:
            size = int(f.readline(), 16)
            data = f.read(size)
            f.readline()
            assert data.startswith(b"data: event ")
            arrivals.append(time.monotonic())
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    # The backend writes one event every 100 ms: buffering would bunch them up.
    assert all(g > 0.05 for g in gaps), gaps


def test_slow_headers_are_cut_with_408_while_others_are_served(edge: Edge) -> None:
    with edge.tls_connect(APP) as slow:
        slow.sendall(f"GET / HTTP/1.1\r\nHost: {APP}\r\n".encode())
        started = time.monotonic()
        for _ in range(3):
            time.sleep(0.2)
            assert edge.request(APP, "/meanwhile")[0] == 200
            slow.sendall(b"X-Drip: 1\r\n")
        status, headers, _ = read_response(slow)
        elapsed = time.monotonic() - started
    assert status == 408 and headers["connection"] == "close"
    assert 0.9 < elapsed < 3.0
    assert edge.metric("tlsedge_limits_hit_total", limit="request_head_timeout") >= 1


def test_slow_body_is_cut_with_408(edge: Edge, app: Backend) -> None:
    with edge.tls_connect(APP) as slow:
        send_request(slow, APP, "/echo", method="POST", headers={"Content-Length": "100"})
        slow.sendall(b"x" * 10)
        status, _, _ = read_response(slow)
    assert status == 408
    assert edge.metric("tlsedge_limits_hit_total", limit="request_body_timeout") >= 1


def test_idle_keepalive_connection_is_closed_after_the_timeout(edge: Edge) -> None:
    with edge.tls_connect(APP) as s:
        f = s.makefile("rb")
        send_request(s, APP, "/first")
        assert read_response(f)[0] == 200
        started = time.monotonic()
        assert f.read() == b""
        assert 1.0 < time.monotonic() - started < 4.0


def test_slow_backend_gets_504_at_the_first_byte_timeout(edge: Edge) -> None:
    started = time.monotonic()
    status, headers, body = edge.request(APP, "/slow?4")
    assert status == 504
    assert 2.4 < time.monotonic() - started < 3.8
    assert headers["x-request-id"].encode() in body
    assert edge.metric("tlsedge_limits_hit_total", limit="upstream_first_byte_timeout") >= 1


def test_two_thousand_idle_connections_do_not_stop_new_requests(
        ca: CA, app: Backend, tmp_path: Path) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 8000:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 16000), hard))
    # All from 127.0.0.1: the per-client cap (tested in test_dataplane_buffering) is
    # lifted so that this tests the worker, not one address.
    config = config_for(tmp_path, ca, app, connections_per_client=4000)
    with Edge(tmp_path, config) as edge:
        idle: list[socket.socket] = []
        try:
            # Plain TCP is enough to hold a slot and costs the test no handshakes; a
            # quarter complete TLS and stay idle.
            for i in range(2000):
                if i % 4 == 0:
                    idle.append(edge.tls_connect(APP))
                else:
                    idle.append(socket.create_connection(("127.0.0.1", edge.https_port)))
            started = time.monotonic()
            for i in range(5):
                assert edge.request(APP, f"/fresh/{i}")[0] == 200
            assert time.monotonic() - started < 3
        finally:
            for s in idle:
                s.close()
