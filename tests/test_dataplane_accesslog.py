"""The access log on the real `tlsedge run`: one JSON line per request, batched."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from tests.certgen import CA
from tests.conftest import PLATFORM
from tests.support.backend import Backend
from tests.support.edge import Edge

APP = f"my-app.{PLATFORM}"


def _lines_when(path: Path, count: int, timeout: float = 30.0) -> list[dict[str, Any]]:
    """The log's JSON lines once there are `count` of them (or what is there at the
    deadline, for the assertion to show)."""
    deadline = time.monotonic() + timeout
    while True:
        text = path.read_text() if path.exists() else ""
        lines = [json.loads(x) for x in text[:text.rfind("\n") + 1].splitlines()]
        if len(lines) >= count or time.monotonic() > deadline:
            return lines
        time.sleep(0.05)


def test_each_request_gets_one_json_line_without_the_query(ca: CA, backend: Backend,
                                                           tmp_path: Path) -> None:
    pcert, pkey = ca.issue([f"*.{PLATFORM}"]).write(tmp_path, "platform")
    log_path = tmp_path / "access.log"
    config = {
        "platform_domain": PLATFORM, "workers": 1,
        "tls": {"platform_certificate": {"cert": pcert, "key": pkey}},
        "store": {"path": "store"},
        "apps": {"my-app": {"backends": [backend.address]}},
        "access_log": {"enabled": True, "path": str(log_path)},
        "limits": {"drain_timeout": 2},
    }
    with Edge(tmp_path, config) as edge:
        assert edge.request(APP, "/a?secret=1")[0] == 200
        assert edge.request("nobody.test", "/b", server_name=None)[0] == 404
        lines = _lines_when(log_path, 2)  # written in batches: poll for them
    assert [(x["app"], x["status"], x["path"]) for x in lines] == [
        ("my-app", 200, "/a"), ("", 404, "/b")]
    assert lines[0]["tls"].startswith("TLSv1.") and len(lines[0]["request_id"]) == 32
    assert lines[0]["bytes_out"] > 0 and lines[0]["duration_ms"] > 0
