"""HTTP/1.1 on the admin listener, over asyncio streams: read one request, write one response.

Owns the limits that protect the supervisor: a bounded head, no chunked bodies, and a
Content-Length cap checked before a single body byte is read. Knows nothing about
routes, sessions or the registry. Admin traffic is tiny: clarity beats speed here.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass, field
from http import HTTPStatus
from urllib.parse import parse_qsl, urlsplit

MAX_HEAD = 16 * 1024
# One certificate chain (the bundle rules cap it at 1 MiB), a key and the multipart
# framing around them.
MAX_BODY = (1 << 20) + 64 * 1024
MAX_HEADERS = 64
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE"})

_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_TARGET = re.compile(r"/[\x21-\x7e]*")


class HttpError(Exception):
    """A request that cannot be served; answered with `status` and the connection closed."""

    def __init__(self, status: int, message: str, *,
                 headers: list[tuple[str, str]] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or []


@dataclass(slots=True)
class Request:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]  # lower-case names; a repeated header keeps its last value
    cookies: dict[str, str]
    body: bytes
    client: str
    tls: bool
    keep_alive: bool

    def header(self, name: str, default: str = "") -> str:
        return self.headers.get(name, default)

    @property
    def content_type(self) -> str:
        return self.header("content-type").split(";", 1)[0].strip().lower()


@dataclass(slots=True)
class Response:
    status: int
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"
    headers: list[tuple[str, str]] = field(default_factory=list)
    close: bool = False


def _cookies(value: str) -> dict[str, str]:
    jar: dict[str, str] = {}
    for part in value.split(";"):
        name, sep, val = part.strip().partition("=")
        if sep and _TOKEN.fullmatch(name):
            jar.setdefault(name, val.strip().strip('"'))
    return jar


def parse_head(head: bytes, *, client: str, tls: bool) -> Request:
    """The request line and headers (without the final blank line) -> Request (no body)."""
    try:
        text = head.decode("ascii")
    except UnicodeDecodeError:
        raise HttpError(400, "request head is not ASCII") from None
    line, *lines = text.split("\r\n")
    parts = line.split(" ")
    if len(parts) != 3 or parts[2] not in ("HTTP/1.1", "HTTP/1.0"):
        raise HttpError(400, "malformed request line")
    method, target, version = parts
    if method not in METHODS:
        raise HttpError(501 if _TOKEN.fullmatch(method) else 400, f"method {method[:16]} "
                        "is not supported")
    if not _TARGET.fullmatch(target):
        raise HttpError(400, "request target must be a path")
    if len(lines) > MAX_HEADERS:
        raise HttpError(431, "too many headers")
    headers: dict[str, str] = {}
    for raw in lines:
        name, sep, value = raw.partition(":")
        if not sep or not _TOKEN.fullmatch(name):
            raise HttpError(400, "malformed header line")
        name = name.lower()
        value = value.strip(" \t")
        if name == "content-length" and name in headers and headers[name] != value:
            raise HttpError(400, "conflicting Content-Length headers")
        if name == "cookie" and name in headers:
            value = f"{headers[name]}; {value}"
        headers[name] = value
    if version == "HTTP/1.1" and "host" not in headers:
        raise HttpError(400, "missing Host header")
    if "transfer-encoding" in headers:
        raise HttpError(411, "send the body with a Content-Length, not chunked")
    connection = headers.get("connection", "").lower()
    keep_alive = ("close" not in connection if version == "HTTP/1.1"
                  else "keep-alive" in connection)
    split = urlsplit(target)
    return Request(method=method, path=split.path, query=dict(parse_qsl(split.query)),
                   headers=headers, cookies=_cookies(headers.get("cookie", "")), body=b"",
                   client=client, tls=tls, keep_alive=keep_alive)


def body_length(request: Request) -> int:
    raw = request.header("content-length", "0")
    if not raw.isdigit() or len(raw) > 12:
        raise HttpError(400, "invalid Content-Length")
    length = int(raw)
    if length > MAX_BODY:
        raise HttpError(413, f"request body of {length} bytes is over the "
                        f"{MAX_BODY // 1024} KiB limit (a certificate chain may be 1 MiB)")
    return length


async def read_request(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *,
                       client: str, tls: bool, idle_timeout: float,
                       body_timeout: float) -> Request | None:
    """Read the next request on a connection; None when the client closed it cleanly.

    Raises HttpError for a request that must be refused; the size of a body is
    judged from its Content-Length before any of it is read.
    """
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), idle_timeout)
    except asyncio.IncompleteReadError as exc:
        if not exc.partial.strip():
            return None
        raise HttpError(400, "connection closed inside the request head") from None
    except asyncio.LimitOverrunError:
        raise HttpError(431, f"request head is over {MAX_HEAD // 1024} KiB") from None
    except TimeoutError:
        return None
    request = parse_head(head[:-4], client=client, tls=tls)
    length = body_length(request)
    if length and request.header("expect").lower() == "100-continue":
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    if length:
        try:
            request.body = await asyncio.wait_for(reader.readexactly(length), body_timeout)
        except asyncio.IncompleteReadError:
            raise HttpError(400, "connection closed inside the request body") from None
        except TimeoutError:
            raise HttpError(408, "request body did not arrive in time") from None
    return request


def encode_response(response: Response, *, head_only: bool, keep_alive: bool) -> bytes:
    reason = HTTPStatus(response.status).phrase
    lines = [f"HTTP/1.1 {response.status} {reason}",
             f"Content-Type: {response.content_type}",
             f"Content-Length: {len(response.body)}",
             f"Connection: {'keep-alive' if keep_alive else 'close'}"]
    lines += [f"{name}: {value}" for name, value in response.headers]
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return head if head_only else head + response.body
