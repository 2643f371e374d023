"""The one exception hierarchy of tlsedge.

Every message is a single line a person can act on; no exception here carries a
private key or anything read from one.
"""

from __future__ import annotations


class TlsEdgeError(Exception):
    """Base of every error tlsedge raises on purpose."""


class ConfigError(TlsEdgeError):
    """The static configuration is invalid; the message names the file and key path."""


class NameError_(TlsEdgeError):
    """A hostname is not a valid DNS name."""


InvalidName = NameError_


class BundleError(TlsEdgeError):
    """A certificate chain or private key was rejected."""


class StoreError(TlsEdgeError):
    """The store could not read or write a record."""


class LockTimeout(StoreError):
    """A per-domain lock could not be taken in time."""


class ConflictError(StoreError):
    """A compare-and-swap lost: the record changed since it was read."""


class IssuanceError(TlsEdgeError):
    """An ACME order failed; the message carries the CA's reason."""

    def __init__(self, message: str, *, retry_after: float | None = None,
                 permanent: bool = False) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.permanent = permanent


class RegistryError(TlsEdgeError):
    """A domain operation was rejected by the domain rules."""
