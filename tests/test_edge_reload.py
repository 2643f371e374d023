"""Reloads and shutdown of the real `tlsedge run`: SIGHUP swaps certificates and
config all-or-nothing, SIGTERM drains, and both reach every worker process.
"""

from __future__ import annotations

import json
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.certgen import CA, Issued
from tests.conftest import PLATFORM
from tests.support.backend import Backend
from tests.support.edge import Edge, established_remote_ports, read_response, send_request

APP_HOST = f"my-app.{PLATFORM}"
Config = tuple[dict[str, Any], dict[str, Issued]]


def wait_for(check: Callable[[], bool], timeout: float = 5.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def shop_files(config: dict[str, Any]) -> tuple[str, str]:
    entry = config["tls"]["certificates"][0]
    return entry["cert"], entry["key"]


def replace_file(path: str, data: bytes) -> None:
    """Write like ops tools do: a new file renamed over the old one."""
    tmp = Path(path + ".new")
    tmp.write_bytes(data)
    tmp.replace(path)


def test_new_certificate_is_served_after_sighup_and_an_old_connection_keeps_working(
        edge: Edge, edge_config: Config, ca: CA) -> None:
    config, issued = edge_config
    old = edge.tls_connect("www.shop.test")
    try:
        f = old.makefile("rb")
        send_request(old, "www.shop.test", "/before")
        assert read_response(f)[0] == 200
        fresh = ca.issue(["www.shop.test", "shop.test"])
        cert, key = shop_files(config)
        replace_file(key, fresh.key_pem)
        replace_file(cert, fresh.chain_pem)
        edge.reload(wait_for="reloaded")
        wait_for(lambda: edge.fingerprint("www.shop.test") == fresh.fingerprint,
                 what="the new certificate")
        assert edge.fingerprint("shop.test") == fresh.fingerprint
        assert edge.fingerprint(APP_HOST) == issued["platform"].fingerprint
        # The connection opened before the reload still carries requests.
        send_request(old, "www.shop.test", "/after")
        status, _, body = read_response(f)
        assert status == 200 and json.loads(body)["path"] == "/after"
    finally:
        old.close()
    assert edge.metric("tlsedge_reloads_total", result="ok") == 1


def other_key_line(config: dict[str, Any]) -> str:
    """A base64 line from the middle of the (current) shop key file."""
    return Path(shop_files(config)[1]).read_text().splitlines()[1]


def _garbage(files: tuple[str, str], other: Issued) -> str:
    replace_file(files[0], b"this is not a certificate\n")
    return files[0]


def _foreign_key(files: tuple[str, str], other: Issued) -> str:
    replace_file(files[1], other.key_pem)  # a valid key, of another certificate
    return files[1]


@pytest.mark.parametrize("breakage", [_garbage, _foreign_key], ids=["garbage-cert",
                                                                    "key-mismatch"])
def test_broken_certificate_file_keeps_the_old_certificate_and_counts_a_failed_reload(
        edge: Edge, edge_config: Config, ca: CA,
        breakage: Callable[[tuple[str, str], Issued], str]) -> None:
    config, issued = edge_config
    bad_file = breakage(shop_files(config), ca.issue(["www.shop.test"]))
    new_log = edge.reload(wait_for="reload refused")
    failures = [line for line in new_log.splitlines() if "reload refused" in line]
    assert len(failures) == 1
    assert bad_file in failures[0] and "tls.certificates[0]" in failures[0]
    # No key material in the log, whichever file broke.
    assert "PRIVATE KEY-----" not in new_log
    assert other_key_line(config) not in new_log
    assert "reloaded:" not in new_log  # the workers were never told
    assert edge.metric("tlsedge_reloads_total", result="failed") == 1
    assert edge.metric("tlsedge_reloads_total", result="ok") == 0
    for _ in range(3):
        assert edge.fingerprint("www.shop.test") == issued["shop"].fingerprint
    assert edge.request("www.shop.test", "/")[0] == 200


def test_broken_yaml_keeps_serving_and_counts_a_failed_reload(
        edge: Edge, edge_config: Config) -> None:
    _, issued = edge_config
    edge.config_path.write_text("platform_domain: [unclosed\ntls: {\n")
    new_log = edge.reload(wait_for="reload refused")
    [line] = [x for x in new_log.splitlines() if "reload refused" in x]
    assert "tlsedge.yaml: invalid YAML (line" in line
    assert edge.metric("tlsedge_reloads_total", result="failed") == 1
    assert edge.fingerprint("www.shop.test") == issued["shop"].fingerprint
    assert edge.request(APP_HOST, "/")[0] == 200


def test_config_change_adding_an_app_and_a_domain_applies_on_sighup(
        edge: Edge, edge_config: Config) -> None:
    config, _ = edge_config
    with Backend("second") as second:
        assert edge.request(f"new-app.{PLATFORM}", "/")[0] == 404
        assert edge.request("new.shop.test", "/")[0] == 404
        changed = {**edge.config,
                   "apps": {**config["apps"], "new-app": {"backends": [second.address]}},
                   "domains": {**config["domains"], "new.shop.test": "new-app"}}
        edge.write_config(changed)
        edge.reload(wait_for="reloaded")
        for host in (f"new-app.{PLATFORM}", "new.shop.test"):
            status, _, body = edge.request(host, "/")
            assert status == 200 and json.loads(body)["backend"] == "second"
        assert json.loads(edge.request(APP_HOST, "/")[2])["backend"] == "b1"


def test_sigterm_finishes_the_request_in_flight_refuses_new_connections_and_exits_0(
        edge: Edge, backend: Backend) -> None:
    with edge.tls_connect(APP_HOST) as s:
        send_request(s, APP_HOST, "/slow?1.5")
        wait_for(lambda: any(x.path.startswith("/slow") for x in backend.seen),
                 what="the backend to get the slow request")
        started = time.monotonic()
        edge.signal(signal.SIGTERM)
        refused_at = None
        deadline = started + 1.2
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", edge.https_port), timeout=0.3).close()
            except ConnectionRefusedError:
                refused_at = time.monotonic()
                break
            time.sleep(0.05)
        assert refused_at is not None, "new connections were still accepted while draining"
        status, headers, body = read_response(s)
        assert status == 200 and json.loads(body)["path"] == "/slow?1.5"
        assert headers.get("connection") == "close"
    assert edge.proc is not None
    assert edge.proc.wait(timeout=5) == 0
    assert time.monotonic() - started < 5  # within drain_timeout


# -- several workers -------------------------------------------------------------

@pytest.fixture
def edge2(tmp_path: Path, edge_config: Config) -> Edge:
    config, _ = edge_config
    return Edge(tmp_path, {**config, "workers": 2})


def worker_backend_connections(edge: Edge, backend: Backend) -> dict[int, int]:
    """Per worker pid: its open TCP connections to the backend (pooled keep-alives)."""
    return {pid: established_remote_ports(pid).count(backend.port)
            for pid in edge.worker_pids()}


def test_two_workers_both_serve_reload_and_stop(
        edge2: Edge, edge_config: Config, backend: Backend, ca: CA) -> None:
    config, issued = edge_config
    edge = edge2
    with edge:
        pids = edge.worker_pids()
        assert len(pids) == 2
        # SO_REUSEPORT spreads new connections over both workers; each keeps its
        # backend connection pooled afterwards, which /proc shows per process.
        for i in range(24):
            assert edge.request(APP_HOST, f"/spread/{i}")[0] == 200
        per_worker = worker_backend_connections(edge, backend)
        assert sorted(per_worker) == sorted(pids)
        assert all(n >= 1 for n in per_worker.values()), per_worker

        fresh = ca.issue(["www.shop.test", "shop.test"])
        cert, key = shop_files(config)
        replace_file(key, fresh.key_pem)
        replace_file(cert, fresh.chain_pem)
        edge.reload(wait_for="reloaded")
        wait_for(lambda: edge.log().count("reloaded:") >= 2, what="both workers to reload")
        # 24 fresh handshakes: if one worker kept the old certificate, the chance that
        # none of them reached it is 2**-24.
        seen = {edge.fingerprint("www.shop.test") for _ in range(24)}
        assert seen == {fresh.fingerprint}
        assert issued["shop"].fingerprint not in seen

        assert edge.stop(timeout=10) == 0
        for pid in pids:
            wait_for(lambda pid=pid: not Path(f"/proc/{pid}").exists(),
                     what=f"worker {pid} to exit")
