"""tlsedge side by side with nginx, HAProxy, Caddy and the floors on this machine
(issues 5 and 14).

One plain-HTTP nginx backend; each proxy in turn terminates TLS in front of it with
the same certificate, worker count and access-log setting. The floor
(benchmarks/floor.py) is a bare relay with tlsedge's TLS settings: tlsedge's features
cost the distance floor -> tlsedge. The HTTP floor (floor.py --http, "floor-http") is
that relay with httptools parsing every request and response on the way: what parsing
HTTP/1.1 in Python costs at the least, so floor-http -> tlsedge is what tlsedge's
features cost above it. Every worker count of --workers is measured in
every round; proxies and worker counts rotate round by round. The table shows medians,
ratios to nginx (and tlsedge to each floor) and issue 14's targets; the JSON
(benchmarks/results/<timestamp>.json) keeps every round, and a Markdown rendering for
the README goes next to it (<timestamp>.md).

Default run (`make bench`): issue 14's table (keepalive, handshakes, memory), workers 1
and 2, 3 rounds, wrk 5 s, 3,000 handshakes per variant, 3 x 10 s of handshakes and
10,000 idle connections for memory. Estimated at about 42 minutes on a quiet 2-core
machine: per proxy, worker count and round, keep-alive ~9 s (start, 1 s warm-up,
5 s), handshakes ~15 s (two starts, 4 x 3,000 at ~2,300/s ECDSA and ~1,000/s RSA),
memory ~47 s (two starts, 10,000 connections opened, 30 s of handshakes, RSS settling);
x 6 proxies x 2 worker counts x 3 rounds. `seconds_by_scenario` in the JSON has the
real figures. The other scenarios (large, h2, names, swap: issues 5 and 13) run with
--scenarios, h2/names/swap at the largest worker count only (`make bench-more`).

    .venv/bin/python benchmarks/compare.py            # the default run above
    .venv/bin/python benchmarks/compare.py --quick    # smoke run: 1 round, 2 s, small sets
    .venv/bin/python benchmarks/compare.py --proxies floor,tlsedge,nginx --workers 1
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

import certs  # noqa: E402
import peers  # noqa: E402
import report  # noqa: E402
import scenarios  # noqa: E402

from tests.certgen import CA  # noqa: E402

SCENARIOS = ("keepalive", "handshakes", "memory", "large", "h2", "names", "swap")
DEFAULT_SCENARIOS = ("keepalive", "handshakes", "memory")  # issue 14's table
NOTE = ("The load generator (wrk / h2load / sniclient) and the backend share the machine's "
        "{cpus} cores with the proxy; that is identical for every proxy. Compare ratios and "
        "CPU per request, not absolute numbers.")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--proxies", default=",".join(peers.PROXIES),
                   help="comma-separated subset of " + ",".join(peers.PROXIES))
    p.add_argument("--scenarios", default=",".join(DEFAULT_SCENARIOS),
                   help="comma-separated subset of " + ",".join(SCENARIOS) +
                        " (names = many names + start-up at scale)")
    p.add_argument("--workers", default="1,2",
                   help="worker counts, each measured in every round (e.g. 1,2)")
    p.add_argument("--access-log", action="store_true", help="access logs on for all")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=5.0, help="per wrk run")
    p.add_argument("--handshakes", type=int, default=3000,
                   help="connections per full-handshake run")
    p.add_argument("--rss-seconds", type=float, default=10.0,
                   help="each of the 3 back-to-back handshake runs of the memory scenario")
    p.add_argument("--idle-conns", type=int, default=scenarios.Bench.idle_conns,
                   help="idle keep-alive connections held in the memory scenario")
    p.add_argument("--store-certs", type=int, default=100_000)
    p.add_argument("--sni-names", type=int, default=10_000)
    p.add_argument("--swap", type=int, default=1000, help="certificates replaced")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 1 round, 2 s, 600 handshakes, 1,000 idle connections, "
                        "2,000 certificates")
    p.add_argument("--no-verify", action="store_true",
                   help="skip the nginx $ssl_session_reused check of full handshakes")
    p.add_argument("--results", default=str(HERE / "results"))
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    return p


QUICK = (("--rounds", 1), ("--seconds", 2.0), ("--handshakes", 600), ("--rss-seconds", 2.0),
         ("--idle-conns", 1000), ("--store-certs", 2000), ("--sni-names", 300),
         ("--swap", 50))


def _options(argv: list[str] | None) -> argparse.Namespace:
    opts = _parser().parse_args(argv)
    if opts.quick:
        given = set(argv or sys.argv[1:])
        for flag, value in QUICK:
            if not any(a.startswith(flag) for a in given):
                setattr(opts, flag[2:].replace("-", "_"), value)
    opts.proxies = [p for p in opts.proxies.split(",") if p]
    opts.scenarios = [s for s in opts.scenarios.split(",") if s]
    bad = [p for p in opts.proxies if p not in peers.PROXIES]
    bad += [s for s in opts.scenarios if s not in SCENARIOS]
    try:
        opts.workers = sorted({int(w) for w in opts.workers.split(",") if w.strip()})
    except ValueError:
        bad.append(f"--workers {opts.workers!r} (want counts like 1,2)")
    if bad or opts.rounds < 1 or not opts.workers or min(opts.workers) < 1:
        raise SystemExit(f"unknown or invalid: {', '.join(bad) or 'rounds/workers'}")
    if opts.idle_conns > peers.MAX_CONNECTIONS - 500:
        raise SystemExit(f"--idle-conns {opts.idle_conns}: at most "
                         f"{peers.MAX_CONNECTIONS - 500} with {peers.NOFILE} open files allowed "
                         "(raise the hard limit: ulimit -Hn)")
    return opts


def _on_sigterm(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # unwinds through every finally: all programs get stopped


def _rotated(items: list[Any], r: int) -> list[Any]:
    k = r % len(items) if items else 0
    return items[k:] + items[:k]


Add = Callable[[str, str, str, dict[str, float]], None]


@contextlib.contextmanager
def _timed(spent: dict[str, float], what: str) -> Iterator[None]:
    started = time.monotonic()
    try:
        yield
    finally:
        spent[what] = spent.get(what, 0.0) + time.monotonic() - started


def _round(bench: scenarios.Bench, opts: argparse.Namespace, r: int, add: Add,
           spent: dict[str, float], *, last_workers: bool) -> None:
    """One round at bench.workers: every wanted scenario, proxies in rotated order;
    seconds spent per scenario and worker count added to `spent`."""
    wanted = set(opts.scenarios)
    order = _rotated(opts.proxies, r)
    w = f"w{bench.workers}"
    if wanted & {"keepalive", "large"}:
        with _timed(spent, f"{w} keepalive+large"):
            _keepalive(bench, wanted, order, add)
    if "handshakes" in wanted:
        with _timed(spent, f"{w} handshakes"):
            for key in _rotated(["ecdsa", "rsa"], r):
                for proxy in order:
                    got = scenarios.full_handshakes(bench, proxy, key)
                    for variant, numbers in got.items():
                        add("handshakes", variant, proxy, numbers)
                    _progress(proxy, got)
    if "memory" in wanted:
        with _timed(spent, f"{w} memory"):
            for proxy in order:
                mem = scenarios.memory(bench, proxy)
                add("memory", "", proxy, mem)
                _progress(f"{proxy} memory", mem)
    if last_workers and wanted & {"h2", "names", "swap"}:
        with _timed(spent, f"{w} h2+names+swap"):
            _others(bench, opts, r, add)


def _keepalive(bench: scenarios.Bench, wanted: set[str], order: list[str], add: Add) -> None:
    for proxy in order:
        got = scenarios.keepalive_and_large(bench, proxy, large="large" in wanted)
        for name in ("keepalive", "large"):
            if name in wanted:
                add(name, "", proxy, got[name])
        _progress(proxy, got)


def _others(bench: scenarios.Bench, opts: argparse.Namespace, r: int, add: Add) -> None:
    """HTTP/2 (not the floor: it speaks no HTTP) and tlsedge's features at scale: not
    issue 14's table, run at the largest worker count only (they take minutes)."""
    wanted = set(opts.scenarios)
    order = _rotated(opts.proxies, r)
    if "h2" in wanted:
        for proxy in (p for p in order if not p.startswith("floor")):
            got = scenarios.http2(bench, proxy)
            for variant, numbers in got.items():
                add("h2", variant, proxy, numbers)
            _progress(f"{proxy} h2", got)
    if "names" in wanted and "tlsedge" in opts.proxies:
        for variant in _rotated(["table", "1cert"], r):
            names = scenarios.many_names(bench, variant, seed=r)
            add("many_names", variant, "tlsedge", names)
            _progress(f"tlsedge names/{variant}", names)
    if "swap" in wanted and "tlsedge" in opts.proxies:
        swap = scenarios.hot_swap(bench)
        add("hot_swap", "", "tlsedge", swap)
        _progress("tlsedge hot swap", swap)


def run(opts: argparse.Namespace) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="tlsedge-bench-"))
    raw: dict[str, report.Raw] = {str(w): {} for w in opts.workers}
    spent: dict[str, float] = {}
    extra: dict[str, Any] = {"seconds_by_scenario": spent}
    try:
        backend = peers.start_backend(workdir)
        peers.wait_ready(backend, plain=True)
        ca = CA.new("tlsedge benchmark CA")
        bench = scenarios.Bench(
            workdir=workdir, backend_port=backend.port,
            served=certs.served_certs(workdir, ca), ca=ca,
            workers=opts.workers[0], access_log=opts.access_log, seconds=opts.seconds,
            handshakes=opts.handshakes, store_certs=opts.store_certs,
            sni_names=opts.sni_names, swap_count=opts.swap, warmup=0 if opts.quick else 1,
            rss_seconds=opts.rss_seconds, idle_conns=opts.idle_conns)
        if ("handshakes" in opts.scenarios and "nginx" in opts.proxies
                and not opts.no_verify):
            print("verifying full handshakes (nginx logs $ssl_session_reused) ...", flush=True)
            extra["full_handshake_check"] = scenarios.verify_full_handshakes(bench)
        for r in range(opts.rounds):
            for workers in _rotated(opts.workers, r):
                bench.workers = workers
                print(f"round {r + 1}/{opts.rounds}, workers {workers}: "
                      f"{' '.join(_rotated(opts.proxies, r))}", flush=True)

                def add(scenario: str, variant: str, proxy: str, numbers: dict[str, float],
                        into: report.Raw = raw[str(workers)]) -> None:
                    into.setdefault(scenario, {}).setdefault(variant, {}).setdefault(
                        proxy, []).append(numbers)

                _round(bench, opts, r, add, spent, last_workers=workers == opts.workers[-1])
    finally:
        peers.stop_all()
        if opts.keep:
            print(f"work directory kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return {"raw": raw, **extra}


def _progress(what: str, got: dict[str, Any]) -> None:
    def short(d: dict[str, Any]) -> str:
        return " ".join(f"{k}={v:,.4g}" for k, v in d.items() if isinstance(v, int | float))

    if all(isinstance(v, dict) for v in got.values()):
        for k, v in got.items():
            print(f"  {what:<10} {k:<14} {short(v)}", flush=True)
    else:
        print(f"  {what}: {short(got)}", flush=True)


def _versions() -> dict[str, str]:
    out = {}
    for name, cmd in (("nginx", ["nginx", "-v"]), ("haproxy", ["haproxy", "-v"]),
                      ("caddy", ["caddy", "version"]), ("wrk", ["wrk", "-v"]),
                      ("h2load", ["h2load", "--version"])):
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
            out[name] = (done.stdout + done.stderr).strip().splitlines()[0]
        except (OSError, IndexError, subprocess.TimeoutExpired):
            out[name] = "?"
    return out


def _machine() -> str:
    model = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{os.cpu_count()} x {model}, {mem:.0f} GiB, Linux {os.uname().release}"


def _markdown_page(payload: dict[str, Any], markdown: str) -> str:
    opts = payload["options"]
    load = payload["load_average_before"][0], payload["load_average_after"][0]
    return (f"Measured {payload['started'][:10]} on {payload['machine']} (load average "
            f"{load[0]:.2f} before, {load[1]:.2f} after); medians of {opts['rounds']} "
            f"interleaved round(s), wrk {opts['seconds']:g} s, {opts['handshakes']:,} "
            f"handshakes per run, 3 x {opts['rss_seconds']:g} s of handshakes for RSS, "
            f"{opts['idle_conns']:,} idle connections; access logs "
            f"{'on' if opts['access_log'] else 'off'}. {payload['note']}\n\n{markdown}\n")


def main(argv: list[str] | None = None) -> int:
    opts = _options(argv)
    signal.signal(signal.SIGTERM, _on_sigterm)
    atexit.register(peers.stop_all)
    cpus = os.cpu_count() or 0
    load_before = os.getloadavg()
    print(NOTE.format(cpus=cpus))
    print(f"workers={opts.workers} access_log={'on' if opts.access_log else 'off'} "
          f"rounds={opts.rounds} seconds={opts.seconds:g} load average={load_before[0]:.2f}")
    if load_before[0] > 1.5:
        print("warning: the machine is busy (load average > 1.5); numbers will be noisy")
    started = time.monotonic()
    try:
        result = run(opts)
    except KeyboardInterrupt:
        print("interrupted: every started program was stopped", file=sys.stderr)
        return 130
    med = report.medians_by_workers(result["raw"])
    text, markdown, verdicts = report.table(med)
    print()
    print(NOTE.format(cpus=cpus))
    print(f"medians of {opts.rounds} round(s); ratios are to nginx (and tlsedge to the "
          "floors); targets apply to tlsedge")
    print(text)
    check = result.get("full_handshake_check")
    if check:
        print("\nfull-handshake check (client shim counts vs nginx $ssl_session_reused):")
        for label, c in check.items():
            print(f"  {label:<26} client full={c['client_full']} resumed={c['client_resumed']}"
                  f"  nginx full={c['nginx_full']} resumed={c['nginx_resumed']}"
                  f" at the version asked={c['nginx_version_asked']}")
    payload = {
        "command": " ".join([sys.executable, *sys.argv]),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "seconds_total": round(time.monotonic() - started, 1),
        "options": {k: v for k, v in vars(opts).items()},
        "cpus": cpus, "machine": _machine(), "load_average_before": load_before,
        "load_average_after": os.getloadavg(), "versions": _versions(),
        "note": NOTE.format(cpus=cpus), "medians": med, "targets": verdicts,
        "table": text, "markdown": markdown, **result,
    }
    path = report.write_json(Path(opts.results), payload)
    md = path.with_suffix(".md")
    md.write_text(_markdown_page(payload, markdown))
    print(f"\n{_markdown_page(payload, markdown)}")
    print("seconds by scenario: " + ", ".join(
        f"{k} {v:.0f}" for k, v in result["seconds_by_scenario"].items()))
    print(f"wrote {path}\nwrote {md} (the Markdown table for the README)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
