"""Closing a client connection at shutdown without waiting on the client: shared by the
HTTP/1.1 and HTTP/2 sessions."""

from __future__ import annotations

import asyncio


def release(transport: asyncio.Transport | None, tcp: asyncio.Transport | None) -> None:
    """Polled after a session's `drain`: once the TLS side is closing with every byte
    of ours handed down (its close_notify too), close the TCP connection instead of
    waiting for the client's close_notify. A client may never send one (an idle
    keep-alive client that does not read), and the TLS transport would hold the
    connection for its shutdown timeout (uvloop: 30 s). The TCP close still sends what
    it holds, then FIN: the last response arrives whole.
    """
    if (transport is not None and tcp is not None and transport.is_closing()
            and not transport.get_write_buffer_size()):
        tcp.close()
