"""A recording HTTP/1.1 backend for tests: every request it sees is kept.

Answers with JSON describing the request (method, path, headers, body length and
sha256, which backend answered), echoes bodies on /echo, gives any status on
/status/<code>, a chunked body on /chunked and answers late on /slow[?seconds].
Also: /bytes/<n> and /bytes-chunked/<n> (n deterministic bytes, fixed-length or
chunked; a request header `X-Response-Header: Name: value` adds that header),
/sse?<n> (n server-sent events, 100 ms apart, close-delimited) and a WebSocket echo
on /ws (RFC 6455 framing).
Keep-alive capable (HTTP/1.1); runs in a thread. Each request records the client
port it came on, so tests can count the TCP connections the edge opened.
"""

from __future__ import annotations

import base64
import hashlib
import json
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Seen:
    method: str
    path: str
    headers: list[tuple[str, str]]
    body: bytes = field(repr=False)
    client_port: int = 0

    def header(self, name: str) -> str | None:
        for k, v in self.headers:
            if k.lower() == name.lower():
                return v
        return None

    def header_names(self) -> set[str]:
        return {k.lower() for k, _ in self.headers}


def pattern(n: int) -> bytes:
    """n deterministic, non-repeating-looking bytes (for byte-exact relay checks)."""
    block = hashlib.sha256(str(n).encode()).digest() * 2048  # 64 KiB
    return (block * (n // len(block) + 1))[:n]


def ws_frame(payload: bytes, opcode: int = 1, mask: bytes | None = None) -> bytes:
    """One final RFC 6455 frame; masked when `mask` (4 bytes) is given (client side)."""
    n = len(payload)
    head = bytes([0x80 | opcode])
    bit = 0x80 if mask else 0
    if n < 126:
        head += bytes([bit | n])
    elif n < 65536:
        head += bytes([bit | 126]) + struct.pack("!H", n)
    else:
        head += bytes([bit | 127]) + struct.pack("!Q", n)
    if mask:
        payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        head += mask
    return head + payload


def ws_read(read: Callable[[int], bytes]) -> tuple[int, bytes]:
    """(opcode, payload) of one frame read with `read(n)` (exactly n bytes)."""
    b0, b1 = read(2)
    n = b1 & 0x7F
    if n == 126:
        n = struct.unpack("!H", read(2))[0]
    elif n == 127:
        n = struct.unpack("!Q", read(8))[0]
    mask = read(4) if b1 & 0x80 else b""
    data = read(n)
    if mask:
        data = bytes(b ^ mask[i % 4] for i, b in enumerate(data))
    return b0 & 0x0F, data


class _Server(ThreadingHTTPServer):
    # socketserver's listen backlog is 5: a burst of new connections from the edge
    # (100 HTTP/2 streams at once) would overflow it and be reset.
    request_queue_size = 256


class Backend:
    def __init__(self, name: str = "b1", port: int = 0) -> None:
        self.name = name
        self.seen: list[Seen] = []
        self.chunks = [b"first chunk\n", b"x" * 70_000, b"", b"last chunk\n"]
        self._lock = threading.Lock()
        backend = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _handle(self) -> None:
                length = self.headers.get("Content-Length")
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    parts = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0], 16)
                        if size == 0:
                            self.rfile.readline()
                            break
                        parts.append(self.rfile.read(size))
                        self.rfile.readline()
                    body = b"".join(parts)
                else:
                    body = self.rfile.read(int(length)) if length else b""
                with backend._lock:
                    backend.seen.append(Seen(self.command, self.path,
                                             list(self.headers.items()), body,
                                             self.client_address[1]))
                if self.path.startswith("/ws") and self.headers.get("Upgrade", "").lower() \
                        == "websocket":
                    self._websocket()
                    return
                if self.path.startswith("/sse"):
                    _, _, n = self.path.partition("?")
                    self.send_response(200)
                    self.send_header("Content-Type", "text/event-stream")
                    self.send_header("Connection", "close")
                    self.end_headers()
                    for i in range(int(n or "5")):
                        self.wfile.write(f"data: event {i}\n\n".encode())
                        self.wfile.flush()
                        time.sleep(0.1)
                    self.close_connection = True
                    return
                if self.path.startswith("/bytes"):
                    n = int(self.path.rsplit("/", 1)[1])
                    out = pattern(n)
                    self.send_response(200)
                    self.send_header("Content-Type", "application/octet-stream")
                    extra = self.headers.get("X-Response-Header")
                    if extra:
                        self.send_header(*(p.strip() for p in extra.split(":", 1)))
                    if self.path.startswith("/bytes-chunked/"):
                        self.send_header("Transfer-Encoding", "chunked")
                        self.end_headers()
                        for i in range(0, n, 100_000):
                            piece = out[i:i + 100_000]
                            self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                        self.wfile.write(b"0\r\n\r\n")
                    else:
                        self.send_header("Content-Length", str(n))
                        self.end_headers()
                        self.wfile.write(out)
                    return
                if self.path.startswith("/slow"):
                    _, _, seconds = self.path.partition("?")
                    time.sleep(float(seconds or "1"))
                if self.path.startswith("/chunked"):
                    self.send_response(200)
                    self.send_header("Content-Type", "application/octet-stream")
                    self.send_header("Transfer-Encoding", "chunked")
                    self.end_headers()
                    for chunk in backend.chunks:
                        if chunk:  # an empty chunk would end the body early
                            self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                            self.wfile.flush()
                    self.wfile.write(b"0\r\n\r\n")
                    return
                if self.path.startswith("/status/"):
                    code = int(self.path.split("/")[2])
                    out = b"" if code in (204, 304) else f"status {code}\n".encode()
                    self.send_response(code)
                    if code not in (204, 304):
                        self.send_header("Content-Length", str(len(out)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(out)
                    return
                if self.path.startswith("/echo"):
                    out = body
                    ctype = "application/octet-stream"
                else:
                    out = json.dumps({
                        "backend": backend.name, "method": self.command, "path": self.path,
                        "headers": dict(self.headers.items()), "body_length": len(body),
                        "body_sha256": hashlib.sha256(body).hexdigest(),
                    }).encode()
                    ctype = "application/json"
                self.send_response(200)
                self.send_header("Content-Type", ctype)
                self.send_header("X-Backend", backend.name)
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(out)

            def _websocket(self) -> None:
                key = self.headers["Sec-WebSocket-Key"]
                accept = base64.b64encode(hashlib.sha1(
                    (key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest())
                self.send_response(101)
                self.send_header("Upgrade", "websocket")
                self.send_header("Connection", "Upgrade")
                self.send_header("Sec-WebSocket-Accept", accept.decode())
                self.end_headers()
                self.wfile.flush()
                self.close_connection = True
                while True:
                    try:
                        opcode, data = ws_read(self.rfile.read)
                    except (ValueError, OSError):
                        return
                    if opcode == 8:
                        self.wfile.write(ws_frame(data, 8))
                        return
                    self.wfile.write(ws_frame(data, opcode))
                    self.wfile.flush()

            do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = do_PATCH = _handle

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = _Server(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.address = f"127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def connections(self, seen: list[Seen] | None = None) -> set[int]:
        """Client ports (one per TCP connection from the edge) of `seen` or of all."""
        with self._lock:
            return {s.client_port for s in (self.seen if seen is None else seen)}

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
