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
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
import yaml

from proxy import names
from proxy.configshape import explain, load_yaml, problems
from proxy.errors import ConfigError, InvalidName


class _Strict(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    pass


# Range checks msgspec makes while converting, so every one is reported with the other
# problems of the file's shape (configshape.explain words them: "must be at least 1").
AtLeastOne = Annotated[int, msgspec.Meta(ge=1)]
NonNegative = Annotated[int, msgspec.Meta(ge=0)]
NonNegativeFloat = Annotated[float, msgspec.Meta(ge=0)]
Positive = Annotated[float, msgspec.Meta(gt=0)]


# Mozilla "intermediate" TLS 1.2 suites, ECDHE only: we ship no dhparams.
TLS12_CIPHERS = (
    "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
    "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
    "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305"
)
# Key-exchange groups OpenSSL 3 negotiates, by the names it takes.
Group = Literal["X25519", "X448", "P-256", "P-384", "P-521", "ffdhe2048", "ffdhe3072",
                "ffdhe4096", "ffdhe6144", "ffdhe8192"]
DEFAULT_GROUPS: tuple[Group, ...] = ("X25519", "P-256", "P-384")


class CertFiles(_Strict, frozen=True):
    cert: str
    key: str


class Listener(_Strict, frozen=True):
    """A traffic listener (`listen.https`, `listen.http`) in its long form."""

    address: str
    # Every connection starts with a PROXY protocol header (v1 or v2) from the load
    # balancer, read before anything else; its client address is the one
    # X-Forwarded-For, the access log and the per-client limits use. Only sources in
    # `trusted` (the balancer's addresses, CIDRs) may connect then.
    proxy_protocol: bool = False
    trusted: tuple[str, ...] = ()


class Listen(_Strict, frozen=True):
    # "host:port", "[::]:443" (IPv6, and IPv4 too: dual-stack), or a Listener.
    https: str | Listener = "127.0.0.1:8443"
    http: str | Listener = "127.0.0.1:8080"
    # Its own port: 9100 is node_exporter's, which an edge node usually runs too.
    metrics: str | None = "127.0.0.1:9448"
    admin: str | None = None

    def listener(self, key: Literal["https", "http"]) -> Listener:
        """A traffic listener's settings, whichever form the file gave."""
        value: str | Listener = getattr(self, key)
        return value if isinstance(value, Listener) else Listener(address=value)

    def address(self, key: str) -> str | None:
        """Any listener's "host:port" (None: not served)."""
        value: str | Listener | None = getattr(self, key)
        return value.address if isinstance(value, Listener) else value


class Tls(_Strict, frozen=True):
    platform_certificate: CertFiles
    certificates: tuple[CertFiles, ...] = ()
    unknown_sni: Literal["platform", "reject"] = "platform"
    # SSLContexts kept built; each costs ~20 kB, so 10,000 is ~200 MB at most.
    context_cache_size: AtLeastOne = 10_000
    # TLS 1.3 session tickets sent after a full handshake. Off by default, measured:
    # sending OpenSSL's default 2 costs ~80 us of CPU per full handshake (one more
    # write and the ticket crypto), while a resumed handshake saves this Python server
    # no CPU and no round trip (TLS 1.3 resumption is 1-RTT like a full handshake).
    session_tickets: Annotated[int, msgspec.Meta(ge=0, le=16)] = 0
    handshake_timeout: float = 10.0
    # 421 Misdirected Request when a request's Host is not covered by the certificate
    # the connection's SNI chose.
    reject_misdirected: bool = True
    # PEM roots trusted, besides the system store, when an uploaded chain is checked
    # (an upload that reaches no trusted root is accepted with a warning).
    trusted_ca_file: str | None = None
    # ALPN on the HTTPS listener, our preference first: HTTP/2 for the clients that
    # offer h2, HTTP/1.1 for the others (and for clients without ALPN). [http/1.1]
    # turns HTTP/2 off.
    alpn: tuple[Literal["h2", "http/1.1"], ...] = ("h2", "http/1.1")
    # The TLS policy of every context the listeners use. TLS 1.0 and 1.1 cannot be
    # enabled. `ciphers`: the TLS 1.2 suites, OpenSSL names joined with ':' (TLS 1.3
    # suites are all AEAD and OpenSSL's own); `groups`: key exchange, preferred first.
    min_version: Literal["1.2", "1.3"] = "1.2"
    max_version: Literal["1.2", "1.3"] = "1.3"
    ciphers: str = TLS12_CIPHERS
    groups: tuple[Group, ...] = DEFAULT_GROUPS


class Encryption(_Strict, frozen=True):
    # 32-byte keys, each in a 0600 file: the first encrypts private keys in the store,
    # every one decrypts (list the old key second while rotating: README).
    key_files: tuple[str, ...]


class StoreSettings(_Strict, frozen=True):
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
    resident_certificates: AtLeastOne = 100_000
    # Envelope encryption of the records holding private keys (store/sealing.py).
    encryption: Encryption | None = None


class Node(_Strict, frozen=True):
    # This node's name in the cluster (`cluster status`, lock holders); default: hostname.
    name: str = ""


class AppConfig(_Strict, frozen=True):
    backends: Annotated[tuple[str, ...], msgspec.Meta(min_length=1)]
    force_https: bool = False
    canonical_domain: str | None = None
    # Read a request body whole before taking a backend connection, and read a response
    # from the backend as fast as it comes while the client takes it slowly (see
    # limits.*buffer*): a slow client then never holds a backend connection. Turn off
    # for streaming uploads or responses (SSE, a response with `X-Accel-Buffering: no`
    # and WebSocket are never buffered).
    request_buffering: bool = True
    response_buffering: bool = True
    # Open every backend connection with a PROXY protocol v2 header naming the client,
    # for apps that read the client address from it (such a connection carries one
    # request and is closed: never pooled, so never shared between clients).
    send_proxy_protocol: Literal["v2"] | None = None


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
    # A WebSocket tunnel in which neither side has sent a byte for this long is closed
    # (nginx's proxy_read_timeout, per read, in both directions).
    tunnel_idle_timeout: Positive = 3600.0
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
    # Buffering (apps.<name>.request_buffering / response_buffering): bytes of a
    # request body, and of a response per exchange, kept in memory; past that they go
    # to an unlinked 0600 temp file in temp_dir ("": the system's temp folder), at most
    # max_temp_file bytes per response and max_temp_space for all of a worker's files.
    # A response that would pass them makes its backend wait for the client instead.
    request_buffer_memory: NonNegative = 64 * 1024
    response_buffer_memory: NonNegative = 256 * 1024
    max_temp_file: NonNegative = 1024 ** 3
    max_temp_space: NonNegative = 4 * 1024 ** 3
    temp_dir: str = ""
    # A buffered request body slower than body_min_rate bytes/s (on average, after a
    # grace of body_rate_grace seconds) is cut with 408; 0: no minimum rate.
    body_min_rate: NonNegative = 1024
    body_rate_grace: NonNegativeFloat = 10.0
    # A client that takes no byte of a buffered response for this long is cut.
    send_timeout: Positive = 60.0
    # Per client address and worker: connections open at once (more are refused), and
    # requests per second to one app (token bucket of client_request_burst; 0: no limit,
    # 429 past it).
    connections_per_client: AtLeastOne = 256
    client_request_rate: NonNegativeFloat = 0.0
    client_request_burst: NonNegative = 100
    # HTTP/2, per connection: streams open at once (SETTINGS_MAX_CONCURRENT_STREAMS),
    # and streams the client may open and drop before their answer (rapid reset,
    # CVE-2023-44487), plus one per two answered; past it, GOAWAY ENHANCE_YOUR_CALM.
    h2_max_concurrent_streams: AtLeastOne = 128
    h2_reset_budget: AtLeastOne = 200


class AcmeDns(_Strict, frozen=True):
    edge_addresses: tuple[str, ...] = ()
    cname_targets: tuple[str, ...] = ()
    resolvers: tuple[str, ...] = ()
    check_interval: Positive = 60.0


class Tsig(_Strict, frozen=True):
    name: str
    secret_file: str  # the base64 secret, as `tsig-keygen` prints it (0600)
    algorithm: Literal["hmac-sha256", "hmac-sha384", "hmac-sha512"] = "hmac-sha256"


class AcmeDns01(_Strict, frozen=True):
    """DNS-01 through RFC 2136 updates to the platform's own zone (lifecycle/dns01.py):
    customers CNAME `_acme-challenge.<domain>` to `<domain>.<zone>`."""

    server: str  # "host:port" of the primary taking the updates
    zone: str
    tsig: Tsig
    # How long a TXT record may take to reach every authoritative server of the zone.
    propagation_timeout: Positive = 60.0
    # The zone's authoritative servers to check ("host:port"); default: its NS records.
    nameservers: tuple[str, ...] = ()
    # Order with DNS-01 when an HTTP-01 order failed and the delegation is in place.
    fallback: bool = False


class Limit(_Strict, frozen=True):
    count: NonNegative  # at most this many in any `period` (a token bucket); 0: no limit
    period: Positive  # seconds


class AcmeLimits(_Strict, frozen=True):
    """The CA's rate limits the order budget keeps to, cluster-wide (lifecycle/budget.py).
    Defaults: Let's Encrypt's published limits."""

    account: Limit = Limit(count=300, period=3 * 3600.0)  # new orders per account
    registered_domain: Limit = Limit(count=50, period=7 * 86400.0)  # new certificates
    name_set: Limit = Limit(count=5, period=7 * 86400.0)  # duplicate certificates
    failed_authorization: Limit = Limit(count=5, period=3600.0)  # per hostname


class Eab(_Strict, frozen=True):
    """External Account Binding: the key id and HMAC key (base64url, in a 0600 file)
    the CA gave for registering an account (ZeroSSL, Google Trust Services, ...)."""

    kid: str
    hmac_key_file: str


class Issuer(_Strict, frozen=True):
    directory: str
    name: str = ""  # in statuses, logs and metrics; default: the directory's host
    ca_bundle: str | None = None  # default: acme.ca_bundle
    eab: Eab | None = None
    limits: AcmeLimits | None = None  # default: acme.limits


class Acme(_Strict, frozen=True):
    # One CA (directory, eab), or several tried in turn (issuers); resolved, `issuers`
    # always lists them and `directory` is the first one's.
    directory: str = ""
    email: str = ""
    ca_bundle: str | None = None
    key_type: Literal["ecdsa", "rsa"] = "ecdsa"
    dns: AcmeDns = AcmeDns()
    eab: Eab | None = None
    issuers: tuple[Issuer, ...] = ()
    limits: AcmeLimits = AcmeLimits()
    # A domain's orders go to the next issuer after this many failures in a row with
    # one (at once when it cannot be reached); renewals start with the first again.
    fallback_after: AtLeastOne = 2
    # Orders placed at once by this node's lifecycle.
    concurrency: AtLeastOne = 16
    # A domain's lock (store lease) lasts this long without a refresh: how long the
    # cluster waits before another node takes over the order of a node that died.
    lock_ttl: Annotated[float, msgspec.Meta(ge=2)] = 30.0
    dns01: AcmeDns01 | None = None


class AccessLogSettings(_Strict, frozen=True):
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
    session_ttl: Positive = 8 * 3600.0


class Logging(_Strict, frozen=True):
    """Every process's log on stderr: one line per event (proxy/logs.py)."""

    format: Literal["text", "json"] = "text"
    level: Literal["debug", "info", "warning", "error"] = "info"


class Metrics(_Strict, frozen=True):
    # Per-certificate expiry series (serving or standby) for this many certificates,
    # those expiring first; the aggregates (soonest expiry, counts by expiry bucket,
    # days-to-expiry histogram, per source and role) cover every one, so a million
    # domains never make a million series.
    certificate_series: NonNegative = 100


class Config(_Strict, frozen=True):
    platform_domain: str
    tls: Tls
    listen: Listen = Listen()
    workers: int | Literal["auto"] = 1
    store: StoreSettings = StoreSettings()
    apps: dict[str, AppConfig] = {}
    domains: dict[str, str] = {}
    limits: Limits = Limits()
    trusted_proxies: tuple[str, ...] = ()
    access_log: AccessLogSettings = AccessLogSettings()
    acme: Acme | None = None
    admin: Admin = Admin()
    node: Node = Node()
    logging: Logging = Logging()
    metrics: Metrics = Metrics()
    # Filled in by load(): where the file was, so relative paths resolve against it.
    source: str = ""

    @property
    def worker_count(self) -> int:
        if self.workers == "auto":
            return os.cpu_count() or 1
        return self.workers


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
                key, reason = explain(exc)
                path = f"{section}.{name}.{key}" if key else f"{section}.{name}"
                raise ConfigError(f"{label}: {path}: {reason}") from None


DEFAULT_PATH = "/etc/tlsedge/tlsedge.yaml"


def default_path() -> str:
    """The config a command reads without -c: $TLSEDGE_CONFIG, else DEFAULT_PATH."""
    return os.environ.get("TLSEDGE_CONFIG") or DEFAULT_PATH


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
        data = load_yaml(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(exc, "problem", None) or "not valid YAML"
        raise ConfigError(f"{label}: invalid YAML{where}: {problem}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{label}: expected a mapping of settings at the top level")
    found = problems(data, Config)
    if found:  # every problem of the file's shape at once, one line each
        raise ConfigError("\n".join(f"{label}: {key}: {reason}" for key, reason in found))
    _check_entries(data, label)
    try:
        config = msgspec.convert(data, Config)
    except msgspec.ValidationError as exc:
        key, reason = explain(exc)
        raise ConfigError(f"{label}: {key}: {reason}") from None
    return _resolve(config, file)


class _Where:
    """The config file being resolved: its name starts every message, its folder
    anchors relative paths."""

    def __init__(self, file: Path) -> None:
        self.label = file.name
        self.base = file.resolve().parent

    def path(self, p: str) -> str:
        return str((self.base / p).resolve())

    def file(self, p: str, key: str) -> str:
        """`p` made absolute; ConfigError when no such file exists."""
        full = (self.base / p).resolve()
        if not full.is_file():
            raise ConfigError(f"{self.label}: {key}: file not found ({full})")
        return str(full)

    def certs(self, c: CertFiles, key: str) -> CertFiles:
        return CertFiles(cert=self.file(c.cert, f"{key}.cert"),
                         key=self.file(c.key, f"{key}.key"))

    def name(self, name: str, key: str, *, wildcard: bool = False) -> str:
        try:
            return names.normalize(name, allow_wildcard=wildcard)
        except InvalidName as exc:
            raise ConfigError(f"{self.label}: {key}: {exc}") from None


def _resolve(config: Config, file: Path) -> Config:
    """Paths made absolute (files checked), names normalized, and the checks a msgspec
    constraint cannot make (addresses, names, keys that go together); ConfigError
    naming the first key at fault."""
    at = _Where(file)
    label = at.label
    platform = at.name(config.platform_domain, "platform_domain")
    tls = msgspec.structs.replace(
        config.tls,
        platform_certificate=at.certs(config.tls.platform_certificate,
                                      "tls.platform_certificate"),
        certificates=tuple(at.certs(c, f"tls.certificates[{i}]")
                           for i, c in enumerate(config.tls.certificates)),
        trusted_ca_file=(at.file(config.tls.trusted_ca_file, "tls.trusted_ca_file")
                         if config.tls.trusted_ca_file else None),
    )
    for key in ("https", "http", "metrics", "admin"):
        value = config.listen.address(key)
        if value is not None:
            parse_address(value, where=f"{label}: listen.{key}")
    _check_listeners(config.listen, label)
    _check_tls_policy(tls, label)
    if isinstance(config.workers, int) and not 1 <= config.workers <= 256:
        raise ConfigError(f"{label}: workers: must be between 1 and 256, or \"auto\"")
    apps = _resolve_apps(config.apps, at)
    domains = _resolve_domains(config.domains, apps, at)
    store = _resolve_store(config.store, label, at.base, at.file)
    limits = _resolve_limits(config.limits, label, at.base)
    node = _resolve_node(config.node, label)
    acme = (_resolve_acme(config.acme, label, at.file, at.name) if config.acme is not None
            else None)
    admin = msgspec.structs.replace(
        config.admin, token_file=at.path(config.admin.token_file),
        certificate=(at.certs(config.admin.certificate, "admin.certificate")
                     if config.admin.certificate is not None else None))
    access_log = config.access_log
    if access_log.path:  # the workers' working folder is not the config's
        access_log = msgspec.structs.replace(access_log, path=at.path(access_log.path))
    return msgspec.structs.replace(
        config, platform_domain=platform, tls=tls, apps=apps, domains=domains, store=store,
        access_log=access_log, limits=limits, acme=acme, admin=admin, node=node,
        source=str(file.resolve()),
    )


def _resolve_apps(apps: dict[str, AppConfig], at: _Where) -> dict[str, AppConfig]:
    resolved: dict[str, AppConfig] = {}
    for app, spec in apps.items():
        if not re.fullmatch(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?", app):
            raise ConfigError(f"{at.label}: apps.{app}: app names are lower-case DNS labels")
        for i, backend in enumerate(spec.backends):
            parse_address(backend, where=f"{at.label}: apps.{app}.backends[{i}]")
        canonical = spec.canonical_domain
        if canonical is not None:
            canonical = at.name(canonical, f"apps.{app}.canonical_domain")
        resolved[app] = msgspec.structs.replace(spec, canonical_domain=canonical)
    return resolved


def _resolve_domains(domains: dict[str, str], apps: dict[str, AppConfig],
                     at: _Where) -> dict[str, str]:
    resolved: dict[str, str] = {}
    for domain, app in domains.items():
        name = at.name(domain, f"domains.{domain}")
        if app not in apps:
            known = ", ".join(sorted(apps)) or "none are configured"
            raise ConfigError(f"{at.label}: domains.{domain}: unknown app {app!r} "
                              f"(apps: {known})")
        resolved[name] = app
    return resolved


def _resolve_node(node: Node, label: str) -> Node:
    if not node.name:
        return Node(name=socket.gethostname())
    if not re.fullmatch(r"[a-z0-9]([a-z0-9.-]{0,61}[a-z0-9])?", node.name):
        raise ConfigError(f"{label}: node.name: use lower-case letters, digits, '.' and '-'")
    return node

TRAFFIC_LISTENERS: tuple[Literal["https", "http"], ...] = ("https", "http")


def _check_listeners(listen: Listen, label: str) -> None:
    for key in TRAFFIC_LISTENERS:
        listener = listen.listener(key)
        where = f"{label}: listen.{key}"
        for i, cidr in enumerate(listener.trusted):
            try:
                ipaddress.ip_network(cidr, strict=False)
            except ValueError:
                raise ConfigError(f"{where}.trusted[{i}]: {cidr!r} is not an address or "
                                  "network (10.0.0.0/8, 2001:db8::/32)") from None
        if listener.proxy_protocol and not listener.trusted:
            raise ConfigError(f"{where}.trusted: give the addresses of the load balancers "
                              "that send the PROXY header (CIDRs)")
        if listener.trusted and not listener.proxy_protocol:
            raise ConfigError(f"{where}.trusted: applies to the PROXY protocol only: set "
                              "proxy_protocol: true, or remove it")


def _check_tls_policy(tls: Tls, label: str) -> None:
    """Versions in order; every TLS 1.2 cipher name one OpenSSL knows (OpenSSL itself
    skips an unknown name in a list that has a known one), none without encryption
    or authentication."""
    if float(tls.min_version) > float(tls.max_version):
        raise ConfigError(f"{label}: tls.min_version: {tls.min_version} is above "
                          f"tls.max_version ({tls.max_version})")
    probe = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    probe.set_ciphers("ALL:COMPLEMENTOFALL:@SECLEVEL=0")
    known = {c["name"] for c in probe.get_ciphers() if c["protocol"] != "TLSv1.3"}
    probe.set_ciphers("aNULL:eNULL:@SECLEVEL=0")
    unsafe = {c["name"] for c in probe.get_ciphers()}
    given = [n.strip() for n in tls.ciphers.split(":")]
    if not any(given):
        raise ConfigError(f"{label}: tls.ciphers: give at least one TLS 1.2 cipher")
    for name in given:
        if name not in known:
            raise ConfigError(f"{label}: tls.ciphers: unknown TLS 1.2 cipher {name!r} "
                              "(OpenSSL names, as `openssl ciphers -s -tls1_2` lists them, "
                              "joined with ':')")
        if name in unsafe:
            raise ConfigError(f"{label}: tls.ciphers: {name} has no encryption or no "
                              "authentication")
    if len(set(tls.groups)) != len(tls.groups) or not tls.groups:
        raise ConfigError(f"{label}: tls.groups: give each group once, at least one")


def _resolve_limits(limits: Limits, label: str, base: Path) -> Limits:
    if not limits.temp_dir:
        return limits
    folder = (base / limits.temp_dir).resolve()
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        raise ConfigError(f"{label}: limits.temp_dir: not a writable folder ({folder})")
    return msgspec.structs.replace(limits, temp_dir=str(folder))


def _resolve_store(store: StoreSettings, label: str, base: Path,
                   ok_file: Callable[[str, str], str]) -> StoreSettings:
    store = msgspec.structs.replace(store, path=str((base / store.path).resolve()))
    if store.encryption is not None:
        if not store.encryption.key_files:
            raise ConfigError(f"{label}: store.encryption.key_files: give at least one key "
                              "file (the first encrypts)")
        store = msgspec.structs.replace(store, encryption=Encryption(key_files=tuple(
            ok_file(k, f"store.encryption.key_files[{i}]")
            for i, k in enumerate(store.encryption.key_files))))
    if store.backend != "etcd":
        return store
    _check_etcd(store, label)
    files = {k: ok_file(v, f"store.{k}") for k in ("ca", "cert", "key", "password_file")
             if (v := getattr(store, k)) is not None}
    return msgspec.structs.replace(store, **files)


def _check_etcd(store: StoreSettings, label: str) -> None:
    """The store settings of the etcd backend, which the files backend ignores."""
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


def _resolve_issuers(acme: Acme, label: str, ok_file: Callable[[str, str], str],
                     bundle: str | None) -> tuple[Issuer, ...]:
    """acme.issuers with every default filled in (acme.directory: the one issuer)."""
    if acme.issuers and (acme.directory or acme.eab):
        raise ConfigError(f"{label}: acme: give directory (and eab) for one CA, or issuers "
                          "for several, not both")
    if not acme.issuers and not acme.directory:
        raise ConfigError(f"{label}: acme: give directory (the CA's ACME directory URL) "
                          "or issuers")
    given = acme.issuers or (Issuer(directory=acme.directory, eab=acme.eab),)
    where = ["acme"] if not acme.issuers else [f"acme.issuers[{i}]" for i in range(len(given))]
    issuers = [_resolve_issuer(issuer, key, label, ok_file, bundle, acme.limits)
               for key, issuer in zip(where, given, strict=True)]
    if len({i.name for i in issuers}) != len(issuers):
        raise ConfigError(f"{label}: acme.issuers: give each issuer its own name")
    return tuple(issuers)


def _resolve_issuer(issuer: Issuer, key: str, label: str, ok_file: Callable[[str, str], str],
                    bundle: str | None, limits: AcmeLimits) -> Issuer:
    """One issuer at `key`, its files checked and acme's defaults (CA bundle, limits)
    filled in."""
    if not issuer.directory.startswith(("https://", "http://")):
        raise ConfigError(f"{label}: {key}.directory: expected an https:// URL")
    eab = issuer.eab
    if eab is not None:
        eab = Eab(kid=eab.kid, hmac_key_file=ok_file(eab.hmac_key_file,
                                                     f"{key}.eab.hmac_key_file"))
    return msgspec.structs.replace(
        issuer, name=issuer.name or issuer.directory.split("/")[2], eab=eab,
        ca_bundle=(ok_file(issuer.ca_bundle, f"{key}.ca_bundle") if issuer.ca_bundle
                   else bundle),
        limits=issuer.limits or limits)


def _resolve_acme(acme: Acme, label: str, ok_file: Callable[[str, str], str],
                  norm: Callable[..., str]) -> Acme:
    bundle = ok_file(acme.ca_bundle, "acme.ca_bundle") if acme.ca_bundle else None
    issuers = _resolve_issuers(acme, label, ok_file, bundle)
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
    dns = msgspec.structs.replace(acme.dns, cname_targets=targets)
    dns01 = acme.dns01
    if dns01 is not None:
        parse_address(dns01.server, where=f"{label}: acme.dns01.server")
        for i, server in enumerate(dns01.nameservers):
            parse_address(server, where=f"{label}: acme.dns01.nameservers[{i}]")
        dns01 = msgspec.structs.replace(
            dns01, zone=norm(dns01.zone, "acme.dns01.zone"), tsig=msgspec.structs.replace(
                dns01.tsig, secret_file=ok_file(dns01.tsig.secret_file,
                                                "acme.dns01.tsig.secret_file")))
    return msgspec.structs.replace(acme, ca_bundle=bundle, dns=dns, dns01=dns01,
                                   issuers=issuers, directory=issuers[0].directory,
                                   eab=issuers[0].eab if acme.eab else None)


def summary(config: Config) -> list[str]:
    """What `check-config` shows of the settings that shape traffic: the listeners and
    the TLS policy, one line each."""
    lines = []
    for key in TRAFFIC_LISTENERS:
        listener = config.listen.listener(key)
        proxy = (f", PROXY protocol from {', '.join(listener.trusted)}"
                 if listener.proxy_protocol else "")
        lines.append(f"listen.{key}: {listener.address}{proxy}")
    tls = config.tls
    versions = (f"TLS {tls.min_version}" if tls.min_version == tls.max_version
                else f"TLS {tls.min_version} to {tls.max_version}")
    ciphers = f"; TLS 1.2 ciphers {tls.ciphers}" if tls.min_version == "1.2" else ""
    lines.append(f"tls: {versions}{ciphers}; groups {', '.join(tls.groups)}")
    return lines


def to_builtins(config: Config) -> dict[str, Any]:
    """The resolved config as plain data (for `check-config --json` and debugging)."""
    out: dict[str, Any] = msgspec.to_builtins(config)
    return out
