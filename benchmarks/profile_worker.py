"""CPU cost of one tlsedge worker per keep-alive request and per full TLS handshake.

Starts `tlsedge run` (1 worker) in front of a backend on 127.0.0.1:18888 (nginx
`return 200` is ideal: it is never the bottleneck), drives it with wrk (keep-alive,
HTTPS) and h2load (Connection: close, resumption off through the noresume shim from
`benchmarks/.cache/bin`), and prints req/s and the worker's CPU microseconds per
request / handshake from /proc. Rounds of several code trees are interleaved, so a
busy machine hurts them alike; medians are printed at the end.

    python benchmarks/profile_worker.py --rounds 3 --code /tmp/base --code .
    python benchmarks/profile_worker.py --nginx-pid /tmp/perf/nginx-tls.pid --nginx-port 18443
    python benchmarks/profile_worker.py --profile /tmp/prof.txt   # py-spy, raw format
    python benchmarks/profile_worker.py --inproc --code /tmp/base --code .

A code tree is put first on PYTHONPATH of the edge (`.`: the working tree).

`--inproc` needs no nginx, wrk or TLS: it drives the data plane's request path
(session, exchange, pooled backend connection) in-process with fake transports and
prints the Python time per request (min over runs) and the bytecodes executed per
request. The bytecode count is deterministic, so it still compares trees when a
shared machine makes CPU-per-request numbers swing by 50%; it leaves out TLS,
syscalls and the event loop, which no Python change in the data plane touches.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.certgen import CA  # noqa: E402
from tests.support.edge import Edge  # noqa: E402

HOST = "app.bench.test"
TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pids: list[int], part: slice = slice(11, 13)) -> float:
    """User + system CPU seconds of `pids` (part=slice(11, 12): user only)."""
    total = 0.0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += sum(int(f) for f in fields[part]) / TICK
    return total


def keepalive(pids: list[int], port: int, seconds: int) -> tuple[float, float, float]:
    """(requests/s, CPU us per request, of which user) of wrk -t1 -c32 over HTTPS."""
    cmd = ["wrk", "-t1", "-c32", f"-d{seconds}s", "-H", f"Host: {HOST}",
           f"https://127.0.0.1:{port}/"]
    before, user_before = cpu_seconds(pids), cpu_seconds(pids, slice(11, 12))
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    used = cpu_seconds(pids) - before
    user = cpu_seconds(pids, slice(11, 12)) - user_before
    requests = int(next(line for line in out.splitlines() if "requests in" in line).split()[0])
    rate = float(next(line for line in out.splitlines()
                      if line.startswith("Requests/sec")).split()[1])
    return rate, used / requests * 1e6, user / requests * 1e6


def handshakes(pids: list[int], port: int, n: int) -> tuple[float, float, float]:
    """(handshakes/s, CPU us per full handshake, of which user) of h2load, one request
    each."""
    shims = sorted((ROOT / "benchmarks/.cache/bin").glob("noresume-*.so"),
                   key=lambda p: p.stat().st_mtime)
    if not shims:
        raise SystemExit("no noresume shim in benchmarks/.cache/bin (build it with cbuild.py)")
    env = {**os.environ, "LD_PRELOAD": str(shims[-1]), "NORESUME_MAX_TLS": "1.3",
           "NORESUME_STATS": os.path.join(tempfile.gettempdir(), "noresume-stats")}
    cmd = ["h2load", "--h1", "-n", str(n), "-c", "32", "-t", "1", "-H", "Connection: close",
           "-H", f":authority: {HOST}", f"https://127.0.0.1:{port}/"]
    before, user_before = cpu_seconds(pids), cpu_seconds(pids, slice(11, 12))
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True).stdout
    used = cpu_seconds(pids) - before
    user = cpu_seconds(pids, slice(11, 12)) - user_before
    line = next(line for line in out.splitlines() if "finished in" in line)
    rate = float(line.split(",")[1].split()[0])
    return rate, used / n * 1e6, user / n * 1e6


def start_edge(workdir: Path, code: str | None) -> Edge:
    ca = CA.new("bench")
    cert, key = ca.issue([f"*.{HOST.split('.', 1)[1]}"]).write(workdir, "platform")
    config = {"platform_domain": HOST.split(".", 1)[1], "workers": 1,
              "tls": {"platform_certificate": {"cert": str(cert), "key": str(key)}},
              "store": {"path": "store"}, "apps": {"app": {"backends": ["127.0.0.1:18888"]}}}
    env = {}
    if code is not None:
        path = str(Path(code).resolve())
        env["PYTHONPATH"] = path + os.pathsep + os.environ.get("PYTHONPATH", "")
    return Edge(workdir, config, env=env)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--code", action="append", help="code tree(s) to compare (default: .)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=6, help="wrk duration per round")
    ap.add_argument("--handshakes", type=int, default=3000, help="per round; 0: skip")
    ap.add_argument("--profile", help="write a py-spy raw profile of the keep-alive load")
    ap.add_argument("--native", action="store_true", help="py-spy --native (C frames too)")
    ap.add_argument("--nginx-pid", help="measure this nginx master's workers instead")
    ap.add_argument("--nginx-port", type=int, default=18443)
    ap.add_argument("--inproc", action="store_true",
                    help="in-process request path only: Python us and bytecodes per request")
    ap.add_argument("--inproc-child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.inproc_child:
        inproc_child(args.inproc_child, runs=30, per_run=5000)
        return
    if args.inproc:
        inproc(args.code or ["."], args.rounds)
        return
    results: dict[str, list[tuple[float, ...]]] = {}
    for _ in range(args.rounds):
        for code in args.code or ["."]:
            if args.nginx_pid:
                master = int(Path(args.nginx_pid).read_text())
                kids = Path(f"/proc/{master}/task/{master}/children").read_text().split()
                pids, port, edge = [int(k) for k in kids], args.nginx_port, None
                code = "nginx"
            else:
                workdir = Path(tempfile.mkdtemp(prefix="tlsedge-bench-"))
                edge = start_edge(workdir, code)
                pids, port = edge.worker_pids(), edge.https_port
            try:
                keepalive(pids, port, 1)  # warm the pools and caches
                ka = keepalive(pids, port, args.seconds)
                hs = (handshakes(pids, port, args.handshakes) if args.handshakes
                      else (0.0, 0.0, 0.0))
                if args.profile and edge is not None:
                    spy = subprocess.Popen(
                        [str(ROOT / ".venv/bin/py-spy"), "record", "-p", str(pids[0]), "-d",
                         str(args.seconds - 1), "-f", "raw", "-o", args.profile, "-r", "200",
                         *(["--native"] if args.native else [])],
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                    keepalive(pids, port, args.seconds)
                    spy.wait()
            finally:
                if edge is not None:
                    edge.stop()
            row = (*ka, *hs)
            print(_line(code, row), flush=True)
            results.setdefault(code, []).append(row)
    print("medians:")
    for code, rows in results.items():
        print(_line(code, [statistics.median(col) for col in zip(*rows, strict=True)]))


REQUEST = b"GET / HTTP/1.1\r\nHost: app.bench.test\r\n\r\n"
# nginx's answer to `return 200 "<100 bytes>"`, as the keep-alive benchmark gets it.
RESPONSE = (b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\n"
            b"Date: Fri, 27 Nov 2026 01:31:19 GMT\r\n"
            b"Content-Type: application/octet-stream\r\nContent-Length: 100\r\n"
            b"Connection: keep-alive\r\n\r\n" + b"0123456789" * 10)


class _FakeTransport:
    """Takes writes and counts them; never closes unless asked."""

    def __init__(self) -> None:
        self.written = 0
        self.closing = False

    def write(self, data: bytes) -> None:
        self.written += len(data)

    def is_closing(self) -> bool:
        return self.closing

    def get_extra_info(self, name: str, default: object = None) -> object:
        return default

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def close(self) -> None:
        self.closing = True

    abort = close


def inproc_child(code: str, runs: int, per_run: int) -> None:
    """Measure `code`'s request path in this process (run with the tree on sys.path)."""
    tree = Path(code).resolve()
    sys.path.insert(0, str(tree))
    import asyncio

    import uvloop

    import proxy
    if not Path(proxy.__file__ or "").resolve().is_relative_to(tree):
        raise SystemExit(f"{code}: imported {proxy.__file__} instead of this tree's proxy")
    from proxy.config import Limits
    from proxy.dataplane.https import HttpSession
    from proxy.dataplane.state import Live
    from proxy.dataplane.upstream import UpstreamConnection, UpstreamPool
    from proxy.routing import App, Backend, RouteTable

    async def run() -> tuple[float, float]:
        backend = Backend("127.0.0.1", 18888)
        live = Live(selector=None, tls_context=None,  # type: ignore[arg-type]
                    routes=RouteTable("bench.test", {"app": App("app", (backend,))}, {}),
                    limits=Limits(), https_port=443)
        pool = UpstreamPool(connect_timeout=5)
        conn = UpstreamConnection(backend, pool)
        conn.connection_made(_FakeTransport())  # type: ignore[arg-type]
        pool._state(backend).open = 1  # one connection, opened "by the pool"
        pool.release(conn)
        session = HttpSession(live, pool, scheme="https", port=443, peer="127.0.0.1",
                              tls_version="TLSv1.3")
        client = _FakeTransport()
        session.connection_made(client)  # type: ignore[arg-type]

        def requests(n: int) -> None:
            for _ in range(n):
                session.data_received(REQUEST)
                conn.data_received(RESPONSE)

        requests(2000)
        if client.closing or not client.written:
            raise SystemExit(f"{code}: the in-process request path did not answer")
        best = min(_timed(requests, per_run) for _ in range(runs))
        ops = 0

        def trace(frame: Any, event: str, arg: object) -> Any:
            frame.f_trace_opcodes = True
            return opcode

        def opcode(frame: Any, event: str, arg: object) -> Any:
            nonlocal ops
            if event == "opcode":
                ops += 1
            return opcode

        sys.settrace(trace)
        requests(1000)
        sys.settrace(None)
        return best, ops / 1000

    uvloop.install()
    best, ops = asyncio.run(run())
    print(f"{best:.3f} {ops:.0f}")


def _timed(fn: Callable[[int], None], n: int) -> float:
    start = time.perf_counter()
    fn(n)
    return (time.perf_counter() - start) / n * 1e6


def inproc(codes: list[str], rounds: int) -> None:
    """Interleave in-process runs of each tree in fresh interpreters; print medians."""
    results: dict[str, list[tuple[float, float]]] = {}
    for _ in range(rounds):
        for code in codes:
            out = subprocess.run(
                [sys.executable, __file__, "--inproc-child", code], check=True,
                capture_output=True, text=True).stdout.split()
            row = (float(out[0]), float(out[1]))
            results.setdefault(code, []).append(row)
            print(f"{code}: {row[0]:6.2f} us of Python per request (min of 30 runs), "
                  f"{row[1]:5.0f} bytecodes", flush=True)
    print("medians:")
    for code, rows in results.items():
        print(f"{code}: {statistics.median(r[0] for r in rows):6.2f} us, "
              f"{statistics.median(r[1] for r in rows):5.0f} bytecodes")


def _line(code: str, row: tuple[float, ...] | list[float]) -> str:
    return (f"{code}: {row[0]:8.0f} req/s {row[1]:6.1f} us/req ({row[2]:5.1f} user) | "
            f"{row[3]:6.0f} hs/s {row[4]:6.1f} us/hs ({row[5]:5.1f} user)")


if __name__ == "__main__":
    main()
