"""Multipart uploads the admin listener refuses, on a real `tlsedge run` over real
sockets: a 10 MB garbage part, a garbage part under the limit, a part without a name,
1,000 parts, a body cut short (before its closing boundary, before its Content-Length,
or stalled). Each gets a 4xx — through the JSON API and through the dashboard's form —
and changes nothing: the store's view and the certificate served stay as they were,
and the listener keeps serving.
"""

from __future__ import annotations

import os
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.certgen import CA, Issued
from tests.support.admin import (
    AdminClient,
    admin_token,
    edge_settings,
    hidden_csrf,
    multipart,
)
from tests.support.backend import Backend
from tests.support.edge import Edge, read_response

NAME = "guarded.example"
API_PATH = f"/api/v1/domains/{NAME}/certificate"
FORM_PATH = f"/domains/{NAME}/certificate"


@pytest.fixture(scope="module")
def admin_edge(tmp_path_factory: pytest.TempPathFactory, ca: CA) -> Iterator[Edge]:
    workdir = tmp_path_factory.mktemp("multipart")
    with Backend("multipart-b") as backend, \
            Edge(workdir, edge_settings(workdir, ca, backend), admin=True) as edge:
        yield edge


@pytest.fixture(scope="module")
def guarded(admin_edge: Edge, ca: CA) -> Issued:
    """A domain whose custom certificate is served: refused uploads must not touch it."""
    api = AdminClient(admin_edge, token=admin_token(admin_edge))
    added = api.request("POST", "/api/v1/domains", json_body={"name": NAME, "app": "my-app"})
    assert added.status == 201, added.text
    issued = ca.issue([NAME])
    up = api.request("PUT", API_PATH, json_body={"certificate": issued.chain_pem.decode(),
                                                 "key": issued.key_pem.decode()})
    assert up.status == 200, up.text
    deadline = time.monotonic() + 20
    while admin_edge.fingerprint(NAME) != issued.fingerprint:
        assert time.monotonic() < deadline, "the workers did not pick the upload up"
        time.sleep(0.1)
    return issued


@pytest.fixture(scope="module")
def browser(admin_edge: Edge) -> tuple[AdminClient, str]:
    """A dashboard session and its CSRF token."""
    client = AdminClient(admin_edge)
    assert client.login(admin_token(admin_edge)).status == 303
    return client, hidden_csrf(client.request("GET", f"/domains/{NAME}").text)


def view(edge: Edge) -> Any:
    return AdminClient(edge, token=admin_token(edge)).request(
        "GET", f"/api/v1/domains/{NAME}").json()


def assert_unchanged(edge: Edge, before: Any, guarded: Issued) -> None:
    """The store's view, the served certificate and the listener are as they were."""
    assert view(edge) == before
    assert edge.fingerprint(NAME) == guarded.fingerprint


def auth_headers(target: str, browser: tuple[AdminClient, str], token: str
                 ) -> dict[str, str]:
    if target == "api":
        return {"Authorization": f"Bearer {token}"}
    client, _ = browser
    return {"Cookie": "; ".join(f"{k}={v}" for k, v in client.cookies.items())}


def csrf_field(target: str, browser: tuple[AdminClient, str]
               ) -> dict[str, tuple[str | None, bytes, str]]:
    return {} if target == "api" else {"csrf": (None, browser[1].encode(), "text/plain")}


def raw_post(edge: Edge, path: str, headers: dict[str, str], body: bytes, *,
             send: int | None = None, half_close: bool = False
             ) -> tuple[int, dict[str, str], bytes]:
    """POST `body` (its first `send` bytes only, when given) on a raw socket, sending
    from a thread while the answer is read, as a client streaming an upload does."""
    assert edge.admin_port is not None
    head = "".join(f"{k}: {v}\r\n" for k, v in {
        "Host": "localhost", "Content-Length": str(len(body)), **headers}.items())
    with socket.create_connection(("127.0.0.1", edge.admin_port), timeout=60) as s:
        s.sendall(f"POST {path} HTTP/1.1\r\n{head}\r\n".encode())

        def stream() -> None:
            try:
                s.sendall(body[:send])
                if half_close:
                    s.shutdown(socket.SHUT_WR)
            except OSError:
                pass  # the server answered and closed before the whole body was sent

        sender = threading.Thread(target=stream, daemon=True)
        sender.start()
        try:
            return read_response(s)
        finally:
            sender.join(10)


TARGETS = ["api", "dashboard"]


@pytest.mark.parametrize("target", TARGETS)
def test_ten_megabyte_garbage_part_is_refused_by_its_length_and_changes_nothing(
        admin_edge: Edge, guarded: Issued, browser: tuple[AdminClient, str],
        target: str) -> None:
    before = view(admin_edge)
    body, ctype = multipart({**csrf_field(target, browser),
                             "certificate": ("big.pem", os.urandom(10 * 1024 * 1024),
                                             "application/octet-stream"),
                             "key": ("k.pem", guarded.key_pem, "text/plain")})
    path = API_PATH if target == "api" else FORM_PATH
    status, headers, answer = raw_post(
        admin_edge, path, {"Content-Type": ctype, **auth_headers(
            target, browser, admin_token(admin_edge))}, body)
    assert status == 413, answer
    assert b"limit" in answer and headers["connection"] == "close"
    assert_unchanged(admin_edge, before, guarded)


def test_oversized_upload_announced_with_expect_is_refused_without_inviting_the_body(
        admin_edge: Edge, guarded: Issued) -> None:
    """curl sends `Expect: 100-continue` before a large body: the answer must be the
    refusal itself, not an invitation to send 10 MB."""
    assert admin_edge.admin_port is not None
    with socket.create_connection(("127.0.0.1", admin_edge.admin_port), timeout=10) as s:
        s.sendall((f"PUT {API_PATH} HTTP/1.1\r\nHost: localhost\r\n"
                   f"Authorization: Bearer {admin_token(admin_edge)}\r\n"
                   f"Content-Type: multipart/form-data; boundary=x\r\n"
                   f"Content-Length: {10 * 1024 * 1024}\r\nExpect: 100-continue\r\n\r\n"
                   ).encode())
        status, _, answer = read_response(s)
    assert status == 413, answer
    assert admin_edge.fingerprint(NAME) == guarded.fingerprint


@pytest.mark.parametrize("target", TARGETS)
def test_garbage_part_under_the_limit_is_refused_as_not_pem(
        admin_edge: Edge, guarded: Issued, browser: tuple[AdminClient, str],
        target: str) -> None:
    before = view(admin_edge)
    body, ctype = multipart({**csrf_field(target, browser),
                             "certificate": ("c.pem", b"\x89PNG" + os.urandom(512 * 1024),
                                             "text/plain"),
                             "key": ("k.pem", guarded.key_pem, "text/plain")})
    path = API_PATH if target == "api" else FORM_PATH
    status, _, answer = raw_post(admin_edge, path, {"Content-Type": ctype, **auth_headers(
        target, browser, admin_token(admin_edge))}, body)
    assert status == 415, answer
    assert b"not a PEM text file" in answer
    assert_unchanged(admin_edge, before, guarded)


def nameless(target: str, browser: tuple[AdminClient, str], guarded: Issued, ca: CA
             ) -> tuple[bytes, str]:
    """A valid new pair, with one more part whose Content-Disposition has no name."""
    other = ca.issue([NAME])
    body, ctype = multipart({**csrf_field(target, browser),
                             "certificate": ("c.pem", other.chain_pem, "text/plain"),
                             "key": ("k.pem", other.key_pem, "text/plain")})
    boundary = ctype.split("boundary=")[1]
    extra = (f"--{boundary}\r\nContent-Disposition: form-data; filename=\"x.pem\"\r\n"
             f"Content-Type: text/plain\r\n\r\nhello\r\n").encode()
    return extra + body, ctype


@pytest.mark.parametrize("target", TARGETS)
def test_part_without_a_name_is_refused_and_changes_nothing(
        admin_edge: Edge, guarded: Issued, browser: tuple[AdminClient, str], ca: CA,
        target: str) -> None:
    before = view(admin_edge)
    body, ctype = nameless(target, browser, guarded, ca)
    path = API_PATH if target == "api" else FORM_PATH
    status, _, answer = raw_post(admin_edge, path, {"Content-Type": ctype, **auth_headers(
        target, browser, admin_token(admin_edge))}, body)
    assert status == 400, answer
    assert b"has no field name" in answer
    assert_unchanged(admin_edge, before, guarded)


@pytest.mark.parametrize("target", TARGETS)
def test_a_thousand_parts_are_refused_and_change_nothing(
        admin_edge: Edge, guarded: Issued, browser: tuple[AdminClient, str], ca: CA,
        target: str) -> None:
    before = view(admin_edge)
    other = ca.issue([NAME])
    fields: dict[str, tuple[str | None, bytes, str]] = {
        **csrf_field(target, browser),
        "certificate": ("c.pem", other.chain_pem, "text/plain"),
        "key": ("k.pem", other.key_pem, "text/plain")}
    fields.update({f"f{i}": (None, b"x", "text/plain") for i in range(1000 - len(fields))})
    body, ctype = multipart(fields)
    path = API_PATH if target == "api" else FORM_PATH
    status, _, answer = raw_post(admin_edge, path, {"Content-Type": ctype, **auth_headers(
        target, browser, admin_token(admin_edge))}, body)
    assert status == 400, answer
    assert b"more than 16 parts" in answer
    assert_unchanged(admin_edge, before, guarded)


@pytest.mark.parametrize("target", TARGETS)
def test_body_cut_before_its_closing_boundary_is_refused_and_changes_nothing(
        admin_edge: Edge, guarded: Issued, browser: tuple[AdminClient, str], ca: CA,
        target: str) -> None:
    before = view(admin_edge)
    other = ca.issue([NAME])
    body, ctype = multipart({**csrf_field(target, browser),
                             "certificate": ("c.pem", other.chain_pem, "text/plain"),
                             "key": ("k.pem", other.key_pem, "text/plain")})
    cut = body[:body.rindex(b"-----END")]  # inside the key, with an honest length
    path = API_PATH if target == "api" else FORM_PATH
    status, _, answer = raw_post(admin_edge, path, {"Content-Type": ctype, **auth_headers(
        target, browser, admin_token(admin_edge))}, cut)
    assert status == 400, answer
    assert b"malformed multipart body" in answer
    assert_unchanged(admin_edge, before, guarded)


def test_body_short_of_its_length_then_closed_changes_nothing(
        admin_edge: Edge, guarded: Issued, ca: CA) -> None:
    """The client stops sending half-way through a valid upload and shuts its side:
    nothing is stored, and the listener serves the next request. (The connection may
    close without an answer: the client said it is done.)"""
    before = view(admin_edge)
    other = ca.issue([NAME])
    body, ctype = multipart({"certificate": ("c.pem", other.chain_pem, "text/plain"),
                             "key": ("k.pem", other.key_pem, "text/plain")})
    try:
        status, _, answer = raw_post(
            admin_edge, API_PATH, {"Content-Type": ctype,
                                   "Authorization": f"Bearer {admin_token(admin_edge)}"},
            body, send=len(body) - 40, half_close=True)
    except ConnectionError:
        pass
    else:
        assert 400 <= status < 500, answer
    assert_unchanged(admin_edge, before, guarded)


def test_stalled_body_gets_408_and_changes_nothing(admin_edge: Edge, guarded: Issued,
                                                   ca: CA) -> None:
    """A client that stops sending half-way (and stays connected) is answered once the
    body timeout (30 s) has passed."""
    assert admin_edge.admin_port is not None
    before = view(admin_edge)
    other = ca.issue([NAME])
    body, ctype = multipart({"certificate": ("c.pem", other.chain_pem, "text/plain"),
                             "key": ("k.pem", other.key_pem, "text/plain")})
    with socket.create_connection(("127.0.0.1", admin_edge.admin_port), timeout=90) as s:
        s.sendall((f"PUT {API_PATH} HTTP/1.1\r\nHost: localhost\r\n"
                   f"Authorization: Bearer {admin_token(admin_edge)}\r\n"
                   f"Content-Type: {ctype}\r\nContent-Length: {len(body)}\r\n\r\n"
                   ).encode() + body[:len(body) // 2])
        status, headers, answer = read_response(s)
    assert status == 408, answer
    assert headers["connection"] == "close"
    assert_unchanged(admin_edge, before, guarded)


def test_valid_multipart_upload_still_works_after_the_refusals(
        admin_edge: Edge, guarded: Issued, ca: CA) -> None:
    """The same listener, after all of the above, stores a good upload (the refusals
    above are about their bodies, not a listener that refuses everything)."""
    name = f"after-{uuid.uuid4().hex[:8]}.example"
    api = AdminClient(admin_edge, token=admin_token(admin_edge))
    assert api.request("POST", "/api/v1/domains",
                       json_body={"name": name, "app": "my-app"}).status == 201
    issued = ca.issue([name])
    body, ctype = multipart({"certificate": ("c.pem", issued.chain_pem, "text/plain"),
                             "key": ("k.pem", issued.key_pem, "text/plain")})
    up = api.request("POST", f"/api/v1/domains/{name}/certificate", body=body,
                     headers={"Content-Type": ctype})
    assert up.status == 200, up.text
    assert up.json()["custom"]["fingerprint"] == issued.fingerprint


def curl_upload(edge: Edge, name: str, cert: Path, key: Path) -> tuple[int, str]:
    """`curl -F` as the README shows it: (HTTP status, curl's verbose trace)."""
    done = subprocess.run(
        ["curl", "-sS", "-v", "-o", "/dev/null", "-w", "%{http_code}", "-X", "PUT",
         "-H", f"Authorization: Bearer {admin_token(edge)}",
         "-F", f"certificate=@{cert}", "-F", f"key=@{key}",
         f"http://127.0.0.1:{edge.admin_port}/api/v1/domains/{name}/certificate"],
        capture_output=True, text=True, timeout=60)
    return int(done.stdout or 0), done.stderr


def test_curl_uploads_a_pair_and_is_refused_a_ten_megabyte_file_without_sending_it(
        admin_edge: Edge, guarded: Issued, ca: CA, tmp_path: Path) -> None:
    before = view(admin_edge)
    garbage = tmp_path / "big.pem"
    garbage.write_bytes(os.urandom(10 * 1024 * 1024))
    key = tmp_path / "key.pem"
    key.write_bytes(guarded.key_pem)
    status, trace = curl_upload(admin_edge, NAME, garbage, key)
    assert status == 413, trace
    # curl announced the body (Expect: 100-continue) and was never invited to send it.
    assert "Expect: 100-continue" in trace and "HTTP/1.1 100" not in trace
    assert_unchanged(admin_edge, before, guarded)

    name = f"curl-{uuid.uuid4().hex[:8]}.example"
    api = AdminClient(admin_edge, token=admin_token(admin_edge))
    assert api.request("POST", "/api/v1/domains",
                       json_body={"name": name, "app": "my-app"}).status == 201
    issued = ca.issue([name])
    cert, key_file = issued.write(tmp_path, "good")
    status, trace = curl_upload(admin_edge, name, Path(cert), Path(key_file))
    assert status == 200, trace
    deadline = time.monotonic() + 20
    while admin_edge.fingerprint(name) != issued.fingerprint:
        assert time.monotonic() < deadline, "the workers did not pick the upload up"
        time.sleep(0.1)
