"""The systemd unit: `systemd-analyze verify`, its hardening, its commands, and the
sd_notify protocol the supervisor speaks to it (READY, RELOADING, STOPPING).

No systemd runs here: the unit is verified offline, its ExecStartPre/ExecReload
commands are run by hand, and the notifications go to a socket the test binds in
place of systemd's ($NOTIFY_SOCKET).
"""

from __future__ import annotations

import copy
import os
import re
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from proxy.config import Limits
from tests.certgen import Issued
from tests.support.edge import Edge

SYSTEMD_DIR = Path(__file__).resolve().parent.parent / "systemd"
UNIT = SYSTEMD_DIR / "tlsedge.service"
SYSUSERS = SYSTEMD_DIR / "tlsedge.sysusers"
INSTALLED_BIN = "/usr/local/bin/tlsedge"
CONFIG = "/etc/tlsedge/tlsedge.yaml"
PLATFORM = "osc-fr1.scalingo.test"


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} not found: install the Debian package `systemd` "
                    "(scripts/setup.sh test does)", pytrace=False)
    return path


def _tlsedge_bin() -> str:
    """The `tlsedge` console script of the Python running the tests."""
    path = Path(sys.executable).parent / "tlsedge"
    if not os.access(path, os.X_OK):
        found = shutil.which("tlsedge")
        assert found, f"no tlsedge script beside {sys.executable} nor on PATH"
        return found
    return str(path)


def parse_unit(text: str) -> dict[str, list[tuple[str, str]]]:
    """Sections of a unit file as ordered (key, value) pairs; keys may repeat."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    logical = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not logical and (not line or line.startswith(("#", ";"))):
            continue
        if line.endswith("\\"):
            logical += line[:-1] + " "
            continue
        line, logical = logical + line, ""
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
            continue
        key, sep, value = line.partition("=")
        assert sep and current is not None, f"unparsable unit line: {raw!r}"
        current.append((key.strip(), value.strip()))
    return sections


@pytest.fixture(scope="module")
def service() -> dict[str, list[str]]:
    """The [Service] section: each key's values, in order."""
    out: dict[str, list[str]] = {}
    for key, value in parse_unit(UNIT.read_text())["Service"]:
        out.setdefault(key, []).append(value)
    return out


def _one(service: dict[str, list[str]], key: str) -> str:
    values = service.get(key)
    assert values, f"{key}= missing from {UNIT.name}"
    assert len(values) == 1, f"{key}= set {len(values)} times in {UNIT.name}: {values}"
    return values[0]


def _runnable(command: str) -> list[str]:
    """An Exec*= line as argv, with the installed binary and config made local."""
    argv = shlex.split(command.lstrip("-+!@:"))
    return [_tlsedge_bin() if a == INSTALLED_BIN else a for a in argv]


# -- systemd-analyze verify ---------------------------------------------------------

def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = _tool("systemd-analyze")
    # verify checks that Exec binaries exist: point them at this venv's tlsedge.
    text = UNIT.read_text()
    assert INSTALLED_BIN in text
    unit = tmp_path / UNIT.name
    unit.write_text(text.replace(INSTALLED_BIN, _tlsedge_bin()))
    proc = subprocess.run([analyze, "verify", "--man=no", str(unit)],
                          capture_output=True, text=True, timeout=60)
    output = proc.stdout + proc.stderr
    # Unknown keys and bad values are only warnings (exit 0), so read the output.
    # Messages about our unit start with its path ("FILE:LINE: ...") or its name
    # ("tlsedge.service: ..."). Anything else is about the machine (no systemd
    # running in a container, other units pulled in by After=/WantedBy=) and is
    # not ours to fix.
    ours = [line for line in output.splitlines()
            if str(unit) in line or f"{UNIT.name}:" in line]
    assert not ours, f"systemd-analyze verify on {UNIT.name}:\n" + "\n".join(ours)
    # A failure must not hide behind a message we did not classify as ours.
    assert proc.returncode == 0, f"systemd-analyze verify exited {proc.returncode}:\n{output}"


def test_verify_catches_a_broken_unit(tmp_path: Path) -> None:
    """The filter above recognises messages about our unit (guards against the
    output format changing under us and the first test passing vacuously)."""
    analyze = _tool("systemd-analyze")
    text = UNIT.read_text().replace(INSTALLED_BIN, _tlsedge_bin())
    text = text.replace("NoNewPrivileges=yes", "NoNewPrivileges=bogus\nNoSuchDirective=1")
    unit = tmp_path / UNIT.name
    unit.write_text(text)
    proc = subprocess.run([analyze, "verify", "--man=no", str(unit)],
                          capture_output=True, text=True, timeout=60)
    output = proc.stdout + proc.stderr
    assert f"{unit}:" in output and "NoSuchDirective" in output, output


# -- what the unit says ---------------------------------------------------------------

def test_unit_runs_as_notify_service_with_validated_start_and_reload(
        service: dict[str, list[str]]) -> None:
    assert _one(service, "Type") == "notify"
    assert _one(service, "NotifyAccess") == "main"
    start = _one(service, "ExecStart")
    assert shlex.split(start) == [INSTALLED_BIN, "run", "-c", CONFIG]
    pre = service["ExecStartPre"]
    assert any(f"{INSTALLED_BIN} check-config -c {CONFIG}" in p for p in pre), pre
    # Reload: validate first; only a valid config gets the HUP (ExecReload lines run
    # in order and the first failure stops the rest).
    reload = service["ExecReload"]
    assert len(reload) == 2, reload
    assert f"{INSTALLED_BIN} check-config -c {CONFIG}" in reload[0]
    assert not reload[0].startswith("-"), "a failed check-config must fail the reload"
    assert shlex.split(reload[1]) == ["/bin/kill", "-HUP", "$MAINPID"]
    assert _one(service, "Restart") == "on-failure"


def test_unit_stop_outlasts_the_drain(service: dict[str, list[str]]) -> None:
    assert _one(service, "KillMode") == "mixed"
    assert _one(service, "KillSignal") == "SIGTERM"
    stop = float(_one(service, "TimeoutStopSec").removesuffix("s"))
    # The supervisor waits drain_timeout + 5 s for its workers before killing them.
    assert stop > Limits().drain_timeout + 5, stop


def test_unit_user_directories_and_environment(service: dict[str, list[str]]) -> None:
    assert _one(service, "User") == "tlsedge"
    assert _one(service, "Group") == "tlsedge"
    assert "DynamicUser" not in service, "the store's keys need a stable owner"
    assert _one(service, "StateDirectory") == "tlsedge"
    assert _one(service, "ConfigurationDirectory") == "tlsedge"
    runtime = _one(service, "RuntimeDirectory").split()
    assert runtime == ["tlsedge", "tlsedge/metrics"], runtime
    assert "/var/lib/tlsedge" in _one(service, "ReadWritePaths").split()
    assert _one(service, "UMask") == "0077"
    assert _one(service, "LimitNOFILE") == "65536"
    env = dict(shlex.split(e)[0].split("=", 1) for e in service["Environment"])
    assert env["PYTHONUNBUFFERED"] == "1"
    # A directory systemd creates empty at each start (RuntimeDirectory above).
    assert env["PROMETHEUS_MULTIPROC_DIR"] == "/run/tlsedge/metrics"


HARDENING = {
    "AmbientCapabilities": "CAP_NET_BIND_SERVICE",
    "CapabilityBoundingSet": "CAP_NET_BIND_SERVICE",
    "NoNewPrivileges": "yes",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "PrivateDevices": "yes",
    "ProtectKernelTunables": "yes",
    "ProtectKernelModules": "yes",
    "ProtectKernelLogs": "yes",
    "ProtectControlGroups": "yes",
    "ProtectClock": "yes",
    "ProtectHostname": "yes",
    "RestrictNamespaces": "yes",
    "RestrictRealtime": "yes",
    "RestrictSUIDSGID": "yes",
    "LockPersonality": "yes",
    "MemoryDenyWriteExecute": "yes",
    "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
    "SystemCallFilter": "@system-service",
    "SystemCallArchitectures": "native",
}


@pytest.mark.parametrize("key", sorted(HARDENING))
def test_unit_hardening(service: dict[str, list[str]], key: str) -> None:
    assert _one(service, key) == HARDENING[key]


def test_sysusers_creates_the_tlsedge_user(tmp_path: Path) -> None:
    sysusers = _tool("systemd-sysusers")
    conf = tmp_path / "usr/lib/sysusers.d/tlsedge.conf"
    conf.parent.mkdir(parents=True)
    shutil.copy(SYSUSERS, conf)
    (tmp_path / "etc").mkdir()
    proc = subprocess.run([sysusers, f"--root={tmp_path}"], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    passwd = {line.split(":")[0]: line.split(":")
              for line in (tmp_path / "etc/passwd").read_text().splitlines()}
    groups = {line.split(":")[0]: line.split(":")
              for line in (tmp_path / "etc/group").read_text().splitlines()}
    user = passwd["tlsedge"]
    assert user[3] == groups["tlsedge"][2], "primary group is tlsedge"
    assert 0 < int(user[2]) < 1000, "a system user"
    assert user[5] == "/var/lib/tlsedge"
    assert user[6].endswith("nologin")


# -- the unit's commands, run by hand -----------------------------------------------

def _write_config(edge_config: tuple[dict[str, Any], dict[str, Issued]], path: Path) -> None:
    import yaml

    config, _ = edge_config
    path.write_text(yaml.safe_dump({"listen": {"https": "127.0.0.1:1", "http": "127.0.0.1:2"},
                                    **config}))


def test_exec_reload_gate_rejects_a_bad_config(
        tmp_path: Path, service: dict[str, list[str]],
        edge_config: tuple[dict[str, Any], dict[str, Issued]]) -> None:
    good, bad = tmp_path / "good.yaml", tmp_path / "bad.yaml"
    _write_config(edge_config, good)
    config, _ = edge_config
    broken = copy.deepcopy(config)
    broken["tls"]["platform_certificate"]["key"] = str(tmp_path / "missing.key")
    _write_config((broken, {}), bad)
    gate = _runnable(service["ExecReload"][0])
    ok = subprocess.run([*gate[:-1], str(good)], capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    refused = subprocess.run([*gate[:-1], str(bad)], capture_output=True, text=True,
                             timeout=60)
    assert refused.returncode != 0, "check-config accepted a config with a missing key file"
    assert "missing.key" in refused.stderr


def test_check_config_leaves_the_metrics_dir_alone(
        tmp_path: Path, service: dict[str, list[str]],
        edge_config: tuple[dict[str, Any], dict[str, Issued]]) -> None:
    """ExecStartPre/ExecReload run with the service's environment; per-PID metric files
    left by check-config would be served (and counted in livemin/livesum) by the
    supervisor, so the unit hides PROMETHEUS_MULTIPROC_DIR from it."""
    cfg = tmp_path / "tlsedge.yaml"
    _write_config(edge_config, cfg)
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)}
    for command in [*service["ExecStartPre"], service["ExecReload"][0]]:
        argv = _runnable(command)
        if "check-config" not in argv:
            continue
        proc = subprocess.run([*argv[:-1], str(cfg)], capture_output=True, text=True,
                              env=env, timeout=60)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    assert list(metrics_dir.iterdir()) == []


# -- sd_notify readiness protocol -----------------------------------------------------

class NotifySocket:
    """Stands in for systemd's notification socket; records who sent what."""

    def __init__(self) -> None:
        # AF_UNIX paths are limited to 108 bytes: keep it short, not under tmp_path.
        self._dir = tempfile.mkdtemp(prefix="sdn-")
        self.path = os.path.join(self._dir, "notify")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)

    def receive(self, timeout: float = 15.0) -> tuple[int, dict[str, str]]:
        """Next datagram as (sender pid, {key: value})."""
        self.sock.settimeout(timeout)
        try:
            data, ancillary, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(12))
        except TimeoutError:
            raise AssertionError(f"no sd_notify message within {timeout}s") from None
        pid = -1
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid, _, _ = struct.unpack("iII", payload[:12])
        fields = dict(line.split("=", 1) for line in data.decode().splitlines() if line)
        return pid, fields

    def expect(self, key: str, value: str, pid: int, timeout: float = 15.0) -> None:
        sender, fields = self.receive(timeout)
        assert fields.get(key) == value, f"expected {key}={value}, got {fields}"
        assert sender == pid, f"sent by pid {sender}, not the main pid {pid} (NotifyAccess=main)"

    def assert_quiet(self, timeout: float = 0.5) -> None:
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(4096)
        except TimeoutError:
            return
        raise AssertionError(f"unexpected sd_notify message: {data!r}")

    def close(self) -> None:
        self.sock.close()
        shutil.rmtree(self._dir, ignore_errors=True)


@pytest.fixture
def notify() -> Iterator[NotifySocket]:
    n = NotifySocket()
    yield n
    n.close()


def _serves(edge: Edge, issued: Issued) -> bool:
    return edge.fingerprint(f"app.{PLATFORM}") == issued.fingerprint


def test_sd_notify_ready_reload_stopping(
        tmp_path: Path, notify: NotifySocket,
        edge_config: tuple[dict[str, Any], dict[str, Issued]]) -> None:
    config, issued = edge_config
    config = {**config, "workers": 2}
    edge = Edge(tmp_path, config, start=False, env={"NOTIFY_SOCKET": notify.path})
    try:
        starter = threading.Thread(target=edge.start, daemon=True)
        starter.start()
        # READY=1 means "serving": the instant it arrives, a handshake must work.
        sender, fields = notify.receive(30.0)
        assert fields.get("READY") == "1", fields
        assert _serves(edge, issued["platform"]), "READY=1 before the HTTPS port serves"
        starter.join(30)
        assert edge.proc is not None
        pid = edge.proc.pid
        assert sender == pid, f"READY=1 from pid {sender}, not the supervisor {pid}"
        notify.assert_quiet()

        # A valid reload: RELOADING=1, then READY=1 once the workers were told.
        edge.signal(signal.SIGHUP)
        notify.expect("RELOADING", "1", pid)
        notify.expect("READY", "1", pid)
        assert "reload accepted" in edge.log()
        assert _serves(edge, issued["platform"])

        # A refused reload still ends with READY=1 (systemd would otherwise wait for
        # the reload until its timeout), and the old config keeps serving.
        bad = copy.deepcopy(edge.config)
        bad["tls"]["platform_certificate"]["cert"] = str(tmp_path / "missing.pem")
        edge.write_config(bad)
        edge.signal(signal.SIGHUP)
        notify.expect("RELOADING", "1", pid)
        notify.expect("READY", "1", pid)
        assert re.search(r"reload refused", edge.log())
        assert _serves(edge, issued["platform"])
        notify.assert_quiet()

        # SIGTERM: STOPPING=1 at once, then a clean exit after the drain.
        edge.signal(signal.SIGTERM)
        notify.expect("STOPPING", "1", pid)
        # Wait, not edge.stop(): a second SIGTERM means "force" and exits 1.
        assert edge.proc.wait(timeout=30) == 0, edge.log()
        edge.stop()
        notify.assert_quiet()
    finally:
        edge.kill()
