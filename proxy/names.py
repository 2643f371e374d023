"""Hostname rules: normalisation (lower-case, IDNA A-labels, no trailing dot) and
RFC 6125 wildcard matching. Pure functions on strings: this module never does I/O,
never resolves a name, and `sni_key` never validates (it runs inside handshakes).
"""

from __future__ import annotations

import ipaddress
import re

import idna

from proxy.errors import InvalidName

__all__ = ["covers", "is_ip", "normalize", "parent_wildcard", "sni_key"]

_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\Z")
_MAX_NAME = 253


def _invalid(name: str, why: str) -> InvalidName:
    return InvalidName(f"{name!r} is not a valid hostname: {why}")


def _to_ascii(name: str, original: str) -> str:
    if name.isascii():
        return name.lower()
    # UTS 46 (non-transitional, as browsers do) maps case and compatibility forms
    # before IDNA 2008 turns each label into its xn-- A-label.
    labels = name.split(".")
    out: list[str] = []
    for label in labels:
        if label.isascii():
            out.append(label.lower())
            continue
        try:
            out.append(idna.encode(label, uts46=True, transitional=False).decode("ascii"))
        except idna.IDNAError as exc:
            raise _invalid(original, f"label {label!r} is not valid IDNA ({exc})") from None
    return ".".join(out)


def normalize(name: str, *, allow_wildcard: bool = False) -> str:
    """Return the canonical form of a hostname (or of a `*.x.y` pattern when allowed).

    Lower-case, one trailing dot removed, Unicode labels turned into xn-- A-labels,
    then DNS label syntax checked. Raises InvalidName with one line saying why.
    """
    original = name
    name = name.strip()
    if name.endswith("."):
        name = name[:-1]
    if not name:
        raise _invalid(original, "it is empty")
    name = _to_ascii(name, original)
    if len(name) > _MAX_NAME:
        raise _invalid(original, f"it is {len(name)} characters long (at most {_MAX_NAME})")
    labels = name.split(".")
    for index, label in enumerate(labels):
        if label == "*":
            if not allow_wildcard:
                raise _invalid(original, "wildcards are not allowed here")
            if index != 0:
                raise _invalid(original, "'*' is only allowed as the whole first label")
            if len(labels) < 3:
                raise _invalid(original, "a wildcard needs at least two labels after '*.'")
            continue
        if not label:
            raise _invalid(original, "it has an empty label")
        if len(label) > 63:
            raise _invalid(original, f"label {label[:20]!r}... is longer than 63 characters")
        if not _LABEL.match(label):
            if "*" in label:
                raise _invalid(original, "'*' is only allowed as the whole first label")
            raise _invalid(
                original,
                f"label {label!r} may hold only letters, digits and inner hyphens",
            )
        if label.startswith("xn--"):
            try:
                idna.decode(label)
            except idna.IDNAError:
                raise _invalid(original, f"label {label!r} is not valid punycode") from None
    if labels[-1].isdigit():
        raise _invalid(original, "the last label is numeric (an IP address is not a hostname)")
    return name


def is_ip(name: str) -> bool:
    """True when `name` is an IPv4 or IPv6 literal (brackets allowed for IPv6)."""
    if name.startswith("[") and name.endswith("]"):
        name = name[1:-1]
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def sni_key(server_name: str | None) -> str | None:
    """The table key for a ClientHello's server name: lower-case, no trailing dot.

    The fast path of the SNI callback: no validation. None and IP literals (which
    RFC 6066 forbids in SNI, but some clients send) come back as None: "no SNI".
    """
    if not server_name:
        return None
    key = server_name.lower()
    if key[-1] == ".":
        key = key[:-1]
    # Only a name ending in a digit or holding ':' can be an IP literal; the parse
    # is skipped for every real hostname.
    if (key[-1:].isdigit() or ":" in key) and is_ip(key):
        return None
    return key or None


def parent_wildcard(name: str) -> str | None:
    """The one-label wildcard pattern that would cover `name`.

    "a.b.example.com" -> "*.b.example.com". None when no valid pattern exists: a
    single-label name, or a two-label one ("example.com" would need "*.com", which
    never matches anything).
    """
    dot = name.find(".")
    if dot <= 0 or name.find(".", dot + 1) < 0:
        return None
    return "*" + name[dot:]


def covers(pattern: str, name: str) -> bool:
    """RFC 6125 matching of a certificate name (`pattern`) against a hostname.

    Exact match, or `*.x.y` matching exactly one left-most label: never the apex
    `x.y`, never two labels, and a one-label suffix such as `*.com` matches nothing.
    Both arguments are compared case-insensitively, ignoring one trailing dot.
    """
    pattern = pattern.lower().removesuffix(".")
    name = name.lower().removesuffix(".")
    if pattern == name:
        return True  # includes "*.x.y" covering the pattern itself (a wildcard domain)
    if not pattern.startswith("*."):
        return False
    suffix = pattern[1:]  # ".x.y"
    if suffix.count(".") < 2 or not name.endswith(suffix):
        return False
    label = name[: -len(suffix)]
    return bool(label) and "." not in label and label != "*"
