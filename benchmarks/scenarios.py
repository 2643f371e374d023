"""The scenarios of issue 5, and HTTP/2 (issue 13). Each function runs ONE round for
one proxy (or one tlsedge variant) and returns flat numbers; compare.py alternates
proxies and rounds.

A scenario starts the programs it measures and stops them before it returns, also
on errors. Proxy CPU is utime+stime of all the proxy's processes from /proc, taken
right before and after the load run.
"""

from __future__ import annotations

import hashlib
import random
import signal
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import certs
import load
import peers
import procstat

from tests.certgen import CA

Numbers = dict[str, float]


@dataclass
class Bench:
    """What every scenario of one run shares."""

    workdir: Path
    backend_port: int
    served: dict[str, peers.Cert]
    ca: CA
    workers: int
    access_log: bool
    seconds: float
    handshakes: int           # h2load requests (= connections) per handshake run
    store_certs: int          # certificates in the big store
    sni_names: int            # distinct names the SNI clients use
    swap_count: int           # certificates replaced in the hot-swap scenario
    warmup: float = 1.0       # seconds of unmeasured keep-alive load before measuring
    rss_seconds: float = 10.0  # each of the 3 back-to-back handshake runs of `memory`
    # Idle keep-alive TLS connections held by `memory`: 10,000 where the open-files
    # limit allows (20,000 files allow 9,000: RSS is reported per 10,000 either way).
    idle_conns: int = min(10_000, peers.MAX_CONNECTIONS - 500)
    _starts: int = field(default=0)

    def opts(self, kind: str = "ecdsa", *, h2: bool = False) -> peers.ProxyOptions:
        return peers.ProxyOptions(self.workers, self.access_log, self.backend_port,
                                  self.served[kind], h2)

    def fresh_dir(self, name: str) -> Path:
        self._starts += 1
        path = self.workdir / f"{self._starts:03d}-{name}"
        path.mkdir(parents=True)
        return path


def _measure(proc: peers.Proc, run: Callable[[], Any]) -> tuple[Any, float]:
    pids = proc.pids()
    before = procstat.cpu_seconds(pids)
    result = run()
    return result, procstat.cpu_seconds(pids) - before


# -- 1 and 3: keep-alive and large responses (one start) -------------------------------------

def keepalive_and_large(bench: Bench, proxy: str, *, large: bool = True
                        ) -> dict[str, Numbers]:
    work = bench.fresh_dir(proxy)
    with peers.running(peers.start_proxy(proxy, work, bench.opts())) as proc:
        if bench.warmup:
            # Connections, upstream pools and caches exist before we count.
            load.wrk(proc.port, work, seconds=bench.warmup)
        ka, cpu = _measure(proc, lambda: load.wrk(proc.port, work, seconds=bench.seconds))
        keepalive = {"rps": ka.rps, "p50_ms": ka.p50_ms, "p99_ms": ka.p99_ms,
                     "cpu_us_per_req": cpu / max(ka.requests, 1) * 1e6,
                     "peak_rss_mib": procstat.peak_rss_kib(proc.pids()) / 1024,
                     "errors": ka.socket_errors + ka.non_2xx}
        if not large:
            return {"keepalive": keepalive}
        big, cpu = _measure(proc, lambda: load.wrk(proc.port, work, path=peers.BIG_PATH,
                                                   connections=16, seconds=bench.seconds))
        large = {"mb_per_s": big.mb_per_s, "cpu_ms_per_mb": cpu * 1e3 / max(big.bytes / 1e6, 1),
                 "errors": big.socket_errors + big.non_2xx}
    return {"keepalive": keepalive, "large": large}


# -- HTTP/2: many streams per connection (issue 13) ------------------------------------------

# (variant, path, connections, streams per connection, requests per second of --seconds)
H2_VARIANTS = (("m10", "/", 64, 10, 6000), ("m100", "/", 64, 100, 6000),
               ("1mib", peers.BIG_PATH, 16, 1, 150))


def http2(bench: Bench, proxy: str) -> dict[str, Numbers]:
    """h2load over HTTP/2 (every proxy with h2 on, same certificate and workers):
    small GETs on 64 connections with 10 and 100 streams each, and 1 MiB downloads."""
    work = bench.fresh_dir(f"{proxy}-h2")
    out: dict[str, Numbers] = {}
    with peers.running(peers.start_proxy(proxy, work, bench.opts(h2=True))) as proc:
        for variant, path, clients, streams, rate in H2_VARIANTS:
            n = max(int(rate * bench.seconds), clients * streams * 4)
            res, cpu = _measure(proc, lambda p=path, c=clients, m=streams, n=n:
                                load.h2load_streams(proc.port, work, requests=n, path=p,
                                                    clients=c, streams=m, warmup=1.0))
            # CPU over the whole run (handshakes of the 64 connections included: ~1%)
            # per request of the whole run; rate and latency of the steady part.
            row = {"rps": res.rps, "p50_ms": res.p50_ms, "p99_ms": res.p99_ms,
                   "cpu_us_per_req": cpu / n * 1e6, "failed": res.failed}
            if path == peers.BIG_PATH:
                row["mb_per_s"] = res.mb_per_s
                row["cpu_ms_per_mb"] = cpu * 1e3 / (n * peers.BIG_SIZE / 1e6)
            out[variant] = row
    return out


# -- 2: full handshakes ------------------------------------------------------------------------

def full_handshakes(bench: Bench, proxy: str, key: str) -> dict[str, Numbers]:
    """TLS 1.3 and 1.2 runs with one certificate type; one full handshake per request."""
    work = bench.fresh_dir(f"{proxy}-{key}")
    out = {}
    with peers.running(peers.start_proxy(proxy, work, bench.opts(key))) as proc:
        for version in ("1.3", "1.2"):
            before = _tlsedge_handshakes(proc) if proxy == "tlsedge" else 0.0
            hs, cpu = _measure(proc, lambda v=version: load.h2load_full_handshakes(
                proc.port, work, requests=bench.handshakes, max_tls=v))
            expected = f"TLSv{version}"
            if hs.protocol != expected:
                raise load.LoadError(f"{proxy}: negotiated {hs.protocol}, wanted {expected}")
            row = {"hs_per_s": hs.per_s, "cpu_us_per_hs": cpu / max(hs.succeeded, 1) * 1e6,
                   "failed": hs.failed, "client_full": hs.client_full,
                   "client_resumed": hs.client_resumed}
            if proxy == "tlsedge":
                row["server_handshakes"] = _tlsedge_handshakes(proc) - before
            out[f"{key}-tls{version}"] = row
    return out


def _tlsedge_handshakes(proc: peers.Proc) -> float:
    return peers.scrape(proc, "tlsedge_tls_handshakes_total", result="ok")


def verify_full_handshakes(bench: Bench) -> dict[str, Any]:
    """Short nginx runs logging $ssl_session_reused: the shim's counts must match the
    server's, and without the no-op the same client must be seen resuming."""
    work = bench.fresh_dir("verify-nginx")
    opts = peers.ProxyOptions(bench.workers, True, bench.backend_port, bench.served["ecdsa"])
    out: dict[str, Any] = {}
    with peers.running(peers.start_proxy("nginx", work, opts)) as proc:
        for resumption in (False, True):
            for version in ("1.3", "1.2"):
                log = work / "access.log"
                seen = len(log.read_text().splitlines()) if log.exists() else 0
                hs = load.h2load_full_handshakes(proc.port, work, requests=300,
                                                 max_tls=version, resumption=resumption)
                time.sleep(0.2)
                lines = log.read_text().splitlines()[seen:]
                out[f"{'resumption allowed' if resumption else 'shim'} TLS{version}"] = {
                    "requests": hs.succeeded, "client_full": hs.client_full,
                    "client_resumed": hs.client_resumed,
                    "nginx_full": sum(line.endswith(" .") for line in lines),
                    "nginx_resumed": sum(line.endswith(" r") for line in lines),
                    # $ssl_protocol: the version asked is the version served
                    "nginx_version_asked": sum(f" TLSv{version} " in line
                                               for line in lines)}
    return out


# -- memory: idle, per idle keep-alive connection, growth under handshakes (issue 14) ----

def _rss_mib(proc: peers.Proc) -> tuple[float, float]:
    """(all the proxy's processes, its largest worker) VmRSS in MiB. The worker is the
    largest child when there is a master (nginx, tlsedge, floor), else the process."""
    pids = proc.pids()
    sizes = [procstat.rss_kib(p) for p in pids]
    workers = sizes[1:] or sizes
    return sum(sizes) / 1024, max(workers) / 1024


def _settled_rss(proc: peers.Proc, timeout: float = 10.0) -> tuple[float, float]:
    """RSS once two readings 0.5 s apart differ by < 0.5 % (or at `timeout`): what a
    proxy does right after a load (closing, freeing) is not counted as its size."""
    deadline = time.monotonic() + timeout
    last = _rss_mib(proc)
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = _rss_mib(proc)
        if abs(now[0] - last[0]) < 0.005 * last[0]:
            return now
        last = now
    return last


def _idle(bench: Bench, proc: peers.Proc) -> tuple[float, float]:
    """RSS after start-up and a request on each worker (2 per worker: SO_REUSEPORT
    hashes connections, so most workers get one)."""
    for _ in range(2 * bench.workers):
        peers.https_get(proc.port)
    return _settled_rss(proc)


def memory(bench: Bench, proxy: str) -> Numbers:
    """Two starts of `proxy` (ECDSA, TLS 1.3). First: idle RSS, then `idle_conns`
    keep-alive connections opened (one request each) and held while RSS is read:
    (held - idle) per 10,000 connections. Second: three back-to-back runs of
    `rss_seconds` of full handshakes, RSS after each; growth of the 2nd and 3rd."""
    out: Numbers = {}
    many = peers.TlsedgeExtras(connections=bench.idle_conns + 1000)
    with peers.running(peers.start_proxy(proxy, bench.fresh_dir(f"{proxy}-idle"),
                                         bench.opts(), many)) as proc:
        out["rss_idle_mib"], out["worker_rss_idle_mib"] = idle = _idle(bench, proc)
        with load.holding(proc.port, bench.idle_conns) as held:
            loaded = _settled_rss(proc)
        if held.closed_early:
            raise load.LoadError(f"{proxy} closed {held.closed_early} idle connections "
                                 "during the measurement")
        out["rss_per_10k_idle_mib"] = (loaded[0] - idle[0]) / held.held * 10_000
        out["idle_conns_open_s"] = held.seconds
    work = bench.fresh_dir(f"{proxy}-growth")
    with peers.running(peers.start_proxy(proxy, work, bench.opts())) as proc:
        _idle(bench, proc)
        rss = []
        total = 0
        for _ in range(3):
            total += _handshakes_for(proc.port, work, bench.rss_seconds)
            rss.append(_settled_rss(proc))
        out["hs_in_rss_runs"] = total
        out["rss_after_hs_mib"], out["worker_rss_after_hs_mib"] = rss[-1]
        pids = proc.pids()
        out["worker_peak_rss_mib"] = max(procstat.hwm_kib(p) for p in pids[1:] or pids) / 1024
        out["rss_growth_run2_pct"] = (rss[1][0] - rss[0][0]) / rss[0][0] * 100
        out["rss_growth_run3_pct"] = (rss[2][0] - rss[1][0]) / rss[1][0] * 100
    return out


def _handshakes_for(port: int, work: Path, seconds: float) -> int:
    """Full TLS 1.3 handshakes for about `seconds` (h2load runs of ~1 s back to back:
    its -D mode hangs with closing connections); how many succeeded."""
    total = 0
    chunk = 500
    started = time.monotonic()
    while (elapsed := time.monotonic() - started) < seconds:
        if total:  # about a second per run at the rate seen so far, never past the end
            rate = total / elapsed
            chunk = max(200, int(rate * min(1.0, seconds - elapsed)))
        hs = load.h2load_full_handshakes(port, work, requests=chunk)
        if hs.failed or hs.protocol != "TLSv1.3":
            raise load.LoadError(f"handshake run: {hs.failed} failed, {hs.protocol}")
        total += hs.succeeded
    return total


# -- 4 and 6: many names, start-up at scale ----------------------------------------------------

def _served_fingerprint(port: int, name: str) -> str:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", port), timeout=2) as raw, \
            ctx.wrap_socket(raw, server_hostname=name) as s:
        der = s.getpeercert(binary_form=True) or b""
    return hashlib.sha256(der).hexdigest()


def _first_handshake(proc: peers.Proc, name: str, fingerprint: str, timeout: float) -> float:
    """Seconds from spawn until a handshake for `name` is served with its own certificate."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(f"tlsedge exited:\n{proc.log_tail()}")
        try:
            if _served_fingerprint(proc.port, name) == fingerprint:
                return time.monotonic() - proc.started_at
        except (OSError, ssl.SSLError):
            pass
        time.sleep(0.01)
    raise RuntimeError(f"no handshake for {name} in {timeout:g}s:\n{proc.log_tail()}")


def many_names(bench: Bench, variant: str, seed: int) -> Numbers:
    """`table`: the big store, SNI over `sni_names` of its domains; `1cert`: an empty store
    (the platform certificate alone), same SNI names, Host a name that certificate covers.

    Same procedure for both: a cold pass (each name once, shuffled), two unmeasured
    warm-up passes, then a measured warm pass of random names.
    """
    seeded = certs.seeded_store(bench.store_certs)
    rng = random.Random(seed)
    picks = rng.sample(range(len(seeded.names)), bench.sni_names)
    names = [seeded.names[i] for i in picks]
    work = bench.fresh_dir(f"tlsedge-names-{variant}")
    extras = peers.TlsedgeExtras(store=seeded.path if variant == "table" else work / "store")
    host = None if variant == "table" else peers.HOST
    proc = peers.start_proxy("tlsedge", work, bench.opts(), extras)
    out: Numbers = {}
    try:
        if variant == "table":
            out["first_handshake_s"] = _first_handshake(
                proc, names[0], seeded.fingerprints[picks[0]], timeout=120)
            out["worker_rss_mib_at_start"] = max(procstat.rss_kib(p)
                                                 for p in proc.pids()[1:]) / 1024
        peers.wait_ready(proc, timeout=120)

        def run(batch: list[str]) -> tuple[load.SniResult, float]:
            res, cpu = _measure(proc, lambda: load.sni_client(proc.port, batch, work,
                                                              host=host))
            if res.failed or res.resumed:
                raise load.LoadError(f"SNI client: {res.failed} failed, {res.resumed} resumed")
            return res, cpu

        cold_names = names[:]
        rng.shuffle(cold_names)
        cold, _ = run(cold_names)
        for _ in range(2):
            run([rng.choice(names) for _ in names])
        builds = peers.scrape(proc, "tlsedge_ssl_context_builds_total")
        warm, cpu = run([rng.choice(names) for _ in names])
        out.update({"cold_hs_per_s": cold.per_s, "warm_hs_per_s": warm.per_s,
                    "warm_cpu_us_per_hs": cpu / warm.ok * 1e6,
                    "warm_context_builds": peers.scrape(
                        proc, "tlsedge_ssl_context_builds_total") - builds,
                    "worker_peak_rss_mib": max(procstat.hwm_kib(p)
                                               for p in proc.pids()[1:]) / 1024})
        if seeded.seconds:
            out["store_seed_s"] = seeded.seconds
    finally:
        proc.stop()
    return out


# -- 5: hot swap under load --------------------------------------------------------------------

def hot_swap(bench: Bench) -> Numbers:
    """Keep-alive load while `swap_count` store certificates are rewritten, then while
    `swap_count` certificate files are rewritten and SIGHUP sent. Failed requests =
    wrk's socket errors + non-2xx; p99 of each run against a run without a swap."""
    swap = certs.swap_set(bench.ca, bench.swap_count)
    work = bench.fresh_dir("tlsedge-swap")
    store = work / "swap-store"
    certs.write_store(store, certs.swap_records(swap, 0))
    files = certs.write_static_files(work / "files", swap, 0)
    gen1 = certs.swap_records(swap, 1)
    extras = peers.TlsedgeExtras(store=store, certificates=tuple(files))
    out: Numbers = {}
    with peers.running(peers.start_proxy("tlsedge", work, bench.opts(), extras),
                       timeout=60) as proc:
        load.wrk(proc.port, work, seconds=max(bench.warmup, 1))
        before = load.wrk(proc.port, work, seconds=bench.seconds)
        out["p99_before_ms"] = before.p99_ms
        out["failed_before"] = before.socket_errors + before.non_2xx

        def store_swap() -> None:
            out["store_write_s"] = certs.write_store(store, gen1)

        def sighup_swap() -> None:
            certs.write_static_files(work / "files", swap, 1)
            proc.popen.send_signal(signal.SIGHUP)

        for label, action in (("store", store_swap), ("sighup", sighup_swap)):
            during = _with_action(proc, work, bench.seconds, action)
            out[f"failed_{label}"] = during.socket_errors + during.non_2xx
            out[f"p99_{label}_ms"] = during.p99_ms
            out[f"rps_{label}"] = during.rps
        time.sleep(1.0)  # the store watch polls every 0.1 s; the swap must have landed
        gen = swap.generations[1]
        fp_store = _served_fingerprint(proc.port, swap.store_names[0])
        fp_file = _served_fingerprint(proc.port, swap.static_names[0])
        out["swapped_store_served"] = float(fp_store == gen[0][2])
        out["swapped_file_served"] = float(fp_file == gen[len(swap.store_names)][2])
    return out


def _with_action(proc: peers.Proc, work: Path, seconds: float,
                 action: Callable[[], None]) -> load.WrkResult:
    """A keep-alive run with `action` started a third of the way in (in a thread)."""
    result: list[load.WrkResult] = []
    runner = threading.Thread(target=lambda: result.append(
        load.wrk(proc.port, work, seconds=seconds)), name="wrk")
    runner.start()
    try:
        time.sleep(seconds / 3)
        action()
    finally:
        runner.join(timeout=seconds + 90)
    if not result:
        raise load.LoadError("wrk did not finish during the hot swap")
    return result[0]
