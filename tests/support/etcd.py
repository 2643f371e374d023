"""A real etcd (Debian's etcd-server) on ephemeral loopback ports, for tests.

`EtcdServer` starts `etcd` with a temp data dir, waits for /health, and can be
stopped and started again on the same ports and data (an outage that keeps every
revision).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

ETCD_BINARY = "/usr/bin/etcd"


def _port_outside_ephemeral_range() -> int:
    """A free port below Linux's ephemeral range (32768+). While etcd is stopped, clients
    keep reconnecting; one of them may get the very port as its own source port (a TCP
    self-connect) and hold it, and etcd could not listen there again."""
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(20_000, 32_000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port below 32000")


def ensure_etcd() -> None:
    """Install Debian's etcd-server when the binary is missing (CI, fresh machines)."""
    if os.path.exists(ETCD_BINARY):
        return
    subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", "etcd-server"],
                   check=False, capture_output=True, timeout=300)
    if not os.path.exists(ETCD_BINARY):
        raise RuntimeError("etcd is not installed (apt-get install etcd-server)")


class EtcdServer:
    def __init__(self, workdir: Path | None = None, extra_args: tuple[str, ...] = ()) -> None:
        self.extra_args = extra_args  # e.g. ("--quota-backend-bytes", "8589934592")
        ensure_etcd()
        self._own_dir = workdir is None
        self.workdir = Path(tempfile.mkdtemp(prefix="tlsedge-etcd-")) if workdir is None \
            else workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.data_dir = self.workdir / "data"
        self.client_port = _port_outside_ephemeral_range()
        self.peer_port = _port_outside_ephemeral_range()
        self.log_path = self.workdir / "etcd.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.client_port}"

    def start(self, timeout: float = 15.0) -> EtcdServer:
        client = f"http://127.0.0.1:{self.client_port}"
        peer = f"http://127.0.0.1:{self.peer_port}"
        args = [ETCD_BINARY, "--name", "t0", "--data-dir", str(self.data_dir),
                "--listen-client-urls", client, "--advertise-client-urls", client,
                "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                "--initial-cluster", f"t0={peer}", "--initial-cluster-state", "new",
                "--log-level", "warn", "--logger", "zap", *self.extra_args]
        log = self.log_path.open("ab")
        env = {k: v for k, v in os.environ.items() if not k.startswith("ETCD")}
        self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"etcd exited with {self.proc.returncode}:\n"
                                   f"{self.log_path.read_text(errors='replace')[-3000:]}")
            with contextlib.suppress(OSError, ValueError), \
                    urllib.request.urlopen(f"{client}/health", timeout=1) as r:
                if json.loads(r.read()).get("health") == "true":
                    return self
            time.sleep(0.05)
        raise RuntimeError(f"etcd did not become healthy in {timeout}s")

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (SIGKILL after `timeout`); the data dir stays for start()."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def close(self) -> None:
        self.kill()
        if self._own_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> EtcdServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
