"""BIND 9 (Debian's `named`) on a loopback port, authoritative for the zones a test gives.

`BindServer` writes a named.conf with TSIG keys (made by `tsig-keygen`), one zone file
per zone, and runs `named -g` in the foreground; a zone may take dynamic updates
(RFC 2136) signed with one of the keys. Tests change records with `update()` (dnspython,
TSIG-signed) and read them back with `txt()` / `query()`, straight from the server.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import dns.message
import dns.name
import dns.query
import dns.rcode
import dns.rdatatype
import dns.tsigkeyring
import dns.update

from tests.support.ports import free_port

NAMED = "/usr/sbin/named"


def ensure_bind() -> None:
    """Install Debian's bind9 when named is missing (CI, fresh machines)."""
    if Path(NAMED).exists():
        return
    subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", "bind9",
                    "bind9-utils"], check=False, capture_output=True, timeout=600)
    if not Path(NAMED).exists():
        raise RuntimeError("BIND is not installed (apt-get install bind9 bind9-utils)")


def tsig_keygen(name: str) -> str:
    """A new hmac-sha256 secret (base64) from BIND's own `tsig-keygen`."""
    out = subprocess.run(["tsig-keygen", "-a", "hmac-sha256", name], capture_output=True,
                         text=True, check=True, timeout=30).stdout
    match = re.search(r'secret "([^"]+)"', out)
    assert match, out
    return match.group(1)


@dataclass
class Zone:
    name: str  # without the trailing dot
    records: list[str] = field(default_factory=list)  # zone-file lines, relative or absolute
    update_key: str | None = None  # a key that may change any record of the zone


class BindServer:
    def __init__(self, zones: list[Zone], keys: list[str]) -> None:
        ensure_bind()
        self.workdir = Path(tempfile.mkdtemp(prefix="tlsedge-bind-"))
        self.port = free_port()
        self.zones = {z.name: z for z in zones}
        self.secrets = {k: tsig_keygen(k) for k in keys}
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.workdir / "named.log"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _config(self) -> str:
        d = self.workdir
        lines = [
            "options {",
            f'  directory "{d}";',
            f"  listen-on port {self.port} {{ 127.0.0.1; }};",
            "  listen-on-v6 { none; };",
            f'  pid-file "{d}/named.pid";',
            f'  session-keyfile "{d}/session.key";',
            f'  managed-keys-directory "{d}";',
            "  recursion yes;  # for pebble: it resolves through this server, CNAMEs too",
            "  allow-recursion { 127.0.0.1; };",
            "  dnssec-validation no;",
            "  notify no;",
            "  allow-query { any; };",
            "};",
            "controls { };",
        ]
        for name, secret in self.secrets.items():
            lines.append(f'key "{name}" {{ algorithm hmac-sha256; secret "{secret}"; }};')
        for zone in self.zones.values():
            update = (f"  update-policy {{ grant {zone.update_key} zonesub ANY; }};"
                      if zone.update_key else "")
            lines += [f'zone "{zone.name}" {{', "  type primary;",
                      f'  file "{d}/{zone.name}.zone";', update, "};"]
        return "\n".join(lines) + "\n"

    def _zone_file(self, zone: Zone) -> str:
        origin = zone.name + "."
        return "\n".join([
            f"$ORIGIN {origin}", "$TTL 5",
            f"@ IN SOA ns1.{origin} hostmaster.{origin} 1 60 60 600 5",
            f"@ IN NS ns1.{origin}", "ns1 IN A 127.0.0.1", *zone.records, ""])

    def start(self, timeout: float = 20.0) -> BindServer:
        (self.workdir / "named.conf").write_text(self._config())
        for zone in self.zones.values():
            (self.workdir / f"{zone.name}.zone").write_text(self._zone_file(zone))
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen([NAMED, "-g", "-c", str(self.workdir / "named.conf")],
                                     stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout
        first = next(iter(self.zones))
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"named exited with {self.proc.returncode}:\n"
                                   f"{self.log_path.read_text(errors='replace')[-3000:]}")
            with contextlib.suppress(OSError, dns.exception.DNSException):
                answer = self.query(first, "SOA", timeout=0.5)
                if answer.rcode() == dns.rcode.NOERROR and answer.answer:
                    return self
            time.sleep(0.05)
        raise RuntimeError(f"named did not answer in {timeout}s:\n"
                           f"{self.log_path.read_text(errors='replace')[-3000:]}")

    def query(self, name: str, rdtype: str, timeout: float = 3.0) -> dns.message.Message:
        request = dns.message.make_query(name, rdtype)
        request.flags &= ~dns.flags.RD
        return dns.query.udp(request, "127.0.0.1", timeout=timeout, port=self.port)

    def txt(self, name: str) -> set[str]:
        """The TXT values at `name`, as the server holds them now."""
        answer = self.query(name, "TXT")
        found: set[str] = set()
        for rrset in answer.answer:
            if rrset.rdtype == dns.rdatatype.TXT and rrset.name == dns.name.from_text(name):
                found |= {b"".join(r.strings).decode() for r in rrset}
        return found

    def update(self, zone: str, key: str, *, add: tuple[str, int, str, str] | None = None,
               delete: tuple[str, str] | None = None) -> None:
        """One signed dynamic update: add (name, ttl, type, data) or delete (name, type)."""
        keyring = dns.tsigkeyring.from_text({key: ("hmac-sha256", self.secrets[key])})
        update = dns.update.UpdateMessage(zone, keyring=keyring, keyname=key)
        if add is not None:
            update.add(*add)
        if delete is not None:
            update.delete(*delete)
        response = dns.query.tcp(update, "127.0.0.1", timeout=5, port=self.port)
        assert response.rcode() == dns.rcode.NOERROR, dns.rcode.to_text(response.rcode())

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def __enter__(self) -> BindServer:
        return self.start()

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)
