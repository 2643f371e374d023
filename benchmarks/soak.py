"""Soak (issue #10, item 17): one tlsedge node under a steady mix for minutes; do its
memory, open files, connections and event-loop lag stay flat?

One real `tlsedge run` (one worker, the admin listener on) in front of the test backend
(JSON answers and a WebSocket echo: tests/support/backend.py) running in a process of
its own. A load process keeps fixed, moderate rates: full handshakes (a new connection
each, no session resumption, the certificate verified against the name) to the platform
name, the ops-file name and the uploaded names; keep-alive requests over a few
persistent connections; WebSocket echo loops that reconnect every 100 messages.
Meanwhile a new certificate for one of the uploaded names goes through the admin API
every 5 s and the supervisor gets SIGHUP every 10 s with a new ops certificate file;
each change is checked on the served certificate.

Every second the harness samples the RSS and open FDs of the supervisor and of the
worker (separately), the live HTTPS connections (`tlsedge_active_connections`, and the
worker's client sockets as the kernel lists them, a check on the metric) and the
worker's event-loop lag, measured from outside: the time a request the worker answers
itself (404, no backend involved) takes on an idle keep-alive connection. After the
warm-up (the first third by default) it fits a least-squares line to each series and
prints its slope per minute, the requests that failed (must be 0) and the uploads and
reloads that failed. Exit status 1 when anything failed; flatness is reported, not
enforced (see the verdict column).

    .venv/bin/python benchmarks/soak.py                        # 3 minutes
    .venv/bin/python benchmarks/soak.py --minutes 30 --json    # the JSON on stdout

Writes only under a temp work directory and benchmarks/results/soak-<timestamp>.json.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import multiprocessing as mp
import os
import queue
import random
import shlex
import shutil
import signal
import socket
import ssl
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.context import SpawnContext
from multiprocessing.synchronize import Event as MpEvent
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

import procstat  # noqa: E402
import report  # noqa: E402
from cluster_scale import git_state, log_problems, summary, wait_for  # noqa: E402
from cluster_scale import load as load_average  # noqa: E402
from peers import APP, HOST, PLATFORM  # noqa: E402

from tests.certgen import CA  # noqa: E402
from tests.support.admin import AdminClient, admin_token  # noqa: E402
from tests.support.backend import Backend, ws_frame, ws_read  # noqa: E402
from tests.support.edge import (  # noqa: E402
    Edge,
    established_remote_ports,
    read_response,
    send_request,
)

OPS_NAME = "ops.soak.example"                      # served from the config's files
UPLOAD_NAMES = tuple(f"upload-{i}.soak.example" for i in range(3))  # admin API uploads
PROBE_HOST = f"soak-lag-probe.{PLATFORM}"          # no such app: the worker answers 404
KINDS = ("handshake", "keepalive", "websocket", "probe")
MESSAGES_KEPT = 20        # failure messages kept per kind
SOCKET_TIMEOUT = 10.0     # generous: the machine is shared
WS_MESSAGES_PER_CONNECTION = 100
OPS_DEADLINE = 15.0       # a reload or an upload not applied by then is a failure
RELOADS = "tlsedge_reloads_total"


class Failed(Exception):
    """A request or an operation got an answer, but the wrong one."""


def stamp() -> str:
    """Wall-clock time to the millisecond: failures line up with the node's log."""
    now = time.time()
    return time.strftime("%H:%M:%S", time.localtime(now)) + f".{int(now % 1 * 1000):03d}"


# -- counting, shared by the load process and the harness ----------------------------------

class Tally:
    """Requests that worked and failed, per kind, in one shared array of counters; the
    first MESSAGES_KEPT failure messages of each kind go through a queue."""

    def __init__(self, ctx: SpawnContext) -> None:
        self.counts = ctx.Array("q", 2 * len(KINDS) + 1)  # ok, failed per kind; resumed
        self.errors = ctx.Queue()

    def ok(self, kind: str) -> None:
        self._add(2 * KINDS.index(kind))

    def failed(self, kind: str, why: str) -> None:
        if self._add(2 * KINDS.index(kind) + 1) <= MESSAGES_KEPT:
            self.errors.put(f"{stamp()} {kind}: {why}")

    def resumed(self) -> None:
        self._add(2 * len(KINDS))

    def _add(self, index: int) -> int:
        with self.counts.get_lock():
            self.counts[index] += 1
            value: int = self.counts[index]
        return value

    def totals(self) -> dict[str, Any]:
        with self.counts.get_lock():
            values = list(self.counts)
        out: dict[str, Any] = {kind: {"ok": values[2 * i], "failed": values[2 * i + 1]}
                               for i, kind in enumerate(KINDS)}
        out["resumed_handshakes"] = values[-1]
        return out

    def messages(self) -> list[str]:
        """The kept messages; call when the load has stopped. The wait lets the queue's
        feeder thread (in this process too: the probe's) finish writing."""
        out = []
        with contextlib.suppress(queue.Empty):
            while True:
                out.append(self.errors.get(timeout=0.5))
        return out


# -- clients ---------------------------------------------------------------------------------

def client_context(cafile: str) -> ssl.SSLContext:
    """Verifies the chain and the name: a wrong certificate is a failed request."""
    return ssl.create_default_context(cafile=cafile)


class Conn:
    """One verified TLS connection to the edge, with one buffered reader for all of its
    responses (a reader per response could swallow the start of the next one)."""

    def __init__(self, port: int, name: str, ctx: ssl.SSLContext) -> None:
        raw = socket.create_connection(("127.0.0.1", port), timeout=SOCKET_TIMEOUT)
        try:
            self.sock = ctx.wrap_socket(raw, server_hostname=name)
        except BaseException:
            raw.close()
            raise
        self.file = self.sock.makefile("rb")
        self.name = name

    def get(self, path: str = "/", *, host: str | None = None,
            headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        send_request(self.sock, host or self.name, path, headers=headers)
        return read_response(self.file)

    def close(self) -> None:
        for part in (self.file, self.sock):
            with contextlib.suppress(OSError):
                part.close()


def paced(stop: MpEvent | threading.Event, per_s: float) -> Iterator[int]:
    """Yields 0, 1, 2... `per_s` times a second on average until `stop`. A late tick is
    not made up in a burst: the load stays moderate when the machine is busy."""
    interval = 1.0 / per_s
    due = time.monotonic()
    i = 0
    while not stop.is_set():
        yield i
        i += 1
        # Jittered: ticks in step with the once-a-second samples would catch the same
        # phase of the handshakes every time (seen: live connections 7 for a minute,
        # then 9 for the next, a slope that was only aliasing).
        due += interval * random.uniform(0.5, 1.5)
        delay = due - time.monotonic()
        if delay < -interval:
            due = time.monotonic()
        elif delay > 0 and stop.wait(delay):
            return


def expect(status: int, wanted: int, body: bytes) -> None:
    if status != wanted:
        raise Failed(f"status {status} (wanted {wanted}): {body[:120]!r}")


@dataclass(frozen=True)
class LoadSpec:
    port: int
    cafile: str
    names: tuple[str, ...]       # SNI and Host of handshakes and keep-alive connections
    handshakes_per_s: float
    keepalive_connections: int
    keepalive_per_s: float       # per connection
    websockets: int
    websocket_per_s: float       # messages per connection


def full_handshakes(spec: LoadSpec, tally: Tally, stop: MpEvent, first: int,
                    per_s: float) -> None:
    """A new connection per request: full handshake, one GET, `Connection: close`."""
    ctx = client_context(spec.cafile)
    for i in paced(stop, per_s):
        name = spec.names[(first + i) % len(spec.names)]
        conn = None
        try:
            conn = Conn(spec.port, name, ctx)
            if conn.sock.session_reused:
                tally.resumed()
            status, _, body = conn.get(headers={"Connection": "close"})
            expect(status, 200, body)
            tally.ok("handshake")
        except Exception as exc:
            tally.failed("handshake", f"{name}: {exc!r}")
        finally:
            if conn is not None:
                conn.close()


def keepalive(spec: LoadSpec, tally: Tally, stop: MpEvent, name: str) -> None:
    """Requests one after the other on one connection; a new one only if the edge says
    `Connection: close` or the connection failed (which counts)."""
    ctx = client_context(spec.cafile)
    conn: Conn | None = None
    for _ in paced(stop, spec.keepalive_per_s):
        try:
            conn = conn or Conn(spec.port, name, ctx)
            status, headers, body = conn.get()
            expect(status, 200, body)
            tally.ok("keepalive")
            if headers.get("connection", "").lower() == "close":
                conn.close()
                conn = None
        except Exception as exc:
            tally.failed("keepalive", f"{name}: {exc!r}")
            if conn is not None:
                conn.close()
            conn = None
    if conn is not None:
        conn.close()


def ws_open(spec: LoadSpec, ctx: ssl.SSLContext) -> Conn:
    conn = Conn(spec.port, HOST, ctx)
    try:
        send_request(conn.sock, HOST, "/ws", headers={
            "Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Version": "13",
            "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="})
        status, _, body = read_response(conn.file)
        expect(status, 101, body)
    except BaseException:
        conn.close()
        raise
    return conn


def ws_close(conn: Conn) -> None:
    """The closing handshake: our close frame, the backend's answer, then EOF."""
    try:
        conn.sock.sendall(ws_frame(b"", opcode=8, mask=os.urandom(4)))
        opcode, _ = ws_read(conn.file.read)
        if opcode != 8:
            raise Failed(f"opcode {opcode} instead of the close frame")
    finally:
        conn.close()


def websocket(spec: LoadSpec, tally: Tally, stop: MpEvent) -> None:
    """Echo messages of varying size; reconnect every WS_MESSAGES_PER_CONNECTION. The
    upgrade, each echo and each closing handshake count as one request."""
    ctx = client_context(spec.cafile)
    conn: Conn | None = None
    sent = 0
    for i in paced(stop, spec.websocket_per_s):
        try:
            if conn is None:
                conn, sent = ws_open(spec, ctx), 0
                tally.ok("websocket")
            message = f"soak {i} ".encode() * (1 + i % 40)
            conn.sock.sendall(ws_frame(message, mask=os.urandom(4)))
            if ws_read(conn.file.read) != (1, message):
                raise Failed("the echo differs from the message")
            tally.ok("websocket")
            sent += 1
            if sent >= WS_MESSAGES_PER_CONNECTION:
                conn, closing = None, conn
                ws_close(closing)
                tally.ok("websocket")
        except Exception as exc:
            tally.failed("websocket", repr(exc))
            if conn is not None:
                conn.close()
            conn = None
    if conn is not None:
        try:
            ws_close(conn)
        except Exception as exc:
            tally.failed("websocket", f"closing: {exc!r}")


def load_main(spec: LoadSpec, tally: Tally, stop: MpEvent) -> None:
    """The load process: one thread per client loop, until `stop`."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the harness stops us, in order
    handshake_threads = 2  # one thread could fall behind while the machine is busy
    threads = [threading.Thread(target=full_handshakes, name=f"handshakes-{i}",
                                args=(spec, tally, stop, i, spec.handshakes_per_s
                                      / handshake_threads))
               for i in range(handshake_threads)]
    threads += [threading.Thread(target=keepalive, name=f"keepalive-{i}",
                                 args=(spec, tally, stop, spec.names[i % len(spec.names)]))
                for i in range(spec.keepalive_connections)]
    threads += [threading.Thread(target=websocket, name=f"websocket-{i}",
                                 args=(spec, tally, stop))
                for i in range(spec.websockets)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def backend_main(ready: Connection, stop: MpEvent) -> None:
    """The backend process: the test backend until `stop`."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with Backend("soak") as backend:
        ready.send(backend.port)
        while not stop.wait(5.0):
            backend.seen.clear()  # it records every request: a long soak would grow it


@contextlib.contextmanager
def child(ctx: SpawnContext, name: str, target: Callable[..., None], *args: Any
          ) -> Iterator[MpEvent]:
    """Run `target(*args, stop)` in a process; on exit set `stop` and wait for it."""
    stop = ctx.Event()
    proc = ctx.Process(target=target, args=(*args, stop), name=name, daemon=True)
    proc.start()
    try:
        yield stop
    finally:
        stop.set()
        proc.join(30)
        if proc.is_alive():
            proc.terminate()
            proc.join(5)


@contextlib.contextmanager
def backend_process(ctx: SpawnContext) -> Iterator[int]:
    """The backend's port, once it listens."""
    receive, send = ctx.Pipe(duplex=False)
    with child(ctx, "soak-backend", backend_main, send):
        if not receive.poll(60):
            raise RuntimeError("the backend process did not start in 60 s")
        port: int = receive.recv()
        yield port


# -- the node --------------------------------------------------------------------------------

def node_config(workdir: Path, ca: CA, backend_port: int) -> dict[str, Any]:
    cert, key = ca.issue([f"*.{PLATFORM}"]).write(workdir / "certs", "platform")
    ops_cert, ops_key = ca.issue([OPS_NAME]).write(workdir / "certs", "ops")
    return {
        "platform_domain": PLATFORM,
        "workers": 1,
        "tls": {"platform_certificate": {"cert": cert, "key": key},
                "certificates": [{"cert": ops_cert, "key": ops_key}]},
        "store": {"path": "store"},
        "apps": {APP: {"backends": [f"127.0.0.1:{backend_port}"]}},
        "domains": {OPS_NAME: APP},
        "limits": {"drain_timeout": 2.0},
    }


@contextlib.contextmanager
def running_node(workdir: Path, ca: CA, backend_port: int) -> Iterator[Edge]:
    edge = Edge(workdir, node_config(workdir, ca, backend_port), start=False, admin=True)
    try:
        edge.start(timeout=90)
        yield edge
    finally:
        edge.__exit__(None, None, None)


def add_upload_domains(edge: Edge, api: AdminClient, ca: CA) -> None:
    """Each uploaded name, added with its first certificate; served before the load
    starts (the load verifies names: the platform fallback would fail it)."""
    started = time.monotonic()
    fingerprints = {}
    for name in UPLOAD_NAMES:
        issued = ca.issue([name])
        reply = api.request("POST", "/api/v1/domains", json_body={
            "name": name, "app": APP, "letsencrypt": False,
            "certificate": issued.chain_pem.decode(), "key": issued.key_pem.decode()})
        if reply.status != 201:
            raise RuntimeError(f"adding {name} answered {reply.status}: {reply.text}")
        fingerprints[name] = issued.fingerprint
    for name, fingerprint in fingerprints.items():
        if wait_for(edge, name, fingerprint, started) is None:
            raise RuntimeError(f"{name} not served with its certificate in time")


# -- uploads and reloads -----------------------------------------------------------------------

@dataclass
class Ops:
    """Outcomes of one kind of operation: how long each took to be served, failures."""

    served_ms: list[float] = field(default_factory=list)
    failed: int = 0
    errors: list[str] = field(default_factory=list)
    started_at: list[str] = field(default_factory=list)  # each one's stamp(), in order

    def to_json(self) -> dict[str, Any]:
        return {"done": len(self.started_at), "failed": self.failed,
                "served_ms": summary(self.served_ms), "errors": self.errors,
                "started_at": self.started_at}


class Control(threading.Thread):
    """A certificate upload every `upload_every` s, SIGHUP with a new ops certificate
    every `reload_every` s (half an upload period before an upload, not with it); each
    one counts when the new certificate is served."""

    def __init__(self, edge: Edge, api: AdminClient, ca: CA, t0: float,
                 upload_every: float, reload_every: float) -> None:
        super().__init__(name="soak-control", daemon=True)
        self.edge, self.api, self.ca, self.t0 = edge, api, ca, t0
        self.upload_every, self.reload_every = upload_every, reload_every
        self.stop = threading.Event()
        self.uploads, self.reloads = Ops(), Ops()

    def run(self) -> None:
        next_upload = self.t0 + self.upload_every
        next_reload = self.t0 + self.reload_every - self.upload_every / 2
        while True:
            due = min(next_upload, next_reload)
            if self.stop.wait(max(0.0, due - time.monotonic())):
                return
            if next_upload <= next_reload:
                self._do(self.uploads, self.upload)
                next_upload += self.upload_every
            else:
                self._do(self.reloads, self.reload)
                next_reload += self.reload_every

    def _do(self, ops: Ops, action: Callable[[], float]) -> None:
        ops.started_at.append(stamp())
        try:
            ops.served_ms.append(action())
        except Exception as exc:
            ops.failed += 1
            if len(ops.errors) < MESSAGES_KEPT:
                ops.errors.append(f"{stamp()} {exc!r}")

    def upload(self) -> float:
        """A new certificate for the next uploaded name; ms until it is served."""
        name = UPLOAD_NAMES[(len(self.uploads.started_at) - 1) % len(UPLOAD_NAMES)]
        issued = self.ca.issue([name])
        started = time.monotonic()
        reply = self.api.request("PUT", f"/api/v1/domains/{name}/certificate", json_body={
            "certificate": issued.chain_pem.decode(), "key": issued.key_pem.decode()})
        if reply.status != 200:
            raise Failed(f"upload of {name} answered {reply.status}: {reply.text[:200]}")
        return self._served(name, issued.fingerprint, started)

    def reload(self) -> float:
        """A new ops certificate file, SIGHUP; ms until the new certificate is served."""
        issued = self.ca.issue([OPS_NAME])
        issued.write(self.edge.workdir / "certs", "ops")  # read on SIGHUP only
        ok, refused = (self.edge.metric(RELOADS, result=r) for r in ("ok", "failed"))
        started = time.monotonic()
        self.edge.signal(signal.SIGHUP)
        while self.edge.metric(RELOADS, result="ok") <= ok:
            if self.edge.metric(RELOADS, result="failed") > refused:
                raise Failed("reload refused: " + self._last("reload refused"))
            if time.monotonic() - started > OPS_DEADLINE:
                raise Failed(f"no reload counted {OPS_DEADLINE:g} s after SIGHUP")
            time.sleep(0.05)
        return self._served(OPS_NAME, issued.fingerprint, started)

    def _served(self, name: str, fingerprint: str, started: float) -> float:
        ms = wait_for(self.edge, name, fingerprint, started)
        if ms is None:
            raise Failed(f"the new certificate of {name} was not served in time")
        return ms

    def _last(self, words: str) -> str:
        lines = [line for line in self.edge.log().splitlines() if words in line]
        return lines[-1] if lines else "(no log line)"


# -- sampling --------------------------------------------------------------------------------

class LagProbe:
    """The worker's event-loop lag seen from outside: one request it answers itself
    (404 for a host no app serves) on a keep-alive connection idle since the last."""

    def __init__(self, port: int, cafile: str, tally: Tally) -> None:
        self.port, self.ctx, self.tally = port, client_context(cafile), tally
        self.conn: Conn | None = None

    def measure(self) -> float | None:
        try:
            if self.conn is None:
                self.conn = Conn(self.port, HOST, self.ctx)  # the handshake is not timed
            started = time.perf_counter()
            status, headers, body = self.conn.get(host=PROBE_HOST)
            lag = (time.perf_counter() - started) * 1000
            expect(status, 404, body)
            self.tally.ok("probe")
            if headers.get("connection", "").lower() == "close":
                self.close()
            return lag
        except Exception as exc:
            self.tally.failed("probe", repr(exc))
            self.close()
            return None

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
        self.conn = None


def client_sockets(edge: Edge, worker: int) -> int | None:
    """The worker's established TCP connections other than to the backend: its clients
    as the kernel counts them, a check on the metric (which the worker keeps itself)."""
    backend = int(edge.config["apps"][APP]["backends"][0].rsplit(":", 1)[1])
    try:
        return sum(port != backend for port in established_remote_ports(worker))
    except OSError:  # the worker exited meanwhile
        return None


def take_sample(edge: Edge, probe: LagProbe, tally: Tally, t: float) -> dict[str, Any]:
    lag = probe.measure()  # first: its connection has been idle since the last sample
    assert edge.proc is not None
    workers = sorted(edge.worker_pids())
    pids = {"supervisor": edge.proc.pid, **({"worker": workers[0]} if workers else {})}
    try:
        live: float | None = edge.metric("tlsedge_active_connections", listener="https")
    except OSError:
        live = None
    totals = tally.totals()
    return {"t": round(t, 2),
            "rss_mib": {k: round(procstat.rss_kib(p) / 1024, 2) for k, p in pids.items()},
            "fds": {k: procstat.open_fds(p) for k, p in pids.items()},
            "live_connections": live,
            "client_sockets": client_sockets(edge, workers[0]) if workers else None,
            "lag_ms": None if lag is None else round(lag, 3),
            "worker_pids": workers, "ok": {k: totals[k]["ok"] for k in KINDS}}


def sample_every_second(edge: Edge, probe: LagProbe, tally: Tally, t0: float,
                        seconds: float) -> list[dict[str, Any]]:
    samples = []
    for i in range(1, int(seconds) + 1):
        time.sleep(max(0.0, t0 + i - time.monotonic()))
        assert edge.proc is not None
        if edge.proc.poll() is not None:
            raise RuntimeError(f"tlsedge exited ({edge.proc.returncode}):\n"
                               + "\n".join(edge.log().splitlines()[-30:]))
        samples.append(take_sample(edge, probe, tally, time.monotonic() - t0))
        if i % 30 == 0:
            last = samples[-1]
            print(f"  {i:>5} s  RSS {last['rss_mib']} MiB  FDs {last['fds']}  live "
                  f"{last['live_connections']}  lag {last['lag_ms']} ms", file=sys.stderr,
                  flush=True)
    return samples


# -- analysis --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Series:
    label: str
    path: tuple[str, ...]   # where a sample keeps the value
    flat: float             # |slope| per minute still called flat


SERIES = (
    Series("RSS supervisor (MiB)", ("rss_mib", "supervisor"), 0.5),
    Series("RSS worker (MiB)", ("rss_mib", "worker"), 0.5),
    Series("open FDs supervisor", ("fds", "supervisor"), 2.0),
    Series("open FDs worker", ("fds", "worker"), 2.0),
    Series("live HTTPS connections", ("live_connections",), 2.0),
    Series("client TCP connections (kernel)", ("client_sockets",), 2.0),
    Series("event-loop lag (ms)", ("lag_ms",), 0.5),
)


def value(sample: dict[str, Any], path: tuple[str, ...]) -> float | None:
    got: Any = sample
    for key in path:
        got = got.get(key) if isinstance(got, dict) else None
    return float(got) if isinstance(got, int | float) else None


def fit(points: list[tuple[float, float]]) -> dict[str, float]:
    """Least-squares line through (minute, value): slope per minute and its standard
    error (how much of the slope noise alone could make)."""
    xs = [x for x, _ in points]
    ys = [y for _, y in points]
    slope, intercept = statistics.linear_regression(xs, ys)
    mean_x = statistics.fmean(xs)
    sxx = sum((x - mean_x) ** 2 for x in xs)
    residuals = sum((y - intercept - slope * x) ** 2 for x, y in points)
    stderr = math.sqrt(residuals / (len(points) - 2) / sxx) if len(points) > 2 else math.inf
    return {"slope_per_min": slope, "stderr_per_min": stderr, "first": ys[0],
            "last": ys[-1], "mean": statistics.fmean(ys), "min": min(ys), "max": max(ys),
            "samples": len(points)}


def verdict(slope: float, stderr: float, flat: float) -> str:
    # Flat: a small slope, or one within noise (2 standard errors) of zero.
    if abs(slope) <= flat or abs(slope) <= 2 * stderr:
        return "flat"
    return "rising" if slope > 0 else "falling"


def analyse(samples: list[dict[str, Any]], warmup_s: float) -> dict[str, Any]:
    after = [s for s in samples if s["t"] >= warmup_s]
    out: dict[str, Any] = {}
    for series in SERIES:
        points = [(s["t"] / 60, v) for s in after
                  if (v := value(s, series.path)) is not None]
        if len(points) < 3:
            out[series.label] = {"samples": len(points), "verdict": "no data"}
            continue
        line = fit(points)
        out[series.label] = {**line, "flat_limit_per_min": series.flat,
                             "verdict": verdict(line["slope_per_min"],
                                                line["stderr_per_min"], series.flat)}
    lags = sorted(v for s in after if (v := s["lag_ms"]) is not None)
    if lags:
        out["event-loop lag (ms)"]["percentiles"] = {
            "p50": round(lags[len(lags) // 2], 3),
            "p99": round(lags[min(len(lags) - 1, int(len(lags) * 0.99))], 3),
            "max": round(lags[-1], 3)}
    return out


# -- report ----------------------------------------------------------------------------------

def print_report(result: dict[str, Any]) -> None:
    o = result["options"]
    print(f"\ntlsedge soak: {o['minutes']:g} min, warm-up {o['warmup_minutes']:g} min; "
          f"1 worker; {result['cpus']} cores shared with the load, the backend and other "
          f"work (load average before {result['load_before']}, after {result['load_after']})")
    print(f"load: {o['handshakes_per_s']:g} full handshakes/s, {o['keepalive']} keep-alive "
          f"connections x {o['keepalive_per_s']:g} req/s, {o['websockets']} WebSockets x "
          f"{o['websocket_per_s']:g} msg/s; upload every {o['upload_every']:g} s, SIGHUP "
          f"every {o['reload_every']:g} s")
    rows = [("series (after warm-up)", "first", "last", "mean", "slope/min", "2 s.e.",
             "flat if", "verdict")]
    for label, s in result["series"].items():
        if "slope_per_min" not in s:
            rows.append((label, "-", "-", "-", "-", "-", "-", s["verdict"]))
            continue
        rows.append((label, f"{s['first']:,.2f}", f"{s['last']:,.2f}", f"{s['mean']:,.2f}",
                     f"{s['slope_per_min']:+,.3f}", f"{2 * s['stderr_per_min']:,.3f}",
                     f"<= {s['flat_limit_per_min']:g}", s["verdict"]))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                        for i, (c, w) in enumerate(zip(r, widths, strict=True))))
    lag = result["series"].get("event-loop lag (ms)", {}).get("percentiles")
    if lag:
        print(f"event-loop lag after warm-up: p50 {lag['p50']} ms, p99 {lag['p99']} ms, "
              f"max {lag['max']} ms")
    print_outcomes(result)


def print_outcomes(result: dict[str, Any]) -> None:
    req = result["requests"]
    minutes = result["options"]["minutes"]
    for kind in KINDS:
        ok, failed = req[kind]["ok"], req[kind]["failed"]
        print(f"{kind:<10} {ok:>9,} ok ({ok / minutes / 60:,.1f}/s)  {failed:,} failed")
    print(f"resumed handshakes: {req['resumed_handshakes']} (must be 0: full handshakes)")
    for kind in ("uploads", "reloads"):
        ops = result[kind]
        served = ops["served_ms"]
        print(f"{kind:<10} {ops['done']:>9,} done, {ops['failed']} failed; new certificate "
              f"served after median {served['median']} ms, max {served['max']} ms")
    print(f"worker processes seen: {len(result['worker_pids'])} (1 unless a worker died)")
    for line in result["errors"] + result["uploads"]["errors"] + result["reloads"]["errors"]:
        print(f"  error: {line}")
    for line in result["log_problems"]:
        print(f"  tlsedge log: {line}")
    print(f"failed requests: {result['failed_requests']}; failed uploads/reloads: "
          f"{result['failed_operations']}; RSS and FDs flat after warm-up: "
          f"{'yes' if result['flat'] else 'no'}")
    print("healthy" if not result["problems"] else "NOT healthy: " + "; ".join(result["problems"]))


# -- main ------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=3.0, help="length of the soak (3)")
    p.add_argument("--warmup-minutes", type=float, default=None,
                   help="left out of the slopes (default: the first third)")
    p.add_argument("--handshakes-per-s", type=float, default=20.0)
    p.add_argument("--keepalive", type=int, default=4, help="keep-alive connections")
    p.add_argument("--keepalive-per-s", type=float, default=20.0, help="per connection")
    p.add_argument("--websockets", type=int, default=2)
    p.add_argument("--websocket-per-s", type=float, default=10.0, help="per connection")
    p.add_argument("--upload-every", type=float, default=5.0, help="seconds")
    p.add_argument("--reload-every", type=float, default=10.0, help="seconds (SIGHUP)")
    p.add_argument("--json", action="store_true", help="print the JSON instead of the table")
    p.add_argument("--results", default=str(HERE / "results"), help="where the JSON goes")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    opts = p.parse_args(argv)
    if opts.warmup_minutes is None:
        opts.warmup_minutes = opts.minutes / 3
    rates = (opts.handshakes_per_s, opts.keepalive_per_s, opts.websocket_per_s,
             opts.upload_every, opts.reload_every)
    if min(rates) <= 0 or min(opts.keepalive, opts.websockets) < 0:
        p.error("rates and periods must be above 0, connection counts at least 0")
    if (opts.minutes - opts.warmup_minutes) * 60 < 5 or opts.warmup_minutes < 0:
        p.error(f"--minutes {opts.minutes:g} with --warmup-minutes {opts.warmup_minutes:g} "
                "leaves under 5 samples for the slopes; soak longer or warm up less")
    return opts


def soak(opts: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """Start everything, sample for --minutes, stop everything (in order); the raw data."""
    ctx = mp.get_context("spawn")  # fresh interpreters: no state shared by fork
    ca = CA.new("tlsedge soak CA")
    cafile = ca.write_ca(workdir / "ca.pem")
    tally = Tally(ctx)
    with contextlib.ExitStack() as stack:
        backend_port = stack.enter_context(backend_process(ctx))
        edge = stack.enter_context(running_node(workdir, ca, backend_port))
        api = AdminClient(edge, token=admin_token(edge))
        add_upload_domains(edge, api, ca)
        spec = LoadSpec(edge.https_port, cafile, (HOST, OPS_NAME, *UPLOAD_NAMES),
                        opts.handshakes_per_s, opts.keepalive, opts.keepalive_per_s,
                        opts.websockets, opts.websocket_per_s)
        print(f"tlsedge serving on 127.0.0.1:{edge.https_port}; soaking for "
              f"{opts.minutes:g} min", file=sys.stderr, flush=True)
        stack.enter_context(child(ctx, "soak-load", load_main, spec, tally))
        t0 = time.monotonic()
        control = Control(edge, api, ca, t0, opts.upload_every, opts.reload_every)
        control.start()
        stack.callback(control.join, 60)
        stack.callback(control.stop.set)
        probe = LagProbe(edge.https_port, cafile, tally)
        stack.callback(probe.close)
        samples = sample_every_second(edge, probe, tally, t0, opts.minutes * 60)
    # Everything has stopped: the load before the node, so no request failed by the stop.
    return {"samples": samples, "requests": tally.totals(), "errors": tally.messages(),
            "uploads": control.uploads.to_json(), "reloads": control.reloads.to_json(),
            "log_problems": log_problems({"node": edge})}


def summarise(raw: dict[str, Any], opts: argparse.Namespace) -> dict[str, Any]:
    series = analyse(raw["samples"], opts.warmup_minutes * 60)
    failed_requests = sum(raw["requests"][k]["failed"] for k in KINDS)
    failed_operations = raw["uploads"]["failed"] + raw["reloads"]["failed"]
    pids = sorted({p for s in raw["samples"] for p in s["worker_pids"]})
    # What a healthy build must show: RSS and FDs flat, nothing failed, one worker.
    not_flat = [f"{s.label} {series[s.label]['verdict']}" for s in SERIES
                if s.path[0] in ("rss_mib", "fds") and series[s.label]["verdict"] != "flat"]
    problems = not_flat + [f"{n} {what}" for n, what in (
        (failed_requests, "failed requests"), (failed_operations, "failed uploads/reloads"),
        (raw["requests"]["resumed_handshakes"], "resumed handshakes"),
        (max(len(pids) - 1, 0), "worker restarts")) if n]
    return {**raw, "series": series, "failed_requests": failed_requests,
            "failed_operations": failed_operations, "flat": not not_flat, "worker_pids": pids,
            "problems": problems, "healthy": not problems}


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    # SIGTERM unwinds like Ctrl-C: every process started here is stopped on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    # The lag probe shares this process with the upload/reload thread: a short switch
    # interval keeps a GIL hand-over out of the measured time (~0.5 ms at most).
    sys.setswitchinterval(0.0005)
    head = {"command": shlex.join([sys.executable, *sys.argv]),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "cpus": os.cpu_count(),
            "load_before": load_average(), "options": vars(opts), **git_state()}
    workdir = Path(tempfile.mkdtemp(prefix="tlsedge-soak-"))
    try:
        raw = soak(opts, workdir)
    finally:
        if opts.keep:
            print(f"kept {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    result = {**head, **summarise(raw, opts), "load_after": load_average()}
    path = report.write_json(Path(opts.results), result, prefix="soak-")
    if opts.json:
        sys.stdout.write(path.read_text())
    else:
        print_report(result)
    print(f"wrote {path}", file=sys.stderr)
    return 0 if result["failed_requests"] == 0 and result["failed_operations"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
