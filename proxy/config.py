"""Static configuration: YAML -> frozen, typed objects.

Every error names the file and the key path (`config.yaml: tls.platform_certificate.key:
file not found`). Loading reads only the YAML and checks that referenced files exist;
it never parses certificates (that is certs/) and never touches the store.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import msgspec
import yaml

from proxy import names
from proxy.errors import ConfigError, InvalidName


class _Strict(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    pass


class CertFiles(_Strict, frozen=True):
    cert: str
    key: str


class Listen(_Strict, frozen=True):
    https: str = "127.0.0.1:8443"
    http: str = "127.0.0.1:8080"
    metrics: str | None = "127.0.0.1:9100"
    admin: str | None = None


class Tls(_Strict, frozen=True):
    platform_certificate: CertFiles
    certificates: tuple[CertFiles, ...] = ()
    unknown_sni: Literal["platform", "reject"] = "platform"
    # SSLContexts kept built; each costs ~20 kB, so 10,000 is ~200 MB at most.
    context_cache_size: int = 10_000
    # TLS 1.3 session tickets sent after a full handshake. Off by default, measured:
    # sending OpenSSL's default 2 costs ~80 us of CPU per full handshake (one more
    # write and the ticket crypto), while a resumed handshake saves this Python server
    # no CPU and no round trip (TLS 1.3 resumption is 1-RTT like a full handshake).
    session_tickets: int = 0
    handshake_timeout: float = 10.0
    # 421 Misdirected Request when a request's Host is not covered by the certificate
    # the connection's SNI chose.
    reject_misdirected: bool = True


class Store(_Strict, frozen=True):
    backend: Literal["files", "etcd"] = "files"
    path: str = "./tlsedge-data"  # files
    # etcd: "host:port" (or http(s)://host:port); several endpoints must be IPv4 addresses.
    endpoints: tuple[str, ...] = ()
    prefix: str = "/tlsedge/"
    ca: str | None = None
    cert: str | None = None
    key: str | None = None
    username: str | None = None
    password_file: str | None = None
    timeout: float = 5.0
    # Store domains whose certificate records (PEM) a worker keeps in memory, ~1.7 kB
    # each. A store with at most this many domains is read whole at start and every
    # certificate is served through a store outage; past it, a worker reads names and
    # routes at start and a certificate on its name's first handshake (one store read),
    # keeping the most recently used ones.
    resident_certificates: int = 100_000


class Node(_Strict, frozen=True):
    # This node's name in the cluster (`cluster status`, lock holders); default: hostname.
    name: str = ""


class AppConfig(_Strict, frozen=True):
    backends: tuple[str, ...]
    force_https: bool = False
    canonical_domain: str | None = None


class Limits(_Strict, frozen=True):
    request_head_timeout: float = 10.0
    max_head_bytes: int = 65_536
    max_headers: int = 100
    max_body_bytes: int = 75 * 1024 * 1024
    keepalive_timeout: float = 60.0
    upstream_connect_timeout: float = 5.0
    upstream_first_byte_timeout: float = 30.0
    upstream_read_timeout: float = 60.0
    max_connections: int = 10_000
    drain_timeout: float = 30.0
    # Longest pause between two pieces of a request body (a slow upload is cut with 408).
    request_body_timeout: float = 60.0
    # Per backend and worker: connections open at once, and requests that may wait for
    # one beyond that (then 503).
    backend_max_connections: int = 100
    backend_queue: int = 50
    # A backend that refused a connection or timed out is skipped for this long.
    backend_quarantine: float = 10.0
    # Idle keep-alive connections to backends are closed after this long.
    upstream_idle_timeout: float = 30.0


class AcmeDns(_Strict, frozen=True):
    edge_addresses: tuple[str, ...] = ()
    cname_targets: tuple[str, ...] = ()
    resolvers: tuple[str, ...] = ()
    check_interval: float = 60.0


class Acme(_Strict, frozen=True):
    directory: str
    email: str = ""
    ca_bundle: str | None = None
    key_type: Literal["ecdsa", "rsa"] = "ecdsa"
    dns: AcmeDns = AcmeDns()
    # Orders placed at once by this node's lifecycle.
    concurrency: int = 4
    # A domain's lock (store lease) lasts this long without a refresh: how long the
    # cluster waits before another node takes over the order of a node that died.
    lock_ttl: float = 30.0


class AccessLog(_Strict, frozen=True):
    enabled: bool = False
    # One JSON line per request; stderr when no path is given.
    path: str | None = None


class Admin(_Strict, frozen=True):
    """The admin API and dashboard; served only when `listen.admin` is set."""

    # The bearer token; created (0600) with a random token on first start if absent.
    token_file: str = "admin-token"  # noqa: S105 (a path, not a secret)
    # Serve the admin listener over TLS with this certificate (session cookies are
    # then marked Secure). Without it, keep listen.admin on loopback.
    certificate: CertFiles | None = None
    session_ttl: float = 8 * 3600.0


class Config(_Strict, frozen=True):
    platform_domain: str
    tls: Tls
    listen: Listen = Listen()
    workers: int | Literal["auto"] = 1
    store: Store = Store()
    apps: dict[str, AppConfig] = {}
    domains: dict[str, str] = {}
    limits: Limits = Limits()
    trusted_proxies: tuple[str, ...] = ()
    access_log: AccessLog = AccessLog()
    acme: Acme | None = None
    admin: Admin = Admin()
    node: Node = Node()
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    # Filled in by load(): where the file was, so relative paths resolve against it.
    source: str = ""

    @property
    def worker_count(self) -> int:
        if self.workers == "auto":
            return os.cpu_count() or 1
        return self.workers


_MSGSPEC_PATH = re.compile(r"^(?P<what>.*?)(?: - at `\$(?P<path>[^`]*)`)?$")


def _key_path(raw: str) -> str:
    return raw.lstrip(".").replace("`", "")


def _explain(err: msgspec.ValidationError) -> tuple[str, str]:
    """Split a msgspec message into (key path, reason) in our words."""
    m = _MSGSPEC_PATH.match(str(err))
    assert m is not None
    what, path = m.group("what"), _key_path(m.group("path") or "")
    field = re.search(r"field `([^`]+)`", what)
    if what.startswith("Object missing required field") and field:
        path = f"{path}.{field.group(1)}" if path else field.group(1)
        return path, "required key is missing"
    if what.startswith("Object contains unknown field") and field:
        path = f"{path}.{field.group(1)}" if path else field.group(1)
        return path, "unknown key"
    what = what.replace("`", "")
    return path, what[0].lower() + what[1:] if what else "invalid value"


def _check_entries(data: dict[str, Any], label: str) -> None:
    """Check each entry of the maps keyed by name on its own.

    msgspec reports a bad map value as `apps[...]`; checking entry by entry lets the
    message name the app or domain at fault.
    """
    for section, kind in (("apps", AppConfig), ("domains", str)):
        entries = data.get(section)
        if not isinstance(entries, dict):
            continue  # the whole-config conversion reports the wrong type
        for name, value in entries.items():
            try:
                msgspec.convert(value, kind)
            except msgspec.ValidationError as exc:
                key, reason = _explain(exc)
                path = f"{section}.{name}.{key}" if key else f"{section}.{name}"
                raise ConfigError(f"{label}: {path}: {reason}") from None


def parse_address(value: str, *, where: str) -> tuple[str, int]:
    """'host:port' or '[v6]:port' -> (host, port)."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{where}: expected host:port, got {value!r}")
    host = host.strip("[]")
    if not host:
        raise ConfigError(f"{where}: expected host:port, got {value!r}")
    return host, int(port)


def load(path: str | os.PathLike[str]) -> Config:
    """Read, validate and resolve one config file. Raises ConfigError."""
    file = Path(path)
    label = file.name
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{file}: cannot read config: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(exc, "problem", None) or "not valid YAML"
        raise ConfigError(f"{label}: invalid YAML{where}: {problem}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{label}: expected a mapping of settings at the top level")
    _check_entries(data, label)
    try:
        config = msgspec.convert(data, Config)
    except msgspec.ValidationError as exc:
        key, reason = _explain(exc)
        raise ConfigError(f"{label}: {key}: {reason}") from None
    return _resolve(config, file)


def _resolve(config: Config, file: Path) -> Config:
    label = file.name
    base = file.resolve().parent

    def ok_file(p: str, key: str) -> str:
        full = (base / p).resolve()
        if not full.is_file():
            raise ConfigError(f"{label}: {key}: file not found ({full})")
        return str(full)

    def cert_files(c: CertFiles, key: str) -> CertFiles:
        return CertFiles(cert=ok_file(c.cert, f"{key}.cert"), key=ok_file(c.key, f"{key}.key"))

    def norm(name: str, key: str, *, wildcard: bool = False) -> str:
        try:
            return names.normalize(name, allow_wildcard=wildcard)
        except InvalidName as exc:
            raise ConfigError(f"{label}: {key}: {exc}") from None

    platform = norm(config.platform_domain, "platform_domain")
    tls = msgspec.structs.replace(
        config.tls,
        platform_certificate=cert_files(config.tls.platform_certificate,
                                        "tls.platform_certificate"),
        certificates=tuple(cert_files(c, f"tls.certificates[{i}]")
                           for i, c in enumerate(config.tls.certificates)),
    )
    if config.store.resident_certificates < 1:
        raise ConfigError(f"{label}: store.resident_certificates: must be at least 1")
    if tls.context_cache_size < 1:
        raise ConfigError(f"{label}: tls.context_cache_size: must be at least 1")
    if not 0 <= tls.session_tickets <= 16:
        raise ConfigError(f"{label}: tls.session_tickets: must be between 0 and 16")
    for key in ("https", "http", "metrics", "admin"):
        value = getattr(config.listen, key)
        if value is not None:
            parse_address(value, where=f"{label}: listen.{key}")
    if isinstance(config.workers, int) and not 1 <= config.workers <= 256:
        raise ConfigError(f"{label}: workers: must be between 1 and 256, or \"auto\"")
    apps: dict[str, AppConfig] = {}
    for app, spec in config.apps.items():
        if not re.fullmatch(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?", app):
            raise ConfigError(f"{label}: apps.{app}: app names are lower-case DNS labels")
        if not spec.backends:
            raise ConfigError(f"{label}: apps.{app}.backends: at least one backend is needed")
        for i, backend in enumerate(spec.backends):
            parse_address(backend, where=f"{label}: apps.{app}.backends[{i}]")
        canonical = spec.canonical_domain
        if canonical is not None:
            canonical = norm(canonical, f"apps.{app}.canonical_domain")
        apps[app] = msgspec.structs.replace(spec, canonical_domain=canonical)
    domains: dict[str, str] = {}
    for domain, app in config.domains.items():
        name = norm(domain, f"domains.{domain}")
        if app not in apps:
            raise ConfigError(f"{label}: domains.{domain}: unknown app {app!r}")
        domains[name] = app
    store = _resolve_store(config.store, label, base, ok_file)
    node = config.node
    if not node.name:
        node = Node(name=socket.gethostname())
    elif not re.fullmatch(r"[a-z0-9]([a-z0-9.-]{0,61}[a-z0-9])?", node.name):
        raise ConfigError(f"{label}: node.name: use lower-case letters, digits, '.' and '-'")
    acme = config.acme
    if acme is not None:
        acme = _resolve_acme(acme, label, ok_file, norm)
    admin = config.admin
    if admin.session_ttl <= 0:
        raise ConfigError(f"{label}: admin.session_ttl: must be positive")
    admin = msgspec.structs.replace(
        admin, token_file=str((base / admin.token_file).resolve()),
        certificate=(cert_files(admin.certificate, "admin.certificate")
                     if admin.certificate is not None else None))
    return msgspec.structs.replace(
        config, platform_domain=platform, tls=tls, apps=apps, domains=domains, store=store,
        acme=acme, admin=admin, node=node, source=str(file.resolve()),
    )


def _resolve_store(store: Store, label: str, base: Path,
                   ok_file: Callable[[str, str], str]) -> Store:
    store = msgspec.structs.replace(store, path=str((base / store.path).resolve()))
    if store.backend != "etcd":
        return store
    if not store.endpoints:
        raise ConfigError(f"{label}: store.endpoints: the etcd backend needs at least one "
                          "endpoint (host:port)")
    for i, endpoint in enumerate(store.endpoints):
        host, _ = parse_address(endpoint.split("://", 1)[-1].rstrip("/"),
                                where=f"{label}: store.endpoints[{i}]")
        if len(store.endpoints) > 1:
            try:
                ipaddress.IPv4Address(host)
            except ValueError:
                raise ConfigError(f"{label}: store.endpoints[{i}]: with several endpoints, "
                                  "give IPv4 addresses (one endpoint may be a name)") from None
    if not store.prefix.startswith("/") or not store.prefix.endswith("/"):
        raise ConfigError(f"{label}: store.prefix: must start and end with '/'")
    if (store.cert is None) != (store.key is None):
        raise ConfigError(f"{label}: store: give cert and key together (client TLS)")
    if (store.username is None) != (store.password_file is None):
        raise ConfigError(f"{label}: store: give username and password_file together")
    if store.timeout <= 0:
        raise ConfigError(f"{label}: store.timeout: must be positive")
    files = {k: ok_file(v, f"store.{k}") for k in ("ca", "cert", "key", "password_file")
             if (v := getattr(store, k)) is not None}
    return msgspec.structs.replace(store, **files)


def _resolve_acme(acme: Acme, label: str, ok_file: Callable[[str, str], str],
                  norm: Callable[..., str]) -> Acme:
    if not acme.directory.startswith(("https://", "http://")):
        raise ConfigError(f"{label}: acme.directory: expected an https:// URL")
    bundle = ok_file(acme.ca_bundle, "acme.ca_bundle") if acme.ca_bundle else None
    for i, address in enumerate(acme.dns.edge_addresses):
        try:
            ipaddress.ip_address(address)
        except ValueError:
            raise ConfigError(f"{label}: acme.dns.edge_addresses[{i}]: {address!r} is not "
                              "an IP address") from None
    targets = tuple(norm(t, f"acme.dns.cname_targets[{i}]")
                    for i, t in enumerate(acme.dns.cname_targets))
    for i, resolver in enumerate(acme.dns.resolvers):
        parse_address(resolver if ":" in resolver else f"{resolver}:53",
                      where=f"{label}: acme.dns.resolvers[{i}]")
    if not acme.dns.edge_addresses and not targets:
        raise ConfigError(f"{label}: acme.dns: give edge_addresses or cname_targets, so "
                          "tlsedge can tell when a domain points at this platform")
    if acme.dns.check_interval <= 0 or acme.concurrency < 1:
        raise ConfigError(f"{label}: acme: check_interval and concurrency must be positive")
    if acme.lock_ttl < 2:
        raise ConfigError(f"{label}: acme.lock_ttl: must be at least 2 (seconds)")
    dns = msgspec.structs.replace(acme.dns, cname_targets=targets)
    return msgspec.structs.replace(acme, ca_bundle=bundle, dns=dns)


def to_builtins(config: Config) -> dict[str, Any]:
    """The resolved config as plain data (for `check-config --json` and debugging)."""
    out: dict[str, Any] = msgspec.to_builtins(config)
    return out
