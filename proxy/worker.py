"""Composition of one data-plane worker process: snapshots in, listeners out.

Builds the static snapshot (config + certificate files) and follows the store,
composes both into the tables the listeners read, and swaps them in with one
assignment each. SIGHUP re-reads the static side; SIGTERM drains. Nothing here
runs per request or per handshake.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import logging
import os
import signal
import socket
import time
from collections.abc import Callable
from typing import Any

from proxy import metrics
from proxy.certs.table import CertSelector, ContextCache, install_sni_unraisable_hook
from proxy.certs.tls import base_context
from proxy.config import parse_address
from proxy.dataplane.server import TrustedSources, Worker
from proxy.dataplane.state import Live
from proxy.errors import StoreError, TlsEdgeError
from proxy.store import open_store
from proxy.store import records as rec
from proxy.store.base import Store
from proxy.sync import (
    Composed,
    Composer,
    Resident,
    SlotLoader,
    Snapshot,
    SnapshotReader,
    StoreFollower,
    StoreState,
    load_state,
    load_static,
)

log = logging.getLogger("tlsedge.worker")
CATCH_UP = 10.0  # seconds a restarted worker may replay changes before it serves anyway


def _die_with_parent() -> None:
    """Linux: get SIGTERM when the supervisor dies, so no worker is orphaned."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class WorkerNode:
    """The swappable state of one worker and the code that swaps it."""

    def __init__(self, config_path: str, static: Snapshot, store: Store,
                 state: StoreState) -> None:
        self.config_path = config_path
        self.static = static
        self.store = store
        self.state = state
        self._timer: asyncio.TimerHandle | None = None
        self._armed: float | None = None
        self._reloading: asyncio.Task[None] | None = None
        self._reload_again = False
        # Told the new ALPN list when a reload changes it (the listeners' Worker).
        self.alpn_changed: Callable[[tuple[str, ...]], None] | None = None
        self.cache = ContextCache(static.tls, static.config.tls.context_cache_size)
        self.composer = Composer()
        composed = self.composer.full(static, state)
        selector = CertSelector(composed.certs, self.cache)
        config = static.config
        _, https_port = parse_address(config.listen.listener("https").address,
                                      where="listen.https")
        self.live = Live(selector=selector, tls_context=self._base(selector),
                         routes=composed.routes, limits=config.limits, https_port=https_port,
                         handshake_timeout=config.tls.handshake_timeout,
                         challenges=composed.challenges,
                         trusted_proxies=config.trusted_proxies,
                         reject_misdirected=config.tls.reject_misdirected,
                         access_log=config.access_log)
        self.live.challenge_fallback = self._challenge_from_store
        self.loader = SlotLoader(store, state, self._rearm)
        self.live.prepare_certificate = self.loader.prepare
        self.live.all_resident = self._all_resident
        self._arm(composed.next_change)

    def _all_resident(self) -> bool:
        """Every store domain holds a loaded slot, and will: no handshake needs a read
        first, nor a use noted (the resident slots' LRU order matters past capacity)."""
        state = self.state
        count = state.domain_count()
        return count <= state.resident.capacity and len(state.resident.slots) >= count

    def _base(self, selector: CertSelector) -> Any:
        ctx = base_context(self.static.tls)
        ctx.sni_callback = selector.sni_callback
        return ctx

    def recompose(self) -> None:
        """New tables from a new static snapshot and the store state; swap."""
        self._swap(self.composer.restatic(self.static, self.state))

    def apply_store_changes(self) -> None:
        """After a batch of store events: re-index only the domains they added or
        removed; swap. Load new domains' certificates while there is room."""
        self._swap(self.composer.update(self.static, self.state))
        self.loader.load_fresh()

    def _validity_changed(self) -> None:
        """A resident certificate started or stopped being valid: re-pick in place."""
        self._timer = None
        self.state.rechoose(time.time())
        self._arm(self.state.next_change)

    def _swap(self, composed: Composed) -> None:
        live = self.live
        live.selector.swap(composed.certs)
        live.routes = composed.routes
        live.challenges = composed.challenges
        metrics.STORE_APPLIED_REVISION.set(self.state.revision)
        self._arm(composed.next_change)

    def _rearm(self) -> None:
        """Certificates were loaded: move the timer earlier if one of them needs it."""
        when = self.state.next_change
        if when is not None and (self._armed is None or when < self._armed):
            self._arm(when)

    def _arm(self, when: float | None) -> None:
        """Recompose when a certificate starts or stops being valid (expiry fallback)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._armed = when
        if when is not None:
            loop = asyncio.get_running_loop()
            delay = max(0.0, when - time.time()) + 0.001
            self._timer = loop.call_later(min(delay, 86400.0), self._validity_changed)

    def reload(self) -> None:
        """SIGHUP: re-read config and certificate files in a thread (parsing a thousand
        bundles takes ~150 ms: on the loop that was a 285 ms p99 spike for every
        request in flight, measured), then swap on the loop only if all of it is valid.
        Signals arriving during a reload coalesce into one more reload."""
        if self._reloading is not None and not self._reloading.done():
            self._reload_again = True
            return
        self._reloading = asyncio.get_running_loop().create_task(self._reload(),
                                                                 name="reload")

    async def _reload(self) -> None:
        while True:
            self._reload_again = False
            try:
                static = await asyncio.to_thread(load_static, self.config_path)
            except TlsEdgeError as exc:
                metrics.RELOADS.labels("failed").inc()
                log.error("reload failed, still serving the previous config: %s", exc,
                          extra={"reason": str(exc)})
            else:
                self._apply(static)
            if not self._reload_again:
                return

    def _apply(self, static: Snapshot) -> None:
        alpn = self.static.tls.alpn
        if static.tls != self.static.tls:
            # TLS policy changed: new base context and cache (rebuilt lazily).
            self.cache = ContextCache(static.tls, static.config.tls.context_cache_size)
            selector = CertSelector(self.live.selector.table, self.cache)
            self.live.selector = selector
            self.static = static
            self.live.tls_context = self._base(selector)
        # Ops certificates the new config no longer lists (rotated files): their
        # contexts serve nothing new, so they leave the cache now, not by LRU.
        kept = {entry.context_key for entry in static.static_entries}
        self.cache.forget(entry.context_key for entry in self.static.static_entries
                          if entry.context_key not in kept)
        self.static = static
        self.live.limits = static.config.limits
        self.live.reject_misdirected = static.config.tls.reject_misdirected
        self.recompose()
        if static.tls.alpn != alpn and self.alpn_changed is not None:
            self.alpn_changed(static.tls.alpn)  # connections open now negotiated the old
        metrics.RELOAD_LAST_SUCCESS.set(time.time())
        log.info("reloaded: %d certificate names, %d apps, %d domains",
                 len(self.live.selector.table), len(self.live.routes.apps),
                 len(self.live.routes.domains))

    async def _challenge_from_store(self, token: str) -> str | None:
        """A token written a moment ago may not have reached our watch yet."""
        try:
            item = await self.store.get(rec.challenge_key(token))
        except StoreError:
            return None
        return item.value.decode() if item is not None else None


async def _start_state(store: Store, resident: int, snapshot: SnapshotReader | None
                       ) -> tuple[StoreState, bool]:
    """The state to serve from: the supervisor's snapshot (names and routes; whether its
    certificates are still to come), or a read of the store when there is none."""
    if snapshot is not None:
        loop = asyncio.get_running_loop()
        state = StoreState(resident=Resident(resident))
        try:
            started = time.monotonic()
            section = await loop.run_in_executor(None, snapshot.next_section)
            if section is not None:
                snapshot.names(section, state)
                log.info("%d domains from the supervisor's snapshot (revision %d) in %.2f s",
                         state.domain_count(), state.revision, time.monotonic() - started)
                return state, True
            log.warning("the supervisor's snapshot was not handed over; reading the store")
        except (OSError, ValueError) as exc:
            log.warning("the supervisor's snapshot cannot be read (%s); reading the store",
                        exc)
        snapshot.close()
    return await load_state(store, resident=resident, certificates=False), False


async def _certificates(node: WorkerNode, snapshot: SnapshotReader | None,
                        from_snapshot: bool) -> None:
    """Within the resident limit, every certificate, once the listeners serve: from the
    snapshot's sections as the supervisor publishes them, else from the store."""
    if not from_snapshot or snapshot is None:
        await node.loader.warm()
        return
    started = time.monotonic()
    try:
        filled = await node.loader.fill_from(snapshot)
    finally:
        snapshot.close()
    if filled is not None:
        log.info("%d certificates from the supervisor's snapshot in %.2f s", filled,
                 time.monotonic() - started)


async def serve(config_path: str, https_fd: int, http_fd: int, ready_fd: int,
                snapshot_fd: int = -1, sections_fd: int = -1) -> int:
    static = load_static(config_path)
    store = open_store(static.config)
    snapshot = SnapshotReader(snapshot_fd, sections_fd) if snapshot_fd >= 0 else None
    state, from_snapshot = await _start_state(
        store, static.config.store.resident_certificates, snapshot)
    node = WorkerNode(config_path, static, store, state)
    # What start-up built lives as long as the worker: out of the collector's sight, a
    # full collection no longer walks a million domains' objects (a pause for every
    # request in flight).
    gc.freeze()
    # From the snapshot's revision on; a certificate changed meanwhile is left to a read
    # of its own by the fill (StoreState.filling).
    state.filling = set()
    follower = StoreFollower(store, state, node.apply_store_changes)
    follow = asyncio.create_task(follower.run(), name="store-follower")
    if snapshot is not None and snapshot.applied > state.revision:
        # A restart, from a snapshot older than what the node serves: catch up first.
        started = time.monotonic()
        if not await follower.reach(snapshot.applied, CATCH_UP):
            log.warning("still behind the node's revision %d after %.0f s; serving from %d",
                        snapshot.applied, CATCH_UP, state.revision)
        log.info("caught up from the snapshot's revision to %d in %.2f s", state.revision,
                 time.monotonic() - started)
    listen = static.config.listen  # read at start, like the sockets (a restart changes it)
    worker = Worker(node.live, socket.socket(fileno=https_fd), socket.socket(fileno=http_fd),
                    https_proxy=TrustedSources.of(listen.listener("https")),
                    http_proxy=TrustedSources.of(listen.listener("http")))
    await worker.start()
    node.alpn_changed = worker.alpn_changed
    metrics.watch_loop(asyncio.get_running_loop())  # stalls from here on are someone's wait
    warm = asyncio.create_task(_certificates(node, snapshot, from_snapshot),
                               name="read-certificates")
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def on_term() -> None:
        if stop.is_set():
            os._exit(1)  # a second signal forces the exit
        stop.set()

    loop.add_signal_handler(signal.SIGTERM, on_term)
    loop.add_signal_handler(signal.SIGINT, on_term)
    loop.add_signal_handler(signal.SIGHUP, node.reload)
    # The gauge is the minimum over live processes ("the stalest worker"): a worker
    # that never set it would report 0 and pin the scrape there.
    metrics.RELOAD_LAST_SUCCESS.set(time.time())
    os.write(ready_fd, b"ready\n")
    os.close(ready_fd)
    await stop.wait()
    await worker.drain(time.monotonic() + node.static.config.limits.drain_timeout)
    follow.cancel()
    warm.cancel()
    await store.close()
    return 0


def run(config_path: str, https_fd: int, http_fd: int, ready_fd: int,
        snapshot_fd: int = -1, sections_fd: int = -1) -> int:
    import uvloop

    _die_with_parent()
    install_sni_unraisable_hook()
    return uvloop.run(serve(config_path, https_fd, http_fd, ready_fd, snapshot_fd,
                            sections_fd))
