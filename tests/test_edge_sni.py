"""SNI matrix on the real `tlsedge run`: each name gets the right certificate."""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

import pytest

from tests.certgen import Issued
from tests.conftest import PLATFORM
from tests.support.edge import Edge, read_response, send_request

CASES = [
    ("exact custom name", "www.shop.test", "shop"),
    ("second SAN of the same certificate", "shop.test", "shop"),
    ("platform wildcard for <app>.<platform>", f"my-app.{PLATFORM}", "platform"),
    ("upper case", "WWW.SHOP.TEST", "shop"),
    ("trailing dot", "www.shop.test.", "shop"),
    ("unknown name falls to the platform certificate", "nobody.example.test", "platform"),
    ("two labels below the platform wildcard do not match it", f"a.b.{PLATFORM}", "platform"),
]


@pytest.mark.parametrize(("what", "sni", "expected"), CASES, ids=[c[0] for c in CASES])
def test_sni_picks_certificate_python_client(edge: Edge, edge_config: tuple[Any, dict[str, Issued]],
                                             what: str, sni: str, expected: str) -> None:
    _, issued = edge_config
    assert edge.fingerprint(sni) == issued[expected].fingerprint


@pytest.mark.parametrize("sni", ["www.shop.test", f"my-app.{PLATFORM}", None])
def test_sni_picks_certificate_openssl_client(
        edge: Edge, edge_config: tuple[Any, dict[str, Issued]], sni: str | None) -> None:
    _, issued = edge_config
    expected = "shop" if sni == "www.shop.test" else "platform"
    assert edge.openssl_fingerprint(sni) == issued[expected].fingerprint


def test_no_sni_and_ip_literal_get_the_default_certificate(
        edge: Edge, edge_config: tuple[Any, dict[str, Issued]]) -> None:
    _, issued = edge_config
    assert edge.fingerprint(None) == issued["platform"].fingerprint
    # Python's ssl does not send an IP literal as SNI; openssl does with -servername.
    assert edge.openssl_fingerprint("127.0.0.1") == issued["platform"].fingerprint


def test_unknown_sni_is_refused_when_configured_to_reject(
        tmp_path: Path, edge_config: tuple[dict[str, Any], dict[str, Issued]]) -> None:
    config, issued = edge_config
    config["tls"]["unknown_sni"] = "reject"
    with Edge(tmp_path, config) as edge:
        # The handshake is refused with unrecognized_name (tests/test_reliability_tls.py
        # checks the alert with openssl s_client).
        with pytest.raises(ssl.SSLError, match="UNRECOGNIZED_NAME"):
            edge.fingerprint("nobody.example.test")
        # Known names and the platform wildcard still work.
        assert edge.fingerprint("www.shop.test") == issued["shop"].fingerprint
        assert edge.fingerprint(f"my-app.{PLATFORM}") == issued["platform"].fingerprint
        assert edge.metric("tlsedge_sni_lookups_total", result="rejected") >= 1


def test_served_chain_verifies_against_the_ca(edge: Edge, ca: Any, tmp_path: Path) -> None:
    cafile = ca.write_ca(tmp_path / "ca.pem")
    with edge.tls_connect("www.shop.test", cafile=cafile) as s:
        assert s.version() in ("TLSv1.3", "TLSv1.2")
        assert s.selected_alpn_protocol() in (None, "http/1.1")


def test_tls_1_1_is_refused(edge: Edge) -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ssl.TLSVersion.TLSv1
    ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    import socket
    with socket.create_connection(("127.0.0.1", edge.https_port)) as raw, \
            pytest.raises(ssl.SSLError):
        ctx.wrap_socket(raw, server_hostname="www.shop.test")


@pytest.mark.parametrize(("offered", "chosen"), [
    (["h2", "http/1.1"], "h2"), (["http/1.1", "h2"], "h2"), (["http/1.1"], "http/1.1")])
def test_alpn_prefers_h2_and_offers_http11(edge: Edge, offered: list[str],
                                           chosen: str) -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(offered)
    import socket
    with socket.create_connection(("127.0.0.1", edge.https_port)) as raw, \
            ctx.wrap_socket(raw, server_hostname="www.shop.test") as s:
        assert s.selected_alpn_protocol() == chosen


def _ticket_received(edge: Edge) -> bool:
    with edge.tls_connect("www.shop.test") as s:
        send_request(s, "www.shop.test")
        read_response(s)  # tickets arrive after the handshake, before our response
        return s.session is not None and s.session.has_ticket


def test_session_tickets_follow_the_configured_policy(
        tmp_path: Path, edge: Edge, edge_config: tuple[dict[str, Any], dict[str, Issued]]) -> None:
    # Default: no TLS 1.3 tickets (measured cheaper for this server).
    assert _ticket_received(edge) is False
    config, _ = edge_config
    config["tls"]["session_tickets"] = 2
    other = tmp_path / "tickets"
    other.mkdir()
    with Edge(other, config) as with_tickets:
        assert _ticket_received(with_tickets) is True
