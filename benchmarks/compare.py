"""tlsedge side by side with nginx, HAProxy and Caddy on this machine (issue 5).

One plain-HTTP nginx backend; each proxy in turn terminates TLS in front of it with
the same certificate, worker count and access-log setting. Scenarios alternate the
proxies round by round; the table shows medians and ratios to nginx, and the JSON
(benchmarks/results/<timestamp>.json) keeps every round.

    .venv/bin/python benchmarks/compare.py            # full run (about 15 minutes)
    .venv/bin/python benchmarks/compare.py --quick    # smoke run: 1 round, 2 s, small sets
"""

from __future__ import annotations

import argparse
import atexit
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

import certs  # noqa: E402
import peers  # noqa: E402
import report  # noqa: E402
import scenarios  # noqa: E402

from tests.certgen import CA  # noqa: E402

SCENARIOS = ("keepalive", "handshakes", "large", "h2", "names", "swap")
NOTE = ("The load generator (wrk / h2load / sniclient) and the backend share the machine's "
        "{cpus} cores with the proxy; that is identical for every proxy. Compare ratios and "
        "CPU per request, not absolute numbers.")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--proxies", default=",".join(peers.PROXIES),
                   help="comma-separated subset of tlsedge,nginx,haproxy,caddy")
    p.add_argument("--scenarios", default=",".join(SCENARIOS),
                   help="comma-separated subset of " + ",".join(SCENARIOS) +
                        " (names = many names + start-up at scale)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--access-log", action="store_true", help="access logs on for all")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=10.0, help="per wrk run")
    p.add_argument("--handshakes", type=int, default=10_000,
                   help="connections per full-handshake run")
    p.add_argument("--store-certs", type=int, default=100_000)
    p.add_argument("--sni-names", type=int, default=10_000)
    p.add_argument("--swap", type=int, default=1000, help="certificates replaced")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 1 round, 2 s, 600 handshakes, 2,000 certificates")
    p.add_argument("--no-verify", action="store_true",
                   help="skip the nginx $ssl_session_reused check of full handshakes")
    p.add_argument("--results", default=str(HERE / "results"))
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    return p


def _options(argv: list[str] | None) -> argparse.Namespace:
    opts = _parser().parse_args(argv)
    if opts.quick:
        given = set(argv or sys.argv[1:])
        for flag, value in (("--rounds", 1), ("--seconds", 2.0), ("--handshakes", 600),
                            ("--store-certs", 2000), ("--sni-names", 300), ("--swap", 50)):
            if not any(a.startswith(flag) for a in given):
                setattr(opts, flag[2:].replace("-", "_"), value)
    opts.proxies = [p for p in opts.proxies.split(",") if p]
    opts.scenarios = [s for s in opts.scenarios.split(",") if s]
    bad = [p for p in opts.proxies if p not in peers.PROXIES]
    bad += [s for s in opts.scenarios if s not in SCENARIOS]
    if bad or opts.rounds < 1 or opts.workers < 1:
        raise SystemExit(f"unknown or invalid: {', '.join(bad) or 'rounds/workers'}")
    return opts


def _on_sigterm(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # unwinds through every finally: all programs get stopped


def _rotated(items: list[str], r: int) -> list[str]:
    k = r % len(items) if items else 0
    return items[k:] + items[:k]


def run(opts: argparse.Namespace) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="tlsedge-bench-"))
    raw: report.Raw = {}
    extra: dict[str, Any] = {}

    def add(scenario: str, variant: str, proxy: str, numbers: dict[str, float]) -> None:
        raw.setdefault(scenario, {}).setdefault(variant, {}).setdefault(proxy, []).append(
            numbers)

    try:
        backend = peers.start_backend(workdir)
        peers.wait_ready(backend, plain=True)
        ca = CA.new("tlsedge benchmark CA")
        bench = scenarios.Bench(
            workdir=workdir, backend_port=backend.port,
            served=certs.served_certs(workdir, ca), ca=ca,
            workers=opts.workers, access_log=opts.access_log, seconds=opts.seconds,
            handshakes=opts.handshakes, store_certs=opts.store_certs,
            sni_names=opts.sni_names, swap_count=opts.swap, warmup=0 if opts.quick else 1)
        wanted = set(opts.scenarios)
        if "handshakes" in wanted and "nginx" in opts.proxies and not opts.no_verify:
            print("verifying full handshakes (nginx logs $ssl_session_reused) ...", flush=True)
            extra["full_handshake_check"] = scenarios.verify_full_handshakes(bench)
        for r in range(opts.rounds):
            order = _rotated(opts.proxies, r)
            print(f"round {r + 1}/{opts.rounds}: {' '.join(order)}", flush=True)
            if wanted & {"keepalive", "large"}:
                for proxy in order:
                    got = scenarios.keepalive_and_large(bench, proxy,
                                                        large="large" in wanted)
                    for name in ("keepalive", "large"):
                        if name in wanted:
                            add(name, "", proxy, got[name])
                    _progress(proxy, got)
            if "h2" in wanted:
                for proxy in order:
                    got = scenarios.http2(bench, proxy)
                    for variant, numbers in got.items():
                        add("h2", variant, proxy, numbers)
                    _progress(f"{proxy} h2", got)
            if "handshakes" in wanted:
                for key in _rotated(["ecdsa", "rsa"], r):
                    for proxy in order:
                        got = scenarios.full_handshakes(bench, proxy, key)
                        for variant, numbers in got.items():
                            add("handshakes", variant, proxy, numbers)
                        _progress(proxy, got)
            if "names" in wanted and "tlsedge" in opts.proxies:
                for variant in _rotated(["table", "1cert"], r):
                    got = scenarios.many_names(bench, variant, seed=r)
                    add("many_names", variant, "tlsedge", got)
                    _progress(f"tlsedge names/{variant}", got)
            if "swap" in wanted and "tlsedge" in opts.proxies:
                got = scenarios.hot_swap(bench)
                add("hot_swap", "", "tlsedge", got)
                _progress("tlsedge hot swap", got)
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
    med = report.medians(result["raw"])
    text, verdicts = report.table(med)
    print()
    print(NOTE.format(cpus=cpus))
    print(f"medians of {opts.rounds} round(s); ratios are to nginx; targets apply to tlsedge")
    print(text)
    check = result.get("full_handshake_check")
    if check:
        print("\nfull-handshake check (client shim counts vs nginx $ssl_session_reused):")
        for label, c in check.items():
            print(f"  {label:<26} client full={c['client_full']} resumed={c['client_resumed']}"
                  f"  nginx full={c['nginx_full']} resumed={c['nginx_resumed']}")
    payload = {
        "command": " ".join([sys.executable, *sys.argv]),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "seconds_total": round(time.monotonic() - started, 1),
        "options": {k: v for k, v in vars(opts).items()},
        "cpus": cpus, "load_average_before": load_before,
        "load_average_after": os.getloadavg(), "versions": _versions(),
        "note": NOTE.format(cpus=cpus), "medians": med, "targets": verdicts,
        "table": text, **result,
    }
    path = report.write_json(Path(opts.results), payload)
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
