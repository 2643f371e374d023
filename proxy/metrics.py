"""Every Prometheus metric of tlsedge, defined once.

Labels are bounded by configuration (app names, certificate primary names from our
own table, fixed result words); never by anything a client sends, such as its SNI.
Workers are separate processes: the CLI sets PROMETHEUS_MULTIPROC_DIR before this
module is imported, and the supervisor serves the merged view.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                    10.0, 30.0)
_HANDSHAKE_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                      2.5, 10.0)

HANDSHAKES = Counter(
    "tlsedge_tls_handshakes_total",
    "TLS handshakes on the HTTPS listener by result (ok, failed, timeout, rejected) "
    "and negotiated version.",
    ["result", "version"],
)
HANDSHAKE_SECONDS = Histogram(
    "tlsedge_tls_handshake_duration_seconds",
    "Time from accept to a completed TLS handshake.",
    buckets=_HANDSHAKE_BUCKETS,
)
SNI_LOOKUPS = Counter(
    "tlsedge_sni_lookups_total",
    "Certificate lookups by how the SNI name matched: exact, wildcard, default "
    "(fell to the platform/default certificate) or rejected.",
    ["result"],
)
CONTEXT_BUILDS = Counter(
    "tlsedge_ssl_context_builds_total",
    "SSLContexts built (context cache misses).",
)
CONTEXT_CACHE_SIZE = Gauge(
    "tlsedge_ssl_context_cache_entries",
    "SSLContexts held in the bounded cache, per worker summed.",
    multiprocess_mode="livesum",
)
ACTIVE_CONNECTIONS = Gauge(
    "tlsedge_active_connections",
    "Client connections open now, by listener (https, http).",
    ["listener"],
    multiprocess_mode="livesum",
)
REQUESTS = Counter(
    "tlsedge_requests_total",
    "Requests answered, by app (empty when no app matched) and status class (2xx..5xx).",
    ["app", "code_class"],
)
UPSTREAM_SECONDS = Histogram(
    "tlsedge_upstream_response_seconds",
    "Time from sending the request head to the first byte of the backend's response.",
    ["app"],
    buckets=_LATENCY_BUCKETS,
)
UPSTREAM_ERRORS = Counter(
    "tlsedge_upstream_errors_total",
    "Backend failures by app and kind (connect, timeout, reset, protocol).",
    ["app", "kind"],
)
RELOADS = Counter(
    "tlsedge_reloads_total",
    "Config and certificate reloads by result (ok, failed).",
    ["result"],
)
RELOAD_LAST_SUCCESS = Gauge(
    "tlsedge_reload_last_success_timestamp_seconds",
    "Unix time of the last successful reload (the stalest live worker).",
    multiprocess_mode="livemin",
)
LIMITS_HIT = Counter(
    "tlsedge_limits_hit_total",
    "Requests or connections cut by a limit or timeout, by which one.",
    ["limit"],
)
CHALLENGES_SERVED = Counter(
    "tlsedge_acme_challenges_served_total",
    "HTTP-01 challenge requests on the plain-HTTP listener by result (hit, miss).",
    ["result"],
)


class CertificateExpiry(Collector):
    """Expiry of each loaded certificate, read from the current snapshot at scrape time.

    Lives in the supervisor's registry (not in the multiprocess files) so a certificate
    that leaves the table also leaves the scrape. `source` returns
    (primary_name, source, not_after_unix) triples.
    """

    def __init__(self, source: Callable[[], Iterable[tuple[str, str, float]]]) -> None:
        self._source = source

    def collect(self) -> Iterable[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "tlsedge_certificate_expiry_timestamp_seconds",
            "Unix time at which each loaded certificate expires, by its primary name "
            "in our table and its source (platform, static, custom, acme).",
            labels=["name", "source"],
        )
        for name, source, not_after in self._source():
            family.add_metric([name, source], not_after)
        yield family
