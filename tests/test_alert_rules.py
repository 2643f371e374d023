"""contrib/: the Prometheus alert rules and the Grafana dashboard, against a real node.

One node (the real `tlsedge run` with 2 workers, its lifecycle on a real pebble and the
test DNS server) is driven through what the rules watch: traffic to a live and a dead
backend, a handshake that fails, a reload accepted and one refused, an order issued and
one the CA refuses, a domain waiting for its DNS, a custom certificate in front of the
Let's Encrypt one (which becomes the standby, expiring in 2 days) and a killed worker.
Its /metrics is scraped once; then:

- `promtool check rules` accepts the rules file;
- every rule fires in a `promtool test rules` unit test whose input series are the
  series of that scrape (names and labels as scraped; values grown over the test's
  time from the scraped values), and stays quiet on healthy values of the same series;
- every metric the dashboard queries is in the scrape.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.certgen import CA
from tests.conftest import PLATFORM
from tests.support.backend import Backend
from tests.support.dnsserver import DNSServer
from tests.support.edge import Edge
from tests.support.pebble import Pebble
from tests.support.ports import free_port

pytestmark = pytest.mark.timeout(240)

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "contrib" / "prometheus" / "tlsedge-alerts.yml"
DASHBOARD = ROOT / "contrib" / "grafana" / "tlsedge-dashboard.json"
TARGET = {"instance": "edge-1:9448", "job": "tlsedge"}  # what Prometheus adds to a scrape
STANDBY_DAYS = 2


@dataclass
class Sample:
    name: str
    labels: dict[str, str]
    value: float


@dataclass
class Scrape:
    samples: list[Sample]
    at: float

    def find(self, metric: str, /, **labels: str) -> Sample:
        for s in self.samples:
            if s.name == metric and all(s.labels.get(k) == v for k, v in labels.items()):
                return s
        raise AssertionError(f"{metric}{labels} is not in the scrape")


def parse(text: str) -> list[Sample]:
    samples = []
    for line in text.splitlines():
        m = re.match(r"^([a-zA-Z_:][\w:]*)(?:\{(.*)\})? (\S+)$", line)
        if m and not line.startswith("#"):
            labels = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(2) or ""))
            samples.append(Sample(m.group(1), labels, float(m.group(3))))
    return samples


def wait_for(check: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


def domains(edge: Edge, *args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "proxy.cli", "domains", *args, "-c",
                           str(edge.config_path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def status(edge: Edge, name: str) -> str:
    return str(json.loads(domains(edge, "show", name, "--json"))["status"])


@pytest.fixture(scope="module")
def scrape(tmp_path_factory: pytest.TempPathFactory, ca: CA) -> Iterator[Scrape]:
    workdir = tmp_path_factory.mktemp("alerts")
    platform_cert, platform_key = ca.issue([f"*.{PLATFORM}"]).write(workdir, "platform")
    with DNSServer() as dns, Backend("b1") as backend:
        config = {
            "platform_domain": PLATFORM, "workers": 2,
            "tls": {"platform_certificate": {"cert": platform_cert, "key": platform_key}},
            "store": {"path": str(workdir / "store")},
            # Nothing listens on the `down` app's port: each request to it is a 5xx.
            "apps": {"my-app": {"backends": [backend.address]},
                     "down": {"backends": [f"127.0.0.1:{free_port()}"]}},
            "limits": {"drain_timeout": 2.0},
        }
        edge = Edge(workdir, config, start=False)
        with Pebble(http_port=edge.http_port, dns_port=dns.port,
                    validity_seconds=STANDBY_DAYS * 86400,
                    config_overrides={"domainBlocklist": ["blocked.example.test"]}) as pebble:
            edge.config["acme"] = {
                "directory": pebble.directory_url, "email": "ops@example.test",
                "ca_bundle": str(pebble.ca_bundle_path),
                "dns": {"edge_addresses": ["127.0.0.1"], "resolvers": [dns.address],
                        "check_interval": 1}}
            edge.write_config()
            edge.start()
            try:
                yield drive(edge, dns, ca, workdir)
            finally:
                edge.__exit__(None, None, None)


def drive(edge: Edge, dns: DNSServer, ca: CA, workdir: Path) -> Scrape:
    for name, address in (("held.example.test", "127.0.0.1"),
                          ("blocked.example.test", "127.0.0.1"),
                          ("waiting.example.test", "192.0.2.1")):
        dns.set_a(name, [address])
        domains(edge, "add", name, "--app", "my-app")
    wait_for(lambda: status(edge, "held.example.test") == "in_use", 30, "an issued order")
    wait_for(lambda: status(edge, "blocked.example.test") == "error", 30, "a refused order")
    # A custom certificate in front: the Let's Encrypt one is kept as the standby.
    custom = ca.issue(["held.example.test"], not_after=time.time() + 300 * 86400)
    cert, key = custom.write(workdir, "held")
    domains(edge, "ssl", "held.example.test", "--cert", cert, "--key", key)
    assert status(edge, "held.example.test") == "not_used"
    for _ in range(3):
        assert edge.request(f"my-app.{PLATFORM}")[0] == 200
        assert edge.request(f"down.{PLATFORM}")[0] in (502, 503)  # 503: quarantined
    with socket.create_connection(("127.0.0.1", edge.https_port), timeout=5) as raw:
        raw.sendall(b"GET / HTTP/1.1\r\nHost: not-tls\r\n\r\n")  # no TLS: the handshake fails
        raw.recv(100)
    # Workers write their counts once a second: wait for them before one is killed.
    wait_for(lambda: edge.metric("tlsedge_tls_handshakes_total", result="failed") >= 1
             and edge.metric("tlsedge_requests_total", code_class="5xx") >= 3, 10,
             "the workers' batched counts")
    edge.reload(wait_for="reload accepted")
    good = edge.config_path.read_text()
    edge.config_path.write_text(good + "tls: [broken\n")
    edge.reload(wait_for="reload refused")
    edge.config_path.write_text(good)
    os.kill(edge.worker_pids()[0], signal.SIGKILL)
    wait_for(lambda: edge.metric("tlsedge_worker_restarts_total") >= 1, 30,
             "the worker restart counted")
    return Scrape(parse(edge.metrics()), time.time())


# --------------------------------------------------------------------------- rules


def test_promtool_accepts_the_rules_file() -> None:
    promtool = _promtool()
    done = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(_rules())} rules found" in done.stdout


def _promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool not found: install the Debian package `prometheus` "
                    "(scripts/setup.sh test does)", pytrace=False)
    return path


def _rules() -> dict[str, dict[str, Any]]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return {r["alert"]: r for g in groups for r in g["rules"]}


def series(sample: Sample, values: str) -> dict[str, str]:
    labels = {**sample.labels, **TARGET}
    body = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    return {"series": f"{sample.name}{{{body}}}", "values": values}


def expected(alert: str, **labels: str) -> dict[str, Any]:
    """The alert as promtool reports it: its labels and its annotations rendered."""
    rule = _rules()[alert]
    full = {**labels, **rule.get("labels", {})}
    annotations = {k: re.sub(r"\{\{ \$labels\.(\w+) \}\}", lambda m: full[m.group(1)], v)
                   for k, v in rule.get("annotations", {}).items()}
    return {"exp_labels": full, "exp_annotations": annotations}


def grow(start: float, step: float, minutes: int) -> str:
    return f"{start:g}+{step:g}x{minutes}"


Case = tuple[list[dict[str, str]], list[tuple[str, list[dict[str, Any]]]]]


def cases(scrape: Scrape, alert: str) -> list[Case]:
    """(input series, [(eval time, expected alerts)]) groups for `alert`: the first fires,
    the others stay quiet."""
    inst = TARGET["instance"]
    if alert.startswith("TlsedgeCertificateExpiresWithin"):
        # Promtool's clock starts at 0: each expiry is fed as seconds from the scrape.
        standby = scrape.find("tlsedge_certificates_soonest_expiry_timestamp_seconds",
                              source="acme", role="standby")
        serving = scrape.find("tlsedge_certificates_soonest_expiry_timestamp_seconds",
                              source="custom", role="serving")
        left = standby.value - scrape.at
        assert (STANDBY_DAYS - 1) * 86400 < left <= STANDBY_DAYS * 86400
        later = serving.value - scrape.at  # 300 days: quiet
        return [([series(standby, f"{left:.0f}x180"), series(serving, f"{later:.0f}x180")],
                 [("2h", [expected(alert, instance=inst, source="acme", role="standby")])])]
    if alert == "TlsedgeAcmeOrdersFailing":
        failed = scrape.find("tlsedge_acme_orders_total", result="failed")
        assert failed.value >= 1
        return [([series(failed, f"0x10 {failed.value:g}x10")],
                 [("16m", [expected(alert, instance=inst)])]),
                ([series(failed, f"{failed.value:g}x30")], [("20m", [])])]
    if alert == "TlsedgeDomainsPendingDnsFor24Hours":
        waiting = scrape.find("tlsedge_domains", status="pending_dns")
        assert waiting.value == 1
        return [([series(waiting, f"{waiting.value:g}x1500")],
                 [("23h", []), ("24h10m", [expected(alert, instance=inst)])])]
    if alert == "TlsedgeDomainsInError":
        broken = scrape.find("tlsedge_domains", status="error")
        assert broken.value == 1
        return [([series(broken, f"{broken.value:g}x30")],
                 [("10m", []), ("20m", [expected(alert, instance=inst)])])]
    if alert == "TlsedgeReloadFailed":
        failed = scrape.find("tlsedge_reloads_total", result="failed")
        ok = scrape.find("tlsedge_reloads_total", result="ok")
        assert failed.value == 1 and ok.value >= 1
        return [([series(failed, f"0x10 {failed.value:g}x10"), series(ok, grow(0, 1, 20))],
                 [("16m", [expected(alert, instance=inst)])]),
                ([series(failed, f"{failed.value:g}x30"), series(ok, grow(0, 1, 30))],
                 [("20m", [])])]
    if alert == "TlsedgeWorkerRestarting":
        restarts = scrape.find("tlsedge_worker_restarts_total")
        assert restarts.value >= 1
        return [([series(restarts, f"0x10 {restarts.value:g}x10")],
                 [("16m", [expected(alert, instance=inst)])]),
                ([series(restarts, f"{restarts.value:g}x30")], [("20m", [])])]
    if alert == "TlsedgeNodeTaskRestarting":
        task = scrape.find("tlsedge_node_task_restarts_total", task="lifecycle")
        assert task.value == 0  # created at 0, so the first restart is an increase
        return [([series(task, "0x10 1x10")],
                 [("16m", [expected(alert, instance=inst, task="lifecycle")])]),
                ([series(task, "0x30")], [("20m", [])])]
    if alert == "TlsedgeApp5xxRatioHigh":
        down = scrape.find("tlsedge_requests_total", app="down", code_class="5xx")
        fine = scrape.find("tlsedge_requests_total", app="my-app", code_class="2xx")
        assert down.value >= 3 and fine.value >= 3
        return [([series(down, grow(down.value, 60, 30)), series(fine, grow(fine.value, 60, 30))],
                 [("25m", [expected(alert, instance=inst, app="down")])])]
    if alert == "TlsedgeHandshakeFailuresSpike":
        failed = scrape.find("tlsedge_tls_handshakes_total", result="failed")
        ok = scrape.find("tlsedge_tls_handshakes_total", result="ok")
        assert failed.value >= 1 and ok.value >= 6
        return [([series(failed, grow(failed.value, 120, 30)), series(ok, grow(ok.value, 60, 30))],
                 [("25m", [expected(alert, instance=inst)])]),
                ([series(failed, grow(failed.value, 6, 30)), series(ok, grow(ok.value, 60, 30))],
                 [("25m", [])])]
    raise AssertionError(f"no unit test for {alert}: add one here")


@pytest.mark.parametrize("alert", sorted(_rules()))
def test_alert_rule_fires_on_series_scraped_from_a_real_node(
        alert: str, scrape: Scrape, tmp_path: Path) -> None:
    tests = []
    for inputs, evals in cases(scrape, alert):
        tests.append({"interval": "1m", "input_series": inputs,
                      "alert_rule_test": [{"eval_time": at, "alertname": alert,
                                           "exp_alerts": exp} for at, exp in evals]})
    assert any(exp for _, evals in cases(scrape, alert) for _, exp in evals), "never fires"
    spec = tmp_path / "alert-test.yml"
    spec.write_text(yaml.safe_dump({"rule_files": [str(RULES)], "evaluation_interval": "1m",
                                    "tests": tests}, sort_keys=False))
    done = subprocess.run([_promtool(), "test", "rules", str(spec)], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr + spec.read_text()


# --------------------------------------------------------------------------- dashboard


def test_every_metric_the_dashboard_queries_is_in_a_real_scrape(scrape: Scrape) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    exprs.append(dashboard["templating"]["list"][1]["query"])
    queried = {m for e in exprs for m in re.findall(r"\b(tlsedge_\w+)", e)}
    assert len(queried) >= 20
    scraped = {s.name for s in scrape.samples}
    missing = sorted(queried - scraped)
    assert not missing, f"the dashboard queries metrics a node does not export: {missing}"
    for panel in dashboard["panels"]:
        assert panel["targets"] and panel["title"], panel


# --------------------------------------------------------------------------- expiry series


def test_the_standby_certificate_behind_a_custom_one_has_its_expiry_series(
        scrape: Scrape) -> None:
    name = "held.example.test"
    standby = scrape.find("tlsedge_certificate_expiry_timestamp_seconds", name=name,
                          source="acme", role="standby")
    serving = scrape.find("tlsedge_certificate_expiry_timestamp_seconds", name=name,
                          source="custom", role="serving")
    assert standby.value - scrape.at < STANDBY_DAYS * 86400 < serving.value - scrape.at
    left = scrape.find("tlsedge_certificate_expiry_seconds", name=name, source="acme",
                       role="standby")
    assert abs(left.value - (standby.value - scrape.at)) < 60
    assert scrape.find("tlsedge_certificates", source="acme", role="standby",
                       expires_in="lt_3d").value == 1
    assert scrape.find("tlsedge_certificates", source="platform", role="serving",
                       expires_in="ge_30d").value == 1


def test_past_the_configured_count_only_the_soonest_expiry_series_are_kept(
        tmp_path: Path, edge_config: tuple[dict[str, Any], Any]) -> None:
    config, issued = edge_config
    config = {**config, "metrics": {"certificate_series": 1}}  # two are held
    with Edge(tmp_path, config) as edge:
        samples = parse(edge.metrics())
    first = min(issued.values(), key=lambda i: i.cert.not_valid_after_utc)
    [at] = [s for s in samples if s.name == "tlsedge_certificate_expiry_timestamp_seconds"]
    [left] = [s for s in samples if s.name == "tlsedge_certificate_expiry_seconds"]
    assert at.value == first.cert.not_valid_after_utc.timestamp()
    assert at.labels == left.labels
    soonest = Scrape(samples, time.time()).find(
        "tlsedge_certificates_soonest_expiry_timestamp_seconds", source="static",
        role="serving")
    assert soonest.value == issued["shop"].cert.not_valid_after_utc.timestamp()
    counted = sum(s.value for s in samples if s.name == "tlsedge_certificates")
    assert counted == 2
