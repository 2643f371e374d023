"""Request bodies of the admin listener, read with aiohttp: url-encoded forms,
multipart/form-data uploads and JSON, decoded into plain fields.

Owns the limits on bodies: a chunked body or one whose Content-Length is over MAX_BODY
is refused before a byte of it is read or invited (`check_length`, called first for
every request, and `continue_if_acceptable`); an upload has at most MAX_PARTS parts,
each with a field name; a whole body arrives within BODY_TIMEOUT. Anything else
malformed is a 400 with one line. Nothing here touches the registry: a refused body
changes nothing.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

import msgspec
from aiohttp import BodyPartReader, web
from aiohttp.http_exceptions import HttpProcessingError

from proxy.admin.httperror import HttpError

# One certificate chain (the bundle rules cap it at 1 MiB), a key and the multipart
# framing around them.
MAX_BODY = (1 << 20) + 64 * 1024
MAX_PARTS = 16
BODY_TIMEOUT = 30.0

# What aiohttp raises on a body that is not what its headers say: bad multipart
# framing, a truncated stream, an undecodable part.
_MALFORMED = (ValueError, RuntimeError, HttpProcessingError)


@dataclass(frozen=True, slots=True)
class Part:
    name: str
    filename: str | None
    data: bytes


def check_length(request: web.BaseRequest) -> None:
    """Refuse a body by its headers alone: chunked (411) or over MAX_BODY (413)."""
    if "Transfer-Encoding" in request.headers:
        raise HttpError(411, "send the body with a Content-Length, not chunked")
    length = request.content_length or 0
    if length > MAX_BODY:
        raise HttpError(413, f"request body of {length} bytes is over the "
                        f"{MAX_BODY // 1024} KiB limit (a certificate chain may be 1 MiB)")


async def continue_if_acceptable(request: web.Request) -> None:
    """aiohttp's Expect handler: invite the body (100 Continue) only when check_length
    accepts it; else the handler's refusal is the only answer and no body is sent."""
    try:
        check_length(request)
    except HttpError:
        return
    transport = request.transport
    if request.headers.get("Expect", "").lower() == "100-continue" and transport is not None:
        transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")


async def _body(request: web.BaseRequest) -> bytes:
    try:
        async with asyncio.timeout(BODY_TIMEOUT):
            return await request.read()
    except TimeoutError:
        raise HttpError(408, "request body did not arrive in time") from None
    except web.HTTPRequestEntityTooLarge:
        raise HttpError(413, f"request body is over the {MAX_BODY // 1024} KiB limit"
                        ) from None


async def form_fields(request: web.BaseRequest) -> dict[str, str]:
    """application/x-www-form-urlencoded -> {name: value} (the last value wins)."""
    if request.content_type != "application/x-www-form-urlencoded":
        raise HttpError(415, "expected a form (application/x-www-form-urlencoded)")
    try:
        text = (await _body(request)).decode("utf-8")
    except UnicodeDecodeError:
        raise HttpError(400, "form is not UTF-8") from None
    try:
        return dict(parse_qsl(text, keep_blank_values=True, max_num_fields=MAX_PARTS))
    except ValueError:
        raise HttpError(400, f"form has more than {MAX_PARTS} fields") from None


async def multipart(request: web.BaseRequest) -> dict[str, Part]:
    """multipart/form-data -> {field name: Part}; the first part of a name wins.

    The whole body is read (and judged) before the caller changes anything.
    """
    if request.content_type != "multipart/form-data":
        raise HttpError(415, "expected multipart/form-data")
    try:
        async with asyncio.timeout(BODY_TIMEOUT):
            return await _parts(request)
    except TimeoutError:
        raise HttpError(408, "request body did not arrive in time") from None
    except web.HTTPRequestEntityTooLarge:
        raise HttpError(413, "a part of the upload is over the "
                        f"{MAX_BODY // 1024} KiB limit") from None
    except _MALFORMED:
        # Not aiohttp's words: they quote the body's bytes back.
        raise HttpError(400, "malformed multipart body: it ends early or does not follow "
                        "its boundary") from None


async def _parts(request: web.BaseRequest) -> dict[str, Part]:
    reader = await request.multipart()
    parts: dict[str, Part] = {}
    count = 0
    while (part := await reader.next()) is not None:
        count += 1
        if count > MAX_PARTS:
            raise HttpError(400, f"the upload has more than {MAX_PARTS} parts")
        if not isinstance(part, BodyPartReader):
            raise HttpError(400, "the upload has a nested multipart part")
        if not part.name:
            raise HttpError(400, "a part of the upload has no field name")
        data = bytes(await part.read())  # at most the request's client_max_size
        parts.setdefault(part.name, Part(part.name, part.filename, data))
    return parts


async def json_body(request: web.BaseRequest, kind: type[Any]) -> Any:
    if request.content_type != "application/json":
        raise HttpError(415, "expected application/json")
    data = await _body(request)
    try:
        return msgspec.json.decode(data, type=kind)
    except msgspec.ValidationError as exc:
        raise HttpError(400, f"invalid JSON body: {exc}") from None
    except msgspec.DecodeError:
        raise HttpError(400, "body is not valid JSON") from None


class AddDomain(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    name: str
    app: str
    letsencrypt: bool = True
    certificate: str | None = None
    key: str | None = None


class AddDomains(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A bulk add: each name checked on its own, the valid ones added."""

    names: tuple[str, ...]
    app: str
    letsencrypt: bool = True


class AppSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    force_https: bool


class Upload(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    certificate: str
    key: str


def _binary(data: bytes) -> bool:
    """Neither PEM text nor DER (which the bundle rules explain themselves)."""
    if data[:1] == b"\x30" and b"-----BEGIN" not in data:
        return False
    if b"\x00" in data:
        return True
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False


async def uploaded_pair(request: web.BaseRequest) -> tuple[bytes, bytes]:
    """The (chain, key) PEM bytes of an upload, given as multipart files or as JSON."""
    if request.content_type == "application/json":
        body: Upload = await json_body(request, Upload)
        return body.certificate.encode(), body.key.encode()
    return pem_pair(await multipart(request))


def pem_pair(parts: dict[str, Part]) -> tuple[bytes, bytes]:
    """The (chain, key) of the multipart fields `certificate` and `key`."""
    chain, key = parts.get("certificate"), parts.get("key")
    if chain is None or key is None or not chain.data.strip() or not key.data.strip():
        raise HttpError(400, "choose both files: the certificate chain and the private key")
    # Judged by content: browsers label PEM files in many ways (Chromium sends a .key
    # file as application/vnd.apple.keynote).
    for part, what in ((chain, "certificate chain"), (key, "private key")):
        if _binary(part.data):
            raise HttpError(415, f"the {what} file is not a PEM text file "
                            "(.pem, .crt, .key)")
    return chain.data, key.data
