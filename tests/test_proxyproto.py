"""The PROXY protocol parser and encoder (proxy/dataplane/proxyproto.py), table-driven:
every well-formed header of both versions, every strict prefix of one (wait for more),
and every malformed header refused with its metric label."""

from __future__ import annotations

import struct

import pytest

from proxy.dataplane.proxyproto import (
    MORE,
    V2_SIGNATURE,
    BadHeader,
    Header,
    encode_v2,
    parse,
)

TLS_HELLO = bytes.fromhex("160301020001000200")  # the first bytes of a ClientHello


def v2(command: int, family: int, block: bytes, *, version: int = 2,
       length: int | None = None, signature: bytes = V2_SIGNATURE) -> bytes:
    size = len(block) if length is None else length
    return signature + struct.pack("!BBH", version << 4 | command, family, size) + block


def inet(src: str, dst: str, sport: int, dport: int) -> bytes:
    return (bytes(int(p) for p in src.split(".")) + bytes(int(p) for p in dst.split("."))
            + struct.pack("!HH", sport, dport))


def inet6(src: str, dst: str, sport: int, dport: int) -> bytes:
    import ipaddress
    return (ipaddress.IPv6Address(src).packed + ipaddress.IPv6Address(dst).packed
            + struct.pack("!HH", sport, dport))


def tlv(kind: int, value: bytes) -> bytes:
    return struct.pack("!BH", kind, len(value)) + value


V4 = inet("203.0.113.7", "192.0.2.1", 51234, 443)
V6 = inet6("2001:db8::7", "2001:db8::1", 51234, 443)
AWS_TLV = tlv(0xEA, b"\x01vpce-0123456789abcdef0")  # AWS: the VPC endpoint id
UNIX_BLOCK = b"/run/client.sock".ljust(108, b"\0") + b"/run/edge.sock".ljust(108, b"\0")

# (case, header bytes, client source or None for "the peer", LOCAL)
VALID: list[tuple[str, bytes, tuple[str, int] | None, bool]] = [
    ("v1 TCP4", b"PROXY TCP4 203.0.113.7 192.0.2.1 51234 443\r\n",
     ("203.0.113.7", 51234), False),
    ("v1 TCP6", b"PROXY TCP6 2001:db8::7 2001:db8::1 51234 443\r\n",
     ("2001:db8::7", 51234), False),
    ("v1 TCP6, upper case, normalised", b"PROXY TCP6 2001:DB8:0::7 2001:db8::1 1 443\r\n",
     ("2001:db8::7", 1), False),
    ("v1 TCP6 IPv4-mapped is the IPv4 client",
     b"PROXY TCP6 ::ffff:203.0.113.7 ::ffff:192.0.2.1 51234 443\r\n",
     ("203.0.113.7", 51234), False),
    ("v1 ports 0 and 65535", b"PROXY TCP4 203.0.113.7 192.0.2.1 0 65535\r\n",
     ("203.0.113.7", 0), False),
    ("v1 UNKNOWN", b"PROXY UNKNOWN\r\n", None, False),
    ("v1 UNKNOWN with addresses", b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n", None, False),
    ("v1 of exactly 107 bytes", b"PROXY UNKNOWN " + b"x" * 91 + b"\r\n", None, False),
    ("v2 TCP4", v2(1, 0x11, V4), ("203.0.113.7", 51234), False),
    ("v2 TCP6", v2(1, 0x21, V6), ("2001:db8::7", 51234), False),
    ("v2 UDP4 (the client address still)", v2(1, 0x12, V4), ("203.0.113.7", 51234), False),
    ("v2 TCP6 IPv4-mapped", v2(1, 0x21, inet6("::ffff:203.0.113.7", "::1", 5, 443)),
     ("203.0.113.7", 5), False),
    ("v2 TCP4 with TLVs", v2(1, 0x11, V4 + AWS_TLV + tlv(0x01, b"h2") + tlv(0x04, b"")),
     ("203.0.113.7", 51234), False),
    ("v2 TCP6 with TLVs", v2(1, 0x21, V6 + AWS_TLV), ("2001:db8::7", 51234), False),
    ("v2 LOCAL (health check)", v2(0, 0x00, b""), None, True),
    ("v2 LOCAL with an address block", v2(0, 0x11, V4), None, True),
    ("v2 LOCAL with TLVs", v2(0, 0x00, AWS_TLV), None, True),
    ("v2 UNSPEC", v2(1, 0x00, b""), None, False),
    ("v2 UNSPEC with TLVs", v2(1, 0x00, AWS_TLV), None, False),
    ("v2 AF_UNIX", v2(1, 0x31, UNIX_BLOCK), None, False),
    ("v2 at the length bound", v2(1, 0x11, V4 + tlv(0xE0, b"x" * (4096 - 12 - 3))),
     ("203.0.113.7", 51234), False),
]

# (case, bytes, metric label)
MALFORMED: list[tuple[str, bytes, str]] = [
    ("TLS ClientHello first", TLS_HELLO, "missing"),
    ("HTTP request first", b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", "missing"),
    ("garbage", b"\x00\x01\x02garbage", "missing"),
    ("HTTP POST (starts like PROXY)", b"POST / HTTP/1.1\r\n", "missing"),
    ("lower-case proxy", b"proxy TCP4 203.0.113.7 192.0.2.1 1 2\r\n", "missing"),
    ("v2 bad signature", v2(1, 0x11, V4, signature=V2_SIGNATURE[:-1] + b"X"), "missing"),
    ("v2 bad signature, short", b"\r\n\r\n\x00\r\nQUIX", "missing"),
    ("v2 bad signature, first bytes", b"\r\r", "missing"),
    ("v2 version 1", v2(1, 0x11, V4, version=1), "invalid"),
    ("v2 version 3", v2(1, 0x11, V4, version=3), "invalid"),
    ("v2 unknown command", v2(2, 0x11, V4), "invalid"),
    ("v2 unknown family", v2(1, 0x41, V4), "invalid"),
    ("v2 unknown transport", v2(1, 0x13, V4), "invalid"),
    ("v2 length over the bound", v2(1, 0x11, V4, length=4097), "invalid"),
    ("v2 length 65535", v2(1, 0x11, V4, length=65535), "invalid"),
    ("v2 length shorter than TCP4 addresses", v2(1, 0x11, V4[:8]), "invalid"),
    ("v2 length shorter than TCP6 addresses", v2(1, 0x21, V6[:20]), "invalid"),
    ("v2 length shorter than AF_UNIX addresses", v2(1, 0x31, UNIX_BLOCK[:100]), "invalid"),
    ("v2 TCP4 length 0", v2(1, 0x11, b""), "invalid"),
    ("v2 TLV cut short", v2(1, 0x11, V4 + b"\xea\x00"), "invalid"),
    ("v2 TLV longer than the header", v2(1, 0x11, V4 + struct.pack("!BH", 0xEA, 50) + b"x"),
     "invalid"),
    ("v2 TLV one byte past the header", v2(1, 0x21, V6 + tlv(1, b"h2")[:-1]), "invalid"),
    ("v1 line over 107 bytes", b"PROXY UNKNOWN " + b"x" * 92 + b"\r\n", "invalid"),
    ("v1 107 bytes and no CRLF", b"PROXY TCP4 " + b"1" * 96, "invalid"),
    ("v1 bare LF", b"PROXY TCP4 203.0.113.7 192.0.2.1 1 2\n", "invalid"),
    ("v1 bare CR", b"PROXY TCP4 203.0.113.7 192.0.2.1 1 2\rX", "invalid"),
    ("v1 unknown protocol", b"PROXY TCP5 203.0.113.7 192.0.2.1 1 2\r\n", "invalid"),
    ("v1 UDP4", b"PROXY UDP4 203.0.113.7 192.0.2.1 1 2\r\n", "invalid"),
    ("v1 no fields", b"PROXY \r\n", "invalid"),
    ("v1 too few fields", b"PROXY TCP4 203.0.113.7 192.0.2.1 1\r\n", "invalid"),
    ("v1 too many fields", b"PROXY TCP4 203.0.113.7 192.0.2.1 1 2 3\r\n", "invalid"),
    ("v1 two spaces", b"PROXY TCP4  203.0.113.7 192.0.2.1 1 2\r\n", "invalid"),
    ("v1 trailing space", b"PROXY TCP4 203.0.113.7 192.0.2.1 1 2 \r\n", "invalid"),
    ("v1 TCP4 with IPv6", b"PROXY TCP4 2001:db8::7 2001:db8::1 1 2\r\n", "invalid"),
    ("v1 TCP6 with IPv4", b"PROXY TCP6 203.0.113.7 192.0.2.1 1 2\r\n", "invalid"),
    ("v1 IPv4 leading zero", b"PROXY TCP4 203.0.113.07 192.0.2.1 1 2\r\n", "invalid"),
    ("v1 IPv4 out of range", b"PROXY TCP4 203.0.113.256 192.0.2.1 1 2\r\n", "invalid"),
    ("v1 bad destination", b"PROXY TCP4 203.0.113.7 192.0.2 1 2\r\n", "invalid"),
    ("v1 host name", b"PROXY TCP4 client.example 192.0.2.1 1 2\r\n", "invalid"),
    ("v1 IPv6 scope id", b"PROXY TCP6 fe80::1%eth0 fe80::2 1 2\r\n", "invalid"),
    ("v1 port 65536", b"PROXY TCP4 203.0.113.7 192.0.2.1 65536 2\r\n", "invalid"),
    ("v1 port leading zero", b"PROXY TCP4 203.0.113.7 192.0.2.1 0443 2\r\n", "invalid"),
    ("v1 negative port", b"PROXY TCP4 203.0.113.7 192.0.2.1 -1 2\r\n", "invalid"),
    ("v1 hex port", b"PROXY TCP4 203.0.113.7 192.0.2.1 0x1 2\r\n", "invalid"),
    ("v1 bad destination port", b"PROXY TCP4 203.0.113.7 192.0.2.1 1 99999\r\n", "invalid"),
    ("v1 empty port", b"PROXY TCP4 203.0.113.7 192.0.2.1  2\r\n", "invalid"),
    ("v1 non-ASCII", b"PROXY TCP4 203.0.113.7 192.0.2.\xd9\xa1 1 2\r\n", "invalid"),
    ("v1 NUL inside", b"PROXY TCP4 203.0.113.7\x00192.0.2.1 1 2\r\n", "invalid"),
]


@pytest.mark.parametrize(("case", "data", "source", "local"), VALID,
                         ids=[c[0] for c in VALID])
def test_well_formed_header_gives_its_client_address_and_length(
        case: str, data: bytes, source: tuple[str, int] | None, local: bool) -> None:
    after = TLS_HELLO  # what follows on the connection is not the header's
    header = parse(data + after)
    assert isinstance(header, Header), case
    assert (header.length, header.source, header.local) == (len(data), source, local)
    assert (header.destination is None) == (source is None)
    assert parse(bytearray(data)).length == len(data)  # type: ignore[union-attr]


@pytest.mark.parametrize(("case", "data"), [(c[0], c[1]) for c in VALID],
                         ids=[c[0] for c in VALID])
def test_every_strict_prefix_of_a_header_waits_for_more(case: str, data: bytes) -> None:
    for end in range(len(data)):
        assert parse(data[:end]) is MORE, (case, end)


@pytest.mark.parametrize(("case", "data", "result"), MALFORMED,
                         ids=[c[0] for c in MALFORMED])
def test_malformed_header_is_refused_with_its_label(case: str, data: bytes,
                                                    result: str) -> None:
    with pytest.raises(BadHeader) as info:
        parse(data)
    assert info.value.result == result, (case, str(info.value))
    assert str(info.value)  # a reason for the debug log


@pytest.mark.parametrize(("case", "data", "result"), MALFORMED,
                         ids=[c[0] for c in MALFORMED])
def test_malformed_header_is_refused_however_it_is_split(case: str, data: bytes,
                                                         result: str) -> None:
    """Fed as it arrives: no prefix is accepted as a header, and once refused, the
    longer data is refused too (a reader never waits forever on a bad start)."""
    refused_at = None
    for end in range(1, len(data) + 1):
        try:
            got = parse(data[:end])
        except BadHeader:
            refused_at = end
            break
        assert got is MORE, (case, end)
    assert refused_at is not None, case
    for end in range(refused_at, len(data) + 1):
        with pytest.raises(BadHeader):
            parse(data[:end])


@pytest.mark.parametrize(("source", "destination", "family"), [
    (("203.0.113.7", 51234), ("192.0.2.1", 443), 0x11),
    (("2001:db8::7", 51234), ("2001:db8::1", 443), 0x21),
    (("203.0.113.7", 51234), ("2001:db8::1", 443), 0x21),  # mixed: sent as IPv6
    (("2001:db8::7", 1), ("192.0.2.1", 65535), 0x21),
])
def test_encoded_v2_header_parses_back_to_its_source(
        source: tuple[str, int], destination: tuple[str, int], family: int) -> None:
    data = encode_v2(source, destination)
    assert data.startswith(V2_SIGNATURE) and data[12] == 0x21 and data[13] == family
    header = parse(data)
    assert isinstance(header, Header)
    assert header.length == len(data) and not header.local
    assert header.source == source
    assert header.destination == destination


@pytest.mark.parametrize(("data", "destination"), [
    (b"PROXY TCP4 203.0.113.7 192.0.2.1 51234 443\r\n", ("192.0.2.1", 443)),
    (b"PROXY TCP6 2001:db8::7 2001:db8::1 51234 8443\r\n", ("2001:db8::1", 8443)),
    (v2(1, 0x11, V4 + AWS_TLV), ("192.0.2.1", 443)),
    (v2(1, 0x21, V6), ("2001:db8::1", 443)),
])
def test_header_says_what_the_client_connected_to(data: bytes,
                                                  destination: tuple[str, int]) -> None:
    header = parse(data)
    assert isinstance(header, Header) and header.destination == destination
