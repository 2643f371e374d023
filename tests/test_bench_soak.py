"""The soak harness works (not a soak): a 20-second run against a real `tlsedge run`
samples every second, fits the slopes, uploads and reloads, and counts zero failures."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_short_soak_reports_slopes_and_no_failed_request(tmp_path: Path) -> None:
    cmd = [sys.executable, str(ROOT / "benchmarks" / "soak.py"), "--minutes", "0.34",
           "--json", "--results", str(tmp_path)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(done.stdout)
    [written] = tmp_path.glob("soak-*.json")
    assert json.loads(written.read_text()) == report

    assert len(report["samples"]) >= 18  # one a second for ~20 s
    for sample in report["samples"]:
        assert set(sample["rss_mib"]) == set(sample["fds"]) == {"supervisor", "worker"}
        assert all(v > 0 for v in (*sample["rss_mib"].values(), *sample["fds"].values()))
    assert len(report["series"]) == 7
    for label, series in report["series"].items():
        assert series["samples"] >= 10, label  # after the warm-up (the first third)
        assert isinstance(series["slope_per_min"], float), label
        assert series["verdict"] in ("flat", "rising", "falling"), label
    # The keep-alive, WebSocket and probe connections are open while it samples.
    assert report["series"]["live HTTPS connections"]["min"] >= 4
    assert report["series"]["client TCP connections (kernel)"]["min"] >= 4

    requests = report["requests"]
    assert all(requests[kind]["ok"] > 0 for kind in ("handshake", "keepalive",
                                                     "websocket", "probe"))
    assert report["failed_requests"] == 0, report["errors"]
    assert requests["resumed_handshakes"] == 0
    assert report["uploads"]["done"] >= 3 and report["uploads"]["failed"] == 0
    assert report["reloads"]["done"] >= 1 and report["reloads"]["failed"] == 0
    assert report["failed_operations"] == 0
    assert len(report["worker_pids"]) == 1
