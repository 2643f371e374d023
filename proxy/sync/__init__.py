"""Sources -> immutable snapshots (CertTable, RouteTable, challenges) ready to swap in.

Two sources: the config file with its certificate files (re-read on SIGHUP) and the
store (followed with a watch). A snapshot is built whole and validated before
anyone sees it; a failure raises and leaves whatever is serving untouched. Nothing
here swaps: the composition root assigns the result. Never imports the data plane.
"""

from proxy.sync.compose import (
    Composed,
    Composer,
    Snapshot,
    compose,
    compose_apps,
    compose_routes,
    load_static,
    route_domains,
    tls_settings,
)
from proxy.sync.entries import DomainSlot, Resident, StoredEntry
from proxy.sync.follow import SlotLoader, StoreFollower
from proxy.sync.state import CertBrief, StatusBrief, StoreState, load_state, store_expiry

__all__ = ["CertBrief", "Composed", "Composer", "DomainSlot", "Resident", "SlotLoader",
           "Snapshot", "StatusBrief", "StoreFollower", "StoreState", "StoredEntry",
           "compose", "compose_apps", "compose_routes", "load_state", "load_static",
           "route_domains", "store_expiry", "tls_settings"]
