"""Cluster mode end to end: a real etcd, a real pebble and three `tlsedge run` nodes.

Node a answers every HTTP-01 challenge (pebble's httpPort goes to it, through a relay
that can be slowed down) and runs no lifecycle; nodes b and c place every order. So
each certificate proves the whole path: an order on b/c, its token through etcd, the
answer from a, the certificate through etcd to all three. Tests run in file order and
share the cluster; the node-kill test is last because it leaves one node dead.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from proxy import config as config_mod
from proxy.registry import Registry
from proxy.store import open_store
from proxy.store import records as rec
from proxy.store.base import Store
from tests.certgen import CA
from tests.conftest import PLATFORM
from tests.support.backend import Backend
from tests.support.dnsserver import DNSServer
from tests.support.edge import Edge
from tests.support.etcd import EtcdServer
from tests.support.pebble import Pebble
from tests.support.ports import free_port
from tests.support.rawserver import RawServer
from tests.test_lifecycle_e2e import verified_fingerprint, wait_for

pytestmark = pytest.mark.timeout(180)

ROOT = Path(__file__).resolve().parent.parent
LOCK_TTL = 4
NAMES = [f"d{i:02d}.cluster.test" for i in range(20)]


class SlowRelay(RawServer):
    """A TCP relay to `target` that waits `delay` seconds before connecting each client."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.delay = 0.0
        super().__init__()

    def serve(self, client: socket.socket) -> None:
        time.sleep(self.delay)
        try:
            upstream = socket.create_connection(("127.0.0.1", self.target), timeout=10)
        except OSError:
            client.close()
            return

        def pump(src: socket.socket, dst: socket.socket) -> None:
            with contextlib.suppress(OSError):
                while data := src.recv(65536):
                    dst.sendall(data)
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)

        back = threading.Thread(target=pump, args=(upstream, client), daemon=True)
        back.start()
        pump(client, upstream)
        back.join(15)
        client.close()
        upstream.close()


@dataclass
class Cluster:
    etcd: EtcdServer
    pebble: Pebble
    dns: DNSServer
    relay: SlowRelay
    nodes: dict[str, Edge]
    root: Path
    ca: CA

    def store_of(self, node: str) -> Store:
        return open_store(config_mod.load(self.nodes[node].config_path))

    def run(self, node: str, body: Callable[[Registry, Store], Any]) -> Any:
        """Run `body(registry, store)` against node's store config, on a fresh loop."""
        async def main() -> Any:
            store = self.store_of(node)
            try:
                registry = Registry(store, platform_domain=PLATFORM, apps=["my-app"])
                return await body(registry, store)
            finally:
                await store.close()
        return asyncio.run(main())

    def live(self) -> list[Edge]:
        return [e for e in self.nodes.values() if e.proc is not None]


def node_config(name: str, workdir: Path, ca: CA, backend: Backend, etcd: EtcdServer
                ) -> dict[str, Any]:
    platform = ca.issue([f"*.{PLATFORM}"])
    cert, key = platform.write(workdir, "platform")
    return {
        "platform_domain": PLATFORM,
        "workers": 1,
        "tls": {"platform_certificate": {"cert": cert, "key": key}},
        "store": {"backend": "etcd", "endpoints": [etcd.endpoint], "prefix": "/tlsedge/"},
        "node": {"name": name},
        "apps": {"my-app": {"backends": [backend.address]}},
        "limits": {"drain_timeout": 2.0},
    }


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, ca: CA) -> Iterator[Cluster]:
    base = tmp_path_factory.mktemp("cluster")
    with contextlib.ExitStack() as stack:
        etcd = stack.enter_context(EtcdServer(base / "etcd"))
        dns = stack.enter_context(DNSServer())
        backend = stack.enter_context(Backend("b1"))
        nodes: dict[str, Edge] = {}
        for name in ("a", "b", "c"):
            workdir = base / name
            workdir.mkdir()
            nodes[name] = Edge(workdir, node_config(name, workdir, ca, backend, etcd),
                               start=False)
        relay = SlowRelay(nodes["a"].http_port)
        stack.callback(relay.close)
        pebble = stack.enter_context(Pebble(http_port=relay.port, dns_port=dns.port))
        root = base / "pebble-root.pem"
        root.write_bytes(pebble.issuing_root())
        for name, edge in nodes.items():
            if name != "a":  # a only answers challenges; b and c order
                edge.config["acme"] = {
                    "directory": pebble.directory_url, "email": "ops@example.test",
                    "ca_bundle": str(pebble.ca_bundle_path), "lock_ttl": LOCK_TTL,
                    "dns": {"edge_addresses": ["127.0.0.1"], "resolvers": [dns.address],
                            "check_interval": 1}}
                edge.write_config()
            stack.callback(edge.__exit__, None, None, None)
        started = time.monotonic()
        for edge in nodes.values():
            edge.start()
        print(f"\n3 nodes started in {time.monotonic() - started:.2f} s")
        yield Cluster(etcd, pebble, dns, relay, nodes, root, ca)


def issued_by(edge: Edge, name: str) -> bool:
    return f"certificate for {name} issued" in edge.log()


# --------------------------------------------------------------------------- tests


def test_unreachable_etcd_at_start_is_one_clear_line(tmp_path: Path, ca: CA) -> None:
    port = free_port()
    platform = ca.issue([f"*.{PLATFORM}"])
    cert, key = platform.write(tmp_path, "platform")
    config = {"platform_domain": PLATFORM,
              "tls": {"platform_certificate": {"cert": cert, "key": key}},
              "listen": {"https": f"127.0.0.1:{free_port()}",
                         "http": f"127.0.0.1:{free_port()}", "metrics": None},
              "store": {"backend": "etcd", "endpoints": [f"127.0.0.1:{port}"],
                        "timeout": 2}}
    path = tmp_path / "tlsedge.yaml"
    path.write_text(json.dumps(config))
    done = subprocess.run([sys.executable, "-m", "proxy.cli", "run", "-c", str(path)],
                          capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert done.returncode == 1
    # One line says it (as a log line since `run` logs its errors), and no traceback.
    said = [line for line in done.stderr.splitlines()
            if f"cannot reach etcd at 127.0.0.1:{port}: " in line]
    assert len(said) == 1, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    path.write_text(json.dumps({**config, "store": {"backend": "etcd"}}))
    done = subprocess.run([sys.executable, "-m", "proxy.cli", "check-config", "-c",
                           str(path)], capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert done.returncode == 1
    assert "store.endpoints: the etcd backend needs at least one endpoint" in done.stderr


def test_twenty_domains_are_ordered_once_and_served_by_every_node(cluster: Cluster) -> None:
    before = cluster.pebble.order_count()
    for name in NAMES:
        cluster.dns.set_a(name, ["127.0.0.1"])

    async def add_all(registry: Registry, store: Store) -> None:
        await asyncio.gather(*(registry.add_domain(n, "my-app") for n in NAMES))
    started = time.monotonic()
    cluster.run("a", add_all)

    def all_served() -> bool:
        return all(verified_fingerprint(edge, name, cluster.root) is not None
                   for edge in cluster.nodes.values() for name in NAMES)
    wait_for(all_served, 60, "every node serving the 20 certificates", interval=0.2)
    elapsed = time.monotonic() - started
    served = {name: {verified_fingerprint(e, name, cluster.root)
                     for e in cluster.nodes.values()} for name in NAMES}
    assert all(len(fps) == 1 for fps in served.values())  # one certificate per domain
    orders = cluster.pebble.order_count() - before
    by_node = {n: sum(issued_by(e, name) for name in NAMES) for n, e in cluster.nodes.items()}
    print(f"\n20 domains: {orders} orders, issued by {by_node}, all served by 3 nodes "
          f"in {elapsed:.1f} s")
    assert orders == 20
    assert by_node["a"] == 0 and by_node["b"] + by_node["c"] == 20


def test_an_upload_on_one_node_is_served_by_the_others_within_a_second(
        cluster: Cluster) -> None:
    name = "upload.cluster.test"

    async def add(registry: Registry, store: Store) -> None:
        await registry.add_domain(name, "my-app", letsencrypt=False)
    cluster.run("a", add)
    others = [cluster.nodes["b"], cluster.nodes["c"]]
    delays: list[float] = []
    for _ in range(10):
        issued = cluster.ca.issue([name])

        async def upload(registry: Registry, store: Store, issued: Any = issued) -> float:
            await registry.set_custom_certificate(name, issued.chain_pem, issued.key_pem)
            return time.monotonic()
        written = cluster.run("a", upload)
        pending = set(range(len(others)))
        while pending and time.monotonic() - written < 3:
            for i in list(pending):
                if others[i].fingerprint(name) == issued.fingerprint:
                    delays.append(time.monotonic() - written)
                    pending.discard(i)
        assert not pending, "an upload was not served by every node within 3 s"
    median, worst = statistics.median(delays), max(delays)
    print(f"\nupload propagation to 2 other nodes over 10 uploads: median "
          f"{median * 1000:.0f} ms, max {worst * 1000:.0f} ms")
    assert worst < 1.0


def test_nodes_keep_serving_through_an_etcd_outage_and_catch_up(cluster: Cluster) -> None:
    expected = {name: verified_fingerprint(cluster.nodes["a"], name, cluster.root)
                for name in NAMES}
    assert all(expected.values())
    logs_before = {n: len(e.log()) for n, e in cluster.nodes.items()}
    cluster.etcd.stop()
    stopped = time.monotonic()
    try:
        for check_at in (2.0, 12.0):
            time.sleep(max(0.0, check_at - (time.monotonic() - stopped)))
            for edge in cluster.nodes.values():
                for name in NAMES:
                    assert verified_fingerprint(edge, name, cluster.root) == expected[name]
    finally:
        cluster.etcd.start()
    print(f"\netcd was down for {time.monotonic() - stopped:.1f} s; every node served "
          "all 20 certificates throughout")
    # A change made after etcd returns reaches every node through the resumed watch.
    name = "after-outage.cluster.test"
    issued = cluster.ca.issue([name])

    async def add(registry: Registry, store: Store) -> int:
        await registry.add_domain(name, "my-app", letsencrypt=False,
                                  chain=issued.chain_pem, key=issued.key_pem)
        return await store.revision()
    back = time.monotonic()
    revision = cluster.run("a", add)
    for edge in cluster.nodes.values():
        wait_for(lambda edge=edge: edge.fingerprint(name) == issued.fingerprint, 20,
                 f"{name} on {edge.workdir.name}")
    print(f"a change made after the outage reached all nodes in "
          f"{time.monotonic() - back:.1f} s")
    for node, edge in cluster.nodes.items():
        log = edge.log()[logs_before[node]:]
        assert "store watch resuming from revision" in log
        assert "reloading" not in log  # resumed from the last revision, no full reload
    # Every node reports (through its node record) having applied that revision.
    def status() -> str | None:
        out = subprocess.run([sys.executable, "-m", "proxy.cli", "cluster", "status", "-c",
                              str(cluster.nodes["a"].config_path)],
                             capture_output=True, text=True, timeout=30, cwd=ROOT).stdout
        applied = [int(r) for r in re.findall(r"^  \w+ +up +applied (\d+)", out, re.M)]
        return out if len(applied) == 3 and min(applied) >= revision else None
    out = wait_for(status, 15, "3 nodes reporting the new revision", interval=1.0)
    print(out)
    assert "has a leader" in out


def test_a_node_killed_holding_a_lock_mid_order_is_taken_over(cluster: Cluster) -> None:
    name = "killed.cluster.test"
    cluster.dns.set_a(name, ["127.0.0.1"])
    cluster.relay.delay = 3.0  # pebble's validation waits: the order stays in flight
    lock_key = f"locks/{rec.lock_name(name)}"

    async def add_and_find_holder(registry: Registry, store: Store) -> str:
        await registry.add_domain(name, "my-app")
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            item = await store.get(lock_key)
            if item is not None:
                return str(json.loads(item.value)["holder"])
            await asyncio.sleep(0.02)
        raise AssertionError("no node took the domain's lock")
    holder = cluster.run("a", add_and_find_holder)
    victim = re.match(r"node (\w+),", holder)
    assert victim and victim.group(1) in ("b", "c"), holder
    survivor = "c" if victim.group(1) == "b" else "b"
    time.sleep(1.0)
    assert not issued_by(cluster.nodes[victim.group(1)], name)  # still mid-order
    cluster.nodes[victim.group(1)].kill()
    killed = time.monotonic()
    cluster.relay.delay = 0.0
    fingerprint = wait_for(
        lambda: verified_fingerprint(cluster.nodes["a"], name, cluster.root),
        LOCK_TTL + 20, f"{name} issued by the surviving node")
    took = time.monotonic() - killed
    print(f"\nnode {victim.group(1)} killed mid-order; node {survivor} completed {name} "
          f"{took:.1f} s later (lock ttl {LOCK_TTL} s)")
    assert took > LOCK_TTL - 1.5  # not before the dead holder's lease expired
    # The survivor logs "issued" after its status write, which follows the records
    # node a already serves from: a few ms later.
    wait_for(lambda: issued_by(cluster.nodes[survivor], name), 5, f"{survivor}'s log")
    assert verified_fingerprint(cluster.nodes[survivor], name, cluster.root) == fingerprint

    async def check_records(registry: Registry, store: Store) -> None:
        view = await registry.view(name)
        assert view.status == "in_use" and view.acme is not None
        assert view.acme.fingerprint == fingerprint
        bundle = await registry.certificate_bundle(name, "acme")  # whole and consistent
        assert bundle is not None and bundle.fingerprint == fingerprint
        # One key material record: the dead holder's order wrote none, or it was swept.
        assert await store.keys(f"{rec.PEM}{name}/") == [
            rec.pem_key(name, "acme", fingerprint)]
    cluster.run("a", check_records)
