"""Fuzzing the HBONE codec with arbitrary frame sequences (hypothesis).

Frames of every type with random flags, stream ids and payloads (some well formed: CONNECT
header blocks, SETTINGS, WINDOW_UPDATEs, padded DATA), cut into reads at random places, while
an owner answers, consumes and acknowledges at random. Whatever arrives: no exception leaves the
codec, a refusal is a ``ConnectionFailed`` with a cause (the metric label) after which the codec
stays silent, and the codec's accounting never exceeds the documented bound.

``make test`` runs a small number of examples; ``make fuzz`` runs the tests marked ``fuzz`` with
``NODEMESH_FUZZ_EXAMPLES`` examples. Each finding is kept below as a regression test.
"""

from __future__ import annotations

import itertools

import pytest
from hpack import Encoder
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.proxy import hbone_events as ev
from agent.proxy.h2wire import HboneSettings
from agent.proxy.hbone import HboneConnection
from agent.proxy.hbone_events import Cause
from agent.proxy.hbone_limits import connection_memory_bound
from tests.fuzzing import fuzz_examples
from tests.unit.proxy.hostile import PREFACE, frame

EXAMPLES = fuzz_examples(150)
CAUSES = {v for k, v in vars(Cause).items() if not k.startswith("_")}
BOUND = connection_memory_bound(HboneSettings())
ENCODER_HEADERS = [
    [(b":method", b"CONNECT"), (b":authority", b"10.0.0.2:80")],
    [(b":method", b"CONNECT"), (b":authority", b"[fd00::1]:443"), (b"forwarded", b"for=10.0.0.1")],
    [(b":method", b"GET"), (b":scheme", b"https"), (b":path", b"/"), (b":authority", b"a:1")],
    [(b":status", b"200")],
    [(b":method", b"CONNECT"), (b":authority", b"\xff\xfe:80")],
]

stream_ids = st.sampled_from([0, 1, 2, 3, 5, 7, 0x7FFFFFFF]) | st.integers(0, 0xFFFFFFFF)
payloads = st.binary(max_size=64)
structured = st.one_of(
    st.builds(lambda i: Encoder().encode(ENCODER_HEADERS[i]), st.integers(0, 4)),  # HPACK
    st.builds(lambda n: n.to_bytes(4), st.integers(0, 0xFFFFFFFF)),  # WINDOW_UPDATE, RST
    st.builds(  # SETTINGS entries
        lambda pairs: b"".join(k.to_bytes(2) + v.to_bytes(4) for k, v in pairs),
        st.lists(st.tuples(st.integers(0, 8), st.integers(0, 0xFFFFFFFF)), max_size=4),
    ),
)
random_frames = st.builds(
    frame,
    st.integers(0, 12),  # DATA..CONTINUATION, and unknown types
    st.integers(0, 255),
    stream_ids,
    payloads | structured,
)
odd_streams = st.sampled_from([1, 3, 5])
plausible_frames = st.one_of(
    st.builds(lambda sid: frame(1, 0x4, sid, Encoder().encode(ENCODER_HEADERS[0])), odd_streams),
    st.builds(
        lambda sid, data, end: frame(0, end, sid, data),
        odd_streams,
        payloads,
        st.sampled_from([0, 1]),
    ),
    st.builds(
        lambda sid, n: frame(0, 0x8, sid, bytes([n]) + b"p" * 20), odd_streams, st.integers(0, 30)
    ),
    st.builds(lambda sid: frame(3, 0, sid, (8).to_bytes(4)), odd_streams),
    st.builds(
        lambda sid, n: frame(8, 0, sid, n.to_bytes(4)),
        st.sampled_from([0, 1, 3]),
        st.integers(0, 2**31),
    ),
    st.builds(lambda: frame(6, 0, 0, b"12345678")),
    st.builds(
        lambda sid, flags: frame(1, flags, sid, b"\x82"), odd_streams, st.sampled_from([0, 0x1])
    ),
    st.builds(
        lambda sid, flags: frame(9, flags, sid, b"\x84"), odd_streams, st.sampled_from([0, 0x4])
    ),
    st.builds(lambda: frame(7, 0, 0, bytes(8))),  # GOAWAY
)
frames = random_frames | plausible_frames | plausible_frames
# What the owner does after each read: answer requests (status), consume data, acknowledge
# the output (as a transport that is not full would), or nothing.
owner_actions = st.lists(st.sampled_from([200, 503, "consume", "accepted", None]), min_size=1)


def run(client_side: bool, wire: bytes, cuts: list[int], actions: list[object]) -> None:
    codec = HboneConnection(client_side=client_side)
    codec.data_to_send()
    if client_side:
        codec.open_tunnel("10.0.0.2:80")
    pending: list[int] = []
    received: dict[int, int] = {}
    failed = False
    bounds = sorted({0, len(wire), *(c % (len(wire) + 1) for c in cuts)})
    for i, (start, end) in enumerate(itertools.pairwise(bounds)):
        events = codec.receive(wire[start:end])
        if failed:
            assert events == [], "a failed connection must stay silent"
        for event in events:
            if isinstance(event, ev.ConnectionFailed):
                assert event.cause in CAUSES, event
                failed = True
            elif isinstance(event, ev.TunnelRequested):
                pending.append(event.stream_id)
            elif isinstance(event, ev.DataReceived):
                received[event.stream_id] = received.get(event.stream_id, 0) + len(event.data)
        action = actions[i % len(actions)]
        if isinstance(action, int) and pending:
            codec.respond(pending.pop(0), action)
        elif action == "consume":
            for sid, n in received.items():
                codec.consumed(sid, n)
            received.clear()
        elif action == "accepted":
            codec.output_accepted()
        codec.data_to_send()
        assert codec.held_bytes() <= BOUND


@pytest.mark.fuzz
@pytest.mark.parametrize("client_side", [False, True], ids=["server", "client"])
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    body=st.lists(frames, max_size=40),
    garbage=st.binary(max_size=16),
    cuts=st.lists(st.integers(0, 10_000), max_size=8),
    actions=owner_actions,
)
def test_arbitrary_frame_sequences_never_crash_the_codec(
    client_side: bool, body: list[bytes], garbage: bytes, cuts: list[int], actions: list[object]
) -> None:
    preface = b"" if client_side else PREFACE
    run(client_side, preface + frame(4, 0, 0) + b"".join(body) + garbage, cuts, actions)


# ---- findings, kept as regression tests ----------------------------------------------------


def test_finding_answering_a_request_after_the_connection_failed() -> None:
    """A CONNECT, then DATA on an idle even stream (a connection error) in the same read: the
    owner answers the request afterwards. ``respond`` raised h2's ProtocolError (connection
    CLOSED) out of the owner's call."""
    wire = frame(1, 0x4, 1, Encoder().encode(ENCODER_HEADERS[0])) + frame(0, 0, 2, b"")
    run(False, PREFACE + frame(4, 0, 0) + wire, [], [200])


def test_finding_request_header_that_is_not_utf8() -> None:
    """``UnicodeDecodeError`` escaped from h2's header decoding (issue 15, item 5)."""
    wire = frame(1, 0x4, 1, Encoder().encode(ENCODER_HEADERS[4]))
    run(False, PREFACE + frame(4, 0, 0) + wire, [], [None])


def test_finding_request_and_its_reset_in_one_read_after_a_goaway() -> None:
    """GOAWAY from the peer, then a CONNECT and its RST_STREAM in the same read: refusing the
    request (we are going away) reset a stream that was already closed (StreamClosedError)."""
    block = Encoder().encode(ENCODER_HEADERS[0])
    wire = frame(7, 0, 0, bytes(8)) + frame(1, 0x4, 1, block) + frame(3, 0, 1, (8).to_bytes(4))
    run(False, PREFACE + frame(4, 0, 0) + wire, [], [200])


def test_finding_refused_request_and_its_reset_in_one_read() -> None:
    """The same for a request answered 405 by the codec itself (not CONNECT)."""
    block = Encoder().encode(ENCODER_HEADERS[2])
    wire = frame(1, 0x4, 1, block) + frame(3, 0, 1, (8).to_bytes(4))
    run(False, PREFACE + frame(4, 0, 0) + wire, [], [None])
