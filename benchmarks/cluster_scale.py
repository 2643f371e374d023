"""Cluster scale (issues #6, #17): seeding, start-up and propagation with N domains in etcd.

Starts a real etcd on loopback, seeds N domains (domain, key material and ACME certificate
records, as the registry writes them) in 128-operation transactions, then runs real
`tlsedge run` nodes against it, twice: at the default store.resident_certificates and at
a small one (--resident). Each time node B's start-up is timed to its first handshake for
a seeded name, with RSS per process (and bytes per domain, over a node on an empty
store) and its workers' longest event-loop stall, then A and C join and K certificate
uploads written on A's side are timed until B and C serve them. Then, on node B
(benchmarks/scale_probes.py; --no-extras skips them): a /metrics scrape, admin API pages
(first page, a rare status, a name-prefix search, a common status; 100 calls each),
`tlsedge domains list --json | wc -l` with the CLI's peak RSS, a bulk add of --bulk
domains (the workers' stalls meanwhile), and a worker SIGKILLed (until its socket is
served again). --files N runs one node on a file store of N domains instead (start-up).
Writes only under a temp work dir, benchmarks/.cache and benchmarks/results/.

    .venv/bin/python benchmarks/cluster_scale.py --quick              # harness check
    .venv/bin/python benchmarks/cluster_scale.py                      # 100,000 domains
    .venv/bin/python benchmarks/cluster_scale.py --domains 1000000 --configs default
    .venv/bin/python benchmarks/cluster_scale.py --files 100000       # the file store
    .venv/bin/python benchmarks/cluster_scale.py --files 100000 --no-checkpoints --cold
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shlex
import shutil
import signal
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(HERE), str(ROOT)]

import grpc  # noqa: E402
import grpc.aio  # noqa: E402
import scale_probes as probes  # noqa: E402
from aetcd import rpc  # noqa: E402
from table_scale import generate  # noqa: E402

from proxy import config as config_mod  # noqa: E402
from proxy.registry import Registry  # noqa: E402
from proxy.store import records as rec  # noqa: E402
from proxy.store.etcd import EtcdSettings, EtcdStore  # noqa: E402
from proxy.store.files import FileStore  # noqa: E402
from tests.certgen import CA  # noqa: E402
from tests.support import etcd as etcd_support  # noqa: E402
from tests.support.edge import Edge  # noqa: E402
from tests.support.ports import free_port  # noqa: E402

PLATFORM = "bench.test"
APP = "bench"
PREFIX = "/tlsedge/"
MAX_CERTS = 100_000      # distinct certificates from benchmarks/.cache; more names reuse them
TXN_OPS = 128            # etcd's default --max-txn-ops
# What the registry writes for a domain with an ACME certificate: the domain, the key
# material (pem/<name>/acme/<fingerprint>), then the metadata pointing at it (certs/).
RECORDS_PER_DOMAIN = 3
PER_TXN = TXN_OPS // RECORDS_PER_DOMAIN  # domains per transaction
TXNS_IN_FLIGHT = 8       # lets etcd batch several transactions into one fsync
QUOTA = 8 << 30          # etcd's suggested maximum; 1,000,000 domains take ~1.5 GB
POLL = 0.005             # seconds between two propagation handshakes
PROPAGATION_DEADLINE = 15.0


# -- seeding --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Seeded:
    names: list[str]
    # Of each domain's seeded certificate (shared past MAX_CERTS); "" once an upload
    # replaced it.
    fingerprints: list[str]
    distinct: int            # distinct certificates
    seconds: float
    txns: int


def domain_name(index: int) -> str:
    # The pattern of table_scale's certificates, continued for the names past them.
    return f"site{index}.customer{index % 997}.example"


def error_name(index: int) -> str:
    return f"failing{index}.customer{index % 997}.example"


async def seed_errors(endpoint: str, count: int) -> None:
    """`count` domains in Error (no certificate, a status record saying so): the rare
    status an admin filters by (pending_dns needs an acme: section, whose lifecycle is
    not measured here)."""
    now = time.time()
    records = []
    for i in range(count):
        name = error_name(i)
        records += [(rec.domain_key(name), rec.encode(rec.DomainRecord(
                        name=name, app=APP, letsencrypt=True, created_at=now))),
                    (rec.status_key(name), rec.encode(rec.StatusRecord(
                        domain=name, state="error", last_error="benchmark: refused",
                        updated_at=now)))]
    await put_records(endpoint, records)


async def put_records(endpoint: str, records: list[tuple[str, bytes]]) -> None:
    prefix = PREFIX.encode()
    async with grpc.aio.insecure_channel(endpoint) as channel:
        kv = rpc.KVStub(channel)
        for at in range(0, len(records), TXN_OPS):
            await kv.Txn(rpc.TxnRequest(success=[
                rpc.RequestOp(request_put=rpc.PutRequest(key=prefix + k.encode(), value=v))
                for k, v in records[at:at + TXN_OPS]]), timeout=120)


async def seed(endpoint: str, count: int, start: int = 0) -> Seeded:
    """Write `count` domains with a certificate record each, TXNS_IN_FLIGHT txns at once
    (domains `start` to `start + count`: a bulk add after the first seeding)."""
    records, key_pems, _, _ = generate(min(start + count, MAX_CERTS))
    distinct = len(records)
    keys = [k.decode() for k in key_pems]
    chains = [r["chain_pem"].decode() for r in records]
    names = [records[i]["names"][0] if i < distinct else domain_name(i)
             for i in range(start, start + count)]
    now = time.time()
    prefix = PREFIX.encode()

    def put(key: str, value: bytes) -> Any:
        return rpc.RequestOp(request_put=rpc.PutRequest(key=prefix + key.encode(), value=value))

    def ops(first: int) -> list[Any]:
        out = []
        for i in range(first, min(first + PER_TXN, count)):
            r, name = records[(start + i) % distinct], names[i]
            domain = rec.DomainRecord(name=name, app=APP, letsencrypt=True, created_at=now)
            material = rec.KeyMaterial(chain_pem=chains[(start + i) % distinct],
                                       key_pem=keys[r["key"]])
            # `names` are the certificate's own: past MAX_CERTS they do not name the domain.
            cert = rec.CertRecord(
                domain=name, source="acme", names=tuple(r["names"]),
                not_before=r["not_before"], not_after=r["not_after"],
                fingerprint=r["fingerprint"], issuer=r["issuer"], key_type="ecdsa-p256",
                stored_at=now)
            out += [put(rec.domain_key(name), rec.encode(domain)),
                    put(rec.pem_key(name, "acme", cert.fingerprint), rec.encode(material)),
                    put(rec.cert_key(name, "acme"), rec.encode(cert))]
        return out

    firsts = iter(range(0, count, PER_TXN))  # shared: each batch goes to one writer
    done = [0]
    started = time.monotonic()
    async with grpc.aio.insecure_channel(endpoint) as channel:
        kv = rpc.KVStub(channel)

        async def writer() -> None:
            for first in firsts:
                await kv.Txn(rpc.TxnRequest(success=ops(first)), timeout=120)
                done[0] += 1
                if done[0] % 2000 == 0:
                    print(f"  seeded {done[0] * PER_TXN:,} domains "
                          f"({time.monotonic() - started:.0f} s)", flush=True)
        await asyncio.gather(*(writer() for _ in range(TXNS_IN_FLIGHT)))
    return Seeded(names, [records[(start + i) % distinct]["fingerprint"]
                          for i in range(count)], distinct, time.monotonic() - started,
                  done[0])


def etcd_status(endpoint: str) -> tuple[str, int]:
    with grpc.insecure_channel(endpoint) as channel:
        status = rpc.MaintenanceStub(channel).Status(rpc.StatusRequest(), timeout=10)
    return str(status.version), int(status.dbSize)


def key_exists(endpoint: str, key: str) -> bool:
    """Whether `key` is in etcd; False also when etcd is too busy to say within 5 s."""
    try:
        with grpc.insecure_channel(endpoint) as channel:
            response = rpc.KVStub(channel).Range(
                rpc.RangeRequest(key=(PREFIX + key).encode(), count_only=True), timeout=5)
    except grpc.RpcError:
        return False
    return int(response.count) > 0


# -- nodes ----------------------------------------------------------------------------------

def node_config(name: str, workdir: Path, ca: CA, endpoint: str, resident: int | None
                ) -> dict[str, Any]:
    """A node on the shared etcd; `resident` None keeps the product's default."""
    cert, key = ca.issue([f"*.{PLATFORM}"]).write(workdir, "platform")
    store: dict[str, Any] = {"backend": "etcd", "endpoints": [endpoint], "prefix": PREFIX}
    if resident is not None:
        store["resident_certificates"] = resident
    return {
        "platform_domain": PLATFORM,
        "workers": 2,
        "tls": {"platform_certificate": {"cert": cert, "key": key}},
        "store": store,
        "node": {"name": name},
        # No request reaches the backend: handshakes only.
        "apps": {APP: {"backends": [f"127.0.0.1:{free_port()}"]}},
        "limits": {"drain_timeout": 2.0},
    }


def served(edge: Edge, name: str) -> str | None:
    try:
        return edge.fingerprint(name)
    except (OSError, ssl.SSLError):
        return None


def rss_mib(pid: int, field: str = "VmRSS") -> float | None:
    """A process's resident memory (VmHWM: its peak) from /proc."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return round(int(line.split()[1]) / 1024, 1)
    return None


def node_rss(edge: Edge) -> dict[str, float | None]:
    assert edge.proc is not None
    out = {"supervisor": rss_mib(edge.proc.pid)}
    for i, pid in enumerate(sorted(edge.worker_pids()), 1):
        out[f"worker {i}"] = rss_mib(pid)
    return out


class Starting:
    """`edge.start()` in a thread (it blocks until the log says it serves), so that the
    caller can poll handshakes meanwhile."""

    def __init__(self, edge: Edge, timeout: float) -> None:
        self._timeout = timeout
        self._result: list[float | BaseException] = []
        self._started = time.monotonic()
        self._thread = threading.Thread(target=self._run, args=(edge,), daemon=True,
                                        name=f"start-{edge.workdir.name}")
        self._thread.start()

    def _run(self, edge: Edge) -> None:
        try:
            edge.start(timeout=self._timeout)
            self._result.append(time.monotonic() - self._started)
        except BaseException as exc:  # handed to join()
            self._result.append(exc)

    def running(self) -> bool:
        return self._thread.is_alive()

    def join(self) -> float:
        """Seconds from the start to the 'serving https' line; raises what start raised."""
        self._thread.join()
        if isinstance(self._result[0], BaseException):
            raise self._result[0]
        return self._result[0]


def measure_startup(edge: Edge, seeded: Seeded, endpoint: str, probe: int,
                    sample: list[int], timeout: float) -> dict[str, Any]:
    """Process start -> first handshake serving `probe`'s certificate; RSS after start
    (once the supervisor has loaded the store) and after handshakes to `sample`."""
    name, expected = seeded.names[probe], seeded.fingerprints[probe]
    started = time.monotonic()
    starting = Starting(edge, timeout)
    # Polled concurrently with Edge.start: connections queue in the supervisor's backlog
    # until a worker serves them, so this is the real time to the first handshake.
    while served(edge, name) != expected:
        if not starting.running():
            starting.join()  # raises if tlsedge failed; else it is up: the next poll must succeed
        if time.monotonic() - started > timeout:
            raise RuntimeError(f"no handshake for {name} in {timeout:g} s")
        time.sleep(0.01)
    first = time.monotonic() - started
    ready = starting.join()
    node = edge.config["node"]["name"]
    loaded: float | None = None
    while time.monotonic() - started < timeout:
        if key_exists(endpoint, rec.NODES + node):  # written once its store is loaded
            loaded = round(time.monotonic() - started, 3)
            break
        time.sleep(0.05)
    time.sleep(5.0)  # the workers' certificates from the snapshot (within the limit)
    rss_start = node_rss(edge)
    stall = probes.startup_stall(edge)
    times, wrong = [], 0
    for i in sample:
        t = time.perf_counter()
        got = served(edge, seeded.names[i])
        times.append((time.perf_counter() - t) * 1000)
        wrong += seeded.fingerprints[i] not in ("", got)
    return {"first_handshake_s": round(first, 3), "serving_log_s": round(ready, 3),
            "supervisor_loaded_s": loaded, "rss_start_mib": rss_start,
            "startup_stall_max_s": stall,
            "rss_after_names_mib": node_rss(edge), "names": len(sample),
            "name_handshake_ms": summary(times), "wrong_certificates": wrong}


def summary(values: list[float]) -> dict[str, float | int | None]:
    if not values:
        return {"n": 0, "median": None, "max": None}
    return {"n": len(values), "median": round(statistics.median(values), 1),
            "max": round(max(values), 1)}


# -- propagation ----------------------------------------------------------------------------

def wait_for(edge: Edge, name: str, fingerprint: str, started: float) -> float | None:
    """Milliseconds from `started` until `edge` serves `fingerprint` for `name`."""
    while time.monotonic() - started < PROPAGATION_DEADLINE:
        if served(edge, name) == fingerprint:
            return (time.monotonic() - started) * 1000
        time.sleep(POLL)
    return None


class TimedStore(EtcdStore):
    """Node A's store, noting when each write returned (etcd had committed it): the
    product's watch path starts there."""

    def __init__(self, settings: EtcdSettings) -> None:
        super().__init__(settings)
        self.committed: dict[str, float] = {}
        self.watched: dict[str, Callable[[], None]] = {}  # key -> called once committed

    async def put(self, key: str, value: bytes, *, expect: int | None = None,
                  secret: bool = False) -> int:
        revision = await super().put(key, value, expect=expect, secret=secret)
        self.committed[key] = time.monotonic()
        if key in self.watched:
            self.watched.pop(key)()
        return revision


@dataclass
class Upload:
    call_ms: float
    commit_ms: float            # the certs/<name>/custom write returned, from the call start
    served_ms: dict[str, float | None]  # per node, from the call start; None: never


async def upload(registry: Registry, store: TimedStore, nodes: dict[str, Edge], ca: CA,
                 name: str, pool: ThreadPoolExecutor, *, poll_at_commit: bool = False
                 ) -> Upload:
    """One custom certificate through the Registry; B and C polled meanwhile (or, with
    `poll_at_commit`, from the moment its record is committed: the name never asked
    for before its certificate is in the store)."""
    issued = ca.issue([name])
    loop = asyncio.get_running_loop()
    started = time.monotonic()
    polls: dict[str, asyncio.Future[float | None]] = {}

    def poll() -> None:
        polls.update({node: loop.run_in_executor(pool, wait_for, nodes[node], name,
                                                 issued.fingerprint, started)
                      for node in ("b", "c")})

    if poll_at_commit:
        store.watched[rec.cert_key(name, "custom")] = poll
    else:
        poll()
    await registry.set_custom_certificate(name, issued.chain_pem, issued.key_pem)
    call = time.monotonic() - started
    commit = store.committed[rec.cert_key(name, "custom")] - started
    return Upload(call * 1000, commit * 1000,
                  {node: await poll for node, poll in polls.items()})


def store_reads(nodes: dict[str, Edge]) -> dict[str, float]:
    """Nodes b and c's etcd range reads and certificate reads so far."""
    return {"scans": sum(nodes[n].metric("tlsedge_store_op_seconds_count", op="scan")
                         for n in ("b", "c")),
            "certificate_reads": sum(nodes[n].metric("tlsedge_store_certificate_loads_total")
                                     for n in ("b", "c"))}


async def propagate(nodes: dict[str, Edge], ca: CA, seeded: Seeded, endpoint: str,
                    names: dict[str, list[int]]) -> dict[str, Any]:
    """Upload a custom certificate per name (`names`: kind -> domain indexes) on node A's
    side; time until B and C serve it, from the upload call and from the record's commit.
    Kinds: `resident` (served by both right before), `never_served` (polled from the
    call's start: the first polls read the name's records while it is written),
    `never_asked` (polled from the record's commit: no worker holds a thing of the name
    when its events come). Updates seeded.fingerprints."""
    store = TimedStore(EtcdSettings(endpoints=(endpoint,), prefix=PREFIX, node="a"))
    registry = Registry(store, platform_domain=PLATFORM, apps=[APP])
    loop = asyncio.get_running_loop()
    out: dict[str, Any] = {}
    try:
        with ThreadPoolExecutor(2, thread_name_prefix="poll") as pool:
            for kind, indexes in names.items():
                done = []
                reads = store_reads(nodes)
                for i in indexes:
                    if kind == "resident":  # served by both right before the upload
                        for node in ("b", "c"):
                            await loop.run_in_executor(pool, served, nodes[node],
                                                       seeded.names[i])
                    done.append(await upload(registry, store, nodes, ca, seeded.names[i],
                                             pool, poll_at_commit=kind == "never_asked"))
                    seeded.fingerprints[i] = ""  # replaced: no longer the seeded one
                seen = [(u, d) for u in done for d in u.served_ms.values() if d is not None]
                out[kind] = {
                    "from_call_ms": summary([d for _, d in seen]),
                    "from_commit_ms": summary([d - u.commit_ms for u, d in seen]),
                    "upload_call_ms": summary([u.call_ms for u in done]),
                    "missed": sum(d is None for u in done for d in u.served_ms.values()),
                    # Nodes b and c's range reads (etcd scans) and certificate reads
                    # per upload, the resident kind's pre-upload handshakes included.
                    "store_reads_per_upload": {
                        what: round((after - before) / max(1, len(done)), 2)
                        for (what, before), after in zip(
                            reads.items(), store_reads(nodes).values(), strict=True)},
                    "uploads": [vars(u) for u in done]}
    finally:
        await store.close()
    return out


# -- one configuration: three nodes at one resident_certificates value ----------------------

@dataclass
class Bench:
    workdir: Path
    ca: CA
    endpoint: str
    seeded: Seeded
    sample: list[int]            # names handshaken after start-up
    rng: random.Random
    used: set[int]
    uploads: int
    start_timeout: float
    edges: list[Edge]            # every node started, for the cleanup
    extras: bool = True          # node_b_checks after the uploads
    bulk: int = 10_000           # domains of the bulk add

    def fresh(self, k: int) -> list[int]:
        """k domain indexes no node has ever been asked for."""
        picked: list[int] = []
        while len(picked) < k:
            i = self.rng.randrange(len(self.seeded.names))
            if i not in self.used:
                self.used.add(i)
                picked.append(i)
        return picked


def run_config(bench: Bench, resident: int | None, label: str) -> dict[str, Any]:
    """Node B's start-up alone, then A and C, then the uploads. A node that fails to
    start ends this configuration: the result says where, with its log's last lines."""
    nodes = {}
    for node in ("a", "b", "c"):
        workdir = bench.workdir / label / node
        workdir.mkdir(parents=True)
        config = node_config(node, workdir, bench.ca, bench.endpoint, resident)
        nodes[node] = Edge(workdir, config, start=False, admin=node == "b")
        bench.edges.append(nodes[node])
    if resident is None:
        resident = config_mod.StoreSettings().resident_certificates
    out: dict[str, Any] = {
        "resident_certificates": resident, "label": label,
        "certificates": ("all read at start" if len(bench.seeded.names) <= resident
                         else "read on first handshake")}
    step = "start-up of node b"
    try:
        print(f"[{label}] starting node b alone", flush=True)
        probe = bench.sample[0]  # a name with a certificate of its own (index < MAX_CERTS)
        out["startup"] = measure_startup(nodes["b"], bench.seeded, bench.endpoint, probe,
                                         bench.sample[1:], bench.start_timeout)
        step = "start-up of nodes a and c"
        print(f"[{label}] starting nodes a and c", flush=True)
        starts = [Starting(nodes[n], bench.start_timeout) for n in ("a", "c")]
        out["a_and_c_serving_log_s"] = [round(s.join(), 2) for s in starts]
        step = "propagation"
        print(f"[{label}] {bench.uploads} uploads x 2 kinds", flush=True)
        resident_names = bench.rng.sample(bench.sample[1:], min(bench.uploads,
                                                                len(bench.sample) - 1))
        out["propagation"] = asyncio.run(propagate(
            nodes, bench.ca, bench.seeded, bench.endpoint,
            {"resident": resident_names, "never_served": bench.fresh(bench.uploads),
             "never_asked": bench.fresh(bench.uploads)}))
        if bench.extras and label == "default":
            step = "node b at scale"
            out["node_b"] = node_b_checks(bench, nodes["b"],
                                          {n: nodes[n] for n in ("a", "c")})
    except (RuntimeError, AssertionError, OSError) as exc:
        out["failed"] = {"step": step, "error": str(exc).splitlines()[0],
                         "log_tail": {n: e.log().splitlines()[-30:] for n, e in nodes.items()}}
        print(f"[{label}] FAILED in {step}: {str(exc).splitlines()[0]}", flush=True)
    out["rss_end_mib"] = {n: node_rss(e) for n, e in nodes.items() if e.proc is not None}
    for edge in nodes.values():
        edge.stop(timeout=20)
    out["log_problems"] = log_problems(nodes)
    return out


def node_b_checks(bench: Bench, edge: Edge, others: dict[str, Edge]) -> dict[str, Any]:
    """Issue #17's checks on node b: a /metrics scrape, admin API pages, `domains list`,
    a bulk add of --bulk domains, a worker SIGKILLed; RSS at the end.

    Nodes a and c read the whole store after they serve (their supervisors: ~15 s at a
    million domains, on the same cores and etcd): admin pages asked meanwhile are
    measured apart (`admin_while_others_load`), then the checks wait for those reads."""
    out: dict[str, Any] = {}
    loading = [n for n, e in others.items() if "store read:" not in e.log()]
    if loading:
        print(f"[b] admin first page while node(s) {'/'.join(loading)} read the store",
              flush=True)
        out["admin_while_others_load"] = {"nodes": loading, **probes.admin_pages(
            edge, {"first page": "limit=100"})}
    waited = time.monotonic()
    while any("store read:" not in e.log() for e in others.values()):
        if time.monotonic() - waited > bench.start_timeout:
            raise RuntimeError("nodes a and c did not finish reading the store")
        time.sleep(0.2)
    out["others_loaded_after_s"] = round(time.monotonic() - waited, 1)
    print("[b] /metrics", flush=True)
    out["scrape"] = probes.scrape(edge)
    print("[b] admin API pages", flush=True)
    seeded = bench.seeded.names
    prefix = seeded[len(seeded) // 2][:9]
    out["admin"] = probes.admin_pages(edge, {
        "first page": "limit=100", "status=error": "status=error&limit=100",
        "prefix search": f"prefix={prefix}&limit=100",
        "status=in_use": "status=in_use&limit=100"})
    print("[b] tlsedge domains list --json | wc -l", flush=True)
    out["cli_list"] = probes.cli_list(edge)
    print(f"[b] bulk add of {bench.bulk:,} domains", flush=True)
    added: list[Seeded] = []

    def write() -> list[str]:
        added.append(asyncio.run(seed(bench.endpoint, bench.bulk,
                                      start=len(bench.seeded.names))))
        return added[0].names

    out["bulk_add"] = probes.bulk_add(
        edge, write, lambda name: served(edge, name) == added[0].fingerprints[-1])
    print("[b] SIGKILL of a worker", flush=True)
    probe = bench.sample[-1]
    out["worker_kill"] = probes.kill_worker(edge, seeded[probe],
                                            bench.seeded.fingerprints[probe], served)
    out["rss_end_mib"] = node_rss(edge)
    return out


def log_problems(nodes: dict[str, Edge]) -> list[str]:
    lines = []
    for node, edge in nodes.items():
        lines += [f"{node}: {line}" for line in edge.log().splitlines()
                  if any(w in line for w in ("ERROR", "Traceback", "WARNING", "Error"))]
    return lines[:40]


# -- report ---------------------------------------------------------------------------------

def cell(value: Any) -> str:
    if value == {}:
        return "-"  # not measured (a failed step)
    if isinstance(value, dict) and "median" in value:
        return f"{value['median']}/{value['max']}"
    if isinstance(value, list):
        return "/".join(map(str, value))
    return str(value)


def print_table(result: dict[str, Any]) -> None:
    s = result["seeding"]
    print(f"\n{result['domains']:,} domains ({s['distinct_certificates']:,} distinct "
          f"certificates) in etcd {result['etcd_version']}, 2 workers per node")
    if not s["names_match_certificates"]:
        print("  domains past 100,000 reuse certificates round-robin: their certificate "
              "does not name them (the clients do not check names)")
    print(f"seeding: {s['records']:,} records in {s['txns']:,} txns of <= {TXN_OPS} ops in "
          f"{s['seconds']:.1f} s ({s['records'] / s['seconds']:,.0f} records/s), "
          f"etcd db {s['db_mib']:,.0f} MiB, etcd RSS {s['etcd_rss_mib']} MiB")
    print(f"etcd RSS at the end {result['etcd_rss_end_mib']} MiB, peak "
          f"{result['etcd_peak_rss_mib']} MiB")
    configs = result["configs"]
    heads = [f"resident={c['resident_certificates']:,} ({c['label']})" for c in configs]
    rows: list[tuple[str, list[str]]] = []

    def row(label: str, *path: str) -> None:
        values = []
        for c in configs:
            for key in path:
                c = c.get(key, {}) if isinstance(c, dict) else {}
            values.append(cell(c))
        rows.append((label, values))

    row("workers' certificates", "certificates")
    row("first handshake after start (s)", "startup", "first_handshake_s")
    row("'serving https' log line (s)", "startup", "serving_log_s")
    row("supervisor store loaded (s)", "startup", "supervisor_loaded_s")
    for proc in ("supervisor", "worker 1", "worker 2"):
        row(f"RSS {proc} after start (MiB)", "startup", "rss_start_mib", proc)
        row(f"RSS {proc} after names (MiB)", "startup", "rss_after_names_mib", proc)
    row("longest worker stall after start (s)", "startup", "startup_stall_max_s")
    per_domain(result, row_values=rows)
    row("handshakes to distinct names", "startup", "names")
    row("  per handshake median/max (ms)", "startup", "name_handshake_ms")
    row("  wrong certificate served", "startup", "wrong_certificates")
    row("nodes a/c 'serving' log line (s)", "a_and_c_serving_log_s")
    for kind in ("resident", "never_served", "never_asked"):
        row(f"{kind}: from record commit (ms)", "propagation", kind, "from_commit_ms")
        row("  from upload call start (ms)", "propagation", kind, "from_call_ms")
        row("  missed (not served in 15 s)", "propagation", kind, "missed")
        row("  b+c range reads per upload", "propagation", kind, "store_reads_per_upload",
            "scans")
        row("  b+c certificate reads per upload", "propagation", kind,
            "store_reads_per_upload", "certificate_reads")
        row("  upload call median/max (ms)", "propagation", kind, "upload_call_ms")
    node_b_rows(row)
    width = max(len(r[0]) for r in rows)
    print(f"{'':<{width}}  " + "  ".join(f"{h:>26}" for h in heads))
    for label, values in rows:
        print(f"{label:<{width}}  " + "  ".join(f"{v:>26}" for v in values))
    for c in configs:
        if "failed" in c:
            print(f"[{c['label']}] FAILED in {c['failed']['step']}: {c['failed']['error']}"
                  f"; RSS then (MiB): {c['rss_end_mib']}")
        for line in c["log_problems"]:
            print(f"[{c['label']}] log: {line}")
    print(f"load average (1/5/15 min) before: {result['load_before']}, after: "
          f"{result['load_after']} ({result['cpus']} cores, shared with other work)")


def per_domain(result: dict[str, Any], row_values: list[tuple[str, list[str]]]) -> None:
    """Bytes per domain in each process: RSS after start over a node's on an empty store."""
    base = result.get("baseline_rss_mib") or {}
    count = result["domains"] + result.get("errors", 0)
    for proc in ("supervisor", "worker 1"):
        values = []
        for c in result["configs"]:
            rss = c.get("startup", {}).get("rss_start_mib", {}).get(proc)
            values.append("-" if rss is None or base.get(proc) is None
                          else f"{(rss - base[proc]) * 2**20 / count:.0f}")
        row_values.append((f"  {proc}: bytes per domain", values))


def node_b_rows(row: Callable[..., None]) -> None:
    row("/metrics scrape (bytes)", "node_b", "scrape", "bytes")
    row("  scrape p50/p99/max (ms)", "node_b", "scrape", "ms")
    row("admin first page while a/c load (ms)", "node_b", "admin_while_others_load",
        "first page", "ms")
    row("  slowest calls (#call:ms)", "node_b", "admin_while_others_load", "first page",
        "slowest")
    row("a/c store reads done after (s)", "node_b", "others_loaded_after_s")
    for kind in ("first page", "status=error", "prefix search", "status=in_use"):
        row(f"admin {kind} p50/p99/max (ms)", "node_b", "admin", kind, "ms")
        row("  rows", "node_b", "admin", kind, "rows")
        row("  slowest calls (#call:ms)", "node_b", "admin", kind, "slowest")
        row("  client's longest GC pause (ms)", "node_b", "admin", kind, "client_gc_max_ms")
    row("domains list --json: lines", "node_b", "cli_list", "lines")
    row("  seconds", "node_b", "cli_list", "seconds")
    row("  peak RSS (MiB)", "node_b", "cli_list", "peak_rss_mib")
    row("bulk add: domains", "node_b", "bulk_add", "domains")
    row("  last one served after (s)", "node_b", "bulk_add", "last_served_s")
    row("  worker stalls over 50 ms", "node_b", "bulk_add", "stalls", "over_50ms")
    row("  longest stall at most (s)", "node_b", "bulk_add", "stalls", "longest_at_most_s")
    row("worker SIGKILL: serving again (s)", "node_b", "worker_kill", "serving_again_s")
    for proc in ("supervisor", "worker 1", "worker 2"):
        row(f"RSS {proc} at the end (MiB)", "node_b", "rss_end_mib", proc)


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def git_state() -> dict[str, Any]:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True,
                              check=False).stdout.strip()
    return {"commit": git("rev-parse", "HEAD"),
            "uncommitted_proxy_changes": git("status", "--porcelain", "proxy").splitlines()}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--domains", type=int, default=100_000)
    p.add_argument("--uploads", type=int, default=20, help="uploads per kind of name")
    p.add_argument("--resident", type=int, default=500,
                   help="the small store.resident_certificates run (default 500)")
    p.add_argument("--names", type=int, default=1000, help="handshakes after start-up")
    p.add_argument("--configs", default="default,small", choices=(
        "default,small", "default", "small"), help="which resident settings to run")
    p.add_argument("--start-timeout", type=float, default=1200.0,
                   help="seconds one node may take to serve (default 1200)")
    p.add_argument("--errors", type=int, default=1000,
                   help="domains in Error besides (the rare status filtered by)")
    p.add_argument("--bulk", type=int, default=10_000, help="domains of the bulk add")
    p.add_argument("--no-extras", action="store_true",
                   help="skip node b's checks (scrape, admin, CLI, bulk add, worker kill)")
    p.add_argument("--files", type=int, default=0, metavar="N",
                   help="instead: one node on a file store of N domains (start-up only)")
    p.add_argument("--no-checkpoints", action="store_true",
                   help="with --files: remove the store's checkpoints/ before each start "
                        "(a store restored from a backup of its data only)")
    p.add_argument("--cold", action="store_true",
                   help="with --files: drop the store's files from the page cache before "
                        "each start (posix_fadvise: file data, not inodes; no root needed)")
    p.add_argument("--keep", action="store_true", help="keep the work dir (etcd, logs)")
    p.add_argument("--quick", action="store_true", help="2,000 domains, 5 uploads, 200 names")
    opts = p.parse_args()
    if opts.quick:
        opts.domains, opts.uploads, opts.names, opts.errors, opts.bulk = 2000, 5, 200, 50, 500
    return opts


def stop_all(edges: list[Edge]) -> None:
    for edge in edges:
        with contextlib.suppress(Exception):
            edge.stop(timeout=10)
        edge.kill()


@contextlib.contextmanager
def workspace(keep: bool) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="tlsedge-cluster-"))
    try:
        yield path
    finally:
        if keep:
            print(f"kept {path}")
        else:
            shutil.rmtree(path, ignore_errors=True)


def baseline(bench: Bench) -> dict[str, float | None]:
    """RSS of a node on an empty store (another prefix): what a domain costs is the rest."""
    workdir = bench.workdir / "baseline"
    workdir.mkdir()
    config = node_config("empty", workdir, bench.ca, bench.endpoint, None)
    config["store"]["prefix"] = "/empty/"
    edge = Edge(workdir, config, start=False)
    bench.edges.append(edge)
    edge.start(timeout=60)
    time.sleep(3.0)
    rss = node_rss(edge)
    edge.stop(timeout=20)
    return rss


def evict(path: Path) -> int:
    """Drop the cached pages of every file under `path` (a store read from disk after a
    reboot or a restore, as far as file data goes: inodes stay cached); the files."""
    count = 0
    for directory, _, names in os.walk(path):
        for name in names:
            with contextlib.suppress(OSError):
                fd = os.open(os.path.join(directory, name), os.O_RDONLY | os.O_CLOEXEC)
                try:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                    count += 1
                finally:
                    os.close(fd)
    return count


def checkpoints_back(path: Path, started: float, timeout: float) -> float | None:
    """Seconds from `started` (the node's start) until it has written the store's
    checkpoints again (each file appears whole, renamed into place); None if they are
    not all back within `timeout`."""
    wanted = [path / "checkpoints" / f"{s}.ckpt" for s in ("domains", "certs", "pem")]
    while not all(p.exists() for p in wanted):
        if time.monotonic() - started > timeout:
            return None
        time.sleep(0.1)
    return round(time.monotonic() - started, 2)


def files_run(opts: argparse.Namespace) -> dict[str, Any]:
    """One node (2 workers) on a FileStore of --files domains (benchmarks/certs.py's
    seeded store, cached): start-up to the first handshake, twice (the first may write
    the store's checkpoints), RSS and the longest worker stall after start-up. With
    --no-checkpoints the store's checkpoints/ is removed before each start, and each
    run also times how long after its start the node has them written again; with
    --cold the store's files are dropped from the page cache before each start."""
    from certs import seeded_store

    store = seeded_store(opts.files)
    runs = []
    with workspace(opts.keep) as workdir:
        config = node_config("files", workdir, CA.new("tlsedge files benchmark CA"), "", None)
        config["store"] = {"path": str(store.path)}
        config.pop("node")
        edge = Edge(workdir, config, start=False)
        try:
            for _ in range(2):
                if opts.no_checkpoints:
                    shutil.rmtree(store.path / "checkpoints", ignore_errors=True)
                if opts.cold:
                    evict(store.path)
                probe = len(store.names) // 2
                started = time.monotonic()
                run = probes.files_startup(edge, store.names[probe], store.fingerprints[probe],
                                           served, opts.start_timeout)
                while "store read:" not in edge.log().rsplit("serving https", 1)[-1]:
                    time.sleep(0.1)
                time.sleep(5.0)
                run["rss_mib"] = node_rss(edge)
                run["startup_stall_max_s"] = probes.startup_stall(edge)
                if opts.no_checkpoints:
                    run["checkpoints_back_s"] = checkpoints_back(store.path, started,
                                                                opts.start_timeout)
                runs.append(run)
                edge.stop(timeout=20)
        finally:
            edge.kill()
        if opts.no_checkpoints and checkpoints_back(store.path, time.monotonic(), 0) is None:
            # Leave the cached store as other runs expect it.
            asyncio.run(FileStore(store.path).checkpoint())
    return {"files": opts.files, "no_checkpoints": opts.no_checkpoints, "cold": opts.cold,
            "runs": runs}


def main() -> None:
    opts = parse_args()
    if opts.files:
        result = {"command": shlex.join([sys.executable, *sys.argv]), "cpus": os.cpu_count(),
                  "load_before": load(), **files_run(opts), "load_after": load()}
        print(json.dumps(result, indent=2))
        out = HERE / "results" / time.strftime("files-%Y%m%d-%H%M%S.json")
        out.parent.mkdir(exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {out}")
        return
    # SIGTERM runs the finally blocks below, which stop every node and etcd.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    result: dict[str, Any] = {
        "command": shlex.join([sys.executable, *sys.argv]), "started_at": time.time(),
        "domains": opts.domains, "uploads": opts.uploads, "names": opts.names,
        "cpus": os.cpu_count(), "load_before": load(), **git_state()}
    with workspace(opts.keep) as workdir, contextlib.ExitStack() as stack:
        etcd = stack.enter_context(etcd_support.EtcdServer(
            workdir / "etcd", extra_args=("--quota-backend-bytes", str(QUOTA))))
        edges: list[Edge] = []
        stack.callback(stop_all, edges)  # before etcd stops: nodes drain quietly
        print(f"seeding {opts.domains:,} domains into etcd at {etcd.endpoint}", flush=True)
        seeded = asyncio.run(seed(etcd.endpoint, opts.domains))
        asyncio.run(seed_errors(etcd.endpoint, opts.errors))
        result["errors"] = opts.errors
        version, db_size = etcd_status(etcd.endpoint)
        assert etcd.proc is not None
        result["etcd_version"] = version
        result["seeding"] = {
            "records": RECORDS_PER_DOMAIN * opts.domains, "txns": seeded.txns,
            "seconds": round(seeded.seconds, 2),
            "distinct_certificates": seeded.distinct, "db_mib": round(db_size / 2**20, 1),
            "etcd_rss_mib": rss_mib(etcd.proc.pid),
            "names_match_certificates": seeded.distinct == opts.domains}
        step = max(1, seeded.distinct // (opts.names + 1))
        sample = list(range(0, seeded.distinct, step))[:opts.names + 1]
        bench = Bench(workdir, CA.new("tlsedge cluster benchmark CA"), etcd.endpoint, seeded,
                      sample, random.Random(6), set(sample), opts.uploads, opts.start_timeout,
                      edges, extras=not opts.no_extras, bulk=opts.bulk)
        result["baseline_rss_mib"] = baseline(bench)
        residents = {"default": None, "small": opts.resident}
        result["configs"] = [run_config(bench, residents[label], label)
                             for label in opts.configs.split(",")]
        result["etcd_rss_end_mib"] = rss_mib(etcd.proc.pid)
        result["etcd_peak_rss_mib"] = rss_mib(etcd.proc.pid, "VmHWM")
    result["load_after"] = load()
    print_table(result)
    out = HERE / "results" / time.strftime("cluster-%Y%m%d-%H%M%S.json")
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
