"""The dashboard's HTML: jinja2 templates (templates/, autoescape on) and the words they
show — expiry in days, statuses, the CA's errors in words a person can act on.

Escaping is structural: every value reaches the markup through a template expression,
which autoescape escapes; nothing here builds markup from data. Scripts and styles
carry the per-response CSP nonce. The polling script (templates/admin.js) writes the
same words from the JSON API.
"""

from __future__ import annotations

import html
import re
import time
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple
from urllib.parse import urlencode

import jinja2
import markupsafe

from proxy.listing import Query
from proxy.registry import STATUS_LABELS, DomainView, expiry_words

SOURCE_LABELS = {"custom": "Custom", "letsencrypt": "Let's Encrypt", "platform": "Platform"}

# ACME problem types (RFC 8555 section 6.7, without the urn prefix) in words a person
# can act on; the raw error stays beside them ("CA's answer").
PROBLEM_WORDS = {
    "accountDoesNotExist": "The CA no longer knows this node's ACME account: a new one is "
                           "registered and the order is sent again by itself.",
    "badCSR": "The CA refused the certificate request: report it with the CA's answer.",
    "badNonce": "The CA asked for the request again (bad nonce): it is retried by itself.",
    "badPublicKey": "The CA refused the certificate's key type: set acme.key_type to ecdsa "
                    "or rsa and reload.",
    "badSignatureAlgorithm": "The CA refused the account key's signature: report it with "
                             "the CA's answer.",
    "caa": "The domain's CAA records do not allow Let's Encrypt: add a CAA record for "
           "letsencrypt.org (or remove them) at the domain's DNS provider.",
    "compound": "The CA refused the order for several reasons: see the CA's answer.",
    "connection": "The CA could not connect to the domain to check it: make sure its DNS "
                  "points at this platform and that port 80 is open.",
    "dns": "The CA could not find the domain in DNS: check that its A, AAAA or CNAME "
           "record exists and points at this platform.",
    "externalAccountRequired": "The CA requires an external account binding for new "
                               "accounts: set one up with the CA.",
    "incorrectResponse": "The CA got a wrong answer when checking the domain: its DNS "
                         "probably points at another server too; remove the other records.",
    "invalidContact": "The CA refused the contact address: fix acme.email and reload.",
    "malformed": "The CA refused the request as malformed: report it with the CA's answer.",
    "orderNotReady": "The CA was not ready to finish the order: it is retried by itself.",
    "rateLimited": "Let's Encrypt's rate limit for this domain was reached: the order is "
                   "retried by itself once the limit allows.",
    "rejectedIdentifier": "Let's Encrypt will not issue a certificate for this name: upload "
                          "your own certificate for it.",
    "serverInternal": "The CA had an internal error: the order is retried by itself.",
    "tls": "The CA's TLS connection to the domain failed while checking it: make sure its "
           "DNS points at this platform.",
    "unauthorized": "The CA's check of the domain failed (it could not read the challenge "
                    "answer): make sure the domain's DNS points only at this platform.",
    "unsupportedContact": "The CA refused the form of the contact address: set acme.email "
                          "to a plain e-mail address and reload.",
    "unsupportedIdentifier": "The CA cannot issue for this kind of name: upload your own "
                             "certificate for it.",
    "userActionRequired": "The CA needs a person to act (new terms of service?): see the "
                          "CA's answer for where.",
}
UNKNOWN_PROBLEM = "The CA refused the order: see the CA's answer."
_PROBLEM = re.compile(r"urn:ietf:params:acme:error:([A-Za-z]+)")


def date(ts: float) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(ts))


def expiry_text(expires_at: float | None, now: float) -> str:
    """What an Expires field says: '2025-03-01 · in 12 days', '… · expired 3 days ago'."""
    if expires_at is None:
        return "platform certificate"
    return f"{date(expires_at)} · {expiry_words(expires_at, now)}"


def until_text(until: float, now: float) -> str:
    """When a waiting order gets its turn: '2026-12-10 10:00:36 UTC · in 12 min'."""
    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(until))
    left = until - now
    if left <= 0:
        return f"{when} · now"
    if left < 3600:
        return f"{when} · in {max(1, round(left / 60))} min"
    if left < 2 * 86400:
        return f"{when} · in {round(left / 3600)} h"
    return f"{when} · in {round(left / 86400)} days"


def problem_words(error: str) -> str | None:
    """Words for the CA's problem named in `error` (the first concrete one of a
    compound); None when `error` names no ACME problem."""
    found = _PROBLEM.findall(error)
    if not found:
        return None
    kind = next((k for k in found if k != "compound"), found[0])
    return PROBLEM_WORDS.get(kind, UNKNOWN_PROBLEM)


class StatusLines(NamedTuple):
    text: str    # the line under the status: what is wrong, or what is going on
    detail: str  # what it means now (what is served, when the next try is)
    raw: str     # the CA's answer, when `text` put it in words


def status_lines(v: DomainView) -> StatusLines:
    if v.status != "error":
        return StatusLines(v.message, "", "")
    words = problem_words(v.last_error)
    text = words or v.last_error or v.message
    return StatusLines(text, "" if text == v.message else v.message,
                       v.last_error if words else "")


def _escaped(value: object) -> object:
    """Every plain string a template prints, escaped as html.escape does (`&quot;`,
    `&#x27;`), as the pages always were; Markup (macros, tojson) is already safe."""
    if isinstance(value, str) and not isinstance(value, markupsafe.Markup):
        return markupsafe.Markup(html.escape(value, quote=True))  # noqa: S704 (escaped here)
    return value


_env = jinja2.Environment(
    loader=jinja2.PackageLoader("proxy.admin", "templates"), autoescape=True,
    finalize=_escaped, undefined=jinja2.StrictUndefined, trim_blocks=True,
    lstrip_blocks=True)
_env.globals.update(expiry_text=expiry_text, until_text=until_text, date=date,
                    status_lines=status_lines,
                    source_labels=SOURCE_LABELS, problem_words_table=PROBLEM_WORDS,
                    unknown_problem=UNKNOWN_PROBLEM)


def _render(template: str, **context: Any) -> str:
    return _env.get_template(template).render(**context)


def login_page(*, nonce: str, login_csrf: str, error: str | None = None) -> str:
    return _render("login.html", nonce=nonce, login_csrf=login_csrf, error=error, csrf=None)


def domains_page(views: Iterable[DomainView], apps: Iterable[str], *, nonce: str, csrf: str,
                 now: float, error: str | None = None, ok: str | None = None,
                 query: Query | None = None, next_after: str | None = None,
                 counts: dict[str, int] | None = None, queued: int | None = None) -> str:
    """One page of domains (proxy/listing.py), with the search and filter that made it,
    a link to the next page, the node's counts by status when it keeps them, and the
    length of its order queue (None: it orders no certificate)."""
    query = query or Query()
    asked = {"prefix": query.prefix, "status": query.status or "", "app": query.app or ""}
    asked = {k: v for k, v in asked.items() if v}
    next_url = ("/domains?" + urlencode({**asked, "after": next_after})
                if next_after is not None else None)
    poll = "/api/v1/domains?" + urlencode({**asked, "after": query.after, "limit": query.limit})
    return _render("domains.html", views=list(views), apps=sorted(apps), nonce=nonce,
                   csrf=csrf, now=now, error=error, ok=ok, query=query, next_url=next_url,
                   poll_url=poll, counts=sorted((counts or {}).items()),
                   statuses=STATUS_LABELS, queued=queued)


class QueuePlace(NamedTuple):
    """Where a domain's order waits in this node's queue."""

    position: int  # from 1
    total: int
    why: str  # "waiting: account budget until 2026-12-10T10:00:36Z"
    until: float


def domain_page(v: DomainView, *, nonce: str, csrf: str, now: float,
                error: str | None = None, ok: str | None = None,
                queued: QueuePlace | None = None) -> str:
    return _render("domain.html", v=v, nonce=nonce, csrf=csrf, now=now, error=error, ok=ok,
                   queued=queued)


def queue_page(rows: Sequence[tuple[str, str, float]], *, first: int, total: int,
               prev_url: str | None, next_url: str | None, acme_on: bool, nonce: str,
               csrf: str, now: float) -> str:
    """One page of this node's order queue: (domain, why, until) from place `first` on."""
    numbered = [(first + i, name, why, until) for i, (name, why, until) in enumerate(rows)]
    return _render("queue.html", rows=numbered, total=total, prev_url=prev_url,
                   next_url=next_url, acme_on=acme_on, nonce=nonce, csrf=csrf, now=now)


def message_page(title: str, text: str, *, nonce: str, csrf: str | None = None) -> str:
    return _render("message.html", title=title, text=text, nonce=nonce, csrf=csrf)
