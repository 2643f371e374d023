"""Server SSLContext factory: the TLS policy (`tls.*`: versions, TLS 1.2 ciphers,
key-exchange groups; Mozilla intermediate by default), and per-certificate contexts
loaded from memory (memfd), each knowing the names its certificate covers, and what
OpenSSL does per handshake beyond Python's ssl API (groups, no chain building, no
session cache). Never writes a key to disk, never logs or puts key material into an
error; holds no state between calls (but the libssl handle that sets these).
"""

from __future__ import annotations

import _ssl
import ctypes
import os
import ssl
from collections.abc import Callable, Iterable
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from proxy.config import DEFAULT_GROUPS, TLS12_CIPHERS
from proxy.errors import BundleError
from proxy.names import NameSet

__all__ = ["TLS12_CIPHERS", "AlertingSSLObject", "CertContext", "TlsSettings", "alert_sink",
           "base_context", "cached_sessions", "openssl_conf_path", "server_context",
           "set_groups"]

@dataclass(frozen=True, slots=True)
class TlsSettings:
    """Listener-wide TLS policy, identical for the base and every per-certificate context
    (config `tls.*`)."""

    num_tickets: int = 2
    # Offered in this order (ours is the server's preference): the HTTPS listener
    # offers `tls.alpn` (h2, http/1.1); the admin listener speaks HTTP/1.1 only.
    alpn: tuple[str, ...] = ("http/1.1",)
    min_version: ssl.TLSVersion = ssl.TLSVersion.TLSv1_2
    max_version: ssl.TLSVersion = ssl.TLSVersion.TLSv1_3
    ciphers: str = TLS12_CIPHERS
    groups: tuple[str, ...] = DEFAULT_GROUPS


class _Groups:
    """SSL_CTX_set1_groups_list on a Python SSLContext, through ctypes.

    Python 3.11 has no API for key-exchange groups (set_ecdh_curve sets one curve),
    and OPENSSL_CONF (our openssl.cnf) is read once per process, before `ssl` is
    imported, for every context alike: it cannot follow the config or a reload. So
    each listener context gets its groups here from the libssl Python's `_ssl` is
    linked with, on the SSL_CTX the context wraps (CPython's PySSLContext starts with
    that pointer, right after the object header). The pointer is checked once, by
    reading the context's options through OpenSSL and comparing them with Python's
    view: a layout that ever differs fails loudly instead of writing anywhere.
    """

    _SET_GROUPS_LIST = 92  # SSL_CTRL_SET_GROUPS_LIST: SSL_CTX_set1_groups_list is a macro

    def __init__(self) -> None:
        lib = ctypes.CDLL(_ssl.__file__)  # dlsym also searches its libssl
        self._ctrl = lib.SSL_CTX_ctrl
        self._ctrl.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_char_p]
        self._ctrl.restype = ctypes.c_long
        options = lib.SSL_CTX_get_options
        options.argtypes = [ctypes.c_void_p]
        options.restype = ctypes.c_uint64
        probe = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        probe.options |= ssl.OP_NO_TICKET  # a value the default options do not have
        if options(self._pointer(probe)) != int(probe.options):
            raise RuntimeError("cannot reach OpenSSL's SSL_CTX behind ssl.SSLContext in "
                               "this Python build: tls.groups cannot be applied")

    @staticmethod
    def _pointer(ctx: ssl.SSLContext) -> int | None:
        return ctypes.c_void_p.from_address(id(ctx) + object.__basicsize__).value

    def set(self, ctx: ssl.SSLContext, groups: tuple[str, ...]) -> None:
        if self._ctrl(self._pointer(ctx), self._SET_GROUPS_LIST, 0,
                      ":".join(groups).encode()) != 1:
            raise ValueError(f"OpenSSL refused the key-exchange groups {', '.join(groups)}")

    def ctrl(self, ctx: ssl.SSLContext, command: int, value: int) -> int:
        """SSL_CTX_ctrl(ctx, command, value, NULL): OpenSSL's answer."""
        return int(self._ctrl(self._pointer(ctx), command, value, None))


_groups: _Groups | None = None


def _libssl() -> _Groups:
    global _groups
    if _groups is None:
        _groups = _Groups()
    return _groups


def set_groups(ctx: ssl.SSLContext, groups: tuple[str, ...]) -> None:
    """Have `ctx` offer these key-exchange groups, preferred first. Raises ValueError
    for a group OpenSSL does not know."""
    _libssl().set(ctx, groups)


# SSL_CTX_ctrl commands and values (ssl.h): Python's ssl has no API for these.
_CTRL_SESS_NUMBER = 20
_CTRL_MODE = 33  # SSL_CTX_set_mode (ORs the bits in)
_CTRL_SET_SESS_CACHE_MODE = 44
_MODE_NO_AUTO_CHAIN = 0x8
_SESS_CACHE_SERVER = 0x2
_SESS_CACHE_NO_INTERNAL_STORE = 0x200


def cached_sessions(ctx: ssl.SSLContext) -> int:
    """How many TLS sessions OpenSSL holds in `ctx`'s session cache."""
    return _libssl().ctrl(ctx, _CTRL_SESS_NUMBER, 0)


def _lean_handshakes(ctx: ssl.SSLContext) -> None:
    """What a full handshake does not need to do, as nginx does it.

    No automatic chain building: a certificate stored without intermediates was
    otherwise verified against the context's (empty) trust store on every handshake
    to look for some; the chain we loaded is sent as it is.

    No server-side session cache (nginx's default `ssl_session_cache none`: session
    IDs are handed out, nothing is kept): OpenSSL kept the session of every TLS 1.2
    full handshake from a client without tickets, up to 20,480 of them in worker
    memory, for resumption by session ID. TLS 1.2 clients resume with tickets, which
    need no server memory; TLS 1.3 tickets (`tls.session_tickets`) are stateless too.
    The session cache is the one of the context a connection starts with (the base
    context, whichever certificate the SNI callback picks).
    """
    lib = _libssl()
    lib.ctrl(ctx, _CTRL_MODE, _MODE_NO_AUTO_CHAIN)
    lib.ctrl(ctx, _CTRL_SET_SESS_CACHE_MODE,
             _SESS_CACHE_SERVER | _SESS_CACHE_NO_INTERNAL_STORE)


class CertContext(ssl.SSLContext):
    """A context serving one certificate, carrying the names that certificate covers.

    A connection keeps the context its SNI callback chose (`ssl_object.context`) for
    its whole life, so the names travel with it: which Host names the connection may
    serve is answered from the certificate it presented, even after the table moved
    on to another one (replaced, removed, expired) or the context left the LRU.
    """

    __slots__ = ("names",)
    names: NameSet


# Who sends the alert of a handshake that fails (AlertingSSLObject): the listener
# sets it around the one synchronous call that makes a connection's TLS object, which
# keeps it (the handshake itself runs later, in the loop's TLS protocol).
alert_sink: ContextVar[Callable[[bytes], object] | None] = ContextVar("alert_sink",
                                                                      default=None)


class AlertingSSLObject(ssl.SSLObject):
    """The TLS object of every listener connection: hands the alert of a failed
    handshake to `alert_to` (`alert_sink` when it was made) before the error goes up.

    OpenSSL queues the alert (protocol_version, handshake_failure, unrecognized_name,
    ...) in the outgoing buffer and fails the handshake; uvloop then closes the
    socket without writing that buffer, and the client saw a bare EOF. A handshake
    that succeeds costs ~1 us more per connection (measured): keeping the buffer
    here, and the `try` around the same one call.
    """

    _outgoing: ssl.MemoryBIO
    alert_to: Callable[[bytes], object] | None

    @classmethod
    def _create(cls, incoming: ssl.MemoryBIO, outgoing: ssl.MemoryBIO,
                *args: Any, **kwargs: Any) -> AlertingSSLObject:
        # ssl.SSLContext.wrap_bio's one constructor; the outgoing buffer is not
        # reachable from the object it builds.
        self: AlertingSSLObject = super()._create(  # type: ignore[misc]
            incoming, outgoing, *args, **kwargs)
        self._outgoing = outgoing
        self.alert_to = alert_sink.get()
        # The calls the TLS protocol makes per read and write (it binds them once),
        # straight to the C object: ssl.SSLObject's read/write/pending only forward
        # the same arguments, a Python frame each (2 to 3 per request).
        sslobj = self._sslobj  # type: ignore[attr-defined]
        self.read = sslobj.read  # type: ignore[method-assign]
        self.write = sslobj.write  # type: ignore[method-assign]
        self.pending = sslobj.pending  # type: ignore[method-assign]
        return self

    def do_handshake(self) -> None:
        try:
            # What ssl.SSLObject.do_handshake does, not a call to it: no extra frame.
            self._sslobj.do_handshake()  # type: ignore[attr-defined]
        except ssl.SSLWantReadError:
            raise
        except ssl.SSLError:
            sink = self.alert_to
            if sink is not None:
                pending = self._outgoing.read()
                if pending:
                    sink(pending)
            raise


def base_context(settings: TlsSettings) -> ssl.SSLContext:
    """A server context with our policy and no certificate.

    The listener starts with it; the SNI callback swaps in a per-certificate one.
    Its connections' TLS objects are AlertingSSLObjects.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _apply_policy(ctx, settings)
    ctx.sslobject_class = AlertingSSLObject
    return ctx


def _apply_policy(ctx: ssl.SSLContext, settings: TlsSettings) -> None:
    ctx.minimum_version = settings.min_version
    ctx.maximum_version = settings.max_version
    ctx.set_ciphers(settings.ciphers)
    set_groups(ctx, settings.groups)
    # The client picks the cipher (Mozilla intermediate): it then chooses
    # AES-128-GCM, measured ~16 us cheaper per handshake than our preference.
    ctx.options &= ~ssl.OP_CIPHER_SERVER_PREFERENCE
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    if settings.alpn:
        ctx.set_alpn_protocols(list(settings.alpn))
    ctx.num_tickets = settings.num_tickets
    _lean_handshakes(ctx)


def server_context(chain_pem: bytes, key_pem: bytes, settings: TlsSettings,
                   names: Iterable[str] = ()) -> CertContext:
    """A context serving one certificate, loaded through an anonymous memfd. `names`
    are the certificate's (CertBundle.names): the data plane's 421 check reads them
    (a context built without them covers no name).

    The key and chain go into one memory-only file read via /proc/self/fd/N (about
    25 us more than a disk file, and nothing ever reaches a disk). Raises
    BundleError without quoting key material.
    """
    ctx = CertContext(ssl.PROTOCOL_TLS_SERVER)
    _apply_policy(ctx, settings)
    ctx.names = NameSet(names)
    fd = os.memfd_create("tlsedge-cert", os.MFD_CLOEXEC)
    try:
        os.write(fd, key_pem)
        if not key_pem.endswith(b"\n"):
            os.write(fd, b"\n")
        os.write(fd, chain_pem)
        # OpenSSL skips the key block when reading certificates (and vice versa),
        # so one file holds both.
        ctx.load_cert_chain(f"/proc/self/fd/{fd}")
    except ssl.SSLError as exc:
        raise BundleError(f"OpenSSL refused the certificate or key ({exc.reason or 'unknown'})"
                          ) from None
    except OSError as exc:
        raise BundleError(f"could not load the certificate into OpenSSL ({exc.strerror})"
                          ) from None
    finally:
        os.close(fd)
    return ctx


def openssl_conf_path() -> str:
    """Path of the packaged openssl.cnf (groups X25519:P-256:P-384, TLS 1.2 minimum).

    Only effective when OPENSSL_CONF points at it before `ssl` is first imported.
    """
    return str(Path(__file__).with_name("openssl.cnf"))
