"""Benchmark: a CertTable of N certificates, and RSS bounded by the context cache.

Generates N ECDSA leaf certificates once (cached under benchmarks/.cache), builds the
table from trusted records as a worker does at start, then runs SNI lookups + context
builds through a bounded cache. Writes nothing outside benchmarks/.cache and --json.

    .venv/bin/python benchmarks/table_scale.py --count 100000
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import multiprocessing
import pickle
import random
import ssl
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cryptography import x509  # noqa: E402
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.x509.oid import NameOID  # noqa: E402

from proxy.certs.bundle import load_bundle, trusted_bundle  # noqa: E402
from proxy.certs.table import CertEntry, CertSelector, CertTable, ContextCache  # noqa: E402
from proxy.certs.tls import TlsSettings  # noqa: E402

CACHE = Path(__file__).resolve().parent / ".cache"
KEYS = 4  # distinct leaf keys: generation speed matters here, not key uniqueness
_worker: dict[str, Any] = {}


def rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def _init_worker(ca_key_pem: bytes, ca_name: str, key_pems: list[bytes]) -> None:
    ca_key = serialization.load_pem_private_key(ca_key_pem, None)
    _worker["ca_key"] = ca_key
    _worker["issuer"] = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, ca_name)])
    _worker["keys"] = [serialization.load_pem_private_key(k, None) for k in key_pems]


def _issue(index: int) -> dict[str, Any]:
    key = _worker["keys"][index % KEYS]
    name = f"site{index}.customer{index % 997}.example"
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(_worker["issuer"])
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=90))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(
            [x509.DNSName(name), x509.DNSName(f"www.{name}")]), critical=False)
        .sign(_worker["ca_key"], hashes.SHA256())
    )
    return {
        "chain_pem": cert.public_bytes(serialization.Encoding.PEM),
        "key": index % KEYS,
        "names": [name, f"www.{name}"],
        "not_before": cert.not_valid_before_utc.timestamp(),
        "not_after": cert.not_valid_after_utc.timestamp(),
        "fingerprint": cert.fingerprint(hashes.SHA256()).hex(),
        "issuer": cert.issuer.rfc4514_string(),
    }


def generate(count: int) -> tuple[list[dict[str, Any]], list[bytes], float, bool]:
    """Records for `count` certificates, from the cache when present."""
    path = CACHE / f"certs-{count}.pickle"
    if path.exists():
        with path.open("rb") as f:
            records, key_pems = pickle.load(f)
        return records, key_pems, 0.0, True
    started = time.perf_counter()
    ca_key = ec.generate_private_key(ec.SECP256R1())
    pkcs8 = (serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
             serialization.NoEncryption())
    key_pems = [ec.generate_private_key(ec.SECP256R1()).private_bytes(*pkcs8)
                for _ in range(KEYS)]
    args = (ca_key.private_bytes(*pkcs8), "tlsedge benchmark CA", key_pems)
    with multiprocessing.Pool(initializer=_init_worker, initargs=args) as pool:
        records = pool.map(_issue, range(count), chunksize=500)
    CACHE.mkdir(exist_ok=True)
    (CACHE / ".gitignore").write_text("*\n")
    with path.open("wb") as f:
        pickle.dump((records, key_pems), f, protocol=pickle.HIGHEST_PROTOCOL)
    return records, key_pems, time.perf_counter() - started, False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=100_000)
    parser.add_argument("--lookups", type=int, default=10_000)
    parser.add_argument("--cache-size", type=int, default=1000)
    parser.add_argument("--json", default=str(CACHE / "table_scale.json"))
    opts = parser.parse_args()

    records, key_pems, gen_seconds, cached = generate(opts.count)
    gc.collect()
    rss_start = rss_kib()

    # What a worker does at start: trusted records from the store, no PEM parsing.
    started = time.perf_counter()
    entries = [
        CertEntry(trusted_bundle(r["chain_pem"], bytes(bytearray(key_pems[r["key"]])),
                                 names=r["names"], not_before=r["not_before"],
                                 not_after=r["not_after"], fingerprint=r["fingerprint"],
                                 issuer=r["issuer"], key_type="ecdsa-p256"), "acme")
        for r in records
    ]
    bundles_seconds = time.perf_counter() - started
    started = time.perf_counter()
    table = CertTable.from_entries(entries, entries[0])
    table_seconds = time.perf_counter() - started
    gc.collect()
    rss_table = rss_kib()

    # Full validation cost, measured on a sample (what an upload or a cold store pays).
    sample = records[: min(1000, len(records))]
    started = time.perf_counter()
    for r in sample:
        load_bundle(r["chain_pem"], key_pems[r["key"]])
    parse_us = (time.perf_counter() - started) / len(sample) * 1e6

    cache = ContextCache(TlsSettings(), max_size=opts.cache_size)
    selector = CertSelector(table, cache)
    holder = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).wrap_bio(
        ssl.MemoryBIO(), ssl.MemoryBIO(), server_side=True)
    rng = random.Random(7)
    names = [rng.choice(records)["names"][rng.randrange(2)] for _ in range(opts.lookups)]
    started = time.perf_counter()
    for name in names:
        assert selector.sni_callback(holder, name, holder.context) is None
    lookup_seconds = time.perf_counter() - started
    gc.collect()
    rss_cache = rss_kib()
    # Hits only: the same names again, all contexts already cached when they fit.
    hot = names[-min(opts.cache_size, len(names)) // 2:]
    started = time.perf_counter()
    for name in hot:
        selector.sni_callback(holder, name, holder.context)
    hit_us = (time.perf_counter() - started) / max(len(hot), 1) * 1e6

    result = {
        "count": opts.count, "names": len(table), "generated_seconds": round(gen_seconds, 1),
        "from_cache": cached, "bundles_seconds": round(bundles_seconds, 3),
        "table_build_seconds": round(table_seconds, 3),
        "full_parse_us_per_cert": round(parse_us, 1),
        "rss_start_mib": round(rss_start / 1024, 1), "rss_table_mib": round(rss_table / 1024, 1),
        "table_bytes_per_cert": round((rss_table - rss_start) * 1024 / opts.count),
        "lookups": opts.lookups, "cache_max": opts.cache_size, "cache_len": len(cache),
        "lookup_build_seconds": round(lookup_seconds, 2),
        "cached_sni_callback_us": round(hit_us, 2),
        "rss_after_lookups_mib": round(rss_cache / 1024, 1),
        "cache_rss_kib_per_context": round((rss_cache - rss_table) / max(len(cache), 1), 1),
    }
    width = max(map(len, result))
    for key, value in result.items():
        print(f"{key:<{width}}  {value}")
    Path(opts.json).parent.mkdir(parents=True, exist_ok=True)
    Path(opts.json).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {opts.json}")


if __name__ == "__main__":
    main()
