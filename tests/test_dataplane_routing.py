"""Per-app routing features and forwarding headers on the real `tlsedge run`: backend
quarantine and recovery, force_https (HSTS), canonical_domain redirects, Host vs SNI
(421), the backend queue bound, and trusted proxies.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator

import pytest

from tests.certgen import CA
from tests.conftest import PLATFORM
from tests.support.backend import Backend
from tests.support.edge import Edge
from tests.support.ports import free_port

APP = f"my-app.{PLATFORM}"
SHOP = "www.shop.test"


class Setup:
    def __init__(self, edge: Edge, app: Backend, other: Backend, spare_port: int) -> None:
        self.edge, self.app, self.other, self.spare_port = edge, app, other, spare_port


@pytest.fixture(scope="module")
def setup(ca: CA, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    workdir = tmp_path_factory.mktemp("edge-routing")
    pcert, pkey = ca.issue([f"*.{PLATFORM}"]).write(workdir, "platform")
    scert, skey = ca.issue([SHOP, "shop.test"]).write(workdir, "shop")
    spare_port = free_port()  # the "pair" app's second backend: down until a test starts it
    with Backend("app") as app, Backend("other") as other:
        config = {
            "platform_domain": PLATFORM,
            "workers": 1,
            "tls": {"platform_certificate": {"cert": pcert, "key": pkey},
                    "certificates": [{"cert": scert, "key": skey}]},
            "store": {"path": "store"},
            "apps": {
                "my-app": {"backends": [app.address]},
                "pair": {"backends": [other.address, f"127.0.0.1:{spare_port}"]},
                "secure": {"backends": [app.address], "force_https": True},
                "shop": {"backends": [app.address], "canonical_domain": SHOP},
                "queued": {"backends": [app.address]},
                "dead": {"backends": [f"127.0.0.1:{free_port()}",
                                      f"127.0.0.1:{free_port()}"]},
            },
            "domains": {SHOP: "shop", "shop.test": "shop"},
            "limits": {"drain_timeout": 2, "backend_quarantine": 1.0,
                       "backend_max_connections": 2, "backend_queue": 2},
        }
        with Edge(workdir, config) as edge:
            yield Setup(edge, app, other, spare_port)


def backend_of(edge: Edge, host: str) -> str:
    status, _, body = edge.request(host, "/who")
    assert status == 200, status
    return str(json.loads(body)["backend"])


def test_down_backend_is_quarantined_skipped_then_used_again_when_back(setup: Setup) -> None:
    edge, host = setup.edge, f"pair.{PLATFORM}"
    # Round robin meets the down backend; the request still succeeds on the other one.
    assert {backend_of(edge, host) for _ in range(4)} == {"other"}
    assert edge.metric("tlsedge_limits_hit_total", limit="backend_quarantine") >= 1
    with Backend("spare", port=setup.spare_port) as spare:
        time.sleep(1.2)  # the quarantine ends
        seen = {backend_of(edge, host) for _ in range(6)}
        assert seen == {"other", "spare"}
        assert spare.seen


def test_all_backends_down_gives_503_only_once_they_are_all_quarantined(
        setup: Setup) -> None:
    statuses = [setup.edge.request(f"dead.{PLATFORM}", "/")[0] for _ in range(3)]
    assert statuses[0] == 502  # tried both, both refused
    assert statuses[1:] == [503, 503]  # both in quarantine: not even tried


def test_force_https_app_gets_hsts_and_others_do_not(setup: Setup) -> None:
    status, headers, _ = setup.edge.request(f"secure.{PLATFORM}", "/")
    assert status == 200
    assert headers["strict-transport-security"] == "max-age=31536000"
    assert "strict-transport-security" not in setup.edge.request(APP, "/")[1]


def test_canonical_domain_redirects_with_path_and_query(setup: Setup) -> None:
    edge = setup.edge
    status, headers, _ = edge.request("shop.test", "/a/b?x=1&y=2")
    assert status == 301
    assert headers["location"] == f"https://{SHOP}:{edge.https_port}/a/b?x=1&y=2"
    before = len(setup.app.seen)
    assert edge.request(SHOP, "/a")[0] == 200
    assert len(setup.app.seen) == before + 1


def test_host_outside_the_sni_certificate_gets_421_and_is_not_relayed(setup: Setup) -> None:
    edge = setup.edge
    before = len(setup.app.seen)
    status, headers, body = edge.request(APP, "/", server_name=SHOP)
    assert status == 421
    assert headers["x-request-id"].encode() in body
    status, _, _ = edge.request(SHOP, "/", server_name=APP)
    assert status == 421
    assert len(setup.app.seen) == before
    # Names the same certificate covers, and clients without SNI, are served.
    assert edge.request(APP, "/", server_name=f"other.{PLATFORM}")[0] == 200
    assert edge.request(APP, "/", server_name=None)[0] == 200


def test_backend_queue_bound_gives_503_beyond_connections_plus_queue(setup: Setup) -> None:
    edge, host = setup.edge, f"queued.{PLATFORM}"
    results: list[int] = []

    def slow() -> None:
        results.append(edge.request(host, "/slow?1.0")[0])

    threads = [threading.Thread(target=slow) for _ in range(7)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # 2 connections + 2 waiting are served; the other 3 are refused at once.
    assert sorted(results) == [200] * 4 + [503] * 3


def test_untrusted_peer_cannot_set_request_id_or_forwarding_headers(setup: Setup) -> None:
    before = len(setup.app.seen)
    status, _, _ = setup.edge.request(APP, "/ids", headers={
        "X-Request-ID": "client-chosen-id-123", "X-Forwarded-For": "6.6.6.6",
        "X-Request-Start": "t=1"})
    assert status == 200
    [seen] = setup.app.seen[before:]
    request_id = seen.header("X-Request-ID")
    assert request_id is not None and request_id != "client-chosen-id-123"
    assert len(request_id) == 32
    assert seen.header("X-Forwarded-For") == "127.0.0.1"
    start = seen.header("X-Request-Start") or ""
    assert start.startswith("t=") and len(start) == 18  # microseconds since the epoch


def test_trusted_proxy_keeps_request_id_and_extends_forwarded_for(
        ca: CA, tmp_path_factory: pytest.TempPathFactory) -> None:
    workdir = tmp_path_factory.mktemp("edge-trusted")
    pcert, pkey = ca.issue([f"*.{PLATFORM}"]).write(workdir, "platform")
    with Backend("app") as app:
        config = {
            "platform_domain": PLATFORM, "workers": 1,
            "tls": {"platform_certificate": {"cert": pcert, "key": pkey}},
            "store": {"path": "store"},
            "apps": {"my-app": {"backends": [app.address]}},
            "trusted_proxies": ["127.0.0.0/8"],
            "limits": {"drain_timeout": 2},
        }
        with Edge(workdir, config) as edge:
            status, _, _ = edge.request(APP, "/", headers={
                "X-Request-ID": "lb-id-12345678", "X-Forwarded-For": "203.0.113.7",
                "X-Real-IP": "203.0.113.7"})
            assert status == 200
            [seen] = app.seen
    assert seen.header("X-Request-ID") == "lb-id-12345678"
    assert seen.header("X-Forwarded-For") == "203.0.113.7, 127.0.0.1"
    assert seen.header("X-Real-IP") == "203.0.113.7"
