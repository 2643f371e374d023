"""`tlsedge demo`: a working setup in one command for a newcomer.

Generates a throwaway CA and certificates, a config and a tiny backend, then runs
the supervisor on them. Demo material only: nothing here is used by `run`.
"""

from __future__ import annotations

import datetime as dt
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from proxy.certs.csr import write_atomic

PLATFORM = "demo.tlsedge.test"
CUSTOM = "www.demo-shop.test"


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    write_atomic(path, key.private_bytes(serialization.Encoding.PEM,
                                         serialization.PrivateFormat.PKCS8,
                                         serialization.NoEncryption()))


def _certificates(folder: Path) -> None:
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(_name("tlsedge demo CA"))
          .issuer_name(_name("tlsedge demo CA")).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number())
          .not_valid_before(now - dt.timedelta(hours=1))
          .not_valid_after(now + dt.timedelta(days=365))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .sign(ca_key, hashes.SHA256()))
    (folder / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    for stem, names in (("platform", [f"*.{PLATFORM}", PLATFORM]), ("shop", [CUSTOM])):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (x509.CertificateBuilder().subject_name(_name(names[0]))
                .issuer_name(ca.subject).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - dt.timedelta(hours=1))
                .not_valid_after(now + dt.timedelta(days=90))
                .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]),
                               critical=False)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .sign(ca_key, hashes.SHA256()))
        (folder / f"{stem}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        _write_key(folder / f"{stem}.key", key)


class _Hello(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = json.dumps({
            "app": "hello", "path": self.path, "host": self.headers.get("Host"),
            "x-forwarded-for": self.headers.get("X-Forwarded-For"),
            "x-forwarded-proto": self.headers.get("X-Forwarded-Proto"),
        }, indent=2).encode() + b"\n"
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


def run(directory: str, *, https_port: int, http_port: int, metrics_port: int = 9100) -> int:
    from proxy import app

    folder = Path(directory).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / "platform.pem").exists():
        _certificates(folder)
    backend = ThreadingHTTPServer(("127.0.0.1", 0), _Hello)
    threading.Thread(target=backend.serve_forever, daemon=True, name="demo-backend").start()
    config = folder / "tlsedge.yaml"
    config.write_text(
        f"# Written by `tlsedge demo`; the backend port changes at every start.\n"
        f"platform_domain: {PLATFORM}\n"
        f"listen: {{https: \"127.0.0.1:{https_port}\", http: \"127.0.0.1:{http_port}\","
        f" metrics: \"127.0.0.1:{metrics_port}\"}}\n"
        "workers: 1\n"
        "tls:\n"
        "  platform_certificate: {cert: platform.pem, key: platform.key}\n"
        "  certificates: [{cert: shop.pem, key: shop.key}]\n"
        "store: {path: store}\n"
        f"apps: {{hello: {{backends: [\"127.0.0.1:{backend.server_address[1]}\"]}}}}\n"
        f"domains: {{{CUSTOM}: hello}}\n")

    def ready() -> None:
        print(f"\ntlsedge demo is serving. Try:\n"
              f"  curl --cacert {folder}/ca.pem --resolve hello.{PLATFORM}:{https_port}:"
              f"127.0.0.1 https://hello.{PLATFORM}:{https_port}/\n"
              f"  curl --cacert {folder}/ca.pem --resolve {CUSTOM}:{https_port}:127.0.0.1"
              f" https://{CUSTOM}:{https_port}/\n"
              f"  curl -i --resolve {CUSTOM}:{http_port}:127.0.0.1 http://{CUSTOM}:{http_port}/"
              f"\n  curl -s http://127.0.0.1:{metrics_port}/metrics | grep tlsedge_\n"
              f"Ctrl-C stops it.\n", flush=True)

    try:
        return app.run_supervisor(str(config), on_ready=ready)
    finally:
        backend.shutdown()
