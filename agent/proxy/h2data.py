"""The HBONE DATA fast path's framing: DATA and WINDOW_UPDATE frames without ``h2``.

Why: a profile of the proxy put about half of its Python time per relayed message inside ``h2``
(frame objects, two state machines, window managers and a log call per frame), and almost all
frames of a tunnel are DATA. So the codec (``agent.proxy.hbone``) frames outgoing DATA itself
and splits the incoming byte stream here: DATA payloads go straight to the owner, every other
frame (HEADERS, SETTINGS, WINDOW_UPDATE, PING, GOAWAY, RST_STREAM, CONTINUATION, PRIORITY,
unknown types) and the client preface pass through to ``h2`` byte for byte, so ``h2`` keeps
validating them and running the connection and stream state machines.

``InboundSplitter`` is incremental: frames may be split across reads anywhere (even inside the
9-byte frame header or before a padded frame's pad-length byte), and a DATA payload is handed
on as it arrives rather than reassembled, so a 1 MiB frame costs no 1 MiB buffer and its first
bytes reach the pod before its last ones arrived.

``feed`` returns a list of tokens, plain 5-tuples ``(kind, stream_id, a, b, payload)`` because
they are built per frame on the hot path:

* ``(H2, 0, 0, 0, raw)``: bytes for ``h2``;
* ``(DATA_START, stream_id, length, data_length, b"")``: a DATA frame's header (and pad length)
  is known; ``length`` is what the frame counts against the flow-control windows,
  ``data_length`` what is left of it without padding;
* ``(DATA_CHUNK, stream_id, 0, 0, payload)``: payload bytes, padding removed;
* ``(DATA_END, stream_id, end_stream, 0, b"")``: the frame is complete;
* ``(ERROR, 0, 0, 0, b"")``: a connection error, described by ``error`` (code, cause, reason);
  the splitter must not be fed again;
* ``(HEADERS, stream_id, flags, 0, block)``: a whole HEADERS frame that is a whole header block
  (END_HEADERS, no padding, no priority) and arrived in one read, outside any other header
  block: the codec takes it without ``h2``'s frame parsing (``h2wire.receive_headers_on``), or
  hands it back (``headers_frame``). Any other HEADERS frame goes to ``h2`` as bytes.

Bounds on what ``h2`` buffers: ``h2`` holds every non-DATA frame whole until its last byte, and a
header block (HEADERS and its CONTINUATIONs) whole until END_HEADERS; its own checks apply the
header-list limit only after that, and allow 64 CONTINUATIONs of the advertised frame size
(64 MiB here). The splitter sees every frame header, so it refuses a non-DATA frame longer than
``max_control_frame`` and a header block longer than ``max_header_block`` (ENHANCE_YOUR_CALM)
before ``h2`` buffers them, and it knows whether a header block is open (DATA inside one is a
PROTOCOL_ERROR), so nobody has to look inside ``h2``'s frame buffer.

Window accounting is the codec's: this module only knows the wire format (RFC 9113 sections
4.1, 4.3, 6.1 and 6.9).
"""

from __future__ import annotations

import struct

from h2.errors import ErrorCodes

from agent.proxy.hbone_events import Cause

# Frame header: 24-bit length and 8-bit type packed in one 32-bit word, flags, stream id.
FRAME_HEADER = struct.Struct(">IBI")
HEADER_SIZE = FRAME_HEADER.size
CLIENT_PREFACE_SIZE = len(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
TYPE_DATA = 0x0
TYPE_HEADERS = 0x1
TYPE_PUSH_PROMISE = 0x5
TYPE_WINDOW_UPDATE = 0x8
TYPE_CONTINUATION = 0x9
FLAG_END_STREAM = 0x1
FLAG_END_HEADERS = 0x4
FLAG_PADDED = 0x8
FLAG_PRIORITY = 0x20
STREAM_ID_MASK = 0x7FFFFFFF
MAX_WINDOW_INCREMENT = 0x7FFFFFFF

H2, DATA_START, DATA_CHUNK, DATA_END, ERROR, HEADERS = range(6)
Token = tuple[int, int, int, int, bytes]
EMPTY = b""


def data_frame_header(length: int, stream_id: int, *, end_stream: bool = False) -> bytes:
    """The 9 bytes that precede ``length`` payload bytes of an unpadded DATA frame."""
    flags = FLAG_END_STREAM if end_stream else 0
    return FRAME_HEADER.pack(length << 8 | TYPE_DATA, flags, stream_id)


def headers_frame(stream_id: int, flags: int, block: bytes) -> bytes:
    """A ``HEADERS`` token's frame again, byte for byte, for ``h2``."""
    return FRAME_HEADER.pack(len(block) << 8 | TYPE_HEADERS, flags, stream_id) + block


def window_update_frame(stream_id: int, increment: int) -> bytes:
    """A whole WINDOW_UPDATE frame (``stream_id`` 0: the connection window)."""
    if not 1 <= increment <= MAX_WINDOW_INCREMENT:
        raise ValueError(f"window increment {increment} is outside 1-{MAX_WINDOW_INCREMENT}")
    return FRAME_HEADER.pack(4 << 8 | TYPE_WINDOW_UPDATE, 0, stream_id) + increment.to_bytes(4)


class InboundSplitter:
    """Splits the peer's bytes into DATA payloads and everything else (see the module docstring).

    ``preface`` is how many leading bytes are the client connection preface (server side: 24),
    which only ``h2`` checks. ``max_frame_size`` is the SETTINGS_MAX_FRAME_SIZE we advertised:
    a longer DATA frame is a FRAME_SIZE_ERROR. ``max_control_frame`` and ``max_header_block``
    bound what ``h2`` buffers (module docstring).
    """

    def __init__(
        self,
        *,
        max_frame_size: int,
        preface: int = 0,
        max_control_frame: int = 16 * 1024,
        max_header_block: int = 32 * 1024,
    ) -> None:
        self.max_frame_size = max_frame_size
        self.max_control_frame = max_control_frame
        self.max_header_block = max_header_block
        self.header_block = 0  # bytes of the open header block so far (>= 1 while one is open)
        self._header = bytearray()
        self._passthrough = preface  # bytes of the current non-DATA frame still owed to h2
        self._frame_length = preface  # length of that frame
        self._in_data = False
        self._stream_id = 0
        self._flags = 0
        self._length = 0
        self._pad_length_due = False
        self._data_left = 0
        self._pad_left = 0
        self.error: tuple[ErrorCodes, str, str] | None = None

    def h2_buffered(self) -> int:
        """At most how many bytes ``h2`` holds for frames it has not completed (a partial frame,
        an open header block)."""
        partial = self._frame_length - self._passthrough if self._passthrough else 0
        return self.header_block + partial

    def single_data(self, data: bytes) -> int:
        """The stream id if ``data`` is exactly one whole DATA frame with a payload and no flags
        (no END_STREAM, no padding), on a stream other than 0, no longer than our max frame
        size, arriving between frames outside a header block; else 0, and ``data`` is for
        ``feed``. Nothing changes here either way: such a frame leaves the splitter between
        frames, as it found it. Why: one 1 KB message relayed through a tunnel is one such
        frame per read, and ``feed``'s three tokens and its loop were most of the codec's work
        for it (the codec takes it with ``hbone_flow.DataFlow.take_single``)."""
        if self._passthrough or self._in_data or self._header or self.header_block:
            return 0
        length = len(data) - HEADER_SIZE
        if length <= 0:
            return 0
        length_type, flags, stream_id = FRAME_HEADER.unpack_from(data)
        # Type DATA and the length of this read (within our max frame size), no flags, no
        # reserved bit, not stream 0.
        if (
            length_type != length << 8
            or flags
            or length > self.max_frame_size
            or not 0 < stream_id <= STREAM_ID_MASK
        ):
            return 0
        return stream_id

    def feed(self, data: bytes | bytearray | memoryview) -> list[Token]:
        out: list[Token] = []
        view = memoryview(data)
        pos, end = 0, len(view)
        h2_start = -1  # start of the current run of bytes for h2 inside ``view``
        while pos < end:
            if self._passthrough:
                if h2_start < 0:
                    h2_start = pos
                n = min(self._passthrough, end - pos)
                pos += n
                self._passthrough -= n
                continue
            if self._in_data:
                pos = self._data_payload(view, pos, end, out)
                continue
            # A frame header, whole in ``view`` or completed from earlier reads.
            if self._header or end - pos < HEADER_SIZE:
                take = min(HEADER_SIZE - len(self._header), end - pos)
                if h2_start >= 0:
                    out.append((H2, 0, 0, 0, bytes(view[h2_start:pos])))
                    h2_start = -1
                self._header += view[pos : pos + take]
                pos += take
                if len(self._header) < HEADER_SIZE:
                    break
                header: bytes | memoryview = bytes(self._header)
                self._header.clear()
                from_view = False
            else:
                header = view[pos : pos + HEADER_SIZE]
                pos += HEADER_SIZE
                from_view = True
            length_type, flags, stream_id = FRAME_HEADER.unpack(header)
            length = length_type >> 8
            if (
                length_type & 0xFF == TYPE_HEADERS
                and flags & (FLAG_END_HEADERS | FLAG_PADDED | FLAG_PRIORITY) == FLAG_END_HEADERS
                and not self.header_block
                and length <= min(self.max_control_frame, self.max_header_block, end - pos)
            ):
                if h2_start >= 0:
                    out.append((H2, 0, 0, 0, bytes(view[h2_start : pos - HEADER_SIZE])))
                    h2_start = -1
                out.append(
                    (HEADERS, stream_id & STREAM_ID_MASK, flags, 0, bytes(view[pos : pos + length]))
                )
                pos += length
                continue
            if length_type & 0xFF != TYPE_DATA:
                if (
                    self.header_block
                    or length > self.max_control_frame
                    or length_type & 0xFF
                    in (
                        TYPE_HEADERS,
                        TYPE_PUSH_PROMISE,
                    )
                ):
                    if h2_start >= 0:
                        out.append((H2, 0, 0, 0, bytes(view[h2_start : pos - HEADER_SIZE])))
                        h2_start = -1
                    if not self._control_header(length, length_type & 0xFF, flags, out):
                        return out
                if not from_view:
                    out.append((H2, 0, 0, 0, bytes(header)))
                elif h2_start < 0:
                    h2_start = pos - HEADER_SIZE
                self._passthrough = self._frame_length = length
                continue
            if h2_start >= 0:
                out.append((H2, 0, 0, 0, bytes(view[h2_start : pos - HEADER_SIZE])))
                h2_start = -1
            if not self._data_header(length, flags, stream_id & STREAM_ID_MASK, out):
                return out
        if h2_start >= 0:
            out.append((H2, 0, 0, 0, bytes(view[h2_start:pos])))
        return out

    def _fail(self, code: ErrorCodes, cause: str, reason: str, out: list[Token]) -> bool:
        self.error = (code, cause, reason)
        self._in_data = False
        out.append((ERROR, 0, 0, 0, EMPTY))
        return False

    def _control_header(self, length: int, kind: int, flags: int, out: list[Token]) -> bool:
        """Track header blocks and refuse what ``h2`` would buffer beyond our bounds; False
        (and an ERROR token) if the frame is refused."""
        if length > self.max_control_frame:
            reason = (
                f"frame of type {kind:#x} has {length} bytes; we take at most "
                f"{self.max_control_frame} in any frame but DATA"
            )
            return self._fail(ErrorCodes.ENHANCE_YOUR_CALM, Cause.OVERSIZED_FRAME, reason, out)
        if kind in (TYPE_HEADERS, TYPE_PUSH_PROMISE) or (
            kind == TYPE_CONTINUATION and self.header_block
        ):
            block = self.header_block + length
            if block > self.max_header_block:
                reason = f"header block of more than {self.max_header_block} bytes"
                return self._fail(ErrorCodes.ENHANCE_YOUR_CALM, Cause.HEADER_BLOCK, reason, out)
            self.header_block = 0 if flags & FLAG_END_HEADERS else max(block, 1)
        return True

    def _data_header(self, length: int, flags: int, stream_id: int, out: list[Token]) -> bool:
        """Start a DATA frame; False (and an ERROR token) if the header is invalid."""
        if stream_id == 0:
            return self._fail(
                ErrorCodes.PROTOCOL_ERROR, Cause.PROTOCOL_ERROR, "DATA frame on stream 0", out
            )
        if self.header_block:
            reason = "DATA frame inside a header block"
            return self._fail(ErrorCodes.PROTOCOL_ERROR, Cause.PROTOCOL_ERROR, reason, out)
        if length > self.max_frame_size:
            reason = f"DATA frame of {length} bytes exceeds our limit of {self.max_frame_size}"
            return self._fail(ErrorCodes.FRAME_SIZE_ERROR, Cause.PROTOCOL_ERROR, reason, out)
        self._in_data = True
        self._stream_id, self._flags, self._length = stream_id, flags, length
        if flags & FLAG_PADDED:
            if length == 0:
                reason = "padded DATA frame without pad length"
                return self._fail(ErrorCodes.FRAME_SIZE_ERROR, Cause.PROTOCOL_ERROR, reason, out)
            self._pad_length_due = True
        else:
            self._data_left, self._pad_left = length, 0
            out.append((DATA_START, stream_id, length, length, EMPTY))
            if length == 0:
                self._end_data(out)
        return True

    def _data_payload(self, view: memoryview, pos: int, end: int, out: list[Token]) -> int:
        """Consume payload bytes of the current DATA frame; returns the new position."""
        if self._pad_length_due:
            pad = view[pos]
            pos += 1
            self._pad_length_due = False
            if pad >= self._length:
                reason = f"DATA padding of {pad} bytes does not fit in a {self._length}-byte frame"
                self._fail(ErrorCodes.PROTOCOL_ERROR, Cause.PROTOCOL_ERROR, reason, out)
                return end
            self._data_left, self._pad_left = self._length - 1 - pad, pad
            out.append((DATA_START, self._stream_id, self._length, self._data_left, EMPTY))
        if self._data_left and pos < end:
            n = min(self._data_left, end - pos)
            out.append((DATA_CHUNK, self._stream_id, 0, 0, bytes(view[pos : pos + n])))
            pos += n
            self._data_left -= n
        if not self._data_left and self._pad_left and pos < end:
            n = min(self._pad_left, end - pos)
            pos += n
            self._pad_left -= n
        if not (self._data_left or self._pad_left):
            self._end_data(out)
        return pos

    def _end_data(self, out: list[Token]) -> None:
        self._in_data = False
        out.append((DATA_END, self._stream_id, self._flags & FLAG_END_STREAM, 0, EMPTY))
