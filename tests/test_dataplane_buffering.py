"""Request and response buffering on the real `tlsedge run` (issue #11): a slow client
never holds an app's backend connection.

A request body still arriving is held by the edge (memory, then an unlinked temp file)
and the backend connection is taken once it is complete; a response the client reads
slowly is read from the backend as fast as it comes and the connection goes back to
the pool at once. Apps may turn either off, and then the backend waits for the client
as before. Every test ends with no temp file left in the folder or open in the worker.

On loopback, Linux socket buffers take ~1.5 MiB of a response per client connection
whatever the client's window (the send buffer grows with loopback's 64 KiB segments),
so a 1 MiB slow read never holds a backend here; the slow readers below ask for 4 and
8 MiB, which do, as 1 MiB does across a real network.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import json
import os
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import pytest

from proxy.dataplane.upstream import PoolFull, UpstreamPool
from proxy.routing import Backend as RouteBackend
from tests.certgen import CA
from tests.conftest import PLATFORM
from tests.support.backend import Backend, pattern, ws_frame, ws_read
from tests.support.edge import Edge, read_response, send_request

APP = f"my-app.{PLATFORM}"          # buffering on (the default)
STREAM = f"stream-app.{PLATFORM}"   # request_buffering and response_buffering off
KiB = 1024
MiB = 1024 * 1024


def config_for(workdir: Path, ca: CA, backend: Backend, **limits: Any) -> dict[str, Any]:
    pcert, pkey = ca.issue([f"*.{PLATFORM}"]).write(workdir, "platform")
    spool = workdir / "spool"
    spool.mkdir(exist_ok=True)
    return {
        "platform_domain": PLATFORM,
        "workers": 1,
        "tls": {"platform_certificate": {"cert": pcert, "key": pkey}},
        "store": {"path": "store"},
        "apps": {"my-app": {"backends": [backend.address]},
                 "stream-app": {"backends": [backend.address], "request_buffering": False,
                                "response_buffering": False}},
        "limits": {"drain_timeout": 2, "max_body_bytes": 60 * MiB, "temp_dir": str(spool),
                   **limits},
    }


@pytest.fixture(scope="module")
def app() -> Iterator[Backend]:
    with Backend("app") as b:
        yield b


@pytest.fixture(scope="module")
def edge(ca: CA, app: Backend, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Edge]:
    """The issue's setup: one app whose backend takes 10 connections from the edge."""
    workdir = tmp_path_factory.mktemp("edge-buffering")
    with Edge(workdir, config_for(workdir, ca, app, backend_max_connections=10)) as e:
        yield e


@pytest.fixture(scope="module")
def single(ca: CA, app: Backend, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Edge]:
    """One backend connection per app: whoever holds it makes every other request wait."""
    workdir = tmp_path_factory.mktemp("edge-buffering-single")
    with Edge(workdir, config_for(workdir, ca, app, backend_max_connections=1)) as e:
        yield e


def worker_pid(edge: Edge) -> int:
    [pid] = edge.worker_pids()
    return pid


def spool_folder(edge: Edge) -> Path:
    return Path(edge.config["limits"]["temp_dir"])


def open_temp_files(edge: Edge) -> list[Path]:
    """The worker's fds (as /proc paths, stat-able after the unlink) open on files in
    the spool folder."""
    folder = str(spool_folder(edge))
    found = []
    for fd in Path(f"/proc/{worker_pid(edge)}/fd").iterdir():
        with contextlib.suppress(OSError):
            if os.readlink(fd).startswith(folder + "/"):
                found.append(fd)
    return found


def wait_spooled(edge: Edge) -> int:
    """Wait until the worker's temp files stop growing (every response read from the
    backend); their total size."""
    sizes = [-1]

    def settled() -> bool:
        total = sum(os.stat(fd).st_size for fd in open_temp_files(edge))
        sizes.append(total)
        return total > 0 and sizes[-2] == total

    wait_for(settled, "the responses spooled", timeout=60, every=0.3)
    return sizes[-1]


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * KiB
    raise AssertionError("no VmRSS")


def wait_for(check: Callable[[], bool], what: str, timeout: float = 30.0,
             every: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        time.sleep(every)


@pytest.fixture(autouse=True)
def no_temp_file_left(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    for name in ("edge", "single"):
        if name in request.fixturenames:
            edge = request.getfixturevalue(name)
            wait_for(lambda e=edge: not open_temp_files(e), "the worker closed its temp files")
            assert list(spool_folder(edge).iterdir()) == []


def slow_reader(edge: Edge, host: str, path: str,
                headers: dict[str, str] | None = None) -> ssl.SSLSocket:
    """A TLS connection with a tiny receive window that sends one request and reads
    nothing until the test says so."""
    raw = socket.socket()
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    raw.settimeout(30)
    raw.connect(("127.0.0.1", edge.https_port))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    s = ctx.wrap_socket(raw, server_hostname=host)
    send_request(s, host, path, headers=headers)
    return s


def timed_request(edge: Edge, host: str, path: str) -> tuple[int, float]:
    started = time.monotonic()
    status = edge.request(host, path)[0]
    return status, time.monotonic() - started


def read_head(f: BinaryIO) -> int:
    """Read a response's status line and headers; its status."""
    status = int(f.readline().split()[1])
    while f.readline() not in (b"\r\n", b""):
        pass
    return status


def assert_waits(edge: Edge, host: str) -> ssl.SSLSocket:
    """Send a request that must not be answered for 2 s (the app's one backend
    connection is held); return its connection, to read the answer later."""
    waiting = edge.tls_connect(host, timeout=2)
    send_request(waiting, host, "/waits")
    with pytest.raises(TimeoutError):
        read_response(waiting)
    waiting.settimeout(30)
    return waiting


# -- the issue's scenario: 200 slow clients, 10 backend connections -------------------
def test_two_hundred_slow_uploads_leave_the_backend_free_for_a_normal_client(
        edge: Edge, app: Backend) -> None:
    body = pattern(100 * KiB)
    slow: list[ssl.SSLSocket] = []
    try:
        for _ in range(200):
            s = edge.tls_connect(APP, timeout=30)
            send_request(s, APP, "/upload", method="POST",
                         headers={"Content-Length": str(len(body))})
            s.sendall(body[:70 * KiB])  # past the 64 KiB kept in memory
            slow.append(s)
        # Every body is held, in a temp file each, and none has reached the app.
        wait_for(lambda: len(open_temp_files(edge)) == 200, "200 spooled request bodies")
        status, took = timed_request(edge, APP, "/probe")
        assert status == 200 and took < 1.0, (status, took)
        before = len(app.seen)
        for s in slow:  # each finishes its upload in turn, and is answered
            s.sendall(body[70 * KiB:])
            status, _, answer = read_response(s)
            assert status == 200
            seen = json.loads(answer)
            assert seen["body_length"] == len(body)
            assert seen["body_sha256"] == hashlib.sha256(body).hexdigest()
        assert len(app.seen) == before + 200
    finally:
        for s in slow:
            s.close()


def test_two_hundred_slow_readers_leave_the_backend_free_for_a_normal_client(
        edge: Edge, app: Backend) -> None:
    size = 4 * MiB
    before = len(app.seen)
    slow = []
    try:
        for _ in range(200):
            slow.append(slow_reader(edge, APP, f"/bytes/{size}"))
        wait_for(lambda: len(app.seen) >= before + 200,
                 "the backend answered all 200 slow readers (10 connections)", timeout=60)
        wait_spooled(edge)
        status, took = timed_request(edge, APP, "/probe")
        assert status == 200 and took < 1.0, (status, took)
        for s in slow[:3]:  # read slowly after all: every byte is there
            status, _, got = read_response(s)
            assert status == 200 and len(got) == size and got == pattern(size)
    finally:
        for s in slow:
            s.close()


def test_memory_per_slow_reader_stays_bounded_whatever_the_response_size(
        edge: Edge, app: Backend) -> None:
    """40 clients read nothing of an 8 MiB response each: the edge reads them all from
    the backend, but holds at most ~1.5 MiB of each in memory (transport buffers and
    the spool's 256 KiB); the rest is in temp files. Kept in memory it would be more
    than 6 MiB each."""
    pid = worker_pid(edge)
    assert edge.request(APP, "/warm")[0] == 200
    start = rss(pid)
    before = len(app.seen)
    slow = []
    try:
        for _ in range(40):
            slow.append(slow_reader(edge, APP, f"/bytes/{8 * MiB}"))
        wait_for(lambda: len(app.seen) >= before + 40, "the backend answered 40 requests",
                 timeout=60)
        spooled = wait_spooled(edge)
        per_connection = (rss(pid) - start) / 40
        assert spooled > 40 * 2 * MiB, spooled
        assert per_connection < 3 * MiB, f"{per_connection / MiB:.2f} MiB per slow reader"
    finally:
        for s in slow:
            s.close()


# -- a backend connection is taken late and given back early ------------------------
def test_slow_upload_takes_no_backend_connection_until_its_body_is_complete(
        single: Edge, app: Backend) -> None:
    with single.tls_connect(APP) as upload:
        send_request(upload, APP, "/upload", method="POST", headers={"Content-Length": "10"})
        upload.sendall(b"12345")
        # The app's only connection is free: another client is answered meanwhile.
        status, took = timed_request(single, APP, "/meanwhile")
        assert status == 200 and took < 5
        upload.sendall(b"67890")
        status, _, answer = read_response(upload)
    assert status == 200 and json.loads(answer)["body_length"] == 10


def test_slow_upload_to_an_app_without_request_buffering_holds_its_connection(
        single: Edge, app: Backend) -> None:
    with single.tls_connect(STREAM) as upload:
        f = upload.makefile("rb")
        send_request(upload, STREAM, "/upload", method="POST",
                     headers={"Content-Length": "10", "Expect": "100-continue"})
        assert read_head(f) == 100  # from the app: the upload has its connection
        upload.sendall(b"12345")
        with assert_waits(single, STREAM) as waiting:
            upload.sendall(b"67890")
            assert read_response(f)[0] == 200
            assert read_response(waiting)[0] == 200


def test_slow_reader_gives_the_backend_connection_back_as_soon_as_the_response_is_read(
        single: Edge, app: Backend) -> None:
    size = 8 * MiB
    with slow_reader(single, APP, f"/bytes/{size}") as s:
        f = s.makefile("rb")
        assert read_head(f) == 200
        status, took = timed_request(single, APP, "/meanwhile")
        assert status == 200 and took < 5
        [first, second] = app.seen[-2:]
        assert first.path == f"/bytes/{size}" and second.path == "/meanwhile"
        # The same backend connection carried both: the first response was done.
        assert first.client_port == second.client_port
        got = f.read(size)
    assert got == pattern(size)


@pytest.mark.parametrize(("host", "headers"), [
    (STREAM, None),
    (APP, {"X-Response-Header": "X-Accel-Buffering: no"}),
], ids=["app-without-response-buffering", "x-accel-buffering-no"])
def test_unbuffered_response_to_a_slow_reader_holds_its_backend_connection(
        single: Edge, app: Backend, host: str, headers: dict[str, str] | None) -> None:
    size = 8 * MiB
    with slow_reader(single, host, f"/bytes/{size}", headers) as s:
        f = s.makefile("rb")
        assert read_head(f) == 200  # the response has started: it has the connection
        with assert_waits(single, host) as waiting:
            assert open_temp_files(single) == []
            assert f.read(size) == pattern(size)  # the client reads: the backend goes on
            assert read_response(waiting)[0] == 200  # and then the waiting request


# -- byte-exact, both ways, buffering on and off ----------------------------------------
def chunked(data: bytes, piece: int = 100_000) -> bytes:
    out = b"".join(b"%x\r\n%s\r\n" % (len(data[i:i + piece]), data[i:i + piece])
                   for i in range(0, len(data), piece))
    return out + b"0\r\n\r\n"


@pytest.mark.parametrize("host", [APP, STREAM], ids=["buffered", "streamed"])
def test_fifty_mib_chunked_upload_arrives_byte_exact(edge: Edge, app: Backend,
                                                      host: str) -> None:
    body = pattern(50 * MiB)
    before = len(app.seen)
    with edge.tls_connect(host, timeout=60) as s:
        send_request(s, host, "/upload", method="POST",
                     headers={"Transfer-Encoding": "chunked"})
        s.sendall(chunked(body))
        status = read_response(s)[0]
    assert status == 200
    [seen] = app.seen[before:]
    assert hashlib.sha256(seen.body).digest() == hashlib.sha256(body).digest()
    if host == APP:  # held whole, then sent with its length
        assert seen.header("Content-Length") == str(len(body))
        assert seen.header("Transfer-Encoding") is None
    else:
        assert seen.header("Transfer-Encoding") == "chunked"


@pytest.mark.parametrize("host", [APP, STREAM], ids=["buffered", "streamed"])
def test_fifty_mib_download_to_a_slow_reader_arrives_byte_exact(edge: Edge,
                                                                host: str) -> None:
    size = 50 * MiB
    with slow_reader(edge, host, f"/bytes/{size}") as s:
        if host == APP:
            wait_for(lambda: len(open_temp_files(edge)) == 1, "the response spooled")
        f = s.makefile("rb")
        status, _, got = read_response(f)
        send_request(s, host, "/after")  # the body ended exactly where it should
        assert read_response(f)[0] == 200
    assert status == 200 and len(got) == size and got == pattern(size)


# -- what is never buffered, and what the edge answers itself ---------------------------
def test_server_sent_events_still_arrive_one_by_one(edge: Edge) -> None:
    with edge.tls_connect(APP) as s:
        f = s.makefile("rb")
        send_request(s, APP, "/sse?5")
        assert f.readline().split()[1] == b"200"
        while f.readline() != b"\r\n":
            pass
        arrivals = []
        while len(arrivals) < 5:
            size = int(f.readline(), 16)
            assert f.read(size).startswith(b"data: event ")
            f.readline()
            arrivals.append(time.monotonic())
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    assert all(g > 0.05 for g in gaps), gaps  # one every 100 ms, not bunched


def test_websocket_still_works_through_a_buffering_app(edge: Edge) -> None:
    with edge.tls_connect(APP) as s:
        send_request(s, APP, "/ws", headers={
            "Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Version": "13",
            "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="})
        f = s.makefile("rb")
        assert f.readline().split()[1] == b"101"
        while f.readline() != b"\r\n":
            pass
        for i in range(50):
            message = os.urandom(1 + i * 3000)
            s.sendall(ws_frame(message, opcode=2, mask=os.urandom(4)))
            assert ws_read(f.read) == (2, message)
        s.sendall(ws_frame(b"", opcode=8, mask=os.urandom(4)))
        assert ws_read(f.read)[0] == 8


def test_expect_100_continue_is_answered_by_the_edge_and_not_forwarded(
        edge: Edge, app: Backend) -> None:
    body = b"after the 100"
    before = len(app.seen)
    with edge.tls_connect(APP) as s:
        f = s.makefile("rb")
        send_request(s, APP, "/upload", method="POST",
                     headers={"Expect": "100-continue", "Content-Length": str(len(body))})
        assert f.readline().startswith(b"HTTP/1.1 100 ")
        assert f.readline() == b"\r\n"
        assert len(app.seen) == before  # answered before the app heard of it
        s.sendall(body)
        status, _, answer = read_response(f)
    assert status == 200 and json.loads(answer)["body_length"] == len(body)
    [seen] = app.seen[before:]
    assert seen.header("Expect") is None


def test_trickling_body_is_cut_with_408_at_the_minimum_rate(
        ca: CA, app: Backend, tmp_path: Path) -> None:
    # 40 bytes/s against a minimum of 400 after a 1 s grace: cut after ~1 s, long
    # before the 30 s between-reads timeout.
    config = config_for(tmp_path, ca, app, body_min_rate=400, body_rate_grace=1.0,
                        request_body_timeout=30)
    before = len(app.seen)
    with Edge(tmp_path, config) as edge, edge.tls_connect(APP, timeout=30) as s:
        send_request(s, APP, "/upload", method="POST", headers={"Content-Length": "100000"})
        started = time.monotonic()
        stop = threading.Event()

        def drip() -> None:
            with contextlib.suppress(OSError):
                while not stop.wait(0.1):
                    s.sendall(b"x" * 4)

        dripping = threading.Thread(target=drip)
        dripping.start()
        try:
            status = read_response(s)[0]
        finally:
            stop.set()
            dripping.join()
        assert status == 408
        assert time.monotonic() - started < 10
        assert edge.metric("tlsedge_limits_hit_total", limit="body_min_rate") == 1
    assert len(app.seen) == before


# -- per-client limits and a fair backend queue -----------------------------------------
def test_connections_past_the_per_client_limit_are_refused_until_one_closes(
        ca: CA, app: Backend, tmp_path: Path) -> None:
    config = config_for(tmp_path, ca, app, connections_per_client=5)
    with Edge(tmp_path, config) as edge:
        held = [edge.tls_connect(APP) for _ in range(5)]
        try:
            with pytest.raises((ssl.SSLError, OSError)):
                edge.tls_connect(APP).close()
            assert edge.metric("tlsedge_limits_hit_total", limit="connections_per_client") == 1
            held.pop().close()

            def answered() -> bool:
                with contextlib.suppress(ssl.SSLError, OSError):
                    return edge.request(APP, "/again")[0] == 200
                return False

            wait_for(answered, "a connection once one of the five closed")
            for s in held:  # the five that were let in are served
                send_request(s, APP, "/held")
                assert read_response(s)[0] == 200
        finally:
            for s in held:
                s.close()


def test_request_rate_per_client_and_app_answers_429_past_the_burst(
        ca: CA, app: Backend, tmp_path: Path) -> None:
    config = config_for(tmp_path, ca, app, client_request_rate=0.1, client_request_burst=3)
    before = len(app.seen)
    with Edge(tmp_path, config) as edge, edge.tls_connect(APP) as s:
        f = s.makefile("rb")
        statuses = []
        for host in (APP, APP, APP, APP, STREAM):
            send_request(s, host, "/rated")
            statuses.append(read_response(f)[0])
        # The fourth to my-app is one too many; the other app has a bucket of its own.
        assert statuses == [200, 200, 200, 429, 200]
        assert edge.metric("tlsedge_limits_hit_total", limit="client_request_rate") == 1
    assert len(app.seen) == before + 4


def test_backend_queue_serves_client_addresses_in_turn(app: Backend) -> None:
    """Two connections, four places in the queue: a client flooding it does not make
    another client wait behind all of its requests, or refuse it."""

    async def scenario() -> list[str]:
        pool = UpstreamPool(connect_timeout=5, max_connections=2, queue=4)
        backend = RouteBackend("127.0.0.1", app.port)
        held = [(await pool.acquire(backend, "10.0.0.1"))[0] for _ in range(2)]
        order: list[str] = []

        async def wait(client: str, name: str) -> None:
            try:
                conn, _ = await pool.acquire(backend, client)
            except PoolFull:
                order.append(f"{name} refused")
                return
            order.append(name)
            held.append(conn)

        flood = [asyncio.ensure_future(wait("10.0.0.1", f"flood-{i}")) for i in range(4)]
        await asyncio.sleep(0)  # one loop turn: the four are queued
        other = asyncio.ensure_future(wait("10.0.0.2", "other"))
        await asyncio.sleep(0)
        for _ in range(3):  # three connections free up, one after the other
            pool.release(held.pop(0))
            await asyncio.sleep(0)
        for task in [*flood, other]:
            task.cancel()
        await asyncio.gather(*flood, other, return_exceptions=True)
        for conn in held:
            conn.detach()
        pool.close()
        return order

    order = asyncio.run(scenario())
    # The flood's newest waiter gave its place to the other client, which is served
    # second: after one of the flood's, before the rest of them.
    assert order == ["flood-3 refused", "flood-0", "other", "flood-1"]
