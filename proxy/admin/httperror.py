"""HttpError: a request the admin listener refuses, with its status and one line saying
why. The API answers it as JSON and the dashboard as a page (proxy.admin.api)."""

from __future__ import annotations


class HttpError(Exception):
    """A request that cannot be served: answered with `status`, `message` and `headers`."""

    def __init__(self, status: int, message: str, *,
                 headers: list[tuple[str, str]] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or []
