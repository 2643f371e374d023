"""The store: the one source of truth for domains, certificates, challenges, statuses.

`open_store` picks the backend named in config: files (one node) or etcd (a cluster),
wrapped in a SealedStore when `store.encryption` is set (store/sealing.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from proxy.config import Config
from proxy.store.base import Store

if TYPE_CHECKING:
    from proxy.store.sealing import Keyring


def open_store(config: Config) -> Store:
    """The configured store backend; the caller closes it. Connects lazily: call
    `check_store` to fail early when the backend cannot be reached. Reads the
    encryption key files now: ConfigError when one is missing, open to others or not
    a key."""
    keyring = _keyring(config)
    store = _backend(config)
    if keyring is None:
        return store
    from proxy.store.sealing import SealedStore

    return SealedStore(store, keyring)


def _backend(config: Config) -> Store:
    if config.store.backend == "etcd":
        from proxy.store.etcd import EtcdSettings, EtcdStore

        s = config.store
        return EtcdStore(EtcdSettings(endpoints=s.endpoints, prefix=s.prefix, ca=s.ca,
                                      cert=s.cert, key=s.key, username=s.username,
                                      password_file=s.password_file, timeout=s.timeout,
                                      node=config.node.name))
    from proxy.store.files import FileStore

    return FileStore(config.store.path)


def _keyring(config: Config) -> Keyring | None:
    encryption = config.store.encryption
    if encryption is None:
        return None
    from proxy.store.sealing import load_keyring

    return load_keyring(encryption.key_files, Path(config.source).name or "config")


async def check_store(store: Store) -> int:
    """The store's revision, read once: raises StoreError with one line ("cannot reach
    etcd at 127.0.0.1:2379: unavailable: ...") when the store cannot be used, or when
    its private keys are encrypted with a key this node does not have (or encrypted at
    all while this node has no store.encryption)."""
    from proxy.store.sealing import SealedStore, check_unsealed

    revision = await store.revision()
    if isinstance(store, SealedStore):
        await store.verify()
    else:
        await check_unsealed(store)
    return revision


def check_encryption(config: Config) -> str | None:
    """For `check-config`: reads the key files (ConfigError when one is wrong); a
    warning when an etcd store would hold private keys in clear."""
    _keyring(config)
    if config.store.encryption is None and config.store.backend == "etcd":
        return ("store.encryption is not set: every etcd member and backup holds every "
                "private key in clear (see README, 'Private keys at rest')")
    return None
