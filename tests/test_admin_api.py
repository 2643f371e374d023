"""The admin API on a real `tlsedge run` with `listen.admin`, over real sockets: every
endpoint, authentication, CSRF, the login rate limit, bad uploads that change nothing
(checked on the served certificate), and the public listeners never reaching it.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization

from tests.certgen import CA, Issued
from tests.conftest import PLATFORM
from tests.support.admin import (
    AdminClient,
    admin_token,
    edge_settings,
    hidden_csrf,
    in_store,
    multipart,
)
from tests.support.backend import Backend
from tests.support.edge import Edge, read_response, send_request

CONFIGURED = "www.configured.example"


@pytest.fixture(scope="module")
def module_backend() -> Iterator[Backend]:
    with Backend("admin-b") as b:
        yield b


@pytest.fixture(scope="module")
def admin_edge(tmp_path_factory: pytest.TempPathFactory, ca: CA,
               module_backend: Backend) -> Iterator[Edge]:
    workdir = tmp_path_factory.mktemp("admin")
    settings = edge_settings(workdir, ca, module_backend)
    settings["domains"] = {CONFIGURED: "my-app"}  # a config file's domain: read-only here
    with Edge(workdir, settings, admin=True) as edge:
        yield edge


@pytest.fixture
def api(admin_edge: Edge) -> AdminClient:
    return AdminClient(admin_edge, token=admin_token(admin_edge))


def served(edge: Edge, name: str, fingerprint: str, timeout: float = 8.0) -> None:
    """Wait until `name` is served with the certificate `fingerprint` (workers follow the store)."""
    deadline = time.monotonic() + timeout
    while (got := edge.fingerprint(name)) != fingerprint:
        assert time.monotonic() < deadline, f"{name} still served with {got[:16]}"
        time.sleep(0.1)


def platform_fp(edge: Edge) -> str:
    return edge.fingerprint(f"my-app.{PLATFORM}")


# -- token file ------------------------------------------------------------------------

def test_token_file_is_created_0600_on_first_start(admin_edge: Edge) -> None:
    path = Path(admin_edge.workdir) / "admin-token"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(path.read_text().strip()) >= 32
    assert "created the admin token file" in admin_edge.log()
    assert path.read_text().strip() not in admin_edge.log()  # never logged


def test_token_file_readable_by_others_stops_the_start(tmp_path: Path, ca: CA,
                                                      backend: Backend) -> None:
    token = tmp_path / "admin-token"
    token.write_text("x" * 40 + "\n")
    os.chmod(token, 0o644)
    edge = Edge(tmp_path, edge_settings(tmp_path, ca, backend), admin=True, start=False)
    with pytest.raises(RuntimeError, match="chmod 600"):
        edge.start()
    edge.kill()


def test_no_admin_listener_without_listen_admin(edge: Edge) -> None:
    assert not (Path(edge.workdir) / "admin-token").exists()
    assert "admin API" not in edge.log()


# -- endpoints ---------------------------------------------------------------------------

def test_add_list_show_and_remove_a_domain(api: AdminClient) -> None:
    added = api.request("POST", "/api/v1/domains",
                        json_body={"name": "WWW.Alpha.example", "app": "my-app"})
    assert added.status == 201, added.text
    assert added.json()["name"] == "www.alpha.example"
    assert added.json()["status_label"] == "ACME off"  # the node has no acme: section
    listing = api.request("GET", "/api/v1/domains")
    assert listing.status == 200
    (row,) = [d for d in listing.json()["domains"] if d["name"] == "www.alpha.example"]
    assert row["app"] == "my-app" and row["in_use"] == "platform"
    assert {"status", "status_label", "last_error", "custom", "acme", "expires_at"} <= set(row)
    shown = api.request("GET", "/api/v1/domains/www.alpha.example")
    assert shown.status == 200 and shown.json()["name"] == "www.alpha.example"
    assert api.request("POST", "/api/v1/domains", json_body={
        "name": "www.alpha.example", "app": "my-app"}).status == 409
    removed = api.request("DELETE", "/api/v1/domains/www.alpha.example")
    assert removed.status == 200 and removed.json() == {"removed": "www.alpha.example"}
    assert api.request("GET", "/api/v1/domains/www.alpha.example").status == 404


def test_add_domain_refusals_use_the_registry_words(api: AdminClient) -> None:
    unknown_app = api.request("POST", "/api/v1/domains",
                              json_body={"name": "x.example", "app": "nope"})
    assert unknown_app.status == 400
    assert unknown_app.json()["error"] == "app 'nope' does not exist (apps: my-app, other)"
    platform = api.request("POST", "/api/v1/domains",
                           json_body={"name": f"a.{PLATFORM}", "app": "my-app"})
    assert platform.status == 400 and "platform domain" in platform.json()["error"]
    bad_json = api.request("POST", "/api/v1/domains", body=b"{",
                           headers={"Content-Type": "application/json"})
    assert bad_json.status == 400
    assert api.request("POST", "/api/v1/domains", body=b"name=x",
                       headers={"Content-Type": "text/plain"}).status == 415
    assert api.request("GET", "/api/v1/nothing").status == 404
    assert api.request("PUT", "/api/v1/domains").status == 405


def test_upload_json_certificate_is_served_then_removed(api: AdminClient, admin_edge: Edge,
                                                       ca: CA) -> None:
    name = "json.example"
    assert api.request("POST", "/api/v1/domains",
                       json_body={"name": name, "app": "my-app"}).status == 201
    issued = ca.issue([name], intermediate=True)
    up = api.request("PUT", f"/api/v1/domains/{name}/certificate", json_body={
        "certificate": issued.chain_pem.decode(), "key": issued.key_pem.decode()})
    assert up.status == 200, up.text
    body = up.json()
    assert body["in_use"] == "custom"
    assert body["custom"]["fingerprint"] == issued.fingerprint
    assert body["custom"]["names"] == [name]
    assert "intermediate" in body["custom"]["issuer"]
    served(admin_edge, name, issued.fingerprint)
    gone = api.request("DELETE", f"/api/v1/domains/{name}/certificate")
    assert gone.status == 200 and gone.json()["in_use"] == "platform"
    served(admin_edge, name, platform_fp(admin_edge))
    again = api.request("DELETE", f"/api/v1/domains/{name}/certificate")
    assert again.status == 400
    assert again.json()["error"] == f"domain {name} has no custom certificate"


def test_upload_multipart_certificate_is_served(api: AdminClient, admin_edge: Edge,
                                               ca: CA) -> None:
    name = "multipart.example"
    api.request("POST", "/api/v1/domains", json_body={"name": name, "app": "other"})
    issued = ca.issue([name, f"www.{name}"])
    body, ctype = multipart({"certificate": ("chain.pem", issued.chain_pem, "application/"
                                             "x-x509-ca-cert"),
                             "key": ("key.pem", issued.key_pem, "application/octet-stream")})
    up = api.request("POST", f"/api/v1/domains/{name}/certificate", body=body,
                     headers={"Content-Type": ctype})
    assert up.status == 200, up.text
    served(admin_edge, name, issued.fingerprint)


def test_config_file_domain_is_shown_read_only_and_its_changes_get_409(
        api: AdminClient, admin_edge: Edge, ca: CA) -> None:
    shown = api.request("GET", f"/api/v1/domains/{CONFIGURED}")
    assert shown.status == 200, shown.text
    cli = subprocess.run([sys.executable, "-m", "proxy.cli", "domains", "show", CONFIGURED,
                          "--json", "-c", str(admin_edge.config_path)],
                         capture_output=True, text=True, timeout=60)
    assert shown.json() == json.loads(cli.stdout)  # the CLI's `domains show`, as is
    assert shown.json()["source"] == "config" and shown.json()["app"] == "my-app"
    assert shown.json()["status_label"] == "Config"
    page = api.request("GET", f"/domains/{CONFIGURED}")  # the dashboard's page too
    assert page.status == 200 and CONFIGURED in page.text
    # read-only there: no upload, remove or retry form, a line saying where to change it
    assert 'id="read-only"' in page.text and "change or remove it there" in page.text
    assert not any(f'id="{form}"' in page.text
                   for form in ("upload", "remove-domain", "remove-custom", "retry"))
    before = snapshot(api)
    issued = ca.issue([CONFIGURED])
    pair = {"certificate": issued.chain_pem.decode(), "key": issued.key_pem.decode()}
    refusal = (f"domain {CONFIGURED} is defined in the config file "
               f"{admin_edge.config_path.resolve()}; change or remove it there, then "
               "reload (`tlsedge reload`)")
    for method, path, body in [("DELETE", "", None), ("PUT", "/certificate", pair),
                               ("DELETE", "/certificate", None), ("POST", "/retry", None)]:
        reply = api.request(method, f"/api/v1/domains/{CONFIGURED}{path}", json_body=body)
        assert (reply.status, reply.json()) == (409, {"error": refusal}), (method, path)
    body, ctype = multipart({"certificate": ("chain.pem", issued.chain_pem, "text/plain"),
                             "key": ("key.pem", issued.key_pem, "text/plain")})
    upload = api.request("POST", f"/api/v1/domains/{CONFIGURED}/certificate", body=body,
                         headers={"Content-Type": ctype})
    assert (upload.status, upload.json()) == (409, {"error": refusal})
    removed = subprocess.run([sys.executable, "-m", "proxy.cli", "domains", "remove",
                              CONFIGURED, "-c", str(admin_edge.config_path)],
                             capture_output=True, text=True, timeout=60)
    assert removed.returncode == 1 and removed.stderr.splitlines() == [f"tlsedge: {refusal}"]
    assert snapshot(api) == before
    assert api.request("GET", f"/api/v1/domains/{CONFIGURED}").json() == shown.json()
    assert admin_edge.fingerprint(CONFIGURED) == platform_fp(admin_edge)  # nothing uploaded
    assert api.request("GET", "/api/v1/domains/nowhere.example").status == 404


def test_reload_endpoint_applies_or_explains(api: AdminClient, admin_edge: Edge) -> None:
    ok = api.request("POST", "/api/v1/reload")
    assert ok.status == 200 and ok.json() == {"reloaded": True}
    good = admin_edge.config_path.read_text()
    admin_edge.config_path.write_text(good + "\nnot: [valid\n")
    try:
        refused = api.request("POST", "/api/v1/reload")
    finally:
        admin_edge.config_path.write_text(good)
    assert refused.status == 409
    assert refused.json()["error"].startswith("reload refused: tlsedge.yaml: invalid YAML")
    assert api.request("GET", "/api/v1/domains").status == 200


# -- authentication and CSRF -----------------------------------------------------------------

STATE_CHANGES = [
    ("POST", "/api/v1/domains", {"name": "intruder.example", "app": "my-app"}),
    ("DELETE", "/api/v1/domains/guarded.example", None),
    ("PUT", "/api/v1/domains/guarded.example/certificate", {"certificate": "x", "key": "y"}),
    ("DELETE", "/api/v1/domains/guarded.example/certificate", None),
    ("POST", "/api/v1/reload", None),
]


@pytest.fixture(scope="module")
def guarded(admin_edge: Edge, ca: CA) -> Issued:
    """A domain with a custom certificate being served; refused requests must not touch it."""
    api = AdminClient(admin_edge, token=admin_token(admin_edge))
    api.request("POST", "/api/v1/domains", json_body={"name": "guarded.example",
                                                      "app": "my-app"})
    issued = ca.issue(["guarded.example"])
    reply = api.request("PUT", "/api/v1/domains/guarded.example/certificate", json_body={
        "certificate": issued.chain_pem.decode(), "key": issued.key_pem.decode()})
    assert reply.status == 200, reply.text
    served(admin_edge, "guarded.example", issued.fingerprint)
    return issued


def snapshot(api: AdminClient) -> list[dict[str, Any]]:
    return sorted(api.request("GET", "/api/v1/domains").json()["domains"],
                  key=lambda d: d["name"])


@pytest.mark.parametrize(("method", "path", "payload"), STATE_CHANGES,
                         ids=[f"{m} {p}" for m, p, _ in STATE_CHANGES])
def test_missing_or_wrong_token_is_401_and_changes_nothing(
        api: AdminClient, admin_edge: Edge, guarded: Issued, method: str, path: str,
        payload: Any) -> None:
    before = snapshot(api)
    reloads = admin_edge.log().count("reload accepted")
    # A distinct client address per case keeps these failures under the login limit.
    source = f"127.0.1.{STATE_CHANGES.index((method, path, payload)) + 1}"
    for token in ("", "wrong-token-0123456789"):
        client = AdminClient(admin_edge, token=token or None, source=source)
        reply = client.request(method, path, json_body=payload)
        assert reply.status == 401, reply.text
        assert reply.headers["WWW-Authenticate"].startswith("Bearer")
        assert "error" in reply.json()
    assert snapshot(api) == before
    assert admin_edge.log().count("reload accepted") == reloads
    assert admin_edge.fingerprint("guarded.example") == guarded.fingerprint


def test_reads_need_the_token_too(admin_edge: Edge) -> None:
    client = AdminClient(admin_edge)
    assert client.request("GET", "/api/v1/domains").status == 401
    assert client.request("GET", "/api/v1/domains/guarded.example").status == 401
    page = client.request("GET", "/domains")
    assert page.status == 303 and page.headers["Location"] == "/login"


def test_session_cookie_flags_and_logout(admin_edge: Edge) -> None:
    client = AdminClient(admin_edge)
    reply = client.login(admin_token(admin_edge))
    assert reply.status == 303 and reply.headers["Location"] == "/domains"
    (cookie,) = [c for c in reply.cookies() if c.startswith("tlsedge_session=")]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
    assert "Secure" not in cookie  # plain HTTP on loopback
    page = client.request("GET", "/domains")
    assert page.status == 200 and "Content-Security-Policy" in page.headers
    assert client.request("GET", "/api/v1/domains").status == 200  # the polling endpoint
    out = client.form("/logout", {"csrf": hidden_csrf(page.text)})
    assert out.status == 303
    assert client.request("GET", "/api/v1/domains").status == 401


def test_admin_over_tls_marks_the_session_cookie_secure(tmp_path: Path, ca: CA,
                                                        backend: Backend) -> None:
    config = edge_settings(tmp_path, ca, backend)
    cert, key = ca.issue(["localhost", "admin.node.test"]).write(tmp_path, "admin")
    config["admin"] = {"certificate": {"cert": cert, "key": key}, "token_file": "secret/tok"}
    (tmp_path / "secret").mkdir(mode=0o700)
    with Edge(tmp_path, config, admin=True) as edge:
        assert "admin API and dashboard on https://" in edge.log()
        client = AdminClient(edge, cafile=ca.write_ca(tmp_path / "ca.pem"))
        token = (tmp_path / "secret" / "tok").read_text().strip()
        reply = client.login(token)
        (cookie,) = [c for c in reply.cookies() if c.startswith("tlsedge_session=")]
        assert "; Secure" in cookie and "HttpOnly" in cookie and "SameSite=Strict" in cookie
        assert client.request("GET", "/api/v1/domains").status == 200
        with pytest.raises((OSError, http.client.HTTPException)):  # no plain HTTP on TLS
            AdminClient(edge, token=token).request("GET", "/api/v1/domains")


def test_forms_without_the_csrf_token_are_refused_and_change_nothing(
        admin_edge: Edge, api: AdminClient, guarded: Issued, ca: CA) -> None:
    client = AdminClient(admin_edge)
    client.login(admin_token(admin_edge))
    csrf = hidden_csrf(client.request("GET", "/domains").text)
    before = snapshot(api)
    for fields in ({}, {"csrf": "forged"}):
        assert client.form("/domains", {**fields, "name": "csrf.example",
                                        "app": "my-app"}).status == 403
        assert client.form("/domains/guarded.example/delete", fields).status == 403
        assert client.form("/domains/guarded.example/certificate/delete",
                           fields).status == 403
        other = ca.issue(["guarded.example"])
        body, ctype = multipart({**({"csrf": (None, b"forged", "text/plain")} if fields
                                    else {}),
                                 "certificate": ("c.pem", other.chain_pem, "text/plain"),
                                 "key": ("k.pem", other.key_pem, "text/plain")})
        assert client.request("POST", "/domains/guarded.example/certificate", body=body,
                              headers={"Content-Type": ctype}).status == 403
        # JSON API calls authenticated by the cookie need the token in a header.
        assert client.request("DELETE", "/api/v1/domains/guarded.example",
                              headers={"X-CSRF-Token": fields.get("csrf", "")}).status == 403
    assert snapshot(api) == before
    assert admin_edge.fingerprint("guarded.example") == guarded.fingerprint
    # With the token the same form works.
    added = client.form("/domains", {"csrf": csrf, "name": "csrf.example", "app": "my-app"})
    assert added.status == 303 and added.headers["Location"] == "/domains/csrf.example?done=added"


def test_dashboard_forms_apply_changes_with_the_csrf_token(admin_edge: Edge, ca: CA) -> None:
    client = AdminClient(admin_edge)
    client.login(admin_token(admin_edge))
    csrf = hidden_csrf(client.request("GET", "/domains").text)
    name = "forms.example"
    added = client.form("/domains", {"csrf": csrf, "name": name, "app": "other"})
    assert added.status == 303
    page = client.request("GET", added.headers["Location"])
    assert page.status == 200 and "Domain added." in page.text
    issued = ca.issue([name])
    body, ctype = multipart({"csrf": (None, csrf.encode(), "text/plain"),
                             "certificate": ("c.pem", issued.chain_pem, "text/plain"),
                             "key": ("k.key", issued.key_pem, "application/vnd.apple.keynote")})
    uploaded = client.request("POST", f"/domains/{name}/certificate", body=body,
                              headers={"Content-Type": ctype})
    assert uploaded.status == 303, uploaded.text
    page = client.request("GET", uploaded.headers["Location"])
    assert "it is now in use" in page.text and issued.fingerprint in page.text
    served(admin_edge, name, issued.fingerprint)
    removed = client.form(f"/domains/{name}/certificate/delete", {"csrf": csrf})
    assert removed.status == 303
    served(admin_edge, name, platform_fp(admin_edge))
    reloaded = client.form("/reload", {"csrf": csrf})
    assert reloaded.status == 303 and reloaded.headers["Location"] == "/domains?done=reloaded"
    assert client.form(f"/domains/{name}/delete", {"csrf": csrf}).status == 303
    assert client.request("GET", f"/domains/{name}").status == 404


def test_login_form_needs_its_csrf_cookie(admin_edge: Edge) -> None:
    client = AdminClient(admin_edge, source="127.0.2.1")
    reply = client.form("/login", {"csrf": "made-up", "token": admin_token(admin_edge)})
    assert reply.status == 403
    assert not [c for c in reply.cookies() if c.startswith("tlsedge_session=")]


def test_failed_logins_are_rate_limited_per_client_address(admin_edge: Edge) -> None:
    token = admin_token(admin_edge)
    attacker = AdminClient(admin_edge, source="127.0.3.1")
    for i in range(5):
        path = "/api/v1/domains"
        if i % 2:
            assert attacker.login(f"wrong-{i}").status == 401
        else:
            assert attacker.request("GET", path, token=f"wrong-{i}").status == 401
    limited = attacker.request("GET", "/api/v1/domains", token="wrong-again")
    assert limited.status == 429
    assert 0 < int(limited.headers["Retry-After"]) <= 60
    assert attacker.login("wrong-again").status == 429
    # Another address is not affected.
    assert AdminClient(admin_edge, token=token).request("GET", "/api/v1/domains").status == 200


# -- bad input ------------------------------------------------------------------------------

def test_bad_upload_changes_nothing_and_says_what_the_cli_says(
        api: AdminClient, admin_edge: Edge, guarded: Issued, ca: CA, tmp_path: Path) -> None:
    before = snapshot(api)
    good = ca.issue(["guarded.example"])
    mismatched = ca.issue(["guarded.example"])
    reply = api.request("PUT", "/api/v1/domains/guarded.example/certificate", json_body={
        "certificate": good.chain_pem.decode(), "key": mismatched.key_pem.decode()})
    assert reply.status == 400
    cert, _ = good.write(tmp_path, "good")
    _, key = mismatched.write(tmp_path, "other")
    cli = subprocess.run([sys.executable, "-m", "proxy.cli", "domains", "ssl",
                          "guarded.example", "--cert", cert, "--key", key,
                          "-c", str(admin_edge.config_path)], capture_output=True, text=True)
    assert cli.returncode == 1
    assert cli.stderr.strip() == f"tlsedge: {reply.json()['error']}"
    assert reply.json()["error"] == "private key does not match the certificate"
    other_name = ca.issue(["elsewhere.example"])
    wrong = api.request("PUT", "/api/v1/domains/guarded.example/certificate", json_body={
        "certificate": other_name.chain_pem.decode(), "key": other_name.key_pem.decode()})
    assert wrong.status == 400
    assert wrong.json()["error"].startswith("certificate does not cover guarded.example")
    time.sleep(0.5)  # a change would have reached the workers by now
    assert snapshot(api) == before
    assert admin_edge.fingerprint("guarded.example") == guarded.fingerprint


def test_wrong_file_types_are_refused(api: AdminClient, guarded: Issued) -> None:
    path = "/api/v1/domains/guarded.example/certificate"
    body, ctype = multipart({"certificate": ("cat.png", b"\x89PNG\r\n\x1a\n", "image/png"),
                             "key": ("key.pem", guarded.key_pem, "text/plain")})
    png = api.request("POST", path, body=body, headers={"Content-Type": ctype})
    assert png.status == 415
    assert png.json()["error"] == "the certificate chain file is not a PEM text file " \
        "(.pem, .crt, .key)"
    der = guarded.cert.public_bytes(serialization.Encoding.DER)
    body, ctype = multipart({"certificate": ("c.der", der, "application/octet-stream"),
                             "key": ("key.pem", guarded.key_pem, "text/plain")})
    der_reply = api.request("POST", path, body=body, headers={"Content-Type": ctype})
    assert der_reply.status == 400
    assert der_reply.json()["error"].startswith("certificate is DER-encoded; upload PEM")
    body, ctype = multipart({"certificate": ("c.pem", guarded.chain_pem, "text/plain")})
    missing = api.request("POST", path, body=body, headers={"Content-Type": ctype})
    assert missing.status == 400 and "both files" in missing.json()["error"]
    assert api.request("POST", path, body=b"x", headers={
        "Content-Type": "application/x-www-form-urlencoded"}).status == 415


def test_oversized_upload_is_refused_before_the_body_is_read(
        admin_edge: Edge, api: AdminClient, guarded: Issued) -> None:
    assert admin_edge.admin_port is not None
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", admin_edge.admin_port), timeout=5) as s:
        send_request(s, "localhost", "/api/v1/domains/guarded.example/certificate",
                     method="PUT", headers={"Authorization": f"Bearer {api.token}",
                                            "Content-Type": "application/json",
                                            "Content-Length": str(50 * 1024 * 1024)},
                     body=b"{" + b"x" * 65536)
        status, headers, body = read_response(s)
    assert status == 413, body
    assert b"limit" in body and headers["connection"] == "close"
    assert time.monotonic() - started < 3  # answered without waiting for 50 MiB
    assert admin_edge.fingerprint("guarded.example") == guarded.fingerprint


def test_html_in_stored_fields_is_escaped_on_every_page(api: AdminClient,
                                                       admin_edge: Edge) -> None:
    name = "escape.example"
    api.request("POST", "/api/v1/domains", json_body={"name": name, "app": "my-app"})
    evil = '<script>alert("x")</script><img src=x onerror=alert(1)>'
    in_store(admin_edge, lambda r: r.set_status(name, state="error", last_error=evil))
    client = AdminClient(admin_edge)
    client.login(admin_token(admin_edge))
    for path in ("/domains", f"/domains/{name}"):
        page = client.request("GET", path).text
        assert evil not in page and "<img src=x" not in page
        assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in page
    csrf = hidden_csrf(client.request("GET", "/domains").text)
    refused = client.form("/domains", {"csrf": csrf, "name": "<b>bold</b>.example",
                                       "app": "my-app"})
    assert refused.status == 400
    assert "<b>bold" not in refused.text and "&lt;b&gt;bold" in refused.text
    missing = client.request("GET", "/domains/%3Cscript%3E")
    assert missing.status == 404 and "<script>" not in missing.text
    shown = api.request("GET", f"/api/v1/domains/{name}")
    assert shown.json()["last_error"] == evil  # JSON carries the value as data
    assert shown.headers["Content-Type"] == "application/json"
    assert shown.headers["X-Content-Type-Options"] == "nosniff"


# -- never on the public listeners --------------------------------------------------------

ADMIN_PATHS = ["/", "/login", "/domains", "/domains/guarded.example", "/api/v1/domains",
               "/api/v1/reload"]


@pytest.mark.parametrize("path", ADMIN_PATHS)
def test_public_listeners_answer_404_for_admin_paths(admin_edge: Edge, api: AdminClient,
                                                     module_backend: Backend,
                                                     path: str) -> None:
    assert admin_edge.admin_port is not None
    auth = {"Authorization": f"Bearer {api.token}"}
    for host in ("localhost", "127.0.0.1", f"127.0.0.1:{admin_edge.admin_port}",
                 "admin.example"):
        for method in ("GET", "POST"):
            status, _, body = admin_edge.request(host, path, method=method, headers=auth,
                                                 body=b"" if method == "POST" else None,
                                                 server_name=None)
            assert status == 404, (host, path, body)
            assert b"tlsedge admin" not in body and b"domains" not in body
    # Plain HTTP serves apps only: no app has these hosts (404, as over HTTPS).
    with socket.create_connection(("127.0.0.1", admin_edge.http_port), timeout=5) as s:
        send_request(s, "localhost", path)
        status, _, body = read_response(s)
    assert status == 404 and b"tlsedge admin" not in body and b"domains" not in body
    # On an app's host the path belongs to the app: the backend answers, not the admin.
    seen = len(module_backend.seen)
    status, _, body = admin_edge.request(f"my-app.{PLATFORM}", path)
    assert status == 200 and b"admin-b" in body
    assert module_backend.seen[seen:][-1].path == path
