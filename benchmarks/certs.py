"""Certificates and stores for the benchmark: one throwaway CA, the served
certificate (ECDSA P-256 and RSA-2048), and FileStore directories holding N domains
with their certificates. Writes only under its work directory and benchmarks/.cache.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peers import APP, HOST, PLATFORM, Cert
from table_scale import CACHE, generate

from proxy.store import records as rec
from proxy.store.files import FileStore
from tests.certgen import CA, KeyType, new_key

NAMES = [HOST, f"*.{PLATFORM}", "localhost"]


def served_certs(workdir: Path, ca: CA) -> dict[str, Cert]:
    """The one certificate every proxy serves, per key type."""
    out = {}
    for kind in ("ecdsa", "rsa"):
        key_type: KeyType = "ecdsa" if kind == "ecdsa" else "rsa"
        issued = ca.issue(NAMES, key_type)
        chain, key = issued.write(workdir / "certs", f"served-{kind}")
        combined = workdir / "certs" / f"served-{kind}.pem"
        fd = os.open(combined, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(issued.chain_pem + issued.key_pem)
        out[kind] = Cert(Path(chain), Path(key), combined, kind)
    return out


@contextlib.contextmanager
def _no_fsync() -> Iterator[None]:
    """A seeded store is a disposable cache: skip fsync while writing it (~6x faster)."""
    saved = os.fsync, os.fdatasync
    os.fsync = os.fdatasync = lambda fd: None  # type: ignore[assignment]
    try:
        yield
    finally:
        os.fsync, os.fdatasync = saved


def _write(store: FileStore, key: str, value: bytes) -> None:
    # FileStore's own synchronous write path (same layout, change log and revisions
    # as put()), called directly: 200,000 puts through asyncio.to_thread took twice as long.
    store._write_sync(key, key.split("/"), value, None)


def _domain_records(name: str, record: dict[str, Any], key_pem: bytes,
                    now: float) -> list[tuple[str, bytes]]:
    """The records the registry writes for a domain with an ACME certificate, in its
    order: the domain, the key material, the certificate's metadata."""
    domain = rec.DomainRecord(name=name, app=APP, letsencrypt=True, created_at=now)
    material = rec.KeyMaterial(chain_pem=record["chain_pem"].decode(),
                               key_pem=key_pem.decode())
    cert = rec.CertRecord(
        domain=name, source="acme", names=tuple(record["names"]),
        not_before=record["not_before"], not_after=record["not_after"],
        fingerprint=record["fingerprint"], issuer=record["issuer"], key_type="ecdsa-p256",
        stored_at=now)
    return [(rec.domain_key(name), rec.encode(domain)),
            (rec.pem_key(name, "acme", cert.fingerprint), rec.encode(material)),
            (rec.cert_key(name, "acme"), rec.encode(cert))]


@dataclass(frozen=True)
class SeededStore:
    path: Path
    names: list[str]           # the domains, in store order
    fingerprints: list[str]    # of each domain's certificate
    seconds: float             # spent writing it now (0.0 when it came from the cache)


def seeded_store(count: int) -> SeededStore:
    """A FileStore with `count` domains, each with its own ACME certificate record.

    Built once per count under benchmarks/.cache/store-<count> (a `complete` marker
    tells a finished store from an interrupted one); workers only read it.
    """
    records, key_pems, _, _ = generate(count)
    names = [r["names"][0] for r in records]
    fingerprints = [r["fingerprint"] for r in records]
    path = CACHE / f"store-v2-{count}"  # v2: key material apart from the metadata
    marker = path / "complete"
    if marker.exists():
        return SeededStore(path, names, fingerprints, 0.0)
    shutil.rmtree(path, ignore_errors=True)
    started = time.monotonic()
    store = FileStore(path)
    now = time.time()
    with _no_fsync():
        for r, name in zip(records, names, strict=True):
            for key, value in _domain_records(name, r, key_pems[r["key"]], now):
                _write(store, key, value)
    marker.write_text(f"{count}\n")
    return SeededStore(path, names, fingerprints, time.monotonic() - started)


@dataclass(frozen=True)
class SwapSet:
    """Names and two generations of certificates for the hot-swap scenario."""

    store_names: list[str]
    static_names: list[str]
    generations: list[list[tuple[bytes, bytes, str]]]  # [gen][i] = (chain, key, fingerprint)


def swap_set(ca: CA, count: int) -> SwapSet:
    """`count` store domains and `count` ops files, two certificates each (~2 ms a pair)."""
    key = new_key("ecdsa")
    store_names = [f"swap{i}.store.example" for i in range(count)]
    static_names = [f"swap{i}.files.example" for i in range(count)]
    generations = []
    for _ in range(2):
        gen = []
        for name in (*store_names, *static_names):
            issued = ca.issue([name], key=key)
            gen.append((issued.chain_pem, issued.key_pem, issued.fingerprint))
        generations.append(gen)
    return SwapSet(store_names, static_names, generations)


def cert_records(name: str, chain: bytes, key: bytes, fingerprint: str
                 ) -> list[tuple[str, bytes]]:
    """The key material, then the metadata record, as the registry writes them."""
    from proxy.certs.bundle import load_bundle

    bundle = load_bundle(chain, key, domain=name, now=time.time())
    assert bundle.fingerprint == fingerprint
    return [(rec.pem_key(name, "acme", fingerprint),
             rec.encode(rec.KeyMaterial.from_bundle(bundle))),
            (rec.cert_key(name, "acme"),
             rec.encode(rec.CertRecord.from_bundle(name, "acme", bundle, time.time())))]


def swap_records(swap: SwapSet, generation: int) -> list[tuple[str, bytes]]:
    """(key, value) store writes of one generation, validated and encoded up front so
    that the timed swap is only the store writes. Generation 0 adds the domains."""
    now = time.time()
    gen = swap.generations[generation]
    items = []
    for i, name in enumerate(swap.store_names):
        if generation == 0:
            domain = rec.DomainRecord(name=name, app=APP, created_at=now)
            items.append((rec.domain_key(name), rec.encode(domain)))
        items += cert_records(name, *gen[i])
    return items


def write_store(path: Path, items: list[tuple[str, bytes]]) -> float:
    """Write `items` the product's way (each write fsync-ed); returns the seconds taken."""
    started = time.monotonic()
    store = FileStore(path)
    for key, value in items:
        _write(store, key, value)
    return time.monotonic() - started


def write_static_files(directory: Path, swap: SwapSet, generation: int
                       ) -> list[tuple[Path, Path]]:
    """The ops certificate files (chain, key) of one generation, replaced atomically."""
    directory.mkdir(parents=True, exist_ok=True)
    gen = swap.generations[generation][len(swap.store_names):]
    out = []
    for name, (chain, key, _) in zip(swap.static_names, gen, strict=True):
        paths = directory / f"{name}.crt", directory / f"{name}.key"
        for path, data in zip(paths, (chain, key), strict=True):
            tmp = path.with_suffix(".tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            tmp.replace(path)
        out.append(paths)
    return out
