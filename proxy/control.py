"""`tlsedge reload`: validate a config, have the running node load it, say how it went.

The node is reached through the admin API when `listen.admin` is set (POST
/api/v1/reload with the token of `admin.token_file`: the answer carries the node's
reason for a refusal), else with SIGHUP to the pid in the store folder's pid file
(proxy/pidfile.py). Either way the outcome is then read from the node's /metrics
(`listen.metrics`): the reload counters and the last-success time, which every
worker sets once it serves the new tables. Exit 0 once every worker does; 1 when the
config is refused, here or by the node.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import ssl
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass

from proxy import app, pidfile
from proxy.config import Config, parse_address
from proxy.errors import ConfigError, TlsEdgeError

WAIT = 60.0  # for the workers to swap (a thousand certificate files take ~1 s)
_LOOPBACK = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}


@dataclass(frozen=True)
class Counters:
    ok: float
    failed: float
    last_success: float


def reload(config_path: str, say: Callable[[str], None]) -> None:
    """Raises TlsEdgeError (one line per problem) when the reload did not happen."""
    config = app.check_config(config_path, ports=False)  # the node holds the ports
    pid = _running_pid(config) if config.listen.admin is None else None
    before = _counters(config)
    started = time.time()
    if pid is None:
        _through_admin(config, say)
    else:
        _signal(config, pid, say)
    if before is None:
        say("reload requested; without listen.metrics its outcome in the workers is "
            "only in the node's log")
        return
    _await_workers(config, before, started)
    say("reloaded: every worker serves the new config")


def _through_admin(config: Config, say: Callable[[str], None]) -> None:
    address = config.listen.admin
    assert address is not None
    token = _token(config)
    host, port = parse_address(address, where="listen.admin")
    host = _LOOPBACK.get(host, host)
    conn: http.client.HTTPConnection
    if config.admin.certificate is not None:
        # The admin listener's own certificate is the one trusted: it may be self-signed.
        ctx = ssl.create_default_context(cafile=config.admin.certificate.cert)
        ctx.check_hostname = False
        conn = http.client.HTTPSConnection(host, port, timeout=WAIT, context=ctx)
    else:
        conn = http.client.HTTPConnection(host, port, timeout=WAIT)
    say(f"asking the node to reload through the admin API on {address}")
    try:
        conn.request("POST", "/api/v1/reload", body=b"", headers={
            "Authorization": f"Bearer {token}", "Content-Length": "0"})
        answer = conn.getresponse()
        body = answer.read()
    except (OSError, http.client.HTTPException) as exc:
        raise TlsEdgeError(f"listen.admin: no tlsedge answers on {address} ({exc}); is "
                           "it running?") from None
    finally:
        conn.close()
    if answer.status == 200:
        return
    try:
        reason = str(json.loads(body)["error"])
    except (ValueError, KeyError, TypeError):
        reason = body.decode(errors="replace").strip() or f"HTTP {answer.status}"
    if answer.status == 401:
        reason = f"the node refused the token of {config.admin.token_file}"
    raise TlsEdgeError(reason if reason.startswith("reload refused")
                       else f"reload refused: {reason}")


def _token(config: Config) -> str:
    try:
        with open(config.admin.token_file, encoding="utf-8") as f:
            return f.read(4096).strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"admin.token_file: cannot read {config.admin.token_file} "
                          f"({getattr(exc, 'strerror', None) or exc}): run as the user "
                          "tlsedge runs as, or root") from None


def _running_pid(config: Config) -> int:
    pid = pidfile.live_pid(config)
    if pid is None:
        raise TlsEdgeError(f"no running tlsedge found: {pidfile.path(config)} is missing "
                           "or names no live tlsedge (is it running with this config?)")
    return pid


def _signal(config: Config, pid: int, say: Callable[[str], None]) -> None:
    try:
        os.kill(pid, signal.SIGHUP)
    except PermissionError:
        raise TlsEdgeError(f"cannot signal tlsedge (pid {pid}): run as the user tlsedge "
                           "runs as, or root") from None
    except ProcessLookupError:
        raise TlsEdgeError(f"tlsedge (pid {pid}) stopped before the reload") from None
    say(f"sent SIGHUP to tlsedge (pid {pid}, from {pidfile.path(config)})")


def _await_workers(config: Config, before: Counters, started: float) -> None:
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        now = _counters(config)
        if now is not None and now.failed > before.failed:
            raise TlsEdgeError("reload refused by the running node (see its log); it "
                               "still serves the previous config")
        if now is not None and now.ok > before.ok and now.last_success >= started:
            return
        time.sleep(0.1)
    raise TlsEdgeError(f"the node did not report the reload within {WAIT:.0f} s; see its "
                       "log")


def _counters(config: Config) -> Counters | None:
    """The node's reload counters from its /metrics; None without listen.metrics."""
    address = config.listen.metrics
    if address is None:
        return None
    host, port = parse_address(address, where="listen.metrics")
    host = _LOOPBACK.get(host, host)
    url = f"http://{f'[{host}]' if ':' in host else host}:{port}/metrics"
    try:
        with urllib.request.urlopen(url, timeout=10) as answer:
            text = answer.read().decode()
    except OSError as exc:
        raise TlsEdgeError(f"listen.metrics: cannot read {url} ({exc}); is tlsedge "
                           "running with this config?") from None
    values = {"ok": 0.0, "failed": 0.0, "last": 0.0}
    for line in text.splitlines():
        if line.startswith('tlsedge_reloads_total{result="ok"}'):
            values["ok"] = float(line.rsplit(" ", 1)[1])
        elif line.startswith('tlsedge_reloads_total{result="failed"}'):
            values["failed"] = float(line.rsplit(" ", 1)[1])
        elif line.startswith("tlsedge_reload_last_success_timestamp_seconds "):
            values["last"] = float(line.rsplit(" ", 1)[1])
    return Counters(values["ok"], values["failed"], values["last"])
