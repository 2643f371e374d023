"""A throwaway certificate authority for tests and benchmarks: CA, optional
intermediate, leaf certificates for given names, as PEM bytes or 0600 files.
Test-only: never imported by proxy/, never used for a real key.
"""

from __future__ import annotations

import datetime as dt
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, TypeAlias

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

PrivateKey: TypeAlias = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
KeyType = Literal["ecdsa", "ecdsa-p384", "ecdsa-p521", "rsa", "rsa-1024", "rsa-4096", "ed25519"]
When = dt.datetime | float | None

_RSA_CACHE: dict[int, rsa.RSAPrivateKey] = {}
DAY = 86400.0


def new_key(key_type: KeyType = "ecdsa") -> PrivateKey:
    """A fresh key; RSA keys are generated once per size per process (they are slow)."""
    if key_type == "ecdsa":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type == "ecdsa-p384":
        return ec.generate_private_key(ec.SECP384R1())
    if key_type == "ecdsa-p521":
        return ec.generate_private_key(ec.SECP521R1())
    if key_type == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    bits = {"rsa": 2048, "rsa-1024": 1024, "rsa-4096": 4096}[key_type]
    if bits not in _RSA_CACHE:
        _RSA_CACHE[bits] = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    return _RSA_CACHE[bits]


def key_pem(key: PrivateKey, fmt: Literal["pkcs8", "traditional"] = "pkcs8",
            password: bytes | None = None) -> bytes:
    """PEM of a key: PKCS8 ("PRIVATE KEY") or traditional ("EC/RSA PRIVATE KEY")."""
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(password) if password
        else serialization.NoEncryption())
    private_format = (serialization.PrivateFormat.PKCS8 if fmt == "pkcs8"
                      else serialization.PrivateFormat.TraditionalOpenSSL)
    return key.private_bytes(serialization.Encoding.PEM, private_format, encryption)


def _time(value: When, default: dt.datetime) -> dt.datetime:
    if value is None:
        return default
    if isinstance(value, dt.datetime):
        return value
    return dt.datetime.fromtimestamp(value, dt.UTC)


def _sign_alg(key: PrivateKey) -> hashes.SHA256 | None:
    return None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()


def _authority_key_id(issuer_key: PrivateKey) -> x509.AuthorityKeyIdentifier:
    return x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key())


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


@dataclass(frozen=True)
class Issued:
    """A leaf certificate as issued: chain (leaf first) and key, both PEM."""

    chain_pem: bytes
    key_pem: bytes
    fingerprint: str  # sha256 hex of the leaf DER
    cert: x509.Certificate = field(repr=False)

    @property
    def leaf_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def write(self, directory: str | os.PathLike[str], stem: str) -> tuple[str, str]:
        """Write <stem>.crt and <stem>.key (mode 0600) into directory; return both paths."""
        base = Path(directory)
        base.mkdir(parents=True, exist_ok=True)
        cert_path = base / f"{stem}.crt"
        key_path = base / f"{stem}.key"
        cert_path.write_bytes(self.chain_pem)
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(self.key_pem)
        os.chmod(key_path, 0o600)  # an existing file keeps its mode through O_CREAT
        return str(cert_path), str(key_path)


class CA:
    """A self-signed root (ECDSA P-256) that issues leaf certificates."""

    def __init__(self, name: str, key: PrivateKey, cert: x509.Certificate) -> None:
        self.name = name
        self.key = key
        self.cert = cert
        self._intermediate: CA | None = None

    @classmethod
    def new(cls, name: str = "tlsedge test CA", *, key_type: KeyType = "ecdsa",
            issuer: CA | None = None) -> CA:
        """A new root CA, or an intermediate signed by `issuer`."""
        key = new_key(key_type)
        now = dt.datetime.now(dt.UTC)
        signer_key = issuer.key if issuer else key
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(name))
            .issuer_name(issuer.cert.subject if issuer else _name(name))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False,
                                         decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
        )
        if issuer:  # as public CAs do; strict verifiers (cryptography's) require it
            builder = builder.add_extension(_authority_key_id(signer_key), critical=False)
        cert = builder.sign(signer_key, _sign_alg(signer_key))
        return cls(name, key, cert)

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def write_ca(self, path: str | os.PathLike[str]) -> str:
        Path(path).write_bytes(self.cert_pem)
        return str(path)

    def intermediate(self) -> CA:
        """This root's intermediate CA (made once, then reused)."""
        if self._intermediate is None:
            self._intermediate = CA.new(f"{self.name} intermediate", issuer=self)
        return self._intermediate

    def issue(self, names: list[str] | tuple[str, ...] | str, key_type: KeyType = "ecdsa", *,
              not_before: When = None, not_after: When = None, intermediate: bool = False,
              key: PrivateKey | None = None, common_name: str | None = None,
              san: bool = True, is_ca: bool = False) -> Issued:
        """Issue a leaf for `names` (SAN DNS names; the first is also the CN).

        Validity defaults to yesterday .. in 90 days. `key` reuses a key (fast bulk
        issuing); `san=False` leaves names to the CN only; `is_ca=True` makes a
        leaf with CA:TRUE (a bad upload).
        """
        names = [names] if isinstance(names, str) else list(names)
        signer = self.intermediate() if intermediate else self
        leaf_key = key if key is not None else new_key(key_type)
        now = dt.datetime.now(dt.UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name or (names[0] if names else "no name")))
            .issuer_name(signer.cert.subject)
            .public_key(leaf_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(_time(not_before, now - dt.timedelta(days=1)))
            .not_valid_after(_time(not_after, now + dt.timedelta(days=90)))
            .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .add_extension(_authority_key_id(signer.key), critical=False)
        )
        if san and names:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False)
        cert = builder.sign(signer.key, _sign_alg(signer.key))
        chain = cert.public_bytes(serialization.Encoding.PEM)
        if intermediate:
            chain += signer.cert_pem
        return Issued(chain, key_pem(leaf_key), cert.fingerprint(hashes.SHA256()).hex(), cert)
