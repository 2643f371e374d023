"""Hostname normalisation and RFC 6125 wildcard matching."""

from __future__ import annotations

import pytest

from proxy.errors import InvalidName
from proxy.names import covers, is_ip, normalize, parent_wildcard, sni_key


@pytest.mark.parametrize(("raw", "expected"), [
    ("Example.COM", "example.com"),
    ("www.example.com.", "www.example.com"),
    ("  api.example.com ", "api.example.com"),
    ("bücher.example", "xn--bcher-kva.example"),
    ("BÜCHER.Example", "xn--bcher-kva.example"),
    ("xn--bcher-kva.example", "xn--bcher-kva.example"),
    ("a-b.c0.example", "a-b.c0.example"),
])
def test_normalize_gives_lowercase_a_labels_without_trailing_dot(raw: str, expected: str) -> None:
    assert normalize(raw) == expected


@pytest.mark.parametrize(("raw", "why"), [
    ("exa mple.com", "letters, digits"),
    ("", "empty"),
    ("a..example.com", "empty label"),
    ("-a.example.com", "inner hyphens"),
    ("a-.example.com", "inner hyphens"),
    ("under_score.example.com", "letters, digits"),
    ("a" * 64 + ".com", "longer than 63"),
    (".".join(["abcdefghi"] * 26), "at most 253"),
    ("*.example.com", "wildcards are not allowed"),
    ("1.2.3.4", "numeric"),
    ("xn--zz.example", "punycode"),
])
def test_normalize_rejects_with_one_line_naming_the_input(raw: str, why: str) -> None:
    with pytest.raises(InvalidName) as info:
        normalize(raw)
    message = str(info.value)
    assert message.startswith(f"{raw!r} is not a valid hostname: ")
    assert why in message
    assert "\n" not in message


def test_normalize_allows_a_wildcard_only_as_whole_first_label() -> None:
    assert normalize("*.Example.com", allow_wildcard=True) == "*.example.com"
    for bad in ("a.*.example.com", "w*.example.com", "*.com", "*"):
        with pytest.raises(InvalidName):
            normalize(bad, allow_wildcard=True)


@pytest.mark.parametrize(("raw", "key"), [
    (None, None),
    ("", None),
    ("WWW.Example.COM.", "www.example.com"),
    ("127.0.0.1", None),
    ("::1", None),
    ("host-9.example.com", "host-9.example.com"),
    ("example.c0m1", "example.c0m1"),  # ends in a digit but is no IP: kept
])
def test_sni_key_lowercases_strips_dot_and_treats_ip_literals_as_no_sni(
        raw: str | None, key: str | None) -> None:
    assert sni_key(raw) == key


def test_is_ip() -> None:
    assert is_ip("10.0.0.1") and is_ip("2001:db8::1") and is_ip("[::1]")
    assert not is_ip("example.com") and not is_ip("1.2.3")


def test_parent_wildcard() -> None:
    assert parent_wildcard("a.b.example.com") == "*.b.example.com"
    assert parent_wildcard("www.example.com") == "*.example.com"
    assert parent_wildcard("localhost") is None
    assert parent_wildcard("example.com") is None  # "*.com" could never match


@pytest.mark.parametrize(("pattern", "name", "expected"), [
    ("example.com", "example.com", True),
    ("example.com", "EXAMPLE.com.", True),
    ("example.com", "www.example.com", False),
    ("*.example.com", "www.example.com", True),
    ("*.example.com", "WWW.Example.Com", True),
    ("*.example.com", "example.com", False),          # never the apex
    ("*.example.com", "a.b.example.com", False),      # exactly one label
    ("*.example.com", ".example.com", False),
    ("*.example.com", "wwwexample.com", False),
    ("*.com", "example.com", False),                  # one-label suffix matches nothing
    ("*.example.com", "*.example.com", True),         # a wildcard domain is its own pattern
    ("w*.example.com", "www.example.com", False),     # partial-label wildcards unsupported
])
def test_covers_follows_rfc6125(pattern: str, name: str, expected: bool) -> None:
    assert covers(pattern, name) is expected
