"""A recording HTTP/1.1 backend for tests: every request it sees is kept.

Answers with JSON describing the request (method, path, headers, body length and
sha256, which backend answered), echoes bodies on /echo, gives any status on
/status/<code>, a chunked body on /chunked and answers late on /slow[?seconds].
Keep-alive capable (HTTP/1.1); runs in a thread. Each request records the client
port it came on, so tests can count the TCP connections the edge opened.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
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


class Backend:
    def __init__(self, name: str = "b1") -> None:
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
                    body = b""
                    while True:
                        size = int(self.rfile.readline().split(b";")[0], 16)
                        if size == 0:
                            self.rfile.readline()
                            break
                        body += self.rfile.read(size)
                        self.rfile.readline()
                else:
                    body = self.rfile.read(int(length)) if length else b""
                with backend._lock:
                    backend.seen.append(Seen(self.command, self.path,
                                             list(self.headers.items()), body,
                                             self.client_address[1]))
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

            do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = do_PATCH = _handle

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
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
