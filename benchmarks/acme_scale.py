"""ACME at platform scale (issue #16): N custom domains added with one bulk call, timed
until every one is In use with a verified chain, on one node (file store) and on a
3-node cluster (etcd), against a real pebble and DNS server on loopback.

Each run starts pebble (HTTP-01 validated through the edge's port 80, as in
production), the test DNS server pointing every name at the edge, and real `tlsedge
run` nodes; then `tlsedge domains add --from-file` adds N names of N registered domains
(so Let's Encrypt's default limits allow them all at once) and the clock runs until
the store holds N certificates and every node serves each name a chain that verifies
against pebble's root. Reported: the time of the call, to the last certificate and to
the last verified handshake, the orders pebble took (exactly N), and the CPU seconds
pebble and the tlsedge nodes spent, which says who the limit is. One table on stdout,
JSON in benchmarks/results/acme-<timestamp>.json.

    .venv/bin/python benchmarks/acme_scale.py --quick            # 20 names, one node
    .venv/bin/python benchmarks/acme_scale.py                    # 20, 200 names; 1 and 3 nodes
    .venv/bin/python benchmarks/acme_scale.py --names 1000 --nodes 1
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(HERE), str(ROOT)]

import procstat  # noqa: E402

from proxy.store.base import Store  # noqa: E402
from proxy.store.etcd import EtcdSettings, EtcdStore  # noqa: E402
from proxy.store.files import FileStore  # noqa: E402
from tests.certgen import CA  # noqa: E402
from tests.support.dnsserver import DNSServer  # noqa: E402
from tests.support.edge import Edge  # noqa: E402
from tests.support.etcd import EtcdServer  # noqa: E402
from tests.support.pebble import Pebble  # noqa: E402

PLATFORM = "bench.test"
POLL = 0.1  # seconds between two looks at the store
HANDSHAKERS = 16  # verifying handshakes at once
# Measured by the issue on this kind of machine (Caddy 2, one node, against pebble).
CADDY = {20: 10.6, 200: 190.7}
ACCOUNT_ORDERS = 300  # acme.limits.account's default (Let's Encrypt's, per 3 h)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--names", default="20,200", help="comma-separated counts of names")
    p.add_argument("--nodes", default="1,3", help="comma-separated node counts (1 or 3)")
    p.add_argument("--deadline", type=float, default=600.0,
                   help="give a run up to this many seconds")
    p.add_argument("--quick", action="store_true", help="harness check: 20 names, one node")
    p.add_argument("--keep", action="store_true", help="keep the work dir (logs, stores)")
    p.add_argument("--concurrency", type=int, default=0,
                   help="acme.concurrency of each node (default: the config's default)")
    p.add_argument("--store-dir", type=Path,
                   help="put the one node's file store there (e.g. /dev/shm: no disk)")
    return p


def _names(count: int, run: str) -> list[str]:
    # One registered domain each (an unknown TLD is a one-label public suffix).
    return [f"shop{i:04d}-{run}.test" for i in range(count)]


def _node_config(name: str, workdir: Path, ca: CA, store: dict[str, Any],
                 pebble: Pebble, dns: DNSServer, more: dict[str, Any]) -> dict[str, Any]:
    platform = ca.issue([f"*.{PLATFORM}"])
    cert, key = platform.write(workdir, "platform")
    return {
        "platform_domain": PLATFORM, "workers": 1,
        "tls": {"platform_certificate": {"cert": cert, "key": key}},
        "store": store, "node": {"name": name},
        "apps": {"shop": {"backends": ["127.0.0.1:9"]}},
        "limits": {"drain_timeout": 2.0},
        "acme": {"directory": pebble.directory_url, "email": "ops@bench.test", **more,
                 "ca_bundle": str(pebble.ca_bundle_path),
                 "dns": {"edge_addresses": ["127.0.0.1"], "resolvers": [dns.address],
                         "check_interval": 1}},
    }


@contextlib.contextmanager
def _cluster(workdir: Path, nodes: int, dns: DNSServer, ca: CA, store_dir: Path | None,
             acme: dict[str, Any]) -> Iterator[tuple[list[Edge], Pebble, Store, Path]]:
    """`nodes` edges (files for one, etcd for three) and the pebble validating through
    the first one's port 80 (the others' challenges reach it through the store)."""
    with contextlib.ExitStack() as stack:
        if nodes == 1:
            store_config: dict[str, Any] = {"path": str((store_dir or workdir) / "store")}
        else:
            etcd = stack.enter_context(EtcdServer(workdir / "etcd"))
            store_config = {"backend": "etcd", "endpoints": [etcd.endpoint],
                            "prefix": "/tlsedge/"}
        edges = []
        for index in range(nodes):
            folder = workdir / f"node{index}"
            folder.mkdir()
            edges.append(Edge(folder, {}, start=False))
        pebble = stack.enter_context(Pebble(http_port=edges[0].http_port, dns_port=dns.port,
                                            workdir=workdir / "pebble"))
        for index, edge in enumerate(edges):
            config = _node_config(f"n{index}", edge.workdir, ca, store_config, pebble, dns,
                                  acme)
            edge.write_config({"listen": edge.config["listen"], **config})
            stack.callback(edge.__exit__, None, None, None)
            edge.start(timeout=60)
        root = workdir / "pebble-root.pem"
        root.write_bytes(pebble.issuing_root())
        store: Store = (FileStore(store_config["path"]) if nodes == 1 else
                        EtcdStore(EtcdSettings(endpoints=tuple(store_config["endpoints"]),
                                               prefix=store_config["prefix"])))
        yield edges, pebble, store, root


async def _certificates(store: Store) -> int:
    return sum(1 for key in await store.keys("certs/") if key.endswith("/acme"))


def _verifies(port: int, name: str, root: Path) -> bool:
    context = ssl.create_default_context(cafile=str(root))
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
                context.wrap_socket(raw, server_hostname=name):
            return True
    except (ssl.SSLError, OSError):
        return False


def _cpu(pids: list[int]) -> float:
    return procstat.cpu_seconds([p for pid in pids for p in procstat.tree(pid)])


def run_one(count: int, nodes: int, deadline: float, workdir: Path,
            store_dir: Path | None = None, acme: dict[str, Any] | None = None
            ) -> dict[str, Any]:
    acme = acme or {}
    ca = CA.new("acme bench CA")
    names = _names(count, f"{nodes}n{count}")
    with DNSServer() as dns, _cluster(workdir, nodes, dns, ca, store_dir, acme) as (
            edges, pebble, store, root):
        for name in names:
            dns.set_a(name, ["127.0.0.1"])
        pids = [e.proc.pid for e in edges if e.proc is not None]
        cpu_before = _cpu(pids), _cpu([pebble.pid or 0])
        listing = workdir / "names.txt"
        listing.write_text("\n".join(names) + "\n")
        started = time.monotonic()
        done = subprocess.run(
            [sys.executable, "-m", "proxy.cli", "domains", "add", "--from-file", str(listing),
             "--app", "shop", "-c", str(edges[-1].config_path)],
            capture_output=True, text=True, timeout=deadline, cwd=ROOT)
        call = time.monotonic() - started
        if done.returncode != 0:
            raise RuntimeError(f"domains add failed: {done.stderr[-2000:]}")
        loop = asyncio.new_event_loop()
        try:
            while loop.run_until_complete(_certificates(store)) < count:
                if time.monotonic() - started > deadline:
                    raise RuntimeError(f"not every certificate after {deadline:.0f} s")
                time.sleep(POLL)
            issued = time.monotonic() - started
            with ThreadPoolExecutor(HANDSHAKERS) as pool:
                jobs = [(e.https_port, n) for e in edges for n in names]
                pending = jobs
                while pending:
                    ok = list(pool.map(lambda j: _verifies(j[0], j[1], root), pending))
                    pending = [j for j, good in zip(pending, ok, strict=True) if not good]
                    if pending and time.monotonic() - started > deadline:
                        raise RuntimeError(f"{len(pending)} handshakes do not verify")
            verified = time.monotonic() - started
        finally:
            loop.run_until_complete(store.close())
            loop.close()
        time.sleep(0.5)  # pebble logs an order a moment after answering it
        return {"names": count, "nodes": nodes, "call_s": round(call, 2),
                "issued_s": round(issued, 2), "verified_s": round(verified, 2),
                "orders": pebble.order_count(), "handshakes": len(names) * len(edges),
                "tlsedge_cpu_s": round(_cpu(pids) - cpu_before[0], 1),
                "pebble_cpu_s": round(_cpu([pebble.pid or 0]) - cpu_before[1], 1),
                "caddy_s": CADDY.get(count) if nodes == 1 else None,
                "account_limit": acme.get("limits", {}).get("account", {}).get(
                    "count", ACCOUNT_ORDERS)}


def _table(rows: list[dict[str, Any]]) -> str:
    head = ("names", "nodes", "add call", "all issued", "all verified", "orders",
            "tlsedge CPU", "pebble CPU", "Caddy (issue)")
    lines = [head]
    for r in rows:
        lines.append((str(r["names"]), str(r["nodes"]), f"{r['call_s']:.2f} s",
                      f"{r['issued_s']:.2f} s", f"{r['verified_s']:.2f} s", str(r["orders"]),
                      f"{r['tlsedge_cpu_s']:.1f} s", f"{r['pebble_cpu_s']:.1f} s",
                      f"{r['caddy_s']:.1f} s" if r["caddy_s"] else "-"))
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(line, widths, strict=True))
                     for line in lines)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    counts = [20] if args.quick else [int(n) for n in args.names.split(",")]
    node_counts = [1] if args.quick else [int(n) for n in args.nodes.split(",")]
    rows = []
    base = Path(tempfile.mkdtemp(prefix="tlsedge-acme-bench-"))
    for nodes in node_counts:
        for count in counts:
            workdir = base / f"{nodes}n{count}"
            workdir.mkdir()
            store_dir = None
            if args.store_dir is not None:
                store_dir = Path(tempfile.mkdtemp(prefix="acme-bench-", dir=args.store_dir))
            acme: dict[str, Any] = {"concurrency": args.concurrency} if args.concurrency else {}
            if count > ACCOUNT_ORDERS:
                # Past Let's Encrypt's 300 orders per 3 h the budget would (rightly) hold
                # the rest at one per 36 s: pebble has no limit, so raise the account's.
                acme["limits"] = {"account": {"count": count, "period": 10800}}
            row = run_one(count, nodes, args.deadline, workdir, store_dir, acme)
            if store_dir is not None:
                subprocess.run(["rm", "-rf", str(store_dir)], check=False)
            print(f"{count} names, {nodes} node(s): verified in {row['verified_s']:.2f} s, "
                  f"{row['orders']} orders", file=sys.stderr)
            rows.append(row)
    print(_table(rows))
    results = HERE / "results"
    results.mkdir(exist_ok=True)
    out = results / f"acme-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps({"runs": rows, "cpus": os.cpu_count()}, indent=2))
    print(f"JSON: {out}")
    if not args.keep:
        subprocess.run(["rm", "-rf", str(base)], check=False)
    else:
        print(f"kept: {base}")
    bad = [r for r in rows if r["orders"] != r["names"]]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
