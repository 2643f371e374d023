"""The benchmark harness works (not a performance test): a tiny --quick run of the
keep-alive scenario for tlsedge and nginx prints the table and writes sane JSON."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(
    not all(shutil.which(t) for t in ("nginx", "wrk", "h2load", "gcc")),
    reason="needs nginx, wrk, h2load and gcc (scripts/setup.sh test installs them)")


def test_quick_keepalive_run_prints_a_table_and_writes_json_with_ratios(tmp_path: Path) -> None:
    cmd = [sys.executable, str(ROOT / "benchmarks" / "compare.py"), "--quick",
           "--proxies", "tlsedge,nginx", "--scenarios", "keepalive", "--seconds", "1",
           "--results", str(tmp_path)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "keep-alive requests/s" in done.stdout
    assert "share the machine's" in done.stdout
    [result] = tmp_path.glob("*.json")
    data = json.loads(result.read_text())
    keepalive = data["medians"]["keepalive"][""]
    for proxy in ("tlsedge", "nginx"):
        assert keepalive[proxy]["rps"] > 0
        assert keepalive[proxy]["cpu_us_per_req"] > 0
        assert keepalive[proxy]["errors"] == 0
    ratios = [t for t in data["targets"] if t["row"] == "keep-alive requests/s"]
    assert ratios and all(t["measured"] > 0 for t in ratios)
