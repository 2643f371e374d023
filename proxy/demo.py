"""`tlsedge demo`: a working setup in one command for a newcomer.

Generates a throwaway CA and certificates, a config and a tiny backend, then runs
the supervisor on them with the admin API and dashboard on loopback, and prints the
commands to try and how to log in. Ports: the defaults, or the next free ones when
those are taken (said on stdout). Demo material only: nothing here is used by `run`.
"""

from __future__ import annotations

import datetime as dt
import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import NameOID

from proxy.atomicfile import write_atomic
from proxy.certs.csr import PrivateKey, new_key, private_key_pem
from proxy.errors import TlsEdgeError

PLATFORM = "demo.tlsedge.test"
CUSTOM = "www.demo-shop.test"


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write_key(path: Path, key: PrivateKey) -> None:
    write_atomic(path, private_key_pem(key))


def _certificates(folder: Path) -> None:
    now = dt.datetime.now(dt.UTC)
    ca_key = new_key()
    ca = (x509.CertificateBuilder().subject_name(_name("tlsedge demo CA"))
          .issuer_name(_name("tlsedge demo CA")).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number())
          .not_valid_before(now - dt.timedelta(hours=1))
          .not_valid_after(now + dt.timedelta(days=365))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .sign(ca_key, hashes.SHA256()))
    (folder / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    for stem, names in (("platform", [f"*.{PLATFORM}", PLATFORM]), ("shop", [CUSTOM])):
        key = new_key()
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


DEFAULT_PORTS = {"https": 8443, "http": 8080, "metrics": 9448, "admin": 9449}


def _free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def choose_ports(asked: dict[str, int | None]) -> tuple[dict[str, int], list[str]]:
    """A loopback port per listener: the one asked for (refused in one line when it is
    taken), else the default, else the next free one after it; and what was moved."""
    chosen: dict[str, int] = {}
    moved: list[str] = []
    for name, default in DEFAULT_PORTS.items():
        port = asked.get(name)
        if port is not None:
            if not _free(port):
                raise TlsEdgeError(f"--{name}-port: 127.0.0.1:{port} is taken; pick "
                                   "another port or leave the option out")
            chosen[name] = port
            continue
        port = default
        while not _free(port) or port in chosen.values():
            port += 1
            if port > 65535:
                raise TlsEdgeError(f"no free port for {name} from {default} up")
        if port != default:
            moved.append(f"{name} port {default} is taken: using {port}")
        chosen[name] = port
    return chosen, moved


def run(directory: str, *, https_port: int | None = None, http_port: int | None = None,
        metrics_port: int | None = None, admin_port: int | None = None) -> int:
    from proxy import app

    ports, moved = choose_ports({"https": https_port, "http": http_port,
                                 "metrics": metrics_port, "admin": admin_port})
    for line in moved:
        print(f"tlsedge demo: {line}", flush=True)
    folder = Path(directory).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / "platform.pem").exists():
        _certificates(folder)
    backend = ThreadingHTTPServer(("127.0.0.1", 0), _Hello)
    threading.Thread(target=backend.serve_forever, daemon=True, name="demo-backend").start()
    config = folder / "tlsedge.yaml"
    https, http, metrics, admin = (ports[k] for k in ("https", "http", "metrics", "admin"))
    config.write_text(
        f"# Written by `tlsedge demo`; the backend port changes at every start.\n"
        f"platform_domain: {PLATFORM}\n"
        f"listen: {{https: \"127.0.0.1:{https}\", http: \"127.0.0.1:{http}\","
        f" metrics: \"127.0.0.1:{metrics}\", admin: \"127.0.0.1:{admin}\"}}\n"
        "workers: 1\n"
        "tls:\n"
        "  platform_certificate: {cert: platform.pem, key: platform.key}\n"
        "  certificates: [{cert: shop.pem, key: shop.key}]\n"
        "store: {path: store}\n"
        "admin: {token_file: admin-token}   # created (0600) at the first start\n"
        # force_https: plain HTTP to the app answers with a redirect (the demo shows it).
        f"apps: {{hello: {{backends: [\"127.0.0.1:{backend.server_address[1]}\"], "
        "force_https: true}}\n"
        f"domains: {{{CUSTOM}: hello}}\n")

    def ready() -> None:
        token = folder / "admin-token"
        print(f"\ntlsedge demo is serving. Try:\n"
              f"  curl --cacert {folder}/ca.pem --resolve hello.{PLATFORM}:{https}:"
              f"127.0.0.1 https://hello.{PLATFORM}:{https}/\n"
              f"  curl --cacert {folder}/ca.pem --resolve {CUSTOM}:{https}:127.0.0.1"
              f" https://{CUSTOM}:{https}/\n"
              f"  curl -i --resolve {CUSTOM}:{http}:127.0.0.1 http://{CUSTOM}:{http}/\n"
              f"  curl -s http://127.0.0.1:{metrics}/metrics | grep tlsedge_\n"
              f"  curl -s -H \"Authorization: Bearer $(cat {token})\" "
              f"http://127.0.0.1:{admin}/api/v1/domains\n"
              f"Dashboard: http://127.0.0.1:{admin}/ - log in with the token in {token}\n"
              f"  (cat {token}); it is also the API's bearer token.\n"
              f"Ctrl-C stops it.\n", flush=True)

    try:
        return app.run_supervisor(str(config), on_ready=ready)
    finally:
        backend.shutdown()
