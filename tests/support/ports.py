"""Ephemeral loopback ports for tests that run in parallel."""

from __future__ import annotations

import socket

__all__ = ["free_port"]


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    """Return a port on 127.0.0.1 that was free a moment ago (bind to port 0, then close).

    There is a small window in which another process may take it; callers that can
    bind to port 0 themselves and read the port back should do that instead.
    """
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port
