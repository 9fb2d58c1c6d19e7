"""The destination's frame relay for HBONE-borne HTTP/2 and gRPC connections, sans-IO.

Why: ``H2Proxy`` terminates the client's h2c connection and opens its own to the pod, so every
frame is parsed by ``h2`` (hyperframe objects, two state machines, events) and every header
block decoded and re-encoded, at both ends; ``h2`` on receipt was about half of the proxies'
CPU per gRPC call. ``H2Relay`` passes the client's frames to the pod, and the pod's to the
client, with the same stream ids: it reads the 9-byte frame headers itself, decodes header
blocks only to read what it needs (the request head for policy and telemetry; ``:status`` and
``grpc-status``) and forwards them as they came, and moves DATA by its frame header.

What it keeps from ``H2Proxy`` (``test_h2relay.py`` runs ``test_h2proxy.py``'s destination
tests against it, and hypothesis compares the two on the same inputs):

* per request ``authorize`` (L7 policy, rate limits): a refused request is answered here (403,
  or a trailers-only ``grpc-status``) and never reaches the pod; ``x-request-id`` is added when
  absent (one literal field appended to the forwarded block: no re-encoding);
* one ``H2Exchange`` per stream (status, ``grpc-status`` from trailers or a trailers-only
  response, DATA bytes each way, flags);
* per-hop SETTINGS, PING and flow control: DATA from one side is acknowledged to it only once
  forwarded within the other side's send windows (the windows ``H2Limits`` advertises bound
  what the relay holds), as ``H2Proxy`` and HBONE's DATA fast path do;
* the pod failing (closed, reset, garbled, GOAWAY) answered per open stream: 502 or
  ``grpc-status: 14`` before the response began (``UC``, ``UR``), a reset after; REFUSED_STREAM
  passed on; then GOAWAY to the client;
* the flood limits: header blocks and CONTINUATIONs (``h2guard``, on the same frame headers),
  PING/SETTINGS replies not taken, rapid reset, empty DATA frames, concurrent streams, frame
  size, the header block timer (``head_started``), protocol errors; each closes the client
  connection with GOAWAY and is counted by the same cause.

HPACK across a relay. A forwarded block is decoded by the relay (its copy of the sender's
dynamic table) and by the receiver (its own copy); they stay equal as long as every block that
changed the sender's table reaches the receiver unchanged and in order. Blocks the relay makes
itself (its answers) are encoded without the dynamic table (``TablelessEncoder``), so they change
no table. A block that cannot go out at once, in order (trailers behind DATA the windows hold),
is re-encoded without the table; and when a block that changed the sender's table is dropped
(a refused request) or re-encoded, that direction re-encodes every later block without the table
(``H2Side.reencode``): the receiver's table is then never used again, so it cannot be wrong. The
same when the receiver advertises a table smaller than the 4,096 bytes the relay advertises.

What the relay does not do: routing, retries, timeouts, mirrors, injected faults (the source's
``H2Proxy`` does those), and it serves only tunnels (an mTLS peer): the plaintext listener and a
same-node client keep ``H2Proxy``.
"""

from __future__ import annotations

import struct
import time
from collections import deque
from collections.abc import Callable, Sequence

from h2.errors import ErrorCodes
from hpack import HPACKError

from agent.proxy.h2core import POD_LOST, H2Core, passed_on, with_path
from agent.proxy.h2exchange import (
    GRPC_UNAVAILABLE,
    LOST_BODY,
    UPSTREAM_RESET,
    Authorize,
    H2Exchange,
    Header,
    header,
)
from agent.proxy.h2headers import Block, CheckedBlocks, MalformedHeaders, check_block
from agent.proxy.h2limits import (
    CONTROL_FLOOD,
    EMPTY_FRAMES,
    OVERSIZED_FRAME,
    PROTOCOL_ERROR,
    RAPID_RESET,
    TOO_MANY_STREAMS,
    H2Limits,
)
from agent.proxy.h2wire import LeanDecoder, TablelessEncoder, encode_field
from agent.proxy.http1 import (
    DOWNSTREAM_CLOSED,
    UPSTREAM_CLOSED,
    UPSTREAM_PROTOCOL,
    new_request_id,
)

FRAME = struct.Struct(">IBI")  # 24-bit length and 8-bit type in one word, flags, stream id
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE = range(9)
CONTINUATION = 0x9
END_STREAM = ACK = 0x1
END_HEADERS, PADDED, PRIORITY_FLAG = 0x4, 0x8, 0x20
# A HEADERS frame that is a whole block, unpadded and without priority: of these, END_HEADERS.
_WHOLE_BLOCK = END_HEADERS | PADDED | PRIORITY_FLAG
STREAM_ID = 0x7FFFFFFF
MAX_WINDOW = 0x7FFFFFFF
DEFAULT_WINDOW = 65535
DEFAULT_FRAME = 16384
DEFAULT_TABLE = 4096  # SETTINGS_HEADER_TABLE_SIZE: what the relay advertises (the default)
UNLIMITED = 1 << 31

# SETTINGS identifiers (RFC 9113 section 6.5.2).
S_TABLE, S_PUSH, S_STREAMS, S_WINDOW, S_FRAME, S_LIST = range(1, 7)

# Queue items: a header block ready to frame, or DATA (payload, window bytes to acknowledge).
_BLOCK, _DATA = 0, 1
Item = tuple[int, bytes, int, bool]  # kind, bytes, window bytes, END_STREAM


class H2Error(Exception):
    """A connection error (RFC 9113 section 5.4.1) by one side: ``code`` for its GOAWAY."""

    def __init__(self, code: ErrorCodes, reason: str, cause: str = PROTOCOL_ERROR) -> None:
        super().__init__(reason)
        self.code, self.cause = code, cause


def frame(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    return FRAME.pack(len(payload) << 8 | kind, flags, stream_id) + payload


def settings_frame(values: Sequence[tuple[int, int]]) -> bytes:
    return frame(SETTINGS, 0, 0, b"".join(struct.pack(">HI", k, v) for k, v in values))


class H2Side:
    """One peer of the relay (the client, or the pod): its settings, the connection windows
    both ways, the HPACK decoder of its blocks and the encoder of blocks made for it."""

    __slots__ = (
        "block",
        "block_end",
        "block_sid",
        "buf",
        "decoder",
        "encoder",
        "frame_size",
        "initial_window",
        "max_streams",
        "out",
        "preface",
        "recv_unacked",
        "recv_window",
        "reencode",
        "send_window",
        "settled",
    )

    def __init__(self, limits: H2Limits, *, preface: int, list_size: int) -> None:
        self.buf = b""  # an incomplete frame
        self.preface = preface  # bytes of the client preface still expected
        self.settled = False  # its first SETTINGS arrived
        self.out = bytearray()
        self.frame_size = DEFAULT_FRAME  # its SETTINGS_MAX_FRAME_SIZE: what we may send it
        self.initial_window = DEFAULT_WINDOW  # its SETTINGS_INITIAL_WINDOW_SIZE
        self.max_streams = UNLIMITED  # its SETTINGS_MAX_CONCURRENT_STREAMS
        self.send_window = DEFAULT_WINDOW  # connection window: what we may send it
        self.recv_window = limits.connection_window  # what it may still send us
        self.recv_unacked = 0  # bytes forwarded (or dropped) not yet reopened to it
        self.decoder = LeanDecoder(max_header_list_size=list_size)  # as announced to it
        self.decoder.max_allowed_table_size = DEFAULT_TABLE
        self.encoder = TablelessEncoder()
        self.reencode = False  # blocks forwarded to it are re-encoded without the table
        self.block: bytearray | None = None  # a header block being received
        self.block_sid = 0
        self.block_end = False  # its HEADERS carried END_STREAM


class _RStream:
    """One stream, known by the same id on both sides."""

    __slots__ = (
        "client_recv",
        "client_unacked",
        "client_window",
        "exchange",
        "forwarded",
        "pod_recv",
        "pod_unacked",
        "pod_window",
        "request_end",
        "request_sent",
        "response_end",
        "response_started",
        "sid",
        "to_client",
        "to_pod",
    )

    def __init__(self, sid: int, exchange: H2Exchange, request_end: bool, window: int) -> None:
        self.sid, self.exchange = sid, exchange
        self.forwarded = False  # opened at the pod (False: answered here)
        self.request_end = request_end  # the client ended its side
        self.request_sent = False  # ... and we ended it at the pod
        self.response_started = False
        self.response_end = False  # the response's end is queued for the client
        self.to_pod: deque[Item] = deque()
        self.to_client: deque[Item] = deque()
        self.pod_window = 0  # stream send windows: to the pod, to the client
        self.client_window = 0
        self.client_unacked = 0  # stream bytes received and passed on, not yet reopened
        self.client_recv = self.pod_recv = window  # what each side may still send on it
        self.pod_unacked = 0


class H2Relay(H2Core):
    """One HBONE-borne client h2c connection relayed to its pod connection, frame by frame.

    The shell's interface is ``H2Proxy``'s at the destination (``receive_client``,
    ``receive_upstream``, ``take_to_client``, ``take_to_upstream``, ``take_completed``,
    ``take_rejections``, ``upstream_failed``, ``header_timeout``, ``head_started``,
    ``closing``).
    """

    def __init__(
        self,
        authorize: Authorize,
        *,
        limits: H2Limits | None = None,
        clock: Callable[[], float] = time.monotonic,
        new_request_id: Callable[[], str] = new_request_id,
    ) -> None:
        super().__init__(authorize, limits, clock, new_request_id)
        limits = self.limits
        # The client's blocks with what a source node added on top (``client_allowance``)
        client_list = limits.max_header_list_size + limits.client_allowance
        self.client = H2Side(limits, preface=len(PREFACE), list_size=client_list)
        self.pod = H2Side(limits, preface=0, list_size=limits.max_header_list_size)
        # Blocks checked as they arrive (``check_block``), keeping the ones each side sends again
        self._requests = CheckedBlocks(Block.REQUEST)
        self._responses = CheckedBlocks(Block.RESPONSE)
        self._trailers = CheckedBlocks(Block.TRAILERS)  # the pod's
        self._streams: dict[int, _RStream] = {}
        self._highest = 0  # the client's highest stream id
        self._pod_open = 0  # streams open at the pod
        self._client_gone = False  # the client sent GOAWAY: no new streams will come
        self._pod_gone = False  # the pod's connection is unusable (closed, failed, GOAWAY)
        ours = [(S_PUSH, 0), (S_WINDOW, limits.stream_window), (S_FRAME, limits.max_frame_size)]
        extra = limits.connection_window - DEFAULT_WINDOW
        opening = frame(WINDOW_UPDATE, 0, 0, extra.to_bytes(4)) if extra > 0 else b""
        server = [(S_STREAMS, limits.max_concurrent_streams), *ours, (S_LIST, client_list)]
        self.client.out += settings_frame(server) + opening
        to_pod = [*ours, (S_LIST, limits.max_header_list_size)]
        self.pod.out += PREFACE + settings_frame(to_pod) + opening

    # -- the shell's interface ---------------------------------------------------------------
    def take_to_client(self) -> bytes:
        if self._sniff is not None:  # the client's preface not seen yet
            return self._held_output()
        out, self.client.out = bytes(self.client.out), bytearray()
        self._unsent_replies = 0
        return out

    def take_to_upstream(self) -> bytes:
        out, self.pod.out = bytes(self.pod.out), bytearray()
        return out

    @property
    def active_streams(self) -> int:
        return len(self._streams)

    def receive_client(self, data: bytes) -> None:
        """Bytes from the client; ``b""`` when it closed its side."""
        if self.closing:
            return
        if not data:
            self._abort_all(DOWNSTREAM_CLOSED)
            return
        if self._sniff is not None:  # the client's first bytes: its preface?
            opened = self._opening(data)
            if opened is None:
                return
            data = opened
        if not self._guard(data):
            return
        try:
            self._frames(self.client, data, self._client_frame)
        except H2Error as e:
            self._fail_client(e.cause, e.code, str(e))
            return
        except MalformedHeaders as e:
            self._fail_client(PROTOCOL_ERROR, ErrorCodes.PROTOCOL_ERROR, str(e))
            return
        if self._unsent_replies > self.limits.max_unsent_replies:
            detail = self._replies_over()
            assert detail is not None
            self._fail_client(CONTROL_FLOOD, ErrorCodes.ENHANCE_YOUR_CALM, detail)
            return
        self._pump()
        self._check_done()

    def receive_upstream(self, data: bytes) -> None:
        """Bytes from the pod; ``b""`` when it closed its side."""
        if self.closing:
            return
        if not data:
            self.upstream_failed()
            return
        try:
            self._frames(self.pod, data, self._pod_frame)
        except (H2Error, MalformedHeaders) as e:
            self._reject(UPSTREAM_PROTOCOL, f"the pod's HTTP/2: {e}")
            self.upstream_failed(ErrorCodes.INTERNAL_ERROR)
            return
        self._pump()
        self._check_done()

    def upstream_failed(self, code: int = POD_LOST) -> None:
        """The pod's connection is gone: answer every stream it had, or reset it with ``code``
        if its response began (a lost connection ``POD_LOST``, garbled HTTP/2 INTERNAL_ERROR),
        then GOAWAY."""
        if self.closing:
            return
        self._pod_gone = True
        for s in list(self._streams.values()):
            if s.forwarded:
                self._pod_lost(s, UPSTREAM_CLOSED, code)
        self._pump()  # the answers first: a client may stop reading streams at the GOAWAY
        self._goaway_client()
        self._check_done()

    # -- frames ------------------------------------------------------------------------------
    def _frames(
        self, side: H2Side, data: bytes, handle: Callable[[int, int, int, bytes], None]
    ) -> None:
        """Each whole frame of ``side``'s bytes to ``handle`` (kind, flags, stream, payload)."""
        if side.buf:
            data, side.buf = side.buf + data, b""
        pos, end = 0, len(data)
        if side.preface:
            n = min(side.preface, end)
            if data[:n] != PREFACE[len(PREFACE) - side.preface : len(PREFACE) - side.preface + n]:
                raise H2Error(ErrorCodes.PROTOCOL_ERROR, "not the HTTP/2 client preface")
            side.preface -= n
            pos = n
        limit = self.limits.max_frame_size
        unpack = FRAME.unpack_from
        while end - pos >= 9:
            word, flags, sid = unpack(data, pos)
            length = word >> 8
            if length > limit:
                reason = f"a frame of {length} bytes, over the limit of {limit}"
                raise H2Error(ErrorCodes.FRAME_SIZE_ERROR, reason, OVERSIZED_FRAME)
            if end - pos - 9 < length:
                break
            start = pos + 9
            pos = start + length
            kind = word & 0xFF
            if not side.settled:
                if kind != SETTINGS or flags & ACK:
                    raise H2Error(ErrorCodes.PROTOCOL_ERROR, "first frame is not SETTINGS")
                side.settled = True
            if side.block is not None and kind != CONTINUATION:
                raise H2Error(ErrorCodes.PROTOCOL_ERROR, "frame inside a header block")
            handle(kind, flags, sid & STREAM_ID, data[start:pos])
            if self.closing:
                return
        if pos < end:
            side.buf = data[pos:]

    def _connection_frame(
        self, side: H2Side, kind: int, flags: int, sid: int, payload: bytes
    ) -> None:
        """SETTINGS, PING, WINDOW_UPDATE on the connection, CONTINUATION, PRIORITY, unknown:
        what both sides' frames have alike (the rest is each side's own)."""
        if kind == SETTINGS:
            if sid:
                raise H2Error(ErrorCodes.PROTOCOL_ERROR, "SETTINGS on a stream")
            if flags & ACK:
                if payload:
                    raise H2Error(ErrorCodes.FRAME_SIZE_ERROR, "SETTINGS ACK with a payload")
                return
            self._settings(side, payload)
            side.out += frame(SETTINGS, ACK, 0)
            if side is self.client:
                self._unsent_replies += 9
        elif kind == PING:
            if sid or len(payload) != 8:
                raise H2Error(ErrorCodes.PROTOCOL_ERROR, "malformed PING")
            if not flags & ACK:
                side.out += frame(PING, ACK, 0, payload)
                if side is self.client:
                    self._unsent_replies += 17
        elif kind == WINDOW_UPDATE:
            if len(payload) != 4:
                raise H2Error(ErrorCodes.FRAME_SIZE_ERROR, "malformed WINDOW_UPDATE")
            increment = int.from_bytes(payload) & STREAM_ID
            if not increment:
                raise H2Error(ErrorCodes.PROTOCOL_ERROR, "WINDOW_UPDATE of 0")
            if not sid:
                side.send_window += increment
                if side.send_window > MAX_WINDOW:
                    raise H2Error(ErrorCodes.FLOW_CONTROL_ERROR, "window over 2^31-1")
                return
            s = self._streams.get(sid)
            if s is None:
                return
            if side is self.client:
                s.client_window += increment
                window = s.client_window
            else:
                s.pod_window += increment
                window = s.pod_window
            if window > MAX_WINDOW:
                raise H2Error(ErrorCodes.FLOW_CONTROL_ERROR, "window over 2^31-1")
        elif kind == CONTINUATION:
            if side.block is None or sid != side.block_sid:
                raise H2Error(ErrorCodes.PROTOCOL_ERROR, "CONTINUATION without a header block")
            side.block += payload
            if flags & END_HEADERS:
                block, side.block = bytes(side.block), None
                if side is self.client:
                    self._client_block(sid, block, side.block_end)
                else:
                    self._pod_block(sid, block, side.block_end)
        elif kind == PRIORITY:
            if not sid or len(payload) != 5:
                raise H2Error(ErrorCodes.PROTOCOL_ERROR, "malformed PRIORITY")
        elif kind == PUSH_PROMISE:
            raise H2Error(ErrorCodes.PROTOCOL_ERROR, "PUSH_PROMISE (push is disabled)")
        # unknown frame types are ignored (RFC 9113 section 4.1)

    def _settings(self, side: H2Side, payload: bytes) -> None:
        if len(payload) % 6:
            raise H2Error(ErrorCodes.FRAME_SIZE_ERROR, "SETTINGS of a length not 6n")
        for pos in range(0, len(payload), 6):
            key, value = struct.unpack_from(">HI", payload, pos)
            if key == S_WINDOW:
                if value > MAX_WINDOW:
                    raise H2Error(ErrorCodes.FLOW_CONTROL_ERROR, "initial window over 2^31-1")
                delta, side.initial_window = value - side.initial_window, value
                for s in self._streams.values():
                    if side is self.client:
                        s.client_window += delta
                    elif s.forwarded:
                        s.pod_window += delta
            elif key == S_FRAME:
                if not DEFAULT_FRAME <= value <= 0xFFFFFF:
                    raise H2Error(ErrorCodes.PROTOCOL_ERROR, "max frame size out of range")
                side.frame_size = value
            elif key == S_STREAMS:
                side.max_streams = value
            elif key == S_PUSH:
                if value > 1:
                    raise H2Error(ErrorCodes.PROTOCOL_ERROR, "ENABLE_PUSH not 0 or 1")
            elif key == S_TABLE and value < DEFAULT_TABLE:
                # Its decoder's table is smaller than the sender's encoder may use: forwarded
                # blocks are re-encoded without the table from now on.
                side.reencode = True
                side.encoder.header_table_size = value

    @staticmethod
    def _block_start(side: H2Side, flags: int, sid: int, payload: bytes) -> bytes | None:
        """A HEADERS frame's block fragment (padding and priority removed); None while the
        block continues in CONTINUATION frames."""
        if not sid:
            raise H2Error(ErrorCodes.PROTOCOL_ERROR, "HEADERS on stream 0")
        start, end = 0, len(payload)
        if flags & PADDED:
            if not payload or payload[0] >= end:
                raise H2Error(ErrorCodes.PROTOCOL_ERROR, "bad HEADERS padding")
            start, end = 1, end - payload[0]
        if flags & PRIORITY_FLAG:
            start += 5
            if start > end:
                raise H2Error(ErrorCodes.PROTOCOL_ERROR, "HEADERS too short for its priority")
        fragment = payload[start:end] if start or end != len(payload) else payload
        if flags & END_HEADERS:
            return fragment
        side.block, side.block_sid, side.block_end = (
            bytearray(fragment),
            sid,
            bool(flags & END_STREAM),
        )
        return None

    @staticmethod
    def _data_payload(flags: int, sid: int, payload: bytes) -> bytes:
        if not sid:
            raise H2Error(ErrorCodes.PROTOCOL_ERROR, "DATA on stream 0")
        if flags & PADDED:
            if not payload or payload[0] >= len(payload):
                raise H2Error(ErrorCodes.PROTOCOL_ERROR, "bad DATA padding")
            return payload[1 : len(payload) - payload[0]]
        return payload

    def _decode(self, side: H2Side, block: bytes) -> tuple[list[Header], bool]:
        """The block's fields, and whether it changed the sender's dynamic table: what tells is
        the decoder's count of changes (the entries alone do not: an insertion of the newest
        entry's field that evicts one leaves as many entries, the newest equal to the one
        before)."""
        decoder = side.decoder
        before = decoder.table_changes
        try:
            fields: list[Header] = list(decoder.decode(block, raw=True))
        except HPACKError as e:
            raise H2Error(ErrorCodes.COMPRESSION_ERROR, f"header block: {e}") from e
        return fields, decoder.table_changes != before

    # -- the client's frames -----------------------------------------------------------------
    def _client_frame(self, kind: int, flags: int, sid: int, payload: bytes) -> None:
        # The usual frames' checks are made inline (an unpadded DATA frame on a stream, a
        # whole header block): the helpers take the rest. A call's frames are a few per
        # direction, and each helper was a Python call per frame.
        if kind == DATA:
            data = (
                payload if sid and not flags & PADDED else self._data_payload(flags, sid, payload)
            )
            flow = len(payload)
            client = self.client
            client.recv_window -= flow
            if client.recv_window < 0:
                raise H2Error(ErrorCodes.FLOW_CONTROL_ERROR, "DATA beyond the connection window")
            if data:
                self._empty_frames = 0
            elif (reason := self._empty_data(data, flow)) is not None:
                raise H2Error(ErrorCodes.ENHANCE_YOUR_CALM, reason, EMPTY_FRAMES)
            s = self._streams.get(sid)
            if s is None:
                if sid > self._highest:
                    raise H2Error(ErrorCodes.PROTOCOL_ERROR, "DATA on an idle stream")
                self._ack_client(None, flow)
                return
            if s.request_end:
                raise H2Error(ErrorCodes.STREAM_CLOSED, "DATA after END_STREAM")
            s.client_recv -= flow
            if s.client_recv < 0:
                raise H2Error(ErrorCodes.FLOW_CONTROL_ERROR, "DATA beyond the stream window")
            end = bool(flags & END_STREAM)
            s.request_end = end
            if not s.forwarded or not (data or end):  # answered here, or nothing to pass on
                self._ack_client(s, flow)
                return
            s.exchange.request_bytes += len(data)
            s.to_pod.append((_DATA, data, flow, end))
            if len(s.to_pod) == 1:  # nothing waits before it: sent as read, windows allowing
                self._move(s, s.to_pod, self.pod, True)
        elif kind == HEADERS:
            if sid and flags & _WHOLE_BLOCK == END_HEADERS:  # unpadded, no priority
                self._client_block(sid, payload, bool(flags & END_STREAM))
                return
            block = self._block_start(self.client, flags, sid, payload)
            if block is not None:
                self._client_block(sid, block, bool(flags & END_STREAM))
        elif kind == RST_STREAM:
            if not sid or len(payload) != 4:
                raise H2Error(ErrorCodes.PROTOCOL_ERROR, "malformed RST_STREAM")
            if sid > self._highest:
                raise H2Error(ErrorCodes.PROTOCOL_ERROR, "RST_STREAM on an idle stream")
            self._client_reset(sid)
        elif kind == GOAWAY:
            if sid or len(payload) < 8:
                raise H2Error(ErrorCodes.PROTOCOL_ERROR, "malformed GOAWAY")
            if int.from_bytes(payload[4:8]) == ErrorCodes.NO_ERROR:
                self._client_gone = True
            else:
                self._abort_all(DOWNSTREAM_CLOSED)
        else:
            self._connection_frame(self.client, kind, flags, sid, payload)

    def _client_block(self, sid: int, block: bytes, end: bool) -> None:
        fields, changed = self._decode(self.client, block)
        s = self._streams.get(sid)
        if s is not None:  # trailers
            if s.request_end:
                raise H2Error(ErrorCodes.STREAM_CLOSED, "HEADERS after END_STREAM")
            if not end:
                raise H2Error(ErrorCodes.PROTOCOL_ERROR, "trailers without END_STREAM")
            check_block(fields, Block.TRAILERS)
            s.request_end = True
            if s.forwarded:
                self._forward_block(self.pod, s, s.to_pod, block, fields, changed, end=True)
            elif changed:
                self.pod.reencode = True
            return
        if sid <= self._highest or not sid & 1:
            if changed:  # a block for a stream already over: the pod never sees it
                self.pod.reencode = True
            if sid <= self._highest and sid & 1:
                return
            raise H2Error(ErrorCodes.PROTOCOL_ERROR, f"HEADERS opening stream {sid}")
        self._highest = sid
        if self._crossed_goaway(sid):  # never processed: the client may send it again
            self.pod.reencode |= changed  # a block the pod never sees
            self.client.out += frame(RST_STREAM, 0, sid, ErrorCodes.REFUSED_STREAM.to_bytes(4))
            return
        if len(self._streams) >= self.limits.max_concurrent_streams:
            reason = f"a stream over the limit of {self.limits.max_concurrent_streams} open"
            raise H2Error(ErrorCodes.PROTOCOL_ERROR, reason, TOO_MANY_STREAMS)
        headers = self._requests.check(fields)
        self._on_request(sid, headers, block, changed, end)

    def _on_request(
        self, sid: int, headers: Sequence[Header], block: bytes, changed: bool, end: bool
    ) -> None:
        exchange, made_id, path = self._new_exchange(headers)
        if path is not None:  # the pod is sent the path policy saw: this block re-encoded
            headers = with_path(headers, path)
        added = b""
        if made_id is not None:
            added = encode_field(b"x-request-id", made_id, never_indexed=True)
        head = exchange.head
        s = _RStream(sid, exchange, end, self.limits.stream_window)
        s.client_window = self.client.initial_window
        self._streams[sid] = s
        verdict = self.authorize(head)
        pod = self.pod
        if not verdict.allowed:
            s.exchange.flags = verdict.flag
            s.exchange.denied_by = verdict.reason
            s.exchange.dry_run = verdict.dry_run
            pod.reencode |= changed
            self._answer(s, verdict.status, verdict.grpc_status, verdict.body)
            return
        if verdict.dry_run:
            exchange.dry_run = verdict.dry_run
        if self._pod_gone:
            pod.reencode |= changed
            s.exchange.flags = UPSTREAM_CLOSED
            self._answer(s, 503, GRPC_UNAVAILABLE, b"upstream connection closed")
            return
        if self._pod_open >= pod.max_streams:
            # The pod's own limit: REFUSED_STREAM tells the client it is safe to retry.
            pod.reencode |= changed
            s.exchange.flags = "UO"
            self._refuse(s)
            return
        s.forwarded = True
        s.pod_window = pod.initial_window
        self._pod_open += 1
        if pod.reencode or path is not None:
            pod.reencode |= changed  # as for a block the pod never sees
            rid = [(b"x-request-id", made_id)] if made_id is not None else []
            out = pod.encoder.encode([*headers, *rid])
        else:
            out = block + added
        s.request_sent = end
        self._emit_block(pod, sid, out, end)

    def _client_reset(self, sid: int) -> None:
        s = self._streams.get(sid)
        if s is None:
            return
        if (reason := self._premature_reset(s.exchange)) is not None:
            raise H2Error(ErrorCodes.ENHANCE_YOUR_CALM, reason, RAPID_RESET)
        s.exchange.flags = DOWNSTREAM_CLOSED
        s.request_end = True  # nothing more comes from the client on it
        s.response_end = True  # nor goes to it
        self._reset_pod(s)
        self._complete(s, reset_client=False)

    # -- the pod's frames --------------------------------------------------------------------
    def _pod_frame(self, kind: int, flags: int, sid: int, payload: bytes) -> None:
        if kind == DATA:  # as in ``_client_frame``
            data = (
                payload if sid and not flags & PADDED else self._data_payload(flags, sid, payload)
            )
            flow = len(payload)
            pod = self.pod
            pod.recv_window -= flow
            if pod.recv_window < 0:
                raise H2Error(ErrorCodes.FLOW_CONTROL_ERROR, "DATA beyond the connection window")
            s = self._streams.get(sid)
            if s is None or not s.forwarded or s.response_end or not s.response_started:
                if s is not None and s.forwarded and not s.response_started:
                    raise H2Error(ErrorCodes.PROTOCOL_ERROR, "DATA before response headers")
                self._ack_pod(None, flow)
                return
            s.pod_recv -= flow
            if s.pod_recv < 0:
                raise H2Error(ErrorCodes.FLOW_CONTROL_ERROR, "DATA beyond the stream window")
            end = bool(flags & END_STREAM)
            if not (data or end):
                self._ack_pod(s, flow)
                return
            s.response_end = end
            s.exchange.response_bytes += len(data)
            s.to_client.append((_DATA, data, flow, end))
            if len(s.to_client) == 1:  # as in ``_client_frame``: so trailers after it in the
                # same read go as they came, not re-encoded behind it
                self._move(s, s.to_client, self.client, False)
        elif kind == HEADERS:
            if sid and flags & _WHOLE_BLOCK == END_HEADERS:
                self._pod_block(sid, payload, bool(flags & END_STREAM))
                return
            block = self._block_start(self.pod, flags, sid, payload)
            if block is not None:
                self._pod_block(sid, block, bool(flags & END_STREAM))
        elif kind == RST_STREAM:
            if not sid or len(payload) != 4:
                raise H2Error(ErrorCodes.PROTOCOL_ERROR, "malformed RST_STREAM")
            s = self._streams.get(sid)
            if s is None or not s.forwarded:
                return
            self._pod_open -= 1
            s.forwarded = False  # closed at the pod
            s.request_sent = True
            code = int.from_bytes(payload)
            if code == ErrorCodes.NO_ERROR and s.response_end:
                # RFC 9113 8.1: the response is whole (its end queued for the client), the pod
                # wants no more of the request: what waits still goes, then the same reset
                # to the client (``_complete``).
                self._discard(s.to_pod, self._ack_client, s)
                return
            if code == ErrorCodes.REFUSED_STREAM and not s.response_started:
                s.exchange.flags = UPSTREAM_RESET
                self._refuse(s)  # the pod never processed it: safe to retry
                return
            self._pod_lost(s, UPSTREAM_RESET, passed_on(code))
        elif kind == GOAWAY:
            if sid or len(payload) < 8:
                raise H2Error(ErrorCodes.PROTOCOL_ERROR, "malformed GOAWAY")
            last = int.from_bytes(payload[:4]) & STREAM_ID
            self._pod_gone = True
            for s in [x for x in self._streams.values() if x.forwarded and x.sid > last]:
                self._pod_lost(s, UPSTREAM_CLOSED)  # never processed (RFC 9113 8.7)
            self._goaway_client()
        else:
            self._connection_frame(self.pod, kind, flags, sid, payload)

    def _pod_block(self, sid: int, block: bytes, end: bool) -> None:
        fields, changed = self._decode(self.pod, block)
        s = self._streams.get(sid)
        if s is None or not s.forwarded or s.response_end:
            if changed:  # for a stream already over here: the client never sees it
                self.client.reencode = True
            return
        ex = s.exchange
        if s.response_started:  # trailers
            if not end:
                raise H2Error(ErrorCodes.PROTOCOL_ERROR, "trailers without END_STREAM")
            self._trailers.check(fields)
            ex.grpc_status = (header(fields, b"grpc-status") or b"").decode("latin-1")
            s.response_end = True
            self._forward_block(self.client, s, s.to_client, block, fields, changed, end=True)
            return
        fields = list(self._responses.check(fields))
        status = header(fields, b":status") or b"0"
        if status[:1] == b"1":  # informational
            if end:
                raise H2Error(ErrorCodes.PROTOCOL_ERROR, "END_STREAM on a 1xx response")
            self._forward_block(self.client, s, s.to_client, block, fields, changed, end=False)
            return
        ex.status = int(status) if status.isdigit() else 0
        ex.first_byte = self.clock()
        if end:
            ex.grpc_status = (header(fields, b"grpc-status") or b"").decode("latin-1")
        s.response_started = True
        s.response_end = end
        self._forward_block(self.client, s, s.to_client, block, fields, changed, end=end)

    def _pod_lost(self, s: _RStream, flag: str, code: int = POD_LOST) -> None:
        """The pod will not finish ``s``: answer it here if its response did not begin, else
        reset it with ``code``."""
        s.exchange.flags = flag
        if s.forwarded:
            s.forwarded = False
            self._pod_open -= 1
        self._discard(s.to_pod, self._ack_client, s)
        self._discard(s.to_client, self._ack_pod, None)
        s.request_sent = True
        if not s.response_started:
            self._answer(s, 502, GRPC_UNAVAILABLE, LOST_BODY)
            return
        s.response_end = True
        self.client.out += frame(RST_STREAM, 0, s.sid, code.to_bytes(4))
        self._complete(s, reset_client=False)

    # -- blocks, answers and stream ends -----------------------------------------------------
    def _forward_block(
        self,
        to: H2Side,
        s: _RStream,
        queue: deque[Item],
        block: bytes,
        fields: list[Header],
        changed: bool,
        *,
        end: bool,
    ) -> None:
        """Forward a received block on ``s``: as it came if it goes out now, in order; else
        (behind DATA in ``queue``, or ``to`` re-encodes) encoded without the table."""
        if to.reencode or queue:
            to.reencode |= changed
            out = to.encoder.encode(fields)
            if queue:
                queue.append((_BLOCK, out, 0, end))
                return
        else:
            out = block
        self._emit_block(to, s.sid, out, end)
        if end:
            if to is self.pod:
                s.request_sent = True
            else:
                self._complete(s)

    @staticmethod
    def _emit_block(to: H2Side, sid: int, block: bytes, end: bool) -> None:
        """Frame a header block: HEADERS and CONTINUATIONs within ``to``'s frame size."""
        size = to.frame_size
        flags = END_STREAM if end else 0
        if len(block) <= size:
            to.out += FRAME.pack(len(block) << 8 | HEADERS, flags | END_HEADERS, sid)
            to.out += block
            return
        kind = HEADERS
        for start in range(0, len(block), size):
            piece = block[start : start + size]
            last = start + size >= len(block)
            to.out += FRAME.pack(len(piece) << 8 | kind, flags | (END_HEADERS if last else 0), sid)
            to.out += piece
            kind, flags = CONTINUATION, 0

    def _answer(self, s: _RStream, status: int, grpc_status: int, message: bytes) -> None:
        """Answer ``s`` here: ``status`` with ``message`` as body, or for gRPC a trailers-only
        response with ``grpc_status`` (the rest of the request is discarded, the stream reset
        with NO_ERROR once the answer is out), encoded without the dynamic table."""
        ex = s.exchange
        s.response_started = s.response_end = True
        encode = self.client.encoder.encode
        if ex.grpc:
            ex.status, ex.grpc_status = 200, str(grpc_status)
            fields = [
                (b":status", b"200"),
                (b"content-type", b"application/grpc"),
                (b"grpc-status", str(grpc_status).encode()),
                (b"grpc-message", message.strip()),
            ]
            self._emit_block(self.client, s.sid, encode(fields), True)
            self._complete(s)
            return
        ex.status, ex.response_bytes = status, len(message)
        fields = [
            (b":status", str(status).encode()),
            (b"content-type", b"text/plain"),
            (b"content-length", str(len(message)).encode()),
        ]
        self._emit_block(self.client, s.sid, encode(fields), False)
        s.to_client.append((_DATA, message, 0, True))

    def _refuse(self, s: _RStream) -> None:
        """REFUSED_STREAM to the client (safe to retry), reported with its flag."""
        self.client.out += frame(RST_STREAM, 0, s.sid, ErrorCodes.REFUSED_STREAM.to_bytes(4))
        s.request_end = s.response_end = True
        self._complete(s, reset_client=False)

    def _complete(self, s: _RStream, *, reset_client: bool = True) -> None:
        """``s`` is over (its response's end went to the client, or it was reset): report it
        and forget it; cut short what is left of the request on either side."""
        s.exchange.ended = self.clock()
        self._completed.append(s.exchange)
        del self._streams[s.sid]
        # Most streams end with nothing held: asked first (a call and a ``sum`` over a
        # generator per queue, every stream, before), as ``H2Proxy._discard_request`` does.
        if s.to_pod:
            self._discard(s.to_pod, self._ack_client, s)
        if s.to_client:
            self._discard(s.to_client, self._ack_pod, None)
        if reset_client and not s.request_end:
            self.client.out += frame(RST_STREAM, 0, s.sid, ErrorCodes.NO_ERROR.to_bytes(4))
        if s.forwarded:
            if not s.request_sent:
                self._reset_pod(s)
            else:
                s.forwarded = False
                self._pod_open -= 1

    def _reset_pod(self, s: _RStream) -> None:
        if s.forwarded:
            s.forwarded = False
            self._pod_open -= 1
            self.pod.out += frame(RST_STREAM, 0, s.sid, ErrorCodes.CANCEL.to_bytes(4))

    @staticmethod
    def _discard(
        queue: deque[Item], ack: Callable[[_RStream | None, int], None], s: _RStream | None
    ) -> None:
        """Drop what ``queue`` holds, giving its sender back the window."""
        owed = sum(item[2] for item in queue)
        queue.clear()
        if owed:
            ack(s, owed)

    def _goaway_client(self) -> None:
        if not self._client_gone:
            self._client_gone = True
            self._last_taken = self._highest
            payload = self._highest.to_bytes(4) + ErrorCodes.NO_ERROR.to_bytes(4)
            self.client.out += frame(GOAWAY, 0, 0, payload)

    def _abort_all(self, flag: str) -> None:
        """The client connection is over: report what was open, cancel it at the pod."""
        for s in list(self._streams.values()):
            s.exchange.flags = flag
            s.exchange.ended = self.clock()
            self._completed.append(s.exchange)
            self._reset_pod(s)
        self._streams.clear()
        self.closing = True

    def _fail_client(self, cause: str, code: ErrorCodes, detail: str) -> None:
        """The client broke a limit or the protocol (``detail`` says which, for the log line):
        GOAWAY and close."""
        self._reject(cause, detail)
        payload = self._highest.to_bytes(4) + int(code).to_bytes(4)
        self.client.out += frame(GOAWAY, 0, 0, payload)
        self._abort_all(DOWNSTREAM_CLOSED)

    def _check_done(self) -> None:
        if (self._client_gone or self._pod_gone) and not self._streams:
            self.closing = True

    # -- flow control ------------------------------------------------------------------------
    def _ack_client(self, s: _RStream | None, n: int) -> None:
        """``n`` window bytes the client sent were passed on (or dropped): reopen them, half a
        window at a time (as ``h2``'s window manager does)."""
        self._ack(self.client, s, n, True)

    def _ack_pod(self, s: _RStream | None, n: int) -> None:
        self._ack(self.pod, s, n, False)

    def _ack(self, side: H2Side, s: _RStream | None, n: int, client: bool) -> None:
        if not n:
            return
        side.recv_unacked += n
        if side.recv_unacked >= self.limits.connection_window // 2:
            side.out += frame(WINDOW_UPDATE, 0, 0, side.recv_unacked.to_bytes(4))
            side.recv_window += side.recv_unacked
            side.recv_unacked = 0
        if s is None or s.sid not in self._streams:
            return
        if client:
            if s.request_end:
                return
            s.client_unacked += n
            if s.client_unacked >= self.limits.stream_window // 2:
                side.out += frame(WINDOW_UPDATE, 0, s.sid, s.client_unacked.to_bytes(4))
                s.client_recv += s.client_unacked
                s.client_unacked = 0
        else:
            if s.response_end:
                return
            s.pod_unacked += n
            if s.pod_unacked >= self.limits.stream_window // 2:
                side.out += frame(WINDOW_UPDATE, 0, s.sid, s.pod_unacked.to_bytes(4))
                s.pod_recv += s.pod_unacked
                s.pod_unacked = 0

    def _pump(self) -> None:
        for s in list(self._streams.values()):
            if s.to_pod:
                self._move(s, s.to_pod, self.pod, True)
            if s.to_client:
                self._move(s, s.to_client, self.client, False)

    def _move(self, s: _RStream, queue: deque[Item], to: H2Side, to_pod: bool) -> None:
        """Send what ``queue`` holds within ``to``'s send windows, acknowledging each byte to
        the side it came from once sent."""
        out = to.out
        while queue:
            kind, payload, flow, end = queue[0]
            if kind == _BLOCK:
                queue.popleft()
                self._emit_block(to, s.sid, payload, end)
            else:
                window = s.pod_window if to_pod else s.client_window
                n = min(len(payload), to.send_window, window, to.frame_size)
                if n < len(payload):
                    if n <= 0:
                        return
                    out += FRAME.pack(n << 8 | DATA, 0, s.sid)
                    out += payload[:n]
                    queue[0] = (kind, payload[n:], flow - n, end)
                    flow = n
                else:
                    queue.popleft()
                    out += FRAME.pack(n << 8 | DATA, END_STREAM if end else 0, s.sid)
                    out += payload
                to.send_window -= n
                if to_pod:
                    s.pod_window -= n
                    self._ack_client(s, flow)
                else:
                    s.client_window -= n
                    self._ack_pod(s, flow)
                if n < len(payload):
                    continue
            if end:
                if to_pod:
                    s.request_sent = True
                else:
                    self._complete(s)
                    return
