"""Sources -> immutable snapshots (CertTable, RouteTable, challenges) ready to swap in.

Two sources: the config file with its certificate files (re-read on SIGHUP) and the
store (read once per node by the supervisor and handed to the workers as a snapshot,
then followed with a watch). A snapshot is built whole and validated before anyone
sees it; a failure raises and leaves whatever is serving untouched. Nothing here
swaps: the composition root assigns the result. Never imports the data plane.
"""

from proxy.sync.briefs import UNCOUNTED, BriefState, CertBrief, DomainBrief, Tally, View
from proxy.sync.compose import (
    Composed,
    Composer,
    Snapshot,
    StoreNames,
    compose,
    compose_apps,
    compose_routes,
    load_static,
    route_domains,
    tls_settings,
)
from proxy.sync.entries import DomainSlot, Resident, StoredEntry
from proxy.sync.follow import SlotLoader, StoreFollower
from proxy.sync.snapshot import SnapshotFile, SnapshotKeeper, SnapshotReader, read_node
from proxy.sync.state import StoreState, load_state, trim_heap

__all__ = [
    "UNCOUNTED",
    "BriefState",
    "CertBrief",
    "Composed",
    "Composer",
    "DomainBrief",
    "DomainSlot",
    "Resident",
    "SlotLoader",
    "Snapshot",
    "SnapshotFile",
    "SnapshotKeeper",
    "SnapshotReader",
    "StoreFollower",
    "StoreNames",
    "StoreState",
    "StoredEntry",
    "Tally",
    "View",
    "compose",
    "compose_apps",
    "compose_routes",
    "load_state",
    "load_static",
    "read_node",
    "route_domains",
    "tls_settings",
    "trim_heap",
]
