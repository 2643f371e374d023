"""Error pages the edge answers itself: short, with the request id, nothing internal.

Never includes a backend address, a traceback or anything the client sent.
"""

from __future__ import annotations

import html
from http import HTTPStatus

_TEMPLATE = (
    "<!doctype html><html><head><meta charset=\"utf-8\"><title>{code} {phrase}</title>"
    "</head><body><h1>{code} {phrase}</h1><p>{text}</p><p><small>request id: {rid}"
    "</small></p></body></html>\n"
)
_TEXT = {
    400: "The request could not be understood.",
    404: "No application is configured for this domain.",
    408: "The request took too long to arrive.",
    413: "The request body is too large.",
    421: "This certificate does not cover the requested domain.",
    429: "Too many requests from your address; try again in a moment.",
    431: "The request headers are too large.",
    501: "This kind of request is not supported.",
    502: "The application did not answer correctly.",
    503: "The application is not available right now.",
    504: "The application took too long to answer.",
}


def error_body(status: int, request_id: str) -> bytes:
    """The HTML of an error page, whatever the protocol that carries it."""
    phrase = HTTPStatus(status).phrase
    return _TEMPLATE.format(code=status, phrase=phrase, text=_TEXT.get(status, phrase),
                            rid=request_id).encode()


def redirect_body(location: str, status: int = 301) -> bytes:
    """The HTML of a redirect, whatever the protocol that carries it."""
    return f"<a href=\"{html.escape(location)}\">{HTTPStatus(status).phrase}</a>\n".encode()


def error(status: int, request_id: str, *, keep_alive: bool,
          head_only: bool = False) -> tuple[bytes, bytes]:
    """(head, body) of an HTTP/1.1 error response; the body is empty for HEAD."""
    phrase = HTTPStatus(status).phrase
    body = error_body(status, request_id)
    head = (
        f"HTTP/1.1 {status} {phrase}\r\n"
        "content-type: text/html; charset=utf-8\r\n"
        f"content-length: {len(body)}\r\n"
        f"x-request-id: {request_id}\r\n"
        "cache-control: no-store\r\n"
        f"connection: {'keep-alive' if keep_alive else 'close'}\r\n\r\n"
    ).encode()
    return head, b"" if head_only else body


def redirect(location: str, *, status: int = 301, keep_alive: bool = True,
             extra: str = "", head_only: bool = False) -> bytes:
    """A complete HTTP/1.1 redirect response (without its body for HEAD)."""
    phrase = HTTPStatus(status).phrase
    body = redirect_body(location, status)
    return (
        f"HTTP/1.1 {status} {phrase}\r\n"
        f"location: {location}\r\n"
        "content-type: text/html; charset=utf-8\r\n"
        f"content-length: {len(body)}\r\n{extra}"
        f"connection: {'keep-alive' if keep_alive else 'close'}\r\n\r\n"
    ).encode() + (b"" if head_only else body)
