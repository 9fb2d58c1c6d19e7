"""The HBONE DATA fast paths against the general path, with frames a hostile peer chooses.

Port 15008 faces other nodes, so the fast paths of session 15 ("rrcost": a read that is exactly
one whole unflagged DATA frame within both windows skips ``InboundSplitter.feed``, through
``DataFlow.take_single`` from ``HboneConnection.receive`` and from
``HboneProtocol.data_received``; ``DataFlow.send`` frames DATA inline) must change nothing a peer
or an owner can observe. Hypothesis builds sequences of frames a peer could send on an
established connection (DATA of every size up to past the windows and our max frame size, with
and without END_STREAM and padding, on open, half-closed, reset, unanswered, never-opened, even,
huge and reserved-bit stream ids; WINDOW_UPDATE with zero and overflowing increments;
RST_STREAM; PING; SETTINGS changing INITIAL_WINDOW_SIZE and MAX_FRAME_SIZE; GOAWAY;
HEADERS/CONTINUATION, open header blocks; PRIORITY; unknown types; garbage and truncated
frames), cuts them into reads (many reads exactly one frame, so the fast path takes them; others
joined or cut anywhere), and interleaves what an owner does (consume, release, send, end, reset).

The same script runs twice: as the code runs, and with the fast path switched off at its
narrowest point, the connection's own ``InboundSplitter.single_data`` answering 0 ("not a single
frame"), after which every read takes ``feed``. After every read and every owner command both
runs must have the same events, the same output bytes (WINDOW_UPDATE, RST_STREAM, GOAWAY, ...),
the same receive windows (connection, every stream; the unacknowledged credit; the budget's
charge), the same send windows and stream states inside ``h2``, the same failure, and the same
splitter state. One difference is intended and left out of the comparison: the splitter's
fields describing the *last* DATA frame (``_stream_id``, ``_flags``, ``_length``, ...) are left
behind by ``feed`` and untouched by ``single_data``; they are read only while ``_in_data`` is
set, so they are compared only then.

At the protocol level (``HboneProtocol.data_received``, where the fast path also skips the
event and ``dispatch``) the same scripts run with ``TunnelStream`` holders: one delivering
directly to a sink that takes a part of each chunk, one whose holder has gone (the bytes go back
to the window), the bytes each holder got, its end, its error, the bytes its waker was told of,
and the bytes written to the transport after the loop ran what was scheduled. (The fast path
flushes only when the codec framed something; output ``h2`` holds from an owner command leaves
with that command's own ``flush_soon`` instead: the same bytes, possibly one callback later,
which is why the transport's bytes are compared once the loop has settled; here every command's
``flush_soon`` has run before the next read, so they are also compared right after each read.)

Our codec is the server (a plain ``h2`` client opened its streams) or the client (it opened
them to a plain ``h2`` server). Besides frames of fixed sizes, "fill" steps send a frame of
exactly what the windows allow there, or one byte more or less, and "flood" steps fill the
windows with whole frames, so the window edges are met often. The receive tests assert that
their scripts reached the fast path. ``make fuzz`` runs them with more examples.

The send side has no switch (``DataFlow.send`` is the only framing), so it runs against
``h2``'s own ``send_data`` doing the same job (``h2_send`` below): the same bytes on the wire,
send windows, queued bytes and events, under the peer's SETTINGS and WINDOW_UPDATEs.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import h2.config
import h2.connection
import pytest
from h2.stream import StreamState
from hpack import Encoder
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.proxy import h2wire
from agent.proxy import hbone_events as ev
from agent.proxy.h2data import FLAG_END_STREAM, FLAG_PADDED
from agent.proxy.h2wire import KIB, HboneSettings
from agent.proxy.hbone import HboneConnection
from agent.proxy.hbone_flow import DataFlow
from agent.proxy.tunnel import HboneProtocol, TunnelStream
from tests.fuzzing import fuzz_examples
from tests.unit.proxy.hostile import frame

CONNECT = [(b":method", b"CONNECT"), (b":authority", b"10.0.0.2:80")]
MAX_FRAME = 16 * KIB
# Stream windows the streams exhaust before the connection's (A), and a connection window
# (HTTP/2's initial 65,535: the codec opens no more until streams hold bytes) that four frames
# exhaust before any stream's (B).
SETTINGS = [
    HboneSettings(stream_window=20_000, connection_window=80_000, max_frame_size=MAX_FRAME),
    HboneSettings(stream_window=1 << 22, connection_window=65_535, max_frame_size=MAX_FRAME),
]
# Streams after ``established``: 1 and 3 open (accepted), 5 half-closed by the peer (END_STREAM),
# 7 reset by us, 9 reset by the peer, 11 requested and not answered (h2 has it open, the flow
# has no window for it), 13 half-closed by us (END_STREAM sent: it still receives).
RECEIVING = [1, 3, 11, 13]
KNOWN = [1, 3, 5, 7, 9, 11, 13]
# Never opened (15, 17, 101), even (a server's), 0, the largest, and reserved-bit ids.
OTHER = [15, 17, 101, 2, 4, 0, 0x7FFFFFFF, 0x80000001, 0xFFFFFFFF]
EXAMPLES = fuzz_examples(400)
TUNNEL_EXAMPLES = fuzz_examples(100)
SEND_EXAMPLES = fuzz_examples(150)


# ---- the peer's frames ---------------------------------------------------------------------

stream_ids = st.one_of(st.sampled_from(RECEIVING), st.sampled_from(KNOWN), st.sampled_from(OTHER))
# Payload sizes: tiny, anything up to just past our max frame size, and the edges of the
# windows and of the max frame size.
sizes = st.one_of(
    st.integers(0, 40),
    st.integers(0, MAX_FRAME + 1),
    st.sampled_from([1, 19_999, 20_000, 20_001, MAX_FRAME - 1, MAX_FRAME, MAX_FRAME + 1]),
)
counter = iter(range(1 << 62))


def payload(n: int) -> bytes:
    """``n`` bytes that differ from frame to frame (so a misdelivered chunk shows)."""
    tag = b"%d," % next(counter)
    return (tag * (n // len(tag) + 1))[:n]


def data_frame(sid: int, n: int, flags: int) -> bytes:
    return frame(0, flags, sid, payload(n))


def padded_frame(sid: int, n: int, pad: int, end: bool, pad_byte: int) -> bytes:
    """A PADDED DATA frame: its pad length byte (``pad_byte``, which may not fit), ``n`` bytes,
    ``pad`` zero bytes."""
    flags = FLAG_PADDED | (FLAG_END_STREAM if end else 0)
    return frame(0, flags, sid, bytes([pad_byte]) + payload(n) + b"\0" * pad)


def settings_frame(entries: list[tuple[int, int]], ack: bool) -> bytes:
    body = b"".join(k.to_bytes(2) + v.to_bytes(4) for k, v in entries)
    return frame(4, 1 if ack else 0, 0, b"" if ack else body)


setting_entries = st.lists(
    st.one_of(
        st.tuples(st.just(4), st.sampled_from([0, 1, 1000, 65_535, 100_000, 2**31 - 1, 2**31])),
        st.tuples(st.just(5), st.sampled_from([16_383, 16_384, 20_000, 2**24 - 1, 2**24])),
        st.tuples(st.integers(1, 9), st.integers(0, 2**32 - 1)),
    ),
    max_size=3,
)
increments = st.one_of(
    st.sampled_from([0, 1, 1000, 65_535, 2**31 - 1, 2**31 - 65_535]),
    st.integers(0, 2**32 - 1),
)
block = st.sampled_from(
    [
        Encoder().encode(CONNECT),
        Encoder().encode([(b"trailer", b"x")]),
        Encoder().encode([(b":status", b"200")]),
        b"\xff\xff\xff",  # not HPACK
    ]
)

# Plain DATA, the fast path's kind, on a stream that receives.
# (Within our max frame size: a larger one ends the connection, and is among the others.)
plain_data = st.builds(
    data_frame,
    st.sampled_from(RECEIVING),
    st.one_of(
        st.integers(0, 40),
        st.integers(1, MAX_FRAME),
        st.sampled_from([1, 2_000, 3_616, MAX_FRAME - 1, MAX_FRAME]),
    ),
    st.just(0),
)
other_frames = st.one_of(
    st.builds(data_frame, stream_ids, sizes, st.just(0)),
    st.builds(data_frame, stream_ids, sizes, st.sampled_from([FLAG_END_STREAM, 0x2, 0x20, 0xFF])),
    st.builds(
        padded_frame,
        stream_ids,
        st.integers(0, 300),
        st.integers(0, 300),
        st.booleans(),
        st.integers(0, 255),
    ),
    st.builds(lambda sid, n: frame(0, FLAG_PADDED, sid, payload(n)), stream_ids, st.integers(0, 3)),
    st.builds(lambda sid, inc: frame(8, 0, sid, inc.to_bytes(4)), stream_ids, increments),
    st.builds(lambda sid: frame(8, 0, sid, b"\0\0\1"), stream_ids),  # wrong length
    st.builds(lambda sid, code: frame(3, 0, sid, code.to_bytes(4)), stream_ids, st.integers(0, 14)),
    st.builds(
        lambda sid, flags: frame(6, flags, sid, b"pingpong"),
        st.sampled_from([0, 1]),
        st.sampled_from([0, 1]),
    ),
    st.builds(settings_frame, setting_entries, st.booleans()),
    st.builds(
        lambda last, code: frame(7, 0, 0, last.to_bytes(4) + code.to_bytes(4) + b"debug"),
        st.sampled_from([0, 1, 3, 13, 2**31 - 1]),
        st.integers(0, 14),
    ),
    st.builds(
        lambda sid, flags, b: frame(1, flags, sid, b),
        st.sampled_from([1, 13, 15, 17, 101, 2, 0]),
        st.sampled_from([0x4, 0x5, 0x0, 0x1]),
        block,
    ),
    st.builds(  # PUSH_PROMISE (push is off)
        lambda sid, b: frame(5, 4, sid, (2).to_bytes(4) + b), st.sampled_from([1, 13, 0]), block
    ),
    st.builds(
        lambda sid, flags, b: frame(9, flags, sid, b), stream_ids, st.sampled_from([0, 4]), block
    ),
    st.builds(lambda sid: frame(2, 0, sid, b"\0\0\0\0\x10"), stream_ids),  # PRIORITY
    st.builds(
        lambda kind, flags, sid, body: frame(kind, flags, sid, body),
        st.integers(10, 255),
        st.integers(0, 255),
        stream_ids,
        st.binary(max_size=16),
    ),
    st.binary(min_size=1, max_size=12),  # garbage: what follows is misparsed
)
# Most frames plain DATA (each other kind ends most scripts' fast path: a failed connection,
# a misparse), the rest any of the others. (``one_of`` flattens its arguments and picks
# among the branches: weights need ``sampled_from``.)
peer_frames = st.sampled_from([plain_data] * 6 + [other_frames]).flatmap(lambda s: s)

# How a frame reaches the codec: a read of its own (the fast path's case), joined to the next,
# cut at a point, or truncated (its end never comes: the next frame's bytes take its place).
modes = st.sampled_from(["alone", "alone", "alone", "alone", "join", "cut", "truncate"])
frame_steps = st.tuples(st.just("frame"), peer_frames, modes, st.integers(0, 1 << 20))
# A DATA frame as large as what the stream may still send (within both windows) plus
# ``delta``, sized when it is sent (the windows depend on what came before; both runs have the
# same windows there, or they differed already): a read of its own.
# A "flood" first fills the windows with whole frames, a read each, until less than a frame is
# left.
fill_steps = st.tuples(
    st.sampled_from(["fill", "fill", "flood"]),
    st.sampled_from(RECEIVING),
    st.sampled_from([-1, 0, 1]),
)
# The owner writes received bytes onwards: the windows reopen (WINDOW_UPDATEs) and more frames
# fit (its own kind of step, so that it is frequent).
consume_steps = st.tuples(
    st.just("consumed"),
    st.sampled_from(RECEIVING),
    st.sampled_from([1_000, 5_000, 20_000, 1 << 22]),
)
owner_steps = st.one_of(
    st.tuples(
        st.just("consumed"),
        st.sampled_from([*RECEIVING, 5, 7, 15]),
        st.sampled_from([1, 100, 5_000, 20_000]),
    ),
    st.tuples(st.just("release"), st.sampled_from(RECEIVING), st.just(0)),
    st.tuples(st.just("send"), st.sampled_from(KNOWN), st.sampled_from([0, 10, 20_000, 70_000])),
    st.tuples(st.just("end"), st.sampled_from(KNOWN), st.just(0)),
    st.tuples(st.just("reset"), st.sampled_from([*KNOWN, 15]), st.just(0)),
    st.tuples(st.just("goaway"), st.just(0), st.just(0)),
)
scripts = st.lists(
    st.sampled_from([frame_steps] * 4 + [fill_steps, consume_steps, owner_steps]).flatmap(
        lambda s: s
    ),
    max_size=40,
)

Op = tuple[str, Any, int]


def operations(script: list[tuple[Any, ...]]) -> list[Op]:
    """The script as reads (``("read", bytes, 0)``) and owner commands, in order."""
    ops: list[Op] = []
    pending = b""
    for step in script:
        if step[0] != "frame":
            if pending:
                ops.append(("read", pending, 0))
                pending = b""
            ops.append(step)  # type: ignore[arg-type]
            continue
        _, wire, mode, cut = step
        if mode == "alone":
            if pending:
                ops.append(("read", pending, 0))
            ops.append(("read", wire, 0))
            pending = b""
        elif mode == "join":
            pending += wire
        elif mode == "truncate":
            pending += wire[: cut % len(wire)]
        else:
            whole = pending + wire
            k = cut % (len(whole) + 1)
            if k:
                ops.append(("read", whole[:k], 0))
            pending = whole[k:]
    if pending:
        ops.append(("read", pending, 0))
    return ops


# ---- the receiving codec -------------------------------------------------------------------


Config = tuple[HboneSettings, bool]  # the settings, and whether ours is the client side
configs = st.tuples(st.sampled_from(SETTINGS), st.booleans())


def established(config: Config) -> HboneConnection:
    """Our codec (server or client side) with the streams described at ``RECEIVING`` and
    ``KNOWN`` (the client's are its own CONNECTs, answered by a plain ``h2`` server but for 11),
    its output taken."""
    settings_, client_side = config
    ours = HboneConnection(client_side=client_side, settings=settings_)
    raw = h2.connection.H2Connection(h2.config.H2Configuration(client_side=not client_side))
    raw.initiate_connection()
    if client_side:
        raw.receive_data(bytes(ours.data_to_send()))
        ours.receive(raw.data_to_send())
        for sid in KNOWN:
            assert ours.open_tunnel("10.0.0.2:80") == sid
            raw.receive_data(bytes(ours.data_to_send()))
            if sid != 11:
                raw.send_headers(sid, [(":status", "200")])
            ours.receive(raw.data_to_send())
    else:
        ours.receive(raw.data_to_send())
        raw.receive_data(bytes(ours.data_to_send()))
        for sid in KNOWN:
            raw.send_headers(sid, CONNECT)
            ours.receive(raw.data_to_send())
            if sid != 11:
                ours.respond(sid, 200)
    raw.send_data(5, b"", end_stream=True)
    raw.reset_stream(9)
    ours.receive(raw.data_to_send())
    ours.reset(7)
    ours.end_stream(13)
    ours.data_to_send()
    assert not ours.failed
    assert [h2wire.can_receive(ours._h2, sid) for sid in KNOWN] == [
        sid in RECEIVING for sid in KNOWN
    ]
    return ours


def switch_off(codec: HboneConnection) -> None:
    """The fast path off for this connection only: its splitter finds no read a single frame."""
    codec._flow.splitter.single_data = lambda _data: 0  # type: ignore[method-assign]


def count_taken(codec: HboneConnection, taken: list[int]) -> None:
    """Record the stream of every read the fast path took (to show the scripts reach it)."""
    flow = codec._flow
    real = flow.take_single

    def counted(data: bytes) -> int:
        sid = real(data)
        if sid:
            taken.append(sid)
        return sid

    flow.take_single = counted  # type: ignore[method-assign]


def choose_path(codec: HboneConnection, fast: bool, taken: list[int]) -> None:
    """The fast path on (its reads counted in ``taken``) or off, for this connection."""
    if fast:
        count_taken(codec, taken)
    else:
        switch_off(codec)


def state(codec: HboneConnection) -> tuple[object, ...]:
    """Everything the codec keeps that a peer or the owner can see, or that decides what they
    will see next (the module docstring)."""
    flow, h2c = codec._flow, codec._h2
    sp = flow.splitter
    frame_in_flight = (
        (sp._stream_id, sp._flags, sp._length, sp._pad_length_due, sp._data_left, sp._pad_left)
        if sp._in_data
        else None
    )
    streams = {
        sid: (
            s.state_machine.state,
            s.outbound_flow_control_window,
            s._inbound_window_manager.current_window_size,
        )
        for sid, s in h2c.streams.items()
    }
    return (
        flow.held,
        flow.promised,
        flow._target,
        flow._batch,
        dict(flow._stream_window),
        dict(flow._stream_held),
        dict(flow._stream_unacked),
        flow.deliver_to,
        flow.counted,
        flow._account.charge,
        codec.failed,
        codec.going_away,
        codec.queued,
        {sid: bytes(b) for sid, b in codec._out.items()},
        set(codec._end_after_flush),
        set(codec._unanswered),
        set(codec._reset_pending),
        codec._unsent_replies,
        codec.held_bytes(),
        codec.open_streams,
        sp.header_block,
        bytes(sp._header),
        sp._passthrough,
        sp._frame_length,
        sp._in_data,
        sp.error,
        frame_in_flight,
        streams,
        h2c.outbound_flow_control_window,
        h2c._inbound_flow_control_window_manager.current_window_size,
        h2c.max_outbound_frame_size,
        h2c.remote_settings.initial_window_size,
        h2c.highest_inbound_stream_id,
        h2c.state_machine.state,
    )


def room(codec: HboneConnection, sid: int) -> int:
    """What the peer may still send on ``sid``: both windows' room."""
    flow = codec._flow
    return min(flow._stream_window.get(sid, codec.settings.stream_window), flow.promised)


def fills(codec: HboneConnection, op: Op) -> list[bytes]:
    """The reads of a ``fill_steps`` step: one frame of the windows' room plus ``delta``; for a
    "flood", whole frames while the room is a frame or more (at most 300: windows may reopen),
    then that one."""
    kind, sid, delta = op
    frames = []
    if kind == "flood":
        frames = [MAX_FRAME] * min(room(codec, sid) // MAX_FRAME, 300)
    left = room(codec, sid) - MAX_FRAME * len(frames)
    frames.append(max(0, min(left + delta, MAX_FRAME + 1)))
    return [frame(0, 0, sid, (b"%d+%d," % (sid, n) * n)[:n]) for n in frames]


def command(codec: HboneConnection, op: Op, ended: set[int]) -> list[ev.Event]:
    """An owner's command on the codec (the same in both runs). ``ended``: the streams the owner
    ended its half of (13 from the start), on which it neither writes nor ends again (as
    ``TunnelStream.write_eof`` never does). It goes on after a ``ConnectionFailed``, as relays
    do until the transport's ``connection_lost``."""
    kind, sid, n = op
    if kind in ("send", "end"):
        if sid in ended:
            return []
        if kind == "end":
            ended.add(sid)
    if kind == "consumed":
        codec.consumed(sid, n)
    elif kind == "release":
        codec.release(sid)
    elif kind == "send":
        return codec.send(sid, (b"%d/%d," % (sid, n) * n)[:n])
    elif kind == "end":
        return codec.end_stream(sid)
    elif kind == "reset":
        codec.reset(sid)
    elif kind == "goaway":
        codec.goaway()
    return []


def run_codec(config: Config, ops: list[Op], fast: bool, taken: list[int]) -> list[object]:
    codec = established(config)
    choose_path(codec, fast, taken)
    seen: list[object] = []
    ended = {13}
    for op in ops:
        if op[0] == "read":
            events = codec.receive(op[1])
        elif op[0] in ("fill", "flood"):
            events = [e for data in fills(codec, op) for e in codec.receive(data)]
        else:
            events = command(codec, op, ended)
        seen.append((op[0], events, bytes(codec.data_to_send()), state(codec)))
    return seen


def replay(script: list[tuple[Any, ...]]) -> list[Op]:
    """The script's operations with the payloads made once (both runs get the same bytes)."""
    return operations(script)


@pytest.mark.fuzz
def test_receive_with_and_without_the_fast_path_is_the_same() -> None:
    taken: list[int] = []
    failures: set[str] = set()

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(configs, scripts)
    def check(config: Config, script: list[tuple[Any, ...]]) -> None:
        ops = replay(script)
        fast = run_codec(config, ops, True, taken)
        slow = run_codec(config, ops, False, [])
        for i, (a, b) in enumerate(zip(fast, slow, strict=True)):
            assert a == b, f"step {i} ({ops[i][0]}) differs"
        for _kind, events, _out, _state in fast:
            failures.update(e.cause for e in events if isinstance(e, ev.ConnectionFailed))  # type: ignore[attr-defined]

    check()
    # The scripts reach the fast path on every receiving stream that has a window of its own,
    # and the errors a peer can provoke on its fallback.
    assert {1, 3, 13} <= set(taken)
    assert {"flow_control", "protocol_error"} <= failures, failures


# ---- the protocol (asyncio side) -----------------------------------------------------------


class Recorded(asyncio.Transport):
    """A transport that keeps what is written and whether it was closed."""

    def __init__(self) -> None:
        super().__init__()
        self.written = bytearray()
        self.closing = False
        self.aborted = False

    def write(self, data: Any) -> None:
        self.written += data

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = self.aborted = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def get_write_buffer_size(self) -> int:
        return 0

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass


class PartSink:
    """A socket that takes at most ``part`` bytes of each send (the rest is queued)."""

    def __init__(self, part: int) -> None:
        self.part = part
        self.got = bytearray()

    def send(self, data: bytes, /) -> int:
        n = min(self.part, len(data))
        self.got += data[:n]
        return n


class Told:
    """A waker that counts the bytes it is told were delivered."""

    def __init__(self) -> None:
        self.total = 0

    def stream_changed(self) -> None:
        pass

    def delivered(self, n: int, /) -> None:
        self.total += n


async def run_protocol(config: Config, ops: list[Op], fast: bool, taken: list[int]) -> list[object]:
    codec = established(config)
    proto = HboneProtocol(codec)
    transport = Recorded()
    proto.connection_made(transport)
    # The holders the server's owner has: 1 delivers directly to a sink that takes 700 bytes
    # of each chunk, 13 is read by a task, 3's holder has gone, 11 is a pending request.
    streams = {sid: TunnelStream(proto, sid) for sid in KNOWN if sid != 3}
    proto.streams.update(streams)
    sink = PartSink(700)
    wakers = {sid: Told() for sid in streams}
    for sid, stream in streams.items():
        stream.waker = wakers[sid]
    streams[1].deliver_directly(sink)
    choose_path(codec, fast, taken)
    seen: list[object] = []
    ended = {13}
    for op in ops:
        if op[0] == "read":
            proto.data_received(op[1])
        elif op[0] in ("fill", "flood"):
            for data in fills(codec, op):
                proto.data_received(data)
        else:
            proto.dispatch(command(codec, op, ended))
            proto.flush_soon()
        at_once = bytes(transport.written)  # (each command's flush_soon ran before this read)
        for _ in range(3):
            await asyncio.sleep(0)
        seen.append(
            (
                op[0],
                at_once,
                bytes(transport.written),
                transport.closing,
                transport.aborted,
                bytes(sink.got),
                {
                    sid: (
                        b"".join(s._chunks or ()),
                        s.eof,
                        str(s.error),
                        wakers[sid].total,
                        sid in proto.streams,
                    )
                    for sid, s in streams.items()
                },
                proto._queue.charge,
                state(codec),
            )
        )
    proto.connection_lost(None)
    return seen


@pytest.mark.fuzz
def test_the_protocol_with_and_without_the_fast_path_is_the_same() -> None:
    taken: list[int] = []

    @settings(
        max_examples=TUNNEL_EXAMPLES,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(configs, scripts)
    def check(config: Config, script: list[tuple[Any, ...]]) -> None:
        ops = replay(script)
        fast = asyncio.run(run_protocol(config, ops, True, taken))
        slow = asyncio.run(run_protocol(config, ops, False, []))
        for i, (a, b) in enumerate(zip(fast, slow, strict=True)):
            assert a == b, f"step {i} ({ops[i][0]}) differs"

    check()
    assert {1, 3, 13} <= set(taken)  # 3: the frame of a stream whose holder has gone


# ---- the send side ---------------------------------------------------------------------------


def h2_send(flow: DataFlow) -> Callable[[int, memoryview], int]:
    """``DataFlow.send`` done by ``h2``'s own ``send_data``: as much as the peer's windows and
    max frame size allow, one frame at a time, on a stream we may send on."""

    def send(stream_id: int, data: memoryview) -> int:
        h2c, sent = flow.h2, 0
        while sent < len(data):
            if h2wire.stream_state(h2c, stream_id) not in (
                StreamState.OPEN,
                StreamState.HALF_CLOSED_REMOTE,
            ):
                break
            n = min(
                len(data) - sent,
                h2c.max_outbound_frame_size,
                h2c.local_flow_control_window(stream_id),
            )
            if n <= 0:
                break
            h2c.send_data(stream_id, bytes(data[sent : sent + n]))
            flow.take_h2_output()
            sent += n
        return sent

    return send


send_steps = st.one_of(
    st.tuples(
        st.just("send"),
        st.sampled_from([*KNOWN, 15]),
        st.sampled_from([0, 1, 1000, MAX_FRAME, MAX_FRAME + 1, 70_000, 200_000]),
    ),
    st.tuples(st.just("end"), st.sampled_from(KNOWN), st.just(0)),
    st.tuples(st.just("reset"), st.sampled_from(KNOWN), st.just(0)),
    st.tuples(
        st.just("frame"),
        st.one_of(
            st.builds(settings_frame, setting_entries, st.just(False)),
            st.builds(
                lambda sid, inc: frame(8, 0, sid, inc.to_bytes(4)),
                st.sampled_from([0, 1, 3, 13, 5, 15]),
                st.one_of(st.sampled_from([1, 1000, 65_535, 2**31 - 1]), st.integers(0, 2**31)),
            ),
            st.builds(lambda sid: frame(3, 0, sid, b"\0\0\0\x08"), st.sampled_from(KNOWN)),
            st.builds(lambda sid: frame(0, FLAG_END_STREAM, sid), st.sampled_from(KNOWN)),
            st.just(frame(6, 0, 0, b"pingpong")),
        ),
        st.just("alone"),
        st.just(0),
    ),
    # The output is taken only here (and at the end), so that ``h2``'s frames (a SETTINGS or
    # PING ACK, a RST_STREAM, an END_STREAM) and ours share a batch and their order shows.
    st.tuples(st.just("flush"), st.just(0), st.just(0)),
)


def run_send(config: Config, ops: list[Op], inline: bool) -> list[object]:
    codec = established(config)
    if not inline:
        codec._flow.send = h2_send(codec._flow)  # type: ignore[method-assign]
    seen: list[object] = []
    ended = {13}
    for i, op in enumerate(ops):
        events = codec.receive(op[1]) if op[0] == "read" else command(codec, op, ended)
        out = codec.data_to_send() if op[0] == "flush" or i == len(ops) - 1 else b""
        buffered = {sid: codec.buffered(sid) for sid in [*KNOWN, 15]}
        seen.append((op[0], events, bytes(out), buffered, state(codec)))
    return seen


@pytest.mark.fuzz
def test_inline_data_framing_is_h2s_framing() -> None:
    held_back: list[int] = []  # bytes a send left queued for the peer's windows

    @settings(
        max_examples=SEND_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow]
    )
    @given(configs, st.lists(send_steps, max_size=20))
    def check(config: Config, script: list[tuple[Any, ...]]) -> None:
        ops = replay(script)
        ours = run_send(config, ops, True)
        theirs = run_send(config, ops, False)
        for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
            assert a == b, f"step {i} ({ops[i][0]}) differs"
        held_back.extend(n for step in ours for n in step[3].values() if n)  # type: ignore[index]

    check()
    assert held_back  # the windows cut sends short (and reopened: WINDOW_UPDATE steps)


# ---- found on the way -----------------------------------------------------------------------


def test_a_stream_finished_after_the_connection_failed_is_not_reset() -> None:
    """The connection failed (a peer's bad frame: GOAWAY queued, ``h2`` closed) and the
    transport's ``connection_lost`` has not come yet (it waits for the GOAWAY to be written, up
    to ``FAILED_LINGER``): a relay that ends now finishes its stream (``HboneProtocol.finish``,
    which resets a stream that did not end cleanly). That reset is for a connection that sends
    nothing more: nothing, rather than ``h2``'s ProtocolError out of ``finish`` (before: raised
    into the relay's callback, found by the owner steps above continuing after a failure)."""

    async def main() -> None:
        codec = established((SETTINGS[0], False))
        proto = HboneProtocol(codec)
        transport = Recorded()
        proto.connection_made(transport)
        stream = proto.streams[1] = TunnelStream(proto, 1)
        proto.data_received(frame(0, 0, 0, b"x"))  # DATA on stream 0: PROTOCOL_ERROR
        assert codec.failed and transport.closing
        written = bytes(transport.written)
        proto.finish(stream)
        assert 1 not in proto.streams
        assert transport.written == written  # the GOAWAY was the last frame
        codec.reset(3)  # the codec's own command, after ``close`` too
        codec.close()
        codec.reset(13)
        assert codec.data_to_send() == b""

    asyncio.run(main())
