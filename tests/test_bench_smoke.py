"""The benchmark harness works (not a performance test): a tiny --quick run of the
keep-alive and memory scenarios for nginx, the floors and tlsedge prints the table,
writes sane JSON and the Markdown next to it; the report marks issue 14's targets; the
HTTP floor parses what it relays."""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.certgen import CA
from tests.support.ports import free_port
from tests.support.rawserver import RawServer

ROOT = Path(__file__).resolve().parent.parent

needs_tools = pytest.mark.skipif(
    not all(shutil.which(t) for t in ("nginx", "wrk", "h2load", "gcc")),
    reason="needs nginx, wrk, h2load and gcc (scripts/setup.sh test installs them)")


@pytest.fixture(scope="module")
def report_module() -> object:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import report
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    return report


@needs_tools
def test_quick_run_measures_nginx_floors_and_tlsedge_and_writes_json_and_markdown(
        tmp_path: Path) -> None:
    cmd = [sys.executable, str(ROOT / "benchmarks" / "compare.py"), "--quick",
           "--proxies", "nginx,floor,floor-http,tlsedge", "--scenarios", "keepalive,memory",
           "--workers", "1", "--seconds", "1", "--rss-seconds", "1", "--idle-conns", "300",
           "--results", str(tmp_path)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=150, cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "keep-alive requests/s" in done.stdout
    assert "share the machine's" in done.stdout
    [result] = tmp_path.glob("*.json")
    data = json.loads(result.read_text())
    med = data["medians"]["1"]
    for proxy in ("nginx", "floor", "floor-http", "tlsedge"):
        keepalive = med["keepalive"][""][proxy]
        assert keepalive["rps"] > 0
        assert keepalive["cpu_us_per_req"] > 0
        assert keepalive["errors"] == 0
        memory = med["memory"][""][proxy]
        assert memory["rss_idle_mib"] > 1
        assert memory["worker_rss_idle_mib"] <= memory["rss_idle_mib"]
        assert memory["rss_per_10k_idle_mib"] > 0  # 300 connections held cost memory
        assert memory["hs_in_rss_runs"] > 0
        assert "rss_growth_run3_pct" in memory
    ratios = [t for t in data["targets"] if t["row"] == "keep-alive CPU us/request"]
    assert ratios and ratios[0]["workers"] == 1 and ratios[0]["measured"] > 0
    markdown = result.with_suffix(".md").read_text()
    assert "| metric | nginx | floor | floor-http | tlsedge |" in markdown
    assert "tlsedge/floor |" in markdown and "tlsedge/floor-http |" in markdown
    assert "**1 worker**" in markdown
    assert "| RSS MiB per 10,000 idle keep-alive conns |" in markdown


def test_report_has_a_section_per_worker_count_ratios_to_nginx_and_the_floor(
        report_module: object) -> None:
    def proxies(nginx: float, floor: float, tlsedge: float) -> dict[str, dict[str, float]]:
        return {"nginx": {"cpu_us_per_hs": nginx}, "floor": {"cpu_us_per_hs": floor},
                "tlsedge": {"cpu_us_per_hs": tlsedge}}

    meds = {"1": {"handshakes": {"ecdsa-tls1.3": proxies(250.0, 300.0, 320.0)},
                  "memory": {"": {"tlsedge": {"worker_rss_idle_mib": 70.0,
                                              "rss_growth_run3_pct": 1.0}}}},
            "2": {"handshakes": {"ecdsa-tls1.3": proxies(250.0, 300.0, 450.0)}}}
    text, markdown, verdicts = report_module.table(meds)  # type: ignore[attr-defined]
    assert text.index("1 worker ") < text.index("2 workers")
    rows = [line for line in markdown.splitlines() if "CPU us/handshake ecdsa-tls1.3" in line]
    # nginx, floor, tlsedge, floor/nginx, tlsedge/nginx, tlsedge/floor, target, ratio, result
    assert [c.strip() for c in rows[0].split("|")[2:-1]] == [
        "250", "300", "320", "1.20", "1.28", "1.07", "<= 1.3x nginx", "1.28x", "PASS"]
    assert rows[1].split("|")[-2].strip() == "MISS"  # 1.80x nginx at 2 workers
    by_row = {(v["workers"], v["row"]): v for v in verdicts}
    assert by_row[1, "worker RSS MiB idle"]["pass"] is False  # 70 MiB > 60
    assert by_row[1, "RSS growth % in run 3"]["pass"] is True
    assert by_row[2, "CPU us/handshake ecdsa-tls1.3"]["measured"] == pytest.approx(1.8)


class _Recorder(RawServer):
    """A backend that records what reaches it and answers each read with a response."""

    def __init__(self) -> None:
        super().__init__()
        self.got: list[bytes] = []

    def serve(self, conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(65536):
                self.got.append(data)
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")


@pytest.mark.parametrize("http", [False, True], ids=["floor", "floor-http"])
def test_the_http_floor_parses_what_it_relays_and_the_floor_does_not(
        tmp_path: Path, http: bool) -> None:
    """The HTTP floor's figures mean "HTTP parsed in Python" only if it parses: a
    request llhttp refuses never reaches its backend, while the bare floor relays it."""
    backend = _Recorder()
    chain, key = CA.new("floor test CA").issue(["floor.test"]).write(tmp_path, "floor")
    port = free_port()
    floor = subprocess.Popen(
        [sys.executable, str(ROOT / "benchmarks" / "floor.py"), "--listen",
         f"127.0.0.1:{port}", "--backend", backend.address, "--ciphers",
         "ECDHE-ECDSA-AES128-GCM-SHA256", "--cert", "floor.test", chain, key,
         *(["--http"] if http else [])])
    client = ssl.create_default_context()
    client.check_hostname, client.verify_mode = False, ssl.CERT_NONE
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                raw = socket.create_connection(("127.0.0.1", port), timeout=5)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        with client.wrap_socket(raw, server_hostname="floor.test") as tls:
            tls.sendall(b"GET / HTTP/1.1\r\nHost: floor.test\r\n\r\n")
            assert tls.recv(65536).startswith(b"HTTP/1.1 200 OK")
            tls.sendall(b"GET / HTTP/1.1\r\nHost: floor.test\r\nContent-Length: -1\r\n\r\n")
            answer = b""
            with contextlib.suppress(OSError):
                answer = tls.recv(65536)
        assert len(backend.got) == (1 if http else 2)
        assert answer == (b"" if http else b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    finally:
        floor.terminate()
        floor.wait(10)
        backend.close()
