"""HTTP/2 settings, and every place where HBONE or ``H2Proxy`` reach into ``h2`` (or hpack)
beyond its public API.

The settings follow Istio's ztunnel where memory allows (see ARCHITECTURE.md, "HBONE"):

* connection window 2 MiB, replenished only as the owner consumes what it received, and stream
  window 512 KiB: together they are the receive side of the per-connection memory bound
  (``agent.proxy.hbone_limits``); a tunnel still fills a LAN link (512 KiB in flight per
  stream), and up to three streams whose pods do not read leave the rest of the connection
  flowing;
* max frame size 1 MiB for DATA: fewer frames (and fewer Python calls) per megabyte relayed;
  any other frame is held whole by ``h2`` until complete, so those are capped far lower
  (``max_control_frame``, ``max_header_block``);
* max header list 16 KiB: a CONNECT request needs a few hundred bytes, anything near the limit is
  abuse;
* 100 concurrent streams per connection; PING every 10 s, connection dead after 20 s of silence.

**Why ``h2`` internals, and the rule for them.** ``h2`` 4.x has no public API for three things
the codec needs, so this module is the one place that touches ``h2``'s non-public members; the
other modules call the functions here. ``tests/unit/proxy/test_h2wire.py`` has one test per reach
that fails, naming the member, if an ``h2`` upgrade changes it, and ``check_h2_internals`` runs at
import so that a missing member stops the agent at start-up instead of in the middle of a tunnel.
``pyproject.toml`` pins ``h2`` below 5. The reaches:

1. GOAWAY (``GracefulH2Connection``): RFC 9113 section 6.8 lets streams at or below a GOAWAY's
   last-stream-id run to completion, which is what a graceful drain needs. ``h2`` instead moves
   its connection state machine to CLOSED on sending or receiving GOAWAY, after which it refuses
   to send anything, so draining would cut every live tunnel. The subclass overrides
   ``_receive_goaway_frame`` and sends its own GOAWAY through ``_prepare_for_sending``; the codec
   (``agent.proxy.hbone``) enforces "no new streams" itself.
2. A stream's state (``H2Stream.state_machine.state``, via ``H2Connection.streams``): the DATA
   fast path (``agent.proxy.hbone_flow``) must know whether a stream may still receive or send
   DATA without sending a frame through ``h2``.
3. The send windows (``H2Connection.outbound_flow_control_window`` and the stream's): ``h2``
   applies the peer's WINDOW_UPDATEs and SETTINGS to them; the fast path subtracts what it frames
   itself, which is all ``h2.send_data`` does to them. (Reading them alone would be public:
   ``local_flow_control_window``.)
4. ``H2Connection.MAX_CLOSED_STREAMS``, the size of its closed-stream memory (a class constant
   that ``__init__`` reads), lowered to bound what a long-lived connection holds.
5. The received-frame trace line: ``H2Connection._receive_frame`` evaluates ``repr(frame)`` for
   every frame it parses, before its (by default no-op) logger decides whether to print it.
   hyperframe's ``repr`` formats the frame's flags and body, 3 to 6 µs a frame; an HTTP/2 request
   proxied through both nodes has its frames parsed about a dozen times (both proxies, both
   directions, client and pod sides), so this line alone cost a gRPC call tens of µs. The name
   ``repr`` inside ``h2.connection`` (module globals are searched before builtins) is bound to
   ``frame_kind``, which names the frame's type: only that one trace line uses ``repr`` there.
6. The HPACK encoder (``H2Connection.encoder``, an ``hpack.Encoder`` that ``send_headers``
   calls with Huffman coding on, and whose ``header_table_size`` ``h2`` sets when the peer's
   SETTINGS_HEADER_TABLE_SIZE changes): ``tableless_headers`` replaces it, before the connection
   sends anything, with ``TablelessEncoder``, which never Huffman-codes and never adds to the
   dynamic table. Why no Huffman: hpack's coder is a Python loop over bits, about 25 µs for a
   36-byte ``x-request-id`` at each end that encodes it and again at each end that decodes it.
   Why no dynamic table: hpack's encoder searches that table entry by entry for every header
   and maintains it (evictions, sizes), about a third of an encoded block's cost, and every
   decoder of our blocks maintains its copy too. Without it a field's encoding depends on the
   field alone, so it is computed once and kept (``_FIELD_CACHE``): a block is a few dict
   look-ups. The cost is bytes on the proxy's own legs (loopback, a veth, a LAN inside TLS): a
   gRPC request head of ~300 bytes where the table made it ~40. The table-size updates the
   peer's SETTINGS require are still sent (``_encode_table_size_change``, hpack's own).
7. hpack's loggers (``hpack.hpack.log``, ``hpack.table.log``): hpack calls ``log.debug`` for
   every integer, header and table entry it encodes or decodes, about 200 calls per proxied
   gRPC call, each a ``logging`` check (and at DEBUG they would print header values). The
   name ``log`` in those modules is bound to ``Silent``, whose ``debug`` does nothing.

8. The HPACK decoder (``H2Connection.decoder``, an ``hpack.Decoder`` whose ``decode`` ``h2``
   calls with ``raw=True`` for every header block, and whose ``max_header_list_size``,
   ``max_allowed_table_size`` and ``header_table_size`` it sets from SETTINGS):
   ``tableless_headers`` replaces it with ``LeanDecoder``, which decodes the same
   representations into the same fields and the same table (hypothesis compares the two,
   ``test_h2wire.py``) in one loop over the block. hpack's copies the rest of the block for
   every literal (``memoryview.tobytes``) and makes two calls per field besides: with
   ``TablelessEncoder``'s blocks, all literals, it cost more than the encoder saved.
9. Sending a header block (``send_headers_on``): a request head, a response head, trailers.
   ``h2``'s ``send_headers`` re-encodes every name and value (``utf8_encode_headers``),
   computes validation flags it does not use with validation off, builds hyperframe objects
   and serializes them: about three quarters of what sending a gRPC response head cost after
   ``TablelessEncoder``. ``send_headers_on`` drives the same state machines
   (``H2Connection.state_machine`` with ``ConnectionInputs.SEND_HEADERS``, the stream's
   ``state_machine`` with ``SEND_HEADERS`` or ``SEND_INFORMATIONAL_HEADERS`` and
   ``SEND_END_STREAM``, its ``trailers_sent`` check), encodes with the connection's encoder and
   appends the frames to ``H2Connection._data_to_send``, where ``_prepare_for_sending`` puts
   ``h2``'s own. A block that opens a stream checks the peer's stream limit as ``h2`` does and
   makes the stream as ``H2Connection._begin_new_stream`` does (``new_stream``, reach 16;
   what ``_get_or_create_stream`` calls after the ``KeyError`` it raises and catches); the
   stream's ``_authority`` and ``request_method`` are set as ``h2`` sets them.
   ``send_block_on`` does the same with a ``HeaderBlock`` that HBONE sends again and again
   (a target's CONNECT, the 200): encoded by ``TablelessEncoder`` once, its method, authority
   and whether it is informational found once; only while the connection's encoder has no
   table size change to signal (``HeaderTable.resized``, reach 6), else it encodes.
   ``send_data_on`` does the same for a DATA frame within the windows (``H2Proxy`` moves DATA
   only within them): the state machines' ``SEND_DATA`` (and ``SEND_END_STREAM``), the frame
   appended, both send windows charged as ``h2``'s ``send_data`` does (reach 3), without
   hyperframe's ``DataFrame``.
10. Receiving END_STREAM on an empty DATA frame (``receive_end_stream_on``): HBONE's splitter
   (``agent.proxy.h2data``) keeps DATA out of ``h2`` but fed it an empty DATA frame for each
   END_STREAM, which ``h2`` parsed into a hyperframe object and dispatched. For a stream that
   may still receive, the function makes the calls ``H2Connection._receive_data_frame`` makes
   for such a frame: the connection's ``state_machine`` with ``ConnectionInputs.RECV_DATA``,
   then what the stream's own ``receive_data`` does for it (its state machine, its
   content-length check: ``H2Stream._expected_content_length``, ``_actual_content_length``),
   and returns their events; a ``ProtocolError`` queues GOAWAY (``_terminate_connection``)
   before it is raised, as ``receive_data`` does.
11. Receiving a header block that came whole in one HEADERS frame (``receive_headers_on``):
   ``h2`` would parse the frame into a hyperframe object and dispatch it; for a new stream the
   peer may open (right parity, above ``highest_inbound_stream_id``, within our
   ``max_concurrent_streams``) or a stream that may still receive, the function makes the calls
   ``H2Connection._receive_headers_frame`` makes: ``h2.connection._decode_headers`` with the
   connection's decoder, the ``state_machine`` with ``ConnectionInputs.RECV_HEADERS``,
   ``_begin_new_stream``'s work for a new stream (``new_stream``), the stream's
   ``receive_headers``; a
   ``ProtocolError`` queues GOAWAY (``_terminate_connection``) and is raised, as in
   ``receive_data``. Any other block (a stream that is closed, idle on the wrong side, over the
   limit) goes to ``h2`` as a frame, so that ``h2`` decides its fate.
12. Receiving frames (``receive_on``, ``H2Proxy``'s way into both its connections): ``h2``'s
   ``receive_data`` puts every frame through its ``FrameBuffer`` (``H2Connection.incoming_buffer``)
   and a hyperframe object, a third of what receiving a gRPC call's frames cost at the source.
   ``receive_on`` reads the frame headers itself while that buffer holds nothing
   (``_preamble_len``, ``_data``, ``_headers_buffer`` empty), takes a whole header block in one
   HEADERS frame with ``receive_headers_on`` and an unpadded DATA frame on a stream that may
   receive with ``receive_data_on`` (the calls ``H2Connection._receive_data_frame`` makes: the
   ``state_machine`` with ``ConnectionInputs.RECV_DATA``,
   ``_inbound_flow_control_window_manager.window_consumed``, the stream's ``receive_data``),
   and hands every other frame to ``receive_data`` in order, as it came.
13. The stream's side of a received header block (``_stream_headers``, inside
   ``receive_headers_on``): ``H2Stream.receive_headers`` builds header validation flags (three
   ``isinstance`` tests over tuples of event classes and a namedtuple) and runs the block
   through ``_process_received_headers`` (three configuration look-ups through descriptors and a
   copy) even when the connection neither normalizes nor validates inbound headers nor decodes
   them: both then only copy the list. For such a connection (``H2Proxy``'s: the
   configuration's ``_normalize_inbound_headers``, ``_validate_inbound_headers`` and
   ``_header_encoding``, read as stored) the function makes the stream's other calls as
   ``receive_headers`` does, in its order: ``is_informational_response``, the
   ``state_machine`` with ``RECV_HEADERS`` or ``RECV_INFORMATIONAL_HEADERS`` (and
   ``RECV_END_STREAM``, its event set as the first event's ``stream_ended``),
   ``_initialize_content_length``, the trailers rule, the headers set on the first event as a
   new list. Any other configuration calls ``receive_headers``.
14. Taking the output (``move_output``, ``take_output``): ``H2Connection.data_to_send``
   copies ``_data_to_send`` into new bytes and replaces it with a new bytearray on every
   call, also when it is empty; HBONE's codec takes ``h2``'s output before every frame it
   builds and around every frame it hands ``h2`` (``hbone_flow.DataFlow``), a dozen times
   per stream on each side, most of them with nothing queued. The two functions read the
   same bytearray (and ``send_headers_on``/``send_data_on`` append to it already).
15. A stream's state machine input (``stream_input``): ``H2StreamStateMachine.process_input``
   hashes its ``StreamInputs`` member (a Python-level ``Enum.__hash__``) to look ``(state,
   input)`` up in ``h2.stream._transitions``, 12 times per proxied connection. The functions
   here feed the machine from that same table split by input at import (``_STEPS``), keyed by
   the state alone: the same next state, transition function and errors (``test_h2wire.py``
   compares every state and input with ``process_input``).
16. Making a stream (``new_stream``): what ``H2Connection._begin_new_stream`` does (the id
   checks, an ``H2Stream`` with the windows from ``local_settings``/``remote_settings``, the
   frame size, ``streams``, ``highest_*_stream_id``) with the initial window sizes read from
   ``Settings._settings`` (the value in force heads each setting's queue) instead of through a
   property and ``__getitem__`` each, and without its three no-op debug calls; the stream limit
   is read the same way (``max_concurrent_streams``).
17. Acknowledging received DATA (``acknowledge_on``): ``H2Connection.acknowledge_received_data``
   logs twice (a no-op logger, formatted arguments), looks the stream up through
   ``_get_stream_by_id`` (raising and catching for a forgotten one), asks the stream's ``open``
   property and hands ``_prepare_for_sending`` an empty list when no WINDOW_UPDATE is due, which
   is almost always (a window is reopened half a window at a time): about ten Python calls, twice
   per proxied call at the source. ``acknowledge_on`` charges the same window managers
   (``_inbound_flow_control_window_manager``, the stream's ``_inbound_window_manager``: their
   ``_bytes_processed``, asking ``_maybe_update_window`` only when it may hand bytes back) and
   queues the same WINDOW_UPDATE frames; a stream ``h2`` does not hold goes to ``h2`` itself.
18. A stream's side of a received DATA frame (``_stream_data``, inside ``receive_data_on``):
   ``H2Stream.receive_data`` for the frame's bytes, written out as ``receive_end_stream_on``
   writes it for an empty one: the state machine's inputs, ``_inbound_window_manager``'s
   ``current_window_size`` and ``_actual_content_length`` against ``_expected_content_length``.
Public ``h2`` API used elsewhere is not listed here (``streams``' keys, ``open_*_streams``,
``remote_settings``, ``highest_inbound_stream_id``, ``reset_stream``, ...).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, NamedTuple

import h2.connection as _h2_connection
import h2.stream as _h2_stream
import hpack.hpack as _hpack
import hpack.table as _hpack_table
from h2.config import H2Configuration
from h2.connection import (
    AllowedStreamIDs,
    ConnectionInputs,
    ConnectionState,
    H2Connection,
    H2ConnectionStateMachine,
)
from h2.errors import ErrorCodes
from h2.events import ConnectionTerminated, Event, TrailersReceived
from h2.exceptions import (
    FlowControlError,
    FrameTooLargeError,
    InvalidBodyLengthError,
    ProtocolError,
    StreamIDTooLowError,
    TooManyStreamsError,
)
from h2.settings import SettingCodes, Settings
from h2.stream import H2Stream, H2StreamStateMachine, StreamInputs, StreamState
from h2.utilities import (
    authority_from_headers,
    extract_method_header,
    is_informational_response,
)
from hpack import (
    Decoder,
    Encoder,
    HeaderTuple,
    HPACKDecodingError,
    InvalidTableSizeError,
    NeverIndexedHeaderTuple,
    OversizedHeaderListError,
)
from hpack.huffman_table import decode_huffman
from hpack.table import HeaderTable
from hyperframe.frame import Frame, GoAwayFrame, WindowUpdateFrame

import agent.proxy.h2enums  # noqa: F401  h2's state machine inputs hashed in C


def frame_kind(frame: object) -> str:
    """What ``h2``'s received-frame trace line shows instead of the frame's ``repr`` (reach 5)."""
    return type(frame).__name__


_h2_connection.repr = frame_kind  # type: ignore[attr-defined]


class Silent:
    """What hpack logs to (reach 7): nothing."""

    def debug(self, *_args: object) -> None:
        pass


_hpack.log = _hpack_table.log = Silent()  # type: ignore[assignment]


# Literal representations (RFC 7541 section 6.2): without indexing, never indexed.
_LITERAL, _NEVER_INDEXED = 0x00, 0x10
_FIELD_CACHE_SIZE = 4096  # fields whose encoding is kept; values new on every call are not
_FIELD_CACHE_VALUE = 128  # longer values are encoded each time: the cache stays under 1 MiB
_FIELD_CACHE: dict[tuple[bytes, bytes], bytes] = {}
_STATIC = HeaderTable.STATIC_TABLE_MAPPING  # name -> (first index, {value: index})
_STATIC_FIELDS = HeaderTable.STATIC_TABLE  # index - 1 -> (name, value)


def _integer(value: int, prefix_bits: int, first: int) -> bytes:
    """An HPACK integer (RFC 7541 section 5.1) whose first byte carries ``first``'s bits."""
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes((first | value,))
    out = bytearray((first | limit,))
    value -= limit
    while value >= 128:
        out.append(value & 127 | 128)
        value >>= 7
    out.append(value)
    return bytes(out)


def _string(value: bytes) -> bytes:
    """An HPACK string literal, not Huffman-coded (RFC 7541 section 5.2)."""
    return _integer(len(value), 7, 0) + value


def encode_field(name: bytes, value: bytes, *, never_indexed: bool = False) -> bytes:
    """One header field with the static table only: indexed if the static table holds it
    whole, else a literal (never indexed if asked) naming a static name where one exists."""
    static = _STATIC.get(name)
    if static is not None:
        index = static[1].get(value)
        if index is not None and not never_indexed:
            return _integer(index, 7, 0x80)
        head = _integer(static[0], 4, _NEVER_INDEXED if never_indexed else _LITERAL)
    else:
        head = bytes((_NEVER_INDEXED if never_indexed else _LITERAL,)) + _string(name)
    return head + _string(value)


class TablelessEncoder(Encoder):
    """An HPACK encoder without Huffman coding or dynamic table (reach 6). Takes what ``h2``
    hands its encoder on our connections: 2-tuples of bytes, ``NeverIndexedHeaderTuple`` for
    fields kept out of any compression context."""

    def encode(self, headers: Any, huffman: bool = False) -> bytes:
        del huffman  # never: see reach 6
        parts: list[bytes] = []
        if self.header_table.resized:
            parts.append(self._encode_table_size_change())
            self.header_table.resized = False
        cache = _FIELD_CACHE
        for field in headers:
            name, value = field[0], field[1]
            if isinstance(field, HeaderTuple) and not field.indexable:
                parts.append(encode_field(name, value, never_indexed=True))
                continue
            key = (name, value)
            encoded = cache.get(key)
            if encoded is None:
                encoded = encode_field(name, value)
                if len(name) + len(value) <= _FIELD_CACHE_VALUE:
                    if len(cache) >= _FIELD_CACHE_SIZE:
                        cache.clear()
                    cache[key] = encoded
            parts.append(encoded)
        return b"".join(parts)


# Octets an integer may take, its prefix byte included (hpack's ``VARINT_MAX_LENGTH``: enough
# for a 32-bit value; RFC 7541 section 5.1 lets a decoder refuse longer encodings).
_INTEGER_OCTETS = 5


def _integer_at(data: bytes, pos: int, prefix_bits: int) -> tuple[int, int]:
    """The HPACK integer at ``pos`` and the position after it (RFC 7541 section 5.1)."""
    limit = (1 << prefix_bits) - 1
    try:
        value = data[pos] & limit
        pos += 1
        if value == limit:
            start, shift = pos, 0
            while True:
                byte = data[pos]
                pos += 1
                value += (byte & 127) << shift
                if byte < 128:
                    break
                shift += 7
                if pos - start >= _INTEGER_OCTETS:
                    raise HPACKDecodingError("HPACK integer representation is too long")
    except IndexError as e:
        raise HPACKDecodingError("Truncated header block (an integer)") from e
    return value, pos


# Huffman-coded strings whose decoding a ``LeanDecoder`` keeps (per connection: nothing one
# client sent is looked up for another), and the longest one kept (encoded bytes; a gRPC
# method path or a user-agent is 20-40): with the decoded copies (at most 8/5 as long) and
# the dict, under 40 KiB per connection. When full it is emptied: values new on every call (a
# request id, a ``grpc-timeout``) then cost the others one decoding per hundred-odd calls.
_HUFFMAN_CACHE_SIZE = 128
_HUFFMAN_CACHE_STRING = 64


def _string_at(data: bytes, pos: int, cache: dict[bytes, bytes] | None) -> tuple[bytes, int]:
    """The HPACK string literal at ``pos`` and the position after it (RFC 7541 section 5.2).
    A Huffman-coded one is looked up in ``cache`` (and kept there if short) when one is given:
    hpack's decoder is a Python loop over nibbles, ~0.5 µs a byte, and clients Huffman-code the
    same ``:path`` or ``user-agent`` on every call when they do not index it."""
    length, start = _integer_at(data, pos, 7)
    end = start + length
    if end > len(data):
        raise HPACKDecodingError("Truncated header block (a string)")
    value = data[start:end]
    if not data[pos] & 0x80:
        return value, end
    if cache is None:
        return decode_huffman(value), end
    decoded = cache.get(value)
    if decoded is None:
        decoded = decode_huffman(value)  # an invalid string raises: nothing is kept
        if length <= _HUFFMAN_CACHE_STRING:
            if len(cache) >= _HUFFMAN_CACHE_SIZE:
                cache.clear()
            cache[value] = decoded
    return decoded, end


# Whole header blocks a ``LeanDecoder`` keeps decoded (per connection and direction), the
# longest one kept and its most fields: a gRPC peer sends the same bytes for every call's
# response head and trailers (indexed fields, once its table settled) and, without a per-call
# value, for every request head (a call's head has 7-10 fields, a response's 2-3). Bounded in
# fields too, since a short literal decodes to ~40 times its bytes in objects: ~21 KiB per
# decoder at most (``test_the_block_cache_is_bounded_per_connection``).
_BLOCK_CACHE_SIZE = 8
_BLOCK_CACHE_BYTES = 512
_BLOCK_CACHE_FIELDS = 16
# The lengths of kept blocks that began a longer block before its first never-indexed field
# (``LeanDecoder.prefix_ends``), the most remembered: a source proxy's request heads are
# the client's fields then a never-indexed ``x-request-id`` (and a ``grpc-timeout``) new on
# every call, so the destination finds each head's start kept and decodes only the rest.
_PREFIX_ENDS = 4


class LeanDecoder(Decoder):
    """hpack's decoder with a leaner ``decode`` for ``h2``'s raw blocks (reach 8), which keeps
    the decoding of short Huffman-coded strings (``huffman_cache``; never-indexed fields'
    strings, credentials among them, are decoded each time and never kept) and of whole
    blocks sent again (``block_cache``: a block that changed the dynamic table is not kept,
    and empties it, since what the others' indexes name may have moved; one with a
    never-indexed field is not kept either, but its fields before the first never-indexed
    one are, as the block of those bytes: ``prefix_ends``)."""

    def __init__(self, max_header_list_size: int = 65536) -> None:
        super().__init__(max_header_list_size)
        self.huffman_cache: dict[bytes, bytes] = {}
        # block -> (its fields, the size hpack counts them) while the table is as it was
        self.block_cache: dict[bytes, tuple[tuple[Any, ...], int]] = {}
        # Counts every change of the dynamic table (an insertion, a size update): what tells
        # that a block changed it (the relay's ``_decode``), which its entries alone may not
        # (an insertion of the newest entry's field that evicts one leaves as many entries,
        # the newest equal to the one before).
        self.table_changes = 0
        # Where blocks with a never-indexed field had their first one (at most
        # ``_PREFIX_ENDS``): the bytes before it were kept as a block (``block_cache``), and
        # a block that misses the cache is looked up by its first bytes up to each of these.
        # Any bytes a block of representations decoded from begin every block that starts
        # with them the same way (HPACK reads representations one after another), so a block
        # starting with kept bytes is decoded from where they end, with their fields.
        self.prefix_ends: list[int] = []

    @property
    def header_table_size(self) -> int:
        return self.header_table.maxsize

    @header_table_size.setter
    def header_table_size(self, value: int) -> None:
        """hpack's setter (a size update: entries may be evicted), and the kept blocks go."""
        self.header_table.maxsize = value
        self.block_cache.clear()
        self.table_changes += 1

    def decode(self, data: bytes, raw: bool = False) -> Iterable[HeaderTuple]:
        """The block's fields: a never-indexed one as ``NeverIndexedHeaderTuple`` (``h2`` and
        ``TablelessEncoder`` keep it so when it is forwarded), the others as plain 2-tuples,
        which is all ``h2`` and ``H2Proxy`` read of them (hpack makes a ``HeaderTuple`` of
        each, a third of a call to ``decode``). A block decoded before, with the table as it
        was then, is not decoded again (the same fields, in a new list; the same refusals)."""
        if not raw:
            self.block_cache.clear()  # hpack's own decoding may change the table
            self.table_changes += 1
            return super().decode(data, raw)
        data = bytes(data)
        blocks = self.block_cache
        kept = blocks.get(data)
        if kept is not None:
            if kept[1] > self.max_header_list_size:
                raise OversizedHeaderListError(
                    f"A header list larger than {self.max_header_list_size} has been received"
                )
            # ``_maxsize`` is what ``header_table_size`` reads through two properties
            if self.header_table._maxsize > self.max_allowed_table_size:
                raise InvalidTableSizeError("Encoder did not shrink table size to within the max")
            return list(kept[0])
        table = self.header_table
        changed = never_indexed = False
        field_at = table.get_by_index
        static, n_static = _STATIC_FIELDS, len(_STATIC_FIELDS)
        cache = self.huffman_cache
        limit = self.max_header_list_size
        fields: list[Any] = []
        size = pos = resumed = 0
        end = len(data)
        for at in self.prefix_ends:  # a kept block this one begins with: decoded from its end
            if at < end:
                kept = blocks.get(data[:at])
                if kept is not None:
                    if kept[1] > limit:
                        raise OversizedHeaderListError(
                            f"A header list larger than {limit} has been received"
                        )
                    fields, size, pos = list(kept[0]), kept[1], at
                    resumed = at
                    break
        unindexed: tuple[int, int, int] | None = None  # where the first never-indexed began
        while pos < end:
            first = data[pos]
            # An index that fits its prefix (most do) and a static entry are read in place:
            # a call each fewer per field.
            if first & 0x80:  # indexed (section 6.1)
                index = first & 0x7F
                if index == 0x7F:
                    index, pos = _integer_at(data, pos, 7)
                else:
                    pos += 1
                name, value = field = (
                    static[index - 1] if 0 < index <= n_static else field_at(index)
                )
            elif first & 0x40 or not first & 0x20:  # a literal (section 6.2)
                indexing = bool(first & 0x40)
                never = first & 0xF0 == 0x10
                if never and not never_indexed:
                    unindexed = (pos, len(fields), size)
                strings = None if never else cache
                prefix = 0x3F if indexing else 0x0F
                index = first & prefix
                if index == prefix:
                    index, pos = _integer_at(data, pos, 6 if indexing else 4)
                else:
                    pos += 1
                # A string neither Huffman-coded nor longer than its 7-bit prefix (most names
                # and values a gRPC peer sends as literals) is sliced in place.
                if index:
                    name = (static[index - 1] if index <= n_static else field_at(index))[0]
                elif pos < end and data[pos] < 0x7F:
                    after = pos + 1 + data[pos]
                    if after > end:
                        raise HPACKDecodingError("Truncated header block (a string)")
                    name, pos = data[pos + 1 : after], after
                else:
                    name, pos = _string_at(data, pos, strings)
                if pos < end and data[pos] < 0x7F:
                    after = pos + 1 + data[pos]
                    if after > end:
                        raise HPACKDecodingError("Truncated header block (a string)")
                    value, pos = data[pos + 1 : after], after
                else:
                    value, pos = _string_at(data, pos, strings)
                if indexing:
                    if not changed:  # what the kept blocks' indexes name may move
                        changed = True
                        blocks.clear()
                    self.table_changes += 1
                    table.add(name, value)
                if never:
                    field = NeverIndexedHeaderTuple(name, value)
                    never_indexed = True
                else:
                    field = (name, value)
            else:  # a dynamic table size update (section 6.3)
                if fields:
                    raise HPACKDecodingError("Table size update not at the start of the block")
                new_size, pos = _integer_at(data, pos, 5)
                if new_size > self.max_allowed_table_size:
                    raise InvalidTableSizeError("Encoder exceeded max allowable table size")
                changed = True
                self.header_table_size = new_size  # empties ``block_cache``
                continue
            size += 32 + len(name) + len(value)
            if size > limit:
                raise OversizedHeaderListError(
                    f"A header list larger than {limit} has been received"
                )
            fields.append(field)
        if table._maxsize > self.max_allowed_table_size:
            raise InvalidTableSizeError("Encoder did not shrink table size to within the max")
        if (
            not changed
            and not never_indexed
            and end <= _BLOCK_CACHE_BYTES
            and len(fields) <= _BLOCK_CACHE_FIELDS
        ):
            if len(blocks) >= _BLOCK_CACHE_SIZE:
                blocks.clear()
            blocks[data] = (tuple(fields), size)
        elif not changed and unindexed is not None and unindexed[0] != resumed:
            self._keep_prefix(data, fields, *unindexed)
        return fields

    def _keep_prefix(self, data: bytes, fields: list[Any], at: int, count: int, size: int) -> None:
        """Keep the first ``at`` bytes of ``data`` (its ``count`` fields before the first
        never-indexed one, of ``size``) as a block, and remember where such blocks end."""
        if not 0 < at <= _BLOCK_CACHE_BYTES or count > _BLOCK_CACHE_FIELDS:
            return
        blocks = self.block_cache
        if len(blocks) >= _BLOCK_CACHE_SIZE:
            blocks.clear()
        blocks[data[:at]] = (tuple(fields[:count]), size)
        ends = self.prefix_ends
        if at not in ends:
            if len(ends) >= _PREFIX_ENDS:
                ends.clear()
            ends.append(at)


_FRAME = struct.Struct(">IBI")  # 24-bit length and 8-bit type in one word, flags, stream id
_DATA, _HEADERS, _CONTINUATION = 0x0, 0x1, 0x9
_END_STREAM, _END_HEADERS, _PADDED, _PRIORITY = 0x1, 0x4, 0x8, 0x20
_STREAM_ID = 0x7FFFFFFF  # the stream id without the reserved bit


# The connection inputs the fast paths below make, and the states in which ``h2``'s connection
# state machine takes each of them without a change or an action (an open connection: all
# but GOAWAY's states). There ``_connection_input`` skips the machine's look-up (a tuple of
# two enums hashed in Python, ~10 per proxied call at the source); anywhere else it asks it.
_FAST_INPUTS = (
    ConnectionInputs.SEND_HEADERS,
    ConnectionInputs.SEND_DATA,
    ConnectionInputs.RECV_HEADERS,
    ConnectionInputs.RECV_DATA,
)
_CLIENT_OPEN, _SERVER_OPEN = ConnectionState.CLIENT_OPEN, ConnectionState.SERVER_OPEN


def _unchanged_in_open_states() -> bool:
    """Does ``h2``'s table say what ``_connection_input`` assumes (checked at import)?"""
    table = H2ConnectionStateMachine._transitions
    return all(
        table.get((state, input_)) == (None, state)
        for state in (_CLIENT_OPEN, _SERVER_OPEN)
        for input_ in _FAST_INPUTS
    )


if not _unchanged_in_open_states():  # pragma: no cover - a different h2
    raise ImportError(
        "h2's connection state machine no longer keeps an open connection open on "
        "SEND/RECV_HEADERS/DATA: agent.proxy.h2wire's _connection_input needs updating"
    )


def _connection_input(conn: H2Connection, input_: ConnectionInputs) -> list[Event]:
    """``conn.state_machine.process_input(input_)`` for one of ``_FAST_INPUTS``: nothing to
    do while the connection is open, else the machine's answer (or its ProtocolError)."""
    machine = conn.state_machine
    state = machine.state
    if state is _CLIENT_OPEN or state is _SERVER_OPEN:
        return []
    events: list[Event] = machine.process_input(input_)
    return events


# A new stream's limit check asks ``h2`` how many streams are open, which walks every stream
# it knows and forgets the closed ones (``_open_streams``), on each side of every CONNECT. Fewer
# streams known than the limit cannot be at it, so on an HBONE connection (``walk_from``, set by
# ``new_connection``), while fewer than ``WALK_FROM`` are known (or than the limit, if lower),
# the answer is known without the walk; closed streams then wait for the next walk (at most
# ``WALK_FROM`` of them, about 0.6 KB each) instead of going at once. ``H2Proxy``'s connections
# do the same (``walk_from`` set by ``h2limits.new_connection``): a late frame on a closed stream
# is answered alike kept or forgotten (``test_stream_limit_walks``).
WALK_FROM = 16


# The stream ids a side may open (``AllowedStreamIDs(client_side)`` is an enum look-up by value
# in Python, per new stream): a client's are odd, a server's even.
_ODD, _EVEN = AllowedStreamIDs.ODD, AllowedStreamIDs.EVEN


# A stream's state machine, one table per input (reach 15). ``H2StreamStateMachine.process_input``
# checks its input's type and looks ``(state, input)`` up in ``h2.stream._transitions``: hashing
# a ``StreamInputs`` member is a Python-level ``Enum.__hash__`` call, 12 per proxied connection.
# The same transitions split by input are keyed by the state alone (an ``IntEnum``: hashed in C).
_Step = tuple[Any, StreamState]  # (h2's transition function or None, the next state)
_CLOSED = StreamState.CLOSED


def _stream_steps(input_: StreamInputs) -> dict[StreamState, _Step]:
    """``h2``'s stream transitions for ``input_``, by the state they leave."""
    table = getattr(_h2_stream, "_transitions", {})  # missing: check_h2_internals names it
    return {state: step for (state, i), step in table.items() if i is input_}


def _closed_takes_informational_as_headers() -> None:
    """Make a 1xx head on a closed stream that ``h2`` still holds end like one on a stream it
    forgot. A peer's HEADERS on a stream that is gone is a stream error answered with
    RST_STREAM (STREAM_CLOSED) when we had reset the stream, else a connection error: ``h2``
    decides that from ``StreamClosedError``, which it raises for a forgotten stream at the
    look-up and for a held one in its CLOSED state's ``RECV_HEADERS`` transition. That state has
    no ``RECV_INFORMATIONAL_HEADERS`` transition, so a 1xx head on a held closed stream was a
    ``ProtocolError`` instead: the whole connection torn down where a forgotten stream would
    have had one RST_STREAM. Closed streams are held longer on our connections (``walk_from``,
    below), so a late 1xx head after a reset depended on how many streams were known; now it
    takes the same transition as any other head (``test_h2wire``'s receive comparisons, an
    input hypothesis found). ``setdefault``: an ``h2`` that has the transition keeps its own."""
    table = getattr(_h2_stream, "_transitions", None)
    if table is not None:
        headers = table[(_CLOSED, StreamInputs.RECV_HEADERS)]
        table.setdefault((_CLOSED, StreamInputs.RECV_INFORMATIONAL_HEADERS), headers)


_closed_takes_informational_as_headers()
_STEPS: dict[StreamInputs, dict[StreamState, _Step]] = {i: _stream_steps(i) for i in StreamInputs}
_S_HEADERS = _STEPS[StreamInputs.SEND_HEADERS]
_S_INFORMATIONAL = _STEPS[StreamInputs.SEND_INFORMATIONAL_HEADERS]
_S_DATA = _STEPS[StreamInputs.SEND_DATA]
_S_END = _STEPS[StreamInputs.SEND_END_STREAM]
_R_HEADERS = _STEPS[StreamInputs.RECV_HEADERS]
_R_INFORMATIONAL = _STEPS[StreamInputs.RECV_INFORMATIONAL_HEADERS]
_R_DATA = _STEPS[StreamInputs.RECV_DATA]
_R_END = _STEPS[StreamInputs.RECV_END_STREAM]


def stream_input(
    machine: H2StreamStateMachine, steps: dict[StreamState, _Step], input_: StreamInputs
) -> list[Event]:
    """``machine.process_input(input_)``, ``steps`` being ``_STEPS[input_]`` (reach 15): the
    same next state, the same transition function called with the state left, its events; an
    input the state does not take closes the stream and raises ``ProtocolError``, as does a
    transition function's ``ProtocolError`` or ``AssertionError``."""
    state = machine.state
    step = steps.get(state)
    if step is None:
        machine.state = _CLOSED
        raise ProtocolError(f"Invalid input {input_} in state {state}")
    func, machine.state = step
    if func is None:
        return []
    try:
        events: list[Event] = func(machine, state)
    except ProtocolError:
        machine.state = _CLOSED
        raise
    except AssertionError as err:
        machine.state = _CLOSED
        raise ProtocolError(err) from err
    return events


_INITIAL_WINDOW = SettingCodes.INITIAL_WINDOW_SIZE
_MAX_STREAMS = SettingCodes.MAX_CONCURRENT_STREAMS
_UNLIMITED = 2**32 + 1  # what ``Settings.max_concurrent_streams`` answers for no limit


def max_concurrent_streams(settings: Settings) -> int:
    """``settings.max_concurrent_streams`` (reach 16): the value in force, read from
    ``Settings._settings``, not through the property, ``Mapping.get`` and ``__getitem__`` (three
    calls, on each side of every CONNECT and in the pool's ``can_open_stream``); no limit (the
    setting never sent, or received and not yet in force) is ``h2``'s 2**32 + 1."""
    queue = settings._settings.get(_MAX_STREAMS)
    value = None if not queue else queue[0]
    return _UNLIMITED if value is None else value


def new_stream(conn: H2Connection, stream_id: int, allowed_ids: AllowedStreamIDs) -> H2Stream:
    """``conn._begin_new_stream(stream_id, allowed_ids)`` in fewer calls (reach 16): the same
    checks (``StreamIDTooLowError`` at or below the side's highest id, ``ProtocolError`` for the
    wrong parity), the same ``H2Stream`` with both windows from the settings in force, its
    frame size, the stream recorded and the side's highest id raised. The settings are read
    from ``Settings._settings`` (the value in force heads each setting's queue; the initial
    window size always has one), not through two properties and ``__getitem__`` each, and
    ``h2``'s three debug lines (its logger is a no-op unless the configuration names one, which
    the agent never does) are not formatted."""
    outbound = stream_id % 2 == conn.config.client_side
    highest = conn.highest_outbound_stream_id if outbound else conn.highest_inbound_stream_id
    if stream_id <= highest:
        raise StreamIDTooLowError(stream_id, highest)
    if stream_id % 2 != allowed_ids:
        raise ProtocolError("Invalid stream ID for peer.")
    stream = H2Stream(
        stream_id,
        config=conn.config,
        inbound_window_size=conn.local_settings._settings[_INITIAL_WINDOW][0],
        outbound_window_size=conn.remote_settings._settings[_INITIAL_WINDOW][0],
    )
    stream.max_outbound_frame_size = conn.max_outbound_frame_size
    conn.streams[stream_id] = stream
    if outbound:
        conn.highest_outbound_stream_id = stream_id
    else:
        conn.highest_inbound_stream_id = stream_id
    return stream


def _below_limit(conn: H2Connection, limit: int) -> bool:
    """Room for no walk: fewer streams known to ``conn`` than ``limit`` and its ``walk_from``."""
    return len(conn.streams) < min(limit, getattr(conn, "walk_from", 0))


def send_headers_on(
    conn: H2Connection,
    stream_id: int,
    headers: list[tuple[bytes, bytes]],
    *,
    end_stream: bool,
    below_limit: bool = False,
) -> None:
    """``conn.send_headers`` (without priority) in fewer steps (reach 9): the same stream
    limit, state machines, stream bookkeeping and frames. ``below_limit``: the caller has just
    counted ``conn.open_outbound_streams`` (which also forgets closed streams) and found it
    below the peer's limit, so a new stream is not counted a second time. Nor is it counted,
    on an HBONE connection, while fewer streams are known than could reach the limit
    (``WALK_FROM``)."""
    stream = _sending_stream(conn, stream_id, below_limit)
    machine = stream.state_machine
    if not machine.client and is_informational_response(headers):
        if end_stream:
            raise ProtocolError("Cannot set END_STREAM on informational responses.")
        stream_input(machine, _S_INFORMATIONAL, StreamInputs.SEND_INFORMATIONAL_HEADERS)
    else:
        stream_input(machine, _S_HEADERS, StreamInputs.SEND_HEADERS)
    block = conn.encoder.encode(headers)
    if end_stream:
        stream_input(machine, _S_END, StreamInputs.SEND_END_STREAM)
    elif machine.trailers_sent:
        raise ProtocolError("Trailers must have END_STREAM set.")
    if machine.client and stream._authority is None:
        stream._authority = authority_from_headers(headers)
    stream.request_method = extract_method_header(headers)
    _queue_headers(conn, stream_id, block, end_stream)


class HeaderBlock(NamedTuple):
    """A header list sent again and again on tableless connections (HBONE's CONNECT to one
    target, its 200), with what ``send_headers_on`` works out from the list on every send:
    the block as ``TablelessEncoder`` encodes it (that encoder keeps nothing between blocks
    but a pending table size change, which ``send_block_on`` checks), whether it is an
    informational response, and the method and authority ``h2`` keeps on the stream."""

    headers: list[tuple[bytes, bytes]]
    block: bytes
    informational: bool
    method: bytes | None
    authority: bytes | None


def header_block(headers: list[tuple[bytes, bytes]]) -> HeaderBlock:
    """``headers`` prepared for ``send_block_on`` (made once, sent many times)."""
    return HeaderBlock(
        headers,
        TablelessEncoder().encode(headers),
        is_informational_response(headers),
        extract_method_header(headers),
        authority_from_headers(headers),
    )


def send_block_on(
    conn: H2Connection, stream_id: int, prepared: HeaderBlock, *, end_stream: bool
) -> None:
    """``send_headers_on(conn, stream_id, prepared.headers, end_stream=end_stream)`` without
    encoding and scanning the list again: the same stream limit, state machines, stream
    fields and frames. A connection whose encoder is not a ``TablelessEncoder``, or has a
    table size change to send first, takes ``send_headers_on``."""
    encoder = conn.encoder
    if type(encoder) is not TablelessEncoder or encoder.header_table.resized:
        send_headers_on(conn, stream_id, prepared.headers, end_stream=end_stream)
        return
    stream = _sending_stream(conn, stream_id, False)
    machine = stream.state_machine
    if not machine.client and prepared.informational:
        if end_stream:
            raise ProtocolError("Cannot set END_STREAM on informational responses.")
        stream_input(machine, _S_INFORMATIONAL, StreamInputs.SEND_INFORMATIONAL_HEADERS)
    else:
        stream_input(machine, _S_HEADERS, StreamInputs.SEND_HEADERS)
    if end_stream:
        stream_input(machine, _S_END, StreamInputs.SEND_END_STREAM)
    elif machine.trailers_sent:
        raise ProtocolError("Trailers must have END_STREAM set.")
    if machine.client and stream._authority is None:
        stream._authority = prepared.authority
    stream.request_method = prepared.method
    _queue_headers(conn, stream_id, prepared.block, end_stream)


def _sending_stream(conn: H2Connection, stream_id: int, below_limit: bool) -> H2Stream:
    """The stream a HEADERS frame is sent on, made if new (within the peer's stream limit),
    with the connection's state machine told of the frame."""
    stream = conn.streams.get(stream_id)
    if stream is None:
        if not below_limit:  # the peer's settings are read only when a count is needed
            limit = max_concurrent_streams(conn.remote_settings)
            if not _below_limit(conn, limit):
                open_now = conn.open_outbound_streams
                if open_now + 1 > limit:
                    raise TooManyStreamsError(f"Max outbound streams is {limit}, {open_now} open")
        _connection_input(conn, ConnectionInputs.SEND_HEADERS)
        return new_stream(conn, stream_id, _ODD if conn.config.client_side else _EVEN)
    _connection_input(conn, ConnectionInputs.SEND_HEADERS)
    return stream


def _queue_headers(conn: H2Connection, stream_id: int, block: bytes, end_stream: bool) -> None:
    """``block`` framed as HEADERS (and CONTINUATIONs past the peer's frame size), queued."""
    size = conn.max_outbound_frame_size
    flags = _END_STREAM if end_stream else 0
    out = conn._data_to_send
    if len(block) <= size:
        out += _FRAME.pack(len(block) << 8 | _HEADERS, flags | _END_HEADERS, stream_id)
        out += block
        return
    kind = _HEADERS
    for start in range(0, len(block), size):
        piece = block[start : start + size]
        last = start + size >= len(block)
        out += _FRAME.pack(len(piece) << 8 | kind, flags | (_END_HEADERS if last else 0), stream_id)
        out += piece
        kind, flags = _CONTINUATION, 0


def send_data_on(conn: H2Connection, stream_id: int, data: bytes, *, end_stream: bool) -> None:
    """``conn.send_data`` for ``data`` that fits the send windows and the peer's frame size,
    in fewer steps (reach 9): the same checks, state machines, frame and window charges."""
    stream = conn.streams.get(stream_id)
    if stream is None:
        conn.send_data(stream_id, data, end_stream=end_stream)  # h2 names the stream's fate
        return
    n = len(data)
    if n > min(conn.outbound_flow_control_window, stream.outbound_flow_control_window) and n:
        raise FlowControlError(f"Cannot send {n} bytes beyond the flow control window")
    if n > conn.max_outbound_frame_size:
        raise FrameTooLargeError(f"Cannot send frame size {n} beyond the max frame size")
    _connection_input(conn, ConnectionInputs.SEND_DATA)
    machine = stream.state_machine
    stream_input(machine, _S_DATA, StreamInputs.SEND_DATA)
    if end_stream:
        stream_input(machine, _S_END, StreamInputs.SEND_END_STREAM)
    out = conn._data_to_send
    out += _FRAME.pack(n << 8 | _DATA, _END_STREAM if end_stream else 0, stream_id)
    out += data
    conn.outbound_flow_control_window -= n
    stream.outbound_flow_control_window -= n


def receive_end_stream_on(conn: H2Connection, stream_id: int) -> list[Event]:
    """What ``conn.receive_data`` does with an empty DATA frame carrying END_STREAM on a stream
    that may receive (``can_receive``), without the frame (reach 10): the same state machines,
    checks (a stream's declared content-length: ``ProtocolError``) and events. The stream's
    side is ``H2Stream.receive_data(b"", True, 0)`` written out: its ``RECV_DATA`` and
    ``RECV_END_STREAM`` inputs (reach 15), the content-length check (nothing more arrives,
    so what was received must be what was declared); charging 0 bytes to its receive window
    changes nothing (a window already below 0, which only lowering our own initial window
    size after the preface could make, is not found here: the agent never does)."""
    try:
        events = _connection_input(conn, ConnectionInputs.RECV_DATA)
        stream = conn.streams[stream_id]
        machine = stream.state_machine
        stream_events = stream_input(machine, _R_DATA, StreamInputs.RECV_DATA)
        expected = stream._expected_content_length
        if expected is not None and expected != stream._actual_content_length:
            raise InvalidBodyLengthError(expected, stream._actual_content_length)
        ended = stream_input(machine, _R_END, StreamInputs.RECV_END_STREAM)
    except ProtocolError as e:  # as ``receive_data``: GOAWAY queued, then the error raised
        conn._terminate_connection(e.error_code)
        raise
    first: Any = stream_events[0]  # a DataReceived
    first.stream_ended = ended[0]
    first.data = b""
    first.flow_controlled_length = 0
    return events + stream_events + ended


def receive_headers_on(
    conn: H2Connection, stream_id: int, block: bytes, *, end_stream: bool
) -> list[Event] | None:
    """What ``conn.receive_data`` does with a HEADERS frame carrying ``block`` whole (END_HEADERS,
    no padding or priority), without the frame (reach 11); None, having done nothing, when the
    stream is not one the fast path takes: hand the frame to ``h2`` then."""
    stream = conn.streams.get(stream_id)
    client_side = conn.config.client_side
    if stream is None:
        if (
            client_side
            or stream_id % 2 == 0
            or stream_id <= conn.highest_inbound_stream_id
            or (
                not _below_limit(conn, limit := max_concurrent_streams(conn.local_settings))
                and conn.open_inbound_streams + 1 > limit
            )
        ):
            return None
    elif stream.state_machine.state not in RECEIVING:
        return None
    try:
        headers = _h2_connection._decode_headers(conn.decoder, block)
        events = _connection_input(conn, ConnectionInputs.RECV_HEADERS)
        if stream is None:
            stream = new_stream(conn, stream_id, _EVEN if client_side else _ODD)
        stream_events = _stream_headers(conn, stream, headers, end_stream)
    except ProtocolError as e:
        conn._terminate_connection(e.error_code)
        raise
    return events + stream_events


def _stream_headers(
    conn: H2Connection, stream: H2Stream, headers: Iterable[Any], end_stream: bool
) -> list[Event]:
    """``stream.receive_headers(headers, end_stream, config.header_encoding)``'s events (reach
    13): for a connection that neither normalizes, validates nor decodes inbound headers, the
    same calls in the same order without the validation flags and the header pipeline, which
    would only copy the list; else ``receive_headers`` itself (its frames, none in ``h2``
    4, queued as ``h2`` queues them)."""
    config: Any = conn.config  # its options as stored (a descriptor per read otherwise)
    if (
        config._normalize_inbound_headers
        or config._validate_inbound_headers
        or isinstance(config._header_encoding, str)
    ):
        frames, out = stream.receive_headers(headers, end_stream, config.header_encoding)
        conn._prepare_for_sending(frames)
        return out
    machine = stream.state_machine
    if is_informational_response(headers):
        if end_stream:
            raise ProtocolError("Cannot set END_STREAM on informational responses")
        events: list[Any] = stream_input(
            machine, _R_INFORMATIONAL, StreamInputs.RECV_INFORMATIONAL_HEADERS
        )
    else:
        events = stream_input(machine, _R_HEADERS, StreamInputs.RECV_HEADERS)
    first = events[0]
    if end_stream:
        ended = stream_input(machine, _R_END, StreamInputs.RECV_END_STREAM)
        first.stream_ended = ended[0]
        events += ended
    stream._initialize_content_length(headers)
    if isinstance(first, TrailersReceived) and not end_stream:
        raise ProtocolError("Trailers must have END_STREAM set")
    first.headers = list(headers)
    return events


def receive_data_on(
    conn: H2Connection, stream: H2Stream, data: bytes, *, end_stream: bool
) -> list[Event]:
    """What ``conn.receive_data`` does with an unpadded DATA frame carrying ``data`` on
    ``stream``, which may receive (``RECEIVING``), without the frame (reach 12): the calls
    ``H2Connection._receive_data_frame`` makes (the connection's ``state_machine`` with
    ``ConnectionInputs.RECV_DATA``, its receive window charged, the stream's ``receive_data``);
    a ``ProtocolError`` (a window or a declared content-length exceeded) queues GOAWAY and is
    raised, as ``receive_data`` does."""
    try:
        events = _connection_input(conn, ConnectionInputs.RECV_DATA)
        conn._inbound_flow_control_window_manager.window_consumed(len(data))
        stream_events = _stream_data(stream, data, end_stream)
    except ProtocolError as e:
        conn._terminate_connection(e.error_code)
        raise
    return events + stream_events


def _stream_data(stream: H2Stream, data: bytes, end_stream: bool) -> list[Event]:
    """``stream.receive_data(data, end_stream, len(data))``'s events (reach 18), whose frames
    are always none: the same state machine inputs (``RECV_DATA``, then ``RECV_END_STREAM``,
    through ``stream_input``, reach 15), the stream's receive window charged
    (``_inbound_window_manager``, as ``window_consumed`` does) and its body length tracked
    against a declared content-length (``_actual_content_length``, as ``_track_content_length``
    does), in that order, with the same errors; without its debug line, two ``typing.cast``
    calls and the three helpers' calls (about seven Python calls per DATA frame, two frames a
    call at the source)."""
    machine = stream.state_machine
    events = stream_input(machine, _R_DATA, StreamInputs.RECV_DATA)
    first: Any = events[0]  # a DataReceived
    n = len(data)
    window = stream._inbound_window_manager
    window.current_window_size -= n
    if window.current_window_size < 0:
        raise FlowControlError("Flow control window shrunk below 0")
    stream._actual_content_length += n
    expected = stream._expected_content_length
    if expected is not None:
        actual = stream._actual_content_length
        if expected < actual or (end_stream and expected != actual):
            raise InvalidBodyLengthError(expected, actual)
    if end_stream:
        ended = stream_input(machine, _R_END, StreamInputs.RECV_END_STREAM)
        first.stream_ended = ended[0]
        events.extend(ended)
    first.data = data
    first.flow_controlled_length = n
    return events


# The states in which ``h2`` counts a stream open (``H2Stream.open``, ``h2.stream.STREAM_OPEN``):
# only there does acknowledging its data reopen its own window (checked at import).
_COUNTED_OPEN = (StreamState.OPEN, StreamState.HALF_CLOSED_LOCAL, StreamState.HALF_CLOSED_REMOTE)


def _processed(manager: Any, size: int) -> int | None:
    """``manager.process_bytes(size)`` (an ``h2.windows.WindowManager``, reach 17): the bytes
    counted processed, and its algorithm asked only when it may hand some back (the window is
    empty, or half of it was processed); else it would answer 0 and change nothing."""
    manager._bytes_processed += size
    if manager.current_window_size and manager._bytes_processed < manager.max_window_size // 2:
        return None
    increment: int | None = manager._maybe_update_window()
    return increment


def acknowledge_on(conn: H2Connection, size: int, stream_id: int) -> None:
    """``conn.acknowledge_received_data(size, stream_id)`` in fewer calls (reach 17): the same
    windows and the same WINDOW_UPDATE frames (the connection's, then the stream's, while
    ``h2`` counts the stream open). A stream ``conn`` does not hold (forgotten, or never
    opened) and a size ``h2`` refuses go to ``h2``, which decides (and raises) as before."""
    stream = conn.streams.get(stream_id)
    if stream is None or size < 0:
        conn.acknowledge_received_data(size, stream_id)
        return
    frames: list[Frame] = []
    increment = _processed(conn._inbound_flow_control_window_manager, size)
    if increment:
        update = WindowUpdateFrame(0)
        update.window_increment = increment
        frames.append(update)
    if stream.state_machine.state in _COUNTED_OPEN:
        increment = _processed(stream._inbound_window_manager, size)
        if increment:
            update = WindowUpdateFrame(stream_id)
            update.window_increment = increment
            frames.append(update)
    if frames:
        conn._prepare_for_sending(frames)


def receive_on(conn: H2Connection, data: bytes) -> list[Event]:
    """``conn.receive_data(data)`` with fewer steps (reach 12): the same events, states,
    windows, output and refusals. Each whole frame that is a HEADERS frame holding a whole
    header block (``receive_headers_on`` takes it) or an unpadded DATA frame on a stream that
    may receive (``receive_data_on``) skips ``h2``'s frame buffer and hyperframe's frame
    objects; the frames between them go to ``receive_data`` as they came, in order, and all
    of ``data`` does while ``h2`` holds bytes of its own (the client preface still expected,
    a frame cut across reads, a header block waiting for its CONTINUATION)."""
    buffer = conn.incoming_buffer
    if buffer._preamble_len or buffer._data or buffer._headers_buffer:
        return conn.receive_data(data)
    data = bytes(data)  # DATA events carry bytes, as hyperframe's frames do
    events: list[Event] = []
    start = pos = 0
    end = len(data)
    while end - pos >= 9:
        word, flags, stream_id = _FRAME.unpack_from(data, pos)
        length, kind = word >> 8, word & 0xFF
        after = pos + 9 + length
        if after > end:
            break
        if not (
            (kind == _HEADERS and flags & (_END_HEADERS | _PADDED | _PRIORITY) == _END_HEADERS)
            or (kind == _DATA and not flags & _PADDED)
        ):
            pos = after
            continue
        if start < pos:  # h2's frames first, in order (a SETTINGS ACK may change the limit)
            events += conn.receive_data(data[start:pos])
            start = pos
            if buffer._headers_buffer:  # a header block they opened: h2 takes the rest
                break
        taken: list[Event] | None = None
        if length <= conn.max_inbound_frame_size:  # else h2 refuses it
            stream_id &= _STREAM_ID
            payload = data[pos + 9 : after]
            end_stream = bool(flags & _END_STREAM)
            if kind == _HEADERS:
                taken = receive_headers_on(conn, stream_id, payload, end_stream=end_stream)
            else:
                stream = conn.streams.get(stream_id)
                if stream is not None and stream.state_machine.state in RECEIVING:
                    taken = receive_data_on(conn, stream, payload, end_stream=end_stream)
        pos = after
        if taken is not None:
            events += taken
            start = pos
    if start < end:
        events += conn.receive_data(data[start:])
    return events


def tableless_headers(conn: H2Connection) -> None:
    """Make ``conn`` encode header blocks with ``TablelessEncoder`` and decode them with
    ``LeanDecoder`` (keeping the limits ``h2`` set on its decoder); call before it sends."""
    conn.encoder = TablelessEncoder()
    decoder = LeanDecoder(max_header_list_size=conn.decoder.max_header_list_size)
    decoder.max_allowed_table_size = conn.decoder.max_allowed_table_size
    conn.decoder = decoder


KIB = 1024
MIB = 1024 * KIB

# Where the peer may still send DATA (RFC 9113 section 5.1), and where we may.
RECEIVING = (StreamState.OPEN, StreamState.HALF_CLOSED_LOCAL)
SENDING = (StreamState.OPEN, StreamState.HALF_CLOSED_REMOTE)


@dataclass(frozen=True, slots=True)
class HboneSettings:
    """Tunables of one HBONE connection (what each bounds: ``agent.proxy.hbone_limits``)."""

    # Flow-control windows: what a peer may send before we consumed it (``nodemesh agent
    # --hbone-window`` sets the stream window; the connection window is always four of them,
    # ``hbone_limits.with_stream_window``). Chosen by measurement (ARCHITECTURE.md, "HBONE
    # windows"): larger costs less CPU per GB and more memory per stalled stream and connection.
    stream_window: int = 4 * MIB
    connection_window: int = 16 * MIB
    max_frame_size: int = 1 * MIB
    max_header_list_size: int = 16 * KIB
    # Any frame but DATA is buffered whole by h2: longer ones are refused (ENHANCE_YOUR_CALM).
    max_control_frame: int = 16 * KIB
    # HEADERS plus its CONTINUATIONs, encoded, before END_HEADERS (h2 holds the whole block).
    max_header_block: int = 32 * KIB
    max_concurrent_streams: int = 100
    # Streams the peer reset before we answered whose handling has not finished yet: beyond this
    # it is a rapid-reset attack (CVE-2023-44487) and the connection is closed.
    max_pending_resets: int = 100
    # Replies the peer's own frames made us queue (PING and SETTINGS ACKs, RST_STREAMs) since
    # the transport last took all our output below its high-water mark: beyond this (a peer
    # that does not read, or 3800 PINGs in one read), ENHANCE_YOUR_CALM.
    max_unsent_replies: int = 64 * KIB
    ping_interval: float = 10.0
    ping_timeout: float = 20.0


def error_code(code: int) -> ErrorCodes | int:
    """The ``ErrorCodes`` member for ``code``, or the integer if the code is unknown."""
    try:
        return ErrorCodes(code)
    except ValueError:
        return code


class GracefulH2Connection(H2Connection):
    """``H2Connection`` whose GOAWAY (sent or received) leaves existing streams usable, and that
    remembers fewer closed streams.

    ``h2`` remembers how each of the last ``MAX_CLOSED_STREAMS`` streams closed (default 65536,
    about 110 bytes each: 7 MiB on a long-lived connection, whatever the peer does). 1024 covers
    every frame still in flight for a stream we closed; a frame for one closed longer ago is a
    connection error, as RFC 9113 section 5.1 allows.
    """

    MAX_CLOSED_STREAMS = 1024
    # Streams known below which a new stream's limit check skips ``h2``'s walk (see WALK_FROM).
    walk_from = 0

    def send_goaway(self, error_code: ErrorCodes, last_stream_id: int) -> None:
        frame = GoAwayFrame(stream_id=0)
        frame.last_stream_id = last_stream_id
        frame.error_code = error_code
        self._prepare_for_sending([frame])

    def _receive_goaway_frame(self, frame: GoAwayFrame) -> tuple[list[Frame], list[Event]]:
        event = ConnectionTerminated()
        event.error_code = error_code(frame.error_code)
        event.last_stream_id = frame.last_stream_id
        event.additional_data = frame.additional_data or None
        return [], [event]


def stream_state(conn: H2Connection, stream_id: int) -> StreamState | None:
    """The stream's state, or None if ``h2`` holds no stream object for it (idle or forgotten)."""
    stream = conn.streams.get(stream_id)
    return None if stream is None else stream.state_machine.state


def can_receive(conn: H2Connection, stream_id: int) -> bool:
    """May the peer still send DATA on the stream (open or half-closed by us)?"""
    stream = conn.streams.get(stream_id)
    return stream is not None and stream.state_machine.state in RECEIVING


def take_send_window(conn: H2Connection, stream_id: int, most: int) -> int:
    """Take up to ``most`` bytes from both send windows of the stream (we frame that much DATA
    ourselves); returns how many the peer's windows allowed: 0 if none, or if we may not send
    DATA on the stream (not open or half-closed by the peer). One call per DATA frame, the
    stream looked up in it (a frame per relayed message)."""
    stream = conn.streams.get(stream_id)
    if stream is None or stream.state_machine.state not in SENDING:
        return 0
    n = min(most, conn.outbound_flow_control_window, stream.outbound_flow_control_window)
    if n <= 0:
        return 0
    conn.outbound_flow_control_window -= n
    stream.outbound_flow_control_window -= n
    return n


def move_output(conn: H2Connection, into: bytearray) -> int:
    """Append what ``conn`` queued to ``into`` and empty its queue; returns how many bytes
    that was (reach 14). ``conn.data_to_send()`` copies its queue into new bytes and makes a
    new queue on every call, also when it holds nothing (most calls: the codec asks before
    every frame it builds and around every frame it hands ``h2``)."""
    pending: bytearray = conn._data_to_send
    n = len(pending)
    if n:
        into += pending
        pending.clear()
    return n


def take_output(conn: H2Connection) -> bytearray | bytes:
    """What ``conn.data_to_send()`` returns, without its copy (reach 14): ``conn``'s queue
    itself (a new one takes its place), or ``b""`` when it holds nothing."""
    pending: bytearray = conn._data_to_send
    if not pending:
        return b""
    conn._data_to_send = bytearray()
    return pending


def check_h2_internals() -> None:
    """Fail at once, naming the member, if the installed ``h2`` lacks what this module uses."""
    missing = [
        n
        for n in (
            "_prepare_for_sending",
            "_receive_goaway_frame",
            "_terminate_connection",
            "_begin_new_stream",
        )
        if not hasattr(H2Connection, n)
    ]
    if not hasattr(_h2_connection, "_decode_headers"):
        missing.append("h2.connection._decode_headers")
    if not hasattr(Encoder, "_encode_table_size_change"):
        missing.append("hpack.Encoder._encode_table_size_change")
    table = getattr(Decoder(), "header_table", None)
    if not (hasattr(table, "get_by_index") and hasattr(table, "add")):
        missing.append("hpack.Decoder.header_table (get_by_index, add)")
    if getattr(table, "_maxsize", None) != getattr(table, "maxsize", 0):
        missing.append("hpack.HeaderTable._maxsize (what maxsize reads)")
    probe = H2Connection(H2Configuration(client_side=True))
    buffer = getattr(probe, "incoming_buffer", None)
    for n in ("_preamble_len", "_data", "_headers_buffer"):
        if not hasattr(buffer, n):
            missing.append(f"H2Connection.incoming_buffer.{n}")
    if not hasattr(getattr(probe, "_inbound_flow_control_window_manager", None), "window_consumed"):
        missing.append("H2Connection._inbound_flow_control_window_manager.window_consumed")
    if not isinstance(getattr(probe, "_data_to_send", None), bytearray):
        missing.append("H2Connection._data_to_send (a bytearray)")
    if not hasattr(getattr(probe, "state_machine", None), "process_input"):
        missing.append("H2Connection.state_machine")
    transitions = getattr(_h2_stream, "_transitions", None)
    used = (StreamInputs.SEND_HEADERS, StreamInputs.RECV_END_STREAM, StreamInputs.SEND_DATA)
    if not isinstance(transitions, dict) or not all(_STEPS[i] for i in used):
        missing.append("h2.stream._transitions (by state and StreamInputs)")
    window = getattr(probe.local_settings, "_settings", {}).get(_INITIAL_WINDOW)
    if not window or window[0] != probe.local_settings.initial_window_size:
        missing.append("h2.settings.Settings._settings (a queue per setting)")
    if not isinstance(getattr(probe, "encoder", None), Encoder):
        missing.append("H2Connection.encoder (an hpack.Encoder)")
    for n in ("_normalize_inbound_headers", "_validate_inbound_headers", "_header_encoding"):
        if not hasattr(probe.config, n):
            missing.append(f"H2Configuration.{n}")
    probe.initiate_connection()
    probe.send_headers(1, [(":method", "CONNECT"), (":authority", "127.0.0.1:1")])
    stream = probe.streams.get(1)
    if not hasattr(probe, "outbound_flow_control_window"):
        missing.append("H2Connection.outbound_flow_control_window")
    if stream is None:
        missing.append("H2Connection.streams (a stream object per open stream)")
    else:
        if not isinstance(
            getattr(getattr(stream, "state_machine", None), "state", None), StreamState
        ):
            missing.append("H2Stream.state_machine.state")
        if not hasattr(stream, "outbound_flow_control_window"):
            missing.append("H2Stream.outbound_flow_control_window")
        for n in (
            "_initialize_content_length",
            "_expected_content_length",
            "_inbound_window_manager",
        ):
            if not hasattr(stream, n):
                missing.append(f"H2Stream.{n}")
        if not hasattr(stream, "_actual_content_length"):
            missing.append("H2Stream._actual_content_length")
    counted = getattr(_h2_stream, "STREAM_OPEN", None)
    if not isinstance(counted, list) or {state for state in StreamState if counted[state]} != set(
        _COUNTED_OPEN
    ):
        missing.append("h2.stream.STREAM_OPEN (the states H2Stream.open counts)")
    manager = getattr(probe, "_inbound_flow_control_window_manager", None)
    for n in ("_bytes_processed", "current_window_size", "max_window_size"):
        if not hasattr(manager, n):
            missing.append(f"h2.windows.WindowManager.{n}")
    if not hasattr(manager, "_maybe_update_window"):
        missing.append("h2.windows.WindowManager._maybe_update_window")
    if missing:
        raise ImportError(
            f"the installed h2 lacks {', '.join(missing)}, which agent.proxy.h2wire needs: "
            "install the h2 version pinned in pyproject.toml (h2>=4.1,<5)"
        )


check_h2_internals()


def new_connection(*, client_side: bool, settings: HboneSettings) -> GracefulH2Connection:
    """An HTTP/2 connection with HBONE's settings and preface queued. The connection window
    beyond HTTP/2's initial 65,535 bytes is granted by ``hbone_flow.DataFlow`` as streams open,
    from the agent's buffer budget (``agent.proxy.budget``).

    Header names and values stay bytes (``header_encoding=None``): the codec decodes them itself
    so that a peer's invalid UTF-8 is a protocol error it reports, not an exception from ``h2``.
    """
    conn = GracefulH2Connection(
        H2Configuration(
            client_side=client_side, header_encoding=None, validate_inbound_headers=True
        )
    )
    conn.walk_from = WALK_FROM
    conn.local_settings = Settings(
        client=client_side,
        initial_values={
            SettingCodes.INITIAL_WINDOW_SIZE: settings.stream_window,
            SettingCodes.MAX_FRAME_SIZE: settings.max_frame_size,
            SettingCodes.MAX_HEADER_LIST_SIZE: settings.max_header_list_size,
            SettingCodes.MAX_CONCURRENT_STREAMS: settings.max_concurrent_streams,
            SettingCodes.ENABLE_PUSH: 0,
        },
    )
    # H2Connection copies these two from its settings in __init__, before ours replaced them.
    conn.max_inbound_frame_size = settings.max_frame_size
    conn.decoder.max_header_list_size = settings.max_header_list_size
    conn.initiate_connection()
    return conn
