"""Pebble (Debian's /usr/bin/pebble 2.4) as a test fixture: a real ACME CA on 127.0.0.1.

    with DNSServer() as dns_server, Pebble(http_port=proxy_port, dns_port=dns_server.port) as ca:
        net = ClientNetwork(key, alg=jose.ES256, verify_ssl=str(ca.ca_bundle_path))
        directory = ClientV2.get_directory(ca.directory_url, net)
        ...
        ca.stop()   # "CA down"
        ca.start()  # same ports, new issuing root/intermediate, empty database

Pebble keeps everything in memory: a restart forgets accounts and orders and makes a new
issuing hierarchy, so call `issuing_roots()` again after `start()`.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import re
import shutil
import signal
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import (  # type: ignore[attr-defined]
    DNSName,
    PolicyBuilder,
    Store,
)

from .ports import free_port

__all__ = ["PEBBLE_BINARY", "Pebble", "PebbleError", "make_listener_tls", "verify_fullchain"]

PEBBLE_BINARY = "/usr/bin/pebble"
_POLL_INTERVAL = 0.02
_START_MARK = "=== tests.support.pebble: start #{n} ===\n"
_ORDERS_RE = re.compile(r"There are now (\d+) orders in the db")
_ADDED_ORDER_RE = re.compile(r"Added order \"?([^\" ]+)\"? to the db")
_ISSUED_RE = re.compile(r"Issued certificate serial ([0-9a-f]+) for order (\S+)")


class PebbleError(RuntimeError):
    """Pebble did not start, or its management API answered unexpectedly."""


# --------------------------------------------------------------------------- TLS material


def make_listener_tls(directory: Path) -> tuple[Path, Path, Path]:
    """Write a throwaway CA and a localhost/127.0.0.1 server certificate signed by it.

    Returns (ca_cert_path, server_cert_path, server_key_path), all PEM.
    """
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "tlsedge test pebble CA")])
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    ca_path = directory / "listener-ca.pem"
    cert_path = directory / "listener-cert.pem"
    key_path = directory / "listener-key.pem"
    ca_path.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return ca_path, cert_path, key_path


def verify_fullchain(
    fullchain_pem: bytes, root_pem: bytes, dns_name: str | None = None
) -> list[x509.Certificate]:
    """Check an issued chain against `root_pem`; return it as [leaf, intermediate, ...].

    Each certificate must be directly signed by the next one, the last by the root; if
    `dns_name` is given, the chain must also pass cryptography's web-PKI server verifier
    for that name (validity, SAN, EKU, path building). Raises on any failure.
    """
    chain = x509.load_pem_x509_certificates(fullchain_pem)
    root = x509.load_pem_x509_certificate(root_pem)
    for child, parent in zip(chain, [*chain[1:], root], strict=True):
        child.verify_directly_issued_by(parent)
    if dns_name is not None:
        verifier = PolicyBuilder().store(Store([root])).build_server_verifier(DNSName(dns_name))
        verifier.verify(chain[0], chain[1:])
    return chain


# --------------------------------------------------------------------------- the fixture


class Pebble:
    """One pebble process (restartable) with its config, TLS files and log in a temp dir."""

    def __init__(
        self,
        *,
        http_port: int,
        dns_port: int,
        tls_port: int | None = None,
        validity_seconds: int | None = None,
        nonce_reject: int | None = None,
        authz_reuse: int | None = None,
        chain_length: int | None = None,
        always_valid: bool = False,
        va_nosleep: bool = True,
        strict: bool = False,
        env: Mapping[str, str] | None = None,
        config_overrides: Mapping[str, Any] | None = None,
        workdir: Path | None = None,
        binary: str = PEBBLE_BINARY,
        start_timeout: float = 10.0,
    ) -> None:
        """Prepare (not start) pebble.

        `http_port` is where pebble connects for HTTP-01 (the proxy's plain-HTTP port);
        `dns_port` is the 127.0.0.1 DNS server pebble resolves every name with.
        `validity_seconds` sets certificateValidityPeriod (60 -> a 59-second certificate).
        `nonce_reject` (PEBBLE_WFE_NONCEREJECT, pebble default 5 %), `authz_reuse`
        (PEBBLE_AUTHZREUSE, default 50 %), `chain_length` (PEBBLE_CHAIN_LENGTH) and
        `always_valid` (PEBBLE_VA_ALWAYS_VALID) map to pebble's environment; None keeps
        pebble's default. `env` adds or overrides any other variable.
        """
        self.http_port = http_port
        self.dns_port = dns_port
        self.tls_port = tls_port if tls_port is not None else free_port()
        self.listen_port = free_port()
        self.management_port = free_port()
        self.strict = strict
        self.binary = binary
        self.start_timeout = start_timeout
        self._own_workdir = workdir is None
        self.workdir = Path(tempfile.mkdtemp(prefix="pebble-")) if workdir is None else workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.workdir / "pebble.log"
        self.config_path = self.workdir / "pebble-config.json"
        self._proc: subprocess.Popen[bytes] | None = None
        self._starts = 0
        self._roots: list[bytes] | None = None

        self.env: dict[str, str] = {}
        if va_nosleep:
            self.env["PEBBLE_VA_NOSLEEP"] = "1"
        for var, value in (
            ("PEBBLE_WFE_NONCEREJECT", nonce_reject),
            ("PEBBLE_AUTHZREUSE", authz_reuse),
            ("PEBBLE_CHAIN_LENGTH", chain_length),
        ):
            if value is not None:
                self.env[var] = str(value)
        if always_valid:
            self.env["PEBBLE_VA_ALWAYS_VALID"] = "1"
        self.env.update(env or {})

        self.ca_bundle_path, cert_path, key_path = make_listener_tls(self.workdir)
        config: dict[str, Any] = {
            "listenAddress": f"127.0.0.1:{self.listen_port}",
            "managementListenAddress": f"127.0.0.1:{self.management_port}",
            "certificate": str(cert_path),
            "privateKey": str(key_path),
            "httpPort": self.http_port,
            "tlsPort": self.tls_port,
            "ocspResponderURL": "",
            "externalAccountBindingRequired": False,
        }
        if validity_seconds is not None:
            config["certificateValidityPeriod"] = validity_seconds
        config.update(config_overrides or {})
        self.config = config
        self.config_path.write_text(json.dumps({"pebble": config}, indent=2))
        self._ssl = ssl.create_default_context(cafile=str(self.ca_bundle_path))

    # ------------------------------------------------------------------ addresses

    @property
    def directory_url(self) -> str:
        """The ACME directory URL (HTTPS, trust `ca_bundle_path`)."""
        return f"https://127.0.0.1:{self.listen_port}/dir"

    @property
    def management_url(self) -> str:
        """Base URL of pebble's management API (same listener certificate)."""
        return f"https://127.0.0.1:{self.management_port}"

    @property
    def running(self) -> bool:
        """Whether the pebble process is alive."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        """The current process id, or None when stopped."""
        return self._proc.pid if self.running and self._proc is not None else None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> Pebble:
        """Start pebble (again) with the same config and ports; return once /dir answers."""
        if self.running:
            return self
        self._starts += 1
        self._roots = None
        cmd = [
            self.binary,
            "-config", str(self.config_path),
            "-dnsserver", f"127.0.0.1:{self.dns_port}",
            f"-strict={'true' if self.strict else 'false'}",
        ]
        env = {k: v for k, v in os.environ.items() if not k.startswith("PEBBLE_")}
        env.update(self.env)
        with self.log_path.open("a") as log:
            log.write(_START_MARK.format(n=self._starts))
            log.flush()
            self._proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=env, cwd=self.workdir, start_new_session=True,
            )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        """Poll the directory at a short interval until it answers 200."""
        deadline = time.monotonic() + self.start_timeout
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            assert self._proc is not None
            if self._proc.poll() is not None:
                raise PebbleError(
                    f"pebble exited with {self._proc.returncode}:\n{self.log_text()[-3000:]}"
                )
            try:
                with urllib.request.urlopen(
                    self.directory_url, context=self._ssl, timeout=1
                ) as resp:
                    if resp.status == 200:
                        return
            except (OSError, urllib.error.URLError) as exc:
                last_error = exc
            time.sleep(_POLL_INTERVAL)
        raise PebbleError(
            f"pebble did not answer {self.directory_url} within {self.start_timeout}s "
            f"({last_error}):\n{self.log_text()[-3000:]}"
        )

    def stop(self, timeout: float = 3.0) -> None:
        """Stop the process (SIGTERM, then SIGKILL after `timeout`); idempotent."""
        proc, self._proc = self._proc, None
        self._roots = None
        if proc is None or proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=timeout)

    def restart(self) -> Pebble:
        """Stop and start again (new database, new issuing hierarchy, same ports)."""
        self.stop()
        return self.start()

    def close(self) -> None:
        """Stop the process and, if the temp dir is ours, delete it."""
        self.stop()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> Pebble:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __del__(self) -> None:
        # Last resort: never leave a pebble running behind a test that forgot close().
        proc = getattr(self, "_proc", None)
        if proc is not None and proc.poll() is None:
            proc.kill()

    # ------------------------------------------------------------------ management API

    def _management_get(self, path: str) -> bytes:
        """GET a management path; PebbleError on HTTP errors."""
        url = self.management_url + path
        try:
            with urllib.request.urlopen(url, context=self._ssl, timeout=5) as resp:
                body: bytes = resp.read()
                return body
        except urllib.error.HTTPError as exc:
            raise PebbleError(f"GET {url}: HTTP {exc.code}") from exc

    def issuing_roots(self) -> list[bytes]:
        """[root PEM, intermediate PEM] pebble issues with now (cached until stop/start)."""
        if not self.running:
            raise PebbleError("pebble is not running")
        if self._roots is None:
            self._roots = [
                self._management_get("/roots/0"),
                self._management_get("/intermediates/0"),
            ]
        return list(self._roots)

    def issuing_root(self) -> bytes:
        """The PEM root of the current issuing hierarchy."""
        return self.issuing_roots()[0]

    def issuing_intermediate(self) -> bytes:
        """The PEM intermediate that signs leaf certificates (PEBBLE_CHAIN_LENGTH=1)."""
        return self.issuing_roots()[1]

    def cert_status(self, serial: int | str) -> dict[str, Any]:
        """Management /cert-status-by-serial: {"Status": "Valid"|"Revoked", "Certificate": ...}.

        `serial` is the certificate's serial number (an int, or pebble's hex form).
        """
        hex_serial = f"{serial:x}" if isinstance(serial, int) else serial
        body = self._management_get(f"/cert-status-by-serial/{hex_serial}")
        result: dict[str, Any] = json.loads(body)
        return result

    # ------------------------------------------------------------------ log

    def log_text(self, *, current_run: bool = False) -> str:
        """Pebble's combined stdout/stderr (every run, or only since the last start)."""
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""
        if current_run:
            marker = _START_MARK.format(n=self._starts)
            text = text[text.rfind(marker) + len(marker):] if marker in text else text
        return text

    def order_count(self) -> int:
        """Orders created since the last start (pebble has no management endpoint for this).

        Read from pebble's own log line "There are now N orders in the db".
        """
        counts = _ORDERS_RE.findall(self.log_text(current_run=True))
        return int(counts[-1]) if counts else 0

    def order_ids(self, *, current_run: bool = True) -> list[str]:
        """IDs of the orders pebble logged as added, oldest first."""
        return _ADDED_ORDER_RE.findall(self.log_text(current_run=current_run))

    def issued(self, *, current_run: bool = True) -> list[tuple[str, str]]:
        """(hex serial, order id) of every certificate pebble logged as issued, oldest first."""
        pairs: list[tuple[str, str]] = _ISSUED_RE.findall(self.log_text(current_run=current_run))
        return pairs
