"""New private keys and certificate signing requests.

The one place keys and CSRs are made: `tlsedge csr` and the lifecycle's ACME orders
(and its account key) both call it. A key is never logged or passed on a command line;
whoever writes one to disk does it with proxy.atomicfile.write_atomic (0600).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

KeyType = Literal["ecdsa", "rsa"]
PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey

# X.520 ub-common-name: a longer CN cannot be encoded. The SAN is what clients and CAs
# read (the CN is informational), so a longer name goes in the SAN only.
CN_MAX = 64


def new_key(key_type: KeyType = "ecdsa") -> PrivateKey:
    if key_type == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return ec.generate_private_key(ec.SECP256R1())


def private_key_pem(key: PrivateKey) -> bytes:
    """The unencrypted PKCS8 PEM of `key`."""
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def csr_pem(key: PrivateKey, domain: str, also: Sequence[str] = ()) -> bytes:
    """A CSR signed by `key` for `domain` and the names `also` (SANs, in that order),
    with `domain` as the CN when it fits."""
    subject = ([x509.NameAttribute(NameOID.COMMON_NAME, domain)]
               if len(domain) <= CN_MAX else [])
    sans = [x509.DNSName(n) for n in dict.fromkeys((domain, *also))]
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name(subject))
           .add_extension(x509.SubjectAlternativeName(sans), critical=False)
           .sign(key, hashes.SHA256()))
    return csr.public_bytes(serialization.Encoding.PEM)


def key_and_csr(domain: str, key_type: KeyType = "ecdsa",
                also: Sequence[str] = ()) -> tuple[bytes, bytes]:
    """(private key PEM, CSR PEM) for `domain` and the names `also`."""
    key = new_key(key_type)
    return private_key_pem(key), csr_pem(key, domain, also)
