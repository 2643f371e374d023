"""`tlsedge check-config` makes every check `run` makes that needs no traffic, and says
all it finds at once: one line per problem, naming the file and the key.

Each case runs the real CLI in a subprocess. Then the README's example config
(config/tlsedge.example.yaml, its paths moved into a temp folder, the access log's
folder missing) goes through check-config and `run`: both succeed, and `run` creates
the folder and writes the access log there.
"""

from __future__ import annotations

import copy
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.certgen import CA
from tests.conftest import PLATFORM
from tests.support.backend import Backend
from tests.support.edge import Edge
from tests.support.ports import free_port

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "config" / "tlsedge.example.yaml"


@pytest.fixture
def workdir(tmp_path: Path, ca: CA) -> Path:
    ca.issue([f"*.{PLATFORM}"]).write(tmp_path, "platform")
    return tmp_path


def good() -> dict[str, Any]:
    return {
        "platform_domain": PLATFORM,
        "tls": {"platform_certificate": {"cert": "platform.crt", "key": "platform.key"}},
        "listen": {"https": f"127.0.0.1:{free_port()}", "http": f"127.0.0.1:{free_port()}",
                   "metrics": f"127.0.0.1:{free_port()}"},
        "store": {"path": "store"},
        "apps": {"my-app": {"backends": ["127.0.0.1:9000"]}},
    }


def check(workdir: Path, config: dict[str, Any] | None = None, *, raw: str | None = None,
          command: str = "check-config") -> subprocess.CompletedProcess[str]:
    path = workdir / "tlsedge.yaml"
    path.write_text(raw if raw is not None else yaml.safe_dump(config, sort_keys=False))
    return subprocess.run([sys.executable, "-m", "proxy.cli", command, "-c", str(path)],
                          capture_output=True, text=True, timeout=60, cwd=workdir)


def refused(out: subprocess.CompletedProcess[str]) -> list[str]:
    assert out.returncode == 1, out.stdout + out.stderr
    assert out.stdout == ""
    assert "Traceback" not in out.stderr
    said = []
    for line in out.stderr.splitlines():
        # check-config prints "tlsedge: ..."; run has set its log up: "<time> ERROR ...".
        m = re.fullmatch(r"(?:tlsedge: |\S+ \S+ ERROR tlsedge\[\d+\]: )(.*)", line)
        assert m, line
        said.append(m.group(1).removeprefix("tlsedge.yaml: "))
    return said


def test_the_good_config_passes(workdir: Path) -> None:
    out = check(workdir, good())
    assert out.returncode == 0, out.stderr
    assert out.stdout.endswith(": ok (1 apps, 0 domains)\n")


def test_a_repeated_yaml_key_is_refused_where_it_repeats(workdir: Path) -> None:
    raw = yaml.safe_dump(good(), sort_keys=False) + "apps: {}\n"
    [line] = refused(check(workdir, raw=raw))
    first = 1 + yaml.safe_dump(good(), sort_keys=False).splitlines().index("apps:")
    assert re.fullmatch(rf"invalid YAML \(line \d+, column 1\): duplicate key 'apps' "
                        rf"\(first at line {first}\)", line), line


def test_every_problem_of_the_file_is_reported_at_once(workdir: Path) -> None:
    config = good()
    config["tls"]["unknown_sni"] = "drop"
    config["workers"] = "many"
    config["listen"]["htps"] = "127.0.0.1:1"
    config["apps"]["my-app"]["force_http"] = True
    del config["platform_domain"]
    assert refused(check(workdir, config)) == [
        "tls.unknown_sni: must be one of: platform, reject (got 'drop')",
        "listen.htps: unknown key (did you mean https?)",
        "apps.my-app.force_http: unknown key (did you mean force_https?)",
        "workers: must be an int or \"auto\" (got 'many')",
        "platform_domain: required key is missing",
    ]


def test_values_out_of_range_are_reported_together_in_words(workdir: Path) -> None:
    config = good()
    config["tls"]["session_tickets"] = 17
    config["limits"] = {"send_timeout": 0, "max_temp_file": -1,
                        "connections_per_client": 0}
    config["apps"]["my-app"]["backends"] = []
    config["metrics"] = {"certificate_series": -5}
    assert refused(check(workdir, config)) == [
        "tls.session_tickets: must be at most 16",
        "apps.my-app.backends: must list at least one",
        "limits.send_timeout: must be positive",
        "limits.max_temp_file: must not be negative",
        "limits.connections_per_client: must be at least 1",
        "metrics.certificate_series: must not be negative",
    ]


def test_an_enum_error_lists_the_allowed_values(workdir: Path) -> None:
    config = good()
    config["logging"] = {"format": "xml"}
    assert refused(check(workdir, config)) == [
        "logging.format: must be one of: text, json (got 'xml')"]


def test_a_near_miss_key_gets_did_you_mean_and_a_moved_key_says_where(workdir: Path) -> None:
    config = good()
    config["acme"] = {"directry": "https://acme.test/dir", "dns": {"edge_addresses": []}}
    config["log_level"] = "debug"
    assert refused(check(workdir, config)) == [
        "acme.directry: unknown key (did you mean directory?)",
        "log_level: unknown key (it moved: use logging.level)",
    ]


def test_an_unknown_app_lists_the_known_ones(workdir: Path) -> None:
    config = good()
    config["apps"]["shop"] = {"backends": ["127.0.0.1:9001"]}
    config["domains"] = {"www.example.test": "ghost"}
    assert refused(check(workdir, config)) == [
        "domains.www.example.test: unknown app 'ghost' (apps: my-app, shop)"]


@pytest.fixture
def taken() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)
        yield sock.getsockname()[1]


def test_ports_that_cannot_be_bound_are_named_by_their_key(workdir: Path, taken: int) -> None:
    config = good()
    config["listen"]["http"] = f"127.0.0.1:{taken}"
    config["listen"]["admin"] = config["listen"]["metrics"]
    config["admin"] = {"token_file": "admin-token"}
    assert refused(check(workdir, config)) == [
        f"listen.http: cannot listen on 127.0.0.1:{taken}: Address already in use",
        f"listen.admin: {config['listen']['admin']} is listen.metrics's address too",
    ]


def test_run_names_the_key_of_a_port_it_cannot_bind(workdir: Path, taken: int) -> None:
    config = good()
    config["listen"]["https"] = f"127.0.0.1:{taken}"
    assert refused(check(workdir, config, command="run")) == [
        f"listen.https: cannot listen on 127.0.0.1:{taken}: Address already in use"]


def test_folders_that_cannot_be_made_are_named_by_their_key(workdir: Path) -> None:
    (workdir / "a-file").write_text("not a folder\n")
    config = good()
    config["store"]["path"] = "a-file/store"
    config["access_log"] = {"enabled": True, "path": "a-file/logs/access.log"}
    for command in ("check-config", "run"):
        assert refused(check(workdir, config, command=command)) == [
            f"store.path: {workdir}/a-file is not a folder",
            f"access_log.path: {workdir}/a-file is not a folder",
        ], command
    assert not (workdir / "store").exists()


def test_a_missing_access_log_folder_is_fine_it_is_made_at_start(workdir: Path) -> None:
    config = good()
    config["access_log"] = {"enabled": True, "path": "logs/tlsedge/access.log"}
    out = check(workdir, config)
    assert out.returncode == 0, out.stderr
    assert not (workdir / "logs").exists(), "check-config changes nothing"


def test_a_ca_certificate_is_refused_with_how_to_make_a_server_certificate(
        workdir: Path, ca: CA) -> None:
    ca.issue([f"*.{PLATFORM}"], is_ca=True).write(workdir, "platform")
    [line] = refused(check(workdir, good()))
    assert "is a CA certificate (CA:TRUE), not a server certificate" in line
    assert "`tlsedge csr NAME...`" in line


def test_check_config_leaves_the_ports_of_a_running_node_alone(
        tmp_path: Path, edge_config: tuple[dict[str, Any], Any]) -> None:
    config, _ = edge_config
    with Edge(tmp_path, copy.deepcopy(config)) as edge:
        out = subprocess.run([sys.executable, "-m", "proxy.cli", "check-config", "-c",
                              str(edge.config_path)], capture_output=True, text=True,
                             timeout=60)
        assert out.returncode == 0, out.stderr
        assert (tmp_path / "store" / "tlsedge.pid").read_text().strip() == str(
            edge.proc.pid if edge.proc else "")


# --------------------------------------------------------------------------- the example


def example_in(folder: Path, ca: CA, backend: Backend) -> tuple[Path, dict[str, int]]:
    """The example config with /etc, /var/lib and /var/log moved under `folder`, free
    loopback ports and our backend; nothing else changed."""
    text = EXAMPLE.read_text()
    for system in ("/etc/tlsedge", "/var/lib/tlsedge", "/var/log/tlsedge"):
        text = text.replace(system, str(folder) + system)
    ports = {k: free_port() for k in ("https", "http", "metrics", "admin")}
    for key, port in ports.items():
        text = re.sub(rf'^(  {key}: )"[^"]*"', rf'\g<1>"127.0.0.1:{port}"', text, flags=re.M)
    text = text.replace('"127.0.0.1:8081"', f'"{backend.address}"')
    assert text.count("127.0.0.1:") >= 5
    (folder / "etc" / "tlsedge").mkdir(parents=True)
    cert, _ = ca.issue([f"*.{PLATFORM}"]).write(folder / "etc" / "tlsedge", "platform")
    Path(cert).rename(folder / "etc" / "tlsedge" / "platform.pem")  # the example's name
    path = folder / "etc" / "tlsedge" / "tlsedge.yaml"
    path.write_text(text)
    return path, ports


def test_the_readme_example_config_passes_check_config_and_runs(
        tmp_path: Path, ca: CA, backend: Backend) -> None:
    config, ports = example_in(tmp_path, ca, backend)
    log_folder = tmp_path / "var" / "log" / "tlsedge"
    out = subprocess.run([sys.executable, "-m", "proxy.cli", "check-config", "-c",
                          str(config)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert not log_folder.exists()
    (tmp_path / "run").mkdir()
    edge = Edge(tmp_path / "run", {}, start=False)  # its client side, on the example
    edge.https_port, edge.http_port, edge.metrics_port = (
        ports["https"], ports["http"], ports["metrics"])
    edge.config_path = config
    edge.admin_port = ports["admin"]
    try:
        edge.start(timeout=60)
        assert edge.request(f"my-app.{PLATFORM}")[0] == 200
        deadline = time.monotonic() + 10
        log = log_folder / "access.log"
        while not (log.exists() and log.read_text()):
            assert time.monotonic() < deadline, "no access log line"
            time.sleep(0.1)
        assert '"app":"my-app"' in log.read_text()
        assert "Traceback" not in edge.log()
    finally:
        edge.__exit__(None, None, None)
