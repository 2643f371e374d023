"""Cluster presence and `tlsedge cluster status`: node records, lock holders, etcd health.

Each node's supervisor rewrites `nodes/<name>` every few seconds with the revision it
has applied; status reads those, the locks and the backend's health. Read-only toward
everything else: it never touches domains, certificates or the data plane.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import time
from collections.abc import Callable

import msgspec

from proxy import metrics
from proxy.config import Config
from proxy.errors import StoreError
from proxy.store import records as rec
from proxy.store.base import HasHealth, Store

log = logging.getLogger("tlsedge.cluster")

HEARTBEAT = 5.0  # seconds between two writes of a node record


class NodeRecord(rec.Record, frozen=True):
    name: str
    host: str
    pid: int
    started_at: float
    heartbeat_at: float
    applied_revision: int
    interval: float = HEARTBEAT


def node_key(name: str) -> str:
    return rec.NODES + name


async def announce(store: Store, name: str, applied: Callable[[], int],
                   stop: asyncio.Event, *, interval: float = HEARTBEAT) -> None:
    """Keep `nodes/<name>` current until `stop`, then remove it. Also sets the watch-lag
    gauge. A store outage is logged once per outage and retried at the next beat."""
    started = time.time()
    failing = False
    while not stop.is_set():
        try:
            revision = await store.revision()
            metrics.STORE_WATCH_LAG.set(max(0, revision - applied()))
            record = NodeRecord(name=name, host=socket.gethostname(), pid=os.getpid(),
                                started_at=started, heartbeat_at=time.time(),
                                applied_revision=applied(), interval=interval)
            await store.put(node_key(name), rec.encode(record))
            if failing:
                log.info("store reachable again; node record %s updated", name)
            failing = False
        except StoreError as exc:
            if not failing:
                log.warning("cannot write this node's record (retrying every %.0fs): %s",
                            interval, exc)
            failing = True
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval)
    with contextlib.suppress(StoreError):
        await store.delete(node_key(name))


def _age(seconds: float) -> str:
    return f"{seconds:.0f}s" if seconds < 120 else f"{seconds / 60:.0f}m"


async def status_lines(store: Store, *, now: float | None = None) -> list[str]:
    """What `tlsedge cluster status` prints: one line per fact."""
    now = time.time() if now is None else now
    lines = []
    revision = await store.revision()
    if isinstance(store, HasHealth):
        lines.append(await store.health())
    lines.append(f"store revision: {revision}")
    nodes = []
    for item in await store.scan(rec.NODES):
        try:
            nodes.append(msgspec.json.decode(item.value, type=NodeRecord))
        except msgspec.ValidationError:
            lines.append(f"  unreadable node record {item.key}")
    lines.append(f"nodes: {len(nodes)}")
    for node in nodes:
        silent = now - node.heartbeat_at
        state = "up" if silent < 3 * node.interval else f"DOWN (silent for {_age(silent)})"
        lines.append(f"  {node.name:<20} {state:<8} applied {node.applied_revision} "
                     f"(behind {max(0, revision - node.applied_revision)}), "
                     f"pid {node.pid} on {node.host}, up {_age(now - node.started_at)}")
    held = []
    for item in await store.scan(rec.LOCKS):
        try:
            record = json.loads(item.value)
        except ValueError:
            record = {}
        expires = record.get("expires")  # files: the holder's deadline; etcd: a lease
        if isinstance(expires, float | int) and expires <= now:
            continue
        held.append(f"  {item.key[len(rec.LOCKS):]:<40} held by {record.get('holder', '?')} "
                    f"(token {item.revision})")
    lines.append(f"locks held: {len(held)}")
    lines.extend(held)
    return lines


async def print_status(config: Config) -> None:
    from proxy.store import open_store

    store = open_store(config)
    try:
        for line in await status_lines(store):
            print(line)
    finally:
        await store.close()
