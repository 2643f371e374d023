"""The store: the one source of truth for domains, certificates, challenges, statuses.

`open_store` picks the backend named in config (files now; etcd for a cluster).
"""

from __future__ import annotations

from proxy.config import Config
from proxy.store.base import Store


def open_store(config: Config) -> Store:
    """The configured store backend; the caller closes it."""
    from proxy.store.files import FileStore

    return FileStore(config.store.path)
