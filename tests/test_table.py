"""CertTable lookup order, the bounded context cache, and the selector on real TLS."""

from __future__ import annotations

import hashlib
import logging
import socket
import ssl
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from proxy.certs.bundle import CertBundle, load_bundle
from proxy.certs.table import (
    CertEntry,
    CertSelector,
    CertTable,
    ContextCache,
    install_sni_unraisable_hook,
)
from proxy.certs.tls import TlsSettings, base_context
from proxy.metrics import CONTEXT_BUILDS, SNI_LOOKUPS
from tests.certgen import CA

SETTINGS = TlsSettings()


@pytest.fixture(scope="module")
def ca() -> CA:
    return CA.new("table test CA")


def _entry(ca: CA, *names: str, source: str = "custom") -> CertEntry:
    issued = ca.issue(list(names))
    return CertEntry(load_bundle(issued.chain_pem, issued.key_pem), source)


@pytest.fixture(scope="module")
def entries(ca: CA) -> dict[str, CertEntry]:
    return {
        "exact": _entry(ca, "shop.example.com", "example.com"),
        "wild": _entry(ca, "*.apps.example.com", source="acme"),
        "default": _entry(ca, "*.platform.test", source="platform"),
    }


@pytest.fixture
def table(entries: dict[str, CertEntry]) -> CertTable:
    return CertTable.from_entries([entries["exact"], entries["wild"]], entries["default"])


@contextmanager
def tls_server(selector: CertSelector) -> Iterator[int]:
    """A threaded TLS server on loopback using base_context + selector.sni_callback."""
    base = base_context(SETTINGS)
    base.sni_callback = selector.sni_callback
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            conn.settimeout(5)
            try:
                with base.wrap_socket(conn, server_side=True) as tls:
                    tls.recv(1)
            except (ssl.SSLError, OSError):
                conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        thread.join(5)
        listener.close()


def served_fingerprint(port: int, server_name: str | None) -> str:
    """Handshake with Python's ssl client; the sha256 of the certificate served."""
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.check_hostname = False
    client.verify_mode = ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
            client.wrap_socket(raw, server_hostname=server_name) as tls:
        der = tls.getpeercert(binary_form=True)
        assert der is not None
        return hashlib.sha256(der).hexdigest()


def _count(result: str) -> float:
    value = SNI_LOOKUPS.labels(result)._value.get()
    return float(value)


def _builds() -> float:
    return float(CONTEXT_BUILDS._value.get())


def test_lookup_order_is_exact_then_one_label_wildcard_then_default(
        table: CertTable, entries: dict[str, CertEntry]) -> None:
    assert table.lookup("shop.example.com") == (entries["exact"], "exact")
    assert table.lookup("EXAMPLE.com.") == (entries["exact"], "exact")
    assert table.lookup("a.apps.example.com") == (entries["wild"], "wildcard")
    assert table.lookup("apps.example.com") == (entries["default"], "default")
    assert table.lookup("a.b.apps.example.com") == (entries["default"], "default")
    assert table.lookup(None) == (entries["default"], "default")
    assert table.lookup("127.0.0.1") == (entries["default"], "default")
    assert len(table) == 3
    assert table.entries() == [entries["exact"], entries["wild"], entries["default"]]


def test_reject_unknown_refuses_unknown_names_but_serves_clients_without_sni(
        entries: dict[str, CertEntry]) -> None:
    table = CertTable.from_entries([entries["exact"]], entries["default"], reject_unknown=True)
    assert table.lookup("nope.example.net") == (None, "rejected")
    assert table.lookup(None) == (entries["default"], "default")
    no_default = CertTable.from_entries([entries["exact"]], None)
    assert no_default.lookup("nope.example.net") == (None, "rejected")
    assert no_default.lookup(None) == (None, "rejected")


def test_first_entry_to_claim_a_name_wins(ca: CA, entries: dict[str, CertEntry]) -> None:
    later = _entry(ca, "shop.example.com")
    table = CertTable.from_entries([entries["exact"], later], None)
    assert table.lookup("shop.example.com")[0] is entries["exact"]
    assert CertTable.from_entries([later, entries["exact"]], None).lookup(
        "shop.example.com")[0] is later


def test_build_ignores_a_one_label_wildcard_pattern(entries: dict[str, CertEntry]) -> None:
    table = CertTable.build({"*.com": entries["wild"], "a.example.com": entries["exact"]}, None)
    assert table.lookup("example.com") == (None, "rejected")
    assert len(table) == 1


def test_cache_builds_each_certificate_once_and_is_shared_across_swaps(
        table: CertTable, entries: dict[str, CertEntry]) -> None:
    cache = ContextCache(SETTINGS, max_size=10)
    before = _builds()
    first = cache.get(entries["exact"])
    for _ in range(5):
        assert cache.get(entries["exact"]) is first
    assert _builds() - before == 1
    # A new table generation holding the same certificate reuses the context.
    selector = CertSelector(table, cache)
    selector.swap(CertTable.from_entries([entries["exact"]], None))
    assert selector.cache.get(selector.table.lookup("example.com")[0]) is first  # type: ignore[arg-type]
    assert _builds() - before == 1


class _Unreadable(CertEntry):
    """An entry whose PEM must not be read (a cached context needs none)."""

    __slots__ = ()

    @property
    def bundle(self) -> CertBundle:
        raise AssertionError("the PEM was read for a cached certificate")


def test_cache_never_parses_pem_for_a_cached_entry(entries: dict[str, CertEntry]) -> None:
    cache = ContextCache(SETTINGS)
    ctx = cache.get(entries["exact"])
    same = _Unreadable(entries["exact"].bundle, "custom")  # another entry, same chain and key
    assert cache.get(same) is ctx


def test_cache_evicts_least_recently_used_beyond_its_bound(ca: CA) -> None:
    many = [_entry(ca, f"h{i}.example.com") for i in range(6)]
    cache = ContextCache(SETTINGS, max_size=3)
    for entry in many[:3]:
        cache.get(entry)
    cache.get(many[0])  # now most recent
    cache.get(many[3])  # evicts many[1]
    assert len(cache) == 3
    assert many[0] in cache and many[1] not in cache
    for entry in many:
        cache.get(entry)
        assert len(cache) <= 3


@pytest.mark.parametrize(("server_name", "which", "result"), [
    ("shop.example.com", "exact", "exact"),
    ("SHOP.Example.COM.", "exact", "exact"),
    ("x.apps.example.com", "wild", "wildcard"),
    ("unknown.example.net", "default", "default"),
    (None, "default", "default"),
])
def test_handshake_serves_the_certificate_the_table_picks(
        table: CertTable, entries: dict[str, CertEntry], server_name: str | None,
        which: str, result: str) -> None:
    selector = CertSelector(table, ContextCache(SETTINGS))
    before = _count(result)
    with tls_server(selector) as port:
        assert served_fingerprint(port, server_name) == entries[which].fingerprint
    assert _count(result) - before == 1


def test_handshake_for_unknown_name_is_refused_with_unrecognized_name(
        entries: dict[str, CertEntry]) -> None:
    table = CertTable.from_entries([entries["exact"]], entries["default"], reject_unknown=True)
    selector = CertSelector(table, ContextCache(SETTINGS))
    before = _count("rejected")
    with tls_server(selector) as port, pytest.raises(ssl.SSLError, match="UNRECOGNIZED_NAME"):
        served_fingerprint(port, "unknown.example.net")
    assert _count("rejected") - before == 1


def test_swap_changes_the_served_certificate_for_new_handshakes(
        ca: CA, table: CertTable, entries: dict[str, CertEntry]) -> None:
    selector = CertSelector(table, ContextCache(SETTINGS))
    replacement = _entry(ca, "shop.example.com")
    with tls_server(selector) as port:
        assert served_fingerprint(port, "shop.example.com") == entries["exact"].fingerprint
        selector.swap(CertTable.from_entries([replacement], entries["default"]))
        assert served_fingerprint(port, "shop.example.com") == replacement.fingerprint


def test_callback_failure_is_counted_and_answered_with_internal_error(
        entries: dict[str, CertEntry], caplog: pytest.LogCaptureFixture) -> None:
    b = entries["exact"].bundle
    unusable = CertEntry(b.__class__(b"junk", b"junk", b.names, b.primary_name, b.not_before,
                                     b.not_after, "0" * 64, b.issuer, b.key_type), "custom")
    selector = CertSelector(CertTable.from_entries([unusable], None), ContextCache(SETTINGS))
    before = _count("error")
    with tls_server(selector) as port, pytest.raises(ssl.SSLError, match="INTERNAL_ERROR"):
        served_fingerprint(port, "shop.example.com")
    assert _count("error") - before == 1
    assert "SNI callback failed: BundleError" in caplog.text
    assert "junk" not in caplog.text


def _hello_with_raw_server_name(raw_name: bytes) -> bytes:
    """A real ClientHello from Python's ssl, its SNI bytes swapped (same length)."""
    placeholder = b"z" * len(raw_name)
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.check_hostname = False
    client.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = client.wrap_bio(incoming, outgoing, server_hostname=placeholder.decode() + ".test")
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    hello = outgoing.read()
    assert hello.count(placeholder) == 1
    return hello.replace(placeholder, raw_name)


def test_non_ascii_sni_is_refused_with_one_warning_and_no_traceback(
        table: CertTable, capfd: pytest.CaptureFixture[str],
        caplog: pytest.LogCaptureFixture) -> None:
    selector = CertSelector(table, ContextCache(SETTINGS))
    original = sys.unraisablehook
    sys.unraisablehook = sys.__unraisablehook__  # CPython's, which prints the traceback
    install_sni_unraisable_hook()
    try:
        with tls_server(selector) as port, \
                socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
            raw.sendall(_hello_with_raw_server_name("éé".encode()))
            answer = raw.recv(64)
    finally:
        sys.unraisablehook = original
    # A fatal alert record (0x15), not a ServerHello (0x16).
    assert answer[:1] == b"\x15"
    err = capfd.readouterr().err
    assert "Traceback" not in err and "UnicodeDecodeError" not in err
    warnings = [r for r in caplog.records if "non-ASCII server name" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING


def test_unraisable_hook_defers_other_errors_to_the_previous_hook() -> None:
    seen: list[object] = []
    original = sys.unraisablehook
    sys.unraisablehook = seen.append
    try:
        previous = install_sni_unraisable_hook()
        try:
            args = type("Args", (), {"exc_value": ValueError("x"), "object": b"x"})()
            sys.unraisablehook(args)
        finally:
            sys.unraisablehook = previous
    finally:
        sys.unraisablehook = original
    assert len(seen) == 1


def test_a_slot_not_loaded_when_the_sni_callback_runs_is_answered_as_one_without_a_certificate(
        entries: dict[str, CertEntry]) -> None:
    """The listener loads a store domain's certificate before the handshake; a domain
    added between its look and the SNI callback (or a failed read) must not refuse the
    handshake: it gets what the name got a moment earlier (the ops file, else default)."""
    from proxy.sync import DomainSlot

    fallback = CertTable.build({"shop.example.com": entries["exact"]}, None).indexes()
    slots = {"shop.example.com": DomainSlot("shop.example.com"),
             "new.example.org": DomainSlot("new.example.org")}
    table = CertTable(dict(slots), {}, entries["default"], False, fallback)
    assert table.lookup("shop.example.com")[1] == "unloaded"  # the listener would load it
    selector = CertSelector(table, ContextCache(SETTINGS))
    before = _count("unloaded")
    with tls_server(selector) as port:
        assert served_fingerprint(port, "shop.example.com") == entries["exact"].fingerprint
        assert served_fingerprint(port, "new.example.org") == entries["default"].fingerprint
    assert _count("unloaded") == before + 2


class _ChangingEntry(CertEntry):
    """An entry whose certificate changes in place, as a store domain's slot does."""

    __slots__ = ("built_key",)

    def __init__(self, bundle: CertBundle) -> None:
        super().__init__(bundle, "custom")
        self.built_key = b""

    def replace(self, other: CertEntry) -> None:
        self._bundle = other.bundle
        self.context_key = other.context_key
        self.fingerprint = other.fingerprint


def test_a_replaced_certificate_leaves_the_cache_at_its_next_build(ca: CA) -> None:
    first = _entry(ca, "slot.example.test")
    slot = _ChangingEntry(first.bundle)
    cache = ContextCache(SETTINGS)
    old = cache.get(slot)
    for _ in range(5):  # renewed, re-uploaded, corrected: one context at a time
        slot.replace(_entry(ca, "slot.example.test"))
        assert cache.get(slot) is not old
        assert len(cache) == 1
    unrelated = _entry(ca, "other.example.test")
    cache.get(unrelated)
    assert len(cache) == 2 and unrelated in cache


def test_forget_drops_the_contexts_of_certificates_no_longer_served(ca: CA) -> None:
    cache = ContextCache(SETTINGS)
    rotated, kept = _entry(ca, "ops.example.test"), _entry(ca, "keep.example.test")
    cache.get(rotated)
    cache.get(kept)
    cache.forget([rotated.context_key])
    assert rotated not in cache and kept in cache
