"""The codec's DATA fast path against a plain ``h2`` peer: wire bytes, windows, stream states.

A plain ``h2`` connection on the other side checks that what we frame ourselves is HTTP/2 that
``h2`` understands (DATA, WINDOW_UPDATE, in order with h2's own frames) and lets a test send
what our own codec never would (padding, oversized or misplaced frames).
"""

from __future__ import annotations

import h2.config
import h2.connection
import h2.events
import pytest
from h2.errors import ErrorCodes
from hpack import Encoder
from hyperframe.frame import HeadersFrame

from agent.proxy import h2wire
from agent.proxy import hbone_events as ev
from agent.proxy.h2data import (
    FLAG_PADDED,
    FRAME_HEADER,
    data_frame_header,
    window_update_frame,
)
from agent.proxy.h2wire import KIB, MIB, HboneSettings
from agent.proxy.hbone import HboneConnection
from agent.proxy.hbone_flow import DataFlow

CONNECT = [(":method", "CONNECT"), (":authority", "10.0.0.2:80")]


def server_with_raw_client(
    settings: HboneSettings | None = None, streams: int = 1
) -> tuple[h2.connection.H2Connection, HboneConnection, list[int]]:
    """A plain h2 client with ``streams`` accepted tunnels to our server codec."""
    raw = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    raw.initiate_connection()
    server = HboneConnection(client_side=False, settings=settings)
    server.receive(raw.data_to_send())
    raw.receive_data(server.data_to_send())
    sids = []
    for _ in range(streams):
        sid = raw.get_next_available_stream_id()
        raw.send_headers(sid, CONNECT)
        (req,) = server.receive(raw.data_to_send())
        assert isinstance(req, ev.TunnelRequested)
        server.respond(sid, 200)
        sids.append(sid)
    raw.receive_data(bytes(server.data_to_send()))
    return raw, server, sids


def data_of(events: list[ev.Event], sid: int) -> bytes:
    return b"".join(e.data for e in events if isinstance(e, ev.DataReceived) and e.stream_id == sid)


def test_our_data_frame_is_exactly_header_and_payload() -> None:
    raw, server, (sid,) = server_with_raw_client()
    assert server.send(sid, b"abc") == []
    wire = server.data_to_send()
    assert wire == data_frame_header(3, sid) + b"abc"
    (event,) = raw.receive_data(bytes(wire))
    assert isinstance(event, h2.events.DataReceived) and event.data == b"abc"


def test_sends_respect_the_peers_frame_size_and_windows() -> None:
    raw, server, (sid,) = server_with_raw_client()  # h2 defaults: 16 KiB frames, 64 KiB window
    server.send(sid, b"z" * (100 * KIB))
    events = raw.receive_data(bytes(server.data_to_send()))
    sizes = [len(e.data) for e in events if isinstance(e, h2.events.DataReceived)]
    assert sizes == [16 * KIB] * 3 + [16 * KIB - 1]  # 65535: the initial window
    assert server.buffered(sid) == 100 * KIB - 65535
    raw.acknowledge_received_data(65535, sid)  # both windows reopen: h2 sends WINDOW_UPDATEs
    assert ev.StreamDrained(sid) in server.receive(raw.data_to_send())
    assert server.buffered(sid) == 0
    rest = raw.receive_data(bytes(server.data_to_send()))
    assert (
        sum(len(e.data) for e in rest if isinstance(e, h2.events.DataReceived)) == 100 * KIB - 65535
    )


def test_end_stream_on_a_data_frame_delivers_data_then_end() -> None:
    raw, server, (sid,) = server_with_raw_client()
    raw.send_data(sid, b"last words", end_stream=True)
    assert server.receive(raw.data_to_send()) == [
        ev.DataReceived(sid, b"last words"),
        ev.StreamEnded(sid),
    ]
    server.send(sid, b"answer")  # half-closed (remote): we may still send
    server.end_stream(sid)
    events = raw.receive_data(bytes(server.data_to_send()))
    assert b"".join(e.data for e in events if isinstance(e, h2.events.DataReceived)) == b"answer"
    assert isinstance(events[-1], h2.events.StreamEnded)


def test_padded_data_is_delivered_without_padding_and_padding_is_credited() -> None:
    settings = HboneSettings(stream_window=64 * KIB, connection_window=16 * MIB)
    raw, server, (sid,) = server_with_raw_client(settings)
    raw.send_data(sid, b"p" * 1000, pad_length=200)
    assert data_of(server.receive(raw.data_to_send()), sid) == b"p" * 1000
    assert server.data_to_send() == b""  # 201 bytes of padding: below a quarter window
    server.consumed(sid, 1000)
    assert server.data_to_send() == b""
    raw.send_data(sid, b"q" * 15183)
    server.receive(raw.data_to_send())
    server.consumed(sid, 15182)  # 1000 + 201 + 15182 = 16 KiB - 1: not yet
    assert server.data_to_send() == b""
    server.consumed(sid, 1)
    assert server.data_to_send() == window_update_frame(sid, 16 * KIB)


def test_window_updates_are_ours_and_h2_applies_them() -> None:
    raw, server, (sid,) = server_with_raw_client()  # ours: 512 KiB stream, 2 MiB connection
    window, connection = HboneSettings().stream_window, HboneSettings().connection_window
    sent = 0
    while sent < window:
        n = min(raw.local_flow_control_window(sid), raw.max_outbound_frame_size, window - sent)
        raw.send_data(sid, b"d" * n)
        sent += n
    assert len(data_of(server.receive(raw.data_to_send()), sid)) == window
    assert server.data_to_send() == b""  # nothing is given back before it is consumed
    assert raw.local_flow_control_window(sid) == 0
    server.consumed(sid, window // 4 - 1)
    assert server.data_to_send() == b""
    server.consumed(sid, 1)
    first = server.data_to_send()
    assert first == window_update_frame(sid, window // 4)
    server.consumed(sid, window - window // 4)
    updates = server.data_to_send()
    assert window_update_frame(0, connection // 4) in updates  # the connection's quarter
    raw.receive_data(bytes(first) + bytes(updates))
    assert raw.local_flow_control_window(sid) == window


def test_data_beyond_the_stream_window_fails_the_connection() -> None:
    settings = HboneSettings(stream_window=100_000, max_frame_size=16 * KIB)
    _raw, server, (sid,) = server_with_raw_client(settings)
    ok = data_frame_header(16 * KIB, sid) + b"x" * (16 * KIB)
    events = server.receive(ok * 6)  # 98304 bytes: within the window
    assert len(data_of(events, sid)) == 6 * 16 * KIB
    (failed,) = server.receive(ok)
    assert isinstance(failed, ev.ConnectionFailed)
    assert failed.error_code == ErrorCodes.FLOW_CONTROL_ERROR and "stream 1" in failed.reason
    assert server.failed


def test_data_beyond_the_connection_window_fails_the_connection() -> None:
    settings = HboneSettings(stream_window=4 * MIB, connection_window=65535)
    _raw, server, sids = server_with_raw_client(settings, streams=2)
    fits = data_frame_header(65535, sids[0]) + b"x" * 65535  # the whole window
    assert len(data_of(server.receive(fits), sids[0])) == 65535
    assert server.data_to_send() == b""  # replenished only as it is consumed
    server.consumed(sids[0], 65535)
    assert server.data_to_send() == window_update_frame(0, 65535)
    (failed,) = server.receive(data_frame_header(65536, sids[1]) + b"y" * 65536)
    assert isinstance(failed, ev.ConnectionFailed)
    assert failed.error_code == ErrorCodes.FLOW_CONTROL_ERROR and "connection" in failed.reason


def test_interleaved_streams_in_one_read_reach_their_own_streams() -> None:
    raw, server, (a, b) = server_with_raw_client(streams=2)
    for i in range(5):
        raw.send_data(a, b"A%d" % i)
        raw.send_data(b, b"B%d" % i)
    raw.send_data(b, b"", end_stream=True)
    events = server.receive(raw.data_to_send())
    assert data_of(events, a) == b"A0A1A2A3A4"
    assert data_of(events, b) == b"B0B1B2B3B4"
    assert events[-1] == ev.StreamEnded(b)


def test_frames_fed_one_byte_at_a_time() -> None:
    raw, server, (sid,) = server_with_raw_client()
    raw.send_data(sid, b"0123456789" * 10, pad_length=7)
    raw.ping(b"pingpong")
    raw.send_data(sid, b"tail", end_stream=True)
    events: list[ev.Event] = []
    for byte in raw.data_to_send():
        events += server.receive(bytes([byte]))
    assert data_of(events, sid) == b"0123456789" * 10 + b"tail"
    assert events[-1] == ev.StreamEnded(sid)
    pong = raw.receive_data(bytes(server.data_to_send()))
    assert any(isinstance(e, h2.events.PingAckReceived) for e in pong)


def test_data_on_a_stream_we_reset_is_dropped_and_others_keep_flowing() -> None:
    raw, server, (gone, alive) = server_with_raw_client(streams=2)
    server.reset(gone)
    server.data_to_send()  # the RST_STREAM the raw client has not seen yet
    raw.send_data(gone, b"late")
    raw.send_data(alive, b"still here")
    events = server.receive(raw.data_to_send())
    assert data_of(events, gone) == b""
    assert data_of(events, alive) == b"still here"


def test_data_after_the_peers_end_stream_resets_that_stream() -> None:
    raw, server, (sid,) = server_with_raw_client()
    raw.send_data(sid, b"", end_stream=True)
    server.receive(raw.data_to_send())
    events = server.receive(data_frame_header(3, sid) + b"bad")
    assert data_of(events, sid) == b""
    answer = raw.receive_data(bytes(server.data_to_send()))
    resets = [e for e in answer if isinstance(e, h2.events.StreamReset)]
    assert resets and resets[0].error_code == ErrorCodes.STREAM_CLOSED


def test_data_inside_a_header_block_is_a_protocol_error() -> None:
    _raw, server, (sid,) = server_with_raw_client()
    headers = HeadersFrame(3, data=Encoder().encode(CONNECT))  # no END_HEADERS: block open
    (failed,) = server.receive(headers.serialize() + data_frame_header(1, sid) + b"x")
    assert isinstance(failed, ev.ConnectionFailed)
    assert failed.error_code == ErrorCodes.PROTOCOL_ERROR


def test_data_on_stream_zero_is_a_protocol_error() -> None:
    _raw, server, _ = server_with_raw_client()
    (failed,) = server.receive(data_frame_header(1, 0) + b"x")
    assert isinstance(failed, ev.ConnectionFailed)
    assert failed.error_code == ErrorCodes.PROTOCOL_ERROR


def test_end_stream_both_ways_without_h2s_frame_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """END_STREAM is sent by ``send_data_on`` and, on a stream that may receive, taken without
    ``h2`` parsing a frame: neither ``h2``'s ``end_stream`` nor its ``receive_data`` runs; the
    plain peer sees the stream end, and so does the codec."""
    raw, server, (sid,) = server_with_raw_client()
    raw.receive_data(server.data_to_send())
    calls: list[str] = []

    def refuse_end_stream(*_args: object) -> None:
        raise AssertionError("h2's end_stream ran")

    real_receive = h2.connection.H2Connection.receive_data

    def counting_receive(self: h2.connection.H2Connection, data: bytes) -> object:
        calls.append("receive_data")
        return real_receive(self, data)

    raw.send_data(sid, b"", end_stream=True)
    wire = raw.data_to_send()
    monkeypatch.setattr(h2.connection.H2Connection, "end_stream", refuse_end_stream)
    monkeypatch.setattr(h2.connection.H2Connection, "receive_data", counting_receive)
    assert server.receive(wire) == [ev.StreamEnded(sid)]
    assert calls == []
    server.end_stream(sid)
    monkeypatch.undo()
    events = raw.receive_data(server.data_to_send())
    assert [type(e) for e in events] == [h2.events.DataReceived, h2.events.StreamEnded]


def _state(server: HboneConnection, sids: list[int]) -> tuple[object, ...]:
    """What the codec's receive side is left with: windows, held bytes, output, failure."""
    flow = server._flow
    return (
        flow.held,
        flow.promised,
        dict(flow._stream_window),
        dict(flow._stream_held),
        flow.deliver_to,
        flow.counted,
        server.failed,
        bytes(server.data_to_send()),
        [h2wire.stream_state(server._h2, sid) for sid in sids],
    )


def _whole_reads(sid: int, other: int) -> list[bytes]:
    """Reads of one frame each (or a frame and a bit): the ones the single-frame path takes
    and every variant it must leave to the splitter."""
    frame = data_frame_header(5, sid) + b"hello"
    return [
        frame,
        data_frame_header(1024, sid) + b"k" * 1024,
        frame,
        data_frame_header(5, other) + b"other",
        data_frame_header(5, sid, end_stream=True) + b"ended",  # a flag: the splitter's
        frame,  # after the end: a stream that cannot receive
        data_frame_header(0, other),  # empty
        frame[:-1],  # short: part of a frame
        b"o",
        frame + frame[:3],  # a frame and a bit
        frame[3:],
        FRAME_HEADER.pack(5 << 8, 0, other | 0x80000000) + b"rsrvd",  # the reserved bit
        FRAME_HEADER.pack(6 << 8, FLAG_PADDED, other) + b"\x01abcd\x00",  # padded
        FRAME_HEADER.pack(5 << 8, 0, 99) + b"idle!",  # a stream never opened
    ]


@pytest.mark.parametrize("window", [None, 2000], ids=["windows", "small-connection-window"])
def test_a_read_of_one_whole_data_frame_leaves_what_the_splitter_leaves(
    monkeypatch: pytest.MonkeyPatch, window: int | None
) -> None:
    """The single-frame path (``DataFlow.take_single``) against the splitter's path of the
    same reads (the same events, windows, held bytes, output and stream states after each),
    for frames it takes and frames it must leave; and it takes the plain ones (before: every
    read went through ``InboundSplitter.feed``)."""
    settings = HboneSettings(connection_window=window) if window else None
    taken: list[int] = []
    real = DataFlow.take_single

    def counted(self: DataFlow, data: bytes) -> int:
        sid = real(self, data)
        taken.append(sid)
        return sid

    results = []
    for fast in (True, False):
        _raw, server, sids = server_with_raw_client(settings, streams=2)
        monkeypatch.setattr(DataFlow, "take_single", counted if fast else lambda _s, _d: 0)
        steps = []
        for data in _whole_reads(*sids):
            steps.append((server.receive(data), _state(server, sids)))
            if not server.failed:
                server.consumed(sids[0], 3)
                steps.append(([], _state(server, sids)))
        results.append(steps)
    assert results[0] == results[1]
    assert taken.count(1) >= (1 if window else 3)
