"""The SNI certificate table: an immutable name -> certificate map (exact, then
one-label wildcard, then default), a bounded LRU of SSLContexts, and the selector a
listener's SNI callback runs. The callback never does I/O, never raises, and never
parses PEM for a cached certificate.

One intended departure from "snapshots, not mutation": a worker's table looks store
domains up in the worker's store state (sync.StoreNames over sync.StoreState), which
store events change in place, on the worker's loop between handshakes: a domain added
or removed, a certificate loaded, replaced, expired or unloaded (each domain's entry a
mutable slot, sync.DomainSlot). At a million domains an event then costs a dict write
instead of a new table, and no second million-entry map is kept; the price is that a
table is a snapshot of the config's names and certificates, not of the store's.
"""

from __future__ import annotations

import hashlib
import logging
import ssl
import sys
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from prometheus_client import Counter

from proxy.certs.bundle import CertBundle
from proxy.certs.tls import TlsSettings, server_context
from proxy.metrics import (
    CONTEXT_BUILDS,
    CONTEXT_CACHE_SIZE,
    SNI_LOOKUPS,
    BatchedCounter,
    batched_counter,
)
from proxy.names import sni_key

__all__ = ["CertEntry", "CertSelector", "CertTable", "ContextCache",
           "count_lookups_at_once", "count_lookups_in_batches", "install_sni_unraisable_hook"]

log = logging.getLogger(__name__)

SOURCES = frozenset({"platform", "static", "custom", "acme"})

# Bound once: .labels() costs a dict lookup and a lock per call.
_COUNT: dict[str, Counter | BatchedCounter] = {
    word: SNI_LOOKUPS.labels(word)
    for word in ("exact", "wildcard", "default", "rejected", "error", "unloaded")}

_UNRECOGNIZED = ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME
_INTERNAL = ssl.ALERT_DESCRIPTION_INTERNAL_ERROR


_BATCHABLE = ("exact", "wildcard", "default")


def count_lookups_in_batches() -> None:
    """From now on in this process, count the SNI callback's hits in batches
    (metrics.batched_counter: ~0.1 us instead of ~1 us a handshake), for a process
    that flushes them (a worker's listeners: metrics.start_flushing). Refusals and
    errors, rare, are still counted at once."""
    for word in _BATCHABLE:
        _COUNT[word] = batched_counter(SNI_LOOKUPS, word)


def count_lookups_at_once() -> None:
    """Undo `count_lookups_in_batches` (a worker's listeners stopping in a process
    that goes on, as in-process tests do); call after the batches' last flush."""
    for word in _BATCHABLE:
        _COUNT[word] = SNI_LOOKUPS.labels(word)


class CertEntry:
    """One certificate in the table and where it came from.

    `fingerprint` is a plain attribute: the SNI callback reads it on every handshake.
    A subclass may hold its certificate in another form and make `bundle` build it on
    demand (sync's store entries do: 100,000 of them must not each hold a parsed
    bundle); `bundle` is then only read when a context is built, or off the hot path.

    `context_key` identifies what a context is built from, the whole chain and the
    key (bytes, compared by the context cache): the leaf's fingerprint alone is not
    enough, as the same leaf re-uploaded with its intermediate must be served with it.
    """

    __slots__ = ("_bundle", "context_key", "fingerprint", "not_after", "not_before",
                 "source")

    # False only for a store domain whose certificate is not in memory yet (see
    # sync.DomainSlot): its `fingerprint` is "" until the listener has it loaded.
    loaded = True

    def __init__(self, bundle: CertBundle, source: str) -> None:
        if source not in SOURCES:
            raise ValueError(f"unknown certificate source {source!r}")
        self._bundle = bundle
        self.context_key = _content_key(bundle.chain_pem, bundle.key_pem)
        self.fingerprint = bundle.fingerprint
        self.not_before = bundle.not_before
        self.not_after = bundle.not_after
        self.source = source

    @property
    def bundle(self) -> CertBundle:
        return self._bundle

    def __repr__(self) -> str:
        return f"CertEntry({self.bundle.primary_name!r}, {self.source!r})"


def _content_key(chain_pem: bytes, key_pem: bytes) -> bytes:
    """A CertEntry's `context_key` from its PEM: a digest of the chain and the key."""
    digest = hashlib.sha256(len(chain_pem).to_bytes(4, "big"))
    digest.update(chain_pem)
    digest.update(key_pem)
    return digest.digest()


class ContextCache:
    """Bounded LRU context_key -> SSLContext, shared across table generations.

    A swap to a new table keeps every unchanged certificate's context; a changed
    chain or key (even under the same leaf) gets a context of its own. Memory is
    bounded by max_size (~19.5 kB per context), not by the number of certificates.
    Not thread-safe: used from the event-loop thread that runs the handshakes.
    """

    __slots__ = ("_contexts", "_max_size", "_settings")

    def __init__(self, settings: TlsSettings, max_size: int = 10_000) -> None:
        if max_size < 1:
            raise ValueError("max_size must be at least 1")
        self._settings = settings
        self._max_size = max_size
        self._contexts: OrderedDict[bytes, ssl.SSLContext] = OrderedDict()

    def get(self, entry: CertEntry) -> ssl.SSLContext:
        """The entry's context; builds it on a miss (BundleError if OpenSSL refuses)."""
        key = entry.context_key  # bytes cache their hash: one dict lookup per handshake
        contexts = self._contexts
        ctx = contexts.get(key)
        if ctx is not None:
            contexts.move_to_end(key)
            return ctx
        bundle = entry.bundle  # a store entry decodes its record here, from memory (~5 us)
        ctx = server_context(bundle.chain_pem, bundle.key_pem, self._settings, bundle.names)
        CONTEXT_BUILDS.inc()
        # An entry that changes in place (a store domain's slot) names the key it was
        # built for last: that context serves nothing new now (a replaced, renewed or
        # corrected certificate), so it leaves at once instead of waiting for the LRU
        # (~20 kB each: a certificate replaced every few seconds grew the worker by
        # ~0.3 MB a minute). Connections using it keep their own reference.
        retired = getattr(entry, "built_key", None)
        if retired is not None:
            if retired and retired != key:
                contexts.pop(retired, None)
            entry.built_key = key  # type: ignore[attr-defined]
        contexts[key] = ctx
        if len(contexts) > self._max_size:
            contexts.popitem(last=False)
        CONTEXT_CACHE_SIZE.set(len(contexts))
        return ctx

    def forget(self, keys: Iterable[bytes]) -> None:
        """Drop the contexts built for `keys` (certificates no table serves any more)."""
        for key in keys:
            self._contexts.pop(key, None)
        CONTEXT_CACHE_SIZE.set(len(self._contexts))

    def __contains__(self, entry: object) -> bool:
        """Whether `entry` (a CertEntry) has its context built."""
        return isinstance(entry, CertEntry) and entry.context_key in self._contexts

    def __len__(self) -> int:
        return len(self._contexts)


class CertTable:
    """Immutable map from names to certificates; build a new one instead of mutating.

    lookup order: exact name, then the one-label wildcard "*.rest", then the default
    (None when reject_unknown or no default). No SNI (or an IP literal) gets the
    default even with reject_unknown: such a client has no name to be unknown.

    An entry may be a store domain's slot (sync.DomainSlot) whose content changes in
    place as its certificate is loaded, replaced or expires: a slot with no
    certificate falls back to `fallback` (the ops certificate files' own indexes),
    then on down the lookup order; one not loaded yet is answered "unloaded".
    """

    __slots__ = ("_default", "_exact", "_fallback", "_reject_unknown", "_wild")

    def __init__(self, exact: Mapping[str, CertEntry], wild: Mapping[str, CertEntry],
                 default: CertEntry | None, reject_unknown: bool,
                 fallback: tuple[dict[str, CertEntry], dict[str, CertEntry]] = ({}, {}),
                 ) -> None:
        self._exact = exact
        self._wild = wild  # keyed by the suffix after '*': ".example.com"
        self._default = default
        self._reject_unknown = reject_unknown
        self._fallback = fallback

    @classmethod
    def build(cls, names: Mapping[str, CertEntry], default: CertEntry | None, *,
              reject_unknown: bool = False,
              fallback: tuple[dict[str, CertEntry], dict[str, CertEntry]] = ({}, {}),
              ) -> CertTable:
        """Keys are normalised names or "*.x.y" patterns (names.normalize).

        A "*.tld" pattern is not indexed: RFC 6125 lets it match nothing.
        """
        exact: dict[str, CertEntry] = {}
        wild: dict[str, CertEntry] = {}
        for name, entry in names.items():
            if name.startswith("*."):
                if name.count(".") >= 2:
                    wild[name[1:]] = entry
            else:
                exact[name] = entry
        return cls(exact, wild, default, reject_unknown, fallback)

    @classmethod
    def from_entries(cls, entries: Iterable[CertEntry], default: CertEntry | None, *,
                     reject_unknown: bool = False) -> CertTable:
        """Index each entry under all its names; the FIRST entry to claim a name wins."""
        names: dict[str, CertEntry] = {}
        for entry in entries:
            for name in entry.bundle.names:
                names.setdefault(name, entry)
        return cls.build(names, default, reject_unknown=reject_unknown)

    def lookup(self, server_name: str | None, *, settle: bool = False
               ) -> tuple[CertEntry | None, str]:
        """(entry, how) with how in exact|wildcard|default|rejected|unloaded; entry None
        = reject. "unloaded": the name's certificate must be loaded before a handshake
        (the entry is the slot to load). With `settle` (the SNI callback: too late to
        load) such a slot counts as one without a certificate, and lookup goes on."""
        key = sni_key(server_name)
        if key is not None:
            entry = self._exact.get(key)
            if entry is not None:
                if entry.fingerprint:
                    return entry, "exact"
                if not entry.loaded and not settle:
                    return entry, "unloaded"
                entry = self._fallback[0].get(key)  # a store domain without a certificate
                if entry is not None:
                    return entry, "exact"
            dot = key.find(".")
            if dot > 0:
                suffix = key[dot:]
                entry = self._wild.get(suffix)
                if entry is not None:
                    if entry.fingerprint:
                        return entry, "wildcard"
                    if not entry.loaded and not settle:
                        return entry, "unloaded"
                    entry = self._fallback[1].get(suffix)
                    if entry is not None:
                        return entry, "wildcard"
            if self._reject_unknown:
                return None, "rejected"
        if self._default is None:
            return None, "rejected"
        return self._default, "default"

    @property
    def default(self) -> CertEntry | None:
        return self._default

    @property
    def fallback(self) -> tuple[dict[str, CertEntry], dict[str, CertEntry]]:
        return self._fallback

    def indexes(self) -> tuple[dict[str, CertEntry], dict[str, CertEntry]]:
        """Copies of (exact, wildcard) as the constructor takes them, for a caller that
        builds the next table by changing a few names (sync.Composer)."""
        return dict(self._exact), dict(self._wild)

    def entries(self) -> list[CertEntry]:
        """Distinct entries (the default included), in first-indexed order."""
        seen: dict[int, CertEntry] = {}
        for entry in (*self._exact.values(), *self._wild.values()):
            seen.setdefault(id(entry), entry)
        if self._default is not None:
            seen.setdefault(id(self._default), self._default)
        return list(seen.values())

    def __len__(self) -> int:
        return len(self._exact) + len(self._wild)


class CertSelector:
    """What a listener holds: the current table and the shared context cache.

    swap() is one reference assignment, so a handshake sees the old table or the
    new one, never a mix. Runs on the event-loop thread.
    """

    __slots__ = ("cache", "table")

    def __init__(self, table: CertTable, cache: ContextCache) -> None:
        self.table = table
        self.cache = cache

    def swap(self, table: CertTable) -> None:
        self.table = table

    def sni_callback(self, ssl_object: ssl.SSLObject | ssl.SSLSocket,
                     server_name: str | None, base: object) -> int | None:
        """Set the connection's context for `server_name`; an alert number on refusal."""
        try:
            entry, how = self.table.lookup(server_name)
            if entry is None:
                _COUNT["rejected"].inc()
                return _UNRECOGNIZED
            if how == "unloaded":
                # The listener loads a name's certificate before the handshake starts;
                # this is a domain added since it looked (a few loop turns ago), a
                # ClientHello it could not read, or a read that failed: answer as if
                # the domain had no certificate yet, as a moment earlier.
                _COUNT["unloaded"].inc()
                entry, how = self.table.lookup(server_name, settle=True)
                if entry is None:
                    _COUNT["rejected"].inc()
                    return _UNRECOGNIZED
            ssl_object.context = self.cache.get(entry)
            _COUNT[how].inc()
            return None
        except Exception as exc:  # an exception here would only reach the unraisable hook
            _COUNT["error"].inc()
            log.warning("SNI callback failed: %s: %s", type(exc).__name__, exc)
            return _INTERNAL


def install_sni_unraisable_hook() -> Callable[[Any], None]:
    """Turn CPython's traceback for a non-ASCII SNI into one warning line.

    CPython decodes the server name as ASCII before our callback runs; a client
    sending other bytes makes it print an "unraisable" UnicodeDecodeError with a
    traceback and refuse the handshake. Everything else goes to the previous hook,
    which is returned (so a test or caller can put it back).
    """
    previous = sys.unraisablehook

    def hook(args: Any) -> None:
        if (isinstance(args.exc_value, UnicodeDecodeError)
                and isinstance(args.object, bytes | bytearray)):
            log.warning("TLS handshake refused: client sent a non-ASCII server name "
                        "(%d bytes)", len(args.object))
            return
        previous(args)

    sys.unraisablehook = hook
    return previous
