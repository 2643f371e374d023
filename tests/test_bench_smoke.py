"""The benchmark harness works (not a performance test): a tiny --quick run of the
keep-alive and memory scenarios for nginx, the floor and tlsedge prints the table,
writes sane JSON and the Markdown next to it; the report marks issue 14's targets."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

needs_tools = pytest.mark.skipif(
    not all(shutil.which(t) for t in ("nginx", "wrk", "h2load", "gcc")),
    reason="needs nginx, wrk, h2load and gcc (scripts/setup.sh test installs them)")


@pytest.fixture(scope="module")
def report_module() -> object:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import report
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    return report


@needs_tools
def test_quick_run_measures_nginx_floor_and_tlsedge_and_writes_json_and_markdown(
        tmp_path: Path) -> None:
    cmd = [sys.executable, str(ROOT / "benchmarks" / "compare.py"), "--quick",
           "--proxies", "nginx,floor,tlsedge", "--scenarios", "keepalive,memory",
           "--workers", "1", "--seconds", "1", "--rss-seconds", "1", "--idle-conns", "300",
           "--results", str(tmp_path)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=150, cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "keep-alive requests/s" in done.stdout
    assert "share the machine's" in done.stdout
    [result] = tmp_path.glob("*.json")
    data = json.loads(result.read_text())
    med = data["medians"]["1"]
    for proxy in ("nginx", "floor", "tlsedge"):
        keepalive = med["keepalive"][""][proxy]
        assert keepalive["rps"] > 0
        assert keepalive["cpu_us_per_req"] > 0
        assert keepalive["errors"] == 0
        memory = med["memory"][""][proxy]
        assert memory["rss_idle_mib"] > 1
        assert memory["worker_rss_idle_mib"] <= memory["rss_idle_mib"]
        assert memory["rss_per_10k_idle_mib"] > 0  # 300 connections held cost memory
        assert memory["hs_in_rss_runs"] > 0
        assert "rss_growth_run3_pct" in memory
    ratios = [t for t in data["targets"] if t["row"] == "keep-alive CPU us/request"]
    assert ratios and ratios[0]["workers"] == 1 and ratios[0]["measured"] > 0
    markdown = result.with_suffix(".md").read_text()
    assert "| metric | nginx | floor | tlsedge |" in markdown
    assert "tlsedge/floor" in markdown and "**1 worker**" in markdown
    assert "| RSS MiB per 10,000 idle keep-alive conns |" in markdown


def test_report_has_a_section_per_worker_count_ratios_to_nginx_and_the_floor(
        report_module: object) -> None:
    def proxies(nginx: float, floor: float, tlsedge: float) -> dict[str, dict[str, float]]:
        return {"nginx": {"cpu_us_per_hs": nginx}, "floor": {"cpu_us_per_hs": floor},
                "tlsedge": {"cpu_us_per_hs": tlsedge}}

    meds = {"1": {"handshakes": {"ecdsa-tls1.3": proxies(250.0, 300.0, 320.0)},
                  "memory": {"": {"tlsedge": {"worker_rss_idle_mib": 70.0,
                                              "rss_growth_run3_pct": 1.0}}}},
            "2": {"handshakes": {"ecdsa-tls1.3": proxies(250.0, 300.0, 450.0)}}}
    text, markdown, verdicts = report_module.table(meds)  # type: ignore[attr-defined]
    assert text.index("1 worker ") < text.index("2 workers")
    rows = [line for line in markdown.splitlines() if "CPU us/handshake ecdsa-tls1.3" in line]
    # nginx, floor, tlsedge, floor/nginx, tlsedge/nginx, tlsedge/floor, target, ratio, result
    assert [c.strip() for c in rows[0].split("|")[2:-1]] == [
        "250", "300", "320", "1.20", "1.28", "1.07", "<= 1.3x nginx", "1.28x", "PASS"]
    assert rows[1].split("|")[-2].strip() == "MISS"  # 1.80x nginx at 2 workers
    by_row = {(v["workers"], v["row"]): v for v in verdicts}
    assert by_row[1, "worker RSS MiB idle"]["pass"] is False  # 70 MiB > 60
    assert by_row[1, "RSS growth % in run 3"]["pass"] is True
    assert by_row[2, "CPU us/handshake ecdsa-tls1.3"]["measured"] == pytest.approx(1.8)
