"""Slow clients against tlsedge and nginx side by side (issue #11).

One plain-HTTP nginx app (`/` reads a request's body whole, as an app does, then
answers 200; `/big` is 1 MiB); tlsedge and nginx
each in turn, one worker, default settings, terminate TLS in front of it. For each
slowhttptest mode -- slow headers (-H), slow body (-B), slow read of the 1 MiB
response (-X), 500 connections for 40 s -- a probe client opens a new connection every
2 s and asks for `/`; the table counts the probes answered 200 within the probe
timeout. Each (mode, proxy) run gets freshly started proxies.

slowhttptest connects from 127.0.0.1 and the probe from 127.0.0.2 (tlsedge counts
connections per client address: the probe is another client, as on the internet).
The target is https://localhost:<port>/, routed by tlsedge as a custom domain.

    .venv/bin/python benchmarks/slow_clients.py             # about 5 minutes
    .venv/bin/python benchmarks/slow_clients.py --quick     # 100 connections, 10 s
    .venv/bin/python benchmarks/slow_clients.py --code /tmp/old-tree   # another tlsedge

Needs slowhttptest and nginx (Debian packages; `bash scripts/setup.sh test`).
"""

from __future__ import annotations

import argparse
import atexit
import concurrent.futures
import json
import os
import re
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

import certs  # noqa: E402
import peers  # noqa: E402

from tests.certgen import CA  # noqa: E402

NAME = "localhost"           # what slowhttptest and the probe ask for (SNI and Host)
PROBE_FROM = "127.0.0.2"     # the probe's source address: not the attacker's
PROXIES = ("tlsedge", "nginx")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")  # slowhttptest colours its report
# mode -> (what it is, slowhttptest arguments, path it asks for)
MODES: dict[str, tuple[str, list[str], str]] = {
    "H": ("slow headers (-H)", ["-H"], "/"),
    "B": ("slow body (-B)", ["-B", "-s", "8192"], "/"),
    "X": ("slow read of 1 MiB (-X)", ["-X"], peers.BIG_PATH),
}


@dataclass
class Run:
    mode: str
    proxy: str
    probes: int
    answered: int
    statuses: dict[str, int]
    probe_median_s: float | None
    slowhttptest_tail: str


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--proxies", default=",".join(PROXIES))
    p.add_argument("--modes", default="".join(MODES), help="letters of H, B, X")
    p.add_argument("--connections", type=int, default=500)
    p.add_argument("--seconds", type=int, default=40, help="slowhttptest -l")
    p.add_argument("--rate", type=int, default=200, help="slowhttptest -r (connections/s)")
    p.add_argument("--probe-every", type=float, default=2.0)
    p.add_argument("--probe-timeout", type=float, default=5.0)
    p.add_argument("--code", help="tlsedge code tree to run (put first on PYTHONPATH)")
    p.add_argument("--limit", action="append", default=[], metavar="KEY=VALUE",
                   help="a tlsedge `limits` setting (repeatable), e.g. "
                        "connections_per_client=1000 to let all of slowhttptest's "
                        "connections in (256 per client address by default)")
    p.add_argument("--quick", action="store_true", help="100 connections for 10 s")
    p.add_argument("--results", default=str(HERE / "results"))
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    return p


def _options(argv: list[str] | None) -> argparse.Namespace:
    opts = _parser().parse_args(argv)
    if opts.quick:
        opts.connections, opts.seconds = 100, 10
    opts.proxies = [p for p in opts.proxies.split(",") if p]
    opts.modes = list(opts.modes.upper())
    bad = [p for p in opts.proxies if p not in PROXIES] + [m for m in opts.modes
                                                            if m not in MODES]
    opts.limits = {}
    for item in opts.limit:
        key, sep, value = item.partition("=")
        if not sep:
            bad.append(item)
            continue
        opts.limits[key] = yaml.safe_load(value)
    if bad:
        raise SystemExit(f"unknown or invalid: {', '.join(bad)}")
    if shutil.which("slowhttptest") is None:
        raise SystemExit("slowhttptest not found: apt-get install slowhttptest "
                         "(or bash scripts/setup.sh test)")
    if socket.getaddrinfo(NAME, None, socket.AF_UNSPEC, socket.SOCK_STREAM)[0][0] \
            != socket.AF_INET:
        print(f"note: {NAME} resolves to IPv6 first here; slowhttptest may not reach "
              "the proxies on 127.0.0.1", file=sys.stderr)
    return opts


# -- the app and the proxies --------------------------------------------------------------
def start_app(workdir: Path) -> peers.Proc:
    """nginx as the app: `/big` is a 1 MiB file; anything else is passed on, body and
    all, to a second server that answers 200, so a request holds its connection until
    its body has arrived (nginx's own `return` would answer before reading it)."""
    root = workdir / "app"
    root.mkdir(parents=True, exist_ok=True)
    (root / "big").write_bytes(os.urandom(peers.BIG_SIZE))
    port, inner = peers.free_port(), peers.free_port()
    conf = f"""{peers._nginx_head(root, 1)}
http {{
    access_log off;
    keepalive_requests 1000000;
    server {{
        listen 127.0.0.1:{port};
        location = {peers.BIG_PATH} {{ alias {root}/big; default_type application/octet-stream; }}
        location / {{ proxy_pass http://127.0.0.1:{inner}; }}
    }}
    server {{
        listen 127.0.0.1:{inner};
        location / {{ default_type text/plain; return 200 "ok\n"; }}
    }}
}}
"""
    return peers._start_nginx("app", root, conf, port)


def start_tlsedge(workdir: Path, cert: peers.Cert, backend_port: int,
                  opts: argparse.Namespace) -> peers.Proc:
    workdir.mkdir(parents=True, exist_ok=True)
    port, metrics = peers.free_port(), peers.free_port()
    config: dict[str, Any] = {
        "platform_domain": peers.PLATFORM,
        "workers": 1,
        "listen": {"https": f"127.0.0.1:{port}", "http": f"127.0.0.1:{peers.free_port()}",
                   "metrics": f"127.0.0.1:{metrics}"},
        "tls": {"platform_certificate": {"cert": str(cert.chain), "key": str(cert.key)}},
        "store": {"path": str(workdir / "store")},
        "apps": {peers.APP: {"backends": [f"127.0.0.1:{backend_port}"]}},
        "domains": {NAME: peers.APP},
        "limits": {"drain_timeout": 2},
    }
    config["limits"].update(opts.limits)
    path = workdir / "tlsedge.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {"PYTHONPATH": str(Path(opts.code).resolve())} if opts.code else {}
    proc = peers.spawn("tlsedge", [peers.tlsedge_python(), "-m", "proxy.cli", "run", "-c",
                                   str(path)], workdir, env=env, port=port)
    proc.extra["metrics"] = metrics
    return proc


def start_nginx(workdir: Path, cert: peers.Cert, backend_port: int) -> peers.Proc:
    """nginx with its defaults for what matters here: request and response buffering
    on (temp files included), client_body_timeout and send_timeout 60 s."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = peers.free_port()
    conf = f"""{peers._nginx_head(workdir, 1)}
http {{
    access_log off;
    upstream backend {{
        server 127.0.0.1:{backend_port};
        keepalive 32;
    }}
    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_certificate {cert.chain};
        ssl_certificate_key {cert.key};
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
        }}
    }}
}}
"""
    return peers._start_nginx("nginx", workdir, conf, port)


# -- load and probe ------------------------------------------------------------------------
def probe_once(port: int, timeout: float) -> tuple[str, float]:
    """(status or error, seconds) of one GET / on a new connection from PROBE_FROM."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    started = time.monotonic()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout,
                                      source_address=(PROBE_FROM, 0)) as raw, \
                ctx.wrap_socket(raw, server_hostname=NAME) as s:
            s.settimeout(max(0.1, timeout - (time.monotonic() - started)))
            s.sendall(f"GET / HTTP/1.1\r\nHost: {NAME}\r\nConnection: close\r\n\r\n"
                      .encode())
            line = s.makefile("rb").readline()
        status = line.split()[1].decode() if line.startswith(b"HTTP/") else "no answer"
    except (OSError, ssl.SSLError) as exc:
        status = type(exc).__name__
    return status, time.monotonic() - started


def attack_and_probe(port: int, mode: str,
                     opts: argparse.Namespace) -> tuple[list[tuple[str, float]], str]:
    _, args, path = MODES[mode]
    cmd = ["slowhttptest", *args, "-c", str(opts.connections), "-l", str(opts.seconds),
           "-r", str(opts.rate), "-u", f"https://{NAME}:{port}{path}"]
    attack = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              stdin=subprocess.DEVNULL, text=True, start_new_session=True)
    out: list[str] = []
    reader = threading.Thread(target=lambda: out.extend(attack.stdout or ()), daemon=True)
    reader.start()
    results: list[concurrent.futures.Future[tuple[str, float]]] = []
    try:
        with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
            time.sleep(min(2.0, opts.seconds / 4))  # the attack's connections ramp up
            deadline = time.monotonic() + opts.seconds - min(2.0, opts.seconds / 4)
            next_at = time.monotonic()
            while next_at < deadline:
                results.append(pool.submit(probe_once, port, opts.probe_timeout))
                next_at += opts.probe_every
                time.sleep(max(0.0, next_at - time.monotonic()))
        attack.wait(timeout=opts.seconds + 60)
    finally:
        if attack.poll() is None:
            attack.send_signal(signal.SIGINT)
            attack.wait(timeout=10)
        reader.join(timeout=5)
    return [f.result() for f in results], _ANSI.sub("", "".join(out))[-1500:]


def one_run(workdir: Path, mode: str, proxy: str, cert: peers.Cert, backend_port: int,
            opts: argparse.Namespace) -> Run:
    where = workdir / f"{proxy}-{mode}"
    proc = (start_tlsedge(where, cert, backend_port, opts) if proxy == "tlsedge"
            else start_nginx(where, cert, backend_port))
    with peers.running(proc):
        probes, tail = attack_and_probe(proc.port, mode, opts)
    statuses: dict[str, int] = {}
    for status, _ in probes:
        statuses[status] = statuses.get(status, 0) + 1
    times = [t for status, t in probes if status == "200"]
    return Run(mode, proxy, len(probes), statuses.get("200", 0), statuses,
               statistics.median(times) if times else None, tail)


def table(runs: list[Run], proxies: list[str]) -> str:
    lines = ["| slowhttptest | " + " | ".join(f"{p} probes answered 200" for p in proxies)
             + " |", "|---|" + "---|" * len(proxies)]
    for mode in dict.fromkeys(r.mode for r in runs):
        cells = []
        for proxy in proxies:
            run = next((r for r in runs if r.mode == mode and r.proxy == proxy), None)
            if run is None:
                cells.append("-")
                continue
            others = {k: v for k, v in run.statuses.items() if k != "200"}
            extra = f" ({', '.join(f'{v} {k}' for k, v in others.items())})" if others else ""
            cells.append(f"{run.answered}/{run.probes}{extra}")
        lines.append(f"| {MODES[mode][0]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _on_sigterm(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # unwinds through every finally: all programs get stopped


def main(argv: list[str] | None = None) -> None:
    opts = _options(argv)
    atexit.register(peers.stop_all)
    signal.signal(signal.SIGTERM, _on_sigterm)
    workdir = Path(tempfile.mkdtemp(prefix="tlsedge-slow-"))
    runs: list[Run] = []
    try:
        backend = start_app(workdir)
        peers.wait_ready(backend, plain=True)
        cert = certs.served_certs(workdir, CA.new("tlsedge slow-client benchmark CA"))["ecdsa"]
        for mode in opts.modes:
            for proxy in opts.proxies:
                print(f"{MODES[mode][0]} against {proxy}: {opts.connections} connections, "
                      f"{opts.seconds} s ...", flush=True)
                run = one_run(workdir, mode, proxy, cert, backend.port, opts)
                print(f"  {run.answered}/{run.probes} probes answered 200 {run.statuses}",
                      flush=True)
                runs.append(run)
        backend.stop()
    finally:
        peers.stop_all()
        if not opts.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    print()
    print(table(runs, opts.proxies))
    results = Path(opts.results)
    results.mkdir(parents=True, exist_ok=True)
    out = results / f"slow-{time.strftime('%Y%m%d-%H%M%S')}.json"
    document: dict[str, Any] = {"options": vars(opts),
                                "runs": [asdict(r) for r in runs]}
    out.write_text(json.dumps(document, indent=2))
    print(f"\nJSON: {out}")


if __name__ == "__main__":
    main()
