"""Composition root: the supervisor process and the data-plane worker processes.

The supervisor binds the listening sockets, serves /metrics, validates reloads and
spawns N workers (fresh interpreters that inherit the sockets); each worker builds
its own snapshots and serves. Signal handlers only set state; shutdown has a
deadline; a second SIGTERM/SIGINT forces the exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from proxy import config as config_mod
from proxy import logs, metrics, pidfile, preflight
from proxy.config import Config, parse_address
from proxy.errors import ConfigError, TlsEdgeError
from proxy.listing import WriteTracking
from proxy.registry import Registry, view_status
from proxy.store import check_store, open_store
from proxy.store.base import Store
from proxy.sync import (
    UNCOUNTED,
    BriefState,
    DomainBrief,
    SnapshotKeeper,
    StoreFollower,
    View,
    load_static,
    trim_heap,
)

if TYPE_CHECKING:
    from proxy.admin.server import AdminServer
    from proxy.lifecycle.domains import Lifecycle

log = logging.getLogger("tlsedge")


def sd_notify(message: str) -> None:
    """Tell systemd (Type=notify) about readiness; a no-op outside systemd."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.connect(address)
        s.sendall(message.encode())


def _listen_socket(address: str, *, reuse_port: bool, key: str) -> socket.socket:
    host, port = parse_address(address, where=key)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        # "[::]:443" takes IPv4 too (as ::ffff:a.b.c.d), whatever net.ipv6.bindv6only
        # says; a specific IPv6 address takes only itself anyway.
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise TlsEdgeError(f"{key}: cannot listen on {address}: {exc.strerror}") from None
    sock.listen(1024)
    sock.set_inheritable(True)
    sock.setblocking(False)
    return sock


def domain_view(*, acme_on: bool) -> Callable[[DomainBrief, float], View]:
    """The view rule every view uses (registry.view_status), over the supervisor's
    briefs: (certificate in use, status)."""
    def classify(brief: DomainBrief, now: float) -> View:
        return view_status(brief.letsencrypt, brief.custom, brief.acme,
                           brief.state or "pending_dns", now, acme_on=acme_on)
    return classify


class DomainCounts:
    """The domains by (certificate in use, status) that /metrics reports, kept by the
    supervisor's BriefState as store events change them (sync/briefs.py: no walk over
    the domains per batch or per scrape), and one log line per domain whose presence,
    certificate in use or status changed in the store (from this node's CLI, admin API
    or lifecycle, or another node's).
    """

    def __init__(self, state: BriefState) -> None:
        self.state = state

    @property
    def counts(self) -> dict[View, int]:
        """A copy made in one C call: the scrape runs in another thread."""
        return dict(self.state.tally.views)

    def changed(self) -> set[str]:
        """After a batch of store events, and once the start-up read is done: log the
        domains whose view changed, those changed during the start-up read included
        (not after a re-read of the whole store, which is no change to log); returns
        the domains the batch named."""
        state = self.state
        if state.loading is not None:  # the start-up read: logged once it is done
            return set(state.touched)
        touched, state.touched = state.touched, {}
        if state.reset:
            state.reset = False
            return set(touched)
        for name, old in touched.items():
            brief = state.domains.get(name)
            new = brief.view if brief is not None and brief.app is not None else None
            if old is UNCOUNTED and new is not None:
                continue  # changed while the start-up read went on: its view before is unknown
            if new != old:
                _log_change(name, old if isinstance(old, tuple) else None, new,
                            brief.app or "" if brief is not None else "")
        return set(touched)


async def _after(reading: asyncio.Task[None], start: Callable[[], Awaitable[None]]) -> None:
    """`start` once the node's store read is done (run() stops the node if it fails)."""
    await asyncio.shield(reading)
    await start()


def _log_change(name: str, old: View | None, new: View | None, app_name: str) -> None:
    fields = {"domain": name, "app": app_name}
    if new is None:
        log.info("domain %s removed", name, extra=fields)
    elif old is None:
        log.info("domain %s added to %s (certificate in use: %s, status: %s)", name,
                 app_name, *new, extra={**fields, "in_use": new[0], "status": new[1]})
    else:
        log.info("domain %s now serves the %s certificate (status: %s)", name, *new,
                 extra={**fields, "in_use": new[0], "status": new[1]})


# -- supervisor -----------------------------------------------------------------------

class Supervisor:
    """One per node: owns the sockets, the workers, /metrics and the reload gate."""

    def __init__(self, config_path: str, *, on_ready: Callable[[], None] | None = None) -> None:
        self.config_path = config_path
        self.snapshot = load_static(config_path)
        self.on_ready = on_ready
        config = self.snapshot.config
        self.count = config.worker_count
        reuse = self.count > 1
        # One socket per worker with SO_REUSEPORT: the kernel spreads connections
        # evenly (a shared socket wakes one busy worker most of the time). The
        # supervisor keeps them, so a restarted worker inherits its queue.
        self.https = [_listen_socket(config.listen.listener("https").address,
                                     reuse_port=reuse, key="listen.https")
                      for _ in range(self.count)]
        self.http = [_listen_socket(config.listen.listener("http").address, reuse_port=reuse,
                                    key="listen.http") for _ in range(self.count)]
        self.procs: list[asyncio.subprocess.Process | None] = [None] * self.count
        self.stopping = False
        self._metrics_server: object | None = None
        self.store: Store | None = None
        # What /metrics reports about certificates and domains: replaced whole after
        # each store change (the scrape runs in another thread and only reads).
        self.store_state: BriefState | None = None  # the supervisor's: metadata only
        self.domains: DomainCounts | None = None
        # The workers' snapshot of the store (one read per node: sync/snapshot.py).
        self.keeper: SnapshotKeeper | None = None
        self.lifecycle: Lifecycle | None = None
        # Bound now, so a busy port or a bad token file stops the start before any
        # worker runs; served from _node_tasks (it needs the store).
        self.admin: AdminServer | None = None
        if config.listen.admin is not None:
            from proxy.admin import server as admin_server

            try:
                self.admin = admin_server.AdminServer(config)
            except TlsEdgeError as exc:
                raise type(exc)(f"listen.admin: {exc}" if str(exc).startswith("cannot listen")
                                else str(exc)) from None
            logs.add_secret_file(config.admin.token_file)

    def expiry_held(self) -> list[metrics.Held]:
        """(primary name, source, role, not_after): every certificate of the config, and
        the store's soonest of each source and role, at scrape time."""
        found = [(name, source, "serving", not_after)
                 for name, source, not_after in self.snapshot.expiry()]
        if self.store_state is not None:
            found += self.store_state.tally.held()
        return found

    def expiry_hours(self) -> list[metrics.Hours]:
        """(source, role, hour, count) of every certificate held, serving or standby,
        from the counts the supervisor keeps (never a walk over the domains)."""
        found = [(source, "serving", int(not_after // 3600), 1)
                 for _, source, not_after in self.snapshot.expiry()]
        if self.store_state is not None:
            found += self.store_state.tally.hours()
        return found

    def start_metrics(self) -> None:
        address = self.snapshot.config.listen.metrics
        if address is None:
            return
        from prometheus_client import CollectorRegistry, start_http_server
        from prometheus_client.multiprocess import MultiProcessCollector

        registry = CollectorRegistry()
        MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        metrics.zero_known_children()
        registry.register(metrics.CertificateExpiry(
            self.expiry_held, self.expiry_hours, time.time,
            self.snapshot.config.metrics.certificate_series))
        registry.register(metrics.DomainCertificates(
            lambda: self.domains.counts if self.domains is not None else {}))
        host, port = parse_address(address, where="listen.metrics")
        try:
            self._metrics_server = start_http_server(port, addr=host, registry=registry)
        except OSError as exc:
            raise TlsEdgeError(f"listen.metrics: cannot listen on {address}: "
                               f"{exc.strerror}") from None

    async def _spawn(self, index: int) -> None:
        read_fd, write_fd = os.pipe()
        https_fd = self.https[index].fileno()
        http_fd = self.http[index].fileno()
        assert self.keeper is not None and self.store_state is not None
        snapshot_fd, sections_fd = self.keeper.hand_over(self.store_state.revision)
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "proxy.cli", "worker", "-c", self.config_path,
                "--https-fd", str(https_fd), "--http-fd", str(http_fd),
                "--ready-fd", str(write_fd), "--snapshot-fd", str(snapshot_fd),
                "--sections-fd", str(sections_fd),
                pass_fds=(https_fd, http_fd, write_fd, snapshot_fd, sections_fd))
        finally:
            os.close(write_fd)
            os.close(sections_fd)
        self.procs[index] = proc
        loop = asyncio.get_running_loop()
        try:
            line = await loop.run_in_executor(None, os.read, read_fd, 64)
        finally:
            os.close(read_fd)
        if not line:
            code = await proc.wait()
            raise TlsEdgeError(f"worker {index} exited with status {code} before serving")

    async def _watch(self, index: int) -> None:
        """Restart a worker that died: at once (0.1 s; it starts from the store snapshot
        in about a second), then with a backoff doubling to 30 s while it keeps dying
        within a minute of its start."""
        delay = 0.1
        while not self.stopping:
            proc = self.procs[index]
            assert proc is not None
            began = time.monotonic()
            code = await proc.wait()
            self._mark_dead(proc.pid)
            if self.stopping:
                return
            metrics.WORKER_RESTARTS.inc()
            log.error("worker %d (pid %d) exited with status %s; restarting", index,
                      proc.pid, code, extra={"worker": index, "status": code})
            if time.monotonic() - began > 60.0:
                delay = 0.1
            await asyncio.sleep(delay)
            delay = min(delay * 2, 30.0)
            try:
                await self._spawn(index)
            except TlsEdgeError as exc:
                log.error("%s", exc)

    @staticmethod
    def _mark_dead(pid: int) -> None:
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]

    def reload(self) -> str | None:
        """Validate the new config and certificates; only then tell the workers.

        Returns why the reload was refused, or None when it was applied.
        """
        sd_notify("RELOADING=1")
        try:
            snapshot = load_static(self.config_path)
        except TlsEdgeError as exc:
            metrics.RELOADS.labels("failed").inc()
            log.error("reload refused, still serving the previous config: %s", exc,
                      extra={"reason": str(exc)})
            sd_notify("READY=1")
            return str(exc)
        old = self.snapshot.config
        new = snapshot.config
        if (new.listen, new.workers) != (old.listen, old.workers):
            log.warning("listen addresses and worker count change only on restart")
        if new.store != old.store:  # key files too: rotation is a (rolling) restart
            log.warning("store settings change only on restart")
        self.snapshot = snapshot
        for proc in self.procs:
            if proc is not None and proc.returncode is None:
                proc.send_signal(signal.SIGHUP)
        metrics.RELOADS.labels("ok").inc()
        metrics.RELOAD_LAST_SUCCESS.set(time.time())
        log.info("reload accepted; workers are swapping their tables")
        sd_notify("READY=1")
        return None

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()

        def on_term() -> None:
            if stop.is_set():  # the second signal: no drain, exit now
                for proc in self.procs:
                    if proc is not None and proc.returncode is None:
                        proc.kill()
                os._exit(1)
            stop.set()

        loop.add_signal_handler(signal.SIGTERM, on_term)
        loop.add_signal_handler(signal.SIGINT, on_term)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        watchers = await self._start(stop)
        sd_notify("READY=1")
        if self.on_ready is not None:
            self.on_ready()
        await stop.wait()
        sd_notify("STOPPING=1")
        log.info("stopping: listeners closed, workers drain open connections for up to "
                 "%.0f s", self.snapshot.config.limits.drain_timeout)
        self.stopping = True
        await self._stop_workers()
        for task in watchers:
            task.cancel()
        if self.store is not None:
            await self.store.close()
        return 0

    async def _start(self, stop: asyncio.Event) -> list[asyncio.Task[None]]:
        """Check the store, read it once, start the workers on its names and then the
        node tasks; the tasks to cancel at the end."""
        # Fail in one clear line when the store (etcd) cannot be reached, before any
        # worker tries and dies with a less telling message.
        self.store = open_store(self.snapshot.config)
        try:
            await check_store(self.store)
        except TlsEdgeError:
            await self.store.close()
            raise
        # One read of the store: the workers start as soon as it has the names (they
        # serve from its snapshot), the rest of it (certificates, statuses) once they
        # serve.
        serving = asyncio.Event()
        reading = await self._read_store(serving)
        try:
            await asyncio.gather(*(self._spawn(i) for i in range(self.count)))
        except TlsEdgeError:
            stop.set()
            reading.cancel()
            await self._stop_workers()
            raise
        serving.set()
        metrics.RELOAD_LAST_SUCCESS.set(time.time())
        watchers = [asyncio.create_task(self._watch(i), name=f"watch-worker-{i}")
                    for i in range(self.count)]
        listen = self.snapshot.config.listen
        log.info("serving https on %s, http on %s with %d worker(s)",
                 listen.address("https"), listen.address("http"), self.count)
        # The store follower starts now, from the read's revision: a worker restarted
        # meanwhile catches up to what it has applied (SnapshotFile.hand_over).
        watchers += await self._node_tasks(stop, reading)
        try:
            await reading
        except TlsEdgeError:
            stop.set()
            await self._stop_workers()
            for task in watchers:
                task.cancel()
            raise
        return watchers

    async def _read_store(self, serving: asyncio.Event) -> asyncio.Task[None]:
        """Start the node's one read of the store (sync/snapshot.py); return once the
        workers' names are in its snapshot, the read going on in the returned task once
        `serving` is set (it ends with the briefs counted, step by step)."""
        config = self.snapshot.config
        assert self.store is not None
        state = self.store_state = BriefState(domain_view(acme_on=config.acme is not None))
        state.tally.keep = config.metrics.certificate_series
        self.keeper = SnapshotKeeper(self.store, resident=config.store.resident_certificates,
                                     changes=lambda: state.worker_changes)
        names = asyncio.Event()

        async def names_ready() -> None:
            names.set()
            await serving.wait()  # the workers have the CPU until they serve

        async def read() -> None:
            assert self.keeper is not None
            started = time.monotonic()
            await self.keeper.first_read(state, names_ready)
            for _ in state.sweep():
                await asyncio.sleep(0)
            state.loaded()
            if self.domains is not None:  # what changed while it read: logged now
                self.domains.changed()
            trim_heap()  # the pages read are garbage now: give them back
            # Out of the collector's sight: a full collection walked the million-entry
            # maps and sets each time (a 50-200 ms pause for admin and scrape answers).
            gc.freeze()
            log.info("store read: %d domains in %.1f s (revision %d)", state.count,
                     time.monotonic() - started, state.revision)

        started = time.monotonic()
        reading = asyncio.create_task(read(), name="store-read")
        waiting = asyncio.create_task(names.wait())
        await asyncio.wait([reading, waiting], return_when=asyncio.FIRST_COMPLETED)
        waiting.cancel()
        if reading.done() and reading.exception() is not None:
            await reading  # raises: the store could not be read
        log.info("read %d domain names in %.2f s: starting %d worker(s) on them",
                 state.count, time.monotonic() - started, self.count)
        return reading

    async def _node_tasks(self, stop: asyncio.Event, reading: asyncio.Task[None]
                          ) -> list[asyncio.Task[None]]:
        """Follow the store (for metrics) and run this node's certificate lifecycle,
        its node record, its admin API and its snapshot keeper: the tasks the supervisor
        watches. All but the follower start once the store is `read`."""
        config = self.snapshot.config
        store = self.store = self.store or open_store(config)
        state = self.store_state
        keeper = self.keeper
        assert state is not None and keeper is not None
        domains = self.domains = DomainCounts(state)

        def changed() -> None:
            touched = domains.changed()
            if self.lifecycle is not None:  # it looks at the domains the batch named
                self.lifecycle.notify(touched)

        changed()
        starts: dict[str, Callable[[], Awaitable[None]]] = {
            "store-follower": StoreFollower(store, state, changed).run}
        later: dict[str, Callable[[], Awaitable[None]]] = {
            "snapshot": keeper.run, "recount": state.keep_counting}
        if config.store.backend == "etcd":
            from proxy import cluster

            later["node-record"] = lambda: cluster.announce(
                store, config.node.name, lambda: state.revision, stop)
        if config.acme is not None:
            later["lifecycle"] = lambda: self._lifecycle(store, config, stop)
        if self.admin is not None:
            later["admin"] = lambda: self._admin(store)
        for task, start in later.items():
            starts[task] = functools.partial(_after, reading, start)
        for task in starts:
            metrics.NODE_TASK_RESTARTS.labels(task)  # at 0: see zero_known_children
        return [asyncio.create_task(self.supervised(task, start, stop), name=task)
                for task, start in starts.items()]

    async def supervised(self, task: str, start: Callable[[], Awaitable[None]],
                         stop: asyncio.Event) -> None:
        """Run a node task until `stop`, starting it again whenever it dies.

        The node's lifecycle, store follower, node record and admin API run beside the
        workers; one that raised (or returned) used to sit dead until shutdown, and the
        node served on without ordering, renewing or counting anything. Now its death is
        logged with the traceback, counted (tlsedge_node_task_restarts_total{task}) and
        the task started again in place after a backoff (1 s, doubling to 60 s; back to
        1 s once it has run a minute): the workers and their connections are untouched.
        """
        delay = 1.0
        while not stop.is_set():
            began = time.monotonic()
            try:
                await start()
                failure = "ended"
            except Exception as exc:
                failure = f"failed: {type(exc).__name__}: {exc}"
                if not stop.is_set():
                    log.exception("node task %s failed", task)
            if stop.is_set() or self.stopping:
                return
            if time.monotonic() - began > 60.0:
                delay = 1.0
            metrics.NODE_TASK_RESTARTS.labels(task).inc()
            log.error("node task %s %s; starting it again in %.0f s", task, failure, delay)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
            delay = min(delay * 2, 60.0)

    async def _admin(self, store: Store) -> None:
        # The admin's writes are noted: a listing after one waits for the index to have it.
        tracked = WriteTracking(store)

        def registry() -> Registry:  # per request: apps follow config reloads
            found = Registry.for_config(tracked, self.snapshot.config)
            found.index = self.store_state  # listings from the node's index and counts
            return found

        # serve() closes its listener when it ends: a restart binds a new one.
        admin = self.admin
        if admin is None:
            from proxy.admin import server as admin_server

            admin = admin_server.AdminServer(self.snapshot.config)
        self.admin = None
        await admin.serve(registry, self.reload,
                          self._order_queue if self.snapshot.config.acme else None)

    def _order_queue(self) -> list[tuple[str, str, float]]:
        """The lifecycle's waiting orders (Budget.queue), for the dashboard."""
        lifecycle = self.lifecycle
        if lifecycle is None or lifecycle.budget is None:
            return []
        return lifecycle.budget.queue()

    async def _lifecycle(self, store: Store, config: Config, stop: asyncio.Event) -> None:
        from proxy.lifecycle.batching import group_commit
        from proxy.lifecycle.budget import Budget
        from proxy.lifecycle.dnscheck import DnsChecker, DnsSettings
        from proxy.lifecycle.domains import Lifecycle, LifecycleSettings
        from proxy.lifecycle.issuers import Issuers

        acme = config.acme
        assert acme is not None
        store = group_commit(store)  # the puts of orders running at once: one transaction
        issuers = Issuers.from_config(store, acme, lock_ttl=acme.lock_ttl)
        dns = DnsChecker(DnsSettings(edge_addresses=acme.dns.edge_addresses,
                                     cname_targets=acme.dns.cname_targets,
                                     resolvers=acme.dns.resolvers))
        registry = Registry.for_config(store, config)
        dns01 = None
        if acme.dns01 is not None:
            from proxy.lifecycle.dns01 import Dns01, Dns01Settings

            dns01 = Dns01(Dns01Settings.from_config(acme.dns01), dns)
        lifecycle = self.lifecycle = Lifecycle(store, registry, issuers, dns, LifecycleSettings(
            check_interval=acme.dns.check_interval, concurrency=acme.concurrency,
            lock_ttl=acme.lock_ttl, rescan=300.0), dns01=dns01,
            budget=Budget(store, issuers.budgets))
        try:
            await lifecycle.run(stop)
        finally:
            issuers.close()

    async def _stop_workers(self) -> None:
        self.stopping = True
        # The workers share these listening sockets: while our copies stay open the
        # kernel keeps completing handshakes into a backlog no one will serve. Close
        # them first, so a draining node refuses new connections outright.
        for sock in (*self.https, *self.http):
            sock.close()
        grace = self.snapshot.config.limits.drain_timeout + 5.0
        live = [p for p in self.procs if p is not None and p.returncode is None]
        for proc in live:
            proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(asyncio.gather(*(p.wait() for p in live)), grace)
        except TimeoutError:
            for proc in live:
                if proc.returncode is None:
                    proc.kill()
        for proc in live:
            self._mark_dead(proc.pid)


def run_supervisor(config_path: str, *, on_ready: Callable[[], None] | None = None) -> int:
    import uvloop

    config = config_mod.load(config_path)
    logs.setup(config.logging.format, config.logging.level)  # before anything logs
    _refuse(config, preflight.path_problems(config))
    preflight.prepare(config)
    supervisor = Supervisor(config_path, on_ready=on_ready)
    supervisor.start_metrics()
    with pidfile.held(supervisor.snapshot.config):
        return uvloop.run(supervisor.run())


def check_config(config_path: str, *, ports: bool = True) -> Config:
    """Every check `run` makes before it serves that needs no traffic: the config, every
    certificate it names, the folders and files it writes, and (with `ports`, unless a
    live tlsedge of this store holds them) the ports it listens on. What ExecStartPre
    and `tlsedge reload` run. Raises ConfigError naming every problem found."""
    config = load_static(config_path).config
    found = preflight.path_problems(config) + _eab_problems(config)
    if ports and pidfile.live_pid(config) is None:
        found += preflight.port_problems(config)
    _refuse(config, found)
    return config


def _eab_problems(config: Config) -> list[tuple[str, str]]:
    """The External Account Binding key files of acme.issuers, read now: a wrong one is
    refused before the node serves, not when its first order is placed."""
    if config.acme is None or not any(i.eab for i in config.acme.issuers):
        return []
    from proxy.lifecycle.issuers import hmac_key_problem

    return [("acme.eab.hmac_key_file" if config.acme.eab else
             f"acme.issuers[{i}].eab.hmac_key_file", problem)
            for i, issuer in enumerate(config.acme.issuers)
            if issuer.eab is not None
            and (problem := hmac_key_problem(issuer.eab.hmac_key_file)) is not None]


def _refuse(config: Config, found: list[tuple[str, str]]) -> None:
    if found:
        label = config.source.rsplit("/", 1)[-1]
        raise ConfigError("\n".join(f"{label}: {key}: {why}" for key, why in found))
