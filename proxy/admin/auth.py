"""Who may use the admin listener: the bearer token file, dashboard sessions with their
CSRF tokens, and the limit on failed logins per client address.

Everything here lives in the supervisor's memory (one per node): a restart logs every
dashboard user out. The token is compared in constant time and never logged.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass

from aiohttp import web

from proxy.admin.httperror import HttpError
from proxy.atomicfile import write_atomic
from proxy.errors import ConfigError
from proxy.names import unmapped_ip

log = logging.getLogger("tlsedge.admin")

SESSION_COOKIE = "tlsedge_session"
LOGIN_COOKIE = "tlsedge_login"
MIN_TOKEN_LENGTH = 16


def load_or_create_token(path: str) -> tuple[str, bool]:
    """(the admin token from `path`, whether it was just created): a new random token
    is written (0600) when the file is absent.

    Refuses a file other users can read or write, like ssh does for its keys.
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        token = secrets.token_urlsafe(32)
        try:
            write_atomic(path, (token + "\n").encode(), mode=0o600)
        except OSError as exc:
            raise ConfigError(f"admin.token_file: cannot create {path}: {exc.strerror}"
                              ) from None
        return token, True
    if st.st_mode & 0o077:
        raise ConfigError(f"admin.token_file: {path} is accessible by other users "
                          f"(mode {st.st_mode & 0o777:04o}); run chmod 600 on it")
    try:
        with open(path, encoding="utf-8") as f:
            token = f.read(4096).strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"admin.token_file: cannot read {path}: {exc}") from None
    if len(token) < MIN_TOKEN_LENGTH or any(c.isspace() for c in token):
        raise ConfigError(f"admin.token_file: {path} must hold one token of at least "
                          f"{MIN_TOKEN_LENGTH} characters without spaces")
    return token, False


def client_address(request: web.BaseRequest) -> str:
    """The peer's address: what the login limit counts (never a forwarded header), as
    the data plane's limits know it (an IPv4 client of a dual-stack listener by its
    IPv4 address)."""
    return unmapped_ip(request.remote) if request.remote else "-"


@dataclass(slots=True)
class Session:
    id: str
    csrf: str
    expires: float

    def csrf_ok(self, presented: str) -> bool:
        return hmac.compare_digest(presented.encode(), self.csrf.encode())


class Sessions:
    """Dashboard sessions by cookie value; bounded (the oldest is dropped first)."""

    def __init__(self, ttl: float, *, limit: int = 1000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl = ttl
        self.limit = limit
        self.clock = clock
        self._by_id: OrderedDict[str, Session] = OrderedDict()

    def create(self) -> Session:
        session = Session(secrets.token_urlsafe(32), secrets.token_urlsafe(32),
                          self.clock() + self.ttl)
        self._by_id[session.id] = session
        while len(self._by_id) > self.limit:
            self._by_id.popitem(last=False)
        return session

    def get(self, session_id: str) -> Session | None:
        session = self._by_id.get(session_id)
        if session is not None and session.expires <= self.clock():
            del self._by_id[session_id]
            return None
        return session

    def drop(self, session_id: str) -> None:
        self._by_id.pop(session_id, None)


class LoginLimiter:
    """At most `attempts` failed logins per client address in a sliding `window`.

    Counts failures only, and limits only them: the right token always gets in, so
    a process guessing from the operator's address cannot lock the operator out. The
    table of addresses is bounded, so a flood of sources cannot grow it.
    """

    def __init__(self, attempts: int = 5, window: float = 60.0, *, max_clients: int = 10_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.attempts = attempts
        self.window = window
        self.max_clients = max_clients
        self.clock = clock
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()

    def retry_after(self, client: str) -> float:
        """Seconds until `client` may try again; 0 when it may now."""
        failures = self._failures.get(client)
        if failures is None:
            return 0.0
        now = self.clock()
        while failures and failures[0] <= now - self.window:
            failures.popleft()
        if len(failures) < self.attempts:
            return 0.0
        return max(0.0, failures[0] + self.window - now)

    def failed(self, client: str) -> None:
        failures = self._failures.setdefault(client, deque(maxlen=self.attempts))
        failures.append(self.clock())
        self._failures.move_to_end(client)
        while len(self._failures) > self.max_clients:
            self._failures.popitem(last=False)


class Auth:
    """The token check plus the sessions and the login limiter of one admin listener."""

    def __init__(self, token: str, *, session_ttl: float) -> None:
        self._digest = hashlib.sha256(token.encode()).digest()
        self.sessions = Sessions(session_ttl)
        self.limiter = LoginLimiter()

    def token_ok(self, presented: str) -> bool:
        # Compare digests: equal lengths, so the time taken says nothing about the token.
        return hmac.compare_digest(hashlib.sha256(presented.encode()).digest(), self._digest)

    def check_token(self, client: str, presented: str) -> None:
        """Accept the right token, whatever came before from `client`; else 401, or 429
        once `client` has too many recent failures.

        The token is compared first, in constant time: the answer to a wrong token
        (401 or 429) says nothing about it. A wrong token while limited still counts,
        so an address that keeps guessing stays limited.
        """
        if self.token_ok(presented):
            return
        wait = self.limiter.retry_after(client)
        self.limiter.failed(client)
        if wait > 0:
            seconds = int(wait) + 1
            raise HttpError(429, f"too many failed logins from {client}; try again in "
                            f"{seconds} s", headers=[("Retry-After", str(seconds))])
        log.warning("admin: wrong token from %s", client)  # not per 429: a flood stays quiet
        raise HttpError(401, "wrong admin token")

    def authenticate(self, request: web.BaseRequest) -> Session | None:
        """The request's dashboard session, or None for a valid bearer token; else 401."""
        header = request.headers.get("Authorization", "")
        if header:
            scheme, _, presented = header.partition(" ")
            if scheme.lower() != "bearer" or not presented.strip():
                raise HttpError(401, "use Authorization: Bearer <token>")
            self.check_token(client_address(request), presented.strip())
            return None
        session = self.sessions.get(request.cookies.get(SESSION_COOKIE, ""))
        if session is None:
            raise HttpError(401, "log in, or send Authorization: Bearer <token>")
        return session
