"""Run the real `tlsedge run` in a subprocess on ephemeral loopback ports, and talk to it.

`Edge` writes a config into a temp dir, starts the supervisor, waits until the
HTTPS port answers a handshake, and offers the clients tests need: the served
certificate's fingerprint for an SNI name (Python ssl and openssl s_client), raw
HTTPS requests, signals and a metrics scrape. The process is killed on exit.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import yaml

from tests.support.ports import free_port


class Edge:
    """One tlsedge node under test."""

    def __init__(self, workdir: Path, config: dict[str, Any], *, start: bool = True,
                 env: dict[str, str] | None = None, admin: bool = False) -> None:
        self.workdir = workdir
        self.https_port = free_port()
        self.http_port = free_port()
        self.metrics_port = free_port()
        listen = {"https": f"127.0.0.1:{self.https_port}",
                  "http": f"127.0.0.1:{self.http_port}",
                  "metrics": f"127.0.0.1:{self.metrics_port}"}
        # admin=True also serves the admin API and dashboard on its own loopback port.
        self.admin_port = free_port() if admin else None
        if self.admin_port is not None:
            listen["admin"] = f"127.0.0.1:{self.admin_port}"
        self.config: dict[str, Any] = {"listen": listen, **config}
        self.config_path = workdir / "tlsedge.yaml"
        self.log_path = workdir / "tlsedge.log"
        self.env = env or {}
        self.proc: subprocess.Popen[bytes] | None = None
        self.write_config()
        if start:
            self.start()

    def write_config(self, config: dict[str, Any] | None = None) -> None:
        if config is not None:
            self.config = config
        tmp = self.config_path.with_suffix(".tmp")
        tmp.write_text(yaml.safe_dump(self.config))
        os.replace(tmp, self.config_path)

    def start(self, timeout: float = 15.0) -> None:
        env = {**os.environ, **self.env}
        if "PROMETHEUS_MULTIPROC_DIR" not in self.env:
            env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        self._log = self.log_path.open("ab")
        # The log is appended to across restarts: only this run's lines say it is up.
        offset = len(self.log())
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "proxy.cli", "run", "-c", str(self.config_path)],
            stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=self.workdir,
            start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"tlsedge exited with {self.proc.returncode}:\n{self.log()}")
            if "serving https on" in self.log()[offset:] and self._admin_answers(offset):
                return
            time.sleep(0.05)
        raise RuntimeError(f"tlsedge did not start in {timeout}s:\n{self.log()}")

    def _admin_answers(self, offset: int) -> bool:
        if self.admin_port is None:
            return True
        return "admin API and dashboard on" in self.log()[offset:]

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def reload(self, *, wait_for: str = "reload", timeout: float = 10.0) -> str:
        """SIGHUP, then wait until the log grows a line containing `wait_for`."""
        before = len(self.log())
        self.signal(signal.SIGHUP)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            new = self.log()[before:]
            if wait_for in new:
                time.sleep(0.3)  # workers swap right after the supervisor logs
                return self.log()[before:]
            time.sleep(0.05)
        raise AssertionError(f"no {wait_for!r} in the log after SIGHUP:\n{self.log()[before:]}")

    def stop(self, timeout: float = 40.0) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        code = self.proc.returncode
        self.proc = None
        self._log.close()
        return code

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def worker_pids(self) -> list[int]:
        """Pids of the supervisor's live child processes (the workers), from /proc."""
        assert self.proc is not None
        pid = self.proc.pid
        try:
            text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
        except FileNotFoundError:
            return []
        return [int(p) for p in text.split()]

    # -- clients ------------------------------------------------------------------
    def tls_connect(self, server_name: str | None, *, cafile: str | None = None,
                    timeout: float = 5.0) -> ssl.SSLSocket:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        if cafile:
            ctx.load_verify_locations(cafile)
        else:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        raw = socket.create_connection(("127.0.0.1", self.https_port), timeout=timeout)
        try:
            return ctx.wrap_socket(raw, server_hostname=server_name)
        except Exception:
            raw.close()
            raise

    def fingerprint(self, server_name: str | None) -> str:
        """sha256 of the leaf certificate served for `server_name` (Python ssl)."""
        with self.tls_connect(server_name) as s:
            der = s.getpeercert(binary_form=True)
        assert der is not None
        return hashlib.sha256(der).hexdigest()

    def openssl_fingerprint(self, server_name: str | None) -> str:
        """The same through `openssl s_client`, a second, independent TLS client."""
        cmd = ["openssl", "s_client", "-connect", f"127.0.0.1:{self.https_port}"]
        cmd += ["-servername", server_name] if server_name else ["-noservername"]
        out = subprocess.run(cmd, input=b"", capture_output=True, timeout=10)
        pem = re.search(rb"-----BEGIN CERTIFICATE-----.*?-----END CERTIFICATE-----",
                        out.stdout, re.S)
        assert pem, out.stdout.decode(errors="replace") + out.stderr.decode(errors="replace")
        der = ssl.PEM_cert_to_DER_cert(pem.group(0).decode())
        return hashlib.sha256(der).hexdigest()

    def request(self, host: str, path: str = "/", *, method: str = "GET",
                headers: dict[str, str] | None = None, body: bytes | None = None,
                server_name: str | None = "") -> tuple[int, dict[str, str], bytes]:
        """One HTTPS request on a fresh connection; SNI defaults to the host."""
        sni = host if server_name == "" else server_name
        with self.tls_connect(sni) as s:
            send_request(s, host, path, method=method, headers=headers, body=body)
            return read_response(s, head_only=method == "HEAD")

    def metrics(self) -> str:
        with socket.create_connection(("127.0.0.1", self.metrics_port), timeout=5) as s:
            s.sendall(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        return data.split(b"\r\n\r\n", 1)[1].decode()

    def metric(self, name: str, /, **labels: str) -> float:
        """Sum of the samples of `name` whose labels include `labels` (which may
        themselves include a label called `name`)."""
        total = 0.0
        for line in self.metrics().splitlines():
            if line.startswith("#") or not line.startswith(name):
                continue
            m = re.match(r"^([a-zA-Z_:][\w:]*)(?:\{(.*)\})? (\S+)$", line)
            if not m or m.group(1) != name:
                continue
            got = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(2) or ""))
            if all(got.get(k) == v for k, v in labels.items()):
                total += float(m.group(3))
        return total

    def __enter__(self) -> Edge:
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.stop(timeout=10)
        finally:
            self.kill()


def send_request(sock: socket.socket, host: str, path: str = "/", *, method: str = "GET",
                 headers: dict[str, str] | None = None, body: bytes | None = None) -> None:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}"]
    hdrs = dict(headers or {})
    if body is not None and not any(k.lower() in ("content-length", "transfer-encoding")
                                    for k in hdrs):
        hdrs["Content-Length"] = str(len(body))
    lines += [f"{k}: {v}" for k, v in hdrs.items()]
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + (body or b""))


def read_response(sock: socket.socket | BinaryIO, *, head_only: bool = False
                  ) -> tuple[int, dict[str, str], bytes]:
    """Read one HTTP/1.1 response (Content-Length, chunked or close-delimited).

    Pass a file from `sock.makefile("rb")` to read several responses of one
    connection (keep-alive, pipelining): a fresh buffered file per response could
    swallow the start of the next one.
    """
    f = sock.makefile("rb") if isinstance(sock, socket.socket) else sock
    status_line = f.readline()
    if not status_line:
        raise ConnectionError("connection closed before a response")
    status = int(status_line.split()[1])
    headers: dict[str, str] = {}
    while (line := f.readline()) not in (b"\r\n", b"\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    if head_only or status in (204, 304) or 100 <= status < 200:
        return status, headers, b""
    if headers.get("transfer-encoding", "").lower() == "chunked":
        parts = []
        while True:
            size = int(f.readline().split(b";")[0], 16)
            if size == 0:
                while f.readline() not in (b"\r\n", b"\n", b""):
                    pass
                break
            parts.append(f.read(size))
            f.readline()
        return status, headers, b"".join(parts)
    if "content-length" in headers:
        return status, headers, f.read(int(headers["content-length"]))
    return status, headers, f.read()


def established_remote_ports(pid: int) -> list[int]:
    """Remote ports of the established TCP (IPv4) connections process `pid` holds.

    Read from /proc: the socket inodes among the process's fds, matched against
    /proc/net/tcp. Lets a test see which worker holds a backend connection without
    the product exposing its pid.
    """
    inodes: set[str] = set()
    fd_dir = Path(f"/proc/{pid}/fd")
    for fd in fd_dir.iterdir() if fd_dir.exists() else ():
        with contextlib.suppress(OSError):
            link = os.readlink(fd)
            if link.startswith("socket:["):
                inodes.add(link[8:-1])
    ports = []
    for line in Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[3] == "01" and fields[9] in inodes:  # 01: ESTABLISHED
            ports.append(int(fields[2].rsplit(":", 1)[1], 16))
    return ports


@contextlib.contextmanager
def running(workdir: Path, config: dict[str, Any], **kw: Any) -> Iterator[Edge]:
    edge = Edge(workdir, config, **kw)
    try:
        yield edge
    finally:
        edge.__exit__(None, None, None)
