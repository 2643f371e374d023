"""Python cost of one HTTP/2 request on the data plane, in-process and deterministic.

Drives `H2Session` with an h2 client connection over fake transports: each round the
client sends M requests in one read (as `h2load -m M`), each stream takes an idle
pooled backend connection (fast path) and gets a 100-byte answer from it, and the
client reads what the session wrote (giving the windows back, as h2load does). Prints
per request: the Python time (min over runs) and the bytecodes executed, which is
exact, so trees compare on a busy machine. The HTTP/1.1 keep-alive request is
measured the same way (`benchmarks/profile_worker.py --inproc`'s path) for the ratio.

    .venv/bin/python benchmarks/h2_inproc.py --code /tmp/base --code .
    .venv/bin/python benchmarks/h2_inproc.py --profile 100     # cProfile, top 30
    SORT=cumulative TOP=70 .venv/bin/python benchmarks/h2_inproc.py --profile 10

A code tree is put first on sys.path of a fresh interpreter (`.`: the working tree).
It leaves out TLS, syscalls and the event loop; h2 saves syscalls per request (one
read and one write per M requests), so the ratio here is an upper bound of the real one.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import profile_worker  # noqa: E402
from profile_worker import REQUEST, RESPONSE, bytecodes, timed  # noqa: E402


class _FakeTransport(profile_worker.FakeTransport):
    """Keeps what is written, for the h2 client to read back."""

    def __init__(self) -> None:
        super().__init__()
        self.out: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.out.append(data)

    def take(self) -> bytes:
        data = b"".join(self.out)
        self.out.clear()
        return data

    def get_write_buffer_size(self) -> int:
        return 0


def child(code: str, streams: int, runs: int, per_run: int, profile: bool) -> None:
    tree = Path(code).resolve()
    sys.path.insert(0, str(tree))
    import asyncio

    import h2.config
    import h2.connection
    import uvloop

    import proxy
    if not Path(proxy.__file__ or "").resolve().is_relative_to(tree):
        raise SystemExit(f"{code}: imported {proxy.__file__} instead of this tree's proxy")
    from proxy.config import Limits
    from proxy.dataplane.h2session import H2Session
    from proxy.dataplane.https import HttpSession
    from proxy.dataplane.state import Live
    from proxy.dataplane.upstream import UpstreamConnection, UpstreamPool
    from proxy.routing import App, Backend, RouteTable

    async def run() -> tuple[float, float, float, float]:
        backend = Backend("127.0.0.1", 18888)
        live = Live(selector=None, tls_context=None,  # type: ignore[arg-type]
                    routes=RouteTable("bench.test", {"app": App("app", (backend,))}, {}),
                    limits=Limits(), https_port=443)

        def pooled(n: int) -> tuple[UpstreamPool, list[UpstreamConnection]]:
            pool = UpstreamPool(connect_timeout=5, max_connections=n)
            conns = []
            for _ in range(n):
                conn = UpstreamConnection(backend, pool)
                conn.connection_made(_FakeTransport())  # type: ignore[arg-type]
                pool._state(backend).open += 1
                pool.release(conn)
                conns.append(conn)
            return pool, conns

        pool, conns = pooled(streams)

        session = H2Session(live, pool, port=443, peer="127.0.0.1", tls_version="TLSv1.3")
        server_side = _FakeTransport()
        session.connection_made(server_side)  # type: ignore[arg-type]
        # The client's bytes are made beforehand (its h2 work is not the edge's): per
        # round, M requests and a WINDOW_UPDATE giving back the last round's DATA.
        rounds = max(1, per_run // streams)
        warm = 200 // streams + 1
        total = warm + (max(1, 20000 // streams) if profile else runs * rounds + 20)
        client = h2.connection.H2Connection(h2.config.H2Configuration(
            client_side=True, header_encoding=None))
        client.initiate_connection()
        head = [(b":method", b"GET"), (b":scheme", b"https"),
                (b":authority", b"app.bench.test"), (b":path", b"/")]
        batches = []
        for i in range(total):
            for _ in range(streams):
                client.send_headers(client.get_next_available_stream_id(), head,
                                    end_stream=True)
            if i:
                client.increment_flow_control_window(streams * 100)
            client.streams.clear()  # never answered here: h2 would count them open
            batches.append(client.data_to_send())
        batch = iter(batches)

        def h2_rounds(n: int) -> None:
            for _ in range(n):
                session.data_received(next(batch))
                for conn in conns:
                    conn.data_received(RESPONSE)
                server_side.out.clear()

        h1_pool, (h1_conn,) = pooled(1)
        h1 = HttpSession(live, h1_pool, scheme="https", port=443, peer="127.0.0.1",
                         tls_version="TLSv1.3")
        h1_client = _FakeTransport()
        h1.connection_made(h1_client)  # type: ignore[arg-type]

        def h1_requests(n: int) -> None:
            for _ in range(n):
                h1.data_received(REQUEST)
                h1_conn.data_received(RESPONSE)
                h1_client.out.clear()

        h2_rounds(warm)
        if session.streams or len(pool._state(backend).idle) != streams:
            raise SystemExit(f"{code}: the in-process HTTP/2 path did not answer")
        h1_requests(500)
        if profile:
            import cProfile
            import pstats
            prof = cProfile.Profile()
            prof.enable()
            h2_rounds(max(1, 20000 // streams))
            prof.disable()
            stats = pstats.Stats(prof).sort_stats(os.environ.get("SORT", "tottime"))
            stats.print_stats(int(os.environ.get("TOP", "30")))
            return 0, 0, 0, 0
        h2_best = min(timed(h2_rounds, rounds) for _ in range(runs)) / streams
        h1_best = min(timed(h1_requests, per_run) for _ in range(runs))
        if session.streams or len(pool._state(backend).idle) != streams:
            raise SystemExit(f"{code}: the in-process HTTP/2 path did not answer")
        h2_ops = bytecodes(h2_rounds, 20) / (20 * streams)
        return h2_best, h2_ops, h1_best, bytecodes(h1_requests, 500) / 500

    uvloop.install()
    print(*(f"{x:.2f}" for x in asyncio.run(run())))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--code", action="append", help="code tree (repeat to compare)")
    ap.add_argument("--streams", type=int, action="append", help="M (default 10 and 100)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--profile", type=int, metavar="M", help="cProfile the h2 path at -m M")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        code, m = args.child
        child(code, int(m), runs=7, per_run=3000, profile=args.profile is not None)
        return
    codes = args.code or ["."]
    if args.profile:
        subprocess.run([sys.executable, __file__, "--child", codes[0], str(args.profile),
                        "--profile", str(args.profile)], check=True)
        return
    results: dict[tuple[str, int], list[list[float]]] = {}
    for _ in range(args.rounds):
        for m in args.streams or [10, 100]:
            for code in codes:
                out = subprocess.run([sys.executable, __file__, "--child", code, str(m)],
                                     check=True, capture_output=True, text=True).stdout
                row = [float(x) for x in out.split()]
                results.setdefault((code, m), []).append(row)
                print(_line(code, m, row), flush=True)
    print("medians:")
    for (code, m), rows in results.items():
        print(_line(code, m, [statistics.median(c) for c in zip(*rows, strict=True)]))


def _line(code: str, m: int, row: list[float]) -> str:
    h2_us, h2_ops, h1_us, h1_ops = row
    return (f"{code:>16} -m {m:<4} h2 {h2_us:6.2f} us {h2_ops:7.0f} ops/req | "
            f"h1 {h1_us:6.2f} us {h1_ops:6.0f} ops/req | ratio us {h2_us / h1_us:.2f} "
            f"ops {h2_ops / h1_ops:.2f}")


if __name__ == "__main__":
    main()
