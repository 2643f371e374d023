"""Typed records kept in the store, their keys, and their JSON encoding.

The one place that knows the key layout (`domains/<name>`, `certs/<name>/custom`,
...). Pure data: no I/O, no validation of certificates (that is certs/bundle.py).
"""

from __future__ import annotations

from typing import Literal, Protocol, TypeVar

import msgspec

from proxy.certs.bundle import CertBundle, trusted_bundle
from proxy.errors import BundleError

DOMAINS = "domains/"
APPS = "apps/"
CERTS = "certs/"
STATUS = "status/"
CHALLENGES = "challenges/"
PEM = "pem/"
ACME = "acme/"
ACME_ACCOUNT = ACME + "account"
NODES = "nodes/"
LOCKS = "locks/"  # store.lock(name) takes `locks/<name>`: a lease, a holder and a token
DNS01 = "dns01/"  # TXT records published for DNS-01, until they are removed
BUDGET = "budget/"  # the order budget: the CA's rate limits, per issuer (lifecycle/budget.py)
# Where private keys live: certificates' key material and the ACME account. With
# store.encryption these records are sealed (store/sealing.py); nothing else holds a key.
SECRET_PREFIXES = (PEM, ACME)
# Which encryption keys sealed records in this store (store/sealing.py); not a secret.
SEALING_KEYS = "sealing/keys"

CertSource = Literal["custom", "acme"]
Challenge = Literal["http-01", "dns-01"]
# Lifecycle states written by the lifecycle; "In use" / "Not used" are derived from
# them and the custom certificate at read time (see registry.DomainView).
State = Literal["pending_dns", "creating", "issued", "error", "disabled"]


class Record(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=False):
    pass


class DomainRecord(Record, frozen=True):
    name: str  # a host name, or a one-label wildcard `*.shop.example.com`
    app: str
    letsencrypt: bool = True
    created_at: float = 0.0
    # How the CA checks the domain is ours: dns-01 for a wildcard (the only way).
    challenge: Challenge = "http-01"


class AppRecord(Record, frozen=True):
    name: str
    # Empty: a record of settings only (force_https, set through the admin API) over
    # the config's app of this name, which keeps its backends and other settings.
    backends: tuple[str, ...] = ()
    force_https: bool = False
    canonical_domain: str | None = None


class CertMeta(Record, frozen=True):
    """What a certificate record says about the certificate, without the PEM: decoded
    from a CertRecord's JSON (msgspec skips the PEM fields). For views and metrics:
    the supervisor keeps 100,000 of these (~0.6 kB each), never a key."""

    domain: str
    source: CertSource
    names: tuple[str, ...]
    not_before: float
    not_after: float
    fingerprint: str
    issuer: str
    key_type: str


class CertRecord(CertMeta, frozen=True):
    """A certificate's metadata under `certs/<name>/<source>`; its chain and key live
    apart, in a KeyMaterial under `pem/<name>/<source>/<fingerprint>` (pem_key).

    Apart so that what every node reads eagerly (names, validity, fingerprint: ~0.4
    kB) never carries the ~1.2 kB of PEM only a worker serving the name needs, and
    so that the pair stays consistent with single-key writes: the material is
    written first under a key named by its fingerprint and never changed, then the
    metadata that points at it; the old material is deleted after. A reader that
    sees the metadata finds its material; a writer that dies between leaves only an
    unreferenced material record. Records written before the split carry the PEM
    inline (chain_pem, key_pem), and are still read.
    """

    chain_pem: str = ""
    key_pem: str = ""
    stored_at: float = 0.0

    @classmethod
    def from_bundle(cls, domain: str, source: CertSource, bundle: CertBundle,
                    stored_at: float) -> CertRecord:
        """The metadata record (no PEM: see KeyMaterial.from_bundle)."""
        return cls(domain=domain, source=source, names=bundle.names,
                   not_before=bundle.not_before, not_after=bundle.not_after,
                   fingerprint=bundle.fingerprint, issuer=bundle.issuer,
                   key_type=bundle.key_type, stored_at=stored_at)

    def bundle(self, material: KeyMaterial | None = None) -> CertBundle:
        """The bundle without re-parsing: the record was validated when written.
        `material` is the record's KeyMaterial (None: a record with inline PEM)."""
        chain, key = ((material.chain_pem, material.key_pem) if material is not None
                      else (self.chain_pem, self.key_pem))
        if not chain or not key:
            raise BundleError(f"the key material of {self.domain}'s {self.source} "
                              "certificate is missing from the store")
        return trusted_bundle(chain.encode(), key.encode(),
                              names=self.names, not_before=self.not_before,
                              not_after=self.not_after, fingerprint=self.fingerprint,
                              issuer=self.issuer, key_type=self.key_type)

    def __repr__(self) -> str:  # never show key bytes
        return f"CertRecord({self.domain!r}, {self.source}, {self.fingerprint[:16]})"


class KeyMaterial(Record, frozen=True):
    """A certificate's chain and private key (a secret: written 0600, never logged)."""

    chain_pem: str
    key_pem: str

    @classmethod
    def from_bundle(cls, bundle: CertBundle) -> KeyMaterial:
        return cls(chain_pem=bundle.chain_pem.decode(), key_pem=bundle.key_pem.decode())

    def __repr__(self) -> str:
        return f"KeyMaterial(<{len(self.chain_pem)} bytes of chain>, key=<hidden>)"


class StatusRecord(Record, frozen=True):
    """Where the lifecycle is with a domain's ACME certificate."""

    domain: str
    state: State
    message: str = ""
    last_error: str = ""
    updated_at: float = 0.0
    next_dns_check: float = 0.0
    failures: int = 0
    retry_at: float = 0.0
    renew_at: float = 0.0
    # When to ask the CA's renewal information (ARI, RFC 9773) again; 0: never (the
    # CA has none). The CA may move the window after issuance.
    ari_at: float = 0.0
    # The acme.issuers name of the CA that issued the current certificate.
    issuer: str = ""


class Dns01Record(Record, frozen=True):
    """TXT values published at `name` for `domain`'s order, not removed yet: written
    before each is added to DNS, deleted once they are gone, so a sweep removes what a
    process that died in between left (lifecycle/dns01.py)."""

    name: str  # the TXT record's name, absolute, without the final dot
    domain: str  # whose lock the order held
    values: tuple[str, ...] = ()
    updated_at: float = 0.0


class Pause(Record, frozen=True):
    until: float
    why: str


class BudgetRecord(Record, frozen=True):
    """Part of one issuer's order budget: token buckets as their theoretical arrival
    times (GCRA: empty up to `tat`, full once it is past), and pauses the CA asked for;
    lifecycle/budget.py says what the ids mean. Entries past are left out."""

    tats: dict[str, float] = {}
    pauses: dict[str, Pause] = {}


class AccountRecord(Record, frozen=True):
    directory: str
    uri: str
    key_pem: str
    email: str = ""


def domain_key(name: str) -> str:
    return DOMAINS + name


def app_key(name: str) -> str:
    return APPS + name


def cert_key(name: str, source: CertSource) -> str:
    return f"{CERTS}{name}/{source}"


def pem_key(name: str, source: CertSource, fingerprint: str) -> str:
    return f"{PEM}{name}/{source}/{fingerprint}"


def parse_pem_key(key: str) -> tuple[str, str, str] | None:
    """`pem/<name>/<source>/<fingerprint>` -> (name, source, fingerprint)."""
    head, _, fingerprint = key[len(PEM):].rpartition("/")
    name, _, source = head.rpartition("/")
    if not key.startswith(PEM) or not name or source not in ("custom", "acme"):
        return None
    return name, source, fingerprint


def is_secret(key: str) -> bool:
    """Whether the record at `key` may hold a private key (see SECRET_PREFIXES)."""
    return key.startswith(SECRET_PREFIXES)


def budget_key(issuer: str, part: str) -> str:
    """`budget/<issuer id>/<part>`: `account` (its orders, its pauses) or a shard."""
    return f"{BUDGET}{issuer}/{part}"


def dns01_key(txt_name: str) -> str:
    return DNS01 + txt_name


def status_key(name: str) -> str:
    return STATUS + name


def challenge_key(token: str) -> str:
    # ACME tokens are base64url (upper case, '_', '-') but store keys are DNS-safe,
    # lower-case segments: hex keeps every token a valid, reversible key segment.
    return CHALLENGES + token.encode().hex()


def parse_challenge_key(key: str) -> str:
    """`challenges/<hex>` -> the token; ValueError for a key challenge_key never makes."""
    return bytes.fromhex(key[len(CHALLENGES):]).decode("ascii")


def lock_name(domain: str) -> str:
    return f"domain-{domain}"


def parse_cert_key(key: str) -> tuple[str, CertSource] | None:
    """`certs/<name>/<source>` -> (name, source)."""
    if not key.startswith(CERTS):
        return None
    name, _, source = key[len(CERTS):].rpartition("/")
    if source not in ("custom", "acme") or not name:
        return None
    return name, source  # type: ignore[return-value]


_encoder = msgspec.json.Encoder()


def encode(record: Record) -> bytes:
    return _encoder.encode(record)


T = TypeVar("T", bound=Record)


def decode(data: bytes, kind: type[T]) -> T:
    return msgspec.json.decode(data, type=kind)


class Validity(Protocol):
    """What the serving rule reads: a CertMeta, or a worker's certificate entry."""

    @property
    def source(self) -> str: ...
    @property
    def not_before(self) -> float: ...
    @property
    def not_after(self) -> float: ...


V = TypeVar("V", bound=Validity)


def serving_certificate(custom: V | None, acme: V | None, now: float) -> V | None:
    """The product rule for which certificate a custom domain is served with.

    A custom certificate wins while it is valid; otherwise the ACME one (if valid);
    otherwise None (the platform/default certificate answers). Checked against the
    clock on every call, so an expired custom certificate falls back by itself. Both
    the data plane's snapshot builder (sync) and the registry's views use this.
    """
    if custom is not None and custom.not_before <= now < custom.not_after:
        return custom
    if acme is not None and acme.not_before <= now < acme.not_after:
        return acme
    return None
