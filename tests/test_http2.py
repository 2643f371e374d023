"""HTTP/2 for clients on the real `tlsedge run`: ALPN, streams relayed to HTTP/1.1
backends, coalescing and 421 per stream, translation and malformed requests, flow
control, limits and the known HTTP/2 attacks, and GOAWAY at shutdown.

Clients: curl --http2, h2load, and a raw client (tests/support/h2client.py: h2's
client connection with validation off, plus hand-built frames). One edge serves most
of the module; tests compare what the recording backends saw before and after.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import hpack
import pytest
from h2.errors import ErrorCodes
from h2.settings import SettingCodes
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    HeadersFrame,
    WindowUpdateFrame,
)

from tests.certgen import CA
from tests.conftest import PLATFORM
from tests.support.backend import Backend, pattern, ws_frame, ws_read
from tests.support.edge import Edge
from tests.support.h2client import H2Client
from tests.test_dataplane_relay import ws_connect

APP = f"my-app.{PLATFORM}"
OTHER = f"other.{PLATFORM}"
SHOP = "www.shop.test"  # a custom domain with a certificate of its own
MiB = 1024 * 1024
RESET_BUDGET = 50


class Setup:
    def __init__(self, edge: Edge, app: Backend, other: Backend, shop: Backend,
                 workdir: Path) -> None:
        self.edge, self.app, self.other, self.shop = edge, app, other, shop
        self.workdir = workdir

    def client(self, server_name: str = APP, **kw: Any) -> H2Client:
        c = H2Client(self.edge.https_port, server_name, **kw)
        assert c.alpn == "h2"
        return c

    def seen(self) -> int:
        return len(self.app.seen) + len(self.other.seen) + len(self.shop.seen)

    def worker_rss_kib(self) -> int:
        [pid] = self.edge.worker_pids()
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS")


def edge_config(workdir: Path, ca: CA, app: Backend, other: Backend, shop: Backend,
                **extra: Any) -> dict[str, Any]:
    pcert, pkey = ca.issue([f"*.{PLATFORM}"]).write(workdir, "platform")
    scert, skey = ca.issue([SHOP, "shop.test"]).write(workdir, "shop")
    my_app = {"backends": [app.address], **extra.pop("my_app", {})}
    limits = {"drain_timeout": 10, "max_body_bytes": 60 * MiB,
              "h2_reset_budget": RESET_BUDGET, **extra.pop("limits", {})}
    return {
        "platform_domain": PLATFORM,
        "workers": 1,
        "tls": {"platform_certificate": {"cert": pcert, "key": pkey},
                "certificates": [{"cert": scert, "key": skey}], **extra.pop("tls", {})},
        "store": {"path": "store"},
        "apps": {"my-app": my_app,
                 # Bodies stream to it as they arrive (no request buffering).
                 "other": {"backends": [other.address], "request_buffering": False},
                 "shop": {"backends": [shop.address]}},
        "domains": {SHOP: "shop"},
        "access_log": {"enabled": True, "path": str(workdir / "access.log")},
        "limits": limits,
        **extra,
    }


@contextlib.contextmanager
def running(workdir: Path, ca: CA, **extra: Any) -> Iterator[Setup]:
    """An edge (config: `edge_config` with `extra`) in front of three backends."""
    with Backend("app") as app, Backend("other") as other, Backend("shop") as shop, \
            Edge(workdir, edge_config(workdir, ca, app, other, shop, **extra)) as edge:
        yield Setup(edge, app, other, shop, workdir)


@pytest.fixture(scope="module")
def setup(ca: CA, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    with running(tmp_path_factory.mktemp("edge-h2"), ca) as s:
        yield s


def eventually(check: Callable[[], bool], timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return check()


def curl(edge: Edge, host: str, path: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["curl", "-sS", "-k", "--max-time", "60", "--resolve",
         f"{host}:{edge.https_port}:127.0.0.1", *args, f"https://{host}:{edge.https_port}{path}"],
        capture_output=True, text=True, timeout=90)


# -- ALPN and real clients -----------------------------------------------------------

def test_curl_http2_negotiates_h2_and_curl_http11_still_gets_http11(setup: Setup) -> None:
    edge = setup.edge
    before = len(setup.app.seen)
    h2 = curl(edge, APP, "/via-h2?q=1", "--http2", "-H", "X-Curl: yes",
              "-w", "\n%{http_version}")
    assert h2.returncode == 0, h2.stderr
    body, version = h2.stdout.rsplit("\n", 1)
    assert version == "2"
    answer = json.loads(body)
    assert answer["backend"] == "app" and answer["path"] == "/via-h2?q=1"
    headers = {k.lower(): v for k, v in answer["headers"].items()}
    assert headers["x-curl"] == "yes"
    assert headers["host"] == f"{APP}:{edge.https_port}"  # :authority became Host
    h1 = curl(edge, APP, "/via-h1", "--http1.1", "-w", "\n%{http_version}")
    assert h1.returncode == 0 and h1.stdout.rsplit("\n", 1)[1] == "1.1"
    assert len(setup.app.seen) == before + 2
    # The access log and the metrics say which protocol each request came on.
    log_path = setup.workdir / "access.log"

    def logged() -> dict[str, str]:
        lines = [json.loads(x) for x in log_path.read_text().splitlines()] \
            if log_path.exists() else []
        return {x["path"]: x["protocol"] for x in lines}

    assert eventually(lambda: {"/via-h2", "/via-h1"} <= logged().keys())
    assert logged()["/via-h2"] == "h2" and logged()["/via-h1"] == "http/1.1"
    assert eventually(lambda: edge.metric("tlsedge_requests_total", app="my-app",
                                          protocol="h2") >= 1)


def test_h2load_negotiates_h2_for_every_request(setup: Setup) -> None:
    edge = setup.edge
    out = subprocess.run(
        ["h2load", "-n", "400", "-c", "4", "-m", "20", "-H", f":authority: {APP}",
         f"https://127.0.0.1:{edge.https_port}/h2load"],
        capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Application protocol: h2" in out.stdout
    assert "400 succeeded, 0 failed, 0 errored" in out.stdout
    assert "status codes: 400 2xx" in out.stdout


def test_alpn_without_h2_in_config_serves_http11_only(ca: CA, tmp_path: Path) -> None:
    with running(tmp_path, ca, tls={"alpn": ["http/1.1"]}) as s:
        out = curl(s.edge, APP, "/", "--http2", "-w", "\n%{http_version}")
        assert out.returncode == 0, out.stderr
        assert out.stdout.rsplit("\n", 1)[1] == "1.1"
        with H2Client(s.edge.https_port, APP) as client:
            assert client.alpn == "http/1.1"


def test_no_extended_connect_is_announced_and_http11_websocket_still_works(
        setup: Setup) -> None:
    with setup.client() as c:
        assert c.get(APP, "/first").status == 200
        # Browsers then open WebSockets over HTTP/1.1 (RFC 8441 not announced).
        assert c.conn.remote_settings.get(SettingCodes.ENABLE_CONNECT_PROTOCOL, 0) == 0
        assert c.conn.remote_settings.max_concurrent_streams == 128
        assert c.conn.remote_settings.max_header_list_size == 65536
    s = ws_connect(setup.edge)
    try:
        s.sendall(ws_frame(b"over http/1.1", mask=b"abcd"))
        f = s.ws_file  # type: ignore[attr-defined]
        assert ws_read(f.read) == (1, b"over http/1.1")
    finally:
        s.close()


# -- coalescing and 421 per stream -----------------------------------------------------

def test_one_connection_carries_two_apps_and_a_misdirected_stream_gets_421_alone(
        setup: Setup) -> None:
    before_shop = len(setup.shop.seen)
    with setup.client(APP) as c:
        a = c.request(APP, "/a")
        b = c.request(OTHER, "/b")
        misdirected = c.request(SHOP, "/shop")  # not covered by *.PLATFORM
        c.pump(lambda: all(r.finished for r in c.responses.values()))
        assert c.responses[a].status == 200
        assert json.loads(c.responses[a].body)["backend"] == "app"
        assert c.responses[b].status == 200
        assert json.loads(c.responses[b].body)["backend"] == "other"
        assert c.responses[misdirected].status == 421
        assert c.responses[misdirected].header(b"x-request-id")
        # The connection lives on.
        assert c.get(OTHER, "/after").status == 200
        assert c.goaway is None
    assert len(setup.shop.seen) == before_shop


# -- translation ---------------------------------------------------------------------

def test_request_is_translated_for_the_http11_backend(setup: Setup) -> None:
    before = len(setup.app.seen)
    with setup.client() as c:
        r = c.get(APP, "/t?x=1", method="POST", body=b"hello",
                  headers=[("cookie", "a=1"), ("cookie", "b=2"), ("te", "trailers"),
                           ("x-forwarded-for", "6.6.6.6"), ("content-length", "5")])
    assert r.status == 200
    [seen] = setup.app.seen[before:]
    assert seen.method == "POST" and seen.path == "/t?x=1" and seen.body == b"hello"
    assert seen.header("Host") == APP
    assert seen.header("cookie") == "a=1; b=2"
    assert seen.header("te") is None  # hop-by-hop
    assert seen.header("x-forwarded-for") == "127.0.0.1"  # the client's own is dropped
    assert seen.header("x-forwarded-proto") == "https"
    assert len(seen.header("x-request-id") or "") == 32


def test_request_body_without_length_streams_chunked_to_the_backend(setup: Setup) -> None:
    before = len(setup.other.seen)
    body = pattern(300_000)
    with setup.client() as c:
        sid = c.request(OTHER, "/echo", method="PUT", end=False)
        c.send_body(sid, body[:100_000], end=False)
        c.send_body(sid, body[100_000:], end=True)
        c.pump(lambda: c.responses[sid].finished, timeout=30)
        r = c.responses[sid]
    assert r.status == 200 and bytes(r.body) == body
    [seen] = setup.other.seen[before:]
    assert seen.header("transfer-encoding") == "chunked" and seen.body == body


def test_response_hop_by_hop_headers_are_removed_and_names_lowercased(setup: Setup) -> None:
    with setup.client() as c:
        r = c.get(APP, "/bytes-chunked/1000",
                  headers=[("x-response-header", "X-Custom: yes")])
    assert r.status == 200 and bytes(r.body) == pattern(1000)
    names = [n for n, _ in r.headers]
    assert all(n == n.lower() for n in names)
    assert b"transfer-encoding" not in names and b"connection" not in names
    assert r.header(b"x-custom") == b"yes"


MALFORMED: dict[str, list[tuple[bytes, bytes]]] = {
    "uppercase-name": [(b"X-Upper", b"1")],
    "connection": [(b"connection", b"keep-alive")],
    "keep-alive": [(b"keep-alive", b"5")],
    "proxy-connection": [(b"proxy-connection", b"keep-alive")],
    "transfer-encoding": [(b"transfer-encoding", b"chunked")],
    "upgrade": [(b"upgrade", b"websocket")],
    "te-not-trailers": [(b"te", b"gzip")],
    "crlf-in-value": [(b"x-a", b"1\r\nx-injected: yes")],
    "nul-in-value": [(b"x-a", b"1\x00")],
    "space-around-value": [(b"x-a", b" 1")],
    "space-in-name": [(b"x a", b"1")],
    "unknown-pseudo": [(b":foo", b"bar")],
}


def _head(path: bytes = b"/m") -> list[tuple[bytes, bytes]]:
    return [(b":method", b"GET"), (b":scheme", b"https"), (b":authority", APP.encode()),
            (b":path", path)]


@pytest.mark.parametrize("extra", list(MALFORMED.values()), ids=list(MALFORMED))
def test_malformed_request_is_reset_on_its_stream_and_never_forwarded(
        setup: Setup, extra: list[tuple[bytes, bytes]]) -> None:
    before = setup.seen()
    with setup.client() as c:
        r = c.get(APP, raw=_head() + extra)
        assert r.reset == ErrorCodes.PROTOCOL_ERROR and r.status == 0
        assert c.get(APP, "/fine").status == 200  # the connection lives on
        assert c.goaway is None
    assert setup.seen() == before + 1


@pytest.mark.parametrize("raw", [
    [(b":method", b"GET"), (b":scheme", b"https"), (b"x-a", b"1"),
     (b":path", b"/"), (b":authority", APP.encode())],
    [*_head(), (b":path", b"/again")],
    [(b":scheme", b"https"), (b":authority", APP.encode()), (b":path", b"/")],
    [*_head(), (b"host", b"elsewhere.example")],
], ids=["pseudo-after-regular", "duplicate-pseudo", "no-method", "host-differs"])
def test_malformed_pseudo_headers_reset_the_stream(setup: Setup,
                                                   raw: list[tuple[bytes, bytes]]) -> None:
    before = setup.seen()
    with setup.client() as c:
        r = c.get(APP, raw=raw)
        assert r.reset == ErrorCodes.PROTOCOL_ERROR
        assert c.get(APP, "/fine").status == 200
    assert setup.seen() == before + 1


@pytest.mark.parametrize("case", ["more-data", "less-data", "ended-by-trailers",
                                  "no-data"])
def test_content_length_that_disagrees_with_the_data_is_a_stream_error(
        setup: Setup, case: str) -> None:
    before = setup.seen()
    hits = setup.edge.metric("tlsedge_limits_hit_total", limit="h2_malformed")
    with setup.client() as c:
        # h2's client (validation off) sends what the declared length contradicts.
        sid = c.request(APP, "/cl", method="POST", end=case == "no-data",
                        headers=[("content-length", "10")])
        if case == "more-data":
            c.conn.send_data(sid, b"0123456789abc", end_stream=True)
        elif case == "less-data":
            c.conn.send_data(sid, b"12345", end_stream=True)
        elif case == "ended-by-trailers":
            c.conn.send_data(sid, b"12345")
            c.conn.send_headers(sid, [(b"x-t", b"1")], end_stream=True)
        c.flush()
        # RFC 9113 8.1.1: a stream error PROTOCOL_ERROR; the connection lives on.
        assert c.pump(lambda: c.responses[sid].finished)
        assert c.responses[sid].reset == ErrorCodes.PROTOCOL_ERROR
        assert c.responses[sid].status == 0
        assert c.get(APP, "/after-cl").status == 200
        assert c.goaway is None
    assert setup.seen() == before + 1
    assert eventually(lambda: setup.edge.metric("tlsedge_limits_hit_total",
                                                limit="h2_malformed") == hits + 1)


def test_streams_past_the_concurrency_limit_are_refused_alone(setup: Setup) -> None:
    before = setup.seen()
    with setup.client() as c:
        assert c.get(APP, "/warm").status == 200  # our SETTINGS are read by now
        limit = c.conn.remote_settings.max_concurrent_streams
        assert limit == 128
        # Our client plays one that ignores the limit (h2 would refuse to send).
        c.conn.remote_settings[SettingCodes.MAX_CONCURRENT_STREAMS] = 1000
        c.conn.remote_settings.acknowledge()
        # Uploads not yet ended: each stream stays open, none reaches the backend.
        ids = [c.request(APP, f"/up{i}", method="POST", end=False) for i in range(limit + 3)]
        refused = ids[limit:]
        assert c.pump(lambda: all(c.responses[s].reset is not None for s in refused))
        assert all(c.responses[s].reset == ErrorCodes.REFUSED_STREAM for s in refused)
        for sid in ids[:limit]:
            c.send_body(sid, b"x")
        assert c.pump(lambda: all(c.responses[s].finished for s in ids[:limit]), timeout=60)
        assert all(c.responses[s].status == 200 for s in ids[:limit])
        assert c.get(APP, "/after").status == 200
        assert c.goaway is None
    assert setup.seen() == before + limit + 2


def test_header_list_over_the_limit_gets_431_on_its_stream(setup: Setup) -> None:
    before = setup.seen()
    with setup.client() as c:
        many = c.get(APP, headers=[(f"x-h{i}", "v") for i in range(101)])
        assert many.status == 431
        big = c.get(APP, headers=[(f"x-big{i}", "v" * 8000) for i in range(9)])
        assert big.status == 431
        assert c.get(APP, "/fine").status == 200
    assert setup.seen() == before + 1


# -- bodies and flow control -----------------------------------------------------------

def test_hundred_concurrent_streams_both_ways_are_byte_exact(setup: Setup) -> None:
    sizes = [1, 64 * 1024] * 50
    with setup.client() as c:
        ids = {}
        for i, size in enumerate(sizes):
            if i % 2:
                ids[c.request(APP, f"/bytes/{size}")] = ("down", size)
            else:
                sid = c.request(APP, "/echo", method="POST", end=False,
                                headers=[("content-length", str(size))])
                ids[sid] = ("up", size)
        for sid, (way, size) in ids.items():
            if way == "up":
                c.send_body(sid, pattern(size))
        assert c.pump(lambda: all(c.responses[s].finished for s in ids), timeout=60)
        for sid, (_, size) in ids.items():
            r = c.responses[sid]
            assert r.status == 200 and bytes(r.body) == pattern(size), (sid, size)


@pytest.mark.parametrize("way", ["upload", "download"])
def test_fifty_mib_through_curl_http2_is_byte_exact(setup: Setup, tmp_path: Path,
                                                    way: str) -> None:
    size = 50 * MiB
    if way == "upload":
        src = tmp_path / "up.bin"
        src.write_bytes(pattern(size))
        out = tmp_path / "echo.bin"
        done = curl(setup.edge, APP, "/echo", "--http2", "--data-binary", f"@{src}",
                    "-o", str(out), "-w", "%{http_version} %{http_code}")
    else:
        out = tmp_path / "down.bin"
        done = curl(setup.edge, APP, f"/bytes/{size}", "--http2", "-o", str(out),
                    "-w", "%{http_version} %{http_code}")
    assert done.returncode == 0, done.stderr
    assert done.stdout == "2 200"
    got = out.read_bytes()
    assert len(got) == size
    assert hashlib.sha256(got).digest() == hashlib.sha256(pattern(size)).digest()


def test_a_stalled_stream_does_not_stall_the_others(setup: Setup) -> None:
    with setup.client(window=65_535) as c:
        c.auto_ack = False
        stalled = c.request(APP, f"/bytes/{8 * MiB}")
        # Its stream window (64 KiB) fills; the connection's is given back by hand.
        c.pump(lambda: len(c.responses[stalled].body) >= 65_535, timeout=10)
        c.conn.increment_flow_control_window(len(c.responses[stalled].body))
        c.flush()
        for i in range(5):
            sid = c.request(OTHER, f"/small{i}")
            c.pump(lambda s=sid: c.responses[s].finished, timeout=10)  # type: ignore[misc]
            r = c.responses[sid]
            assert r.status == 200 and json.loads(r.body)["backend"] == "other"
            c.conn.increment_flow_control_window(len(r.body))
            c.flush()
        assert not c.responses[stalled].finished
        assert len(c.responses[stalled].body) <= 65_535
        # Opening its window lets it finish.
        c.auto_ack = True
        c.conn.increment_flow_control_window(16 * MiB, stalled)
        c.conn.increment_flow_control_window(16 * MiB)
        c.flush()
        assert c.pump(lambda: c.responses[stalled].finished, timeout=60)
        assert bytes(c.responses[stalled].body) == pattern(8 * MiB)


# -- attacks -------------------------------------------------------------------------------

def _goaway(c: H2Client) -> int | None:
    """The error code of the server's GOAWAY, once it closed the connection."""
    c.wait_closed(timeout=20)
    codes = [code for kind, _, code in c.frames if kind == "GoAwayFrame"]
    return codes[-1] if codes else None


def test_rapid_reset_ends_in_goaway_and_costs_at_most_the_budget(setup: Setup) -> None:
    before, rss = setup.seen(), setup.worker_rss_kib()
    hits = setup.edge.metric("tlsedge_limits_hit_total", limit="h2_rapid_reset")
    with setup.client() as c:
        for _ in range(100):
            for _ in range(100):
                sid = c.request(APP, "/reset-me")
                c.conn.reset_stream(sid, ErrorCodes.CANCEL)
            c.flush()
            if c.closed or c.send_failed:
                break
        assert _goaway(c) == ErrorCodes.ENHANCE_YOUR_CALM
    assert eventually(lambda: setup.edge.metric("tlsedge_limits_hit_total",
                                                limit="h2_rapid_reset") == hits + 1)
    # Streams reset in the read that opened them never start: at most the budget.
    assert setup.seen() - before <= RESET_BUDGET
    assert setup.worker_rss_kib() - rss < 30 * 1024
    with setup.client() as c:
        assert c.get(APP, "/after-attack").status == 200


def test_continuation_flood_is_cut_before_decoding(setup: Setup) -> None:
    before, rss = setup.seen(), setup.worker_rss_kib()
    with setup.client() as c:
        sid = c.conn.get_next_available_stream_id()
        block = c.conn.encoder.encode(_head())
        frames = [HeadersFrame(sid, block[:1])]
        frames += [ContinuationFrame(sid, b"\x40" + b"a" * 16000) for _ in range(40)]
        c.send_frames(frames)
        code = _goaway(c)
        assert code in (ErrorCodes.ENHANCE_YOUR_CALM, ErrorCodes.PROTOCOL_ERROR)
    assert setup.seen() == before
    assert setup.worker_rss_kib() - rss < 30 * 1024


def test_hpack_bomb_ends_the_connection_with_enhance_your_calm(setup: Setup) -> None:
    before = setup.seen()
    with setup.client() as c:
        # One 4 KiB field enters the dynamic table; the next block names it 100 times
        # in one byte each: ~100 bytes that decode to ~400 KiB.
        assert c.get(APP, "/seed", headers=[("x-bomb", "a" * 4000)]).status == 200
        encoder: hpack.Encoder = c.conn.encoder
        block = encoder.encode([*_head(b"/bomb"), *[(b"x-bomb", b"a" * 4000)] * 100])
        assert len(block) < 4000  # smaller than one of the fields it decodes to
        sid = c.conn.get_next_available_stream_id()
        c.send_frames([HeadersFrame(sid, block, flags=["END_HEADERS", "END_STREAM"])])
        assert _goaway(c) == ErrorCodes.ENHANCE_YOUR_CALM
    assert setup.seen() == before + 1


@pytest.mark.parametrize("flood", ["ping", "settings", "empty-data", "empty-headers"])
def test_control_frame_floods_end_in_enhance_your_calm(setup: Setup, flood: str) -> None:
    before, rss = setup.seen(), setup.worker_rss_kib()
    with setup.client() as c:
        if flood == "empty-data":
            sid = c.request(APP, "/slowly", method="POST", end=False)
        for i in range(3000):
            if flood == "ping":
                c.conn.ping(b"%08d" % i)
            elif flood == "settings":
                c.conn.update_settings({SettingCodes.HEADER_TABLE_SIZE: 4096})
            elif flood == "empty-data":
                c.conn.send_data(sid, b"")
            else:  # HEADERS with an empty block: a stream without a request
                c.send_frames([HeadersFrame(2 * i + 1, b"", flags=["END_HEADERS"])])
            if i % 200 == 0:
                c.flush()
                if c.send_failed:
                    break  # cut: more bytes would make the server's kernel reset
        c.flush()
        # Empty HEADERS: malformed streams, or past SETTINGS_MAX_CONCURRENT_STREAMS in
        # one read refused ones; both spend the reset budget.
        assert _goaway(c) == ErrorCodes.ENHANCE_YOUR_CALM
    assert setup.seen() == before
    assert setup.worker_rss_kib() - rss < 30 * 1024


def test_window_update_overflow_is_a_flow_control_error(setup: Setup) -> None:
    with setup.client() as c:
        c.send_frames([WindowUpdateFrame(0, window_increment=2**31 - 1)])
        assert _goaway(c) == ErrorCodes.FLOW_CONTROL_ERROR


def test_stream_ids_going_backwards_are_a_protocol_error(setup: Setup) -> None:
    before = setup.seen()
    with setup.client() as c:
        block = c.conn.encoder.encode(_head(b"/five"))
        c.send_frames([HeadersFrame(5, block, flags=["END_HEADERS"])])
        block = c.conn.encoder.encode(_head(b"/three"))
        c.send_frames([HeadersFrame(3, block, flags=["END_HEADERS", "END_STREAM"])])
        assert _goaway(c) == ErrorCodes.PROTOCOL_ERROR
    assert setup.seen() - before <= 1


def test_data_on_a_closed_stream_is_a_stream_closed_error(setup: Setup) -> None:
    with setup.client() as c:
        r = c.get(APP, "/closed")
        assert r.status == 200 and r.ended
        sid = next(iter(c.responses))
        c.send_frames([DataFrame(sid, b"late", flags=["END_STREAM"])])
        # RFC 9113 6.1: a stream error STREAM_CLOSED; the connection lives on.
        assert c.pump(lambda: ("RstStreamFrame", sid, ErrorCodes.STREAM_CLOSED) in c.frames)
        assert c.get(APP, "/after").status == 200
        assert c.goaway is None


# -- timeouts and shutdown -----------------------------------------------------------

def test_client_that_never_opens_its_window_is_closed_after_the_send_timeout(
        ca: CA, tmp_path: Path) -> None:
    # Unbuffered: the backend waits for the client, and the connection times it.
    with running(tmp_path, ca, limits={"send_timeout": 2},
                 my_app={"response_buffering": False}) as s, \
            H2Client(s.edge.https_port, APP, window=1024) as c:
        c.auto_ack = False
        sid = c.request(APP, f"/bytes/{4 * MiB}")
        started = time.monotonic()
        assert c.wait_closed(timeout=30)
        assert time.monotonic() - started >= 1.5
        assert not c.responses[sid].ended
        assert eventually(lambda: s.edge.metric("tlsedge_limits_hit_total",
                                                limit="send_timeout") >= 1)


def test_sigterm_finishes_open_streams_and_refuses_new_ones_with_goaway(
        ca: CA, tmp_path: Path) -> None:
    with running(tmp_path, ca) as s, H2Client(s.edge.https_port, APP) as c, \
            H2Client(s.edge.https_port, APP) as idle:
        edge, app = s.edge, s.app
        assert idle.get(APP, "/warm").status == 200
        slow = c.request(APP, "/slow?2")
        assert eventually(lambda: any(x.path == "/slow?2" for x in app.seen), 10)
        edge.signal(signal.SIGTERM)
        # The idle connection is closed at once (GOAWAY, then EOF).
        assert idle.wait_closed(timeout=5)
        assert ("GoAwayFrame", 0, ErrorCodes.NO_ERROR) in idle.frames
        # The busy one gets GOAWAY naming its stream as the last one taken on.
        assert c.pump(lambda: c.goaway is not None, timeout=10)
        assert c.goaway is not None and c.goaway.last_stream_id == slow
        late = c.request_after_goaway(APP, "/late")
        assert c.pump(lambda: c.responses[slow].finished, timeout=15)
        assert c.responses[slow].status == 200
        c.pump(lambda: c.responses[late].finished, timeout=5)
        assert c.responses[late].reset == ErrorCodes.REFUSED_STREAM or c.closed
        assert not any(x.path == "/late" for x in app.seen)
        assert c.wait_closed(timeout=15)
        assert edge.proc is not None and edge.proc.wait(30) == 0


def test_reload_that_drops_h2_from_alpn_sends_goaway_and_lets_streams_finish(
        ca: CA, tmp_path: Path) -> None:
    with running(tmp_path, ca) as s, H2Client(s.edge.https_port, APP) as c, \
            H2Client(s.edge.https_port, APP) as idle:
        edge, app = s.edge, s.app
        assert idle.get(APP, "/warm").status == 200
        # A reload that leaves ALPN as it was leaves open connections alone.
        edge.reload(wait_for="reloaded:")
        assert idle.get(APP, "/still-h2").status == 200
        assert idle.goaway is None and not idle.closed
        slow = c.request(APP, "/slow?2")
        assert eventually(lambda: any(x.path == "/slow?2" for x in app.seen), 10)
        edge.config["tls"]["alpn"] = ["http/1.1"]
        edge.write_config()
        edge.reload(wait_for="reloaded:")
        # The idle connection: GOAWAY, then closed.
        assert idle.wait_closed(timeout=10)
        assert ("GoAwayFrame", 0, ErrorCodes.NO_ERROR) in idle.frames
        # The busy one: GOAWAY naming its stream as the last one; the stream finishes.
        assert c.pump(lambda: c.goaway is not None, timeout=10)
        assert c.goaway is not None and c.goaway.last_stream_id == slow
        assert c.pump(lambda: c.responses[slow].finished, timeout=15)
        assert c.responses[slow].status == 200 and c.responses[slow].ended
        assert c.wait_closed(timeout=15)
        # New connections negotiate what is offered now.
        with H2Client(edge.https_port, APP) as fresh:
            assert fresh.alpn == "http/1.1"
