"""Which node of a cluster orders a domain first: rendezvous hashing over the live nodes.

Every node's lifecycle sees every domain fall due (a bulk add, a renewal date) at the
same moment. Without a rule, each of N nodes checks its DNS, reads its records and
tries its lock, and N - 1 of them lose: N times the reads and DNS queries for one
order, on the machines that also serve. Here each domain has one first node: the live
node (its `nodes/<name>` record beaten recently, running a lifecycle) with the highest
hash of (node, domain), so shares are even and move only for the domains of a node
that comes or goes. The other nodes hold a due domain back for `grace` seconds from
the moment it fell due and then work on it as before (the lock still decides): a
first node that died or is stuck costs that delay, never the certificate. A node
missing three heartbeats is not live, so its domains go to the others at once.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable

import msgspec

from proxy.cluster import NodeRecord
from proxy.errors import StoreError
from proxy.store import records as rec
from proxy.store.base import Store

log = logging.getLogger("tlsedge.lifecycle")

MISSED_BEATS = 3  # a node whose record is older than this many intervals is gone


def _rank(node: str, name: str) -> bytes:
    # Stable across processes and machines (Python's hash() is salted per process).
    return hashlib.blake2b(f"{node}\0{name}".encode(), digest_size=8).digest()


class Shares:
    """This node's view of who goes first; refreshed from the node records."""

    def __init__(self, store: Store, node: str, *, grace: float,
                 clock: Callable[[], float], refresh: float = 5.0) -> None:
        self.store = store
        self.node = node
        self.grace = grace
        self.clock = clock
        self.refresh_every = refresh
        self.others: tuple[str, ...] = ()  # live nodes that order, besides this one
        self._read_at: float | None = None
        self._failing = False

    async def refresh(self) -> None:
        """Read the node records again when the last read is `refresh` seconds old. A
        store that cannot be read leaves the last view (the lock still decides)."""
        now = self.clock()
        if self._read_at is not None and now - self._read_at < self.refresh_every:
            return
        self._read_at = now
        try:
            items = await self.store.scan(rec.NODES)
        except StoreError as exc:
            if not self._failing:
                log.warning("cannot read the node records (orders go on): %s", exc)
            self._failing = True
            return
        self._failing = False
        live = []
        for item in items:
            try:
                node = msgspec.json.decode(item.value, type=NodeRecord)
            except msgspec.DecodeError:
                continue
            if (node.orders and node.name != self.node
                    and now - node.heartbeat_at <= MISSED_BEATS * node.interval):
                live.append(node.name)
        self.others = tuple(sorted(live))

    def first(self, name: str) -> bool:
        """Whether this node goes first for `name` (always, with no other live node)."""
        others = self.others
        if not others:
            return True
        mine = _rank(self.node, name)
        return all(_rank(node, name) < mine for node in others)


__all__ = ["Shares"]
