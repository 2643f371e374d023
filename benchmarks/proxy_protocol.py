"""What reading the PROXY protocol costs tlsedge (issue #15): the keep-alive and the
full-handshake scenarios of compare.py, with tlsedge behind a real HAProxy in TCP mode
twice over, once with `send-proxy-v2` (tlsedge's `proxy_protocol: true`) and once
without (the plain listener form), so the only difference is the header. tlsedge's CPU
(utime + stime of its processes) per request and per handshake.

The two setups run side by side, loaded at the same time: on a shared machine whatever
else runs slows both alike (one after the other, rounds differed by ±30 %, far more
than what is measured). The medians over rounds are compared.

    .venv/bin/python benchmarks/proxy_protocol.py              # 5 rounds (a few minutes)
    .venv/bin/python benchmarks/proxy_protocol.py --rounds 1 --seconds 2 --handshakes 500
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

import certs  # noqa: E402
import load  # noqa: E402
import peers  # noqa: E402
import procstat  # noqa: E402
import yaml  # noqa: E402

from tests.certgen import CA  # noqa: E402

SETUPS = ("without", "with")  # PROXY protocol
T = TypeVar("T")


def _haproxy(workdir: Path, port: int, target: int, send_proxy: bool) -> peers.Proc:
    """HAProxy passing TCP through (TLS is tlsedge's), with or without the header."""
    conf = workdir / "haproxy.cfg"
    conf.write_text(f"""global
    maxconn 9000
defaults
    mode tcp
    timeout connect 5s
    timeout client 300s
    timeout server 300s
frontend tls_in
    bind 127.0.0.1:{port}
    default_backend tlsedge
backend tlsedge
    server s1 127.0.0.1:{target}{" send-proxy-v2" if send_proxy else ""}
""")
    return peers.spawn("haproxy", ["haproxy", "-db", "-f", str(conf)], workdir, port=port)


def _tlsedge(workdir: Path, opts: peers.ProxyOptions, proxy_protocol: bool) -> peers.Proc:
    """compare.py's tlsedge; with `proxy_protocol`, its HTTPS listener in the long form."""
    workdir.mkdir(parents=True)
    port, metrics = peers.free_port(), peers.free_port()
    path = peers.write_tlsedge_config(workdir, opts, port, metrics, peers.TlsedgeExtras())
    if proxy_protocol:
        config = yaml.safe_load(path.read_text())
        config["listen"]["https"] = {"address": config["listen"]["https"],
                                     "proxy_protocol": True, "trusted": ["127.0.0.1/32"]}
        path.write_text(yaml.safe_dump(config))
    (workdir / "metrics").mkdir()
    proc = peers.spawn("tlsedge", [peers.tlsedge_python(), "-m", "proxy.cli", "run", "-c",
                                   str(path)], workdir,
                       env={"PROMETHEUS_MULTIPROC_DIR": str(workdir / "metrics")}, port=port)
    proc.extra["metrics"] = metrics
    return proc


class Setup:
    """One tlsedge behind its own HAProxy, with or without the PROXY header."""

    def __init__(self, workdir: Path, opts: peers.ProxyOptions, send_proxy: bool) -> None:
        self.name = "with" if send_proxy else "without"
        self.workdir = workdir
        self.edge = _tlsedge(workdir, opts, send_proxy)
        self.front = peers.free_port()
        self.haproxy = _haproxy(workdir, self.front, self.edge.port, send_proxy)

    def wait_ready(self) -> None:
        """A request through HAProxy (and so tlsedge) answers 200."""
        peers.wait_ready(peers.Proc("front", self.haproxy.popen, self.haproxy.log,
                                    self.front, started_at=self.haproxy.started_at),
                         timeout=60)

    def stop(self) -> None:
        self.haproxy.stop()
        self.edge.stop()


def _side_by_side(setups: list[Setup], run: Callable[[Setup], T]) -> list[tuple[T, float]]:
    """`run` on every setup at once (the machine's other load hits both alike), with
    each tlsedge's CPU seconds over its run."""
    out: list[tuple[T, float] | None] = [None] * len(setups)

    def one(i: int) -> None:
        pids = setups[i].edge.pids()
        before = procstat.cpu_seconds(pids)
        result = run(setups[i])
        out[i] = (result, procstat.cpu_seconds(pids) - before)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(setups))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if any(o is None for o in out):
        raise load.LoadError("a load run failed (see above)")
    return [o for o in out if o is not None]


def one_round(workdir: Path, opts: peers.ProxyOptions, seconds: float,
              handshakes: int) -> dict[str, dict[str, float]]:
    setups = [Setup(workdir / name, opts, name == "with") for name in SETUPS]
    try:
        for setup in setups:
            setup.wait_ready()
        # Pools and caches exist before we count.
        _side_by_side(setups, lambda s: load.wrk(s.front, s.workdir, seconds=1))
        keepalive = _side_by_side(setups, lambda s: load.wrk(s.front, s.workdir,
                                                             seconds=seconds))
        full = _side_by_side(setups, lambda s: load.h2load_full_handshakes(
            s.front, s.workdir, requests=handshakes, max_tls="1.3"))
        out = {}
        for setup, (ka, ka_cpu), (hs, hs_cpu) in zip(setups, keepalive, full, strict=True):
            if ka.socket_errors + ka.non_2xx or hs.failed or hs.client_resumed:
                raise load.LoadError(
                    f"{setup.name}: errors {ka.socket_errors + ka.non_2xx}, handshakes "
                    f"failed {hs.failed}, resumed {hs.client_resumed}")
            headers = peers.scrape(setup.edge, "tlsedge_proxy_protocol_total", result="ok")
            if setup.name == "with" and not headers:
                raise load.LoadError("with: tlsedge counted no PROXY header")
            out[setup.name] = {
                "rps": ka.rps, "cpu_us_per_req": ka_cpu / max(ka.requests, 1) * 1e6,
                "hs_per_s": hs.per_s, "cpu_us_per_hs": hs_cpu / max(hs.succeeded, 1) * 1e6,
                "proxy_headers_ok": headers}
        return out
    finally:
        for setup in setups:
            setup.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--handshakes", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=1)
    opts = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="tlsedge-bench-pp-"))
    rounds: dict[str, list[dict[str, float]]] = {s: [] for s in SETUPS}
    try:
        ca = CA.new("tlsedge benchmark CA")
        served = certs.served_certs(workdir / "certs", ca)
        backend = peers.start_backend(workdir)
        peers.wait_ready(backend, plain=True)
        proxy_opts = peers.ProxyOptions(opts.workers, False, backend.port, served["ecdsa"])
        for r in range(opts.rounds):
            got = one_round(workdir / str(r), proxy_opts, opts.seconds, opts.handshakes)
            for setup in SETUPS:
                rounds[setup].append(got[setup])
                print(f"round {r + 1} {setup:7} PROXY: "
                      + ", ".join(f"{k} {v:.1f}" for k, v in got[setup].items()), flush=True)
    finally:
        peers.stop_all()
        shutil.rmtree(workdir, ignore_errors=True)
    summary = _summary(rounds)
    print(json.dumps(summary, indent=2))
    out = HERE / "results" / f"proxy-protocol-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"rounds": rounds, "summary": summary}, indent=2))
    return 0


def _summary(rounds: dict[str, list[dict[str, float]]]) -> dict[str, Any]:
    """Medians per setup, and the median of the rounds' with/without ratios (each round
    ran both at once: its ratio is the least disturbed figure)."""
    med = {s: {k: statistics.median(r[k] for r in rounds[s]) for k in rounds[s][0]}
           for s in SETUPS}

    def increase(key: str) -> float:
        ratios = [w[key] / o[key] for w, o in zip(rounds["with"], rounds["without"],
                                                   strict=True)]
        return (statistics.median(ratios) - 1) * 100

    return {"median": med,
            "keepalive_cpu_per_req_increase_pct": increase("cpu_us_per_req"),
            "handshake_cpu_per_hs_increase_pct": increase("cpu_us_per_hs")}


if __name__ == "__main__":
    sys.exit(main())
