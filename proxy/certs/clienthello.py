"""The server name a TLS ClientHello asks for, read from the raw bytes before the
handshake starts (RFC 8446 4.1.2, RFC 6066 3).

The listener needs the name before OpenSSL does: a store certificate whose PEM is
not in memory yet must be fetched (I/O, so never in the SNI callback) before the
handshake can pick it. Pure bytes in, answer out; ~2 us for a browser's ClientHello.

Only as strict as this job needs: anything that is not a well-formed ClientHello is
answered NOT_HELLO and handed to OpenSSL unchanged, which refuses it properly.
"""

from __future__ import annotations

import enum
from typing import Final, Literal

__all__ = ["MORE", "NOT_HELLO", "Unread", "server_name"]


class Unread(enum.Enum):
    """Why `server_name` has no answer yet. Enum members, not strings: a ClientHello
    may name any host, `more` and `not-hello` included, and must not be mistaken for
    one of these."""

    MORE = "need more bytes"
    NOT_HELLO = "not a ClientHello we can read"


MORE: Final = Unread.MORE  # not enough bytes yet
NOT_HELLO: Final = Unread.NOT_HELLO  # not a ClientHello we can read: let OpenSSL answer

_HANDSHAKE = 22
_CLIENT_HELLO = 1
_SERVER_NAME = 0
_HOST_NAME = 0
# A ClientHello may span several records; real ones are under 2 kB (post-quantum key
# shares ~1.8 kB). Past this we stop buffering and let OpenSSL have it.
MAX_HELLO = 16384


def server_name(data: bytes | bytearray) -> str | Unread | None:
    """The SNI host name (lower-case ASCII), None when the hello carries none, MORE
    when `data` ends before the ClientHello does, or NOT_HELLO (compare with `is`)."""
    hello = _handshake_message(data)
    if hello is None:
        return MORE
    if not hello:
        return NOT_HELLO
    try:
        return _sni(hello)
    except IndexError:
        return NOT_HELLO


def _handshake_message(data: bytes | bytearray) -> bytes | None:
    """The ClientHello body reassembled from handshake records; None for more, b"" for
    not a ClientHello."""
    body = bytearray()
    at = 0
    while True:
        if len(data) - at < 5:
            return None
        if data[at] != _HANDSHAKE or data[at + 1] != 3:
            return b""
        length = (data[at + 3] << 8) | data[at + 4]
        if length == 0 or length > 16384:  # RFC 8446 5.1: at most 2^14 bytes
            return b""
        if len(data) - at - 5 < length:
            return None
        body += data[at + 5:at + 5 + length]
        at += 5 + length
        if len(body) >= 4:
            if body[0] != _CLIENT_HELLO:
                return b""
            need = (body[1] << 16) | (body[2] << 8) | body[3]
            if need > MAX_HELLO:
                return b""
            if len(body) - 4 >= need:
                return bytes(body[4:4 + need])
        if at >= MAX_HELLO + 5 * 8:
            return b""


def _sni(hello: bytes) -> str | Literal[Unread.NOT_HELLO] | None:
    at = 2 + 32  # legacy_version, random
    at += 1 + hello[at]  # legacy_session_id
    at += 2 + ((hello[at] << 8) | hello[at + 1])  # cipher_suites
    at += 1 + hello[at]  # legacy_compression_methods
    if at == len(hello):
        return None  # no extensions at all
    end = at + 2 + ((hello[at] << 8) | hello[at + 1])
    if end > len(hello):
        return NOT_HELLO
    at += 2
    while at + 4 <= end:
        kind = (hello[at] << 8) | hello[at + 1]
        size = (hello[at + 2] << 8) | hello[at + 3]
        at += 4
        if at + size > end:
            return NOT_HELLO
        if kind == _SERVER_NAME:
            return _host_name(hello[at:at + size])
        at += size
    return None


def _host_name(ext: bytes) -> str | Literal[Unread.NOT_HELLO] | None:
    listed = (ext[0] << 8) | ext[1]
    at, end = 2, min(2 + listed, len(ext))
    while at + 3 <= end:
        kind, size = ext[at], (ext[at + 1] << 8) | ext[at + 2]
        at += 3
        if kind == _HOST_NAME:
            raw = ext[at:at + size]
            if len(raw) != size or not raw or not raw.isascii():
                return NOT_HELLO  # OpenSSL (and CPython) refuse such a name themselves
            return raw.decode("ascii").lower()
        at += size
    return None
