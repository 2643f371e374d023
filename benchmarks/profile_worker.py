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
    python benchmarks/profile_worker.py --handshake-calls --code /tmp/base --code .

A code tree is put first on PYTHONPATH of the edge (`.`: the working tree).

`--inproc` needs no nginx, wrk or TLS: it drives the data plane's request path
(session, exchange, pooled backend connection) in-process with fake transports and
prints the Python time per request (min over runs) and the bytecodes executed per
request. The bytecode count is deterministic, so it still compares trees when a
shared machine makes CPU-per-request numbers swing by 50%; it leaves out TLS,
syscalls and the event loop, which no Python change in the data plane touches.

`--handshake-calls` counts what one full TLS handshake costs the worker in Python,
deterministically: an in-process HTTPS listener (`Worker`, real TLS on 127.0.0.1,
ECDSA P-256 or `--rsa`) takes N handshakes from a client process (each: connect,
TLS 1.3 handshake without resumption, close), under sys.setprofile and then under an
opcode tracer, and prints per handshake: Python calls, C calls, timers armed
(call_later/call_at), callbacks scheduled (call_soon), tasks, functions made
(closures, lambdas: MAKE_FUNCTION), metric writes (inc/observe/set) and bytecodes.
Also the loop thread's CPU per handshake (untraced), the listener's retained memory
per idle TLS connection (tracemalloc and RSS, `--held` N held open by the client at
once) and its RSS once they closed; with `--requests`, Python calls per keep-alive
request over TLS (to the nginx backend above).
"""

from __future__ import annotations

import argparse
import dis
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
MAKE_FUNCTION = dis.opmap["MAKE_FUNCTION"]


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


def handshakes(pids: list[int], port: int, n: int, *, tls: str = "1.3",
               clients: int = 32) -> tuple[float, float, float]:
    """(handshakes/s, CPU us per full handshake, of which user) of h2load, one request
    each, TLS `tls` at most."""
    shims = sorted((ROOT / "benchmarks/.cache/bin").glob("noresume-*.so"),
                   key=lambda p: p.stat().st_mtime)
    if not shims:
        raise SystemExit("no noresume shim in benchmarks/.cache/bin (build it with cbuild.py)")
    env = {**os.environ, "LD_PRELOAD": str(shims[-1]), "NORESUME_MAX_TLS": tls,
           "NORESUME_STATS": os.path.join(tempfile.gettempdir(), "noresume-stats")}
    cmd = ["h2load", "--h1", "-n", str(n), "-c", str(clients), "-t", "1", "-H",
           "Connection: close",
           "-H", f":authority: {HOST}", f"https://127.0.0.1:{port}/"]
    before, user_before = cpu_seconds(pids), cpu_seconds(pids, slice(11, 12))
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True).stdout
    used = cpu_seconds(pids) - before
    user = cpu_seconds(pids, slice(11, 12)) - user_before
    line = next(line for line in out.splitlines() if "finished in" in line)
    rate = float(line.split(",")[1].split()[0])
    return rate, used / n * 1e6, user / n * 1e6


def start_edge(workdir: Path, code: str | None, *, rsa: bool = False) -> Edge:
    ca = CA.new("bench")
    cert, key = ca.issue([f"*.{HOST.split('.', 1)[1]}"],
                         key_type="rsa" if rsa else "ecdsa").write(workdir, "platform")
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
    ap.add_argument("--handshake-calls", action="store_true",
                    help="in-process listener: Python calls, timers, tasks per handshake")
    ap.add_argument("--tls", default="1.3", choices=("1.2", "1.3"),
                    help="highest TLS version of the full handshakes")
    ap.add_argument("--rsa", action="store_true", help="an RSA-2048 certificate (else ECDSA P-256)")
    ap.add_argument("--verbose", action="store_true",
                    help="--handshake-calls: Python calls per handshake by function")
    ap.add_argument("--held", type=int, default=1000,
                    help="--handshake-calls: idle TLS connections held to measure memory")
    ap.add_argument("--requests", action="store_true",
                    help="--handshake-calls: also Python calls per keep-alive request over "
                         "TLS (needs the nginx backend on 127.0.0.1:18888)")
    ap.add_argument("--handshake-child", help=argparse.SUPPRESS)
    ap.add_argument("--client", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.client:
        handshake_client(args.client)
        return
    if args.handshake_child:
        handshake_child(args.handshake_child, rsa=args.rsa, verbose=args.verbose,
                        requests=args.requests, held=args.held)
        return
    if args.handshake_calls:
        handshake_calls(args.code or ["."], args.rounds, rsa=args.rsa, verbose=args.verbose,
                        requests=args.requests, held=args.held)
        return
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
                edge = start_edge(workdir, code, rsa=args.rsa)
                pids, port = edge.worker_pids(), edge.https_port
            try:
                keepalive(pids, port, 1)  # warm the pools and caches
                ka = keepalive(pids, port, args.seconds)
                hs = (handshakes(pids, port, args.handshakes, tls=args.tls)
                      if args.handshakes else (0.0, 0.0, 0.0))
                if args.profile and edge is not None:
                    spy = subprocess.Popen(
                        [str(ROOT / ".venv/bin/py-spy"), "record", "-p", str(pids[0]), "-d",
                         str(args.seconds - 1), "-f", "raw", "-o", args.profile, "-r", "200",
                         *(["--native"] if args.native else [])],
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                    keepalive(pids, port, args.seconds)
                    spy.wait()
                rss = _worker_rss_mb(pids)
            finally:
                if edge is not None:
                    edge.stop()
            row = (*ka, *hs, rss)
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


class FakeTransport:
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
        conn.connection_made(FakeTransport())  # type: ignore[arg-type]
        pool._state(backend).open = 1  # one connection, opened "by the pool"
        pool.release(conn)
        session = HttpSession(live, pool, scheme="https", port=443, peer="127.0.0.1",
                              tls_version="TLSv1.3")
        client = FakeTransport()
        session.connection_made(client)  # type: ignore[arg-type]

        def requests(n: int) -> None:
            for _ in range(n):
                session.data_received(REQUEST)
                conn.data_received(RESPONSE)

        requests(2000)
        if client.closing or not client.written:
            raise SystemExit(f"{code}: the in-process request path did not answer")
        best = min(timed(requests, per_run) for _ in range(runs))
        return best, bytecodes(requests, 1000) / 1000

    uvloop.install()
    best, ops = asyncio.run(run())
    print(f"{best:.3f} {ops:.0f}")


def bytecodes(fn: Callable[[int], None], n: int) -> int:
    """Python bytecodes executed by `fn(n)`: deterministic, unlike its time."""
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
    try:
        fn(n)
    finally:
        sys.settrace(None)
    return ops


def timed(fn: Callable[[int], None], n: int) -> float:
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


HS_WARMUP, HS_COUNTED, HS_TRACED = 100, 400, 100


def handshake_client(spec: str) -> None:
    """The client process of --handshake-calls: `port:n:seq` makes n handshakes one
    after another (connect, TLS 1.3 handshake, close); `port:n:hold` opens n TLS
    connections, says "held", and holds them until its stdin closes."""
    import socket
    import ssl
    port_text, n_text, mode = spec.split(":")
    port, n = int(port_text), int(n_text)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.set_alpn_protocols(["http/1.1"])
    if mode == "keepalive":  # n requests on one connection, each answer read whole
        with ctx.wrap_socket(socket.create_connection(("127.0.0.1", port)),
                             server_hostname=HOST) as tls:
            reader = tls.makefile("rb")
            for _ in range(n):
                tls.sendall(REQUEST)
                length = 0
                while (line := reader.readline()) not in (b"\r\n", b""):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                reader.read(length)
        return
    held = []
    for _ in range(n):
        sock = ctx.wrap_socket(socket.create_connection(("127.0.0.1", port)),
                               server_hostname=HOST)
        if mode == "hold":
            held.append(sock)
        else:
            sock.close()
    if mode == "hold":
        print("held", flush=True)
        sys.stdin.read()
    for sock in held:
        sock.close()


class _Tally:
    """sys.setprofile hook: Python calls, and metric writes among them."""

    METRIC = frozenset({"inc", "dec", "observe", "set"})

    def __init__(self) -> None:
        self.calls = self.c_calls = self.metric_writes = 0
        # With --verbose: calls by function (file:line name), the most called first.
        self.by_function: dict[str, int] | None = None

    def __call__(self, frame: Any, event: str, arg: Any) -> None:
        if event == "call":
            self.calls += 1
            code = frame.f_code
            if self.by_function is not None:
                key = f"{code.co_filename}:{code.co_firstlineno} {code.co_qualname}"
                self.by_function[key] = self.by_function.get(key, 0) + 1
            if code.co_name in self.METRIC and "prometheus_client" in code.co_filename:
                self.metric_writes += 1
        elif event == "c_call":
            self.c_calls += 1


def handshake_child(code: str, *, rsa: bool, verbose: bool = False,
                    requests: bool = False, held: int = 1000) -> None:
    """Measure `code`'s handshake path in this process (the tree first on sys.path)."""
    tree = Path(code).resolve()
    sys.path.insert(0, str(tree))
    import asyncio
    import gc
    import tracemalloc

    import proxy
    if not Path(proxy.__file__ or "").resolve().is_relative_to(tree):
        raise SystemExit(f"{code}: imported {proxy.__file__} instead of this tree's proxy")
    from tests.support.inproc import CountingLoop, start_listener

    issued = CA.new("bench").issue([HOST], key_type="rsa" if rsa else "ecdsa")
    port = 0

    def client(n: int, mode: str = "seq") -> None:
        subprocess.run([sys.executable, __file__, "--client", f"{port}:{n}:{mode}"], check=True)

    async def settled(worker: Any, open_: int) -> None:
        deadline = time.monotonic() + 60
        while worker.open_connections != open_ or len(worker.sessions) != open_:
            if time.monotonic() > deadline:
                raise SystemExit(f"{code}: {worker.open_connections} connections open, "
                                 f"{len(worker.sessions)} sessions, expected {open_}")
            await asyncio.sleep(0.01)

    async def run() -> None:
        nonlocal port
        worker = await start_listener(issued.chain_pem, issued.key_pem,
                                      connections_per_client=2 * held,
                                      platform=HOST.split(".", 1)[1], backend=18888)
        port = worker.live.https_port
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, client, HS_WARMUP)
        await settled(worker, 0)
        # CPU of this (the loop's) thread per handshake: TLS, uvloop and our Python,
        # without the client (another process) or any tracing.
        started = time.thread_time()
        await loop.run_in_executor(None, client, HS_COUNTED)
        await settled(worker, 0)
        cpu = (time.thread_time() - started) / HS_COUNTED * 1e6
        tally = _Tally()
        if verbose:
            tally.by_function = {}
        counts = loop.counts  # type: ignore[attr-defined]
        counts.clear()
        sys.setprofile(tally)
        await loop.run_in_executor(None, client, HS_COUNTED)
        await settled(worker, 0)
        sys.setprofile(None)
        scheduled = dict(counts)
        # Not ours: the counting loop's own methods (a Python call each, and _count).
        tally.calls -= 2 * sum(scheduled.values())
        ops = made = 0

        def trace(frame: Any, event: str, arg: object) -> Any:
            frame.f_trace_opcodes = True
            return opcode

        def opcode(frame: Any, event: str, arg: object) -> Any:
            nonlocal ops, made
            if event == "opcode":
                ops += 1
                if frame.f_code.co_code[frame.f_lasti] == MAKE_FUNCTION:
                    made += 1
            return opcode

        sys.settrace(trace)
        await loop.run_in_executor(None, client, HS_TRACED)
        await settled(worker, 0)
        sys.settrace(None)
        per = float(HS_COUNTED)
        for key, n in sorted((tally.by_function or {}).items(), key=lambda kv: -kv[1]):
            print(f"  {n / per:6.2f} {key}")
        print(f"CPU {cpu:.0f} us (loop thread) | "
              f"python calls {tally.calls / per:.1f} | C calls {tally.c_calls / per:.1f} | "
              f"metric writes {tally.metric_writes / per:.2f} | bytecodes "
              f"{ops / HS_TRACED:.0f} | functions made {made / HS_TRACED:.2f} | "
              + " ".join(f"{k} {v / per:.2f}" for k, v in sorted(scheduled.items())))
        if requests:
            # Keep-alive requests over TLS to the nginx backend (see the docstring).
            await loop.run_in_executor(None, client, 200, "keepalive")
            await settled(worker, 0)
            keep = _Tally()
            sys.setprofile(keep)
            await loop.run_in_executor(None, client, HS_COUNTED, "keepalive")
            await settled(worker, 0)
            sys.setprofile(None)
            print(f"keep-alive request over TLS: python calls {keep.calls / HS_COUNTED:.1f} | "
                  f"C calls {keep.c_calls / HS_COUNTED:.1f} (one handshake in {HS_COUNTED})")
        gc.collect()
        tracemalloc.start(1)
        before = tracemalloc.get_traced_memory()[0]
        rss_before = _rss()
        holder = subprocess.Popen(  # noqa: ASYNC220 (started, not waited for, here)
            [sys.executable, __file__, "--client", f"{port}:{held}:hold"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert holder.stdout is not None and holder.stdin is not None
        await loop.run_in_executor(None, holder.stdout.readline)
        await settled(worker, held)
        gc.collect()
        traced = tracemalloc.get_traced_memory()[0] - before
        rss = _rss() - rss_before
        if verbose:
            for stat in tracemalloc.take_snapshot().statistics("lineno")[:25]:
                if stat.count >= held // 2:
                    print(f"  {stat.size / held:8.0f} B {stat.count / held:5.2f} blocks "
                          f"{stat.traceback[0]}")
        tracemalloc.stop()
        holder.stdin.close()
        await loop.run_in_executor(None, holder.wait)
        await settled(worker, 0)
        closed = _rss()
        heap = getattr(worker, "heap", None)  # the worker's trim, where the tree has one
        if heap is not None:
            heap.trim()
        print(f"idle TLS connection: {traced / held:.0f} B traced by Python, "
              f"{rss / held:.0f} B RSS ({held} held); RSS {rss_before / 2**20:.1f} MB before, "
              f"{closed / 2**20:.1f} MB once closed, {_rss() / 2**20:.1f} MB after a trim "
              f"(where the tree trims)")

    loop = CountingLoop()
    asyncio.set_event_loop(loop)
    loop.run_until_complete(run())


def _rss() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def handshake_calls(codes: list[str], rounds: int, *, rsa: bool, verbose: bool,
                    requests: bool, held: int) -> None:
    """Run --handshake-child for each tree in fresh interpreters, interleaved."""
    for _ in range(rounds):
        for code in codes:
            out = subprocess.run(
                [sys.executable, __file__, "--handshake-child", code,
                 *(["--rsa"] if rsa else []), *(["--verbose"] if verbose else []),
                 *(["--requests"] if requests else []), "--held", str(held)],
                check=True, capture_output=True, text=True).stdout
            for line in out.splitlines():
                print(f"{code}: {line}", flush=True)


def _worker_rss_mb(pids: list[int]) -> float:
    """Resident MB of `pids` now (after the handshakes: what the load left behind)."""
    total = 0
    for pid in pids:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
    return total / 1024


def _line(code: str, row: tuple[float, ...] | list[float]) -> str:
    return (f"{code}: {row[0]:8.0f} req/s {row[1]:6.1f} us/req ({row[2]:5.1f} user) | "
            f"{row[3]:6.0f} hs/s {row[4]:6.1f} us/hs ({row[5]:5.1f} user) | "
            f"RSS {row[6]:5.1f} MB")


if __name__ == "__main__":
    main()
