"""One test per reach into ``h2``'s non-public members (``agent.proxy.h2wire``): each fails, and
names the member, if an ``h2`` upgrade changes what the codec relies on."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from functools import partial

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.frame_buffer
import h2.settings
import h2.stream
import hpack
import pytest
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.stream import StreamState
from hypothesis import example, given, settings
from hypothesis import strategies as st

from agent.proxy import h2data, h2wire
from agent.proxy.h2limits import H2Limits
from agent.proxy.h2limits import new_connection as new_proxy_connection
from agent.proxy.h2wire import GracefulH2Connection, HboneSettings, new_connection

CONNECT = [(":method", "CONNECT"), (":authority", "10.0.0.2:80")]


def connected() -> tuple[GracefulH2Connection, H2Connection]:
    """Our client connection and a plain h2 server, SETTINGS exchanged, stream 1 open."""
    ours = new_connection(client_side=True, settings=HboneSettings())
    plain = H2Connection(h2.config.H2Configuration(client_side=False))
    plain.initiate_connection()
    plain.receive_data(ours.data_to_send())
    ours.receive_data(plain.data_to_send())
    plain.receive_data(ours.data_to_send())
    ours.send_headers(1, CONNECT)
    plain.receive_data(ours.data_to_send())
    plain.send_headers(1, [(":status", "200")])
    ours.receive_data(plain.data_to_send())
    return ours, plain


def test_the_members_exist() -> None:
    h2wire.check_h2_internals()  # raises ImportError naming what is missing


def test_prepare_for_sending_still_queues_our_goaway() -> None:
    """Reach 1a: ``H2Connection._prepare_for_sending`` serializes frames into the output."""
    ours, plain = connected()
    ours.send_goaway(ErrorCodes.NO_ERROR, 1)
    (event,) = plain.receive_data(ours.data_to_send())
    assert isinstance(event, h2.events.ConnectionTerminated), "_prepare_for_sending changed"
    ours.send_data(1, b"after our GOAWAY")  # h2's own send_goaway would refuse this
    assert ours.data_to_send()


def test_receive_goaway_frame_is_still_the_hook() -> None:
    """Reach 1b: ``H2Connection._receive_goaway_frame`` is what h2 calls for a GOAWAY."""
    ours, plain = connected()
    plain.close_connection(error_code=ErrorCodes.NO_ERROR, last_stream_id=1)
    (event,) = ours.receive_data(plain.data_to_send())
    assert isinstance(event, h2.events.ConnectionTerminated)
    assert event.error_code is ErrorCodes.NO_ERROR and event.last_stream_id == 1
    ours.send_data(1, b"still flowing")  # our override kept the connection state usable
    assert ours.data_to_send(), "_receive_goaway_frame is no longer the GOAWAY hook"


@pytest.mark.parametrize(
    ("step", "state"),
    [
        ("open", StreamState.OPEN),
        ("end ours", StreamState.HALF_CLOSED_LOCAL),
        ("end theirs", StreamState.HALF_CLOSED_REMOTE),
        ("reset", StreamState.CLOSED),
    ],
)
def test_stream_state_follows_h2s_state_machine(step: str, state: StreamState) -> None:
    """Reach 2: ``H2Stream.state_machine.state``, via ``H2Connection.streams``."""
    ours, plain = connected()
    if step == "end ours":
        ours.end_stream(1)
    elif step == "end theirs":
        plain.end_stream(1)
        ours.receive_data(plain.data_to_send())
    elif step == "reset":
        ours.reset_stream(1)
    assert h2wire.stream_state(ours, 1) is state, "H2Stream.state_machine.state changed"
    assert h2wire.can_receive(ours, 1) is (state in h2wire.RECEIVING)
    assert h2wire.take_send_window(ours, 1, 1) == (1 if state in h2wire.SENDING else 0)
    assert h2wire.stream_state(ours, 3) is None


def test_send_windows_are_the_ones_h2_applies_window_updates_to() -> None:
    """Reach 3: the connection's and the stream's ``outbound_flow_control_window``."""
    ours, plain = connected()
    before = ours.local_flow_control_window(1)  # h2's public view of both windows
    assert h2wire.take_send_window(ours, 1, 1000) == 1000
    assert ours.local_flow_control_window(1) == before - 1000, "outbound_flow_control_window"
    assert h2wire.take_send_window(ours, 1, 10**9) == before - 1000  # what is left
    assert h2wire.take_send_window(ours, 1, 1) == 0
    plain.increment_flow_control_window(before)
    plain.increment_flow_control_window(before, stream_id=1)
    ours.receive_data(plain.data_to_send())  # h2 applies the WINDOW_UPDATEs to the same fields
    assert ours.local_flow_control_window(1) == before


def test_closed_stream_memory_is_bounded() -> None:
    """Reach 4: ``MAX_CLOSED_STREAMS`` still sizes h2's memory of closed streams."""
    ours, plain = connected()
    closed = 1500
    for sid in range(3, 3 + 2 * closed, 2):
        ours.send_headers(sid, CONNECT)
        ours.reset_stream(sid)
        plain.receive_data(ours.data_to_send())
    assert len(ours._closed_streams) == 1024, (
        "MAX_CLOSED_STREAMS no longer bounds H2Connection._closed_streams"
    )


def test_error_code_keeps_unknown_codes() -> None:
    assert h2wire.error_code(11) is ErrorCodes.ENHANCE_YOUR_CALM
    assert h2wire.error_code(0xBEEF) == 0xBEEF


def test_received_frames_are_not_formatted_for_a_trace_nobody_reads(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Reach 5: ``h2`` parses a frame without hyperframe's ``repr`` (3 to 6 µs each)."""
    import hyperframe.frame

    def refuse(_frame: object) -> str:
        raise AssertionError("h2 formatted a received frame with repr()")

    monkeypatch.setattr(hyperframe.frame.Frame, "__repr__", refuse)
    client = H2Connection(h2.config.H2Configuration(client_side=True))
    server = H2Connection(h2.config.H2Configuration(client_side=False))
    client.initiate_connection()
    server.initiate_connection()
    client.send_headers(
        1, [(":method", "GET"), (":scheme", "http"), (":path", "/"), (":authority", "a")]
    )
    client.send_data(1, b"hello", end_stream=True)
    events = server.receive_data(client.data_to_send())
    assert any(isinstance(e, h2.events.DataReceived) for e in events)
    assert h2wire.frame_kind(hyperframe.frame.DataFrame(1)) == "DataFrame"


def test_tableless_headers_sends_literals_without_huffman_coding_or_table() -> None:
    """Reach 6: ``H2Connection.encoder`` is what ``send_headers`` encodes with; after
    ``tableless_headers`` a new value goes out as its own bytes, every block is encoded alone
    (the same head twice gives the same bytes: nothing entered a dynamic table), and a plain
    h2 peer reads it."""
    value = b"0f8fad5b-d9cb-469f-a165-70867728950e"
    head = [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"), (b":authority", b"a")]
    sent: dict[bool, list[bytes]] = {}
    for tableless in (False, True):
        client = H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
        if tableless:
            h2wire.tableless_headers(client)
        client.initiate_connection()
        server = H2Connection(h2.config.H2Configuration(client_side=False, header_encoding=None))
        server.initiate_connection()
        server.receive_data(client.data_to_send())
        sent[tableless] = []
        for stream_id in (1, 3):
            client.send_headers(stream_id, [*head, (b"x-request-id", value)], end_stream=True)
            sent[tableless].append(client.data_to_send())
            (request, _ended) = server.receive_data(sent[tableless][-1])
            assert (b"x-request-id", value) in request.headers
        assert not server.decoder.header_table.dynamic_entries or not tableless
    assert value not in sent[False][0], "h2 no longer Huffman-codes by default: reach 6 is moot"
    assert sent[False][0][9:] != sent[False][1][9:], "hpack's encoder no longer indexes fields"
    assert value in sent[True][0], "H2Connection.encoder is no longer what send_headers uses"
    assert sent[True][0][9:] == sent[True][1][9:]  # the frame header names the stream


def test_tableless_headers_signals_the_table_size_the_peer_set() -> None:
    """Reach 6: ``h2`` sets the encoder's ``header_table_size`` from the peer's SETTINGS, and
    the next block must signal the new size (RFC 7541 section 4.2) even though ours never
    holds an entry: a peer that lowered it to 0 refuses a block without that update."""
    ours = H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
    h2wire.tableless_headers(ours)
    ours.initiate_connection()
    peer = H2Connection(h2.config.H2Configuration(client_side=False, header_encoding=None))
    peer.initiate_connection()
    peer.update_settings({h2.settings.SettingCodes.HEADER_TABLE_SIZE: 0})
    peer.receive_data(ours.data_to_send())
    ours.receive_data(peer.data_to_send())
    peer.receive_data(ours.data_to_send())  # our ACK: the peer now holds us to size 0
    assert peer.decoder.max_allowed_table_size == 0
    ours.send_headers(1, [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"),
                          (b":authority", b"a")], end_stream=True)  # fmt: skip
    (request, _ended) = peer.receive_data(ours.data_to_send())
    assert isinstance(request, h2.events.RequestReceived)


def test_lean_decoder_replaces_h2s_decoder_with_its_limits() -> None:
    """Reach 8: ``H2Connection.decoder`` is what ``h2`` decodes received blocks with, and
    ``tableless_headers`` keeps the header-list limit set on it before."""
    conn = H2Connection(h2.config.H2Configuration(client_side=False, header_encoding=None))
    conn.decoder.max_header_list_size = 1234
    h2wire.tableless_headers(conn)
    assert isinstance(conn.decoder, h2wire.LeanDecoder)
    assert conn.decoder.max_header_list_size == 1234


def test_hpack_logs_nothing_while_coding(monkeypatch: pytest.MonkeyPatch) -> None:
    """Reach 7: hpack's ``log`` module globals are what it logs each header through."""
    import logging

    from hpack import Decoder, Encoder

    def refuse(*_args: object, **_kw: object) -> None:
        raise AssertionError("hpack called logging")

    monkeypatch.setattr(logging.Logger, "debug", refuse)
    monkeypatch.setattr(logging.Logger, "isEnabledFor", refuse)
    encoder, decoder = Encoder(), Decoder()
    encoder.header_table_size = 64  # evictions log too
    headers = [(b"x-request-id", b"%d" % i) for i in range(8)]
    assert decoder.decode(encoder.encode(headers), raw=True) == headers


def _served_stream() -> tuple[H2Connection, H2Connection]:
    """A connection as ``H2Proxy`` makes them (server side, ``tableless_headers``) and a plain
    h2 client whose request on stream 1 arrived (ended)."""
    ours = new_proxy_connection(client_side=False, limits=H2Limits())
    plain = H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
    plain.initiate_connection()
    plain.send_headers(1, [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"),
                           (b":authority", b"a")], end_stream=True)  # fmt: skip
    ours.receive_data(plain.data_to_send())
    plain.receive_data(ours.data_to_send())
    ours.receive_data(plain.data_to_send())
    ours.data_to_send()
    return ours, plain


BLOCKS = st.lists(
    st.tuples(st.sampled_from([b"x-a", b"content-type", b"grpc-status"]), st.binary(max_size=40)),
    min_size=1,
    max_size=4,
)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from([b"", b"100", b"200", b"503"]), BLOCKS, st.booleans()),
        min_size=1,
        max_size=4,
    )
)
def test_send_headers_on_writes_and_moves_state_as_h2s_send_headers(
    steps: list[tuple[bytes, list[tuple[bytes, bytes]], bool]],
) -> None:
    """Reach 9: ``send_headers_on`` drives ``H2Connection.state_machine``, the stream's
    ``state_machine`` (informational heads, END_STREAM, trailers) and appends to
    ``H2Connection._data_to_send``: the same bytes, states and refusals as ``h2``'s own on a
    connection ``H2Proxy`` made, for any non-empty block (``h2`` fails on an empty one:
    ``test_h2proxy``'s empty trailers)."""
    ours, _ = _served_stream()
    theirs, _ = _served_stream()
    for status, fields, end in steps:
        block = ([(b":status", status)] if status else []) + fields
        outcome = []
        for conn, send in ((ours, h2wire.send_headers_on), (theirs, None)):
            try:
                if send is None:
                    conn.send_headers(1, block, end_stream=end)
                else:
                    send(conn, 1, block, end_stream=end)
                outcome.append(bytes(conn.data_to_send()))
            except h2.exceptions.ProtocolError as e:
                outcome.append(type(e).__name__)
            outcome.append(h2wire.stream_state(conn, 1))
        assert outcome[:2] == outcome[2:]


def test_send_headers_on_splits_a_long_block_into_continuations() -> None:
    """Reach 9: a block longer than the peer's frame size goes as HEADERS and CONTINUATIONs,
    END_HEADERS on the last, and the peer reads the whole block."""
    ours, plain = _served_stream()
    value = b"v" * 40000
    h2wire.send_headers_on(ours, 1, [(b":status", b"200"), (b"x-big", value)], end_stream=True)
    wire = ours.data_to_send()
    assert wire[3] == 0x1 and wire[4] == 0x1  # HEADERS, END_STREAM without END_HEADERS
    events = plain.receive_data(wire)
    (response,) = [e for e in events if isinstance(e, h2.events.ResponseReceived)]
    assert (b"x-big", value) in response.headers
    assert any(isinstance(e, h2.events.StreamEnded) for e in events)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 40000), st.booleans()), min_size=1, max_size=5),
    st.booleans(),
)
def test_send_data_on_writes_and_moves_state_as_h2s_send_data(
    steps: list[tuple[int, bool]], head_first: bool
) -> None:
    """Reach 9 (and 3): ``send_data_on`` drives the state machines' ``SEND_DATA`` and
    ``SEND_END_STREAM``, appends the frame and charges both send windows: the same bytes,
    states, windows and refusals (beyond a window, the frame size, after END_STREAM) as
    ``h2``'s own ``send_data``."""
    ours, _ = _served_stream()
    theirs, _ = _served_stream()
    for conn in (ours, theirs):
        if head_first:
            conn.send_headers(1, [(b":status", b"200")])
        conn.data_to_send()
    for size, end in steps:
        data = bytes(size % 251 for size in range(size))
        outcome = []
        for conn, fast in ((ours, True), (theirs, False)):
            try:
                if fast:
                    h2wire.send_data_on(conn, 1, data, end_stream=end)
                else:
                    conn.send_data(1, data, end_stream=end)
                outcome.append(bytes(conn.data_to_send()))
            except h2.exceptions.ProtocolError as e:
                outcome.append(type(e).__name__)
            outcome.append(h2wire.stream_state(conn, 1))
            outcome.append(conn.outbound_flow_control_window)
            stream = conn.streams.get(1)
            outcome.append(stream.outbound_flow_control_window if stream else None)
        assert outcome[:4] == outcome[4:]


def _upstream_connection() -> H2Connection:
    """A client connection as ``H2Proxy`` makes them, whose peer allows two streams at once."""
    ours = new_proxy_connection(client_side=True, limits=H2Limits())
    plain = H2Connection(h2.config.H2Configuration(client_side=False, header_encoding=None))
    plain.initiate_connection()
    plain.update_settings({h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 2})
    plain.receive_data(ours.data_to_send())
    ours.receive_data(plain.data_to_send())
    ours.data_to_send()
    return ours


REQUEST = [(b":method", b"HEAD"), (b":scheme", b"http"), (b":path", b"/"), (b":authority", b"a")]
# Blocks sent on streams 1-7 of an upstream connection: (stream, a request head first?, more
# fields, END_STREAM).
OPENING_STEPS = st.lists(
    st.tuples(st.sampled_from([1, 3, 5, 7]), st.booleans(), BLOCKS, st.booleans()),
    min_size=1,
    max_size=6,
)


@settings(max_examples=200, deadline=None)
@given(OPENING_STEPS)
def test_send_headers_on_opens_streams_as_h2s_send_headers(
    steps: list[tuple[int, bool, list[tuple[bytes, bytes]], bool]],
) -> None:
    """Reach 9: a block that opens a stream gets the peer's stream limit, the stream id
    rules, the new stream's windows, ``_authority`` and ``request_method`` exactly as with
    ``h2``'s ``send_headers``; so do later blocks (trailers) on it."""
    ours, theirs = _upstream_connection(), _upstream_connection()
    for stream_id, head, fields, end in steps:
        block = (REQUEST if head else []) + fields
        outcome = []
        for conn, fast in ((ours, True), (theirs, False)):
            try:
                if fast:
                    h2wire.send_headers_on(conn, stream_id, block, end_stream=end)
                else:
                    conn.send_headers(stream_id, block, end_stream=end)
                outcome.append(bytes(conn.data_to_send()))
            except h2.exceptions.ProtocolError as e:
                outcome.append(type(e).__name__)
            stream = conn.streams.get(stream_id)
            outcome += [
                h2wire.stream_state(conn, stream_id),
                conn.highest_outbound_stream_id,
                conn.open_outbound_streams,
                stream and (stream.request_method, stream._authority),
                stream
                and (stream.inbound_flow_control_window, stream.outbound_flow_control_window),
            ]
        assert outcome[:6] == outcome[6:]


def _send_both(
    ours: H2Connection, theirs: H2Connection, sid: int, block: list[tuple[bytes, bytes]], end: bool
) -> list[object]:
    """``block`` sent prepared on ``ours`` (``send_block_on``) and as a list on ``theirs``
    (``send_headers_on``): for each, the bytes or the refusal, and the stream after."""
    prepared = h2wire.header_block(block)
    outcome: list[object] = []
    for conn, fast in ((ours, True), (theirs, False)):
        try:
            if fast:
                h2wire.send_block_on(conn, sid, prepared, end_stream=end)
            else:
                h2wire.send_headers_on(conn, sid, block, end_stream=end)
            outcome.append(bytes(conn.data_to_send()))
        except h2.exceptions.ProtocolError as e:
            outcome.append(type(e).__name__)
        stream = conn.streams.get(sid)
        outcome += [
            h2wire.stream_state(conn, sid),
            conn.open_outbound_streams,
            stream and (stream.request_method, stream._authority),
        ]
    return outcome


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from([b"", b"100", b"200", b"503"]), BLOCKS, st.booleans()),
        min_size=1,
        max_size=4,
    ),
    st.booleans(),
)
def test_send_block_on_answers_as_send_headers_on(
    steps: list[tuple[bytes, list[tuple[bytes, bytes]], bool]], resized: bool
) -> None:
    """A prepared block (``header_block``: encoded once, its method, authority and whether
    it is informational found once) sent on a served stream: the same bytes, states and
    refusals (END_STREAM on a 1xx, trailers without it) as ``send_headers_on`` with its list
    (which ``test_send_headers_on_writes_and_moves_state_as_h2s_send_headers`` holds to
    ``h2``'s own); also when the encoder has a table size change to signal first, which the
    prepared block does not carry (``resized``: the first block sent encodes it)."""
    ours, _ = _served_stream()
    theirs, _ = _served_stream()
    if resized:
        for conn in (ours, theirs):
            conn.encoder.header_table_size = 0
            assert conn.encoder.header_table.resized
    for status, fields, end in steps:
        block = ([(b":status", status)] if status else []) + fields
        outcome = _send_both(ours, theirs, 1, block, end)
        assert outcome[:4] == outcome[4:]


@settings(max_examples=200, deadline=None)
@given(OPENING_STEPS)
def test_send_block_on_opens_streams_as_send_headers_on(
    steps: list[tuple[int, bool, list[tuple[bytes, bytes]], bool]],
) -> None:
    """A prepared block that opens a stream: the peer's stream limit, the id rules, the
    stream's ``request_method`` and ``_authority`` as ``send_headers_on`` gives them (and,
    ``test_send_headers_on_opens_streams_as_h2s_send_headers``, ``h2``'s ``send_headers``)."""
    ours, theirs = _upstream_connection(), _upstream_connection()
    for stream_id, head, fields, end in steps:
        block = (REQUEST if head else []) + fields
        outcome = _send_both(ours, theirs, stream_id, block, end)
        assert outcome[:4] == outcome[4:]


def _stream_receiving(
    *, client_side: bool, half_closed: bool, length: bytes | None
) -> tuple[H2Connection, H2Connection]:
    """Our HBONE connection (``client_side``) and a plain peer, stream 1 open both ways (or
    half-closed by us); ``length``: a content-length the peer's request or response declared."""
    ours = new_connection(client_side=client_side, settings=HboneSettings())
    plain = H2Connection(
        h2.config.H2Configuration(client_side=not client_side, validate_outbound_headers=False)
    )
    plain.initiate_connection()
    plain.receive_data(ours.data_to_send())
    ours.receive_data(plain.data_to_send())
    extra = [("content-length", length.decode())] if length is not None else []
    if client_side:
        ours.send_headers(1, CONNECT)
        plain.receive_data(ours.data_to_send())
        plain.send_headers(1, [(":status", "200"), *extra])
    else:
        plain.send_headers(1, CONNECT + extra)
        ours.receive_data(plain.data_to_send())
        ours.send_headers(1, [(":status", "200")])
    ours.receive_data(plain.data_to_send())
    if half_closed:
        ours.end_stream(1)
    return ours, plain


@pytest.mark.parametrize("client_side", [True, False])
@pytest.mark.parametrize("half_closed", [False, True])
@pytest.mark.parametrize("length", [None, b"0", b"5"])
def test_receive_end_stream_on_moves_state_as_h2s_receive_data(
    client_side: bool, half_closed: bool, length: bytes | None
) -> None:
    """Reach 10: ``receive_end_stream_on`` makes the calls ``h2``'s ``receive_data`` makes for
    an empty DATA frame with END_STREAM (``H2Connection.state_machine``, ``H2Stream.
    receive_data``): the same events, stream state, output and content-length refusal."""
    outcomes = []
    for fast in (True, False):
        ours, _ = _stream_receiving(client_side=client_side, half_closed=half_closed, length=length)
        ours.data_to_send()
        try:
            if fast:
                events = h2wire.receive_end_stream_on(ours, 1)
            else:
                events = ours.receive_data(bytes.fromhex("000000000100000001"))
            outcome: object = [
                (
                    type(e).__name__,
                    getattr(e, "stream_id", None),
                    getattr(e, "data", None),
                    getattr(e, "flow_controlled_length", None),
                    type(getattr(e, "stream_ended", None)).__name__,
                )
                for e in events
            ]
        except h2.exceptions.ProtocolError as e:
            outcome = type(e).__name__
        outcomes.append((outcome, h2wire.stream_state(ours, 1), bytes(ours.data_to_send())))
    assert outcomes[0] == outcomes[1]
    if length == b"5":
        assert outcomes[0][0] == "InvalidBodyLengthError"


def _headers_outcome(conn: H2Connection, sid: int, events: object) -> object:
    described = [
        (type(e).__name__, getattr(e, "stream_id", None), getattr(e, "headers", None))
        for e in events  # type: ignore[attr-defined]
    ]
    states = {i: _stream_view(conn, i) for i in range(1, 12)}
    return described, states, conn.highest_inbound_stream_id, bytes(conn.data_to_send())


def _stream_view(conn: H2Connection, sid: int) -> object:
    """A stream's state, with a closed stream ``h2`` still holds equal to one it forgot: the
    HBONE fast path leaves closed streams to the next walk (``h2wire.WALK_FROM``), where ``h2``
    forgets them at each new stream's count; either way ``h2`` answers a later frame from how
    the stream was closed (``_stream_closed_by``), which is compared instead."""
    state = h2wire.stream_state(conn, sid)
    if state is None or state is StreamState.CLOSED:
        return "closed or unknown", conn._stream_closed_by(sid)
    return state


def _late_frames_outcome(conn: H2Connection) -> list[object]:
    """What ``conn`` answers to a DATA frame on each stream id, in turn (a kept closed stream
    and a forgotten one must be answered alike), up to the first connection error."""
    answers: list[object] = []
    for sid in range(1, 12, 2) if not conn.config.client_side else range(1, 12):
        frame = h2data.data_frame_header(1, sid) + b"x"
        try:
            events = conn.receive_data(frame)
        except Exception as e:
            answers.append((sid, type(e).__name__, bytes(conn.data_to_send())))
            break
        described = [(type(e).__name__, getattr(e, "stream_id", None)) for e in events]
        answers.append((sid, described, bytes(conn.data_to_send())))
    return answers


@settings(max_examples=300, deadline=None)
@given(
    st.booleans(),
    st.lists(st.sampled_from([1, 3, 5]), max_size=3, unique=True),
    st.lists(
        st.tuples(
            st.sampled_from([0, 1, 2, 3, 5, 7, 9, 11]),
            st.sampled_from(["connect", "status", "garbage", "huge"]),
            st.booleans(),
        ),
        min_size=1,
        max_size=4,
    ),
    st.integers(1, 3),
)
def test_receive_headers_on_moves_state_as_h2s_receive_data(
    client_side: bool,
    opened: list[int],
    frames: list[tuple[int, str, bool]],
    max_streams: int,
) -> None:
    """Reach 11: for any HEADERS frame that is a whole block, ``receive_headers_on`` either
    declines (and ``h2`` gets the frame) or makes ``h2``'s own calls: the same events,
    stream states, highest stream id, output and refusals as ``receive_data`` of the frame, on
    either side, for new, open, half-closed and closed streams, wrong ids, a stream limit,
    undecodable and oversized blocks."""
    hbone = HboneSettings(max_concurrent_streams=max_streams, max_header_list_size=1024)
    conns = [new_connection(client_side=client_side, settings=hbone) for _ in range(2)]
    peer = H2Connection(
        h2.config.H2Configuration(client_side=not client_side, validate_outbound_headers=False)
    )
    peer.initiate_connection()
    preface = peer.data_to_send()
    for conn in conns:
        conn.receive_data(preface)
        conn.data_to_send()
    for sid in sorted(opened)[:max_streams]:  # opened before; 3 ended by us, 5 by the peer
        for conn in conns:
            if client_side:
                conn.send_headers(sid, CONNECT, end_stream=sid == 3)
            else:
                conn.receive_data(_frame(sid, CONNECT, sid == 5))
            conn.data_to_send()
    encoder = hpack.Encoder()
    for sid, kind, end in frames:
        if kind == "connect":
            block = encoder.encode(CONNECT)
        elif kind == "status":
            block = encoder.encode([(":status", "200")])
        elif kind == "huge":
            block = encoder.encode([(":status", "200"), ("x-big", "v" * 2000)])
        else:
            block = b"\xff\xff\xff\xff\xff"
        flags = 0x4 | (0x1 if end else 0)
        frame = h2data.headers_frame(sid, flags, block)
        outcomes = []
        for fast, conn in zip((True, False), conns, strict=True):
            try:
                events = (
                    h2wire.receive_headers_on(conn, sid, block, end_stream=end) if fast else None
                )
                if events is None:
                    events = conn.receive_data(frame)
                outcome = _headers_outcome(conn, sid, events)
            except Exception as e:  # the codec fails the connection on any of them
                outcome = (type(e).__name__, _headers_outcome(conn, sid, []))
            outcomes.append(outcome)
        assert outcomes[0] == outcomes[1]
        if isinstance(outcomes[0][0], str):
            return
    assert _late_frames_outcome(conns[0]) == _late_frames_outcome(conns[1])


def _frame(sid: int, headers: list[tuple[str, str]], end: bool) -> bytes:
    return h2data.headers_frame(sid, 0x4 | (0x1 if end else 0), hpack.Encoder().encode(headers))


def _raw(kind: int, flags: int, sid: int, payload: bytes) -> bytes:
    return h2data.FRAME_HEADER.pack(len(payload) << 8 | kind, flags, sid) + payload


_PROXY_LIMITS = H2Limits(stream_window=1000, connection_window=65535, max_frame_size=16384)


def _frames_for(step: tuple[str, int, int, bool], encoder: hpack.Encoder) -> bytes:
    """Raw frames a client (or, with ``:status``, a pod) may send, good and bad."""
    kind, sid, n, end = step
    es = 0x1 if end else 0
    if kind == "request":
        block = encoder.encode([*REQUEST, (b"x-n", b"%d" % n)])
        return _raw(0x1, 0x4 | es, sid, block)
    if kind == "response":
        return _raw(0x1, 0x4 | es, sid, encoder.encode([(b":status", b"200"), (b"x-n", b"%d" % n)]))
    if kind == "trailers":
        return _raw(0x1, 0x4 | es, sid, encoder.encode([(b"grpc-status", b"%d" % (n % 17))]))
    if kind == "informational":  # a 1xx head (END_STREAM on it is refused)
        return _raw(0x1, 0x4 | es, sid, encoder.encode([(b":status", b"1%02d" % (n % 100))]))
    if kind == "length":  # a request declaring its body's length (DATA may exceed it)
        length = b"%d" % (n % 40) if n % 7 else b"x"
        return _raw(0x1, 0x4 | es, sid, encoder.encode([*REQUEST, (b"content-length", length)]))
    if kind == "continued":  # a block in HEADERS and CONTINUATION
        block = encoder.encode([*REQUEST, (b"x-n", b"%d" % n)])
        return _raw(0x1, es, sid, block[:3]) + _raw(0x9, 0x4, sid, block[3:])
    if kind == "unfinished":  # HEADERS whose CONTINUATION never comes
        return _raw(0x1, es, sid, encoder.encode(REQUEST))
    if kind == "priority":  # HEADERS with priority fields
        block = encoder.encode(REQUEST)
        return _raw(0x1, 0x24 | es, sid, b"\x00\x00\x00\x00\x0f" + block)
    if kind == "data":
        return _raw(0x0, es, sid, bytes(n % 1200))
    if kind == "padded":
        return _raw(0x0, 0x8 | es, sid, bytes((3,)) + bytes(n % 300) + bytes(3))
    if kind == "oversized":
        return _raw(0x0, es, sid, bytes(16385))
    if kind == "window":
        return _raw(0x8, 0, sid, (n % 70000 + 1).to_bytes(4, "big"))
    if kind == "reset":
        return _raw(0x3, 0, sid, (8).to_bytes(4, "big"))
    if kind == "ping":
        return _raw(0x6, 0, 0, bytes(8))
    if kind == "settings":
        return _raw(0x4, 0, 0, (4).to_bytes(2, "big") + (n % 5000).to_bytes(4, "big"))
    if kind == "ack":
        return _raw(0x4, 0x1, 0, b"")
    return bytes((n % 256,)) * (n % 13)  # garbage


STEP_KINDS = ["request", "response", "trailers", "continued", "priority", "data", "data",
              "padded", "oversized", "window", "reset", "ping", "settings", "ack",
              "unfinished", "garbage", "informational", "length"]  # fmt: skip
STEPS = st.tuples(
    st.sampled_from(STEP_KINDS),
    st.sampled_from([0, 1, 1, 3, 3, 5, 2]),
    st.integers(0, 3000),
    st.booleans(),
)


def _receive_outcome(conn: H2Connection, events: list[h2.events.Event]) -> object:
    """What a read left: events, open streams and their windows, how each closed stream was
    closed (one ``h2`` still knows equal to one it forgot: ``H2Proxy``'s connections leave
    closed streams to the next walk, ``WALK_FROM``, where ``h2``'s ``receive_data`` forgets
    them at each new stream's count), the connection's windows and output."""
    streams = {
        sid: (
            s.state_machine.state,
            s._inbound_window_manager.current_window_size,
            s.outbound_flow_control_window,
        )
        for sid, s in conn.streams.items()
        if s.state_machine.state is not StreamState.CLOSED
    }
    closed = {
        sid: conn._stream_closed_by(sid)
        for sid in sorted({*conn.streams, *conn._closed_streams})
        if sid not in streams
    }
    return (
        [repr(e) for e in events],
        streams,
        closed,
        conn._inbound_flow_control_window_manager.current_window_size,
        conn.outbound_flow_control_window,
        conn.max_inbound_frame_size,
        conn.highest_inbound_stream_id,
        bytes(conn.data_to_send()),
    )


@settings(max_examples=400, deadline=None)
@given(
    st.booleans(),
    st.lists(STEPS, min_size=1, max_size=10),
    st.lists(st.integers(0, 60), max_size=6),
)
# A 1xx head on a stream reset after a second request head on it, with stream 3 opened in
# between: h2 forgot stream 1 and answered RST_STREAM, the fast path held it and h2 tore the
# connection down (``h2wire._closed_takes_informational_as_headers``).
@example(False, [("request", 1, 0, True), ("request", 1, 0, False), ("request", 3, 0, False),
                 ("informational", 1, 0, False)], [])  # fmt: skip
def test_receive_on_moves_state_as_h2s_receive_data(
    client_side: bool, steps: list[tuple[str, int, int, bool]], cuts: list[int]
) -> None:
    """Reach 12: ``receive_on`` gives what ``receive_data`` gives, for the same bytes cut into
    the same reads anywhere (inside frame headers too), on either side of ``H2Proxy``'s
    connections: the events, stream states and windows, output, and refusals; with requests
    and responses (HEADERS whole, with CONTINUATION or without the one it needs, with
    priority), DATA (within and beyond the windows and frame size, padded, on open, ended,
    reset, idle and wrong streams, stream 0), control frames and garbage."""
    encoder = hpack.Encoder()
    wire = b"".join(_frames_for(step, encoder) for step in steps)
    points = sorted({0, len(wire), *(c * len(wire) // 60 for c in cuts)})
    _receive_both_ways(client_side, [wire[a:b] for a, b in itertools.pairwise(points)])


def _receive_both_ways(client_side: bool, chunks: list[bytes]) -> None:
    """Feed ``chunks`` after a peer's preface (and, as a client, streams 1, 3 and 5 opened, 1
    ended, as ``H2Proxy``'s upstream opens them) to two connections, one through
    ``receive_on``, one through ``receive_data``: each read must end the same."""
    conns = [new_proxy_connection(client_side=client_side, limits=_PROXY_LIMITS) for _ in range(2)]
    peer = H2Connection(
        h2.config.H2Configuration(client_side=not client_side, header_encoding=None)
    )
    peer.initiate_connection()
    preface = peer.data_to_send()
    for conn in conns:
        if client_side:
            conn.receive_data(preface)
            for sid in (1, 3, 5):
                h2wire.send_headers_on(conn, sid, REQUEST, end_stream=sid == 1)
            conn.data_to_send()
    if not client_side:
        chunks = [preface, *chunks]
    for chunk in chunks:
        outcomes = []
        for fast, conn in zip((True, False), conns, strict=True):
            try:
                events = h2wire.receive_on(conn, chunk) if fast else conn.receive_data(chunk)
                outcome: object = _receive_outcome(conn, events)
            except Exception as e:  # H2Proxy fails the connection on any of them
                outcome = (type(e).__name__, str(e), _receive_outcome(conn, []))
            outcomes.append(outcome)
        assert outcomes[0] == outcomes[1]
        if isinstance(outcomes[0], tuple) and isinstance(outcomes[0][0], str):
            return


@pytest.mark.parametrize(
    "steps",
    [
        # DATA on an open stream while another stream's header block waits for its CONTINUATION
        [("request", 1, 0, False), ("unfinished", 3, 0, False), ("data", 1, 5, False)],
        [("request", 1, 0, False), ("unfinished", 3, 0, False), ("request", 5, 0, False)],
        # DATA beyond the stream's window, then on a stream that ended
        [("request", 1, 0, False), ("data", 1, 1100, False), ("data", 1, 5, False)],
        [("request", 1, 0, True), ("data", 1, 5, False)],
        # an oversized frame after a SETTINGS ACK in the same read
        [("ack", 0, 0, False), ("request", 1, 0, False), ("oversized", 1, 0, False)],
    ],
)
def test_receive_on_leaves_to_h2_what_h2_must_refuse(
    steps: list[tuple[str, int, int, bool]],
) -> None:
    encoder = hpack.Encoder()
    _receive_both_ways(False, [b"".join(_frames_for(step, encoder) for step in steps)])


def test_receive_on_takes_whole_headers_and_data_without_h2s_frame_parsing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """What reach 12 is for: a call's request head and body, and its response head, body and
    trailers, arriving whole, are received without a hyperframe frame; a WINDOW_UPDATE between
    them still goes to ``h2`` (and its events come in order)."""
    server = new_proxy_connection(client_side=False, limits=H2Limits())
    client = H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
    client.initiate_connection()
    server.receive_data(client.data_to_send())
    client.receive_data(server.data_to_send())
    server.receive_data(client.data_to_send())
    parsed: list[str] = []
    real = h2.frame_buffer.FrameBuffer.__next__

    def counted(self: h2.frame_buffer.FrameBuffer) -> object:
        frame = real(self)
        parsed.append(type(frame).__name__)
        return frame

    monkeypatch.setattr(h2.frame_buffer.FrameBuffer, "__next__", counted)
    client.send_headers(1, [(b":method", b"POST"), *REQUEST[1:]])
    client.send_data(1, b"hello")
    client.increment_flow_control_window(100)
    client.send_data(1, b"world", end_stream=True)
    events = h2wire.receive_on(server, client.data_to_send())
    assert [type(e).__name__ for e in events] == [
        "RequestReceived", "DataReceived", "WindowUpdated", "DataReceived", "StreamEnded"
    ]  # fmt: skip
    assert parsed == ["WindowUpdateFrame"]


def test_received_blocks_skip_h2s_header_pipeline_on_the_proxys_connections(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Reach 13: a request head and trailers, and a response head and trailers, received on
    ``H2Proxy``'s connections (no inbound normalizing, validation or decoding) build no header
    validation flags and run no header pipeline; HBONE's connection, which validates, still
    does. The events are the same either way
    (``test_receive_on_moves_state_as_h2s_receive_data``)."""
    built: list[bool] = []
    real = h2.stream.H2Stream._build_hdr_validation_flags

    def counted(self: h2.stream.H2Stream, events: object) -> object:
        built.append(bool(self.config.validate_inbound_headers))
        return real(self, events)

    monkeypatch.setattr(h2.stream.H2Stream, "_build_hdr_validation_flags", counted)
    encoder = hpack.Encoder()
    request = _raw(0x1, 0x4, 1, encoder.encode(REQUEST))
    request_trailers = _raw(0x1, 0x5, 1, encoder.encode([(b"x-sum", b"1")]))
    for client_side, wire in (
        (False, request + _raw(0x0, 0, 1, b"hello") + request_trailers),
        (True, _frames_for(("response", 1, 0, False), encoder)
         + _frames_for(("trailers", 1, 0, True), encoder)),
    ):  # fmt: skip
        conn = new_proxy_connection(client_side=client_side, limits=H2Limits())
        conn.receive_data(_preface(client_side=not client_side))
        if client_side:
            h2wire.send_headers_on(conn, 1, REQUEST, end_stream=True)
        events = h2wire.receive_on(conn, wire)
        assert type(events[-2]).__name__ == "TrailersReceived"
    assert built == []
    hbone = new_connection(client_side=False, settings=HboneSettings())
    hbone.receive_data(_preface(client_side=True))
    h2wire.receive_headers_on(hbone, 1, hpack.Encoder().encode(CONNECT), end_stream=False)
    assert built == [True]


def _preface(*, client_side: bool) -> bytes:
    """What a peer on that side sends first (a client's preface and SETTINGS, or SETTINGS)."""
    peer = H2Connection(h2.config.H2Configuration(client_side=client_side))
    peer.initiate_connection()
    return bytes(peer.data_to_send())


@pytest.mark.parametrize("input_", h2wire._FAST_INPUTS)
@pytest.mark.parametrize("state", list(h2.connection.ConnectionState))
def test_connection_input_is_the_state_machines(
    state: h2.connection.ConnectionState, input_: h2.connection.ConnectionInputs
) -> None:
    """``_connection_input`` (no look-up while the connection is open) leaves the connection
    in the state, with the events or the refusal, that ``h2``'s machine gives, in every state."""

    def outcome(call: Callable[[H2Connection], object]) -> object:
        conn = H2Connection(h2.config.H2Configuration(client_side=True))
        conn.state_machine.state = state
        try:
            result: object = call(conn)
        except h2.exceptions.ProtocolError as e:
            result = ("refused", str(e))
        return result, conn.state_machine.state

    ours = outcome(lambda conn: h2wire._connection_input(conn, input_))
    theirs = outcome(lambda conn: conn.state_machine.process_input(input_))
    assert ours == theirs
    assert h2wire._unchanged_in_open_states()


def _machine_outcome(
    machine: h2.stream.H2StreamStateMachine, feed: Callable[[], list[h2.events.Event]]
) -> object:
    try:
        events: object = [(type(e).__name__, vars(e)) for e in feed()]
    except Exception as e:
        events = (type(e).__name__, str(e))
    return events, vars(machine)


@pytest.mark.parametrize("state", list(StreamState))
@pytest.mark.parametrize("input_", list(h2.stream.StreamInputs))
def test_stream_input_is_h2s_process_input(
    state: StreamState, input_: h2.stream.StreamInputs
) -> None:
    """Reach 15: every state and input, with every combination of the flags the transition
    functions read, gives what ``H2StreamStateMachine.process_input`` gives: the events (their
    fields), the error (type and message), the machine's state and flags after."""
    flags = ("headers_sent", "trailers_sent", "headers_received", "trailers_received")
    for client in (None, True, False):
        for values in itertools.product((None, True), repeat=len(flags)):
            machines = []
            for _ in range(2):
                machine = h2.stream.H2StreamStateMachine(7)
                machine.state, machine.client = state, client
                for flag, value in zip(flags, values, strict=True):
                    setattr(machine, flag, value)
                machines.append(machine)
            ours, theirs = machines
            steps = h2wire._STEPS[input_]
            assert _machine_outcome(
                ours, partial(h2wire.stream_input, ours, steps, input_)
            ) == _machine_outcome(theirs, partial(theirs.process_input, input_))


def _stream_view_of(stream: h2.stream.H2Stream, conn: H2Connection) -> object:
    fields = dict(vars(stream))
    assert fields.pop("config") is conn.config
    fields["state_machine"] = vars(fields["state_machine"])
    fields["_inbound_window_manager"] = vars(fields["_inbound_window_manager"])
    return fields


@pytest.mark.parametrize("client_side", [True, False])
def test_new_stream_is_h2s_begin_new_stream(client_side: bool) -> None:
    """Reach 16: ``new_stream`` makes the stream ``_begin_new_stream`` makes, with the
    windows of the settings in force (the peer's changed initial window and frame size
    included), and refuses the same ids (too low, wrong parity) with the same errors."""
    results = []
    for make in (h2wire.new_stream, H2Connection._begin_new_stream):
        conn = new_connection(client_side=client_side, settings=HboneSettings())
        peer = H2Connection(h2.config.H2Configuration(client_side=not client_side))
        peer.initiate_connection()
        peer.update_settings(
            {
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 12345,
                h2.settings.SettingCodes.MAX_FRAME_SIZE: 32768,
            }
        )
        conn.receive_data(peer.data_to_send())
        seen = []
        for sid, allowed in itertools.product(
            (1, 2, 3, 4, 3, 9, 8),
            (h2.connection.AllowedStreamIDs.ODD, h2.connection.AllowedStreamIDs.EVEN),
        ):
            try:
                outcome: object = _stream_view_of(make(conn, sid, allowed), conn)  # type: ignore[arg-type]
            except h2.exceptions.ProtocolError as e:
                outcome = (type(e).__name__, str(e))
            seen.append((outcome, conn.highest_inbound_stream_id, conn.highest_outbound_stream_id))
        seen.append(sorted(conn.streams))
        results.append(seen)
    assert results[0] == results[1]
    assert any(
        isinstance(o, dict)
        and o["outbound_flow_control_window"] == 12345
        and o["max_outbound_frame_size"] == 32768
        for o, *_ in results[0][:-1]
    )


def test_max_concurrent_streams_is_the_settings_property() -> None:
    """Reach 16: ``max_concurrent_streams`` reads what the property answers: the default (no
    limit), a value sent and acknowledged, a value received but not in force yet."""
    ours = new_connection(client_side=True, settings=HboneSettings())
    plain = h2.settings.Settings(client=False)
    code = h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS
    seen = [(h2wire.max_concurrent_streams(plain), plain.max_concurrent_streams)]
    plain[code] = 7  # received, not acknowledged: the default stays in force
    seen.append((h2wire.max_concurrent_streams(plain), plain.max_concurrent_streams))
    plain.acknowledge()
    seen.append((h2wire.max_concurrent_streams(plain), plain.max_concurrent_streams))
    ours_limit = ours.local_settings.max_concurrent_streams
    seen.append((h2wire.max_concurrent_streams(ours.local_settings), ours_limit))
    assert all(a == b for a, b in seen), seen
    assert [b for _, b in seen] == [2**32 + 1, 2**32 + 1, 7, HboneSettings().max_concurrent_streams]
