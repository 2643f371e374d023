"""What start-up at 100,000 certificates relies on (issue 5, issue 6 point 4): a FileStore
scan through a checkpoint returns exactly what walking the record files returns; a
worker serves a store certificate from memory alone (no file, no store, in the SNI
callback); and the memory kept per certificate stays under a measured bound.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import os
import secrets
import sys
import time
import tracemalloc
import types
from pathlib import Path
from typing import Any

import pytest

from proxy.certs.bundle import load_bundle
from proxy.certs.table import CertSelector, CertTable, ContextCache
from proxy.store import files
from proxy.store import records as rec
from proxy.store.base import Item
from proxy.store.files import FileStore
from proxy.sync import BriefState, Resident, StoreState, load_state
from tests.certgen import CA
from tests.test_table import SETTINGS, served_fingerprint, tls_server


def _scan_both(path: Path, prefix: str) -> tuple[list[Item], list[Item]]:
    """(scan as the store answers it, scan by walking every record file)."""
    store = FileStore(path)
    return store._scan_sync(prefix), store._read_walk(prefix)


def _pairs(items: list[Item]) -> list[tuple[str, bytes, int]]:
    return [(i.key, i.value, i.revision) for i in items]


def test_scan_through_a_checkpoint_equals_walking_the_record_files(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(files, "_CHECKPOINT_AFTER", 5)
    path = tmp_path / "store"

    async def body() -> None:
        store = await FileStore.open(path, keep_changes=40)
        for i in range(30):  # compactions write checkpoints on the way
            await store.put(f"certs/d{i}.example/acme", b"v1-%d" % i)
            await store.put(f"domains/d{i}.example", b"{}")
        checkpointed = sorted(os.listdir(path / "checkpoints"))
        assert checkpointed == ["certs.ckpt", "domains.ckpt"]
        # Changes after the checkpoint: updates, deletes, new keys, a top-level key.
        for i in range(0, 30, 3):
            await store.put(f"certs/d{i}.example/acme", b"v2-%d" % i)
        for i in range(1, 30, 7):
            await store.delete(f"certs/d{i}.example/acme")
        await store.put("certs/new.example/custom", b"new")
        await store.put("certsx", b"top")
        await store.close()

    asyncio.run(body())
    for prefix in ("certs/", "domains/", "", "cert"):
        scanned, walked = _scan_both(path, prefix)
        assert _pairs(scanned) == _pairs(walked), prefix
    assert [i.key for i in FileStore(path)._scan_sync("cert")][-1] == "certsx"


def test_a_damaged_or_outdated_checkpoint_is_ignored(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(files, "_CHECKPOINT_AFTER", 5)
    path = tmp_path / "store"

    async def fill(start: int, count: int) -> None:
        store = await FileStore.open(path, keep_changes=20)
        for i in range(start, start + count):
            await store.put(f"certs/d{i % 12}.example/acme", b"x%d" % i)
        await store.close()

    asyncio.run(fill(0, 12))
    store = FileStore(path, keep_changes=20)
    asyncio.run(store.checkpoint())
    ckpt = path / "checkpoints" / "certs.ckpt"
    good = ckpt.read_bytes()
    ckpt.write_bytes(good[:-3])  # truncated
    assert _pairs(store._scan_sync("certs/")) == _pairs(store._read_walk("certs/"))
    # Left behind by 40 writes (two compactions) it would name revisions the log lost.
    ckpt.write_bytes(good)
    monkeypatch.setattr(files.FileStore, "_checkpoint_locked", lambda *a, **k: None)
    asyncio.run(fill(100, 40))
    assert files.checkpoint.read(str(ckpt)) is not None
    assert _pairs(store._scan_sync("certs/")) == _pairs(store._read_walk("certs/"))
    assert {i.value for i in store._scan_sync("certs/")} == {b"x%d" % i
                                                            for i in range(128, 140)}


def test_a_worker_serves_store_certificates_without_touching_a_file_or_the_store(
        tmp_path: Path) -> None:
    ca = CA.new("scale test CA")
    issued = {name: ca.issue([name]) for name in ("a.example", "b.example")}

    async def load() -> StoreState:
        store = await FileStore.open(tmp_path / "store")
        for name, cert in issued.items():
            bundle = load_bundle(cert.chain_pem, cert.key_pem)
            await store.put(rec.domain_key(name), rec.encode(rec.DomainRecord(
                name=name, app="app")))
            await store.put(rec.pem_key(name, "acme", bundle.fingerprint),
                            rec.encode(rec.KeyMaterial.from_bundle(bundle)))
            await store.put(rec.cert_key(name, "acme"), rec.encode(
                rec.CertRecord.from_bundle(name, "acme", bundle, time.time())))
        state = await load_state(store)
        await store.close()
        return state

    state = asyncio.run(load())
    for path in sorted((tmp_path / "store").rglob("*"), reverse=True):  # store gone
        path.unlink() if path.is_file() else path.rmdir()
    assert all(state.slots[name].loaded for name in issued)  # a small store: read whole
    table = CertTable.build({name: state.slots[name] for name in issued}, None)
    opened: list[tuple[str, Any]] = []
    inside = False

    def audit(event: str, args: Any) -> None:
        if inside and event in ("open", "os.listdir", "os.scandir", "socket.connect"):
            opened.append((event, args))

    class Watched(CertSelector):
        __slots__ = ()

        def sni_callback(self, *args: Any) -> int | None:
            nonlocal inside
            inside = True
            try:
                return super().sni_callback(*args)
            finally:
                inside = False

    sys.addaudithook(audit)  # stays for the process; records only inside the callback
    selector = Watched(table, ContextCache(SETTINGS))
    with tls_server(selector) as port:
        for name, cert in issued.items():
            assert served_fingerprint(port, name) == cert.fingerprint
    assert opened == []
    assert len(selector.cache) == 2  # both built inside the callback, from memory


def _fake_records(count: int) -> list[tuple[str, bytes]]:
    """Domain + certificate records of real sizes (an ECDSA leaf, a PKCS8 key); the PEM is
    random base64, which no code under test parses."""
    def pem(label: str, size: int) -> str:
        body = secrets.token_urlsafe(size)[:size]
        lines = [body[i:i + 64] for i in range(0, size, 64)]
        return f"-----BEGIN {label}-----\n" + "\n".join(lines) + f"\n-----END {label}-----\n"

    out = []
    now = time.time()
    for i in range(count):
        name = f"site{i}.customer{i % 500}.example"
        out.append((rec.domain_key(name), rec.encode(rec.DomainRecord(
            name=name, app="app", created_at=now))))
        fingerprint = secrets.token_hex(32)
        out.append((rec.pem_key(name, "acme", fingerprint), rec.encode(rec.KeyMaterial(
            chain_pem=pem("CERTIFICATE", 548), key_pem=pem("PRIVATE KEY", 184)))))
        out.append((rec.cert_key(name, "acme"), rec.encode(rec.CertRecord(
            domain=name, source="acme", names=(name,), not_before=now - 60,
            not_after=now + 86400 * 90, fingerprint=fingerprint,
            issuer="CN=tlsedge benchmark CA", key_type="ecdsa-p256", stored_at=now))))
    return out


@pytest.mark.parametrize(("process", "resident", "bound"),
                         [("worker", 10_000, 2300), ("worker", 100, 160),
                          ("supervisor", 0, 450)])
def test_memory_kept_per_certificate_stays_bounded(process: str, resident: int,
                                                   bound: int) -> None:
    """Measured on 10,000 domains, each with its certificate (record JSON ~1.27 kB, as
    benchmarks/certs.py writes them): ~1.9 kB kept per domain in a worker that holds
    them all (the record's bytes and its slot), ~0.1 kB in one over its resident
    limit (its name and app: no slot, PEM is read on first use), ~0.3 kB in the
    supervisor (a brief: validity, status, view, no PEM) with its tallies. The first
    StoreState held ~3.9 kB (decoded PEM strings plus a bytes copy in every bundle)."""
    count = 10_000
    gc.collect()
    tracemalloc.start()
    try:
        records = _fake_records(count)  # allocated while tracing: a worker keeps them
        domains = [Item(k, v, 1) for k, v in records if k.startswith(rec.DOMAINS)]
        certs = [Item(k, v, 1) for k, v in records if k.startswith(rec.CERTS)]
        pems = [Item(k, v, 1) for k, v in records if k.startswith(rec.PEM)]
        del records
        state: StoreState | BriefState
        if process == "worker":
            state = StoreState(resident=Resident(resident))
            # As a worker does: domains, then certificates only within the limit.
            state.load(rec.DOMAINS, domains)
            if count <= resident:
                state.fill_all(certs, pems)
        else:
            state = BriefState(lambda brief, now: ("letsencrypt", "in_use"))
            state.load(rec.DOMAINS, domains)
            state.load(rec.CERTS, certs)
            for _ in state.sweep():
                pass
        del domains, certs, pems
        gc.collect()
        kept = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert len(state.domains) == count
    if isinstance(state, StoreState):
        loaded = sum(slot.loaded for slot in state.slots.values())
        assert loaded == len(state.slots) == (count if count <= resident else 0)
    else:
        assert state.tally.views == {("letsencrypt", "in_use"): count}
        assert sum(n for *_, n in state.tally.hours()) == count
    assert kept / count < bound, f"{kept / count:.0f} bytes per certificate"


def test_tables_over_a_state_changed_by_events_serve_what_a_fresh_read_serves(
        tmp_path: Path, certs: Any) -> None:
    """Store events change the worker's state in place and its tables look names up in
    it: after every batch (and SIGHUPs to another config), each name gets what tables
    built from a fresh read of the same records give, or is read before its handshake
    (a domain added since the start has no certificate in memory yet); routes agree."""
    import random

    import yaml

    from proxy.sync import Composer, compose, load_static

    _, pcert, pkey = certs(["*.platform.test"], stem="platform")
    _, scert, skey = certs(["ops.example", "site3.customer3.example"], stem="ops")
    config = tmp_path / "tlsedge.yaml"
    config.write_text(yaml.safe_dump({
        "platform_domain": "platform.test", "store": {"path": str(tmp_path / "store")},
        "tls": {"platform_certificate": {"cert": pcert, "key": pkey},
                "certificates": [{"cert": scert, "key": skey}]},
        "apps": {"app": {"backends": ["127.0.0.1:9"]}, "other": {"backends": ["127.0.0.1:8"]}}}))
    static = load_static(str(config))
    # A second config for SIGHUPs: other ops names, and configured domains (one of them
    # also a store domain, where the store wins).
    _, ocert, okey = certs(["site6.customer6.example", "ops2.example"], stem="ops2")
    config2 = tmp_path / "tlsedge2.yaml"
    config2.write_text(yaml.safe_dump({
        "platform_domain": "platform.test", "store": {"path": str(tmp_path / "store")},
        "tls": {"platform_certificate": {"cert": pcert, "key": pkey},
                "certificates": [{"cert": ocert, "key": okey}]},
        "domains": {"conf.example": "app", "site9.customer9.example": "app"},
        "apps": {"app": {"backends": ["127.0.0.1:9"]}, "other": {"backends": ["127.0.0.1:8"]}}}))
    statics = [static, load_static(str(config2))]
    records = _fake_records(60)
    current = dict(records)

    def read_whole() -> StoreState:
        state = StoreState()
        state.load(rec.DOMAINS, [Item(k, v, 1) for k, v in current.items()
                                 if k.startswith(rec.DOMAINS)])
        state.fill_all([Item(k, v, 1) for k, v in current.items() if k.startswith(rec.CERTS)],
                       [Item(k, v, 1) for k, v in current.items() if k.startswith(rec.PEM)])
        return state

    state = read_whole()
    composer = Composer()
    composer.full(static, state)
    rng = random.Random(5)
    names = [key.split("/")[1] for key, _ in records[::3]]
    for _ in range(80):
        for _ in range(rng.randint(1, 4)):
            key, value = rng.choice(records)
            name = key.split("/")[1]
            change: bytes | None = value
            if rng.random() < 0.3:
                change = None  # a domain or its certificate removed
            elif key.startswith("domains/") and rng.random() < 0.5:
                change = rec.encode(rec.DomainRecord(name=name, app="other"))
            state.apply(key, change)
            if change is None:
                current.pop(key, None)
            else:
                current[key] = change
        if rng.random() < 0.2:  # SIGHUP with the other config
            static = statics[1] if static is statics[0] else statics[0]
            incremental = composer.restatic(static, state)
        else:
            incremental = composer.update(static, state)
        fresh = compose(static, read_whole())
        for name in [*names, "ops.example", "ops2.example", "conf.example",
                     "x.platform.test"]:
            entry, how = incremental.certs.lookup(name)
            if how == "unloaded":  # read before its handshake: then as fresh below
                assert state.is_domain(name) and name not in state.slots, name
                continue
            want, want_how = fresh.certs.lookup(name)
            assert (how, entry and entry.fingerprint) == (want_how, want and want.fingerprint)
        assert dict(incremental.routes.domains) == dict(fresh.routes.domains)
        for name in [*names, "conf.example", "site9.customer9.example"]:
            got, want = incremental.routes.resolve(name), fresh.routes.resolve(name)
            assert (got and got.name) == (want and want.name), name


class _Inline:
    """threading.Thread for files.py's background checkpoint writes, run at start()."""

    def __init__(self, target: Any, name: str = "", args: tuple[Any, ...] = (),
                 daemon: bool = False) -> None:
        self._run = functools.partial(target, *args)

    def start(self) -> None:
        self._run()


def test_a_paged_scan_without_checkpoint_writes_one_after_its_pages_not_before(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Serve first, checkpoint after: a node starting on a store whose checkpoints/ is
    gone (restored from a backup of its data) gets every page of the domains from the
    walk before the checkpoint that walk makes due is written; a plain scan writes it
    too. (The writes run inline here, at the point where they would start.)"""
    monkeypatch.setattr(files, "_CHECKPOINT_AFTER", 5)
    monkeypatch.setattr(files, "threading", types.SimpleNamespace(Thread=_Inline))
    path = tmp_path / "store"
    pages: list[list[Item]] = []
    written: list[tuple[str, int]] = []  # (segment, pages handed over by then)
    write = files.FileStore._write_checkpoint

    def recording(store: FileStore, segment: str, revision: int, items: list[Item]) -> None:
        written.append((segment, len(pages)))
        write(store, segment, revision, items)

    monkeypatch.setattr(files.FileStore, "_write_checkpoint", recording)

    async def body() -> None:
        store = await FileStore.open(path)
        for i in range(12):
            await store.put(f"domains/d{i:02}.example", b"app %d" % i)
        assert not (path / "checkpoints").exists()
        async for page in store.scan_pages("domains/", page=4):
            pages.append(page)
        assert [len(p) for p in pages] == [4, 4, 4]
        assert written == [("domains", 3)]
        assert [i.value for p in pages for i in p] == [b"app %d" % i for i in range(12)]
        assert files.checkpoint.read(str(path / "checkpoints" / "domains.ckpt")) == (
            12, [i for p in pages for i in p])
        # A scan read whole writes its checkpoint too (its caller holds every item).
        for i in range(6):
            await store.put(f"certs/d{i:02}.example/acme", b"cert %d" % i)
        await store.scan("certs/")
        assert written[1:] == [("certs", 3)]
        await store.close()

    asyncio.run(body())


def test_a_walk_starts_reading_the_record_files_ahead_of_the_one_it_reads(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On a cold page cache, the records of a segment without checkpoint (100,000
    domains) were read one disk read at a time (~16 s): a walk now asks for the next
    files' pages (POSIX_FADV_WILLNEED) before it waits for the current one. What it
    returns is unchanged: missing, large and damaged records included, and a walk
    stopped by a damaged record leaves no descriptor open."""
    monkeypatch.setattr(files, "_AHEAD", 3)
    monkeypatch.setattr(files, "_FIRST_READ", 64)  # record files longer than one read
    path = tmp_path / "store"

    async def fill() -> None:
        store = await FileStore.open(path)
        for i in range(10):
            await store.put(f"domains/d{i}.example", b"v%d" % i * (i * 20))
        await store.close()

    asyncio.run(fill())
    store = FileStore(path)
    paths = [p for _, p in store._walk("domains/")]
    each = [files._read_record(p) for p in paths]
    order: list[tuple[str, str]] = []
    advise, read_open = os.posix_fadvise, files._read_open

    def advised(fd: int, offset: int, length: int, advice: int) -> None:
        assert advice == os.POSIX_FADV_WILLNEED
        order.append(("ahead", os.readlink(f"/proc/self/fd/{fd}")))
        advise(fd, offset, length, advice)

    def reading(fd: int, at: str, **kwargs: Any) -> tuple[int, bytes]:
        order.append(("read", at))
        return read_open(fd, at, **kwargs)

    monkeypatch.setattr(os, "posix_fadvise", advised)
    monkeypatch.setattr(files, "_read_open", reading)
    gone = str(path / "gone.rec")
    asked = [*paths[:4], gone, *paths[4:]]
    records = list(files._read_records(asked))
    assert records[4] is None
    del records[4]
    assert records == each
    assert [r[1] if r else None for r in records] == [b"v%d" % i * (i * 20) for i in range(10)]
    reads = [at for what, at in order if what == "read"]
    assert reads == paths
    for i, at in enumerate(asked[:-3]):  # the 3 files after each were asked for first
        if at != gone:
            before = order[:order.index(("read", at))]
            assert {("ahead", p) for p in asked[i:i + 4] if p != gone} <= set(before), i
    assert [what for what, _ in order[:4]] == ["ahead"] * 4

    monkeypatch.setattr(files, "_read_open", read_open)
    damaged = Path(paths[2])
    damaged.write_bytes(damaged.read_bytes()[:-1])
    fds = len(os.listdir("/proc/self/fd"))
    with pytest.raises(files.StoreError, match="damaged"):
        store._read_walk("domains/")
    assert len(os.listdir("/proc/self/fd")) == fds
