"""Hostname rules: normalisation (lower-case, IDNA A-labels, no trailing dot), RFC 6125
wildcard matching, and registered domains by the Public Suffix List. Pure functions on
strings: this module never resolves a name, and `sni_key` never validates (it runs
inside handshakes). Its only read is the list's snapshot bundled with the
`publicsuffixlist` package, once, on the first `registered_domain` call.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Iterable
from typing import TYPE_CHECKING

import idna

from proxy.errors import InvalidName

if TYPE_CHECKING:
    from publicsuffixlist import PublicSuffixList

__all__ = ["NameSet", "covers", "is_ip", "normalize", "parent_wildcard",
           "registered_domain", "require_registrable", "sni_key"]

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
        else:
            _check_label(label, original)
    if labels[-1].isdigit():
        raise _invalid(original, "the last label is numeric (an IP address is not a hostname)")
    return name


def _check_label(label: str, original: str) -> None:
    """One label of `original` (not a wildcard's `*`): DNS syntax, and valid punycode."""
    if not label:
        raise _invalid(original, "it has an empty label")
    if len(label) > 63:
        raise _invalid(original, f"label {label[:20]!r}... is longer than 63 characters")
    if not _LABEL.match(label):
        if "*" in label:
            raise _invalid(original, "'*' is only allowed as the whole first label")
        raise _invalid(original, f"label {label!r} may hold only letters, digits and inner "
                       "hyphens")
    if label.startswith("xn--"):
        try:
            idna.decode(label)
        except idna.IDNAError:
            raise _invalid(original, f"label {label!r} is not valid punycode") from None


def unmapped_ip(host: str) -> str:
    """A peer address as limits, logs and trust lists know it: an IPv4 client of a
    dual-stack listener (seen as ::ffff:a.b.c.d) is its IPv4 address."""
    return host[7:] if host.startswith("::ffff:") and "." in host else host


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


class NameSet:
    """The names one certificate covers, asked many times: `covers(name)` answers as
    `any(covers(p, name) for p in patterns)` would, with at most two set lookups.
    """

    __slots__ = ("_exact", "_suffixes")

    def __eq__(self, other: object) -> bool:
        """Equal when they hold the same names (a renewed certificate's, say)."""
        return isinstance(other, NameSet) and other._exact == self._exact

    def __hash__(self) -> int:
        return hash(self._exact)

    def __init__(self, patterns: Iterable[str]) -> None:
        exact: set[str] = set()
        suffixes: set[str] = set()
        for pattern in patterns:
            pattern = pattern.lower().removesuffix(".")
            exact.add(pattern)  # a "*.x.y" pattern covers that pattern itself too
            if pattern.startswith("*.") and pattern.count(".") >= 2:
                suffixes.add(pattern[1:])  # ".x.y"; "*.tld" matches nothing
        self._exact = frozenset(exact)
        self._suffixes = frozenset(suffixes)

    def covers(self, name: str) -> bool:
        name = name.lower().removesuffix(".")
        if name in self._exact:
            return True
        dot = name.find(".")
        # The wildcard's one label: the part before the first dot, never empty or "*".
        return dot > 0 and name[dot:] in self._suffixes and name[:dot] != "*"


@functools.cache
def _suffix_list() -> PublicSuffixList:
    # Imported and parsed (~60 ms, a few MB) only by the processes that ask: the data
    # plane never does.
    from publicsuffixlist import PublicSuffixList

    # Both sections of the list: a private entry (github.io) is a public suffix to
    # browsers and to CAs' per-domain limits alike. A TLD the list does not know counts
    # as a one-label public suffix (its default rule "*"), so "shop.test" is registrable.
    return PublicSuffixList(accept_unknown=True, only_icann=False)


def registered_domain(name: str) -> str | None:
    """The registrable domain of normalised `name`: its public suffix plus one label.

    "www.shop.co.uk" -> "shop.co.uk", "*.a.example.com" -> "example.com". None when
    `name` is a public suffix itself ("com", "co.uk", "github.io") or a single label
    ("localhost"). The first call reads the bundled list (~60 ms): call it off the
    event loop, or after a call that did.
    """
    name = name.removeprefix("*.")
    if "." not in name:
        return None
    return _suffix_list().privatesuffix(name)


def require_registrable(name: str) -> str:
    """`name` (normalised) when it can be a custom domain; else InvalidName saying why.

    A custom domain is a name at or under a registrable domain: never a public suffix,
    whose subdomains belong to unrelated owners, nor a single label.
    """
    if "." not in name:
        raise InvalidName(f"{name} cannot be a custom domain: it is a single label, a "
                          "top-level domain or a local name (use a full name such as "
                          "www.example.com)")
    if name.startswith("*.") and registered_domain(name[2:]) is None:
        raise InvalidName(f"{name} cannot be a custom domain: {name[2:]} is a public "
                          "suffix (the names under it belong to different owners)")
    if registered_domain(name) is None:
        raise InvalidName(f"{name} cannot be a custom domain: it is a public suffix "
                          f"(names under it, such as example.{name}, belong to different "
                          "owners)")
    return name
