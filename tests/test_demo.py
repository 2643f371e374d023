"""The README's first command: `tlsedge demo` serves HTTPS on generated certificates."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.support.ports import free_port


def test_demo_serves_https_for_the_app_and_the_custom_domain(tmp_path: Path) -> None:
    https, http, metrics = free_port(), free_port(), free_port()
    folder = tmp_path / "demo"
    proc = subprocess.Popen(
        [sys.executable, "-m", "proxy.cli", "demo", "--dir", str(folder),
         "--https-port", str(https), "--http-port", str(http),
         "--metrics-port", str(metrics)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"},
        start_new_session=True)
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 30
        printed = ""
        while "Ctrl-C stops it" not in printed and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            printed += line
        assert "tlsedge demo is serving" in printed, printed
        # Exactly the commands the demo tells a newcomer to run.
        cmds = [ln.strip() for ln in printed.splitlines() if ln.strip().startswith("curl")]
        app = subprocess.run(cmds[0].split(), capture_output=True, text=True, timeout=10)
        assert app.returncode == 0, app.stderr
        answer = json.loads(app.stdout)
        assert answer["app"] == "hello" and answer["x-forwarded-proto"] == "https"
        shop = subprocess.run(cmds[1].split(), capture_output=True, text=True, timeout=10)
        assert shop.returncode == 0 and json.loads(shop.stdout)["app"] == "hello"
        redirect = subprocess.run(cmds[2].split(), capture_output=True, text=True, timeout=10)
        assert " 301 " in redirect.stdout.splitlines()[0]
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=40)
