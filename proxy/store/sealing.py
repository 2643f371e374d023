"""Envelope encryption of the store's private keys (`store.encryption`).

Owns the sealed-record format, the keyring read from `store.encryption.key_files`, the
store's key registry (`sealing/keys`) and SealedStore: a Store that seals the records
under records.SECRET_PREFIXES (certificates' key material, the ACME account) on their
way in and opens them on their way out, so everything above the store keeps seeing
plain PEM. Never logs a value or a key.

A sealed value:

    MAGIC (18 bytes) | key id (8) | nonce (12) | AES-256-GCM ciphertext + tag (16)

The associated data is MAGIC + the record's store path: a value copied to another path
(another domain's key material) does not open. The key id is a digest of the key, so a
wrong key file is told apart from a damaged record. Values at secret paths that do not
start with MAGIC were written before encryption was turned on: they are read as they
are, and `tlsedge store rekey` (store/rekey.py) seals them.

The registry lists every key id that may have sealed a record: a writer adds the current
one before sealing with it, and rekey narrows it to the current key once every record
is sealed with that key. At start-up (check_store) every listed id must be in the
keyring: a missing or wrong key file is one clear error, never a half-served table.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import logging
import os
import stat
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING, Any

import msgspec
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from proxy.errors import ConfigError, ConflictError, StoreError
from proxy.store import records as rec
from proxy.store.base import Event, Item, Lease, Store, Write
from proxy.store.keys import split_key

log = logging.getLogger("tlsedge.store.sealing")

MAGIC = b"\x00tlsedge-sealed 1\x00"  # a JSON record never starts with NUL
KEY_SIZE, ID_SIZE, NONCE_SIZE, TAG_SIZE = 32, 8, 12, 16
_HEAD = len(MAGIC) + ID_SIZE + NONCE_SIZE
# A scan opening more sealed records than this does it in a thread: 100,000 take ~0.3 s.
_INLINE = 64
# Backend extras a SealedStore forwards: the optional protocols of store/base.py
# (HasHealth, Checkpointing) and what the tools print about the backend.
_EXTRAS = frozenset({"health", "checkpoint", "where", "settings"})


def key_id(key: bytes) -> str:
    """The id a sealed record carries for `key` (hex): a digest, never the key."""
    return hashlib.sha256(b"tlsedge store key id\x00" + key).hexdigest()[:2 * ID_SIZE]


def is_sealed(value: bytes) -> bool:
    return value.startswith(MAGIC)


def sealed_with(value: bytes) -> str | None:
    """The key id of a sealed value (hex); None for a value stored in clear."""
    if not is_sealed(value) or len(value) < _HEAD:
        return None
    return value[len(MAGIC):len(MAGIC) + ID_SIZE].hex()


def _aad(path: str) -> bytes:
    return MAGIC + path.encode()


class Keyring:
    """The keys of `store.encryption.key_files`: the first seals, every one opens."""

    __slots__ = ("_ciphers", "current", "ids")

    def __init__(self, keys: Sequence[bytes]) -> None:
        if not keys:
            raise ValueError("a keyring needs at least one key")
        self.ids = tuple(key_id(k) for k in keys)
        self.current = self.ids[0]
        self._ciphers = {bytes.fromhex(i): AESGCM(k) for i, k in zip(self.ids, keys,
                                                                      strict=True)}

    def __repr__(self) -> str:
        return f"Keyring(current={self.current}, {len(self.ids)} keys)"

    def seal(self, path: str, plain: bytes) -> bytes:
        """`plain` sealed with the current key for the record at `path`."""
        kid = bytes.fromhex(self.current)
        nonce = os.urandom(NONCE_SIZE)
        return MAGIC + kid + nonce + self._ciphers[kid].encrypt(nonce, plain, _aad(path))

    def open(self, path: str, value: bytes) -> bytes:
        """The plain value of the record at `path`; a value in clear as it is.
        StoreError with one line when it cannot be opened."""
        if not is_sealed(value):
            return value
        if len(value) < _HEAD + TAG_SIZE:
            raise StoreError(f"store record {path} is damaged (a sealed value of "
                             f"{len(value)} bytes)")
        kid = value[len(MAGIC):len(MAGIC) + ID_SIZE]
        cipher = self._ciphers.get(kid)
        if cipher is None:
            raise StoreError(f"store record {path} is encrypted with key {kid.hex()}, which "
                             f"none of store.encryption.key_files holds (they hold "
                             f"{', '.join(self.ids)})")
        view = memoryview(value)  # no copies of the ciphertext: 100,000 opened at start
        try:
            return cipher.decrypt(view[_HEAD - NONCE_SIZE:_HEAD], view[_HEAD:], _aad(path))
        except InvalidTag:
            raise StoreError(f"store record {path} does not decrypt with key {kid.hex()}: it "
                             "was encrypted for another path (copied there?) or it is "
                             "damaged") from None

    def is_current(self, value: bytes) -> bool:
        """Whether `value` is sealed with the current key (rekey leaves it alone)."""
        return sealed_with(value) == self.current


def load_keyring(paths: Sequence[str], label: str = "config") -> Keyring:
    """The keyring of `store.encryption.key_files`; ConfigError naming the file at fault."""
    keys: list[bytes] = []
    for i, path in enumerate(paths):
        where = f"{label}: store.encryption.key_files[{i}]"
        key = read_key_file(path, where)
        if key in keys:
            raise ConfigError(f"{where}: {path} holds the same key as "
                              f"key_files[{keys.index(key)}]")
        keys.append(key)
    if not keys:
        raise ConfigError(f"{label}: store.encryption.key_files: give at least one key file")
    return Keyring(keys)


def read_key_file(path: str, where: str) -> bytes:
    """A 32-byte key: the file's 32 raw bytes, or 64 hex digits, or base64 of 32 bytes.
    Refused when group or others may access the file."""
    try:
        with open(path, "rb") as f:
            mode = os.fstat(f.fileno()).st_mode
            data = f.read(4096)
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read {path}: {exc.strerror}") from None
    if not stat.S_ISREG(mode):
        raise ConfigError(f"{where}: {path} is not a regular file")
    if mode & 0o077:
        raise ConfigError(f"{where}: {path} is accessible to group or others (mode "
                          f"{stat.S_IMODE(mode):04o}): chmod 600 it")
    if len(data) == KEY_SIZE:
        return data
    text = data.strip()
    try:
        if len(text) == 2 * KEY_SIZE:
            return bytes.fromhex(text.decode("ascii"))
        decoded = base64.b64decode(text, validate=True)
        if len(decoded) == KEY_SIZE:
            return decoded
    except (ValueError, binascii.Error):
        pass
    raise ConfigError(f"{where}: {path} is not a 32-byte key (32 raw bytes, 64 hex digits "
                      "or base64); make one with `openssl rand -out FILE 32`")


class _Registry(msgspec.Struct, frozen=True):
    keys: tuple[str, ...] = ()


async def read_registry(store: Store) -> tuple[tuple[str, ...], int]:
    """(key ids that may have sealed a record, the registry's revision; 0: absent)."""
    item = await store.get(rec.SEALING_KEYS)
    if item is None:
        return (), 0
    try:
        return msgspec.json.decode(item.value, type=_Registry).keys, item.revision
    except msgspec.DecodeError:
        raise StoreError(f"store record {rec.SEALING_KEYS} is damaged") from None


def encode_registry(ids: Sequence[str]) -> bytes:
    return msgspec.json.encode(_Registry(keys=tuple(ids)))


async def check_unsealed(store: Store) -> None:
    """A node without store.encryption must not use a store whose keys are sealed: it
    could read none of them, and would write new ones in clear."""
    ids, _ = await read_registry(store)
    if ids:
        raise StoreError(f"the store holds private keys encrypted with key {', '.join(ids)}, "
                         "but store.encryption is not set: add store.encryption.key_files "
                         "to the config")


def _may_hold_secrets(prefix: str) -> bool:
    return any(p.startswith(prefix) or prefix.startswith(p) for p in rec.SECRET_PREFIXES)


class SealedStore:
    """A Store that seals the records at secret paths (records.is_secret) in `inner`.

    Reads open them: get() raises StoreError for a record that cannot be opened; scan()
    and watch() leave such a record out (a watch reports it deleted), logged with its
    reason, so one bad record never stops a node from reading the others. Every other
    record, and keys(), revisions, locks, pass through unchanged. Backend extras
    (`health`, `checkpoint`) are the inner store's.
    """

    def __init__(self, inner: Store, keyring: Keyring) -> None:
        self.inner = inner
        self.keyring = keyring

    def __repr__(self) -> str:
        return f"SealedStore({self.inner!r}, {self.keyring!r})"

    if not TYPE_CHECKING:  # hidden from mypy, which then checks the Store protocol
        def __getattr__(self, name: str) -> Any:
            if name not in _EXTRAS:
                raise AttributeError(name)
            return getattr(self.inner, name)

    # -- reads -----------------------------------------------------------------------------

    async def get(self, key: str) -> Item | None:
        item = await self.inner.get(key)
        if item is None or not rec.is_secret(key) or not is_sealed(item.value):
            return item
        return Item(key, self.keyring.open(key, item.value), item.revision)

    async def get_many(self, keys: Sequence[str]) -> list[Item | None]:
        items = await self.inner.get_many(keys)
        return [item if item is None or not rec.is_secret(item.key)
                or not is_sealed(item.value)
                else Item(item.key, self.keyring.open(item.key, item.value), item.revision)
                for item in items]

    async def scan(self, prefix: str) -> list[Item]:
        return await self._opened(prefix, await self.inner.scan(prefix))

    async def scan_pages(self, prefix: str, *, after: str = "", before: str = "",
                         page: int = 0) -> AsyncIterator[list[Item]]:
        pages = self.inner.scan_pages(prefix, after=after, before=before, page=page)
        try:
            async for items in pages:
                yield await self._opened(prefix, items)
        finally:
            aclose = getattr(pages, "aclose", None)
            if aclose is not None:
                await aclose()

    async def _opened(self, prefix: str, items: list[Item]) -> list[Item]:
        if not _may_hold_secrets(prefix):
            return items
        sealed = sum(1 for i in items if is_sealed(i.value))
        if sealed > _INLINE:
            return await asyncio.to_thread(self._open_all, items)
        return self._open_all(items) if sealed else items

    def _open_all(self, items: list[Item]) -> list[Item]:
        opened = []
        for item in items:
            if rec.is_secret(item.key) and is_sealed(item.value):
                try:
                    item = Item(item.key, self.keyring.open(item.key, item.value),
                                item.revision)
                except StoreError as exc:
                    log.error("ignoring store record %s: %s", item.key, exc)
                    continue
            opened.append(item)
        return opened

    async def keys(self, prefix: str) -> list[str]:
        return await self.inner.keys(prefix)

    async def revision(self) -> int:
        return await self.inner.revision()

    async def watch(self, prefix: str, after: int) -> AsyncIterator[Event]:
        events = self.inner.watch(prefix, after)
        secret = _may_hold_secrets(prefix)
        try:
            async for event in events:
                value = event.value
                if secret and value is not None and rec.is_secret(event.key) and \
                        is_sealed(value):
                    try:
                        event = Event(event.key, self.keyring.open(event.key, value),
                                      event.revision)
                    except StoreError as exc:  # as scan() would: the record is left out
                        log.error("ignoring store record %s: %s", event.key, exc)
                        event = Event(event.key, None, event.revision)
                yield event
        finally:
            aclose = getattr(events, "aclose", None)
            if aclose is not None:
                await aclose()

    # -- writes ----------------------------------------------------------------------------

    async def put(self, key: str, value: bytes, *, expect: int | None = None,
                  secret: bool = False) -> int:
        if rec.is_secret(key):
            split_key(key)  # a bad key is refused before the registry is touched
            await self.register()
            value = self.keyring.seal(key, bytes(value))
            secret = True
        return await self.inner.put(key, value, expect=expect, secret=secret)

    async def delete(self, key: str, *, expect: int | None = None) -> bool:
        return await self.inner.delete(key, expect=expect)

    async def put_all(self, writes: Sequence[Write]) -> int:
        if any(rec.is_secret(w.key) for w in writes):
            for write in writes:
                split_key(write.key)
            await self.register()
            writes = [Write(w.key, self.keyring.seal(w.key, bytes(w.value)), w.expect)
                      if rec.is_secret(w.key) else w for w in writes]
        return await self.inner.put_all(writes)

    async def lock(self, name: str, *, ttl: float, wait: float = 0.0) -> Lease:
        return await self.inner.lock(name, ttl=ttl, wait=wait)

    async def close(self) -> None:
        await self.inner.close()

    # -- the key registry ------------------------------------------------------------------

    async def register(self) -> None:
        """List the current key in the registry before anything is sealed with it. One
        read per sealed write (they are rare: an upload, an issuance), so a key that
        rekey dropped from the list while a node still sealed with it comes back."""
        for _ in range(20):
            ids, revision = await read_registry(self.inner)
            if self.keyring.current in ids:
                return
            try:
                await self.inner.put(rec.SEALING_KEYS,
                                     encode_registry((*ids, self.keyring.current)),
                                     expect=revision)
                return
            except ConflictError:
                continue  # another writer registered its key meanwhile: look again
        raise StoreError(f"could not record the encryption key in {rec.SEALING_KEYS}: it "
                         "kept changing")

    async def verify(self) -> None:
        """StoreError when a key that may have sealed a record is not in the keyring."""
        ids, _ = await read_registry(self.inner)
        unknown = [i for i in ids if i not in self.keyring.ids]
        if unknown:
            raise StoreError(f"the store holds private keys encrypted with key "
                             f"{', '.join(unknown)}, which none of store.encryption.key_files "
                             f"holds (they hold {', '.join(self.keyring.ids)}): add the key "
                             "file that has it")
