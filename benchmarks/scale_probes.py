"""Measurements of one running node at scale (issue #17), for benchmarks/cluster_scale.py:
its workers' event-loop stalls, a /metrics scrape, admin API pages, `tlsedge domains
list --json`, a bulk add of domains, a worker SIGKILLed, and a start-up on the file
store. Each returns a JSON-ready dict; nothing here writes outside the node's work dir.
"""

from __future__ import annotations

import concurrent.futures
import gc
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(HERE), str(ROOT)]

from tests.support.admin import AdminClient, admin_token  # noqa: E402
from tests.support.edge import Edge  # noqa: E402

STALL_BUCKETS = ("0.002", "0.005", "0.01", "0.025", "0.05", "0.1", "0.25", "0.5", "1.0",
                 "2.5", "+Inf")


def percentiles(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    if not ordered:
        return {}
    return {"n": len(ordered), "p50": round(statistics.median(ordered), 1),
            "p99": round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))], 1),
            "max": round(ordered[-1], 1)}


def stalls(edge: Edge) -> dict[str, float]:
    """The workers' stall histogram (summed over the workers), from one scrape:
    bucket -> count."""
    found = dict.fromkeys(STALL_BUCKETS, 0.0)
    for le, value in re.findall(r'^tlsedge_event_loop_stall_seconds_bucket\{le="([^"]+)"\} '
                                r"(\S+)$", edge.metrics(), re.M):
        if le in found:
            found[le] += float(value)
    return found


def stalls_between(before: dict[str, float], after: dict[str, float]) -> dict[str, Any]:
    """Stalls in a window: how many took over 50 ms, and the bucket the longest fell in."""
    delta = {le: after[le] - before.get(le, 0.0) for le in STALL_BUCKETS}
    longest = next((le for le in STALL_BUCKETS if delta[le] == delta["+Inf"]), "+Inf")
    return {"timers": int(delta["+Inf"]), "over_50ms": int(delta["+Inf"] - delta["0.05"]),
            "longest_at_most_s": longest}


def startup_stall(edge: Edge) -> float:
    """The longest stall of a live worker since it started serving (the gauge)."""
    return round(edge.metric("tlsedge_event_loop_stall_max_seconds"), 3)


def scrape(edge: Edge, times: int = 20) -> dict[str, Any]:
    sizes, took = [], []
    for _ in range(times):
        started = time.perf_counter()
        text = edge.metrics()
        took.append((time.perf_counter() - started) * 1000)
        sizes.append(len(text.encode()))
    series = sum(1 for line in text.splitlines() if line and not line.startswith("#"))
    return {"bytes": max(sizes), "series": series, "ms": percentiles(took)}


def admin_pages(edge: Edge, queries: dict[str, str], calls: int = 100) -> dict[str, Any]:
    """`calls` GET /api/v1/domains per query (kind -> query string): latency and size,
    and each call's latency in call order (`samples_ms`: which calls are slow), with
    the longest pause this process's own garbage collector made meanwhile."""
    api = AdminClient(edge, token=admin_token(edge))
    out: dict[str, Any] = {}
    collecting = [0.0, 0.0]  # when the current collection began, the longest one (s)

    def collector(phase: str, _info: dict[str, int]) -> None:
        if phase == "start":
            collecting[0] = time.perf_counter()
        else:
            collecting[1] = max(collecting[1], time.perf_counter() - collecting[0])

    gc.callbacks.append(collector)
    try:
        for kind, query in queries.items():
            out[kind] = _pages(api, query, calls, collecting)
    finally:
        gc.callbacks.remove(collector)
    return out


def _pages(api: AdminClient, query: str, calls: int, collecting: list[float]
           ) -> dict[str, Any]:
    took, rows = [], 0
    collecting[1] = 0.0
    began = time.time()
    for _ in range(calls):
        started = time.perf_counter()
        reply = api.request("GET", f"/api/v1/domains?{query}")
        took.append((time.perf_counter() - started) * 1000)
        if reply.status != 200:
            raise RuntimeError(f"admin API {query}: {reply.status} {reply.text[:200]}")
        rows = len(reply.json()["domains"])
    return {"query": query, "rows": rows, "ms": percentiles(took), "started_at": began,
            "client_gc_max_ms": round(collecting[1] * 1000, 1),
            "samples_ms": [round(t, 1) for t in took],
            "slowest": [f"#{i}:{took[i]:.0f}" for i in sorted(
                range(len(took)), key=took.__getitem__)[-3:][::-1]]}


def cli_list(edge: Edge) -> dict[str, Any]:
    """`tlsedge domains list --json | wc -l`: lines, seconds, the CLI's peak RSS (VmHWM,
    read by the CLI itself at its exit: ru_maxrss would count our memory at the fork)."""
    code = ("import sys\nfrom proxy.cli import main\ntry:\n    main()\nfinally:\n"
            "    print(open('/proc/self/status').read(), file=sys.stderr)")
    started = time.monotonic()
    cli = subprocess.Popen(
        [sys.executable, "-c", code, "domains", "list", "--json", "-c",
         str(edge.config_path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    wc = subprocess.run(["wc", "-l"], stdin=cli.stdout, capture_output=True, text=True)
    assert cli.stdout is not None and cli.stderr is not None
    cli.stdout.close()
    status = cli.stderr.read().decode()
    code_ = cli.wait()
    found = re.search(r"VmHWM:\s+(\d+)", status)
    return {"exit": code_, "lines": int(wc.stdout.split()[0]),
            "seconds": round(time.monotonic() - started, 2),
            "peak_rss_mib": round(int(found.group(1)) / 1024, 1) if found else None}


def bulk_add(edge: Edge, write: Callable[[], list[str]], check: Callable[[str], bool],
             timeout: float = 600.0) -> dict[str, Any]:
    """Write many domains at once (`write` returns their names, in write order) while
    the node serves: the workers' stalls meanwhile, and how long until the last one
    written is served."""
    before = stalls(edge)
    started = time.monotonic()
    names = write()
    written = time.monotonic() - started
    while not check(names[-1]):
        if time.monotonic() - started > timeout:
            raise RuntimeError(f"{names[-1]} not served {timeout:g} s after a bulk add")
        time.sleep(0.05)
    served = time.monotonic() - started
    time.sleep(2.0)  # the rest of the batches, and a flush of the stall counts
    return {"domains": len(names), "write_s": round(written, 2),
            "last_served_s": round(served, 2),
            "stalls": stalls_between(before, stalls(edge))}


def kill_worker(edge: Edge, name: str, expected: str, served: Callable[[Edge, str], Any],
                probes: int = 24, timeout: float = 60.0) -> dict[str, Any]:
    """SIGKILL one worker; time until the connections its listening socket queued meanwhile
    are served (by the worker the supervisor starts in its place): `probes` handshakes
    started at once land on both workers' sockets, the last of them to finish is the
    restarted worker's first."""
    victim = sorted(edge.worker_pids())[0]
    killed = time.monotonic()
    os.kill(victim, signal.SIGKILL)
    done: list[float] = []

    def probe() -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if served(edge, name) == expected:
                done.append(time.monotonic() - killed)
                return
            time.sleep(0.01)

    with concurrent.futures.ThreadPoolExecutor(probes) as pool:
        for _ in range(probes):
            pool.submit(probe)
    restarted = [p for p in edge.worker_pids() if p != victim]
    return {"serving_again_s": round(max(done), 2) if len(done) == probes else None,
            "probes_served": len(done), "workers": len(restarted)}


def files_startup(edge: Edge, name: str, expected: str, served: Callable[[Edge, str], Any],
                  timeout: float) -> dict[str, Any]:
    """A node on the file store: process start -> first handshake for `name`."""
    started = time.monotonic()
    proc_started: list[float] = []

    def start() -> None:
        edge.start(timeout=timeout)
        proc_started.append(time.monotonic() - started)

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        running = pool.submit(start)
        while served(edge, name) != expected:
            if running.done():
                running.result()
            if time.monotonic() - started > timeout:
                raise RuntimeError(f"no handshake for {name} in {timeout:g} s")
            time.sleep(0.01)
        first = time.monotonic() - started
        running.result()
    return {"first_handshake_s": round(first, 3), "serving_log_s": round(proc_started[0], 3)}
