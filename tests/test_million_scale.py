"""A million domains on one node (issue #17), checked at tens of thousands: the
supervisor reads the store once and hands its workers a snapshot (a worker, restarted
too, starts from it without scanning the store, and replays only what changed since);
the snapshot is read again once it falls far behind; a worker over its resident limit
keeps slots for resident domains only; /metrics keeps a bounded label set while its
counts cover every domain; the admin API pages, filters and searches without reading
the whole store.

Real components: etcd and `tlsedge run` as subprocesses, TLS handshakes from Python's
ssl, the FileStore on disk. The domains are written straight into etcd (the records
the registry writes), 128 operations a transaction, in about a second for 20,000.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from aetcd import rpc

from proxy.certs.bundle import load_bundle
from proxy.store import records as rec
from proxy.store.files import FileStore
from proxy.sync import (
    BriefState,
    DomainSlot,
    Resident,
    SlotLoader,
    SnapshotKeeper,
    SnapshotReader,
    StoreState,
)
from tests.certgen import CA, Issued
from tests.conftest import PLATFORM
from tests.support.admin import AdminClient, admin_token
from tests.support.backend import Backend
from tests.support.edge import Edge
from tests.support.etcd import EtcdServer

pytestmark = pytest.mark.timeout(300)

COUNT = 20_000
PREFIX = "/tlsedge/"
APPS = ("shop", "blog", "api")


def name_of(i: int) -> str:
    return f"site{i}.customer{i % 97}.example"


def eventually(check: Callable[[], Any], timeout: float = 30.0, every: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = check()
        except (OSError, AssertionError):
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not true within {timeout} s: {check}")
        time.sleep(every)


def domain_records(name: str, app: str, cert: Issued, not_after: float | None = None
                   ) -> list[tuple[str, bytes]]:
    """What the registry writes for a domain with a Let's Encrypt certificate."""
    bundle = load_bundle(cert.chain_pem, cert.key_pem)
    record = rec.CertRecord.from_bundle(name, "acme", bundle, time.time())
    if not_after is not None:  # the supervisor reads validity from the record only
        record = rec.CertRecord(domain=name, source="acme", names=record.names,
                                not_before=record.not_before, not_after=not_after,
                                fingerprint=record.fingerprint, issuer=record.issuer,
                                key_type=record.key_type)
    return [(rec.domain_key(name), rec.encode(rec.DomainRecord(name=name, app=app))),
            (rec.pem_key(name, "acme", bundle.fingerprint),
             rec.encode(rec.KeyMaterial.from_bundle(bundle))),
            (rec.cert_key(name, "acme"), rec.encode(record))]


def seed(endpoint: str, records: list[tuple[str, bytes]]) -> None:
    """Write records into etcd, 128 puts a transaction (etcd's default limit)."""
    with grpc.insecure_channel(endpoint) as channel:
        kv = rpc.KVStub(channel)
        for at in range(0, len(records), 128):
            kv.Txn(rpc.TxnRequest(success=[
                rpc.RequestOp(request_put=rpc.PutRequest(key=(PREFIX + k).encode(), value=v))
                for k, v in records[at:at + 128]]), timeout=60)


def delete(endpoint: str, keys: list[str]) -> None:
    with grpc.insecure_channel(endpoint) as channel:
        kv = rpc.KVStub(channel)
        for key in keys:
            kv.DeleteRange(rpc.DeleteRangeRequest(key=(PREFIX + key).encode()), timeout=10)


def etcd_sent_bytes(etcd: EtcdServer) -> float:
    """Bytes etcd has sent to its gRPC clients (its own /metrics)."""
    with urllib.request.urlopen(f"http://{etcd.endpoint}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    return sum(float(v) for v in re.findall(
        r"^etcd_network_client_grpc_sent_bytes_total (\S+)$", text, re.M))


def node_config(workdir: Path, ca: CA, backend: Backend, etcd: EtcdServer, *,
                resident: int, workers: int = 1) -> dict[str, Any]:
    cert, key = ca.issue([f"*.{PLATFORM}"]).write(workdir, "platform")
    return {
        "platform_domain": PLATFORM, "workers": workers,
        # The seeded certificates do not name the domains they serve here.
        "tls": {"platform_certificate": {"cert": cert, "key": key},
                "reject_misdirected": False},
        "store": {"backend": "etcd", "endpoints": [etcd.endpoint], "prefix": PREFIX,
                  "resident_certificates": resident},
        "apps": {app: {"backends": [backend.address]} for app in APPS},
        "limits": {"drain_timeout": 2.0},
    }


@pytest.fixture(scope="module")
def certs(ca: CA) -> list[Issued]:
    """Four certificates the seeded domains take in turn (clients here check the served
    fingerprint, not the name)."""
    return [ca.issue([f"seed{i}.example"]) for i in range(4)]


@pytest.fixture
def etcd(tmp_path: Path) -> Iterator[EtcdServer]:
    with EtcdServer(tmp_path / "etcd") as server:
        yield server


def worker_pid(edge: Edge) -> int:
    [pid] = edge.worker_pids()
    return pid


# --------------------------------------------------------------------------- the snapshot

def test_a_killed_worker_serves_again_from_the_snapshot_without_reading_the_store(
        tmp_path: Path, ca: CA, backend: Backend, etcd: EtcdServer,
        certs: list[Issued]) -> None:
    """Over its resident limit a worker needs the names only: it gets them from the
    supervisor's snapshot, at start and when restarted, and reads from etcd only the
    changes since the snapshot and the certificates its handshakes ask for (20,000
    domains are ~3 MB from etcd; the restart reads less than a tenth of that)."""
    records = [r for i in range(COUNT)
               for r in domain_records(name_of(i), APPS[i % 3], certs[i % 4])]
    seed(etcd.endpoint, records)
    with Edge(tmp_path, node_config(tmp_path, ca, backend, etcd, resident=1000)) as edge:
        assert edge.fingerprint(name_of(7)) == certs[3].fingerprint
        # Changes after the snapshot: a new certificate, a domain removed, one added.
        fresh = ca.issue([name_of(11)])
        seed(etcd.endpoint, domain_records(name_of(11), "shop", fresh)[1:]
             + domain_records("added.example", "blog", certs[0]))
        delete(etcd.endpoint, [rec.domain_key(name_of(12))])
        eventually(lambda: edge.fingerprint(name_of(11)) == fresh.fingerprint)
        eventually(lambda: "store read:" in edge.log())  # the supervisor's read is done
        before = etcd_sent_bytes(etcd)
        killed = time.monotonic()
        os.kill(worker_pid(edge), signal.SIGKILL)
        eventually(lambda: "restarting" in edge.log())
        eventually(lambda: edge.fingerprint(name_of(11)) == fresh.fingerprint, every=0.02)
        serving_again = time.monotonic() - killed
        read = etcd_sent_bytes(etcd) - before
        assert edge.fingerprint("added.example") == certs[0].fingerprint
        assert edge.fingerprint(name_of(12)) != certs[0].fingerprint  # the platform's
        assert edge.fingerprint(name_of(COUNT - 1)) == certs[(COUNT - 1) % 4].fingerprint
        assert edge.request(name_of(COUNT - 2))[0] == 200  # routed to its app
    print(f"\nworker serving again {serving_again:.2f} s after SIGKILL, {read / 1e3:.0f} kB "
          f"read from etcd")
    assert serving_again < 10.0
    assert read < 300_000


def test_the_snapshot_is_read_again_once_workers_would_replay_many_changes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker restarted long after the start replays the changes since the snapshot;
    past REBASE_CHANGES of them the supervisor reads the store again into a new
    snapshot, which a worker started then builds the current domains from."""
    monkeypatch.setattr(SnapshotKeeper, "REBASE_CHANGES", 50)
    monkeypatch.setattr(SnapshotKeeper, "CHECK", 0.01)

    async def body() -> None:
        store = await FileStore.open(tmp_path / "store")
        for i in range(20):
            await store.put(rec.domain_key(name_of(i)),
                            rec.encode(rec.DomainRecord(name=name_of(i), app="shop")))
        briefs = BriefState(lambda brief, now: ("platform", "pending_dns"))
        keeper = SnapshotKeeper(store, resident=10, changes=lambda: briefs.worker_changes)
        await keeper.first_read(briefs, lambda: asyncio.sleep(0))
        first = keeper.current
        running = asyncio.create_task(keeper.run())
        for i in range(20, 60):  # fewer than REBASE_CHANGES: the snapshot stays
            key = rec.domain_key(name_of(i))
            value = rec.encode(rec.DomainRecord(name=name_of(i), app="blog"))
            await store.put(key, value)
            briefs.apply(key, value)
        await asyncio.sleep(0.1)
        assert keeper.current is first
        running.cancel()
        for i in range(60, 75):
            key = rec.domain_key(name_of(i))
            value = rec.encode(rec.DomainRecord(name=name_of(i), app="blog"))
            await store.put(key, value)
            briefs.apply(key, value)
        running = asyncio.create_task(keeper.run())
        deadline = time.monotonic() + 10
        while keeper.current is first and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        running.cancel()
        assert keeper.current is not first
        with pytest.raises(OSError):
            os.fstat(first.fd)  # the old one is let go
        fd, pipe = keeper.hand_over(0)
        reader = SnapshotReader(os.dup(fd), pipe)
        state = StoreState(resident=Resident(10))
        section = reader.next_section()
        assert section is not None
        reader.names(section, state)
        reader.close()
        assert state.revision == await store.revision()
        assert len(state.domains) == 75 and state.domains[name_of(70)] == "blog"
        await store.close()

    asyncio.run(body())


def test_a_worker_over_its_limit_keeps_slots_for_resident_domains_only(
        tmp_path: Path, ca: CA) -> None:
    """Names are all a worker holds per domain; a slot exists while its certificate is
    resident (or being read), and goes with it: 5,000 names read through a limit of 50
    leave 50 slots."""
    cert = ca.issue(["any.example"])

    async def body() -> None:
        store = await FileStore.open(tmp_path / "store")
        names = [name_of(i) for i in range(200)]
        for name in names:
            for key, value in domain_records(name, "shop", cert):
                await store.put(key, value)
        state = StoreState(resident=Resident(50, hold=0.0))
        state.load_domains((name_of(i), "shop") for i in range(5000))
        loader = SlotLoader(store, state)
        for name in names:
            slot = DomainSlot(name)
            waiting = loader.prepare(slot)
            assert waiting is not None
            await waiting
            assert state.slots[name].fingerprint == cert.fingerprint
        assert len(state.slots) == len(state.resident.slots) == 50
        assert set(state.slots) == set(names[-50:])
        await store.close()

    asyncio.run(body())


# --------------------------------------------------------------------------- metrics

def scrape(edge: Edge) -> tuple[str, float]:
    started = time.monotonic()
    text = edge.metrics()
    return text, time.monotonic() - started


def samples(text: str, metric: str) -> list[tuple[dict[str, str], float]]:
    found = []
    for labels, value in re.findall(rf"^{metric}(?:{{(.*)}})? (\S+)$", text, re.M):
        found.append((dict(re.findall(r'(\w+)="([^"]*)"', labels)), float(value)))
    return found


def test_metrics_keep_a_bounded_label_set_and_count_every_domain(
        tmp_path: Path, ca: CA, backend: Backend, etcd: EtcdServer,
        certs: list[Issued]) -> None:
    """20,000 domains make 100 per-certificate series (the soonest to expire), counts
    that cover all of them, kept as domains come and go (no walk per scrape)."""
    now = time.time()
    expiry = {i: now + 86400 * (5 + (i * 7919) % 80) + i for i in range(COUNT)}
    records = [r for i in range(COUNT)
               for r in domain_records(name_of(i), APPS[i % 3], certs[i % 4], expiry[i])]
    seed(etcd.endpoint, records)
    config = node_config(tmp_path, ca, backend, etcd, resident=1000)
    with Edge(tmp_path, config) as edge:
        def counted(text: str) -> float:
            return sum(v for labels, v in samples(text, "tlsedge_domains")
                       if labels.get("status") == "in_use")

        soonest = sorted(expiry.values())

        def acme_series(text: str) -> list[float]:
            return sorted(v for labels, v in samples(
                text, "tlsedge_certificate_expiry_timestamp_seconds")
                if labels["source"] == "acme")

        def all_counted() -> str | None:
            # The counts and the soonest-expiring list fill in as the supervisor reads
            # the store's pages: scrape until both have every domain.
            text = scrape(edge)[0]
            done = (counted(text) == COUNT
                    and (got := acme_series(text)) == soonest[:len(got)] and got)
            return text if done else None

        text = eventually(all_counted)
        series = samples(text, "tlsedge_certificate_expiry_timestamp_seconds")
        store_series = acme_series(text)
        assert len(series) == 100
        assert store_series == soonest[:len(store_series)]
        assert sum(v for labels, v in samples(text, "tlsedge_certificates")
                   if labels["source"] == "acme") == COUNT
        [(_, in_histogram)] = [(labels, v) for labels, v in samples(
            text, "tlsedge_certificate_expiry_days_bucket")
            if labels["source"] == "acme" and labels["le"] == "+Inf"]
        assert in_histogram == COUNT
        delete(etcd.endpoint, [rec.domain_key(name_of(i)) for i in range(100)])
        eventually(lambda: counted(scrape(edge)[0]) == COUNT - 100)
        times = [scrape(edge)[1] for _ in range(5)]
        text = scrape(edge)[0]
    print(f"\nscrape at {COUNT} domains: {len(text) / 1e3:.0f} kB, "
          f"{min(times) * 1000:.0f}-{max(times) * 1000:.0f} ms")
    assert len(text) < 200_000


def test_the_workers_event_loop_stalls_are_measured(
        tmp_path: Path, ca: CA, backend: Backend, etcd: EtcdServer) -> None:
    with Edge(tmp_path, node_config(tmp_path, ca, backend, etcd, resident=10)) as edge:
        first = eventually(lambda: edge.metric("tlsedge_event_loop_stall_seconds_count"))
        assert eventually(lambda: edge.metric("tlsedge_event_loop_stall_seconds_count")
                          > first + 50)
        assert 0 <= edge.metric("tlsedge_event_loop_stall_max_seconds") < 5



# --------------------------------------------------------------------------- listings

def status_records(name: str, state: str) -> list[tuple[str, bytes]]:
    return [(rec.domain_key(name), rec.encode(rec.DomainRecord(name=name, app="blog"))),
            (rec.status_key(name), rec.encode(rec.StatusRecord(domain=name, state=state,
                                                               last_error="refused")))]


def test_the_admin_api_pages_filters_and_searches_without_reading_every_domain(
        tmp_path: Path, ca: CA, backend: Backend, etcd: EtcdServer,
        certs: list[Issued]) -> None:
    """GET /api/v1/domains answers a page in name order with a cursor, a status filter
    (a rare status from the node's index, a common one by walking), a name-prefix search
    and counts by status; a page reads a small part of what 20,000 domains are."""
    records = [r for i in range(COUNT)
               for r in domain_records(name_of(i), APPS[i % 3], certs[i % 4])]
    failing = sorted(f"broken{i}.customer{i}.example" for i in range(30))
    records += [r for name in failing for r in status_records(name, "error")]
    seed(etcd.endpoint, records)
    config = node_config(tmp_path, ca, backend, etcd, resident=10)
    with Edge(tmp_path, config, admin=True) as edge:
        api = AdminClient(edge, token=admin_token(edge))
        eventually(lambda: "store read:" in edge.log())
        everything = sorted([name_of(i) for i in range(COUNT)] + failing)

        first = api.request("GET", "/api/v1/domains?limit=50").json()
        assert [d["name"] for d in first["domains"]] == everything[:50]
        assert first["next"] == everything[49]
        assert first["counts"] == {"in_use": COUNT, "error": 30}
        second = api.request("GET", f"/api/v1/domains?limit=50&after={first['next']}").json()
        assert [d["name"] for d in second["domains"]] == everything[50:100]
        row = second["domains"][0]
        assert row["status"] == "in_use" and row["acme"]["fingerprint"]

        errors = api.request("GET", "/api/v1/domains?status=error&limit=20").json()
        assert [d["name"] for d in errors["domains"]] == failing[:20]
        assert errors["domains"][0]["last_error"] == "refused"
        rest = api.request(
            "GET", f"/api/v1/domains?status=error&limit=20&after={errors['next']}").json()
        assert [d["name"] for d in rest["domains"]] == failing[20:] and rest["next"] is None

        blog = api.request("GET", "/api/v1/domains?status=in_use&app=blog&limit=10").json()
        assert [d["name"] for d in blog["domains"]] == [
            n for n in everything if n.startswith("site") and
            int(n[4:n.index(".")]) % 3 == 1][:10]
        found = api.request("GET", "/api/v1/domains?prefix=site1234").json()
        assert {d["name"] for d in found["domains"]} == {
            n for n in everything if n.startswith("site1234")}

        bad = api.request("GET", "/api/v1/domains?status=nope")
        assert bad.status == 400 and "unknown status 'nope'" in bad.json()["error"]
        assert api.request("GET", "/api/v1/domains?limit=0").status == 400

        before = etcd_sent_bytes(etcd)
        times = []
        for query in ("limit=100", "status=error", "prefix=site77", "status=in_use"):
            started = time.monotonic()
            assert api.request("GET", f"/api/v1/domains?{query}").status == 200
            times.append(time.monotonic() - started)
        read = etcd_sent_bytes(etcd) - before
    print(f"\nadmin pages at {COUNT} domains: {[round(t * 1000) for t in times]} ms, "
          f"{read / 1e3:.0f} kB read from etcd")
    assert read < 1_000_000  # 20,000 domains' records are ~12 MB


def test_domains_list_streams_every_domain_as_one_json_array(
        tmp_path: Path, ca: CA, backend: Backend, etcd: EtcdServer,
        certs: list[Issued]) -> None:
    """`tlsedge domains list --json` reads and prints a page at a time: the whole array,
    in name order, with a peak memory far below what holding every domain took (60,000
    domains: ~180 MiB that way, ~90 MiB a page at a time)."""
    import subprocess
    import sys

    count = 3 * COUNT
    records = [r for i in range(count)
               for r in domain_records(name_of(i), APPS[i % 3], certs[i % 4])]
    seed(etcd.endpoint, records)
    edge = Edge(tmp_path, node_config(tmp_path, ca, backend, etcd, resident=10),
                start=False)
    # The peak from /proc (VmHWM): ru_maxrss would count the parent's memory at the fork.
    listed = subprocess.run(
        [sys.executable, "-c", "import sys\nfrom proxy.cli import main\ntry:\n    main()\n"
         "finally:\n    print(open('/proc/self/status').read(), file=sys.stderr)",
         "domains", "list", "--json", "-c", str(edge.config_path)],
        capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0, listed.stderr
    views = json.loads(listed.stdout)
    assert [v["name"] for v in views] == sorted(name_of(i) for i in range(count))
    assert views[0]["in_use"] == "letsencrypt"
    peak_mib = int(re.search(r"VmHWM:\s+(\d+)", listed.stderr).group(1)) / 1024  # type: ignore[union-attr]
    print(f"\n`domains list --json` of {count} domains: peak RSS {peak_mib:.0f} MiB")
    assert peak_mib < 120


def test_the_supervisors_sorted_names_follow_adds_and_removals() -> None:
    """The index listings page from: in order after any name, as names come and go
    (blocks split and empty), like sorting the set again."""
    import random

    from proxy.sync.briefs import SortedNames

    rng = random.Random(17)
    names = {name_of(i) for i in range(5000)}
    ordered = SortedNames(names)
    for _ in range(20_000):
        name = name_of(rng.randrange(8000))
        if rng.random() < 0.5:
            names.add(name)
            ordered.add(name)
        else:
            names.discard(name)
            ordered.discard(name)
    everything = sorted(names)
    assert list(ordered.after("")) == everything and len(ordered) == len(names)
    for start in ("", "site4", name_of(4321), "site9", "zzz"):
        assert list(ordered.after(start))[:50] == [n for n in everything if n > start][:50]


def test_a_listing_pages_records_are_read_in_transactions_in_flight_together(
        etcd: EtcdServer) -> None:
    """A page of 100 domains needs 400 keys, a transaction per 128 of them: they go to
    etcd together (at most four at once), not one after the other, so a page waits for
    one round trip (and one slow answer of a busy etcd) instead of four; what comes back
    is still each key's item in the asked order."""
    from proxy.store.base import MAX_WRITES
    from proxy.store.etcd import EtcdSettings, EtcdStore

    keys = [rec.domain_key(name_of(i)) for i in range(5 * MAX_WRITES)]  # 5 transactions
    seed(etcd.endpoint, [(key, key.encode()) for key in keys[::3]])
    wanted = [*reversed(keys), "domains/none.example"]

    async def body() -> None:
        store = EtcdStore(EtcdSettings(endpoints=(etcd.endpoint,), prefix=PREFIX))
        unary, now, most = store._unary, [0], [0]

        async def counted(op: str, *args: Any) -> Any:
            now[0] += op == "get"
            most[0] = max(most[0], now[0])
            try:
                return await unary(op, *args)
            finally:
                now[0] -= op == "get"

        try:
            store._unary = counted  # type: ignore[method-assign]
            found = await store.get_many(wanted)
            assert most[0] == 4  # 4 transactions together, then the fifth
            store._unary = unary  # type: ignore[method-assign]
            assert found == [await store.get(key) for key in wanted]
            assert sum(item is not None for item in found) == len(keys[::3])
        finally:
            await store.close()

    asyncio.run(body())
