"""Clients for the admin listener of a running edge: JSON API calls with the bearer token,
a dashboard login that keeps the session cookie, multipart bodies, and direct store
access (the same Registry the CLI uses) to put domains into given states.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import re
import ssl
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from tests.certgen import CA
from tests.conftest import PLATFORM
from tests.support.backend import Backend
from tests.support.edge import Edge

T = TypeVar("T")


def edge_settings(directory: Path, ca: CA, backend: Backend) -> dict[str, Any]:
    """A config with the platform certificate and two apps; domains come from the store."""
    platform = ca.issue([f"*.{PLATFORM}"])
    cert, key = platform.write(directory, "platform")
    return {
        "platform_domain": PLATFORM,
        "workers": 1,
        "tls": {"platform_certificate": {"cert": cert, "key": key}},
        "store": {"path": "store"},
        "apps": {"my-app": {"backends": [backend.address]}, "other": {
            "backends": [backend.address]}},
        "limits": {"drain_timeout": 2.0},
    }


class Reply:
    def __init__(self, status: int, headers: http.client.HTTPMessage, body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    @property
    def text(self) -> str:
        return self.body.decode()

    def json(self) -> Any:
        return json.loads(self.body)

    def cookies(self) -> list[str]:
        return self.headers.get_all("Set-Cookie") or []


class AdminClient:
    """HTTP/1.1 to the admin port over a real socket; `source` picks the client address."""

    def __init__(self, edge: Edge, *, token: str | None = None, source: str = "127.0.0.1",
                 cafile: str | None = None) -> None:
        assert edge.admin_port is not None
        self.port = edge.admin_port
        self.cafile = cafile  # set: talk TLS to an admin listener with admin.certificate
        self.token = token
        self.source = source
        self.cookies: dict[str, str] = {}

    def request(self, method: str, path: str, *, body: bytes | None = None,
                headers: dict[str, str] | None = None, token: str | None = None,
                json_body: Any = None) -> Reply:
        hdrs = dict(headers or {})
        bearer = token if token is not None else self.token
        if bearer:
            hdrs["Authorization"] = f"Bearer {bearer}"
        if json_body is not None:
            body = json.dumps(json_body).encode()
            hdrs["Content-Type"] = "application/json"
        if self.cookies:
            hdrs["Cookie"] = "; ".join(f"{k}={v}" for k, v in self.cookies.items())
        conn: http.client.HTTPConnection
        if self.cafile is not None:
            context = ssl.create_default_context(cafile=self.cafile)
            context.check_hostname = False
            conn = http.client.HTTPSConnection("127.0.0.1", self.port, timeout=10,
                                               source_address=(self.source, 0),
                                               context=context)
        else:
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10,
                                              source_address=(self.source, 0))
        try:
            conn.request(method, path, body=body, headers=hdrs)
            resp = conn.getresponse()
            reply = Reply(resp.status, resp.headers, resp.read())
        finally:
            conn.close()
        for cookie in reply.cookies():
            name, _, rest = cookie.partition("=")
            value = rest.split(";", 1)[0]
            if "Max-Age=0" in cookie:
                self.cookies.pop(name, None)
            else:
                self.cookies[name] = value
        return reply

    def login(self, token: str) -> Reply:
        """Log in through the dashboard form (with its CSRF cookie); keeps the session."""
        page = self.request("GET", "/login")
        csrf = hidden_csrf(page.text)
        return self.request("POST", "/login", body=f"csrf={csrf}&token={token}".encode(),
                            headers={"Content-Type": "application/x-www-form-urlencoded"})

    def form(self, path: str, fields: dict[str, str]) -> Reply:
        from urllib.parse import urlencode

        return self.request("POST", path, body=urlencode(fields).encode(),
                            headers={"Content-Type": "application/x-www-form-urlencoded"})


def hidden_csrf(page: str) -> str:
    m = re.search(r'name="csrf" value="([^"]*)"', page)
    assert m, page
    return m.group(1)


def multipart(fields: dict[str, tuple[str | None, bytes, str]]) -> tuple[bytes, str]:
    """{name: (filename or None, data, content type)} -> (body, Content-Type header)."""
    boundary = uuid.uuid4().hex
    out = b""
    for name, (filename, data, ctype) in fields.items():
        disposition = f'form-data; name="{name}"'
        if filename is not None:
            disposition += f'; filename="{filename}"'
        out += (f"--{boundary}\r\nContent-Disposition: {disposition}\r\n"
                f"Content-Type: {ctype}\r\n\r\n").encode() + data + b"\r\n"
    out += f"--{boundary}--\r\n".encode()
    return out, f"multipart/form-data; boundary={boundary}"


def in_store(edge: Edge, action: Callable[[Any], Awaitable[T]]) -> T:
    """Run `action(registry)` against the edge's store, as the CLI would."""
    from proxy.registry import Registry
    from proxy.store.files import FileStore

    async def run() -> T:
        store = FileStore(Path(edge.workdir) / "store")
        try:
            registry = Registry(store, platform_domain=edge.config["platform_domain"],
                                apps=edge.config["apps"].keys())
            return await action(registry)
        finally:
            await store.close()

    return asyncio.run(run())


def admin_token(edge: Edge) -> str:
    return (Path(edge.workdir) / "admin-token").read_text().strip()
