"""Composition root: the supervisor process and the data-plane worker processes.

The supervisor binds the listening sockets, serves /metrics, validates reloads and
spawns N workers (fresh interpreters that inherit the sockets); each worker builds
its own snapshots and serves. Signal handlers only set state; shutdown has a
deadline; a second SIGTERM/SIGINT forces the exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING

from proxy import config as config_mod
from proxy import metrics
from proxy.config import Config, parse_address
from proxy.errors import TlsEdgeError
from proxy.registry import Registry, view_status
from proxy.store import check_store, open_store
from proxy.store import records as rec
from proxy.store.base import Store
from proxy.sync import StoreFollower, StoreState, load_state, load_static, store_expiry

if TYPE_CHECKING:
    from proxy.admin.server import AdminServer
    from proxy.lifecycle.domains import Lifecycle

log = logging.getLogger("tlsedge")


def setup_logging(level: str = "info") -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s",
        stream=sys.stderr,
    )


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


def _listen_socket(address: str, *, reuse_port: bool) -> socket.socket:
    host, port = parse_address(address, where="listen")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise TlsEdgeError(f"cannot listen on {address}: {exc.strerror}") from None
    sock.listen(1024)
    sock.set_inheritable(True)
    sock.setblocking(False)
    return sock


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
        self.https = [_listen_socket(config.listen.https, reuse_port=reuse)
                      for _ in range(self.count)]
        self.http = [_listen_socket(config.listen.http, reuse_port=reuse)
                     for _ in range(self.count)]
        self.procs: list[asyncio.subprocess.Process | None] = [None] * self.count
        self.stopping = False
        self._metrics_server: object | None = None
        self.store: Store | None = None
        # What /metrics reports about certificates and domains: replaced whole after
        # each store change (the scrape runs in another thread and only reads).
        self.store_state: StoreState | None = None  # the supervisor's: metadata only
        self.domain_counts: dict[tuple[str, str], int] = {}
        self.lifecycle: Lifecycle | None = None
        # Bound now, so a busy port or a bad token file stops the start before any
        # worker runs; served from _node_tasks (it needs the store).
        self.admin: AdminServer | None = None
        if config.listen.admin is not None:
            from proxy.admin import server as admin_server

            self.admin = admin_server.AdminServer(config)

    def expiry(self) -> list[tuple[str, str, float]]:
        """(primary name, source, not_after) of every certificate served, at scrape time:
        computed per scrape rather than per store event (O(domains) either way)."""
        found = self.snapshot.expiry()
        if self.store_state is not None:
            found += store_expiry(self.store_state, time.time())
        return found

    def start_metrics(self) -> None:
        address = self.snapshot.config.listen.metrics
        if address is None:
            return
        from prometheus_client import CollectorRegistry, start_http_server
        from prometheus_client.multiprocess import MultiProcessCollector

        registry = CollectorRegistry()
        MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        registry.register(metrics.CertificateExpiry(self.expiry))
        registry.register(metrics.DomainCertificates(
            lambda: (self.domain_counts, self.expiry()), time.time))
        host, port = parse_address(address, where="listen.metrics")
        try:
            self._metrics_server = start_http_server(port, addr=host, registry=registry)
        except OSError as exc:
            raise TlsEdgeError(f"cannot listen on {address}: {exc.strerror}") from None

    async def _spawn(self, index: int) -> None:
        read_fd, write_fd = os.pipe()
        https_fd = self.https[index].fileno()
        http_fd = self.http[index].fileno()
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "proxy.cli", "worker", "-c", self.config_path,
            "--https-fd", str(https_fd), "--http-fd", str(http_fd),
            "--ready-fd", str(write_fd),
            pass_fds=(https_fd, http_fd, write_fd))
        os.close(write_fd)
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
        """Restart a worker that died, with a short backoff."""
        delay = 0.5
        while not self.stopping:
            proc = self.procs[index]
            assert proc is not None
            code = await proc.wait()
            self._mark_dead(proc.pid)
            if self.stopping:
                return
            log.error("worker %d (pid %d) exited with status %s; restarting", index,
                      proc.pid, code)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 30.0)
            try:
                await self._spawn(index)
                delay = 0.5
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
            log.error("reload refused, still serving the previous config: %s", exc)
            sd_notify("READY=1")
            return str(exc)
        old = self.snapshot.config
        new = snapshot.config
        if (new.listen, new.workers) != (old.listen, old.workers):
            log.warning("listen addresses and worker count change only on restart")
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
        forced = False

        def on_term() -> None:
            nonlocal forced
            if stop.is_set():
                forced = True
                for proc in self.procs:
                    if proc is not None and proc.returncode is None:
                        proc.kill()
                os._exit(1)
            stop.set()

        loop.add_signal_handler(signal.SIGTERM, on_term)
        loop.add_signal_handler(signal.SIGINT, on_term)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        # Fail in one clear line when the store (etcd) cannot be reached, before any
        # worker tries and dies with a less telling message.
        self.store = open_store(self.snapshot.config)
        try:
            await check_store(self.store)
        except TlsEdgeError:
            await self.store.close()
            raise
        try:
            await asyncio.gather(*(self._spawn(i) for i in range(self.count)))
        except TlsEdgeError:
            stop.set()
            await self._stop_workers()
            raise
        metrics.RELOAD_LAST_SUCCESS.set(time.time())
        watchers = [asyncio.create_task(self._watch(i), name=f"watch-worker-{i}")
                    for i in range(self.count)]
        log.info("serving https on %s, http on %s with %d worker(s)",
                 self.snapshot.config.listen.https, self.snapshot.config.listen.http,
                 self.count)
        watchers += await self._node_tasks(stop)
        sd_notify("READY=1")
        if self.on_ready is not None:
            self.on_ready()
        await stop.wait()
        sd_notify("STOPPING=1")
        self.stopping = True
        await self._stop_workers()
        for task in watchers:
            task.cancel()
        if self.store is not None:
            await self.store.close()
        return 0

    async def _node_tasks(self, stop: asyncio.Event) -> list[asyncio.Task[None]]:
        """Follow the store (for metrics) and run this node's certificate lifecycle."""
        config = self.snapshot.config
        store = self.store = self.store or open_store(config)
        # Metadata only (no PEM): the supervisor serves no TLS. Its load runs after the
        # workers are ready, off the path to the first handshake.
        state = self.store_state = await load_state(store, with_pem=False)
        views: dict[str, tuple[str, str]] = {}  # domain -> (in_use, status) as counted
        counts: dict[tuple[str, str], int] = {}

        def recount(name: str, now: float) -> None:
            old = views.pop(name, None)
            if old is not None:
                counts[old] -= 1
                if not counts[old]:
                    del counts[old]
            domain = state.domains.get(name)
            if domain is not None:
                status = state.statuses.get(name)
                key = views[name] = view_status(
                    domain.letsencrypt, state.certs.get(rec.cert_key(name, "custom")),
                    state.certs.get(rec.cert_key(name, "acme")),
                    status.state if status is not None else "pending_dns", now)
                counts[key] = counts.get(key, 0) + 1

        def changed() -> None:
            """After a batch of store events: recount only the domains they named (all
            of them after a reload), and tell the lifecycle which ones to look at."""
            now = time.time()
            touched, state.touched = state.touched, set()
            if state.reset:
                state.reset = False
                views.clear()
                counts.clear()
                touched = set(state.domains)
            for name in touched:
                recount(name, now)
            self.domain_counts = dict(counts)
            if self.lifecycle is not None:
                self.lifecycle.notify(touched)

        changed()
        state_follower = StoreFollower(store, state, changed)
        tasks = [asyncio.create_task(state_follower.run(), name="supervisor-store")]
        if config.store.backend == "etcd":
            from proxy import cluster

            tasks.append(asyncio.create_task(
                cluster.announce(store, config.node.name, lambda: state.revision, stop),
                name="node-record"))
        if config.acme is not None:
            tasks.append(asyncio.create_task(self._lifecycle(store, config, stop),
                                             name="lifecycle"))
        if self.admin is not None:
            def registry() -> Registry:  # per request: apps follow config reloads
                current = self.snapshot.config
                return Registry(store, platform_domain=current.platform_domain,
                                apps=current.apps.keys())

            tasks.append(asyncio.create_task(self.admin.serve(registry, self.reload),
                                             name="admin"))
        return tasks

    async def _lifecycle(self, store: Store, config: Config, stop: asyncio.Event) -> None:
        from proxy.lifecycle.acme import AcmeClient, AcmeSettings
        from proxy.lifecycle.dnscheck import DnsChecker, DnsSettings
        from proxy.lifecycle.domains import Lifecycle, LifecycleSettings

        acme = config.acme
        assert acme is not None
        client = AcmeClient(AcmeSettings(directory=acme.directory, email=acme.email,
                                         ca_bundle=acme.ca_bundle, key_type=acme.key_type))
        dns = DnsChecker(DnsSettings(edge_addresses=acme.dns.edge_addresses,
                                     cname_targets=acme.dns.cname_targets,
                                     resolvers=acme.dns.resolvers))
        registry = Registry(store, platform_domain=config.platform_domain,
                            apps=config.apps.keys())
        lifecycle = self.lifecycle = Lifecycle(store, registry, client, dns, LifecycleSettings(
            check_interval=acme.dns.check_interval, concurrency=acme.concurrency,
            lock_ttl=acme.lock_ttl, rescan=300.0))
        try:
            await lifecycle.run(stop)
        finally:
            client.close()

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

    supervisor = Supervisor(config_path, on_ready=on_ready)
    setup_logging(supervisor.snapshot.config.log_level)
    supervisor.start_metrics()
    return uvloop.run(supervisor.run())


def check_config(config_path: str) -> Config:
    """Validate a config and every certificate it names (what ExecReload runs)."""
    return load_static(config_path).config


# -- store and registry for the CLI and the admin API ------------------------------------

@contextlib.asynccontextmanager
async def registry_for(config_path: str) -> AsyncIterator[Registry]:
    config = config_mod.load(config_path)
    store = open_store(config)
    try:
        yield Registry(store, platform_domain=config.platform_domain, apps=config.apps.keys())
    finally:
        await store.close()
