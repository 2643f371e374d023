"""What the plain-HTTP listener answers itself, before any app sees a request: ACME
HTTP-01 challenges, from the worker's snapshot, else from the store (a token written
a moment ago may not have reached this worker yet).

Everything else on port 80 goes through the same HTTP/1.1 session and exchange as
HTTPS, with scheme "http": routing, the header policy, limits, the access log, 404
for an unknown host, and the redirect of an app with `force_https` (exchange). This
module never proxies and reads the store only through the lookup the composition
root wires (`Live.challenge_fallback`).
"""

from __future__ import annotations

import enum
import re
from typing import TYPE_CHECKING, Final

from proxy import metrics
from proxy.dataplane.state import Live

if TYPE_CHECKING:
    from proxy.dataplane.exchange import ClientSide, Request

CHALLENGE_PREFIX = b"/.well-known/acme-challenge/"
_TOKEN = re.compile(r"[A-Za-z0-9_-]{1,128}")  # ACME tokens are base64url (RFC 8555 8.3)


class Lookup(enum.Enum):
    """`challenge` has no answer in memory; an enum member, never a key authorization."""

    STORE = "ask the store"


ASK_STORE: Final = Lookup.STORE


def _token(url: bytes) -> str:
    return url[len(CHALLENGE_PREFIX):].decode("latin-1")


def challenge(live: Live, url: bytes) -> str | Lookup | None:
    """The key authorization for a challenge URL; None: unknown (404); ASK_STORE: a
    well-formed token not in this worker's snapshot, to look up (`from_store`)."""
    token = _token(url)
    answer = live.challenges.get(token)
    if answer is None and live.challenge_fallback is not None and _TOKEN.fullmatch(token):
        return ASK_STORE
    return answer


async def from_store(live: Live, url: bytes) -> str | None:
    fallback = live.challenge_fallback
    if fallback is None:
        return None
    try:
        return await fallback(_token(url))
    except Exception:  # the store is down: a miss, like any unknown token
        return None


def answer(session: ClientSide, req: Request, authorization: str) -> bool:
    """Send the key authorization (200, text/plain); whether the connection may go on."""
    metrics.CHALLENGES_SERVED.labels("hit").inc()
    body = authorization.encode()
    session.send_head(req, 200, b"OK", [(b"content-type", b"text/plain"),
                                        (b"content-length", b"%d" % len(body))], "length")
    if req.method != b"HEAD":
        session.send_body(body)
    session.end()
    return req.keep_alive and req.body.done


def missed() -> None:
    metrics.CHALLENGES_SERVED.labels("miss").inc()
