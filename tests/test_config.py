"""`tlsedge check-config`: exit 0 on a good config; otherwise exactly one line naming
the file and the key path at fault. Runs the real CLI in a subprocess.
"""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.certgen import CA
from tests.support.ports import free_port

PLATFORM = "osc-fr1.scalingo.test"


@pytest.fixture
def workdir(tmp_path: Path, ca: CA) -> Path:
    ca.issue([f"*.{PLATFORM}"]).write(tmp_path, "platform")
    ca.issue(["www.shop.test"]).write(tmp_path, "shop")
    ca.issue(["other.test"]).write(tmp_path, "other")
    return tmp_path


GOOD: dict[str, Any] = {
    "platform_domain": PLATFORM,
    "tls": {"platform_certificate": {"cert": "platform.crt", "key": "platform.key"},
            "certificates": [{"cert": "shop.crt", "key": "shop.key"}]},
    # check-config binds every listen address: free ports, so a busy machine passes.
    "listen": {"https": f"127.0.0.1:{free_port()}", "http": f"127.0.0.1:{free_port()}",
               "metrics": f"127.0.0.1:{free_port()}"},
    "apps": {"my-app": {"backends": ["127.0.0.1:9000"]}},
    "domains": {"www.shop.test": "my-app"},
}


def check(workdir: Path, config: dict[str, Any] | None = None, *, raw: str | None = None
          ) -> subprocess.CompletedProcess[str]:
    path = workdir / "tlsedge.yaml"
    path.write_text(raw if raw is not None else yaml.safe_dump(config))
    return subprocess.run([sys.executable, "-m", "proxy.cli", "check-config", "-c", str(path)],
                          capture_output=True, text=True, timeout=30, cwd=workdir)


def test_good_config_passes(workdir: Path) -> None:
    out = check(workdir, GOOD)
    assert out.returncode == 0, out.stderr
    assert "ok (1 apps, 1 domains)" in out.stdout


def _set(path: str, value: Any) -> Any:
    def change(config: dict[str, Any]) -> None:
        *parents, last = path.split("/")
        node = config
        for key in parents:
            node = node[key]
        node[last] = value
    return change


def _delete(path: str) -> Any:
    def change(config: dict[str, Any]) -> None:
        *parents, last = path.split("/")
        node = config
        for key in parents:
            node = node[key]
        del node[last]
    return change


CASES = [
    ("missing key file", _set("tls/platform_certificate/key", "gone.key"),
     "tlsedge.yaml: tls.platform_certificate.key: file not found ("),
    ("missing certificate file of a static certificate",
     _set("tls/certificates", [{"cert": "nope.crt", "key": "shop.key"}]),
     "tlsedge.yaml: tls.certificates[0].cert: file not found ("),
    ("wrong type", _set("limits", {"drain_timeout": "soon"}),
     "tlsedge.yaml: limits.drain_timeout: expected float, got str"),
    ("wrong type inside an app", _set("apps/my-app/backends", "127.0.0.1:9000"),
     "tlsedge.yaml: apps.my-app.backends: expected array, got str"),
    ("unknown key", _set("tls/bogus", 1), "tlsedge.yaml: tls.bogus: unknown key"),
    ("unknown key inside an app", _set("apps/my-app/backend", ["x:1"]),
     "tlsedge.yaml: apps.my-app.backend: unknown key"),
    ("missing required key", _delete("platform_domain"),
     "tlsedge.yaml: platform_domain: required key is missing"),
    ("missing nested required key", _delete("tls/platform_certificate/key"),
     "tlsedge.yaml: tls.platform_certificate.key: required key is missing"),
    ("domain pointing at an unknown app", _set("domains/www.other.test", "ghost"),
     "tlsedge.yaml: domains.www.other.test: unknown app 'ghost'"),
    ("bad listen address", _set("listen/https", "nonsense"),
     "tlsedge.yaml: listen.https: expected host:port, got 'nonsense'"),
    ("listen port out of range", _set("listen/http", "127.0.0.1:70000"),
     "tlsedge.yaml: listen.http: expected host:port"),
    ("buffering temp folder missing", _set("limits", {"temp_dir": "no-such-folder"}),
     "tlsedge.yaml: limits.temp_dir: not a writable folder ("),
    ("negative buffer bound", _set("limits", {"max_temp_file": -1}),
     "tlsedge.yaml: limits.max_temp_file: must not be negative"),
    ("per-client connection limit of zero", _set("limits", {"connections_per_client": 0}),
     "tlsedge.yaml: limits.connections_per_client: must be at least 1"),
    ("buffering switch of the wrong type", _set("apps/my-app/request_buffering", "maybe"),
     "tlsedge.yaml: apps.my-app.request_buffering: expected bool, got str"),
    ("platform certificate not covering the platform wildcard",
     _set("tls/platform_certificate", {"cert": "other.crt", "key": "other.key"}),
     f"tlsedge.yaml: tls.platform_certificate: certificate does not cover *.{PLATFORM} "
     "(it covers other.test)"),
    ("key of another certificate", _set("tls/certificates", [{"cert": "shop.crt",
                                                              "key": "other.key"}]),
     "tlsedge.yaml: tls.certificates[0]: "),
]


@pytest.mark.parametrize(("what", "change", "expected"), CASES, ids=[c[0] for c in CASES])
def test_bad_config_is_refused_with_one_line_naming_file_and_key(
        workdir: Path, what: str, change: Any, expected: str) -> None:
    config = copy.deepcopy(GOOD)
    change(config)
    out = check(workdir, config)
    assert out.returncode == 1
    assert out.stdout == ""
    lines = out.stderr.splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith("tlsedge: " + expected), lines[0]


def test_key_mismatch_names_the_key_file(workdir: Path) -> None:
    config = copy.deepcopy(GOOD)
    config["tls"]["certificates"] = [{"cert": "shop.crt", "key": "other.key"}]
    [line] = check(workdir, config).stderr.splitlines()
    assert str(workdir / "other.key") in line
    assert "PRIVATE KEY" not in line


def test_bad_yaml_names_line_and_column(workdir: Path) -> None:
    raw = ("platform_domain: osc-fr1.scalingo.test\n"
           "tls:\n"
           "  platform_certificate: {cert: platform.crt\n"
           "  key: platform.key\n")
    out = check(workdir, raw=raw)
    assert out.returncode == 1
    [line] = out.stderr.splitlines()
    assert line.startswith("tlsedge: tlsedge.yaml: invalid YAML (line 4, column 6): ")


def test_unreadable_config_file_is_one_line(workdir: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "proxy.cli", "check-config", "-c",
                          str(workdir / "absent.yaml")], capture_output=True, text=True,
                         timeout=30)
    assert out.returncode == 1
    [line] = out.stderr.splitlines()
    assert "absent.yaml: cannot read config" in line
