"""`logging: {format: json}`: every line a node writes is one JSON object.

The real `tlsedge run` (supervisor, 2 workers, lifecycle on a real pebble, admin
listener) starts, reloads, issues a certificate, refuses a bad reload and stops; every
line of its stderr must parse, carry ts/level/logger/event/pid, and the events that
name a domain, an issuer or a reason carry them as fields. No line holds a private key
or the admin token. The redaction itself is checked on records that carry both.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from proxy import logs
from tests.certgen import CA, key_pem, new_key
from tests.conftest import PLATFORM
from tests.support.backend import Backend
from tests.support.dnsserver import DNSServer
from tests.support.edge import Edge
from tests.support.pebble import Pebble

pytestmark = pytest.mark.timeout(180)

NAME = "logged.example.test"


def wait_for(check: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


def json_lines(text: str) -> list[dict[str, Any]]:
    lines = []
    for line in text.splitlines():
        try:
            lines.append(json.loads(line))
        except ValueError:
            raise AssertionError(f"not a JSON line: {line!r}") from None
    return lines


def events(edge: Edge) -> list[dict[str, Any]]:
    return json_lines(edge.log())


def test_every_line_of_start_reload_issuance_and_stop_is_json_with_its_fields(
        tmp_path: Path, ca: CA, backend: Backend) -> None:
    cert, key = ca.issue([f"*.{PLATFORM}"]).write(tmp_path, "platform")
    config = {"platform_domain": PLATFORM, "workers": 2,
              "tls": {"platform_certificate": {"cert": cert, "key": key}},
              "store": {"path": str(tmp_path / "store")},
              "apps": {"my-app": {"backends": [backend.address]}},
              "limits": {"drain_timeout": 2.0},
              "admin": {"token_file": str(tmp_path / "admin-token")},
              "logging": {"format": "json", "level": "info"}}
    with DNSServer() as dns:
        edge = Edge(tmp_path, config, start=False, admin=True)
        with Pebble(http_port=edge.http_port, dns_port=dns.port) as pebble:
            edge.config["acme"] = {
                "directory": pebble.directory_url, "email": "ops@example.test",
                "ca_bundle": str(pebble.ca_bundle_path),
                "dns": {"edge_addresses": ["127.0.0.1"], "resolvers": [dns.address],
                        "check_interval": 1}}
            edge.write_config()
            try:
                edge.start()
                edge.reload(wait_for="reloaded")
                dns.set_a(NAME, ["127.0.0.1"])
                added = subprocess.run(
                    [sys.executable, "-m", "proxy.cli", "domains", "add", NAME, "--app",
                     "my-app", "-c", str(edge.config_path)],
                    capture_output=True, text=True, timeout=60)
                assert added.returncode == 0, added.stderr
                wait_for(lambda: any(e.get("issuer") for e in events(edge)), 60,
                         "the issuance's log line")
                good = edge.config_path.read_text()
                edge.config_path.write_text(good + "workers: [\n")
                edge.reload(wait_for="reload refused")
                edge.config_path.write_text(good)
                assert edge.stop() == 0
            finally:
                edge.__exit__(None, None, None)

    lines = events(edge)
    assert len(lines) >= 10
    for line in lines:
        assert {"ts", "level", "logger", "event", "pid"} <= line.keys(), line
        assert dt.datetime.fromisoformat(line["ts"]).tzinfo is not None
        assert line["level"] in ("debug", "info", "warning", "error", "critical")
    pids = {line["pid"] for line in lines}
    assert len(pids) >= 3, "the supervisor's and both workers' lines"
    said = [line["event"] for line in lines]
    assert any(e.startswith("serving https on") for e in said)
    assert any(e.startswith("reloaded:") for e in said)
    assert any(e.startswith("stopping:") for e in said)
    issued = next(line for line in lines if line.get("issuer"))
    assert issued["domain"] == NAME and issued["event"].startswith(f"certificate for {NAME}")
    assert "Pebble" in issued["issuer"]
    statuses = [line for line in lines if line["event"].startswith(f"status of {NAME}:")]
    assert statuses and all(s["domain"] == NAME and s["status"] for s in statuses)
    # The supervisor's change lines carry the domain and its app; the add is "added".
    changes = [line for line in lines if line["event"].startswith(f"domain {NAME} ")]
    assert changes and all(c["domain"] == NAME and c["app"] == "my-app" for c in changes)
    assert changes[0]["event"].startswith(f"domain {NAME} added to my-app "), changes
    refused = next(line for line in lines if line["event"].startswith("reload refused"))
    assert refused["level"] == "error" and "invalid YAML" in refused["reason"]
    token = (tmp_path / "admin-token").read_text().strip()
    assert token not in edge.log()
    assert "PRIVATE KEY" not in edge.log()


def test_private_keys_and_the_admin_token_never_reach_a_line(tmp_path: Path) -> None:
    token = "s3cr3t-admin-token-value-0123456789"
    token_file = tmp_path / "token"
    token_file.write_text(token + "\n")
    logs.add_secret_file(str(token_file))
    pem = key_pem(new_key()).decode()
    try:
        raise ValueError(f"bad upload:\n{pem}")
    except ValueError:
        record = logging.LogRecord("tlsedge.admin", logging.ERROR, __file__, 1,
                                   "refused %s with %s", (token, pem), sys.exc_info())
    record.reason = f"key {pem[:60]}"  # a field cut mid-key is still a key
    record.header = f"Bearer {token}"
    for formatter in (logs.JsonFormatter(), logs.TextFormatter()):
        line = formatter.format(record)
        assert token not in line
        assert "PRIVATE KEY" not in line and pem.splitlines()[1] not in line
        assert "[private key redacted]" in line and "[redacted]" in line
    data = json.loads(logs.JsonFormatter().format(record))
    assert data["header"] == "Bearer [redacted]" and "exc" in data
