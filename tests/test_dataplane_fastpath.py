"""The exchange's two paths on the real `tlsedge run`: requests relayed from the protocol
callbacks (complete, small, an idle pooled backend connection at hand) and requests
relayed by a task (new backend connections, large or streamed bodies) keep their order
when pipelined together, and a pooled connection the backend had closed is retried
without the client noticing.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.certgen import CA
from tests.conftest import PLATFORM
from tests.support.backend import Backend, pattern
from tests.support.edge import Edge, read_response, send_request

APP = f"my-app.{PLATFORM}"


def config_for(workdir: Path, ca: CA, address: str) -> dict[str, object]:
    pcert, pkey = ca.issue([f"*.{PLATFORM}"]).write(workdir, "platform")
    return {
        "platform_domain": PLATFORM,
        "workers": 1,
        "tls": {"platform_certificate": {"cert": pcert, "key": pkey}},
        "store": {"path": "store"},
        "apps": {"my-app": {"backends": [address]}},
        "limits": {"drain_timeout": 2},
    }


@pytest.fixture(scope="module")
def app() -> Iterator[Backend]:
    with Backend("app") as b:
        yield b


@pytest.fixture(scope="module")
def edge(ca: CA, app: Backend, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Edge]:
    workdir = tmp_path_factory.mktemp("edge-fastpath")
    with Edge(workdir, config_for(workdir, ca, app.address)) as e:
        yield e


def test_pipelined_burst_mixing_fast_and_task_requests_is_answered_in_order(
        edge: Edge, app: Backend) -> None:
    big = pattern(200_000)  # above the fast path's body limit: relayed by a task
    small = pattern(1000)
    burst = [
        ("GET", APP, "/p/1", None, {}),
        ("POST", APP, "/echo", small, {}),                       # small body, complete
        ("GET", "nobody.example.test", "/p/404", None, {}),      # answered by the edge
        ("POST", APP, "/echo", big, {}),                         # task path
        ("GET", APP, "/slow?0.2", None, {}),                     # later ones wait for it
        ("POST", APP, "/echo", b"a,b,c", {"Transfer-Encoding": "chunked"}),
        ("GET", APP, "/p/last", None, {}),
    ]
    with edge.tls_connect(APP, timeout=15) as s:
        f = s.makefile("rb")
        # Warm the pool, so the burst starts on the fast path.
        send_request(s, APP, "/p/warm")
        assert read_response(f)[0] == 200
        data = b""
        for method, host, path, body, headers in burst:
            head = [f"{method} {path} HTTP/1.1", f"Host: {host}"]
            if "Transfer-Encoding" in headers:
                head.append("Transfer-Encoding: chunked")
                assert body is not None
                body = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
            elif body is not None:
                head.append(f"Content-Length: {len(body)}")
            data += ("\r\n".join(head) + "\r\n\r\n").encode() + (body or b"")
        s.sendall(data)
        answers = [read_response(f) for _ in burst]
    statuses = [status for status, _, _ in answers]
    assert statuses == [200, 200, 404, 200, 200, 200, 200]
    assert json.loads(answers[0][2])["path"] == "/p/1"
    assert answers[1][2] == small
    assert answers[3][2] == big
    assert json.loads(answers[4][2])["path"] == "/slow?0.2"
    assert answers[5][2] == b"a,b,c"
    assert json.loads(answers[6][2])["path"] == "/p/last"
    relayed = [seen.path for seen in app.seen[-6:]]
    assert relayed == ["/p/1", "/echo", "/echo", "/slow?0.2", "/echo", "/p/last"]


class ClosingBackend:
    """Answers the first request of every connection (keep-alive), then closes the
    connection when the next request arrives, unanswered: the race of a backend's
    keep-alive timeout with our reuse of its connection."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self.connections = 0
        self.requests: list[bytes] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._connection, args=(conn, self.connections),
                             daemon=True).start()

    def _connection(self, conn: socket.socket, number: int) -> None:
        with conn:
            f = conn.makefile("rb")
            for answered in (True, False):
                line = f.readline()
                if not line:
                    return
                length = 0
                while (header := f.readline()) not in (b"\r\n", b""):
                    if header.lower().startswith(b"content-length:"):
                        length = int(header.split(b":")[1])
                f.read(length)
                self.requests.append(line.split()[1])
                if answered:
                    body = f"connection {number}".encode()
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s"
                                 % (len(body), body))

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def closing_backend() -> Iterator[ClosingBackend]:
    backend = ClosingBackend()
    yield backend
    backend.close()


def test_pooled_connection_closed_by_the_backend_is_retried_transparently(
        ca: CA, closing_backend: ClosingBackend, tmp_path: Path) -> None:
    with Edge(tmp_path, config_for(tmp_path, ca, closing_backend.address)) as edge, \
            edge.tls_connect(APP) as s:
        f = s.makefile("rb")
        send_request(s, APP, "/one")
        status, _, body = read_response(f)
        assert (status, body) == (200, b"connection 1")
        # Relayed on the pooled connection, which the backend closes unanswered: the
        # edge resends on a new connection.
        send_request(s, APP, "/two")
        status, _, body = read_response(f)
        assert (status, body) == (200, b"connection 2")
        # A request with a body is not sent twice: the client gets the 502.
        send_request(s, APP, "/three", method="POST", body=b"x" * 10)
        status, _, _ = read_response(f)
        assert status == 502
    assert closing_backend.requests == [b"/one", b"/two", b"/two", b"/three"]


def test_body_over_the_limit_arriving_right_behind_its_head_is_413_never_relayed(
        ca: CA, app: Backend, tmp_path: Path) -> None:
    # Head and body in one write: the request is handed to the task path on the head
    # and the limit fires before that task has run; it must answer 413, not relay.
    config = config_for(tmp_path, ca, app.address)
    config["limits"] = {"drain_timeout": 2, "max_body_bytes": 100_000}
    piece = b"x" * 30_000
    body = b"".join(b"%x\r\n%s\r\n" % (len(piece), piece) for _ in range(4))
    with Edge(tmp_path, config) as edge:
        for _ in range(3):
            before = len(app.seen)
            with edge.tls_connect(APP) as s:
                s.sendall(f"POST /echo HTTP/1.1\r\nHost: {APP}\r\n"
                          "Transfer-Encoding: chunked\r\n\r\n".encode() + body)
                status, _, _ = read_response(s)
            assert status == 413
            assert len(app.seen) == before


def test_upload_cut_by_the_client_never_reaches_the_app_as_complete(
        edge: Edge, app: Backend) -> None:
    """A chunked upload whose client goes away mid-body must not be relayed with its
    final 0-chunk (the app would take a truncated body for the whole request)."""
    with edge.tls_connect(APP) as s:
        send_request(s, APP, "/p/before-cut")
        read_response(s)
        before = len(app.seen)
        s.sendall(f"POST /echo/cut HTTP/1.1\r\nHost: {APP}\r\n".encode()
                  + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        time.sleep(0.3)  # the relay has started streaming to the backend
        s.settimeout(2)
        with contextlib.suppress(OSError):
            s.unwrap()  # close_notify: the client ends its side mid-body
    time.sleep(0.5)
    assert [r.path for r in app.seen[before:]] == []
