"""The HTTP/2 session of one client connection: many streams, each one `Exchange`.

Framing, HPACK and the stream state machine are the `h2` package's (hyper-h2); this
module owns what h2 leaves to its user: turning a request stream into the `Request`
an exchange relays to an HTTP/1.1 backend (and refusing a malformed one on its stream
only, RFC 9113 8.1.1), each stream's `ClientSide` (response head, body, end, reset),
flow control as backpressure both ways, the per-connection limits and the answers to
the known HTTP/2 attacks (rapid reset, CONTINUATION and control-frame floods, HPACK
bombs), the backend's chunked trailers for a client that sent `te: trailers`, the
connection's timers, and GOAWAY at shutdown. Routing, the backend and the response
policy are the exchange's. Never blocks, never touches the store.

Two of h2's connection errors are stream errors here (`_Connection`): a stream past
SETTINGS_MAX_CONCURRENT_STREAMS is refused, and a content-length its DATA contradicts
resets the stream (RFC 9113 5.1.2, 8.1.1); the other streams live on.

Reloads: workers live on across SIGHUP, and so do their connections. A connection keeps
what it negotiated: its certificate and names (the 421 rule), its SETTINGS; limits are
read afresh per request. The one reload that changes what an open HTTP/2 connection
negotiated is `tls.alpn` dropping h2: each open one then gets GOAWAY (`drain`, via
`Worker.alpn_changed`), its streams finish, and the client reconnects for the rest.

Cost: h2 is pure Python, so the session feeds it one `receive_data` per read and
writes what it produced once per read or backend read (`cork` / `uncork`), and starts
the streams of a read only after the whole read is parsed (a stream reset in the same
read never reaches a backend).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections import deque
from collections.abc import Callable
from itertools import chain
from operator import itemgetter
from typing import Any, cast

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
import hpack.hpack
import hpack.table
from h2.errors import ErrorCodes
from h2.settings import SettingCodes
from hyperframe.frame import DataFrame, GoAwayFrame, HeadersFrame

from proxy import metrics
from proxy.dataplane import checks, closing, pages
from proxy.dataplane.accesslog import AccessLog
from proxy.dataplane.checks import UNDERSCORE
from proxy.dataplane.clients import Clients
from proxy.dataplane.exchange import Client, Exchange, Request
from proxy.dataplane.state import Live
from proxy.dataplane.upstream import WRITE_HIGH, UpstreamPool

log = logging.getLogger("tlsedge.http")

# Flow control: the connection window we open at once, and each stream's (SETTINGS).
# A client that does not open its windows stalls only its streams; one that sends no
# more than the windows allow holds at most this much of ours per stream.
CONNECTION_WINDOW = 1024 * 1024
STREAM_WINDOW = 256 * 1024
# A stream's response bytes queued behind the client's window before its backend is
# paused (or spooled): bounds what a stream holds in memory.
_STREAM_HIGH = 64 * 1024
_STREAM_LOW = 16 * 1024
# The HPACK decoder stops at twice the header list we serve (64 KiB by default): a
# small block that would decode to more (an HPACK bomb) ends the connection with
# ENHANCE_YOUR_CALM; between the two, the stream gets 431 like HTTP/1.1.
_HPACK_FACTOR = 2
# Control frames (PING, SETTINGS, PRIORITY, empty DATA, unknown frames) a connection
# may send per window of _FLOOD_SECONDS before it is cut (CVE-2019-9512/9515/9518).
_FLOOD_FRAMES = 1000
_FLOOD_SECONDS = 10.0
# Seconds a connection cut with GOAWAY may take to flush before it is aborted.
_CUT_GRACE = 5.0


class _Silent(logging.Logger):
    """hpack logs every field it codes, values included (cookies, authorization), at
    DEBUG: ~20 calls per request, ~3 % of an HTTP/2 request's CPU with DEBUG off. A
    proxy never wants those lines; h2's own logger is its no-op default already."""

    def debug(self, *args: object, **kwargs: Any) -> None:
        return None


hpack.hpack.log = hpack.table.log = _Silent("hpack")

_CONFIG = h2.config.H2Configuration(
    client_side=False, header_encoding=None,
    # Requests are checked here: a malformed one is a stream error, where h2's own
    # checks would end the whole connection.
    validate_inbound_headers=False, normalize_inbound_headers=False,
    # Response headers are lower-cased and filtered by `_response_headers`.
    validate_outbound_headers=False, normalize_outbound_headers=False,
)
# Request fields that describe a connection (RFC 9113 8.2.2): a request carrying one
# is malformed. (`te` is allowed with the value `trailers` only.)
_CONNECTION_SPECIFIC = frozenset({b"connection", b"keep-alive", b"proxy-connection",
                                  b"transfer-encoding", b"upgrade"})
# A lower-case field name (RFC 9110 token): upper case is malformed in HTTP/2.
_FIELD_NAME = re.compile(rb"[!#$%&'*+\-.^_`|~0-9a-z]+")
# Over the values joined with "\n": a control byte, or whitespace at either end of a
# value (RFC 9113 8.2.1). A "\n" inside a value shows as one "\n" too many.
_BAD_VALUE = re.compile(rb"[\x00-\x08\x0b-\x1f\x7f]|\r|(?:^|\n)[ \t]|[ \t](?:\n|$)")
# Response headers HTTP/2 forbids (the backend's hop-by-hop ones are gone already).
_NOT_IN_H2 = frozenset({b"connection", b"keep-alive", b"proxy-connection",
                        b"transfer-encoding", b"upgrade", b"te"})
_PAGE_TYPE = (b"content-type", b"text/html; charset=utf-8")
_STATUS = {code: b"%d" % code for code in range(100, 600)}


class _Malformed(Exception):
    """The request stream breaks RFC 9113 8.1.1 / 8.2: reset it, forward nothing."""


class Stream:
    """One request stream: the `ClientSide` of its exchange."""

    __slots__ = ("body_paused", "client", "dirty", "end_sent", "ending", "exchange", "id",
                 "out", "out_size", "req", "reset", "session", "stop_body", "trailers",
                 "trailers_ok", "unacked", "write_paused")

    def __init__(self, session: H2Session, stream_id: int) -> None:
        self.session = session
        self.client = session.client
        self.id = stream_id
        self.req: Request | None = None
        self.exchange: Exchange | None = None
        # Response bytes waiting for the client's windows, and their size.
        self.out: deque[bytes] = deque()
        self.out_size = 0
        self.ending = False  # the response is complete once `out` is sent
        self.end_sent = False  # END_STREAM went out
        self.dirty = False  # in the session's list of streams to push at uncork
        self.reset = False  # reset (by either side): nothing more is sent
        # Answered before the client sent its whole body: RST_STREAM NO_ERROR after
        # END_STREAM tells it to stop (RFC 9113 8.1).
        self.stop_body = False
        self.write_paused = session.write_paused
        # Request bytes received but not handed back to the client's window (the
        # exchange paused the body).
        self.body_paused = False
        self.unacked = 0
        # The request said `te: trailers`: the backend's trailers are relayed (`trailers`,
        # a HEADERS frame with END_STREAM after the last DATA); else dropped.
        self.trailers_ok = False
        self.trailers: list[tuple[bytes, bytes]] | None = None

    # -- ClientSide ----------------------------------------------------------------
    def send_head(self, req: Request, status: int, reason: bytes,
                  headers: list[tuple[bytes, bytes]], framing: str) -> None:
        if self.reset:
            return
        if status == 101:  # never asked for on HTTP/2 (no upgrade, no extended CONNECT)
            self.abort()
            return
        self.session.send_headers(self, _response_headers(status, headers))

    def send_body(self, data: bytes) -> None:
        if self.reset or not data:
            return
        self.out.append(data)
        self.out_size += len(data)
        self.session.queue(self)

    def send_trailers(self, trailers: list[tuple[bytes, bytes]]) -> None:
        if self.trailers_ok and not self.reset and not self.ending:
            self.trailers = trailers

    def end(self) -> None:
        if self.reset or self.ending:
            return
        self.ending = True
        self.session.queue(self)

    def send_error(self, req: Request, status: int, request_id: str, why: str) -> bool:
        body = pages.error_body(status, request_id)
        self._page(req, status, [_PAGE_TYPE, (b"x-request-id", request_id.encode()),
                                 (b"cache-control", b"no-store")], body)
        return True

    def send_redirect(self, req: Request, location: str, status: int = 301) -> bool:
        self._page(req, status, [(b"location", location.encode("latin-1")), _PAGE_TYPE],
                   pages.redirect_body(location, status))
        return True

    def _page(self, req: Request, status: int, headers: list[tuple[bytes, bytes]],
              body: bytes) -> None:
        if self.reset:
            return
        headers.append((b"content-length", b"%d" % len(body)))
        self.session.send_headers(self, [(b":status", _STATUS[status]), *headers])
        if req.method != b"HEAD":
            self.send_body(body)
        self.end()

    def abort(self) -> None:
        self.session.reset_stream(self, ErrorCodes.INTERNAL_ERROR)

    def pause(self) -> None:
        self.body_paused = True

    def resume(self) -> None:
        if self.body_paused:
            self.body_paused = False
            unacked, self.unacked = self.unacked, 0
            if unacked and not self.reset:
                self.session.acknowledge(self.id, unacked)

    def done(self, exchange: Exchange, keep: bool) -> None:
        self.exchange = None
        self.session.stream_done(self, keep)

    def watch_by(self, delay: float, now: float) -> None:
        self.session.due_by(delay, now)

    def cork(self) -> None:
        self.session.corked += 1

    def uncork(self) -> None:
        self.session.uncork()


class H2Session(asyncio.Protocol):
    """One client connection (after TLS, ALPN h2) speaking HTTP/2 to us."""

    __slots__ = (  # noqa: RUF023 (grouped by lifetime, not sorted)
        # The connection's.
        "_draining", "_flood", "_flood_since", "_goaway_sent", "_idle_since", "_last_id",
        "_loop", "_on_lost", "_own_priority", "_progress_at", "_read_at", "_read_paused",
        "_resets", "_served", "_timer", "_timer_due", "client", "closed", "conn", "corked",
        "early", "live", "peer", "scheme", "tcp", "transport", "write_paused",
        # The streams': open ones, and those with output to move at the next uncork.
        "_dirty", "_starting", "streams",
    )

    def __init__(self, live: Live, pool: UpstreamPool, *, port: int, peer: str,
                 tls_version: str = "",
                 on_lost: Callable[[H2Session], None] | None = None,
                 access_log: AccessLog | None = None, clients: Clients | None = None) -> None:
        self.live = live
        self.client = Client(live, pool, scheme="https", port=port, peer=peer, protocol="h2",
                             tls_version=tls_version, access_log=access_log, clients=clients)
        self.peer = peer
        self.scheme = "https"
        self._on_lost = on_lost
        self._loop = self.client.loop
        self.transport: asyncio.Transport | None = None
        self.tcp: asyncio.Transport | None = None  # the acceptor sets it (see `release`)
        self.closed = False
        self.early: list[bytes] = []  # read before connection_made
        self.conn = _connection(live)
        self.corked = 0
        self.write_paused = False
        self._read_paused = False
        self._draining = False
        self._goaway_sent = False
        self._last_id = 0  # the highest stream id taken on (GOAWAY's last stream id)
        self._served = 0
        self._resets = 0  # streams reset by the client, or for its errors, unanswered
        self._flood = 0
        self._flood_since = 0.0
        self._idle_since = 0.0
        self._read_at = 0.0
        self._progress_at = 0.0  # the client last opened a window or took our bytes
        self._timer: asyncio.TimerHandle | None = None
        self._timer_due = 0.0
        self.streams: dict[int, Stream] = {}
        self._dirty: list[Stream] = []
        self._starting: list[Stream] = []
        # The priority a HEADERS frame carried (h2 reports it as a PriorityUpdated too).
        self._own_priority: h2.events.Event | None = None

    # -- asyncio.Protocol -----------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(high=WRITE_HIGH)
        self.client.set_certificate(transport)
        now = self._idle_since = self._progress_at = time.monotonic()
        self._flood_since = now
        conn = self.conn
        conn.initiate_connection()
        conn.increment_flow_control_window(CONNECTION_WINDOW - 65_535)
        self._schedule(self.live.limits.request_head_timeout, now)
        self.corked += 1
        early, self.early = self.early, []
        for data in early:
            self.data_received(data)
        self.uncork()

    def connection_lost(self, exc: BaseException | None) -> None:
        self.closed = True
        if self._on_lost is not None:
            self._on_lost(self)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for stream in list(self.streams.values()):
            self._gone(stream)
        self.streams.clear()
        self._dirty.clear()
        self._starting.clear()
        self.transport = self.tcp = None

    def data_received(self, data: bytes) -> None:
        if self.transport is None:
            self.early.append(data)  # the acceptor calls connection_made after the handshake
            return
        if self.closed or self._goaway_sent:
            return  # cut: only the GOAWAY is still going out
        self._read_at = time.monotonic()
        self.corked += 1
        try:
            try:
                events = self.conn.receive_data(data)
            except h2.exceptions.DenialOfServiceError:
                self._cut("h2_hpack_bomb")  # h2 queued GOAWAY ENHANCE_YOUR_CALM
                return
            except h2.exceptions.ProtocolError as exc:
                # A connection error (h2 queued the GOAWAY with its code): stream ids
                # going backwards, DATA on a stream closed by END_STREAM, too many
                # CONTINUATION frames, a window overflow, a content-length the DATA
                # contradicts, more streams than SETTINGS_MAX_CONCURRENT_STREAMS.
                log.debug("HTTP/2 connection error from %s: %s", self.peer, exc)
                self._cut("h2_protocol_error")
                return
            self._handle(events)
            if self.conn.incoming_buffer._headers_buffer:
                self._check_header_block()
        except Exception:
            log.exception("HTTP/2 session for %s failed", self.peer)
            self.abort()
        finally:
            self.uncork()

    def eof_received(self) -> bool | None:
        return None  # a TLS transport cannot stay half-open

    def pause_writing(self) -> None:
        self.write_paused = True
        for stream in self.streams.values():
            if not stream.write_paused:
                stream.write_paused = True
                if stream.exchange is not None:
                    stream.exchange.pause_upstream()

    def resume_writing(self) -> None:
        self.write_paused = False
        self._progress_at = time.monotonic()
        self.corked += 1
        try:
            for stream in list(self.streams.values()):
                self._push(stream)
        finally:
            self.uncork()

    # -- events ---------------------------------------------------------------------
    def _handle(self, events: list[h2.events.Event]) -> None:
        handlers = _HANDLERS
        for event in events:
            handler = handlers.get(type(event))
            if (handler is not None and handler(self, event)) or self.closed \
                    or self._goaway_sent:
                return
        starting, self._starting = self._starting, []
        for stream in starting:
            if not stream.reset and stream.exchange is not None:
                try:
                    stream.exchange.start()
                except Exception:
                    log.exception("HTTP/2 stream of %s failed", self.peer)
                    self.reset_stream(stream, ErrorCodes.INTERNAL_ERROR)

    # Handlers of h2's events (`_HANDLERS`): a true result ends the read's events.
    def _on_request(self, event: h2.events.RequestReceived) -> None:
        self._own_priority = event.priority_updated  # not a PRIORITY frame of its own
        self._request(event)

    def _on_end(self, event: h2.events.StreamEnded) -> None:
        stream = self.streams.get(event.stream_id or 0)
        if stream is None or stream.req is None:
            return
        req = stream.req
        length = req.content_length
        if length is not None and not req.body.done and req.body.total != int(length):
            # RFC 9113 8.1.1 (h2 checks DATA frames, not a body ended by trailers).
            self._send_reset(stream.id, ErrorCodes.PROTOCOL_ERROR)
            self._stream_error(stream.id, "h2_malformed")
            return
        req.body.finish()

    def _on_reset(self, event: h2.events.StreamReset) -> None:
        limit = None if event.remote_reset else _OWN_RESETS.get(event.error_code or 0)
        if limit is None:
            self._client_reset(event)
        else:
            self._stream_error(event.stream_id or 0, limit)  # h2 sent the RST_STREAM

    def _on_window(self, event: h2.events.WindowUpdated) -> None:
        self._window(event.stream_id or 0)

    def _on_goaway(self, event: h2.events.ConnectionTerminated) -> bool:
        # The client's GOAWAY: h2 takes no frame after it, streams included.
        self._close_after_flush()
        return True

    def _on_settings(self, event: h2.events.RemoteSettingsChanged) -> None:
        self._flooding()
        if SettingCodes.INITIAL_WINDOW_SIZE in event.changed_settings:
            self._window(0)

    def _on_control(self, event: h2.events.Event) -> None:
        if event is not self._own_priority:
            self._flooding()

    def _request(self, event: h2.events.RequestReceived) -> None:
        stream_id = event.stream_id or 0
        if self._draining:
            # After our GOAWAY: the client retries it on a new connection.
            self._send_reset(stream_id, ErrorCodes.REFUSED_STREAM)
            return
        self._last_id = max(self._last_id, stream_id)
        stream = Stream(self, stream_id)
        try:
            req = _request(stream, event.headers or [], self.live,
                           self._read_at, event.stream_ended is not None)
        except _Malformed as exc:
            log.debug("malformed HTTP/2 request from %s: %s", self.peer, exc)
            metrics.LIMITS_HIT.labels("h2_malformed").inc()
            self._send_reset(stream_id, ErrorCodes.PROTOCOL_ERROR)
            self._count_reset()
            return
        stream.req = req
        self.streams[stream_id] = stream
        self._idle_since = 0.0
        stream.exchange = Exchange(stream, req)
        self._starting.append(stream)

    def _data(self, event: h2.events.DataReceived) -> None:
        stream_id = event.stream_id or 0
        size = event.flow_controlled_length or 0
        data = event.data or b""
        stream = self.streams.get(stream_id)
        if not data and event.stream_ended is None:
            self._flooding()  # an empty DATA frame moves nothing
        if stream is None or stream.req is None or stream.req.body.done:
            # A stream answered, reset or refused: the bytes are dropped, the
            # connection's window opened again.
            if size:
                self.acknowledge(stream_id, size)
            return
        body = stream.req.body
        body.last = self._read_at
        if body.total + len(data) > self.live.limits.max_body_bytes:
            metrics.LIMITS_HIT.labels("max_body_bytes").inc()
            self._client_failed(stream, 413)
            if size:
                self.acknowledge(stream_id, size)
            return
        if data:
            body.feed(data)
        if not size:
            return
        if stream.body_paused:
            stream.unacked += size
        else:
            self.acknowledge(stream_id, size)

    def _client_failed(self, stream: Stream, status: int) -> None:
        """A request already accepted broke a limit: answer it (or cut it), read no more."""
        req = stream.req
        assert req is not None
        exchange = stream.exchange
        if stream in self._starting:
            req.error = (status, "request body refused")  # not started yet
        elif exchange is not None:
            exchange.fail(None, status)
        req.body.cut()

    def _client_reset(self, event: h2.events.StreamReset) -> None:
        stream = self.streams.pop(event.stream_id or 0, None)
        if stream is None:
            return
        if not stream.end_sent:
            self._count_reset()  # opened, then dropped before its answer
        self._gone(stream)

    def _stream_error(self, stream_id: int, limit: str) -> None:
        """The client's stream error, its RST_STREAM sent: counted, and the stream's
        exchange lets the backend go (a body never reaches it looking whole)."""
        metrics.LIMITS_HIT.labels(limit).inc()
        stream = self.streams.pop(stream_id, None)
        if stream is not None:
            self._gone(stream)
        self._count_reset()

    def _gone(self, stream: Stream) -> None:
        """The stream ended early: its exchange lets the backend go (never pooled)."""
        stream.reset = True
        stream.out.clear()
        req = stream.req
        if req is not None:
            req.body.cut()
        exchange = stream.exchange
        if exchange is not None:
            if stream in self._starting:  # never started: nothing to end
                self._starting.remove(stream)
                stream.exchange = None
            else:
                exchange.client_gone()  # calls `done`

    def _window(self, stream_id: int) -> None:
        """The client opened a window: move what waits for it."""
        self._progress_at = time.monotonic()
        if stream_id:
            stream = self.streams.get(stream_id)
            if stream is not None:
                self._push(stream)
            return
        for stream in list(self.streams.values()):
            if stream.out or stream.ending:
                self._push(stream)

    def _flooding(self) -> None:
        """Count a frame that costs us work and moves no request (CVE-2019-9512/9515/9518:
        PING, SETTINGS, PRIORITY, empty DATA floods); past the budget, GOAWAY."""
        now = self._read_at
        if now - self._flood_since > _FLOOD_SECONDS:
            self._flood_since = now
            self._flood = 0
        self._flood += 1
        if self._flood > _FLOOD_FRAMES:
            self._calm("h2_flood")

    def _count_reset(self) -> None:
        """Rapid reset (CVE-2023-44487): streams opened and dropped before their answer
        (by the client, or for its errors) are budgeted per connection; every stream
        answered earns half a reset back."""
        self._resets += 1
        if self._resets - self._served // 2 > self.live.limits.h2_reset_budget:
            self._calm("h2_rapid_reset")

    def _check_header_block(self) -> None:
        """CONTINUATION flood (CVE-2024-27316): a header block still open is bounded in
        bytes (h2 bounds its frames) before HPACK decoding starts."""
        pending = self.conn.incoming_buffer._headers_buffer
        size = sum(len(f.data) for f in pending)
        if size > self.live.limits.max_head_bytes * _HPACK_FACTOR:
            self._calm("h2_continuation")
        else:
            self.due_by(self.live.limits.request_head_timeout, self._read_at)

    def _calm(self, limit: str) -> None:
        metrics.LIMITS_HIT.labels(limit).inc()
        log.info("HTTP/2 connection from %s cut: %s", self.peer, limit)
        if self.conn.state_machine.state is not h2.connection.ConnectionState.CLOSED:
            self.conn.close_connection(ErrorCodes.ENHANCE_YOUR_CALM)
        self._cut(None)

    def _cut(self, limit: str | None) -> None:
        """End the connection after the GOAWAY h2 queued: streams in flight are cut."""
        if limit is not None:
            metrics.LIMITS_HIT.labels(limit).inc()
        self._goaway_sent = True
        self._close_after_flush()
        # A client that does not read would hold the closing connection: cut it.
        self._loop.call_later(_CUT_GRACE, self.abort)
        for stream in list(self.streams.values()):
            self._gone(stream)
        self.streams.clear()

    # -- what streams call ------------------------------------------------------------
    def send_headers(self, stream: Stream, headers: list[tuple[bytes, bytes]]) -> None:
        try:
            self.conn.send_headers(stream.id, headers)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            stream.reset = True
            return
        if not self.corked:
            self._flush()

    def queue(self, stream: Stream) -> None:
        """Move the stream's output now, or at the uncork of the read in progress (one
        DATA frame with END_STREAM for a small response, one write for the read)."""
        if self.corked:
            if not stream.dirty:  # a flag: a list lookup was O(streams) per write
                stream.dirty = True
                self._dirty.append(stream)
        else:
            self._push(stream)
            self._flush()
        if stream.out_size > _STREAM_HIGH and not stream.write_paused:
            stream.write_paused = True
            if stream.exchange is not None:
                stream.exchange.pause_upstream()

    def _push(self, stream: Stream) -> None:
        """Send what the stream's window, the connection's and the frame size allow;
        END_STREAM with the last of it once the response is complete."""
        if stream.reset or stream.end_sent:
            return
        conn, sid, out = self.conn, stream.id, stream.out
        try:
            while out:
                window = conn.local_flow_control_window(sid)
                if window <= 0:
                    break
                size = min(window, conn.max_outbound_frame_size)
                data = out[0]
                if len(data) > size:
                    out[0] = data[size:]
                    data = data[:size]
                else:
                    out.popleft()
                stream.out_size -= len(data)
                last = stream.ending and not out and stream.trailers is None
                conn.send_data(sid, data, end_stream=last)
                stream.end_sent = last
            if stream.ending and not out and not stream.end_sent:
                if stream.trailers is not None:
                    conn.send_headers(sid, stream.trailers, end_stream=True)
                else:
                    conn.end_stream(sid)
                stream.end_sent = True
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            stream.reset = True
            out.clear()
            stream.out_size = 0
        if stream.end_sent or stream.reset:
            if stream.exchange is None:
                self._retire(stream)  # `done` came first
        elif stream.write_paused and stream.out_size <= _STREAM_LOW and not self.write_paused:
            stream.write_paused = False
            if stream.exchange is not None:
                stream.exchange.resume_upstream()

    def stream_done(self, stream: Stream, keep: bool) -> None:
        """The stream's exchange is done: the stream leaves once its response is out."""
        if not stream.reset and not stream.ending:
            self.reset_stream(stream, ErrorCodes.INTERNAL_ERROR)  # no complete answer
            return
        req = stream.req
        if req is not None and not req.body.done:
            stream.stop_body = True
        if stream.reset or stream.end_sent:
            self._retire(stream)

    def _retire(self, stream: Stream) -> None:
        if self.streams.pop(stream.id, None) is None:
            return
        if not stream.reset:
            self._served += 1
            if stream.stop_body:
                self._send_reset(stream.id, ErrorCodes.NO_ERROR)
        if not self.streams:
            self._idle_since = time.monotonic()
            if self._draining:
                self._loop.call_soon(self._close_after_flush)

    def reset_stream(self, stream: Stream, code: ErrorCodes) -> None:
        if stream.reset:
            return
        stream.reset = True
        stream.out.clear()
        stream.out_size = 0
        self._send_reset(stream.id, code)
        self._retire(stream)

    def _send_reset(self, stream_id: int, code: ErrorCodes) -> None:
        try:
            self.conn.reset_stream(stream_id, code)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            return
        if not self.corked:
            self._flush()

    def acknowledge(self, stream_id: int, size: int) -> None:
        """Hand `size` received bytes back to the client's windows (the stream's while
        it is open, and the connection's)."""
        try:
            self.conn.acknowledge_received_data(size, stream_id)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            return
        if not self.corked:
            self._flush()

    def uncork(self) -> None:
        self.corked -= 1
        if self.corked:
            return
        dirty, self._dirty = self._dirty, []
        for stream in dirty:
            stream.dirty = False
            self._push(stream)
        self._flush()

    def _flush(self) -> None:
        data = self.conn.data_to_send()
        transport = self.transport
        if data and transport is not None and not transport.is_closing():
            transport.write(data)

    # -- shutdown -----------------------------------------------------------------------
    def drain(self) -> None:
        """At shutdown: GOAWAY with the last stream taken on; the streams in flight
        finish, then the connection closes (at once when there are none)."""
        if self._draining or self.closed:
            return
        self._draining = True
        frame = GoAwayFrame(stream_id=0, last_stream_id=self._last_id,
                            error_code=ErrorCodes.NO_ERROR)
        # Written around h2: its GOAWAY would stop the connection's in-flight streams.
        transport = self.transport
        if transport is not None and not transport.is_closing():
            self._flush()
            transport.write(frame.serialize())
        if not self.streams:
            self._close_after_flush()

    def release(self) -> None:
        """At shutdown, polled after `drain` (see closing.release)."""
        closing.release(self.transport, self.tcp)

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def _close_after_flush(self) -> None:
        self._flush()
        transport = self.transport
        if transport is not None:
            transport.close()

    # -- timers -------------------------------------------------------------------------
    def _schedule(self, delay: float, now: float) -> None:
        limits = self.live.limits
        delay = max(min(delay, limits.request_head_timeout, limits.keepalive_timeout,
                        limits.upstream_first_byte_timeout, limits.upstream_read_timeout,
                        limits.request_body_timeout, limits.send_timeout), 0.01)
        self._timer_due = now + delay
        self._timer = self._loop.call_later(delay, self._on_timer)

    def due_by(self, delay: float, now: float) -> None:
        if self._timer is not None:
            if self._timer_due <= now + delay:
                return
            self._timer.cancel()
        self._schedule(delay, now)

    def _on_timer(self) -> None:
        """One timer per connection: idle, header block, body and send deadlines, and
        each exchange's own (Exchange.watch)."""
        self._timer = None
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        now = time.monotonic()
        delay = self._deadlines(now)
        if delay is not None and self._timer is None and not transport.is_closing():
            self._schedule(delay, now)

    def _deadlines(self, now: float) -> float | None:
        limits = self.live.limits
        if self.conn.incoming_buffer._headers_buffer and \
                now - self._read_at > limits.request_head_timeout:
            metrics.LIMITS_HIT.labels("request_head_timeout").inc()
            self._close_after_flush()
            return None
        if not self.streams:
            limit = limits.keepalive_timeout if self._served else limits.request_head_timeout
            left = limit - (now - self._idle_since)
            if left <= 0:
                metrics.LIMITS_HIT.labels("keepalive_timeout" if self._served
                                          else "request_head_timeout").inc()
                self.drain()
                self._close_after_flush()
                return None
            return left
        delay = limits.keepalive_timeout
        stalled = False
        for stream in list(self.streams.values()):
            if stream.out or self.write_paused:
                stalled = True
            due = self._stream_deadline(stream, now)
            if due is not None:
                delay = min(delay, due)
        if stalled:
            left = limits.send_timeout - (now - self._progress_at)
            if left <= 0:
                # The client has not opened a window or read a byte for send_timeout.
                metrics.LIMITS_HIT.labels("send_timeout").inc()
                self.abort()
                return None
            delay = min(delay, left)
        return delay

    def _stream_deadline(self, stream: Stream, now: float) -> float | None:
        req, exchange = stream.req, stream.exchange
        if req is None or exchange is None:
            return None
        body = req.body
        if not body.done and not stream.body_paused:
            left = self.live.limits.request_body_timeout - (now - (body.last or req.started))
            if left <= 0:
                metrics.LIMITS_HIT.labels("request_body_timeout").inc()
                self._client_failed(stream, 408)
                return None
            watched = exchange.watch(now)
            return left if watched is None else min(left, watched)
        return exchange.watch(now)


_HANDLERS: dict[type[h2.events.Event], Callable[[H2Session, Any], bool | None]] = {
    h2.events.RequestReceived: H2Session._on_request,
    h2.events.DataReceived: H2Session._data,
    h2.events.StreamEnded: H2Session._on_end,
    h2.events.StreamReset: H2Session._on_reset,
    h2.events.WindowUpdated: H2Session._on_window,
    h2.events.ConnectionTerminated: H2Session._on_goaway,
    h2.events.RemoteSettingsChanged: H2Session._on_settings,
    # Frames that cost us work and move no request (counted: `_flooding`).
    h2.events.PingReceived: H2Session._on_control,
    h2.events.PriorityUpdated: H2Session._on_control,
    h2.events.UnknownFrameReceived: H2Session._on_control,
    h2.events.PingAckReceived: H2Session._on_control,
}
# Resets h2 sends where it would have ended the connection (`_Connection`), by the
# limit they count as.
_OWN_RESETS: dict[int, str] = {
    ErrorCodes.REFUSED_STREAM: "h2_max_concurrent_streams",
    ErrorCodes.PROTOCOL_ERROR: "h2_malformed",
}


class _Connection(h2.connection.H2Connection):
    """h2's server connection with two of its connection errors made stream errors
    (the other streams live on), and its open-stream count made cheap.

    - A new stream past SETTINGS_MAX_CONCURRENT_STREAMS gets RST_STREAM REFUSED_STREAM
      (RFC 9113 5.1.2): h2 raises TooManyStreamsError. Its header block is still
      decoded (the HPACK state is the connection's) and the stream taken on, then reset.
    - A content-length the DATA contradicts gets RST_STREAM PROTOCOL_ERROR (8.1.1): h2
      raises InvalidBodyLengthError; its bytes go back to the connection's window.
    Both surface as a StreamReset event with `remote_reset` False (`_OWN_RESETS`).

    h2 counts open streams by walking every stream it holds, pruning the closed ones,
    on each new HEADERS; the count is exact only when it matters: while h2 holds fewer
    streams than the limit, their number is a bound below it.
    """

    def __init__(self, config: h2.config.H2Configuration) -> None:
        super().__init__(config=config)
        self._checked = False  # the HEADERS frame in hand was checked against the limit
        self._recount_at = 0  # h2's stream count at which the next exact count runs

    @property
    def open_inbound_streams(self) -> int:
        if self._checked:
            return 0  # h2 asks again: answered already (`_receive_headers_frame`)
        held = len(self.streams)
        if held < self._recount_at:
            return held  # open ones are among them: under the limit
        count = super().open_inbound_streams  # walks and prunes
        # Amortised: the next walk after about as many new streams as are open.
        self._recount_at = min(max(2 * len(self.streams), 16),
                               self.local_settings.max_concurrent_streams)
        return count

    def _receive_headers_frame(self, frame: HeadersFrame) -> Any:
        refuse = frame.stream_id not in self.streams and \
            self.open_inbound_streams >= self.local_settings.max_concurrent_streams
        self._checked = True
        try:
            frames, events = super()._receive_headers_frame(frame)
        finally:
            self._checked = False
        if not refuse:
            return frames, events
        frames += self.streams[frame.stream_id].reset_stream(ErrorCodes.REFUSED_STREAM)
        return frames, [_own_reset(frame.stream_id, ErrorCodes.REFUSED_STREAM)]

    def _receive_data_frame(self, frame: DataFrame) -> Any:
        try:
            return super()._receive_data_frame(frame)
        except h2.exceptions.InvalidBodyLengthError:
            stream = self.streams[frame.stream_id]
            frames = stream.reset_stream(ErrorCodes.PROTOCOL_ERROR)
            self.acknowledge_received_data(frame.flow_controlled_length, frame.stream_id)
            return frames, [_own_reset(frame.stream_id, ErrorCodes.PROTOCOL_ERROR)]


def _own_reset(stream_id: int, code: ErrorCodes) -> h2.events.StreamReset:
    return h2.events.StreamReset(stream_id=stream_id, error_code=code, remote_reset=False)


def _connection(live: Live) -> _Connection:
    """An h2 server connection with our settings in force from its first frame."""
    limits = live.limits
    conn = _Connection(_CONFIG)
    # Replaced before initiate_connection sends them: h2 then enforces these values
    # from the start rather than after the client's ACK.
    conn.local_settings = h2.settings.Settings(client=False, initial_values={
        SettingCodes.MAX_CONCURRENT_STREAMS: limits.h2_max_concurrent_streams,
        SettingCodes.MAX_HEADER_LIST_SIZE: limits.max_head_bytes,
        SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
    })
    conn.decoder.max_header_list_size = limits.max_head_bytes * _HPACK_FACTOR
    return conn


def _response_headers(status: int, headers: list[tuple[bytes, bytes]]
                      ) -> list[tuple[bytes, bytes]]:
    """The backend's (end-to-end) headers as HTTP/2 carries them: lower-case names,
    nothing connection-specific."""
    out = [(b":status", _STATUS[status])]
    for name, value in headers:
        lname = name.lower()
        if lname not in _NOT_IN_H2:
            out.append((lname, value))
    return out


def _request(stream: Stream, headers: list[tuple[bytes, bytes]], live: Live, now: float,
             ended: bool) -> Request:
    """The request a HEADERS block carries, as the HTTP/1.1 backend will get it; raises
    _Malformed (the stream is reset, nothing forwarded). A request that is well-formed
    but refused (size limits, Host, CONNECT) carries its refusal in `error`."""
    pseudo, first = _pseudo_headers(headers)
    fields, cookies, host, content_length = _regular_fields(stream, headers, first)
    _check_field_bytes(headers, first)
    method, authority = pseudo.get(b":method"), pseudo.get(b":authority")
    if method is None:
        raise _Malformed("no :method")
    if authority is not None and host is not None and host != authority:
        raise _Malformed("Host and :authority differ")
    if ended and content_length is not None and content_length != b"0":
        raise _Malformed("a content-length on a request without DATA")  # RFC 9113 8.1.1
    req = Request(stream, now)
    req.method = method
    req.version = "2"
    authority = authority if authority is not None else host
    req.host = authority
    if authority is not None:
        fields.insert(0, (b"host", authority))
    if cookies:
        # Split for HPACK (RFC 9113 8.2.3); one field for HTTP/1.1.
        fields.append((b"cookie", b"; ".join(cookies)))
    req.headers = fields
    req.content_length = content_length
    if ended:
        req.body.done = True
    else:
        req.chunked = content_length is None
    path = pseudo.get(b":path")
    size = sum(map(len, chain.from_iterable(headers))) + 4 * len(headers)  # as HTTP/1.1
    req.error = _refusal(method, pseudo.get(b":scheme"), path, authority, content_length,
                         size, fields, live)
    req.url = path or b"/"
    return req


_PSEUDO = frozenset({b":method", b":scheme", b":authority", b":path"})
_NAME, _VALUE = itemgetter(0), itemgetter(1)


def _pseudo_headers(headers: list[tuple[bytes, bytes]]) -> tuple[dict[bytes, bytes], int]:
    """The request's pseudo-header fields (known ones, each once, RFC 9113 8.3.1) and
    the index of the first regular field."""
    pseudo: dict[bytes, bytes] = {}
    for index, (name, value) in enumerate(headers):
        if name[:1] != b":":
            return pseudo, index
        if name not in _PSEUDO or name in pseudo:
            raise _Malformed(f"unknown or repeated pseudo-header {name!r}")
        pseudo[name] = value
    return pseudo, len(headers)


def _regular_fields(stream: Stream, headers: list[tuple[bytes, bytes]], first: int
                    ) -> tuple[list[tuple[bytes, bytes]], list[bytes], bytes | None,
                               bytes | None]:
    """The regular fields from `first` on, sorted: those for the backend, the cookies
    (joined later), Host and content-length. Notes `te: trailers` on the stream."""
    fields: list[tuple[bytes, bytes]] = []
    cookies: list[bytes] = []
    host = content_length = None
    for name, value in headers[first:]:
        if name[:1] == b":":
            raise _Malformed("pseudo-header after a regular field")
        if name in _CONNECTION_SPECIFIC or (name == b"te" and value != b"trailers"):
            raise _Malformed(f"connection-specific field {name!r}")
        if name == b"cookie":
            cookies.append(value)
        elif name == b"host":
            host = value
        else:
            if name == b"content-length":
                content_length = value
            elif name == b"te":
                stream.trailers_ok = True
            fields.append((name, value))
    return fields, cookies, host, content_length


def _check_field_bytes(headers: list[tuple[bytes, bytes]], first: int) -> None:
    """Raise _Malformed for a field name that is not a lower-case token, or a value with
    a control byte or whitespace at either end (RFC 9113 8.2.1)."""
    names = b"".join(map(_NAME, headers[first:]))
    if names and not _FIELD_NAME.fullmatch(names):
        raise _Malformed("a field name that is not a lower-case token")
    values = list(map(_VALUE, headers))
    joined = b"\n".join(values)
    if _BAD_VALUE.search(joined) or joined.count(b"\n") != max(len(values) - 1, 0):
        raise _Malformed("a control byte or surrounding whitespace in a field value")


def _refusal(method: bytes, scheme: bytes | None, path: bytes | None,
             authority: bytes | None, content_length: bytes | None, size: int,
             fields: list[tuple[bytes, bytes]], live: Live) -> tuple[int, str] | None:
    """Why a well-formed request is answered by us instead of relayed, or None."""
    if method == b"CONNECT":
        return 501, "CONNECT is not supported"
    if scheme is None or not path:
        raise _Malformed("no :scheme or :path")
    limits = live.limits
    if size > limits.max_head_bytes:
        metrics.LIMITS_HIT.labels("max_head_bytes").inc()
        return 431, "request head too large"
    if len(fields) > limits.max_headers:
        metrics.LIMITS_HIT.labels("max_headers").inc()
        return 431, "too many request headers"
    if any(UNDERSCORE in name for name, _ in fields):
        return 400, "underscore in a header name"
    if scheme not in (b"https", b"http"):
        return 400, "unsupported :scheme"
    if path[:1] != b"/" and not (path == b"*" and method == b"OPTIONS"):
        return 400, "malformed :path"
    refusal = checks.request_head("1.1", path, [authority] if authority is not None else [],
                                  None, content_length, limits.max_body_bytes)
    if refusal is not None and refusal[0] == 413:
        metrics.LIMITS_HIT.labels("max_body_bytes").inc()
    return refusal


__all__ = ["CONNECTION_WINDOW", "STREAM_WINDOW", "H2Session", "Stream"]
