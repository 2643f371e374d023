"""Request bodies of the admin listener: url-encoded forms, multipart/form-data uploads
and JSON, decoded into plain fields.

Works on a body already bounded by wire.MAX_BODY; never touches the registry.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

import msgspec

from proxy.admin.wire import HttpError, Request

MAX_PARTS = 16
_PARAM = re.compile(r';\s*([A-Za-z0-9_-]+)=(?:"([^"]*)"|([^;\s]*))')


@dataclass(frozen=True, slots=True)
class Part:
    name: str
    filename: str | None
    content_type: str
    data: bytes


def _params(value: str) -> dict[str, str]:
    return {m.group(1).lower(): m.group(2) if m.group(2) is not None else m.group(3)
            for m in _PARAM.finditer(value)}


def form_fields(request: Request) -> dict[str, str]:
    """application/x-www-form-urlencoded -> {name: value} (the last value wins)."""
    if request.content_type != "application/x-www-form-urlencoded":
        raise HttpError(415, "expected a form (application/x-www-form-urlencoded)")
    try:
        text = request.body.decode("utf-8")
    except UnicodeDecodeError:
        raise HttpError(400, "form is not UTF-8") from None
    return dict(parse_qsl(text, keep_blank_values=True, max_num_fields=MAX_PARTS))


def multipart(request: Request) -> dict[str, Part]:
    """multipart/form-data -> {field name: Part}; the first part of a name wins."""
    if request.content_type != "multipart/form-data":
        raise HttpError(415, "expected multipart/form-data")
    boundary = _params(request.header("content-type")).get("boundary", "")
    if not 0 < len(boundary) <= 70:
        raise HttpError(400, "multipart body without a valid boundary")
    delimiter = b"--" + boundary.encode("latin-1")
    body = request.body
    end = body.find(delimiter + b"--")
    if end < 0:
        raise HttpError(400, "multipart body is not terminated")
    chunks = body[:end].split(delimiter)[1:]  # what precedes the first delimiter is preamble
    if len(chunks) > MAX_PARTS:
        raise HttpError(400, "too many parts in the upload")
    parts: dict[str, Part] = {}
    for chunk in chunks:
        part = _part(chunk)
        parts.setdefault(part.name, part)
    return parts


def _part(chunk: bytes) -> Part:
    if not chunk.startswith(b"\r\n") or not chunk.endswith(b"\r\n"):
        raise HttpError(400, "malformed multipart body")
    head, sep, data = chunk[2:-2].partition(b"\r\n\r\n")
    if not sep:
        raise HttpError(400, "malformed multipart part")
    headers: dict[str, str] = {}
    for line in head.decode("utf-8", "replace").split("\r\n"):
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    disposition = headers.get("content-disposition", "")
    if not disposition.lower().startswith("form-data"):
        raise HttpError(400, "multipart part is not form-data")
    params = _params(disposition)
    if "name" not in params:
        raise HttpError(400, "multipart part has no field name")
    return Part(name=params["name"], filename=params.get("filename"),
                content_type=headers.get("content-type", "text/plain").lower(), data=data)


def json_body(request: Request, kind: type[Any]) -> Any:
    if request.content_type != "application/json":
        raise HttpError(415, "expected application/json")
    try:
        return msgspec.json.decode(request.body, type=kind)
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


def uploaded_pair(request: Request) -> tuple[bytes, bytes]:
    """The (chain, key) PEM bytes of an upload, given as multipart files or as JSON."""
    if request.content_type == "application/json":
        body: Upload = json_body(request, Upload)
        return body.certificate.encode(), body.key.encode()
    return pem_pair(multipart(request))


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
