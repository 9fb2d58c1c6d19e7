"""The client side of a proxied HTTP/2 connection: the frame limits ``h2`` does not apply.

Why a scanner in front of ``h2``: ``h2`` holds a header block (HEADERS and its CONTINUATIONs)
whole until END_HEADERS and bounds it only by 64 frames of the advertised frame size, so a
client could make the proxy hold a megabyte per connection, or send empty CONTINUATIONs that
cost a call each and never end a block (CVE-2024-27316's pattern). ``HeaderBlockGuard`` reads
only the 9-byte frame headers of the byte stream (RFC 9113 section 4.1), as they pass to
``h2``, and names the first limit broken; the payloads are ``h2``'s to parse.

The other flood limits of a proxied connection live where their facts are, in
``agent.proxy.h2proxy``: replies the client's frames made us queue (PING and SETTINGS floods),
streams reset before their response (rapid reset), empty DATA frames; and a header block left
open too long (``block_open``: the shell's timer, like HTTP/1.1's header timeout).
"""

from __future__ import annotations

import re
import struct

FRAME_HEADER = struct.Struct(">IBI")  # 24-bit length and 8-bit type in one word, flags, stream
HEADER_SIZE = FRAME_HEADER.size
CLIENT_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
TYPE_HEADERS = 0x1
TYPE_PUSH_PROMISE = 0x5
TYPE_CONTINUATION = 0x9
FLAG_END_HEADERS = 0x4
_BLOCK_KINDS = (TYPE_HEADERS, TYPE_CONTINUATION, TYPE_PUSH_PROMISE)  # the frames ``_frame`` counts

# Causes (``nodemesh_http_rejected_requests_total{cause}``).
HEADER_BLOCK = "h2_header_block"  # a header block over max_header_block bytes
CONTINUATION_FLOOD = "h2_continuation_flood"  # more CONTINUATION frames than max_continuations


class HeaderBlockGuard:
    """Follows frame boundaries in what a client sends; ``feed`` returns a cause or None
    (``detail`` then says what broke which limit, for the log line)."""

    def __init__(
        self, *, max_header_block: int, max_continuations: int, preface: bool = True
    ) -> None:
        self.max_header_block = max_header_block
        self.max_continuations = max_continuations
        self._skip = len(CLIENT_PREFACE) if preface else 0  # bytes before the next frame header
        self._partial = b""  # an incomplete frame header
        self._block: int | None = None  # bytes of the open header block, None if none is open
        self._continuations = 0
        self.detail = ""
        # Is a header block started and not finished (END_HEADERS not seen yet)? A plain
        # attribute: the cores read it after every read of the client's.
        self.block_open = False

    def feed(self, data: bytes) -> str | None:
        # Positions in ``data`` rather than slices of it, and ``_frame`` only for the frames of
        # a header block (what it counts): a read of whole frames (a call's HEADERS and DATA)
        # costs an ``unpack_from`` per frame, where a memoryview, its slices, a copy of each
        # frame header, ``min`` and ``_frame`` per frame went before.
        if self._partial:  # a frame header cut across reads (rare): read on from its start
            data, self._partial = self._partial + bytes(data), b""
        end, pos = len(data), 0
        while True:
            skip = self._skip
            if skip:
                if skip >= end - pos:  # the rest of the read is payload (or the preface)
                    self._skip = skip - (end - pos)
                    return None
                pos += skip
                self._skip = 0
            if end - pos < HEADER_SIZE:
                if pos < end:
                    self._partial = bytes(data[pos:])
                return None
            word, flags, _stream = FRAME_HEADER.unpack_from(data, pos)
            pos += HEADER_SIZE
            self._skip = length = word >> 8
            kind = word & 0xFF
            if kind in _BLOCK_KINDS:
                cause = self._frame(kind, flags, length)
                if cause is not None:
                    return cause

    def _frame(self, kind: int, flags: int, length: int) -> str | None:
        if kind in (TYPE_HEADERS, TYPE_PUSH_PROMISE):
            self._block, self._continuations = length, 0
            self.block_open = True
        elif kind == TYPE_CONTINUATION and self._block is not None:
            self._block += length
            self._continuations += 1
            if self._continuations > self.max_continuations:
                self.detail = (
                    f"{self._continuations} CONTINUATION frames in one header block, over the "
                    f"limit of {self.max_continuations}"
                )
                return CONTINUATION_FLOOD
        else:
            return None  # any other frame: h2 judges where it may appear
        if self._block > self.max_header_block:
            self.detail = (
                f"a header block of {self._block} bytes so far, over the limit of "
                f"{self.max_header_block} bytes"
            )
            return HEADER_BLOCK
        if flags & FLAG_END_HEADERS:
            self._block = None
            self.block_open = False
        return None


# What a port declared HTTP/2 answers an HTTP/1.x request (``PrefaceSniff``): HTTP/1.1, which
# the client reads, not frames it would take for HTTP/0.9.
HTTP1_ON_H2 = "http1_on_h2_port"  # a cause of its own in nodemesh_http_rejected_requests_total
HTTP1_ON_H2_DETAIL = (
    "an HTTP/1.x request on a port declared HTTP/2 (h2c with prior knowledge) by its Service's"
    " appProtocol (http2, kubernetes.io/h2c, grpc) or name (http2-*, grpc-*); send HTTP/2 with"
    " prior knowledge (curl --http2-prior-knowledge), or declare the port http (appProtocol"
    " http or a name http-*)"
)
_HTTP1_BODY = HTTP1_ON_H2_DETAIL.encode() + b"\n"
HTTP1_ON_H2_ANSWER = (
    b"HTTP/1.1 400 Bad Request\r\ncontent-type: text/plain\r\ncontent-length: %d\r\n"
    b"connection: close\r\n\r\n" % len(_HTTP1_BODY)
) + _HTTP1_BODY

_TOKEN = rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_REQUEST_LINE = re.compile(_TOKEN + rb" [\x21-\x7e\x80-\xff]+ HTTP/1\.[0-9]\r?\n")
_LINE_SO_FAR = re.compile(_TOKEN + rb"( [\x21-\x7e\x80-\xff]*( [\x21-\x7e]*\r?)?)?")
MAX_REQUEST_LINE = 8192  # a first line still unfinished past this is no request line we name


class PrefaceSniff:
    """The first bytes of a connection on a port declared HTTP/2: the client preface, or an
    HTTP/1.x request line (a client that was not told the port is HTTP/2), or neither.

    Why: without it the proxy's SETTINGS and GOAWAY frames go back to an HTTP/1.1 client, which
    shows them as garbage (curl: ``Received HTTP/0.9``) instead of a reason. ``feed`` holds the
    bytes until it can tell (``MORE``); ``held`` is then all that came, to be parsed as HTTP/2
    unless it was ``HTTP1``. Neither preface nor request line (``OTHER``) is left to the HTTP/2
    parser, whose protocol error it is."""

    MORE, H2, HTTP1, OTHER = "more", "h2", "http1", "other"

    def __init__(self) -> None:
        self.held = b""

    def feed(self, data: bytes) -> str:
        buf = self.held = self.held + data
        n = min(len(buf), len(CLIENT_PREFACE))
        if buf[:n] == CLIENT_PREFACE[:n]:
            return self.H2 if n == len(CLIENT_PREFACE) else self.MORE
        end = buf.find(b"\n")
        if end < 0:
            plausible = len(buf) < MAX_REQUEST_LINE and _LINE_SO_FAR.fullmatch(buf)
            return self.MORE if plausible else self.OTHER
        return self.HTTP1 if _REQUEST_LINE.fullmatch(buf, 0, end + 1) else self.OTHER
