"""The operator's commands, run as a person runs them (the real CLI in a subprocess):
`tlsedge --version`, `tlsedge reload` against a running node (through the admin API,
and by signal through the pid file), `-c` defaulting to $TLSEDGE_CONFIG, `csr` with
several names, every subcommand with a closed or broken stdout and with a missing
output folder (never a traceback), and the demo on taken default ports with its
admin listener.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from tests.certgen import CA
from tests.support.edge import Edge

ROOT = Path(__file__).resolve().parent.parent


def tlsedge(*args: str, env: dict[str, str] | None = None, cwd: Path = ROOT,
            timeout: float = 90) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    return subprocess.run([sys.executable, "-m", "proxy.cli", *args], capture_output=True,
                          text=True, timeout=timeout, env={**environ, **(env or {})}, cwd=cwd)


def test_version_names_tlsedge_python_openssl_and_uvloop() -> None:
    done = tlsedge("--version")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("tlsedge 0.")
    assert lines[1].startswith("Python 3.")
    assert lines[2].startswith("OpenSSL 3.")
    assert lines[3].startswith("uvloop 0.")


# --------------------------------------------------------------------------- reload


def swap_static_certificate(edge: Edge, ca: CA, tmp_path: Path) -> str:
    """Point tls.certificates at a new certificate for www.shop.test; its fingerprint."""
    issued = ca.issue(["www.shop.test", "shop.test"])
    cert, key = issued.write(tmp_path, "shop-new")
    config = copy.deepcopy(edge.config)
    config["tls"]["certificates"] = [{"cert": cert, "key": key}]
    edge.write_config(config)
    return issued.fingerprint


@pytest.mark.parametrize("admin", [True, False], ids=["admin-api", "pid-file"])
def test_reload_exits_0_once_every_worker_serves_the_new_certificate(
        tmp_path: Path, ca: CA, edge_config: Any, admin: bool) -> None:
    config, _ = edge_config
    config = {**copy.deepcopy(config), "workers": 2}
    with Edge(tmp_path, config, admin=admin) as edge:
        old = edge.fingerprint("www.shop.test")
        new = swap_static_certificate(edge, ca, tmp_path)
        done = tlsedge("reload", "-c", str(edge.config_path))
        assert done.returncode == 0, done.stdout + done.stderr
        how = ("through the admin API" if admin
               else f"sent SIGHUP to tlsedge (pid {edge.proc.pid if edge.proc else 0}")
        assert how in done.stdout
        assert done.stdout.splitlines()[-1] == "reloaded: every worker serves the new config"
        # No wait: the command returned only once both workers swapped.
        for _ in range(8):  # fresh connections land on either worker (SO_REUSEPORT)
            assert edge.fingerprint("www.shop.test") == new != old


@pytest.mark.parametrize("admin", [True, False], ids=["admin-api", "pid-file"])
def test_reload_of_broken_yaml_exits_1_with_the_reason_and_keeps_serving(
        tmp_path: Path, edge_config: Any, admin: bool) -> None:
    config, _ = edge_config
    with Edge(tmp_path, copy.deepcopy(config), admin=admin) as edge:
        before = edge.fingerprint("www.shop.test")
        good = edge.config_path.read_text()
        edge.config_path.write_text(good + "tls: {platform_certificate: [\n")
        done = tlsedge("reload", "-c", str(edge.config_path))
        assert done.returncode == 1
        assert done.stdout == ""
        [line] = done.stderr.splitlines()
        assert line.startswith("tlsedge: tlsedge.yaml: invalid YAML (line "), line
        assert edge.fingerprint("www.shop.test") == before
        assert edge.metric("tlsedge_reloads_total") == 0  # the node was never asked
        assert edge.proc is not None and edge.proc.poll() is None


def test_reload_without_a_running_node_says_so_in_one_line(
        tmp_path: Path, edge_config: Any) -> None:
    config, _ = edge_config
    edge = Edge(tmp_path, {**copy.deepcopy(config), "store": {"path": str(tmp_path / "s")}},
                start=False)
    done = tlsedge("reload", "-c", str(edge.config_path))
    assert done.returncode == 1
    [line] = done.stderr.splitlines()
    assert line.startswith("tlsedge: no running tlsedge found: ")
    assert str(tmp_path / "s" / "tlsedge.pid") in line


def test_config_defaults_to_tlsedge_config_then_etc(tmp_path: Path, edge_config: Any) -> None:
    config, _ = edge_config
    edge = Edge(tmp_path, copy.deepcopy(config), start=False)
    done = tlsedge("check-config", env={"TLSEDGE_CONFIG": str(edge.config_path)})
    assert done.returncode == 0, done.stderr
    assert f"\n{edge.config_path}: ok" in "\n" + done.stdout, done.stdout
    listed = tlsedge("domains", "list", env={"TLSEDGE_CONFIG": str(edge.config_path)})
    assert listed.returncode == 0, listed.stderr
    if not Path("/etc/tlsedge/tlsedge.yaml").exists():  # else this machine runs one
        env = {k: v for k, v in os.environ.items() if k != "TLSEDGE_CONFIG"}
        bare = subprocess.run([sys.executable, "-m", "proxy.cli", "domains", "list"],
                              capture_output=True, text=True, timeout=30, env=env)
        assert bare.stderr.startswith("tlsedge: /etc/tlsedge/tlsedge.yaml: cannot read")
    helped = " ".join(tlsedge("check-config", "--help").stdout.split())
    assert "(default: $TLSEDGE_CONFIG, else /etc/tlsedge/tlsedge.yaml)" in helped


# --------------------------------------------------------------------------- csr


def test_csr_carries_every_name_and_creates_the_missing_folder(tmp_path: Path) -> None:
    out = tmp_path / "new" / "keys"
    done = tlsedge("csr", "www.example.com", "example.com", "*.cdn.example.com",
                   "--out", str(out))
    assert done.returncode == 0, done.stderr
    csr = x509.load_pem_x509_csr((out / "www.example.com.csr").read_bytes())
    sans = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == [
        "www.example.com", "example.com", "*.cdn.example.com"]
    key = out / "www.example.com.key"
    assert key.stat().st_mode & 0o777 == 0o600
    assert out.stat().st_mode & 0o777 == 0o700
    again = tlsedge("csr", "www.example.com", "--out", str(out))
    assert again.returncode == 1
    assert again.stderr.splitlines() == [f"tlsedge: {key} exists; not overwriting a "
                                         "private key"]


# --------------------------------------------------------------------------- no traceback


def commands(config: Path, out: Path, taken: int) -> list[list[str]]:
    c = ["-c", str(config)]
    return [["--version"], ["--help"], ["check-config", *c], ["reload", *c],
            ["domains", "list", *c], ["domains", "list", "--json", *c],
            ["domains", "show", "www.nowhere.test", *c],
            ["domains", "add", "www.new.test", "--app", "ghost", *c],
            ["domains", "remove", "www.nowhere.test", *c],
            ["domains", "ssl", "www.nowhere.test", "--cert", str(out / "a.pem"),
             "--key", str(out / "a.key"), *c],
            ["domains", "retry", "www.nowhere.test", *c],
            ["csr", "www.csr.test", "--out", str(out / "missing" / "deeper")],
            ["cluster", "status", *c],
            ["demo", "--dir", str(out / "demo"), "--https-port", str(taken)],
            ["run", "-c", str(out / "absent.yaml")]]


@contextlib.contextmanager
def broken_pipe() -> Iterator[int]:
    read, write = os.pipe()
    os.close(read)  # the reader is gone before anything is written
    try:
        yield write
    finally:
        os.close(write)


@pytest.mark.parametrize("stdout", ["closed", "broken-pipe"])
def test_no_subcommand_shows_a_traceback_with_a_closed_stdout_or_missing_folders(
        tmp_path: Path, edge_config: Any, stdout: str) -> None:
    config, _ = edge_config
    edge = Edge(tmp_path, copy.deepcopy(config), start=False)
    out = tmp_path / "out"
    environ = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    with taken:
        for argv in commands(edge.config_path, out, taken.getsockname()[1]):
            run_without_stdout(argv, stdout, environ)
    assert (out / "missing" / "deeper" / "www.csr.test.key").exists()


def run_without_stdout(argv: list[str], stdout: str, environ: dict[str, str]) -> None:
    cmd = [sys.executable, "-m", "proxy.cli", *argv]
    if stdout == "closed":
        done = subprocess.run(["sh", "-c", 'exec "$@" >&-', "sh", *cmd],
                              capture_output=True, text=True, timeout=60, env=environ)
    else:
        with broken_pipe() as write:
            done = subprocess.run(cmd, stdout=write, stderr=subprocess.PIPE, text=True,
                                  timeout=60, env=environ)
    assert "Traceback" not in (done.stderr or ""), (argv, done.stderr)
    assert "Exception ignored" not in (done.stderr or ""), (argv, done.stderr)
    assert done.returncode in (0, 1, 2), (argv, done.returncode, done.stderr)
    assert len((done.stderr or "").splitlines()) <= 2, (argv, done.stderr)


# --------------------------------------------------------------------------- demo


@contextlib.contextmanager
def holding(port: int) -> Iterator[bool]:
    """Keep 127.0.0.1:port taken (True), or say it already was (False)."""
    sock = socket.socket()
    try:
        sock.bind(("127.0.0.1", port))
        sock.listen(1)
    except OSError:
        sock.close()
        yield False
        return
    try:
        yield True
    finally:
        sock.close()


def test_demo_moves_off_a_taken_default_port_and_serves_the_admin_dashboard(
        tmp_path: Path) -> None:
    with holding(8443):
        proc = subprocess.Popen(
            [sys.executable, "-m", "proxy.cli", "demo", "--dir", str(tmp_path / "demo")],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"},
            start_new_session=True)
        try:
            assert proc.stdout is not None
            printed = ""
            deadline = time.monotonic() + 60
            while "Ctrl-C stops it" not in printed and time.monotonic() < deadline:
                line = proc.stdout.readline()
                if not line:
                    break
                printed += line
            assert "tlsedge demo is serving" in printed, printed
            moved = [ln for ln in printed.splitlines() if "https port 8443 is taken" in ln]
            assert moved, printed
            https = int(moved[0].rsplit(" ", 1)[1])
            assert f":{https}/" in printed and https != 8443
            dashboard = next(ln for ln in printed.splitlines() if ln.startswith("Dashboard:"))
            url = dashboard.split()[1]
            token_file = Path(dashboard.rsplit(" ", 1)[1])
            token = token_file.read_text().strip()
            assert token_file.stat().st_mode & 0o777 == 0o600
            request = urllib.request.Request(url + "api/v1/domains",
                                             headers={"Authorization": f"Bearer {token}"})
            with urllib.request.urlopen(request, timeout=10) as answer:
                assert answer.status == 200
                assert "domains" in json.loads(answer.read())
            with urllib.request.urlopen(url + "login", timeout=10) as page:
                assert page.status == 200 and b"token" in page.read().lower()
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            rest, _ = proc.communicate(timeout=40)
            print(rest)  # the demo's log, shown when the test fails


def test_demo_refuses_a_taken_port_it_was_asked_for_in_one_line(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)
        port = sock.getsockname()[1]
        done = tlsedge("demo", "--dir", str(tmp_path / "demo"), "--https-port", str(port))
    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        f"tlsedge: --https-port: 127.0.0.1:{port} is taken; pick another port or leave "
        "the option out"]


def test_statuses_say_acme_off_when_the_config_has_no_acme_section(
        tmp_path: Path, edge_config: Any) -> None:
    config, _ = edge_config
    edge = Edge(tmp_path, copy.deepcopy(config), start=False)
    c = ["-c", str(edge.config_path)]
    added = tlsedge("domains", "add", "www.shop-two.test", "--app", "my-app", *c)
    assert added.returncode == 0, added.stderr
    assert "Let's Encrypt: ACME off" in added.stdout
    shown = json.loads(tlsedge("domains", "show", "www.shop-two.test", "--json", *c).stdout)
    assert shown["status"] == "acme_off" and shown["status_label"] == "ACME off"
    assert "no acme: section" in shown["message"]
    unknown = tlsedge("domains", "add", "www.shop-three.test", "--app", "ghost", *c)
    assert unknown.stderr.splitlines() == [
        "tlsedge: app 'ghost' does not exist (apps: my-app)"]


def test_config_domains_are_listed_marked_and_read_only(
        tmp_path: Path, edge_config: Any) -> None:
    config, _ = edge_config  # domains: {www.shop.test: my-app}
    edge = Edge(tmp_path, copy.deepcopy(config), start=False)
    c = ["-c", str(edge.config_path)]
    assert tlsedge("domains", "add", "www.stored.test", "--app", "my-app", *c).returncode == 0
    listed = json.loads(tlsedge("domains", "list", "--json", *c).stdout)
    assert {(v["name"], v["source"]) for v in listed} == {("www.stored.test", "store"),
                                                          ("www.shop.test", "config")}
    table = tlsedge("domains", "list", *c).stdout.splitlines()
    assert table[0].split()[:2] == ["DOMAIN", "SOURCE"]
    assert any(row.split()[:3] == ["www.shop.test", "config", "my-app"] for row in table)
    shown = json.loads(tlsedge("domains", "show", "www.shop.test", "--json", *c).stdout)
    assert shown["source"] == "config" and shown["status_label"] == "Config"
    for change in (["remove", "www.shop.test"], ["ssl", "www.shop.test", "disable"],
                   ["retry", "www.shop.test"]):
        refused = tlsedge("domains", *change, *c)
        assert refused.returncode == 1
        assert refused.stderr.splitlines() == [
            f"tlsedge: domain www.shop.test is defined in the config file "
            f"{edge.config_path.resolve()}; change or remove it there, then reload "
            "(`tlsedge reload`)"], change


def test_expiry_reads_in_words_the_dashboard_uses(tmp_path: Path, edge_config: Any,
                                                 ca: CA) -> None:
    from proxy.certs.bundle import load_bundle
    from tests.certgen import DAY
    from tests.support.admin import in_store

    config, _ = edge_config
    edge = Edge(tmp_path, copy.deepcopy(config), start=False)
    c = ["-c", str(edge.config_path)]
    name = "www.lapsed.test"
    assert tlsedge("domains", "add", name, "--app", "my-app", *c).returncode == 0
    now = time.time()
    lapsed = ca.issue([name], not_before=now - 60 * DAY, not_after=now - 3 * DAY - 3600)
    custom = ca.issue([name], not_before=now - DAY, not_after=now + 12 * DAY + 3600)

    async def certificates(registry: Any) -> None:
        await registry.store_acme_certificate(name, load_bundle(
            lapsed.chain_pem, lapsed.key_pem, domain=name, check_time=False))
        await registry.set_custom_certificate(name, custom.chain_pem, custom.key_pem)

    in_store(edge, certificates)
    shown = tlsedge("domains", "show", name, *c)
    assert shown.returncode == 0, shown.stderr
    lines = {line.split(":", 1)[0]: line.split(":", 1)[1].strip()
             for line in shown.stdout.splitlines()}
    until = time.strftime("%Y-%m-%d", time.gmtime(custom.cert.not_valid_after_utc.timestamp()))
    ended = time.strftime("%Y-%m-%d", time.gmtime(lapsed.cert.not_valid_after_utc.timestamp()))
    assert lines["certificate"] == f"custom; expires {until} (in 12 days)"
    assert lines["acme"].endswith(f"valid until {ended} (expired 3 days ago)")
    assert lines["custom"].endswith(f"valid until {until} (in 12 days)")
    row = next(r for r in tlsedge("domains", "list", *c).stdout.splitlines()
               if r.startswith(name))
    assert f"{until} (in 12 days)" in row


def test_adding_a_config_file_domain_to_the_store_says_the_store_wins(
        tmp_path: Path, edge_config: Any) -> None:
    config, _ = edge_config  # domains: {www.shop.test: my-app}
    edge = Edge(tmp_path, copy.deepcopy(config), start=False)
    added = tlsedge("domains", "add", "www.shop.test", "--app", "my-app",
                    "-c", str(edge.config_path))
    assert added.returncode == 0, added.stderr
    assert added.stderr.splitlines() == [
        f"tlsedge: warning: www.shop.test is also in the config file "
        f"{edge.config_path.resolve()}: the store's domain wins from now on (its app, its "
        "certificate once it has one); remove it from the config file"]
