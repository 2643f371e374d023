"""The /metrics scrape of the real `tlsedge run`: every documented metric appears with
the right labels and counts, summed over workers, and only on the metrics port.
Per-request and per-connection counts reach the scrape within ~1 s (workers batch
them), so those are awaited.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.certgen import Issued
from tests.conftest import PLATFORM
from tests.support.backend import Backend
from tests.support.edge import Edge, established_remote_ports

APP_HOST = f"my-app.{PLATFORM}"
Config = tuple[dict[str, Any], dict[str, Issued]]


def eventually(check: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return check()


def test_scrape_after_traffic_has_every_metric_with_the_right_values(
        edge: Edge, edge_config: Config) -> None:
    _, issued = edge_config
    for i in range(3):
        assert edge.request(APP_HOST, f"/m/{i}")[0] == 200
    assert edge.request("nobody.example.test", "/")[0] == 404  # unknown SNI and Host
    edge.reload(wait_for="reloaded")
    assert eventually(lambda: edge.metric("tlsedge_requests_total", app="",
                                          code_class="4xx") == 1)

    assert edge.metric("tlsedge_tls_handshakes_total", result="ok", version="TLSv1.3") == 4
    assert edge.metric("tlsedge_tls_handshake_duration_seconds_count") == 4
    assert edge.metric("tlsedge_tls_handshake_duration_seconds_sum") > 0
    assert edge.metric("tlsedge_requests_total", app="my-app", code_class="2xx") == 3
    assert edge.metric("tlsedge_requests_total", app="", code_class="4xx") == 1
    assert edge.metric("tlsedge_upstream_response_seconds_count", app="my-app") == 3
    assert edge.metric("tlsedge_upstream_response_seconds_bucket", app="my-app",
                       le="+Inf") == 3
    assert edge.metric("tlsedge_sni_lookups_total", result="default") >= 1
    assert edge.metric("tlsedge_sni_lookups_total", result="wildcard") >= 3
    assert edge.metric("tlsedge_reloads_total", result="ok") == 1
    last = edge.metric("tlsedge_reload_last_success_timestamp_seconds")
    assert time.time() - 60 < last <= time.time()

    text = edge.metrics()
    expiry = {name: edge.metric("tlsedge_certificate_expiry_timestamp_seconds", name=name)
              for name in (f"*.{PLATFORM}", "www.shop.test")}
    assert text.count("tlsedge_certificate_expiry_timestamp_seconds{") == 2
    assert expiry[f"*.{PLATFORM}"] == issued["platform"].cert.not_valid_after_utc.timestamp()
    assert expiry["www.shop.test"] == issued["shop"].cert.not_valid_after_utc.timestamp()
    # Client-sent names never become labels.
    assert "nobody.example.test" not in text


def test_active_connections_counts_open_ones_and_returns_to_zero(edge: Edge) -> None:
    def active() -> float:
        return edge.metric("tlsedge_active_connections", listener="https")

    with edge.tls_connect(APP_HOST) as one, edge.tls_connect("www.shop.test") as two:
        one.sendall(f"GET / HTTP/1.1\r\nHost: {APP_HOST}\r\n\r\n".encode())
        one.recv(1)
        two.sendall(b"GET / HTTP/1.1\r\nHost: www.shop.test\r\n\r\n")
        two.recv(1)
        assert eventually(lambda: active() == 2), active()
    # Peers that leave before or during the handshake are never counted as open.
    for _ in range(5):
        socket.create_connection(("127.0.0.1", edge.https_port)).close()
        with socket.create_connection(("127.0.0.1", edge.https_port)) as s:
            s.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")  # a cut ClientHello
    assert eventually(lambda: active() == 0), active()
    assert edge.request(APP_HOST, "/")[0] == 200
    assert eventually(lambda: active() == 0), active()


def test_metrics_path_on_the_public_port_is_routed_not_answered_with_metrics(
        edge: Edge, backend: Backend) -> None:
    status, _, body = edge.request(APP_HOST, "/metrics")
    assert status == 200 and b'"backend": "b1"' in body
    assert backend.seen[-1].path == "/metrics"
    status, _, body = edge.request("nobody.example.test", "/metrics")
    assert status == 404 and b"tlsedge_" not in body
    # And the metrics listener is its own port, not the HTTPS one.
    assert edge.metrics_port != edge.https_port
    assert eventually(lambda: "tlsedge_tls_handshakes_total" in edge.metrics())


def test_two_workers_report_summed_counts(tmp_path: Path, edge_config: Config,
                                          backend: Backend) -> None:
    config, _ = edge_config
    with Edge(tmp_path, {**config, "workers": 2}) as edge:
        n = 20
        for i in range(n):
            assert edge.request(APP_HOST, f"/w/{i}")[0] == 200
        # Both workers took part (each holds a pooled connection to the backend)...
        pids = edge.worker_pids()
        assert len(pids) == 2
        assert all(backend.port in established_remote_ports(pid) for pid in pids)
        # ...and the scrape adds their counts up.
        assert eventually(lambda: edge.metric("tlsedge_requests_total", app="my-app",
                                              code_class="2xx") == n)
        assert edge.metric("tlsedge_tls_handshakes_total", result="ok") == n
        assert edge.metric("tlsedge_upstream_response_seconds_count", app="my-app") == n


def test_domain_counts_follow_store_changes_and_expiry_is_scraped(
        tmp_path: Path, backend: Backend) -> None:
    """tlsedge_domains{in_use, status} is recounted per store event for the domains it
    names (statuses included), and each store certificate's expiry is in the scrape."""
    from proxy.certs.bundle import load_bundle
    from tests.certgen import CA
    from tests.support.admin import edge_settings, in_store

    ca = CA.new("metrics test CA")
    with Edge(tmp_path, edge_settings(tmp_path, ca, backend)) as edge:
        issued = ca.issue(["held.example"], not_after=time.time() + 30 * 86400)

        async def fill(registry: Any) -> None:
            for name in ("a.example", "b.example", "held.example"):
                await registry.add_domain(name, "my-app")
            await registry.store_acme_certificate(
                "held.example", load_bundle(issued.chain_pem, issued.key_pem,
                                            domain="held.example"))
            await registry.set_status("held.example", state="issued")

        in_store(edge, fill)
        # No acme: section, so the two waiting for a certificate are "ACME off".
        assert eventually(lambda: edge.metric("tlsedge_domains", in_use="platform",
                                              status="acme_off") == 2)
        assert edge.metric("tlsedge_domains", in_use="letsencrypt", status="in_use") == 1
        expiry = edge.metric("tlsedge_certificate_expiry_timestamp_seconds",
                             name="held.example", source="acme")
        assert abs(expiry - issued.cert.not_valid_after_utc.timestamp()) < 1

        # A status change alone moves a domain from one count to another.
        in_store(edge, lambda r: r.set_status("b.example", state="error"))
        assert eventually(lambda: edge.metric("tlsedge_domains", in_use="platform",
                                              status="error") == 1)
        assert edge.metric("tlsedge_domains", in_use="platform", status="acme_off") == 1
        in_store(edge, lambda r: r.remove_domain("held.example"))
        assert eventually(lambda: edge.metric("tlsedge_domains", in_use="letsencrypt",
                                              status="in_use") == 0)
        assert "held.example" not in edge.metrics()
