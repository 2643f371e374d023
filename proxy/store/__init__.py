"""The store: the one source of truth for domains, certificates, challenges, statuses.

`open_store` picks the backend named in config: files (one node) or etcd (a cluster).
"""

from __future__ import annotations

from proxy.config import Config
from proxy.store.base import Store


def open_store(config: Config) -> Store:
    """The configured store backend; the caller closes it. Connects lazily: call
    `check_store` to fail early when the backend cannot be reached."""
    if config.store.backend == "etcd":
        from proxy.store.etcd import EtcdSettings, EtcdStore

        s = config.store
        return EtcdStore(EtcdSettings(endpoints=s.endpoints, prefix=s.prefix, ca=s.ca,
                                      cert=s.cert, key=s.key, username=s.username,
                                      password_file=s.password_file, timeout=s.timeout,
                                      node=config.node.name))
    from proxy.store.files import FileStore

    return FileStore(config.store.path)


async def check_store(store: Store) -> int:
    """The store's revision, read once: raises StoreError with one line ("cannot reach
    etcd at 127.0.0.1:2379: unavailable: ...") when the store cannot be used."""
    return await store.revision()
