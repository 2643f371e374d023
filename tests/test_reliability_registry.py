"""Upload and admin rules (issue #10) on the real `tlsedge run`, its admin API and
dashboard, and the real CLI: `tlsedge csr` on long names, uploads whose chain reaches
no trusted root (accepted, with a warning), certificates without subjectAltName
(refused, uploads and config files alike), the login limit that never locks the right
token out, and custom domains that must be registrable (Public Suffix List).
"""

from __future__ import annotations

import json
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from proxy import names
from tests.certgen import CA, Issued
from tests.support.admin import AdminClient, admin_token, edge_settings, hidden_csrf, multipart
from tests.support.backend import Backend
from tests.support.edge import Edge

pytestmark = pytest.mark.timeout(240)

ROOT = Path(__file__).resolve().parent.parent
NO_SAN = "the certificate has no subjectAltName; browsers ignore the CN"
INCOMPLETE = "incomplete chain: browsers will not trust it"


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "proxy.cli", *args], capture_output=True,
                          text=True, timeout=120, cwd=ROOT)


def served(edge: Edge, name: str, fingerprint: str, timeout: float = 20.0) -> None:
    """Wait until `name` is served with `fingerprint` (workers follow the store)."""
    deadline = time.monotonic() + timeout
    while (got := edge.fingerprint(name)) != fingerprint:
        assert time.monotonic() < deadline, f"{name} still served with {got[:16]}"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def trusting_edge(tmp_path_factory: pytest.TempPathFactory, ca: CA) -> Iterator[Edge]:
    """An edge with the admin listener whose uploads are checked against the system
    store plus the test CA (tls.trusted_ca_file)."""
    workdir = tmp_path_factory.mktemp("registry")
    with Backend("registry-b") as backend:
        settings = edge_settings(workdir, ca, backend)
        settings["tls"]["trusted_ca_file"] = ca.write_ca(workdir / "test-ca.pem")
        with Edge(workdir, settings, admin=True) as edge:
            yield edge


@pytest.fixture
def api(trusting_edge: Edge) -> AdminClient:
    return AdminClient(trusting_edge, token=admin_token(trusting_edge))


def add(api: AdminClient, name: str, **extra: Any) -> dict[str, Any]:
    reply = api.request("POST", "/api/v1/domains",
                        json_body={"name": name, "app": "my-app", **extra})
    assert reply.status == 201, reply.text
    body: dict[str, Any] = reply.json()
    return body


def upload(api: AdminClient, name: str, chain: bytes, key: bytes) -> Any:
    return api.request("PUT", f"/api/v1/domains/{name}/certificate",
                       json_body={"certificate": chain.decode(), "key": key.decode()})


def write_pair(directory: Path, stem: str, chain: bytes, key: bytes) -> tuple[str, str]:
    cert_path, key_path = directory / f"{stem}.crt", directory / f"{stem}.key"
    cert_path.write_bytes(chain)
    key_path.write_bytes(key)
    key_path.chmod(0o600)
    return str(cert_path), str(key_path)


def stored_names(edge: Edge) -> set[str]:
    listing = cli("domains", "list", "--json", "-c", str(edge.config_path))
    assert listing.returncode == 0, listing.stderr
    return {d["name"] for d in json.loads(listing.stdout)}


# -- 8: `tlsedge csr` on a long name ----------------------------------------------------

@pytest.mark.parametrize("key_type", ["ecdsa", "rsa"])
def test_csr_for_a_70_character_name_writes_a_0600_key_and_a_valid_csr(
        tmp_path: Path, key_type: str) -> None:
    name = "x" * 53 + ".shop.example.com"
    assert len(name) == 70  # past the CN's 64-character limit
    done = cli("csr", name, "--key-type", key_type, "--out", str(tmp_path))
    assert done.returncode == 0, done.stderr
    key_path, csr_path = tmp_path / f"{name}.key", tmp_path / f"{name}.csr"
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    csr = x509.load_pem_x509_csr(csr_path.read_bytes())
    assert csr.is_signature_valid
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    assert (csr.public_key().public_bytes(serialization.Encoding.DER, spki)
            == key.public_key().public_bytes(serialization.Encoding.DER, spki))
    san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == [name]
    assert csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME) == []


def test_csr_for_a_short_name_also_carries_it_as_the_cn(tmp_path: Path) -> None:
    done = cli("csr", "www.shop.example.com", "--out", str(tmp_path))
    assert done.returncode == 0, done.stderr
    csr = x509.load_pem_x509_csr((tmp_path / "www.shop.example.com.csr").read_bytes())
    (cn,) = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    assert cn.value == "www.shop.example.com"


# -- 10b: a chain that reaches no trusted root is accepted with a warning ------------------

def test_leaf_only_upload_is_served_with_an_incomplete_chain_warning_in_api_and_cli(
        api: AdminClient, trusting_edge: Edge, ca: CA, tmp_path: Path) -> None:
    name = "leafonly.example"
    add(api, name)
    issued = ca.issue([name], intermediate=True)
    reply = upload(api, name, issued.leaf_pem, issued.key_pem)
    assert reply.status == 200, reply.text
    (warning,) = reply.json()["warnings"]
    assert warning.startswith(INCOMPLETE), warning
    served(trusting_edge, name, issued.fingerprint)
    shown = api.request("GET", f"/api/v1/domains/{name}").json()
    assert shown["warnings"] == [warning]

    again = ca.issue([name], intermediate=True)
    cert, key = write_pair(tmp_path, "leaf", again.leaf_pem, again.key_pem)
    done = cli("domains", "ssl", name, "--cert", cert, "--key", key,
               "-c", str(trusting_edge.config_path))
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip() == f"tlsedge: warning: {warning}"
    served(trusting_edge, name, again.fingerprint)
    show = cli("domains", "show", name, "-c", str(trusting_edge.config_path))
    assert f"warning:       {warning}" in show.stdout


def test_leaf_only_upload_through_the_dashboard_shows_the_warning(
        trusting_edge: Edge, ca: CA) -> None:
    api = AdminClient(trusting_edge, token=admin_token(trusting_edge))
    name = "dashleaf.example"
    add(api, name)
    client = AdminClient(trusting_edge)
    assert client.login(admin_token(trusting_edge)).status == 303
    csrf = hidden_csrf(client.request("GET", f"/domains/{name}").text)
    issued = ca.issue([name], intermediate=True)
    body, ctype = multipart({"csrf": (None, csrf.encode(), "text/plain"),
                             "certificate": ("c.pem", issued.leaf_pem, "text/plain"),
                             "key": ("k.pem", issued.key_pem, "text/plain")})
    reply = client.request("POST", f"/domains/{name}/certificate", body=body,
                           headers={"Content-Type": ctype})
    assert reply.status == 303, reply.text
    page = client.request("GET", reply.headers["Location"]).text
    assert "it is now in use" in page
    assert f"Warning: {INCOMPLETE}" in page


def test_full_chain_to_a_trusted_root_is_accepted_without_a_warning(
        api: AdminClient, trusting_edge: Edge, ca: CA, tmp_path: Path) -> None:
    name = "fullchain.example"
    add(api, name)
    issued = ca.issue([name], intermediate=True)
    reply = upload(api, name, issued.chain_pem, issued.key_pem)
    assert reply.status == 200, reply.text
    assert reply.json()["warnings"] == []
    again = ca.issue([name], intermediate=True)
    cert, key = write_pair(tmp_path, "full", again.chain_pem, again.key_pem)
    done = cli("domains", "ssl", name, "--cert", cert, "--key", key,
               "-c", str(trusting_edge.config_path))
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    client = AdminClient(trusting_edge)
    client.login(admin_token(trusting_edge))
    assert "Warning:" not in client.request("GET", f"/domains/{name}").text
    served(trusting_edge, name, again.fingerprint)


def test_full_chain_to_a_root_outside_the_trust_store_warns(api: AdminClient) -> None:
    name = "privateca.example"
    add(api, name)
    private = CA.new("private CA nobody trusts")
    issued = private.issue([name], intermediate=True)
    reply = upload(api, name, issued.chain_pem, issued.key_pem)
    assert reply.status == 200, reply.text
    (warning,) = reply.json()["warnings"]
    assert warning.startswith(INCOMPLETE) and "CN=private CA nobody trusts" in warning


# -- 12: no subjectAltName ---------------------------------------------------------------

def test_certificate_without_subject_alt_name_is_refused_by_the_api_and_the_cli(
        api: AdminClient, trusting_edge: Edge, ca: CA, tmp_path: Path) -> None:
    name = "cnonly.example"
    add(api, name)
    good = ca.issue([name], intermediate=True)
    assert upload(api, name, good.chain_pem, good.key_pem).status == 200
    served(trusting_edge, name, good.fingerprint)
    cn_only = ca.issue([name], intermediate=True, san=False)

    reply = upload(api, name, cn_only.chain_pem, cn_only.key_pem)
    assert reply.status == 400
    assert reply.json()["error"].startswith(NO_SAN)
    added = api.request("POST", "/api/v1/domains", json_body={
        "name": "cnonly2.example", "app": "my-app",
        "certificate": cn_only.chain_pem.decode(), "key": cn_only.key_pem.decode()})
    assert added.status == 400 and added.json()["error"].startswith(NO_SAN)

    cert, key = write_pair(tmp_path, "cn", cn_only.chain_pem, cn_only.key_pem)
    config = str(trusting_edge.config_path)
    done = cli("domains", "ssl", name, "--cert", cert, "--key", key, "-c", config)
    assert done.returncode == 1
    assert done.stderr.strip() == f"tlsedge: {reply.json()['error']}"
    assert cli("domains", "add", "cnonly3.example", "--app", "my-app", "--cert", cert,
               "--key", key, "-c", config).returncode == 1
    assert not {"cnonly2.example", "cnonly3.example"} & stored_names(trusting_edge)
    assert api.request("GET", f"/api/v1/domains/{name}").json()["custom"]["fingerprint"] \
        == good.fingerprint
    assert trusting_edge.fingerprint(name) == good.fingerprint


def test_config_certificate_without_subject_alt_name_is_refused_with_its_yaml_path(
        tmp_path: Path, edge_config: tuple[dict[str, Any], dict[str, Issued]],
        ca: CA) -> None:
    config, _ = edge_config
    cn_only = ca.issue(["www.shop.test"], san=False)
    cert, key = cn_only.write(tmp_path, "cn-only")
    config = {**config, "tls": {**config["tls"], "certificates": [{"cert": cert,
                                                                   "key": key}]}}
    edge = Edge(tmp_path, config, start=False)
    done = cli("check-config", "-c", str(edge.config_path))
    assert done.returncode == 1
    (line,) = done.stderr.strip().splitlines()
    assert "tls.certificates[0]" in line and NO_SAN in line, line


def test_reload_with_a_cn_only_config_certificate_keeps_the_old_state(
        edge: Edge, edge_config: tuple[dict[str, Any], dict[str, Issued]], ca: CA) -> None:
    config, issued = edge_config
    before = edge.fingerprint("www.shop.test")
    assert before == issued["shop"].fingerprint
    cn_only = ca.issue(["www.shop.test"], san=False)
    entry = config["tls"]["certificates"][0]
    Path(entry["key"]).write_bytes(cn_only.key_pem)
    Path(entry["cert"]).write_bytes(cn_only.chain_pem)
    new_log = edge.reload(wait_for="reload refused", timeout=30.0)
    (line,) = [x for x in new_log.splitlines() if "reload refused" in x]
    assert "tls.certificates[0]" in line and NO_SAN in line, line
    assert edge.fingerprint("www.shop.test") == before
    assert edge.metric("tlsedge_reloads_total", result="failed") >= 1


# -- 13: wrong tokens never lock the right one out ------------------------------------------

def test_right_admin_token_still_works_after_5_and_20_wrong_ones(trusting_edge: Edge) -> None:
    token = admin_token(trusting_edge)
    source = "127.0.6.1"
    attacker = AdminClient(trusting_edge, source=source)
    wrong = 0
    for total in (5, 20):
        while wrong < total:
            guess = f"wrong-token-{wrong:04d}-0123456789"
            status = (attacker.request("GET", "/api/v1/domains", token=guess).status
                      if wrong % 2 == 0 else attacker.login(guess).status)
            assert status == (401 if wrong < 5 else 429), (wrong, status)
            wrong += 1
        limited = attacker.request("GET", "/api/v1/domains", token="still-wrong-0123456789")
        assert limited.status == 429
        assert 0 < int(limited.headers["Retry-After"]) <= 60
        operator = AdminClient(trusting_edge, token=token, source=source)
        assert operator.request("GET", "/api/v1/domains").status == 200, total
        browser = AdminClient(trusting_edge, source=source)
        login = browser.login(token)
        assert login.status == 303 and login.headers["Location"] == "/domains", total
        assert browser.request("GET", "/domains").status == 200


# -- 14: custom domains must be registrable ---------------------------------------------

def test_registered_domain_is_the_public_suffix_plus_one_label() -> None:
    assert names.registered_domain("www.shop.co.uk") == "shop.co.uk"
    assert names.registered_domain("shop.co.uk") == "shop.co.uk"
    assert names.registered_domain("*.www.example.com") == "example.com"
    assert names.registered_domain("user.github.io") == "user.github.io"  # private section
    assert names.registered_domain("osc-fr1.scalingo.test") == "scalingo.test"  # unknown TLD
    for suffix in ("com", "localhost", "co.uk", "github.io", "test"):
        assert names.registered_domain(suffix) is None, suffix


@pytest.mark.parametrize("name", ["com", "localhost", "co.uk"])
def test_public_suffixes_and_single_labels_are_refused_as_custom_domains(
        api: AdminClient, trusting_edge: Edge, name: str) -> None:
    reply = api.request("POST", "/api/v1/domains", json_body={"name": name, "app": "my-app"})
    assert reply.status == 400
    error = reply.json()["error"]
    assert error.startswith(f"{name} cannot be a custom domain: it is a ") and "\n" not in error
    assert api.request("GET", f"/api/v1/domains/{name}").status == 404
    done = cli("domains", "add", name, "--app", "my-app", "-c", str(trusting_edge.config_path))
    assert done.returncode == 1
    assert done.stderr.strip() == f"tlsedge: {error}"
    assert name not in stored_names(trusting_edge)


def test_a_name_under_a_multi_label_public_suffix_is_accepted(
        api: AdminClient, trusting_edge: Edge) -> None:
    assert add(api, "shop.co.uk")["name"] == "shop.co.uk"
    done = cli("domains", "add", "www.shop.co.uk", "--app", "my-app",
               "-c", str(trusting_edge.config_path))
    assert done.returncode == 0, done.stderr
    assert {"shop.co.uk", "www.shop.co.uk"} <= stored_names(trusting_edge)
