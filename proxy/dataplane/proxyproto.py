"""The PROXY protocol (HAProxy's, versions 1 and 2): the header a load balancer puts
before a connection's first byte to say whose connection it is, read (`parse`) on a
listener with `proxy_protocol: true`, and written (`encode_v2`) to a backend of an
app with `send_proxy_protocol: v2`.

Pure bytes in, answer out; no I/O, no state. Strict: anything that is not a whole,
well-formed header is refused (`BadHeader`), never guessed at, because what follows
it is parsed as TLS or HTTP and its address is the one every per-client limit uses.
Version 1 is one text line of at most 107 bytes; version 2 a 16-byte binary header
(signature, version and command, family, length) and its address block and TLVs,
which are walked for their bounds and skipped.
"""

from __future__ import annotations

import enum
import socket
import struct
from typing import Final

from proxy.names import unmapped_ip

__all__ = ["MORE", "V2_SIGNATURE", "BadHeader", "Header", "Pending", "encode_v2", "parse"]

V1_PREFIX = b"PROXY "
V1_MAX = 107  # the longest v1 line, CRLF included (the spec's bound)
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
# Most bytes after the 16-byte v2 header we accept: the addresses (216 for AF_UNIX)
# and TLVs a balancer adds (AWS's VPC endpoint id, Azure's link id, HAProxy's SSL
# details). A larger length is refused rather than waited for.
V2_MAX_LENGTH = 4096
_V2_HEAD = struct.Struct("!12sBBH")
_ADDRESS_BYTES = {0: 0, 1: 12, 2: 36, 3: 216}  # by family: UNSPEC, INET, INET6, UNIX
_INET = struct.Struct("!4s4sHH")
_INET6 = struct.Struct("!16s16sHH")


class Pending(enum.Enum):
    """`parse` has no answer yet. An enum member, not a value a header can carry."""

    MORE = "need more bytes"


MORE: Final = Pending.MORE


class BadHeader(ValueError):
    """The bytes are not a PROXY header we accept. `result` is the metric's label:
    "missing" when they do not start with "PROXY " or the v2 signature (the balancer
    sends none: a TLS ClientHello, an HTTP request), "invalid" for a header that
    breaks the spec."""

    def __init__(self, result: str, reason: str) -> None:
        super().__init__(reason)
        self.result = result


class Header:
    """A complete header: `length` bytes of the connection are its; `source` is the
    client's (address, port) and `destination` what it connected to, or both None when
    the connection's own endpoints stand (v2 LOCAL, a health check of the balancer's
    own; v1 UNKNOWN; v2 UNSPEC or AF_UNIX)."""

    __slots__ = ("destination", "length", "local", "source")

    def __init__(self, length: int, source: tuple[str, int] | None = None,
                 destination: tuple[str, int] | None = None, *, local: bool = False) -> None:
        self.length = length
        self.source = source
        self.destination = destination
        self.local = local


def parse(data: bytes | bytearray) -> Header | Pending:
    """The header at the start of `data` (the connection's bytes so far), MORE when
    `data` is a valid start of one. Raises BadHeader."""
    if not data:
        return MORE
    first = data[0]
    if first == V2_SIGNATURE[0]:
        return _parse_v2(data)
    if first == V1_PREFIX[0]:
        return _parse_v1(data)
    raise BadHeader("missing", "the connection does not start with a PROXY header")


def _parse_v1(data: bytes | bytearray) -> Header | Pending:
    start = bytes(data[:len(V1_PREFIX)])
    if not V1_PREFIX.startswith(start):
        raise BadHeader("missing", "the connection does not start with a PROXY header")
    end = data.find(b"\r\n", 0, V1_MAX)
    if end < 0:
        if len(data) >= V1_MAX:
            raise BadHeader("invalid", f"PROXY v1 line longer than {V1_MAX} bytes")
        if b"\n" in data or b"\r" in data[:-1]:
            raise BadHeader("invalid", "PROXY v1 line with a bare CR or LF")
        return MORE
    fields = bytes(data[len(V1_PREFIX):end]).split(b" ")
    length = end + 2
    if fields[0] == b"UNKNOWN":  # the balancer does not know: anything may follow
        return Header(length)
    if len(fields) != 5 or fields[0] not in (b"TCP4", b"TCP6"):
        raise BadHeader("invalid", "PROXY v1 line is not TCP4|TCP6 SRC DST SPORT DPORT")
    proto, src, dst, sport, dport = fields
    family = socket.AF_INET if proto == b"TCP4" else socket.AF_INET6
    try:
        # inet_pton is strict (no leading zeros, no scope id) and inet_ntop gives the
        # one canonical text, in C: a v1 line parses in ~3 us (~10 with ipaddress).
        client = socket.inet_ntop(family, socket.inet_pton(family, src.decode("ascii")))
        server = socket.inet_ntop(family, socket.inet_pton(family, dst.decode("ascii")))
    except (OSError, ValueError):  # ValueError: not ASCII, or a NUL inside
        raise BadHeader("invalid", f"PROXY v1 addresses are not {proto.decode()}") from None
    return Header(length, (unmapped_ip(client), _v1_port(sport)),
                  (unmapped_ip(server), _v1_port(dport)))


def _v1_port(value: bytes) -> int:
    if not value.isdigit() or len(value) > 5 or (len(value) > 1 and value[0] == 0x30):
        raise BadHeader("invalid", "PROXY v1 port is not a number 0-65535")
    port = int(value)
    if port > 65535:
        raise BadHeader("invalid", "PROXY v1 port is not a number 0-65535")
    return port


def _parse_v2(data: bytes | bytearray) -> Header | Pending:
    if len(data) < _V2_HEAD.size:
        if not V2_SIGNATURE.startswith(bytes(data[:len(V2_SIGNATURE)])):
            raise BadHeader("missing", "bad PROXY v2 signature")
        return MORE
    signature, version_command, family, length = _V2_HEAD.unpack_from(data)
    if signature != V2_SIGNATURE:
        raise BadHeader("missing", "bad PROXY v2 signature")
    if version_command >> 4 != 2 or version_command & 0x0F > 1:
        raise BadHeader("invalid", "PROXY v2 header of an unknown version or command")
    address_family, transport = family >> 4, family & 0x0F
    if address_family not in _ADDRESS_BYTES or transport > 2:
        raise BadHeader("invalid", "PROXY v2 header of an unknown family or transport")
    if length > V2_MAX_LENGTH:
        raise BadHeader("invalid", f"PROXY v2 length {length} is over {V2_MAX_LENGTH}")
    total = _V2_HEAD.size + length
    if len(data) < total:
        return MORE
    if version_command & 0x0F == 0:  # LOCAL: the balancer's own connection
        return Header(total, local=True)
    need = _ADDRESS_BYTES[address_family]
    if length < need:
        raise BadHeader("invalid", "PROXY v2 length shorter than its addresses")
    _check_tlvs(data, _V2_HEAD.size + need, total)
    if address_family == 1:
        src, dst, sport, dport = _INET.unpack_from(data, _V2_HEAD.size)
        return Header(total, (socket.inet_ntop(socket.AF_INET, src), sport),
                      (socket.inet_ntop(socket.AF_INET, dst), dport))
    if address_family == 2:
        src, dst, sport, dport = _INET6.unpack_from(data, _V2_HEAD.size)
        return Header(total, (unmapped_ip(socket.inet_ntop(socket.AF_INET6, src)), sport),
                      (unmapped_ip(socket.inet_ntop(socket.AF_INET6, dst)), dport))
    return Header(total)  # UNSPEC or AF_UNIX: no IP address to use


def _check_tlvs(data: bytes | bytearray, pos: int, end: int) -> None:
    """Each TLV (type, 16-bit length, value) must lie within the header: skipped,
    never read past `end`."""
    while pos < end:
        if end - pos < 3:
            raise BadHeader("invalid", "PROXY v2 TLV cut short")
        pos += 3 + (data[pos + 1] << 8 | data[pos + 2])
        if pos > end:
            raise BadHeader("invalid", "PROXY v2 TLV longer than the header")


def encode_v2(source: tuple[str, int], destination: tuple[str, int]) -> bytes:
    """A PROXY v2 header (command PROXY, TCP) saying `source` connected to
    `destination`; both of one family, else (an IPv4 client on an IPv6 listener) the
    IPv4 one is sent as ::ffff:a.b.c.d."""
    if ":" not in source[0] and ":" not in destination[0]:
        block = _INET.pack(socket.inet_pton(socket.AF_INET, source[0]),
                           socket.inet_pton(socket.AF_INET, destination[0]),
                           source[1], destination[1])
        family = 0x11
    else:
        block = _INET6.pack(_v6(source[0]), _v6(destination[0]), source[1], destination[1])
        family = 0x21
    return _V2_HEAD.pack(V2_SIGNATURE, 0x21, family, len(block)) + block


def _v6(address: str) -> bytes:
    if ":" in address:
        return socket.inet_pton(socket.AF_INET6, address)
    return b"\0" * 10 + b"\xff\xff" + socket.inet_pton(socket.AF_INET, address)
