"""The processes a benchmark runs: the plain-HTTP backend, the four TLS proxies and
the floor (benchmarks/floor.py, a bare relay with tlsedge's TLS settings).

Writes each program's config into a work directory, starts it in its own process
group on 127.0.0.1 ports, waits until an HTTPS request through it answers 200, and
stops it (SIGTERM to the group, then SIGKILL after a deadline). Every started
process is registered so `stop_all()` ends it even on Ctrl-C or an exception.
"""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import procstat

ROOT = Path(__file__).resolve().parent.parent
# In the table's column order: the peers, then the floor, then tlsedge.
PROXIES = ("nginx", "haproxy", "caddy", "floor", "floor-http", "tlsedge")
PLATFORM = "bench.test"
APP = "bench"
HOST = f"{APP}.{PLATFORM}"  # the Host (and SNI where a name is sent) every client uses
SMALL_BODY = b"tlsedge-benchmark-" + b"x" * 81 + b"\n"  # ~100 bytes
BIG_PATH = "/big"
BIG_SIZE = 1 << 20


def raise_fd_limit() -> int:
    """Soft open-files limit raised as far as allowed (every program started from
    here inherits it); returns the hard limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    for want in (1 << 20, hard):
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, want), max(hard, want)))
            break
    return resource.getrlimit(resource.RLIMIT_NOFILE)[1]


# Client connections each proxy must hold: the memory scenario keeps up to 10,000
# idle ones open. Bounded by the open-files limit: HAProxy wants ~2 files per
# connection of maxconn, the floor holds a backend connection per client one.
NOFILE = raise_fd_limit()
MAX_CONNECTIONS = max(1024, min(10_500, NOFILE // 2 - 500))
# The same TLS 1.2 suites tlsedge serves (proxy/certs/tls.py), given to every peer.
TLS12_CIPHERS = ("ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
                 "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
                 "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass(frozen=True)
class Cert:
    """One certificate as the peers want it: chain + key files, and both in one PEM."""

    chain: Path
    key: Path
    combined: Path  # HAProxy's crt
    kind: str       # ecdsa | rsa


@dataclass
class Proc:
    """A started program; `pid` leads its own process group."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    port: int = 0
    extra: dict[str, int] = field(default_factory=dict)  # other ports (metrics, ...)
    started_at: float = 0.0

    @property
    def pid(self) -> int:
        return self.popen.pid

    def pids(self) -> list[int]:
        return procstat.tree(self.pid)

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, size: int = 3000) -> str:
        with contextlib.suppress(OSError):
            return self.log.read_text(errors="replace")[-size:]
        return ""

    def stop(self, timeout: float = 15.0) -> None:
        _stop_group(self.popen, timeout)
        _LIVE.pop(self.pid, None)


_LIVE: dict[int, Proc] = {}


def _group_exists(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _stop_group(popen: subprocess.Popen[bytes], timeout: float) -> None:
    pgid = popen.pid  # start_new_session: the group id is the leader's pid
    if popen.poll() is None or _group_exists(pgid):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            popen.poll()
            if popen.returncode is not None and not _group_exists(pgid):
                break
            time.sleep(0.05)
        else:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        popen.wait(timeout=5)


def stop_all() -> None:
    """Stop every program this process started and has not stopped yet."""
    for proc in list(_LIVE.values()):
        proc.stop(timeout=5)


def spawn(name: str, argv: list[str], workdir: Path, *, env: dict[str, str] | None = None,
          port: int = 0) -> Proc:
    log = workdir / f"{name}.log"
    with log.open("ab") as out:
        popen = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL, cwd=workdir,
                                 env={**os.environ, **(env or {})}, start_new_session=True)
    proc = Proc(name, popen, log, port, started_at=time.monotonic())
    _LIVE[popen.pid] = proc
    return proc


def https_get(port: int, path: str = "/", *, sni: str | None = HOST, host: str = HOST,
              timeout: float = 5.0) -> tuple[int, bytes]:
    """One HTTPS GET on a new connection (no verification: a throwaway CA)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as raw, \
            ctx.wrap_socket(raw, server_hostname=sni) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while len(data) < 4 << 20 and (chunk := s.recv(65536)):
            data += chunk
    status = int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/") else 0
    return status, data


def wait_ready(proc: Proc, *, timeout: float = 30.0, plain: bool = False) -> float:
    """Seconds until a request through `proc` answers 200; raises with its log if not."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited ({proc.popen.returncode}):\n"
                               f"{proc.log_tail()}")
        try:
            status = (_plain_get(proc.port) if plain else https_get(proc.port, timeout=2)[0])
            if status == 200:
                return time.monotonic() - proc.started_at
            last = f"status {status}"
        except (OSError, ssl.SSLError, IndexError, ValueError) as exc:
            last = f"{type(exc).__name__}: {exc}"
        time.sleep(0.05)
    raise RuntimeError(f"{proc.name} not ready in {timeout:g}s ({last}):\n{proc.log_tail()}")


def _plain_get(port: int) -> int:
    with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: backend\r\nConnection: close\r\n\r\n")
        data = s.recv(256)
    return int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/") else 0


# -- the backend ---------------------------------------------------------------------------

def start_backend(workdir: Path) -> Proc:
    """nginx answering `return 200` with ~100 bytes, and a 1 MiB file at /big.

    One worker: a bare nginx answers ~167k req/s on loopback here, far above any proxy.
    """
    root = workdir / "backend"
    root.mkdir(parents=True, exist_ok=True)
    (root / "big").write_bytes(os.urandom(BIG_SIZE))
    port = free_port()
    body = SMALL_BODY.decode().strip()
    conf = f"""{_nginx_head(root, 1)}
http {{
    access_log off;
    sendfile on;
    keepalive_requests 1000000;
    keepalive_timeout 300s;
    server {{
        listen 127.0.0.1:{port} reuseport;
        location = / {{ default_type text/plain; return 200 "{body}\\n"; }}
        location = {BIG_PATH} {{ alias {root}/big; default_type application/octet-stream; }}
    }}
}}
"""
    return _start_nginx("backend", root, conf, port)


def _nginx_head(prefix: Path, workers: int) -> str:
    user = "user root;" if os.geteuid() == 0 else ""  # files live in 0700 temp dirs
    return f"""{user}
worker_processes {workers};
daemon off;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
worker_rlimit_nofile {NOFILE};
events {{ worker_connections {min(2 * MAX_CONNECTIONS, NOFILE - 500)}; }}
"""


def _nginx_temps(prefix: Path) -> str:
    return "\n".join(f"    {kind}_temp_path {prefix}/{kind}_temp;"
                     for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))


def _start_nginx(name: str, prefix: Path, conf: str, port: int) -> Proc:
    conf = conf.replace("http {\n", "http {\n" + _nginx_temps(prefix) + "\n", 1)
    path = prefix / "nginx.conf"
    path.write_text(conf)
    return spawn(name, ["nginx", "-p", str(prefix), "-c", str(path)], prefix, port=port)


# -- the proxies ---------------------------------------------------------------------------

@dataclass(frozen=True)
class ProxyOptions:
    """What every proxy of one comparison gets alike."""

    workers: int
    access_log: bool
    backend_port: int
    cert: Cert
    h2: bool = False  # HTTP/2 offered in ALPN (h2, http/1.1); else HTTP/1.1 only


@dataclass(frozen=True)
class TlsedgeExtras:
    """tlsedge-only settings of the scale scenarios."""

    store: Path | None = None
    certificates: tuple[tuple[Path, Path], ...] = ()  # ops files, re-read on SIGHUP
    context_cache_size: int = 10_000
    # > 0: limits.max_connections and connections_per_client (every benchmark client
    # is 127.0.0.1) raised to this, for the idle-connections scenario.
    connections: int = 0


def start_proxy(kind: str, workdir: Path, opts: ProxyOptions,
                extras: TlsedgeExtras | None = None) -> Proc:
    """Start one proxy (not waiting for it): tlsedge, floor, nginx, haproxy or caddy."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    if kind == "tlsedge":
        return _tlsedge(workdir, opts, port, extras or TlsedgeExtras())
    if kind in ("floor", "floor-http"):
        return _floor(workdir, opts, port, http=kind == "floor-http")
    if kind == "nginx":
        return _start_nginx("nginx", workdir, _nginx_proxy_conf(workdir, opts, port), port)
    if kind == "haproxy":
        path = workdir / "haproxy.cfg"
        path.write_text(_haproxy_conf(opts, port))
        return spawn("haproxy", ["haproxy", "-f", str(path), "-db"], workdir, port=port)
    if kind == "caddy":
        path = workdir / "Caddyfile"
        path.write_text(_caddyfile(workdir, opts, port))
        # Caddy is one Go process: GOMAXPROCS is its worker count.
        env = {"GOMAXPROCS": str(opts.workers), "XDG_DATA_HOME": str(workdir / "data"),
               "XDG_CONFIG_HOME": str(workdir / "config"), "HOME": str(workdir)}
        return spawn("caddy", ["caddy", "run", "--config", str(path), "--adapter",
                               "caddyfile"], workdir, env=env, port=port)
    raise ValueError(f"unknown proxy {kind!r}; choose from {', '.join(PROXIES)}")


def _nginx_proxy_conf(prefix: Path, opts: ProxyOptions, port: int) -> str:
    # $ssl_session_reused in the log lets a short run prove full handshakes ("." vs "r").
    log = (f"log_format bench '$remote_addr [$time_local] \"$request\" $status "
           f"$body_bytes_sent $ssl_protocol $ssl_session_reused';\n"
           f"    access_log {prefix}/access.log bench;" if opts.access_log
           else "access_log off;")
    return f"""{_nginx_head(prefix, opts.workers)}
http {{
    {log}
    keepalive_requests 1000000;
    keepalive_timeout 300s;
    upstream backend {{
        server 127.0.0.1:{opts.backend_port};
        keepalive 128;
        keepalive_requests 1000000;
    }}
    server {{
        # reuseport: one listening socket per worker, as tlsedge does.
        listen 127.0.0.1:{port} ssl{" http2" if opts.h2 else ""} reuseport;
        ssl_certificate {opts.cert.chain};
        ssl_certificate_key {opts.cert.key};
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_ciphers {TLS12_CIPHERS};
        ssl_prefer_server_ciphers off;
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto https;
            proxy_max_temp_file_size 0;
        }}
    }}
}}
"""


def _haproxy_conf(opts: ProxyOptions, port: int) -> str:
    log_global = "    log stdout format raw local0\n" if opts.access_log else ""
    log_defaults = "    log global\n    option httplog\n" if opts.access_log else ""
    return f"""global
    nbthread {opts.workers}
    # HAProxy raises its open-files limit to ~2 x maxconn: MAX_CONNECTIONS fits in it.
    maxconn {MAX_CONNECTIONS}
    ssl-default-bind-ciphers {TLS12_CIPHERS}
    # prefer-client-ciphers: the client picks, as for nginx and tlsedge (AES-128-GCM).
    ssl-default-bind-options ssl-min-ver TLSv1.2 prefer-client-ciphers
{log_global}
defaults
    mode http
    timeout connect 5s
    timeout client 300s
    timeout server 300s
    timeout http-keep-alive 300s
    option http-keep-alive
    option forwardfor
{log_defaults}
frontend tls
    bind 127.0.0.1:{port} ssl crt {opts.cert.combined} alpn {"h2," if opts.h2 else ""}http/1.1
    http-request set-header X-Forwarded-Proto https
    default_backend app

backend app
    http-reuse always
    server b1 127.0.0.1:{opts.backend_port}
"""


def _caddyfile(workdir: Path, opts: ProxyOptions, port: int) -> str:
    log = (f"\tlog {{\n\t\toutput file {workdir}/access.log\n\t}}\n"
           if opts.access_log else "")
    return f"""{{
\tadmin off
\tauto_https off
\tdefault_sni {HOST}
\tservers {{
\t\tprotocols h1{" h2" if opts.h2 else ""}
\t}}
}}

https://:{port} {{
\tbind 127.0.0.1
\ttls {opts.cert.chain} {opts.cert.key}
{log}\treverse_proxy 127.0.0.1:{opts.backend_port}
}}
"""


def _floor(workdir: Path, opts: ProxyOptions, port: int, *, http: bool) -> Proc:
    """The floor, or with `http` the HTTP floor (benchmarks/floor.py --http)."""
    if opts.h2:
        raise ValueError("the floor relays bytes: it cannot speak HTTP/2 to an HTTP/1.1 backend")
    names = f"{HOST},*.{PLATFORM},localhost"
    argv = [tlsedge_python(), str(ROOT / "benchmarks" / "floor.py"),
            "--listen", f"127.0.0.1:{port}", "--backend", f"127.0.0.1:{opts.backend_port}",
            "--workers", str(opts.workers), "--ciphers", TLS12_CIPHERS,
            "--cert", names, str(opts.cert.chain), str(opts.cert.key),
            *(["--http"] if http else [])]
    # tlsedge's key-exchange groups: its CLI points OPENSSL_CONF at this file too.
    cnf = ROOT / "proxy" / "certs" / "openssl.cnf"
    return spawn("floor-http" if http else "floor", argv, workdir,
                 env={"OPENSSL_CONF": str(cnf)}, port=port)


def tlsedge_python() -> str:
    venv = ROOT / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


def write_tlsedge_config(workdir: Path, opts: ProxyOptions, port: int, metrics: int,
                         extras: TlsedgeExtras) -> Path:
    import yaml

    config = {
        "platform_domain": PLATFORM,
        "listen": {"https": f"127.0.0.1:{port}", "http": f"127.0.0.1:{free_port()}",
                   "metrics": f"127.0.0.1:{metrics}"},
        "workers": opts.workers,
        "tls": {"platform_certificate": {"cert": str(opts.cert.chain),
                                         "key": str(opts.cert.key)},
                "certificates": [{"cert": str(c), "key": str(k)}
                                 for c, k in extras.certificates],
                "context_cache_size": extras.context_cache_size,
                "alpn": ["h2", "http/1.1"] if opts.h2 else ["http/1.1"]},
        "store": {"path": str(extras.store or workdir / "store")},
        "apps": {APP: {"backends": [f"127.0.0.1:{opts.backend_port}"]}},
        "limits": {"drain_timeout": 2},
    }
    if extras.connections:
        config["limits"].update(max_connections=extras.connections,
                                connections_per_client=extras.connections)
    if opts.h2:
        # 64 connections x 100 streams are 6,400 requests at once: the other proxies
        # open as many backend connections as they need; ours caps them (100 + a
        # queue of 50 per backend and worker by default).
        config["limits"].update(backend_max_connections=1024, backend_queue=8192)
    if opts.access_log and tlsedge_has_access_log():
        config["access_log"] = {"enabled": True, "path": str(workdir / "access.log")}
    path = workdir / "tlsedge.yaml"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(config))
    tmp.replace(path)
    return path


def tlsedge_has_access_log() -> bool:
    """Whether this tlsedge knows the `access_log` config key (it arrived with its own issue)."""
    from proxy.config import Config

    return "access_log" in Config.__struct_fields__


def _tlsedge(workdir: Path, opts: ProxyOptions, port: int, extras: TlsedgeExtras) -> Proc:
    if opts.access_log and not tlsedge_has_access_log():
        print("  note: this tlsedge has no access log; it runs without one", file=sys.stderr)
    metrics = free_port()
    path = write_tlsedge_config(workdir, opts, port, metrics, extras)
    metrics_dir = workdir / "metrics"
    metrics_dir.mkdir(exist_ok=True)
    for stale in metrics_dir.iterdir():
        stale.unlink()
    proc = spawn("tlsedge", [tlsedge_python(), "-m", "proxy.cli", "run", "-c", str(path)],
                 workdir, env={"PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)}, port=port)
    proc.extra["metrics"] = metrics
    return proc


def scrape(proc: Proc, name: str, **labels: str) -> float:
    """Sum of the samples of metric `name` whose labels include `labels`."""
    with socket.create_connection(("127.0.0.1", proc.extra["metrics"]), timeout=5) as s:
        s.sendall(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
        data = b""
        while len(data) < 16 << 20 and (chunk := s.recv(65536)):
            data += chunk
    total = 0.0
    for line in data.decode(errors="replace").splitlines():
        if not line.startswith(name):
            continue
        head, _, value = line.rpartition(" ")
        metric, _, label_text = head.partition("{")
        if metric != name:
            continue
        if all(f'{k}="{v}"' in label_text for k, v in labels.items()):
            total += float(value)
    return total


@contextlib.contextmanager
def running(proc: Proc, *, timeout: float = 30.0) -> Iterator[Proc]:
    """Wait until `proc` serves, yield it, and stop it whatever happens."""
    try:
        wait_ready(proc, timeout=timeout)
        yield proc
    finally:
        proc.stop()
