"""A raw HTTP/2 client for tests: h2's client connection (with validation off, so a test
can send what a well-behaved client never would) over a real TLS socket with ALPN h2,
plus hand-built frames (hyperframe) for what h2 refuses to send at all.

Reads are explicit (`pump`): a test decides when the client reads, and whether it
gives flow-control credit back (`auto_ack`), so it can play a client that stalls.
Frames are handed to h2 one at a time; after the server's GOAWAY (h2 then takes no
frame at all) they are read by hand, so a test sees the streams the server finishes.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.events
import h2.exceptions
from hyperframe.frame import DataFrame, Frame, HeadersFrame, RstStreamFrame

Headers = list[tuple[bytes, bytes]]


@dataclass
class Response:
    status: int = 0
    headers: Headers = field(default_factory=list)
    body: bytearray = field(default_factory=bytearray)
    ended: bool = False
    reset: int | None = None  # the RST_STREAM error code, when the server reset it
    trailers: Headers | None = None  # a HEADERS frame after the response's DATA

    def header(self, name: bytes) -> bytes | None:
        return next((v for n, v in self.headers if n == name), None)

    @property
    def finished(self) -> bool:
        return self.ended or self.reset is not None


class H2Client:
    """One HTTP/2 connection to the edge."""

    def __init__(self, port: int, server_name: str, *, timeout: float = 10.0,
                 window: int | None = None) -> None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        ctx.set_alpn_protocols(["h2", "http/1.1"])
        raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock = ctx.wrap_socket(raw, server_hostname=server_name)
        self.alpn = self.sock.selected_alpn_protocol()
        config = h2.config.H2Configuration(
            client_side=True, header_encoding=None, validate_outbound_headers=False,
            normalize_outbound_headers=False, validate_inbound_headers=False,
            normalize_inbound_headers=False)
        self.conn = h2.connection.H2Connection(config=config)
        self.conn.initiate_connection()
        if window is not None:
            self.conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: window})
        self.responses: dict[int, Response] = {}
        self.goaway: h2.events.ConnectionTerminated | None = None
        self.closed = False  # the server's EOF (or a reset) was read
        self.send_failed = False
        self.auto_ack = True  # give back stream and connection window as data arrives
        self.error: h2.exceptions.ProtocolError | None = None  # what h2 refused to read
        self._buf = bytearray()
        # Every frame the server sent: (type name, stream id, error code or None).
        self.frames: list[tuple[str, int, int | None]] = []
        self.flush()

    # -- sending ----------------------------------------------------------------------
    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            self.send_raw(data)

    def send_raw(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except OSError:
            # The server closed: what it sent before (its GOAWAY) is still to be read.
            self.send_failed = True

    def send_frames(self, frames: Iterable[Frame]) -> None:
        self.flush()
        self.send_raw(b"".join(f.serialize() for f in frames))

    def request(self, authority: str, path: str = "/", *, method: str = "GET",
                headers: Iterable[tuple[str, str]] = (), body: bytes | None = None,
                end: bool = True, raw: Headers | None = None) -> int:
        """Open a stream; `raw` replaces the whole header list (pseudo-headers too)."""
        sid = self.conn.get_next_available_stream_id()
        if raw is None:
            raw = [(b":method", method.encode()), (b":scheme", b"https"),
                   (b":authority", authority.encode()), (b":path", path.encode())]
            raw += [(k.encode(), v.encode()) for k, v in headers]
        self.responses[sid] = Response()
        self.conn.send_headers(sid, raw, end_stream=end and body is None)
        if body is not None:
            self.send_body(sid, body, end=end)
        self.flush()
        return sid

    def request_after_goaway(self, authority: str, path: str) -> int:
        """A new stream sent by hand (h2 refuses to send after a GOAWAY)."""
        sid = max(self.responses, default=-1) + 2
        block = self.conn.encoder.encode([
            (b":method", b"GET"), (b":scheme", b"https"),
            (b":authority", authority.encode()), (b":path", path.encode())])
        self.responses[sid] = Response()
        self.send_raw(HeadersFrame(sid, block, flags=["END_HEADERS", "END_STREAM"]).serialize())
        return sid

    def send_body(self, sid: int, body: bytes, *, end: bool = True,
                  timeout: float = 60.0) -> None:
        """Send `body` as the windows allow, reading the server's updates meanwhile."""
        view = memoryview(body)
        deadline = time.monotonic() + timeout
        while view:
            window = min(self.conn.local_flow_control_window(sid),
                         self.conn.max_outbound_frame_size)
            if window <= 0:
                if time.monotonic() > deadline or self.closed or self.send_failed:
                    raise TimeoutError("the server never opened its window")
                self.flush()
                self.pump(lambda: self.conn.local_flow_control_window(sid) > 0,
                          timeout=deadline - time.monotonic())
                continue
            piece, view = view[:window], view[window:]
            self.conn.send_data(sid, bytes(piece), end_stream=end and not view)
            self.flush()
        if end and not body:
            self.conn.end_stream(sid)
            self.flush()

    # -- receiving --------------------------------------------------------------------
    def pump(self, until: Callable[[], bool], timeout: float = 10.0) -> bool:
        """Read and handle frames until `until()` holds, the connection closes or the
        deadline passes; returns `until()`."""
        deadline = time.monotonic() + timeout
        while not until() and not self.closed and time.monotonic() < deadline:
            self.sock.settimeout(max(0.01, min(1.0, deadline - time.monotonic())))
            try:
                data = self.sock.recv(1 << 20)
            except (TimeoutError, ssl.SSLWantReadError):
                continue
            except OSError:
                self.closed = True
                break
            if not data:
                self.closed = True
                break
            self._feed(data)
            self.flush()
        return until()

    def _feed(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        while len(buf) >= 9:
            end = 9 + int.from_bytes(buf[:3], "big")
            if len(buf) < end:
                break
            frame = bytes(buf[:end])
            del buf[:end]
            self._note(frame)
            if self.goaway is not None:
                self._after_goaway(frame)
                continue
            if self.error is not None:
                continue
            try:
                events = self.conn.receive_data(frame)
            except h2.exceptions.ProtocolError as exc:
                self.error = exc
                continue
            for event in events:
                self._event(event)

    def _note(self, raw: bytes) -> None:
        frame, _ = Frame.parse_frame_header(memoryview(raw[:9]))
        frame.parse_body(memoryview(raw[9:]))
        code = getattr(frame, "error_code", None)
        self.frames.append((type(frame).__name__, frame.stream_id, code))

    def _after_goaway(self, raw: bytes) -> None:
        frame, _ = Frame.parse_frame_header(memoryview(raw[:9]))
        frame.parse_body(memoryview(raw[9:]))
        resp = self.responses.get(frame.stream_id)
        if resp is None:
            return
        if isinstance(frame, HeadersFrame):
            headers = self.conn.decoder.decode(frame.data, raw=True)
            resp.status = int(dict(headers)[b":status"])
            resp.headers = list(headers)
        elif isinstance(frame, DataFrame):
            resp.body += frame.data
        elif isinstance(frame, RstStreamFrame):
            resp.reset = frame.error_code
        if "END_STREAM" in frame.flags:
            resp.ended = True

    def _event(self, event: h2.events.Event) -> None:
        sid = getattr(event, "stream_id", None)
        resp = self.responses.get(sid) if sid else None
        if isinstance(event, h2.events.ResponseReceived) and resp is not None:
            resp.status = int(dict(event.headers or [])[b":status"])
            resp.headers = list(event.headers or [])
        elif isinstance(event, h2.events.TrailersReceived) and resp is not None:
            resp.trailers = list(event.headers or [])
        elif isinstance(event, h2.events.DataReceived):
            if resp is not None:
                resp.body += event.data or b""
            if self.auto_ack and event.flow_controlled_length:
                self.conn.acknowledge_received_data(event.flow_controlled_length,
                                                    event.stream_id or 0)
        elif isinstance(event, h2.events.StreamEnded) and resp is not None:
            resp.ended = True
        elif isinstance(event, h2.events.StreamReset) and resp is not None:
            resp.reset = int(event.error_code or 0)
        elif isinstance(event, h2.events.ConnectionTerminated):
            self.goaway = event

    def get(self, authority: str, path: str = "/", timeout: float = 10.0,
            **kw: object) -> Response:
        sid = self.request(authority, path, **kw)  # type: ignore[arg-type]
        self.pump(lambda: self.responses[sid].finished, timeout)
        return self.responses[sid]

    def wait_closed(self, timeout: float = 10.0) -> bool:
        """Read until the server closes the connection (GOAWAY, then EOF)."""
        return self.pump(lambda: False, timeout) or self.closed

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def __enter__(self) -> H2Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
