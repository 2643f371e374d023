"""CertBundle validation: every rejection has its own one-line message."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from proxy.certs.bundle import CertBundle, load_bundle, load_bundle_files, trusted_bundle
from proxy.errors import BundleError
from tests.certgen import CA, DAY, Issued, key_pem, new_key


@pytest.fixture(scope="module")
def ca() -> CA:
    return CA.new("bundle test CA")


@pytest.fixture(scope="module")
def issued(ca: CA) -> Issued:
    return ca.issue(["example.com", "*.example.org"], intermediate=True)


def _reject(chain: bytes, key: bytes, message: str, **kw: object) -> str:
    with pytest.raises(BundleError) as info:
        load_bundle(chain, key, **kw)  # type: ignore[arg-type]
    text = str(info.value)
    assert "\n" not in text
    assert message in text, text
    return text


def test_valid_bundle_reports_names_times_fingerprint_issuer_and_key_type(
        ca: CA, issued: Issued) -> None:
    bundle = load_bundle(issued.chain_pem, issued.key_pem, domain="www.example.org")
    assert bundle.names == ("example.com", "*.example.org")
    assert bundle.primary_name == "example.com"
    assert bundle.fingerprint == issued.fingerprint
    assert bundle.issuer == "CN=bundle test CA intermediate"
    assert bundle.key_type == "ecdsa-p256"
    assert bundle.not_before < time.time() < bundle.not_after
    assert bundle.chain_pem.count(b"BEGIN CERTIFICATE") == 2
    assert bundle.key_pem.startswith(b"-----BEGIN PRIVATE KEY-----\n")
    assert bundle.covers("a.example.org") and not bundle.covers("example.org")
    assert bundle.is_valid_at(time.time()) and not bundle.is_valid_at(bundle.not_after + 1)


def test_crlf_bom_and_text_around_blocks_are_tolerated(issued: Issued) -> None:
    chain = b"\xef\xbb\xbfsubject=CN = example.com\r\n" + issued.chain_pem.replace(
        b"\n", b"\r\n") + b"trailing notes\r\n"
    key = b"Bag Attributes\n" + issued.key_pem.replace(b"\n", b"\r\n")
    bundle = load_bundle(chain, key)
    assert bundle.fingerprint == issued.fingerprint
    assert b"\r" not in bundle.chain_pem and not bundle.chain_pem.startswith(b"\xef")


def test_misordered_chain_with_duplicates_is_reordered_leaf_first(
        ca: CA, issued: Issued) -> None:
    leaf, inter = issued.leaf_pem, ca.intermediate().cert_pem
    bundle = load_bundle(ca.cert_pem + inter + leaf + inter, issued.key_pem)
    blocks = bundle.chain_pem.split(b"-----END CERTIFICATE-----\n")[:-1]
    assert [b + b"-----END CERTIFICATE-----\n" for b in blocks] == [leaf, inter, ca.cert_pem]


def test_chain_that_is_not_one_path_is_rejected(ca: CA, issued: Issued) -> None:
    stranger = CA.new("unrelated CA")
    _reject(issued.chain_pem + stranger.cert_pem, issued.key_pem,
            "certificate chain is not one path: CN=unrelated CA")


def test_key_of_another_certificate_is_rejected(ca: CA, issued: Issued) -> None:
    other = ca.issue(["example.com"])
    _reject(issued.chain_pem, other.key_pem, "private key does not match the certificate")


def test_certificate_not_covering_the_domain_names_what_it_covers(issued: Issued) -> None:
    text = _reject(issued.chain_pem, issued.key_pem, "", domain="www.example.com")
    assert text == "certificate does not cover www.example.com (it covers example.com, " \
                   "*.example.org)"


def test_expired_and_not_yet_valid_certificates_are_rejected_unless_time_unchecked(
        ca: CA) -> None:
    now = time.time()
    old = ca.issue(["old.example.com"], not_before=now - 100 * DAY, not_after=now - DAY)
    _reject(old.chain_pem, old.key_pem, "certificate expired on ")
    future = ca.issue(["new.example.com"], not_before=now + DAY, not_after=now + 90 * DAY)
    _reject(future.chain_pem, future.key_pem, "certificate is not valid before ")
    assert load_bundle(old.chain_pem, old.key_pem, check_time=False).names == (
        "old.example.com",)
    assert load_bundle(future.chain_pem, future.key_pem, now=now + 2 * DAY).is_valid_at(
        now + 2 * DAY)


def test_ca_certificate_as_leaf_is_rejected(ca: CA) -> None:
    bad = ca.issue(["ca.example.com"], is_ca=True)
    _reject(bad.chain_pem, bad.key_pem, "is a CA certificate (CA:TRUE), not a server")


def test_certificate_without_dns_names_is_rejected(ca: CA) -> None:
    bad = ca.issue(["not a hostname"])
    _reject(bad.chain_pem, bad.key_pem, "names no DNS hostname")


def test_certificate_without_san_is_rejected_and_the_cn_is_never_used(ca: CA) -> None:
    cn_only = ca.issue(["legacy.example.com"], san=False)
    _reject(cn_only.chain_pem, cn_only.key_pem,
            "the certificate has no subjectAltName; browsers ignore the CN")
    both = ca.issue(["san.example.com"], common_name="cn.example.com")
    assert load_bundle(both.chain_pem, both.key_pem).names == ("san.example.com",)


@pytest.mark.parametrize(("key_type", "message"), [
    ("rsa-1024", "RSA key of 1024 bits is too small (at least 2048)"),
    ("ecdsa-p521", "ECDSA curve secp521r1 is not supported (use P-256 or P-384)"),
    ("ed25519", "Ed25519 keys are not supported"),
])
def test_weak_or_unsupported_keys_are_rejected(ca: CA, key_type: str, message: str) -> None:
    bad = ca.issue(["k.example.com"], key_type)  # type: ignore[arg-type]
    _reject(bad.chain_pem, bad.key_pem, message)


@pytest.mark.parametrize(("key_type", "expected"), [
    ("ecdsa", "ecdsa-p256"), ("ecdsa-p384", "ecdsa-p384"), ("rsa", "rsa-2048")])
def test_supported_key_types_are_named(ca: CA, key_type: str, expected: str) -> None:
    good = ca.issue(["k.example.com"], key_type)  # type: ignore[arg-type]
    assert load_bundle(good.chain_pem, good.key_pem).key_type == expected


@pytest.mark.parametrize("fmt", ["pkcs8", "traditional"])
def test_pkcs8_ec_and_rsa_private_key_labels_are_accepted_and_stored_as_pkcs8(
        ca: CA, fmt: str) -> None:
    for key_type, label in (("ecdsa", b"EC PRIVATE KEY"), ("rsa", b"RSA PRIVATE KEY")):
        key = new_key(key_type)  # type: ignore[arg-type]
        leaf = ca.issue(["t.example.com"], key=key)
        pem = key_pem(key, fmt)  # type: ignore[arg-type]
        assert (label in pem) is (fmt == "traditional")
        bundle = load_bundle(leaf.chain_pem, pem)
        assert bundle.key_pem.startswith(b"-----BEGIN PRIVATE KEY-----")


@pytest.mark.parametrize("fmt", ["pkcs8", "traditional"])
def test_encrypted_key_is_rejected_with_exact_message(ca: CA, fmt: str) -> None:
    key = new_key("ecdsa")
    leaf = ca.issue(["enc.example.com"], key=key)
    encrypted = key_pem(key, fmt, password=b"hunter2")  # type: ignore[arg-type]
    with pytest.raises(BundleError) as info:
        load_bundle(leaf.chain_pem, encrypted)
    assert str(info.value) == "passphrase-protected keys are not supported"


def test_der_certificate_is_rejected_with_conversion_hint(issued: Issued) -> None:
    der = issued.cert.public_bytes(serialization.Encoding.DER)
    with pytest.raises(BundleError) as info:
        load_bundle(der, issued.key_pem)
    assert str(info.value) == ("certificate is DER-encoded; upload PEM "
                               "(openssl x509 -inform der -out cert.pem)")


def test_oversized_inputs_are_rejected_before_parsing(issued: Issued) -> None:
    huge = b"x" * ((1 << 20) + 1)
    _reject(huge, issued.key_pem, "larger than 1 MiB")
    _reject(issued.chain_pem, huge, "larger than 1 MiB")


def test_garbage_inputs_are_rejected_without_echoing_key_material(issued: Issued) -> None:
    _reject(b"hello", issued.key_pem, "no PEM certificate found")
    _reject(issued.chain_pem, b"nothing here", "no PEM private key found")
    broken_key = issued.key_pem.replace(issued.key_pem[40:60], b"A" * 20)
    text = _reject(issued.chain_pem, broken_key, "private key")
    body = b"".join(issued.key_pem.splitlines()[1:-1]).decode()
    assert body[:16] not in text and "AAAA" not in text
    broken_cert = issued.chain_pem.replace(issued.chain_pem[100:140], b"B" * 40, 1)
    _reject(broken_cert, issued.key_pem, "certificate 1 of the chain is not a valid")


def test_two_keys_are_rejected(issued: Issued) -> None:
    _reject(issued.chain_pem, issued.key_pem + key_pem(new_key()), "found 2 private keys")


def test_file_errors_start_with_the_path_at_fault(tmp_path: Path, ca: CA,
                                                  issued: Issued) -> None:
    cert_path, key_path = issued.write(tmp_path, "site")
    assert (Path(key_path).stat().st_mode & 0o777) == 0o600
    assert load_bundle_files(cert_path, key_path).fingerprint == issued.fingerprint
    _, other_key = ca.issue(["example.com"]).write(tmp_path, "other")
    with pytest.raises(BundleError, match=f"^{other_key}: private key does not match"):
        load_bundle_files(cert_path, other_key)
    with pytest.raises(BundleError, match=f"^{cert_path}: certificate does not cover a.b.c"):
        load_bundle_files(cert_path, key_path, domain="a.b.c")
    missing = str(tmp_path / "missing.crt")
    with pytest.raises(BundleError, match=f"^{missing}: cannot read"):
        load_bundle_files(missing, key_path)


def test_trusted_bundle_parses_nothing_and_keeps_the_given_fields() -> None:
    bundle = trusted_bundle(b"chain", b"key", names=["a.example.com", "*.example.com"],
                            not_before=1, not_after=2, fingerprint="ff", issuer="CN=x",
                            key_type="ecdsa-p256")
    assert isinstance(bundle, CertBundle)
    assert bundle.primary_name == "a.example.com" and bundle.names[1] == "*.example.com"
    assert "key" not in repr(bundle).replace("key_type", "")

