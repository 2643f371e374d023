"""Whether browsers would trust an uploaded chain: the trust anchors (the system store
plus the PEM file of `tls.trusted_ca_file`) and the check of a chain against them.

An untrusted chain is accepted (its owner may fix it later, or serve clients that
pin it) but most clients would fail, so `chain_warning` gives the one line to show
the person who uploaded it. It runs where uploads are validated, off the event loop,
never on the data path. Anchors are read once per version (size, mtime) of the files.
"""

from __future__ import annotations

import re
import threading
import warnings
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from cryptography import x509
from cryptography.utils import CryptographyDeprecationWarning
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

__all__ = ["SYSTEM_CA_FILE", "Anchors", "anchors", "chain_warning"]

# Debian's bundle of the roots browsers trust (the ca-certificates package).
SYSTEM_CA_FILE = "/etc/ssl/certs/ca-certificates.crt"

_PEM_CERT = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.DOTALL)
_UNTRUSTED = "browsers will not trust it"


@dataclass(frozen=True, slots=True)
class Anchors:
    """The trusted roots, ready for verification (store is None when there are none)."""

    store: Store | None
    subjects: frozenset[bytes]  # DER of each root's subject: "is X issued by a root?"


_lock = threading.Lock()
_cache: dict[tuple[tuple[str, int, int], ...], Anchors] = {}


def anchors(extra_file: str | None = None) -> Anchors:
    """The system roots plus those of `extra_file`; a missing system file adds none."""
    paths = [SYSTEM_CA_FILE] + ([extra_file] if extra_file else [])
    versions: list[tuple[str, int, int]] = []
    for path in paths:
        try:
            st = Path(path).stat()
        except OSError:
            continue
        versions.append((path, st.st_size, st.st_mtime_ns))
    key = tuple(versions)
    with _lock:
        found = _cache.get(key)
        if found is None:
            roots = [cert for path, _, _ in versions for cert in _read_roots(path)]
            found = Anchors(Store(roots) if roots else None,
                            frozenset(c.subject.public_bytes() for c in roots))
            _cache.clear()  # only the current version of the files is ever asked for
            _cache[key] = found
    return found


def _read_roots(path: str) -> list[x509.Certificate]:
    try:
        data = Path(path).read_bytes()
    except OSError:
        return []
    roots: list[x509.Certificate] = []
    # One by one: a root cryptography cannot parse must not hide the others.
    with warnings.catch_warnings():
        # Some long-trusted roots have a negative serial; cryptography only warns.
        warnings.simplefilter("ignore", CryptographyDeprecationWarning)
        for block in _PEM_CERT.findall(data):
            try:
                roots.append(x509.load_pem_x509_certificate(block))
            except ValueError:
                continue
    return roots


def chain_warning(chain_pem: bytes, name: str, trusted: Anchors, now: float) -> str | None:
    """None when a browser would accept `chain_pem` (leaf first) for `name` at `now`;
    else one line saying why not and what to do. None too when there are no anchors
    to check against."""
    if trusted.store is None:
        return None
    certs = x509.load_pem_x509_certificates(chain_pem)
    verifier = (PolicyBuilder().store(trusted.store)
                .time(datetime.fromtimestamp(now, UTC))
                .build_server_verifier(x509.DNSName(name)))
    try:
        verifier.verify(certs[0], certs[1:])
    except VerificationError as exc:
        reason = str(exc).split(" (encountered processing", 1)[0]
    else:
        return None
    top = certs[-1]
    if trusted.subjects & {top.subject.public_bytes(), top.issuer.public_bytes()}:
        # The chain reaches a trusted root's name, yet does not verify: say why.
        return f"chain does not verify: {_UNTRUSTED} ({reason})"
    if top.issuer == top.subject:
        what = "self-signed certificate" if len(certs) == 1 else "untrusted root"
        return (f"{what}: {_UNTRUSTED} ({top.subject.rfc4514_string()} is not in the "
                "trust store)")
    return (f"incomplete chain: {_UNTRUSTED} (its last certificate is issued by "
            f"{top.issuer.rfc4514_string()}, which is not a trusted root: add the "
            "intermediate certificates after yours)")
