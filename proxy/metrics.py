"""Every Prometheus metric of tlsedge, defined once.

Labels are bounded by configuration (app names, certificate primary names from our
own table, fixed result words); never by anything a client sends, such as its SNI.
Workers are separate processes: the CLI sets PROMETHEUS_MULTIPROC_DIR before this
module is imported, and the supervisor serves the merged view.

Per-request and per-connection counts (requests, upstream latency, handshakes, open
connections) are gathered in plain Python numbers (`batched_*`) and written into the
prometheus objects by one timer every FLUSH_INTERVAL (and when a worker drains): a
scrape may be up to ~1 s behind the traffic, and a worker that dies loses at most its
last second of them. Everything else is written at once.
"""

from __future__ import annotations

import asyncio
import os
from bisect import bisect_left
from collections.abc import Callable, Iterable

from prometheus_client import Counter, Gauge, Histogram, values
from prometheus_client.core import GaugeHistogramMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    # Every inc()/observe() in multiprocess mode asks the process identifier to
    # detect a fork; with the default (os.getpid, a syscall each time here) that
    # was 25 % of a worker's CPU under keep-alive load. Our processes are started
    # as fresh interpreters, never forked after this import, so the pid is fixed.
    _PID = os.getpid()
    values.ValueClass = values.MultiProcessValue(  # type: ignore[no-untyped-call]
        process_identifier=lambda: _PID)

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
CERTIFICATES_RESIDENT = Gauge(
    "tlsedge_store_certificates_resident",
    "Store domains whose certificate records a worker holds in memory, per worker "
    "summed (store.resident_certificates bounds each worker).",
    multiprocess_mode="livesum",
)
CERTIFICATE_LOADS = Counter(
    "tlsedge_store_certificate_loads_total",
    "Store domains' certificates read on first use, before a handshake, by result "
    "(ok, failed).",
    ["result"],
)
CERTIFICATE_LOAD_SECONDS = Histogram(
    "tlsedge_store_certificate_load_seconds",
    "Time a handshake waited for its domain's certificate records to be read.",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0),
)
ACTIVE_CONNECTIONS = Gauge(
    "tlsedge_active_connections",
    "Client connections open now, by listener (https, http).",
    ["listener"],
    multiprocess_mode="livesum",
)
REQUESTS = Counter(
    "tlsedge_requests_total",
    "Requests answered, by app (empty when no app matched), status class (2xx..5xx) and "
    "client protocol (http/1.1, h2).",
    ["app", "code_class", "protocol"],
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
PROXY_PROTOCOL = Counter(
    "tlsedge_proxy_protocol_total",
    "Connections on a listener with proxy_protocol by what their PROXY header was: ok, "
    "local (the balancer's own check), untrusted (a source outside `trusted`), missing "
    "(no header: TLS or HTTP first), invalid, truncated (closed mid-header), timeout. "
    "All but ok and local were closed unread.",
    ["result"],
)
CHALLENGES_SERVED = Counter(
    "tlsedge_acme_challenges_served_total",
    "HTTP-01 challenge requests on the plain-HTTP listener by result (hit, miss).",
    ["result"],
)


# Expiry buckets of tlsedge_certificates{expires_in}: (label, seconds left below).
EXPIRY_BUCKETS = (("expired", 0.0), ("lt_3d", 3 * 86400.0), ("lt_14d", 14 * 86400.0),
                  ("lt_30d", 30 * 86400.0), ("ge_30d", float("inf")))
Held = tuple[str, str, str, float]  # (primary name, source, role, not_after)
Hours = tuple[str, str, int, int]  # (source, role, hour it expires in: Unix time // 3600, count)
# Buckets (days left, upper bounds) of tlsedge_certificate_expiry_days.
EXPIRY_DAYS = (0.0, 1.0, 3.0, 7.0, 14.0, 21.0, 30.0, 45.0, 60.0, 90.0)


class CertificateExpiry(Collector):
    """Expiry of every certificate the node holds, serving or standby, read at scrape
    time (a certificate that leaves the store or the config leaves the scrape), in
    series whose number never grows with the domains:

    - one series per certificate for the `per_certificate` expiring first
      (metrics.certificate_series);
    - per source and role: the soonest expiry, counts by expires_in bucket, and a
      histogram of days to expiry (tlsedge_certificate_expiry_days).

    Lives in the supervisor's registry, not in the multiprocess files. `held` returns
    (primary_name, source, role, not_after) of at least the soonest `per_certificate`
    certificates of each source and role (every config certificate; the store's
    soonest, sync.Tally); `hours` how many of each source and role expire in each
    hour (all of them): the counts are to the hour, the rest exact. role is serving or
    standby (e.g. the Let's Encrypt certificate behind a custom one).
    """

    def __init__(self, held: Callable[[], Iterable[Held]],
                 hours: Callable[[], Iterable[Hours]], clock: Callable[[], float],
                 per_certificate: int) -> None:
        self._held = held
        self._hours = hours
        self._clock = clock
        self._per_certificate = per_certificate

    def collect(self) -> Iterable[GaugeMetricFamily | GaugeHistogramMetricFamily]:
        held = sorted(self._held(), key=lambda h: h[3])
        now = self._clock()
        yield from self._series(held[:self._per_certificate], now)
        soonest: dict[tuple[str, str], float] = {}
        for _, source, role, not_after in held:
            soonest.setdefault((source, role), not_after)
        first = GaugeMetricFamily(
            "tlsedge_certificates_soonest_expiry_timestamp_seconds",
            "Unix time at which the first certificate held of each source and role "
            "expires (role standby included: a certificate kept behind the one served).",
            labels=["source", "role"])
        for (source, role), not_after in sorted(soonest.items()):
            first.add_metric([source, role], not_after)
        yield first
        yield from self._counts(now)

    def _series(self, held: list[Held], now: float) -> Iterable[GaugeMetricFamily]:
        labels = ["name", "source", "role"]
        at = GaugeMetricFamily(
            "tlsedge_certificate_expiry_timestamp_seconds",
            "Unix time at which each certificate held expires, by its primary name (a "
            "store certificate: the domain it serves), source (platform, static, custom, "
            "acme) and role (serving, standby); for the metrics.certificate_series "
            "certificates expiring first.", labels=labels)
        left = GaugeMetricFamily(
            "tlsedge_certificate_expiry_seconds",
            "Seconds until each certificate held expires (negative: expired); the same "
            "series as tlsedge_certificate_expiry_timestamp_seconds.", labels=labels)
        for name, source, role, not_after in held:
            at.add_metric([name, source, role], not_after)
            left.add_metric([name, source, role], not_after - now)
        yield from (at, left)

    def _counts(self, now: float) -> Iterable[GaugeMetricFamily | GaugeHistogramMetricFamily]:
        counts: dict[tuple[str, str, str], int] = {}
        days: dict[tuple[str, str], list[int]] = {}
        sums: dict[tuple[str, str], float] = {}
        for source, role, hour, n in self._hours():
            remaining = hour * 3600.0 - now  # to the hour: from the start of its hour
            bucket = next(b for b, below in EXPIRY_BUCKETS if remaining < below)
            counts[(source, role, bucket)] = counts.get((source, role, bucket), 0) + n
            per_day = days.setdefault((source, role), [0] * (len(EXPIRY_DAYS) + 1))
            per_day[bisect_left(EXPIRY_DAYS, remaining / 86400.0)] += n
            sums[(source, role)] = sums.get((source, role), 0.0) + n * remaining / 86400.0
        by_bucket = GaugeMetricFamily(
            "tlsedge_certificates",
            "Certificates held by source, role and time left (expires_in: expired, "
            "lt_3d, lt_14d, lt_30d, ge_30d; each certificate in one bucket, to the hour; "
            "a store certificate counts once per domain holding it).",
            labels=["source", "role", "expires_in"])
        for (source, role, bucket), n in sorted(counts.items()):
            by_bucket.add_metric([source, role, bucket], n)
        histogram = GaugeHistogramMetricFamily(
            "tlsedge_certificate_expiry_days",
            "Certificates held by days left until they expire (to the hour; negative: "
            "expired), by source and role.", labels=["source", "role"])
        for (source, role), per_day in sorted(days.items()):
            running, buckets = 0, []
            for bound, n in zip((*EXPIRY_DAYS, float("inf")), per_day, strict=True):
                running += n
                buckets.append(("+Inf" if bound == float("inf") else f"{bound:g}", running))
            histogram.add_metric([source, role], buckets, sums[(source, role)])
        yield from (by_bucket, histogram)


STORE_ERRORS = Counter(
    "tlsedge_store_errors_total",
    "Store operations that failed, by operation (watch, read, write).",
    ["operation"],
)
STORE_APPLIED_REVISION = Gauge(
    "tlsedge_store_applied_revision",
    "The store revision the slowest live process has applied.",
    multiprocess_mode="livemin",
)
ACME_ORDERS = Counter(
    "tlsedge_acme_orders_total",
    "ACME orders placed by this node's lifecycle, by issuer (acme.issuers name) and "
    "result (ok, failed).",
    ["issuer", "result"],
)
ACME_ORDER_SECONDS = Histogram(
    "tlsedge_acme_order_duration_seconds",
    "Time from placing an ACME order to holding the certificate.",
    buckets=(0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0),
)
ACME_QUEUE = Gauge(
    "tlsedge_acme_queue_length",
    "Orders this node's lifecycle holds back for the CA's rate limits (the order budget) "
    "or a pause the CA asked for; each domain's status says why and until when.",
    multiprocess_mode="livemax",
)
ACME_BUDGET = Gauge(
    "tlsedge_acme_budget_remaining",
    "Orders the CA's rate limits allow now, by issuer and limit kind: the account's new "
    "orders, and the lowest left of any registered domain, name set or hostname.",
    ["issuer", "kind"],
    multiprocess_mode="livemin",
)
RENEWALS_DUE = Gauge(
    "tlsedge_acme_work_due",
    "Domains the lifecycle found needing an order or a renewal on its last pass.",
    multiprocess_mode="livemax",
)
DNS_CHECKS = Counter(
    "tlsedge_dns_checks_total",
    "DNS checks of custom domains by result (ok = points at us, not_pointing).",
    ["result"],
)
LIFECYCLE_SKIPPED_RECORDS = Counter(
    "tlsedge_lifecycle_unreadable_records_total",
    "Store records the lifecycle could not decode and skipped (each time it skipped "
    "one), by prefix (domains, status, other); the domains they belong to are not "
    "ordered or renewed until the record is fixed.",
    ["prefix"],
)
LIFECYCLE_PASS_FAILURES = Counter(
    "tlsedge_lifecycle_pass_failures_total",
    "Lifecycle passes that failed with an unexpected error (logged with its traceback; "
    "the lifecycle backs off and goes on).",
)
WORKER_RESTARTS = Counter(
    "tlsedge_worker_restarts_total",
    "Data-plane worker processes that exited and were started again by the supervisor.",
)
NODE_TASK_RESTARTS = Counter(
    "tlsedge_node_task_restarts_total",
    "Supervisor tasks (lifecycle, store follower, node record, admin) that died and "
    "were started again, by task.",
    ["task"],
)


def zero_known_children() -> None:
    """Create the children of bounded label sets at 0, so the first failure is an
    increase a rule can see (a child that appears at 1 looks to increase() like no
    change)."""
    for result in ("ok", "failed"):
        RELOADS.labels(result)


class DomainCertificates(Collector):
    """Custom domains by the certificate serving them and their Let's Encrypt status,
    computed at scrape time from the supervisor's view of the store. `source` returns
    ((in_use, status) -> count)."""

    def __init__(self, source: Callable[[], dict[tuple[str, str], int]]) -> None:
        self._source = source

    def collect(self) -> Iterable[GaugeMetricFamily]:
        by_status = GaugeMetricFamily(
            "tlsedge_domains",
            "Custom domains by the certificate in use (custom, letsencrypt, platform) "
            "and Let's Encrypt status.",
            labels=["in_use", "status"],
        )
        for (in_use, status), n in sorted(self._source().items()):
            by_status.add_metric([in_use, status], n)
        yield by_status


# -- the store in a cluster (etcd) -------------------------------------------------------
STORE_OP_SECONDS = Histogram(
    "tlsedge_store_op_seconds",
    "Latency of store calls to etcd, by operation (get, scan, put, delete, lock, ...).",
    ["op"],
    buckets=_LATENCY_BUCKETS,
)
STORE_WATCH_LAG = Gauge(
    "tlsedge_store_watch_lag_revisions",
    "Store revision minus the revision this node has applied (0 when caught up; etcd "
    "writes outside our prefix also count).",
    multiprocess_mode="livemax",
)
STORE_RECONNECTS = Counter(
    "tlsedge_store_reconnects_total",
    "Store watches resumed after a failure (from the last applied revision).",
)
STORE_LOCK_WAIT_SECONDS = Histogram(
    "tlsedge_store_lock_wait_seconds",
    "Time spent taking a store lock that was then obtained.",
    buckets=_LATENCY_BUCKETS,
)
STORE_LOCK_TIMEOUTS = Counter(
    "tlsedge_store_lock_timeouts_total",
    "Store lock attempts that gave up because another holder had the lock.",
)


# -- batched writes from the data plane's hot path ---------------------------------------
# In multiprocess mode every inc() is a struct pack + mmap write behind a lock (measured
# ~0.7 us; a histogram observe ~1.5 us, a labels() lookup ~0.9 us). Per keep-alive
# request that was ~3 us, per connection ~6 us; the batched forms cost ~0.1 us and the
# flush is paid once a second.
FLUSH_INTERVAL = 1.0


class BatchedCounter:
    """Increments of one counter (or gauge) child kept in a Python number until flush.

    Loop-bound, not thread-safe: one worker's event loop owns it.
    """

    __slots__ = ("child", "pending")

    def __init__(self, child: Counter | Gauge) -> None:
        self.child = child
        self.pending = 0.0

    def inc(self, amount: float = 1.0) -> None:
        """As the child's inc(), batched (for code that takes either)."""
        self.pending += amount

    def flush(self) -> None:
        n, self.pending = self.pending, 0.0
        if n > 0:
            self.child.inc(n)
        elif n < 0 and isinstance(self.child, Gauge):
            self.child.dec(-n)


class BatchedHistogram:
    """Observations of one histogram child as local bucket counts and a sum until flush.

    Writes the child's bucket and sum values directly (the same values `observe`
    writes, one write per non-empty bucket instead of two per observation).
    """

    __slots__ = ("bounds", "child", "counts", "sum")

    def __init__(self, child: Histogram) -> None:
        self.child = child
        self.bounds: list[float] = list(child._upper_bounds)
        self.counts = [0] * len(self.bounds)
        self.sum = 0.0

    def observe(self, amount: float) -> None:
        self.counts[bisect_left(self.bounds, amount)] += 1
        self.sum += amount

    def flush(self) -> None:
        counts = self.counts
        if not any(counts):
            return
        self.counts = [0] * len(counts)
        total, self.sum = self.sum, 0.0
        child = self.child
        child._sum.inc(total)
        for i, n in enumerate(counts):
            if n:
                child._buckets[i].inc(n)


_batched_counters: dict[tuple[object, tuple[str, ...]], BatchedCounter] = {}
_batched_histograms: dict[tuple[object, tuple[str, ...]], BatchedHistogram] = {}
_flush_timer: asyncio.TimerHandle | None = None


def batched_counter(metric: Counter | Gauge, *labels: str) -> BatchedCounter:
    """The batched form of `metric.labels(*labels)`; cache the result on the hot path."""
    key = (metric, labels)
    batch = _batched_counters.get(key)
    if batch is None:
        child = metric.labels(*labels) if labels else metric
        batch = _batched_counters[key] = BatchedCounter(child)
    return batch


def batched_histogram(metric: Histogram, *labels: str) -> BatchedHistogram:
    """The batched form of `metric.labels(*labels)`; cache the result on the hot path."""
    key = (metric, labels)
    batch = _batched_histograms.get(key)
    if batch is None:
        child = metric.labels(*labels) if labels else metric
        batch = _batched_histograms[key] = BatchedHistogram(child)
    return batch


def flush() -> None:
    """Write every batched count into the prometheus objects (the scrape's view)."""
    for counter in _batched_counters.values():
        if counter.pending:
            counter.flush()
    for histogram in _batched_histograms.values():
        histogram.flush()


# -- the workers' event loops -------------------------------------------------------------
LOOP_STALLS = Histogram(
    "tlsedge_event_loop_stall_seconds",
    "How late a worker's event loop ran a timer due every 10 ms: the longest any "
    "handshake or request waited for the loop at that moment.",
    buckets=(0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)
LOOP_STALL_MAX = Gauge(
    "tlsedge_event_loop_stall_max_seconds",
    "The longest event-loop stall of a worker since it started serving (the worst "
    "live worker).",
    multiprocess_mode="livemax",
)
LOOP_TICK = 0.01


def watch_loop(loop: asyncio.AbstractEventLoop) -> None:
    """Time how late `loop` runs a timer every LOOP_TICK (a stall: something ran that
    long without letting the loop go) into LOOP_STALLS and LOOP_STALL_MAX. ~100
    callbacks a second of a few microseconds; the histogram is batched."""
    stalls = batched_histogram(LOOP_STALLS)
    longest = 0.0

    def tick(due: float) -> None:
        nonlocal longest
        now = loop.time()
        late = max(0.0, now - due)
        stalls.observe(late)
        if late > longest:
            longest = late
            LOOP_STALL_MAX.set(late)
        loop.call_at(now + LOOP_TICK, tick, now + LOOP_TICK)

    LOOP_STALL_MAX.set(0.0)
    first = loop.time() + LOOP_TICK
    loop.call_at(first, tick, first)


def start_flushing(loop: asyncio.AbstractEventLoop) -> None:
    """Flush every FLUSH_INTERVAL on `loop` until `stop_flushing` (idempotent)."""
    global _flush_timer

    def tick() -> None:
        global _flush_timer
        flush()
        _flush_timer = loop.call_later(FLUSH_INTERVAL, tick)

    if _flush_timer is None:
        _flush_timer = loop.call_later(FLUSH_INTERVAL, tick)


def stop_flushing() -> None:
    """Stop the timer and write what is pending (at shutdown)."""
    global _flush_timer
    if _flush_timer is not None:
        _flush_timer.cancel()
        _flush_timer = None
    flush()
