"""A tiny threaded HTTP-01 responder: a stand-in for the proxy's port-80 listener.

Only for smoke tests of the test infrastructure; lifecycle tests use the proxy itself.
"""

from __future__ import annotations

import collections
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType

__all__ = ["CHALLENGE_PREFIX", "HTTP01Responder"]

CHALLENGE_PREFIX = "/.well-known/acme-challenge/"


class HTTP01Responder:
    """Serves `/.well-known/acme-challenge/<token>` from a dict on 127.0.0.1:`port`."""

    def __init__(self, port: int = 0) -> None:
        """Prepare the server; `port` 0 picks an ephemeral one (read `.port` after start)."""
        self._requested_port = port
        self._tokens: dict[str, str] = {}
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.requests: collections.deque[tuple[str, str, int]] = collections.deque(maxlen=10_000)
        """Recent requests as (Host header, path, status), oldest first."""

    def set(self, token: str, key_authorization: str) -> None:
        """Publish `key_authorization` at the token's URL."""
        with self._lock:
            self._tokens[token] = key_authorization

    def remove(self, token: str) -> None:
        """Stop answering for `token` (404 from now on)."""
        with self._lock:
            self._tokens.pop(token, None)

    def clear(self) -> None:
        """Forget every token."""
        with self._lock:
            self._tokens.clear()

    def _lookup(self, path: str) -> str | None:
        if not path.startswith(CHALLENGE_PREFIX):
            return None
        with self._lock:
            return self._tokens.get(path[len(CHALLENGE_PREFIX):])

    @property
    def port(self) -> int:
        """The port the server listens on."""
        if self._server is None:
            raise RuntimeError("HTTP01Responder is not started")
        port: int = self._server.server_address[1]
        return port

    def start(self) -> HTTP01Responder:
        """Bind and serve in a background thread."""
        if self._server is not None:
            return self
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = owner._lookup(self.path)
                status = 404 if body is None else 200
                owner.requests.append((self.headers.get("Host", ""), self.path, status))
                data = (body or "not found").encode()
                self.send_response(status)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: object) -> None:
                return

        server = ThreadingHTTPServer(("127.0.0.1", self._requested_port), Handler)
        server.daemon_threads = True
        server.block_on_close = False
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05},
            name="http01", daemon=True,
        )
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop serving and release the port."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=2)
            self._thread = None

    def __enter__(self) -> HTTP01Responder:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
