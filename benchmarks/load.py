"""Load generators and what they report: wrk (keep-alive, large bodies), h2load with
the no-resumption shim (one full handshake per request), h2load over HTTP/2 (many
streams per connection), the SNI client, and holdconns (many idle keep-alive
connections held open).

Every run targets 127.0.0.1, is bounded by a request count or a duration, and has a
subprocess timeout. Results are plain dataclasses; parsing failures raise with the
tool's output so a broken run never turns into a number.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cbuild
from peers import HOST

# wrk's done() hook prints one JSON line: no parsing of its human-readable table.
_WRK_LUA = """
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "WRKJSON {\\"requests\\": %d, \\"bytes\\": %d, \\"duration_us\\": %d, " ..
    "\\"connect\\": %d, \\"read\\": %d, \\"write\\": %d, \\"status\\": %d, " ..
    "\\"timeout\\": %d, \\"p50_us\\": %d, \\"p99_us\\": %d, \\"max_us\\": %d}\\n",
    summary.requests, summary.bytes, summary.duration, e.connect, e.read, e.write,
    e.status, e.timeout, latency:percentile(50), latency:percentile(99), latency.max))
end
"""


class LoadError(RuntimeError):
    pass


@dataclass(frozen=True)
class WrkResult:
    requests: int
    seconds: float
    bytes: int
    p50_ms: float
    p99_ms: float
    max_ms: float
    socket_errors: int  # connect + read + write + timeout
    non_2xx: int        # wrk's "Non-2xx or 3xx responses"

    @property
    def rps(self) -> float:
        return self.requests / self.seconds

    @property
    def mb_per_s(self) -> float:
        return self.bytes / self.seconds / 1e6


def wrk(port: int, workdir: Path, *, path: str = "/", threads: int = 2, connections: int = 64,
        seconds: float = 10.0) -> WrkResult:
    script = workdir / "wrk-report.lua"
    script.write_text(_WRK_LUA)
    cmd = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{max(1, round(seconds))}s",
           "--latency", "-s", str(script), "-H", f"Host: {HOST}",
           f"https://127.0.0.1:{port}{path}"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60)
    m = re.search(r"^WRKJSON (\{.*\})$", done.stdout, re.M)
    if done.returncode != 0 or not m:
        raise LoadError(f"wrk failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    d = json.loads(m.group(1))
    return WrkResult(requests=d["requests"], seconds=d["duration_us"] / 1e6, bytes=d["bytes"],
                     p50_ms=d["p50_us"] / 1000, p99_ms=d["p99_us"] / 1000,
                     max_ms=d["max_us"] / 1000,
                     socket_errors=d["connect"] + d["read"] + d["write"] + d["timeout"],
                     non_2xx=d["status"])


@dataclass(frozen=True)
class HandshakeResult:
    requests: int
    succeeded: int
    failed: int
    seconds: float
    protocol: str        # what the client negotiated (h2load's "TLS Protocol")
    cipher: str
    client_full: int     # handshakes the shim saw finish without resumption
    client_resumed: int  # ... and with it (must be 0)

    @property
    def per_s(self) -> float:
        return self.succeeded / self.seconds


def h2load_full_handshakes(port: int, workdir: Path, *, requests: int, clients: int = 32,
                           threads: int = 2, max_tls: str = "1.3",
                           resumption: bool = False) -> HandshakeResult:
    """`requests` requests, each on a new connection with a full handshake.

    `Connection: close` makes every request a connection; the LD_PRELOAD shim stops
    h2load from offering a saved session and counts what really happened. h2load's
    -D mode hangs with closing connections, so this runs a request count (-n).
    `resumption=True` keeps the shim's counting but lets h2load resume, to show the
    check would catch it.
    """
    stats = workdir / "noresume.stats"
    stats.unlink(missing_ok=True)
    env = {"LD_PRELOAD": str(cbuild.noresume_shim()), "NORESUME_STATS": str(stats),
           "NORESUME_MAX_TLS": max_tls}
    if resumption:
        env["NORESUME_ALLOW"] = "1"
    cmd = ["h2load", "--h1", "-n", str(requests), "-c", str(clients), "-t", str(threads),
           "-H", "Connection: close", "-H", f":authority: {HOST}", f"https://127.0.0.1:{port}/"]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **env},
                          timeout=requests / 50 + 60)
    out = done.stdout
    m = re.search(r"finished in ([\d.]+)(m?s)", out)
    r = re.search(r"requests: (\d+) total, \d+ started, \d+ done, (\d+) succeeded, "
                  r"(\d+) failed", out)
    if done.returncode != 0 or not m or not r:
        raise LoadError(f"h2load failed ({done.returncode}):\n{out}\n{done.stderr}")
    seconds = float(m.group(1)) / (1000 if m.group(2) == "ms" else 1)
    proto = re.search(r"TLS Protocol: (\S+)", out)
    cipher = re.search(r"Cipher: (\S+)", out)
    full = resumed = 0
    if stats.exists():
        for line in stats.read_text().splitlines():
            f = line.split()
            full, resumed = full + int(f[1]), resumed + int(f[3])
    else:
        raise LoadError("the no-resumption shim wrote no statistics: was it loaded?")
    return HandshakeResult(requests=int(r.group(1)), succeeded=int(r.group(2)),
                           failed=int(r.group(3)), seconds=seconds,
                           protocol=proto.group(1) if proto else "?",
                           cipher=cipher.group(1) if cipher else "?",
                           client_full=full, client_resumed=resumed)


@dataclass(frozen=True)
class H2Result:
    requests: int      # measured (after the warm-up)
    succeeded: int
    failed: int
    seconds: float
    bytes: int
    p50_ms: float      # from h2load's per-request log, measured period only
    p99_ms: float
    protocol: str      # h2load's "Application protocol"

    @property
    def rps(self) -> float:
        return self.succeeded / self.seconds

    @property
    def mb_per_s(self) -> float:
        return self.bytes / self.seconds / 1e6


def h2load_streams(port: int, workdir: Path, *, requests: int, path: str = "/",
                   clients: int = 64, streams: int = 10, threads: int = 2,
                   warmup: float = 1.0) -> H2Result:
    """HTTP/2 keep-alive load: `requests` on `clients` connections with up to `streams`
    concurrent streams each. Rate and latency are taken from h2load's per-request log
    after `warmup` seconds (connections and handshakes are behind by then).

    A request count (-n), not a duration: with -D, h2load 1.52 keeps the clients that
    connected late running after "Stopped all clients" and never exits when the
    server is slow to accept 64 connections at once."""
    log = workdir / "h2load-requests.tsv"
    log.unlink(missing_ok=True)
    cmd = ["h2load", "-c", str(clients), "-m", str(streams), "-t", str(threads),
           "-n", str(requests), "--log-file", str(log), "-H", f":authority: {HOST}",
           f"https://127.0.0.1:{port}{path}"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=requests / 200 + 120)
    out = done.stdout
    r = re.search(r"requests: (\d+) total, \d+ started, \d+ done, (\d+) succeeded, "
                  r"(\d+) failed", out)
    t = re.search(r"traffic: .*?\((\d+)\) total", out)
    proto = re.search(r"Application protocol: (\S+)", out)
    if done.returncode != 0 or not r or not t:
        raise LoadError(f"h2load failed ({done.returncode}):\n{out}\n{done.stderr}")
    if not proto or proto.group(1) != "h2":
        raise LoadError(f"h2load did not negotiate h2:\n{out}")
    total, succeeded = int(r.group(1)), int(r.group(2))
    measured, seconds, p50, p99 = _steady(log, warmup)
    return H2Result(requests=measured, succeeded=measured * succeeded // max(total, 1),
                    failed=int(r.group(3)), seconds=seconds,
                    bytes=int(t.group(1)) * measured // max(total, 1), p50_ms=p50,
                    p99_ms=p99, protocol=proto.group(1))


def _steady(log: Path, warmup: float) -> tuple[int, float, float, float]:
    """(requests, seconds, p50 ms, p99 ms) of the requests h2load logged as started
    `warmup` seconds after the first one."""
    rows = [[int(x) for x in line.split("\t")[:3]]
            for line in log.read_text().splitlines() if line]
    if not rows:
        raise LoadError("h2load logged no request")
    start = min(row[0] for row in rows) + warmup * 1e6
    kept = [row for row in rows if row[0] >= start] or rows
    start = min(start, min(row[0] for row in kept))
    end = max(row[0] + row[2] for row in kept)
    times = sorted(row[2] for row in kept)
    return (len(kept), max(end - start, 1) / 1e6, times[len(times) // 2] / 1000,
            times[min(len(times) - 1, int(len(times) * 0.99))] / 1000)


@dataclass(frozen=True)
class SniResult:
    connections: int
    ok: int
    failed: int
    resumed: int
    seconds: float

    @property
    def per_s(self) -> float:
        return self.ok / self.seconds


def sni_client(port: int, names: list[str], workdir: Path, *, procs: int = 8,
               max_tls: str = "1.3", host: str | None = None) -> SniResult:
    """One full handshake + GET per entry of `names` (SNI = that name; Host = the name,
    or `host`)."""
    path = workdir / "sni-names.txt"
    path.write_text("\n".join(names) + "\n")
    cmd = [str(cbuild.sni_client()), str(port), str(path), str(procs), max_tls,
           *([host] if host else [])]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=len(names) / 20 + 60)
    m = re.search(r"connections (\d+) ok (\d+) failed (\d+) resumed (\d+) seconds ([\d.]+)",
                  done.stdout)
    if done.returncode != 0 or not m:
        raise LoadError(f"sniclient failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    c, ok, failed, resumed = (int(m.group(i)) for i in range(1, 5))
    return SniResult(c, ok, failed, resumed, float(m.group(5)))


@dataclass
class HoldResult:
    held: int
    failed: int
    seconds: float          # to open them all (handshake + one request each)
    closed_early: int = -1  # held connections the server had closed at release (-1: unknown)


@contextlib.contextmanager
def holding(port: int, count: int, *, concurrency: int = 128, max_tls: str = "1.3",
            timeout: float = 180.0) -> Iterator[HoldResult]:
    """`count` TLS connections opened, one request each, and held open (idle) inside
    the `with`; closed when it ends. Raises when fewer than all were held."""
    cmd = [str(cbuild.hold_conns()), str(port), str(count), str(concurrency), HOST, max_tls]
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdin is not None
    try:
        ready, _, _ = select.select([proc.stdout], [], [], timeout)
        line = proc.stdout.readline() if ready else ""
        m = re.match(r"held (\d+) failed (\d+) seconds ([\d.]+)", line)
        if not m:
            proc.kill()
            raise LoadError(f"holdconns: no result in {timeout:g}s ({line!r}): "
                            f"{proc.stderr.read() if proc.stderr else ''}")
        result = HoldResult(int(m.group(1)), int(m.group(2)), float(m.group(3)))
        if result.failed:
            raise LoadError(f"holdconns: {result.failed} of {count} connections failed")
        yield result
        proc.stdin.close()  # release
        released = re.search(r"closed_early (\d+)", proc.stdout.read())
        result.closed_early = int(released.group(1)) if released else -1
    finally:
        if proc.poll() is None:
            with contextlib.suppress(OSError):
                proc.stdin.close()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
