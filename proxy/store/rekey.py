"""`tlsedge store rekey`: every private key in the store sealed with the current key.

Owns the sweep only (the format and the keyring are store/sealing.py). It reads each
record at a secret path and writes back, compare-and-swap on the revision it read, the
ones not sealed with the current key yet: those sealed with an older key, those stored
in clear (written before `store.encryption` was set), and certificate records written
before key material was split out of them (their PEM moves to a sealed `pem/` record).

Safe while nodes serve: a rewrite changes the bytes in the store, never what they open
to, so a worker swaps in the same chain and key. Resumable: a record already sealed
with the current key is left alone, so a sweep that was stopped starts again where it
was, cheaply. When every record is sealed with the current key, the key registry is
narrowed to it: from then on the older key files may be removed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

import msgspec

from proxy.errors import ConflictError, StoreError
from proxy.store import records as rec
from proxy.store.sealing import SealedStore, encode_registry, load_keyring, read_registry


class _Inline(msgspec.Struct):
    """What tells a certificate record with inline PEM (msgspec skips the rest)."""

    key_pem: str = ""


_inline = msgspec.json.Decoder(_Inline)
_PARALLEL = 32  # records read and rewritten at once
_PROGRESS = 10_000  # a progress line every this many records


@dataclass
class RekeyReport:
    resealed: int = 0  # rewritten with the current key
    current: int = 0  # already sealed with it
    split: int = 0  # certificate records whose inline PEM moved to a sealed record
    failed: list[str] = field(default_factory=list)  # one line per record left as it was
    narrowed: bool = False  # the registry lists the current key only

    @property
    def done(self) -> bool:
        return not self.failed and self.narrowed


async def rekey(store: SealedStore, say: Callable[[str], None] = lambda _: None,
                *, attempts: int = 5) -> RekeyReport:
    """Sweep until every secret record is sealed with the current key and no other key
    was registered during the sweep (a node sealing with another one); then narrow the
    registry. Gives up after `attempts` sweeps (report.narrowed stays False)."""
    report = RekeyReport()
    await store.register()
    for _ in range(attempts):
        _, registry_revision = await read_registry(store.inner)
        await _split_inline(store, report)
        for prefix in rec.SECRET_PREFIXES:
            await _sweep(store, prefix, report, say)
        if report.failed:
            return report
        try:
            await store.inner.put(rec.SEALING_KEYS, encode_registry([store.keyring.current]),
                                  expect=registry_revision)
        except ConflictError:
            say("another key was registered during the sweep (a node still encrypting "
                "with it?): sweeping again")
            continue
        report.narrowed = True
        return report
    return report


async def _sweep(store: SealedStore, prefix: str, report: RekeyReport,
                 say: Callable[[str], None]) -> None:
    keys = await store.inner.keys(prefix)
    for at in range(0, len(keys), _PARALLEL):
        results = await asyncio.gather(*(_reseal(store, key, report)
                                         for key in keys[at:at + _PARALLEL]),
                                       return_exceptions=True)
        for result in results:  # after the whole batch: none is left running
            if isinstance(result, BaseException):
                raise result
        seen = at + _PARALLEL
        if seen % _PROGRESS < _PARALLEL and seen < len(keys):
            say(f"{prefix}: {seen} of {len(keys)} records looked at")


async def _reseal(store: SealedStore, key: str, report: RekeyReport) -> None:
    inner, keyring = store.inner, store.keyring
    while True:
        item = await inner.get(key)
        if item is None:
            return  # deleted meanwhile
        if keyring.is_current(item.value):
            report.current += 1
            return
        try:
            plain = keyring.open(key, item.value)
        except StoreError as exc:
            report.failed.append(str(exc))
            return
        try:
            await inner.put(key, keyring.seal(key, plain), expect=item.revision, secret=True)
        except ConflictError:
            continue  # rewritten meanwhile: look at the new value
        report.resealed += 1
        return


async def _split_inline(store: SealedStore, report: RekeyReport) -> None:
    """Certificate records written before the split carry the chain and key inline:
    write their material sealed, then the record without it (the order the registry
    writes them in, so a reader always finds the material)."""
    for item in await store.inner.scan(rec.CERTS):
        parsed = rec.parse_cert_key(item.key)
        try:
            if parsed is None or not _inline.decode(item.value).key_pem:
                continue
            record = rec.decode(item.value, rec.CertRecord)
        except (msgspec.ValidationError, msgspec.DecodeError):
            continue  # not a certificate record: the nodes log it already
        material = rec.KeyMaterial(chain_pem=record.chain_pem, key_pem=record.key_pem)
        await store.put(rec.pem_key(parsed[0], parsed[1], record.fingerprint),
                        rec.encode(material))
        stripped = msgspec.structs.replace(record, chain_pem="", key_pem="")
        try:
            await store.inner.put(item.key, rec.encode(stripped), expect=item.revision)
        except ConflictError:
            continue  # rewritten meanwhile: the new record has no inline PEM
        report.split += 1


def run_rekey(config_path: str, say: Callable[[str], None]) -> bool:
    """`tlsedge store rekey -c FILE`: progress and the outcome through `say`; a
    TlsEdgeError (one line per problem) when records are left under other keys."""
    from proxy import config as config_mod
    from proxy.errors import ConfigError
    from proxy.store import check_store, open_store

    config = config_mod.load(config_path)
    if config.store.encryption is None:
        raise ConfigError(f"{config_path}: store.encryption is not set: there is no key "
                          "to encrypt with")

    async def sweep() -> RekeyReport:
        store = open_store(config)
        assert isinstance(store, SealedStore)
        try:
            await check_store(store)
            return await rekey(store, lambda line: say(f"store rekey: {line}"))
        finally:
            await store.close()

    report = asyncio.run(sweep())
    key = load_keyring(config.store.encryption.key_files).current
    say(f"store rekey: {report.resealed} records encrypted with key {key}, {report.current} "
        f"already were, {report.split} certificate records split")
    if report.failed:
        raise StoreError("\n".join([*report.failed[:20], f"{len(report.failed)} records "
                                    "left as they were: the older keys are still needed"]))
    if not report.narrowed:
        raise StoreError("another key kept being registered during the sweep: give every "
                         "node the new key first, then run rekey again")
    say(f"store rekey: every private key is encrypted with key {key}; the other key files "
        "may be removed from store.encryption.key_files")
    return True
