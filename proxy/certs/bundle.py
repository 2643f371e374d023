"""CertBundle: one validated certificate chain and its private key, as plain bytes.

Owns the parsing and every acceptance rule for uploaded or configured PEM. It never
writes files, never logs, and never puts key material into an error message.
"""

from __future__ import annotations

import base64
import binascii
import re
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtensionOID

from proxy.certs.csr import private_key_pem
from proxy.errors import BundleError, InvalidName
from proxy.names import covers as _covers
from proxy.names import normalize

__all__ = ["CertBundle", "load_bundle", "load_bundle_files", "trusted_bundle"]

MAX_INPUT = 1 << 20
_PEM_BLOCK = re.compile(
    rb"-----BEGIN ([A-Z0-9 ]+)-----\r?\n(.*?)-----END \1-----", re.DOTALL
)
_KEY_LABELS = (b"PRIVATE KEY", b"EC PRIVATE KEY", b"RSA PRIVATE KEY")
_CURVES = {"secp256r1": "ecdsa-p256", "secp384r1": "ecdsa-p384"}
_SHOWN_NAMES = 6


@dataclass(frozen=True, slots=True)
class CertBundle:
    """A certificate chain + key that passed `load_bundle` (or was stored after it did).

    chain_pem is leaf first then intermediates, "\\n" line ends; key_pem is PKCS8.
    names are normalised SAN DNS names in certificate order.
    """

    chain_pem: bytes
    key_pem: bytes
    names: tuple[str, ...]
    primary_name: str
    not_before: float
    not_after: float
    fingerprint: str
    issuer: str
    key_type: str

    def covers(self, name: str) -> bool:
        """True when one of the certificate's names matches `name` (RFC 6125)."""
        return any(_covers(pattern, name) for pattern in self.names)

    def is_valid_at(self, now: float) -> bool:
        return self.not_before <= now <= self.not_after

    def __repr__(self) -> str:  # never show key bytes, even in a debugger
        return (f"CertBundle(primary_name={self.primary_name!r}, names={len(self.names)}, "
                f"fingerprint={self.fingerprint[:16]}..., not_after={self.not_after:.0f})")


class _KeyRejected(BundleError):
    """The private key (not the chain) is at fault; load_bundle_files names the key path."""


def trusted_bundle(chain_pem: bytes, key_pem: bytes, *, names: tuple[str, ...] | list[str],
                   not_before: float, not_after: float, fingerprint: str, issuer: str,
                   key_type: str) -> CertBundle:
    """A CertBundle from a record the store already validated: no parsing, O(1).

    For starting with 100,000 certificates. The caller vouches that the fields
    describe the PEM (they were produced by `load_bundle` when the record was written).
    """
    names = tuple(names)
    if not names:
        raise BundleError("certificate record has no names")
    return CertBundle(chain_pem, key_pem, names, names[0], float(not_before), float(not_after),
                      fingerprint, issuer, key_type)


def load_bundle(chain: bytes, key: bytes, *, domain: str | None = None,
                now: float | None = None, check_time: bool = True) -> CertBundle:
    """Parse and validate a PEM chain and key; raise BundleError with one clear line.

    The chain is reordered leaf -> issuer -> ... with duplicates dropped; it must be
    one path. The leaf must be a serving (non-CA) certificate with a subjectAltName
    holding at least one DNS name, match the key, cover `domain` when given and be
    valid at `now` (when check_time). Keys: RSA >= 2048 or ECDSA P-256/P-384, unencrypted.
    """
    certs = _parse_chain(chain)
    private_key = _parse_key(key)
    key_type = _key_type(private_key)
    spki = _spki(private_key.public_key())
    leaves = [c for c in certs if _spki(c.public_key()) == spki]
    if not leaves:
        raise _KeyRejected("private key does not match the certificate")
    ordered = _order_chain(leaves[0], certs)
    leaf = ordered[0]
    if _is_ca(leaf):
        raise BundleError(f"certificate for {_subject(leaf)} is a CA certificate (CA:TRUE), "
                          "not a server certificate: have your CA sign a CSR from "
                          "`tlsedge csr NAME...` (basicConstraints CA:FALSE)")
    names = _dns_names(leaf)
    if domain is not None:
        wanted = normalize(domain, allow_wildcard=True)
        if not any(_covers(pattern, wanted) for pattern in names):
            raise BundleError(f"certificate does not cover {wanted} (it covers {_list(names)})")
    not_before = leaf.not_valid_before_utc.timestamp()
    not_after = leaf.not_valid_after_utc.timestamp()
    if check_time:
        at = time.time() if now is None else now
        if at > not_after:
            raise BundleError(f"certificate expired on {_when(not_after)}")
        if at < not_before:
            raise BundleError(f"certificate is not valid before {_when(not_before)}")
    chain_pem = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in ordered)
    key_pem = private_key_pem(private_key)
    return CertBundle(chain_pem, key_pem, names, names[0], not_before, not_after,
                      leaf.fingerprint(hashes.SHA256()).hex(), leaf.issuer.rfc4514_string(),
                      key_type)


def load_bundle_files(cert_path: str, key_path: str, **kw: Any) -> CertBundle:
    """load_bundle on two files; each error message starts with the path at fault."""
    chain = _read(cert_path)
    key = _read(key_path)
    try:
        return load_bundle(chain, key, **kw)
    except _KeyRejected as exc:
        raise BundleError(f"{key_path}: {exc}") from None
    except BundleError as exc:
        raise BundleError(f"{cert_path}: {exc}") from None


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_INPUT + 1)
    except OSError as exc:
        raise BundleError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if len(data) > MAX_INPUT:
        raise BundleError(f"{path}: file is larger than 1 MiB")
    return data


def _blocks(data: bytes) -> list[tuple[bytes, bytes]]:
    """(label, body) of each PEM block; tolerates CRLF, a UTF-8 BOM and text around."""
    data = data.replace(b"\r\n", b"\n").removeprefix(b"\xef\xbb\xbf")
    return [(m.group(1), m.group(2)) for m in _PEM_BLOCK.finditer(data)]


def _looks_der(data: bytes) -> bool:
    return data[:1] == b"\x30" and b"-----BEGIN" not in data


def _parse_chain(data: bytes) -> list[x509.Certificate]:
    if len(data) > MAX_INPUT:
        raise BundleError("certificate chain is larger than 1 MiB")
    if _looks_der(data):
        raise BundleError("certificate is DER-encoded; upload PEM "
                          "(openssl x509 -inform der -out cert.pem)")
    blocks = [body for label, body in _blocks(data) if label == b"CERTIFICATE"]
    if not blocks:
        raise BundleError("no PEM certificate found (expected -----BEGIN CERTIFICATE-----)")
    certs: list[x509.Certificate] = []
    seen: set[bytes] = set()
    for number, body in enumerate(blocks, 1):
        try:
            der = base64.b64decode(b"".join(body.split()), validate=True)
            cert = x509.load_der_x509_certificate(der)
        except (ValueError, binascii.Error):
            raise BundleError(f"certificate {number} of the chain is not a valid "
                              "X.509 certificate") from None
        fingerprint = cert.fingerprint(hashes.SHA256())
        if fingerprint not in seen:  # a repeated intermediate is harmless: drop it
            seen.add(fingerprint)
            certs.append(cert)
    return certs


def _parse_key(data: bytes) -> ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey:
    if len(data) > MAX_INPUT:
        raise _KeyRejected("private key is larger than 1 MiB")
    if _looks_der(data):
        raise _KeyRejected("private key is DER-encoded; upload PEM "
                           "(openssl pkey -inform der -out key.pem)")
    blocks = _blocks(data)
    if any(label == b"ENCRYPTED PRIVATE KEY" or body.startswith(b"Proc-Type: 4,ENCRYPTED")
           for label, body in blocks):
        raise _KeyRejected("passphrase-protected keys are not supported")
    keys = [(label, body) for label, body in blocks if label in _KEY_LABELS]
    if not keys:
        raise _KeyRejected("no PEM private key found (expected -----BEGIN PRIVATE KEY-----)")
    if len(keys) > 1:
        raise _KeyRejected(f"found {len(keys)} private keys; upload exactly one")
    label, body = keys[0]
    pem = b"-----BEGIN " + label + b"-----\n" + body + b"-----END " + label + b"-----\n"
    try:
        private_key = serialization.load_pem_private_key(pem, password=None)
    except TypeError:
        raise _KeyRejected("passphrase-protected keys are not supported") from None
    except (ValueError, binascii.Error):
        # cryptography's message could quote the input: say only what is wrong.
        raise _KeyRejected("private key could not be parsed") from None
    if isinstance(private_key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
        return private_key
    kind = type(private_key).__name__.removeprefix("_").replace("PrivateKey", "")
    raise _KeyRejected(f"{kind or 'this'} keys are not supported "
                       "(use ECDSA P-256/P-384 or RSA of at least 2048 bits)")


def _key_type(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> str:
    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < 2048:
            raise _KeyRejected(f"RSA key of {key.key_size} bits is too small (at least 2048)")
        return f"rsa-{key.key_size}"
    kind = _CURVES.get(key.curve.name)
    if kind is None:
        raise _KeyRejected(f"ECDSA curve {key.curve.name} is not supported (use P-256 or P-384)")
    return kind


def _spki(public_key: Any) -> bytes:
    try:
        return bytes(public_key.public_bytes(serialization.Encoding.DER,
                                             serialization.PublicFormat.SubjectPublicKeyInfo))
    except (ValueError, TypeError):
        return b""


def _order_chain(leaf: x509.Certificate,
                 certs: list[x509.Certificate]) -> list[x509.Certificate]:
    """leaf -> its issuer -> ...; every certificate given must be on that one path."""
    rest = [c for c in certs if c is not leaf]
    path = [leaf]
    current = leaf
    while rest and current.issuer != current.subject:
        candidates = [c for c in rest if c.subject == current.issuer]
        if len(candidates) > 1:
            candidates = [c for c in candidates if _signed_by(current, c)] or candidates[:1]
        if not candidates:
            break
        current = candidates[0]
        rest.remove(current)
        path.append(current)
    if rest:
        stray = ", ".join(_subject(c) for c in rest[:3])
        raise BundleError(f"certificate chain is not one path: {stray} does not certify "
                          f"{_subject(path[-1])} or any certificate above it")
    return path


def _signed_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    except x509.ExtensionNotFound:
        return False
    return constraints.value.ca


def _dns_names(cert: x509.Certificate) -> tuple[str, ...]:
    try:
        san = cert.extensions.get_extension_for_oid(ExtensionOID.SUBJECT_ALTERNATIVE_NAME)
    except x509.ExtensionNotFound:
        # Browsers stopped reading the CN (Chrome 58, 2017): such a certificate would be
        # served and refused by every client.
        raise BundleError("the certificate has no subjectAltName; browsers ignore the CN "
                          "(reissue it with the names in the subjectAltName)") from None
    raw = san.value.get_values_for_type(x509.DNSName)  # type: ignore[attr-defined]
    names: list[str] = []
    for value in raw:
        try:
            name = normalize(str(value), allow_wildcard=True)
        except InvalidName:
            continue  # such a name can never match a normalised SNI
        if name not in names:
            names.append(name)
    if not names:
        raise BundleError(f"certificate for {_subject(cert)} names no DNS hostname")
    return tuple(names)


def _subject(cert: x509.Certificate) -> str:
    return cert.subject.rfc4514_string() or "(empty subject)"


def _list(names: tuple[str, ...]) -> str:
    shown = ", ".join(names[:_SHOWN_NAMES])
    more = len(names) - _SHOWN_NAMES
    return shown + (f" and {more} more" if more > 0 else "")


def _when(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M UTC")
