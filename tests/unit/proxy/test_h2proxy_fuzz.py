"""hypothesis: arbitrary and near-HTTP/2 frames from either side never crash the h2c layer.

Whatever a client or pod sends, ``H2Proxy`` must answer, reset, refuse or close, never raise: an
exception in the shell would drop every stream of the connection without the GOAWAY or the
answers they are owed and without counting the cause. Frames are built from valid pieces
(HPACK-encoded requests and responses, gRPC content types, DATA, RST_STREAM, WINDOW_UPDATE,
SETTINGS, PING, GOAWAY, CONTINUATION) mixed with raw bytes, and cut anywhere. ``make fuzz``
runs it with more examples (``tests.fuzzing``).
"""

from __future__ import annotations

import pytest
from h2.connection import H2Connection
from h2.events import RequestReceived
from h2.exceptions import ProtocolError
from hpack import Encoder
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    PriorityFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.proxy.h2exchange import Choice, LocalAnswer, PickRequest
from agent.proxy.h2limits import H2Limits
from agent.proxy.h2proxy import H2Proxy
from agent.proxy.h2relay import H2Relay
from agent.proxy.http1 import Verdict
from tests.fuzzing import fuzz_examples
from tests.unit.proxy.h2peers import peer

EXAMPLES = fuzz_examples(150)
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

stream_ids = st.one_of(st.sampled_from([1, 3, 5]), st.sampled_from([0, 2, 7, 2**31 - 1]))
flags = st.one_of(
    st.sampled_from([{"END_HEADERS"}, {"END_HEADERS", "END_STREAM"}, {"END_STREAM"}, set()]),
    st.sets(st.sampled_from(["END_STREAM", "END_HEADERS", "ACK", "PADDED", "PRIORITY"])),
)
valid_headers = st.sampled_from(
    [
        [(":method", "GET"), (":scheme", "http"), (":authority", "s"), (":path", "/a")],
        [(":method", "GET"), (":scheme", "http"), (":authority", "s"), (":path", "/denied")],
        [
            (":method", "POST"),
            (":scheme", "http"),
            (":authority", "s"),
            (":path", "/pkg.Svc/Call"),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
        ],
        [(":status", "200"), ("content-type", "application/grpc")],
        [(":status", "200"), ("content-type", "application/grpc"), ("grpc-status", "5")],
        [(":status", "100")],
        [("grpc-status", "0")],
    ]
)
any_headers = st.lists(
    st.sampled_from(
        [
            (":method", "POST"),
            (":method", "GET"),
            (":scheme", "http"),
            (":authority", "server:50051"),
            (":path", "/pkg.Svc/Call"),
            (":path", "/denied/x"),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
            ("x-request-id", "r"),
            ("connection", "close"),
            (":status", "200"),
            (":status", "103"),
            ("grpc-status", "0"),
            ("grpc-status", "5"),
            ("content-length", "3"),
        ]
    ),
    max_size=8,
)
request_headers = st.one_of(valid_headers, valid_headers, any_headers)


def _frame(
    kind: str, sid: int, fl: set[str], payload: bytes, headers: list[tuple[str, str]]
) -> bytes:
    """A frame of ``kind`` built valid, then given stream ``sid`` (which may make it invalid)."""
    if kind == "headers":
        f: Frame = HeadersFrame(1, Encoder().encode(headers))
    elif kind == "continuation":
        f = ContinuationFrame(1, Encoder().encode(headers))
    elif kind == "data":
        f = DataFrame(1, payload)
    elif kind == "rst":
        f = RstStreamFrame(1, error_code=len(payload) % 14)
    elif kind == "window":
        f = WindowUpdateFrame(1, window_increment=len(payload) * 4099 + 1)
    elif kind == "settings":
        f = SettingsFrame(0, settings={0x4: len(payload) * 999, 0x3: len(payload) % 3})
    elif kind == "ping":
        f = PingFrame(0, (payload + b"\x00" * 8)[:8])
    elif kind == "goaway":
        f = GoAwayFrame(0, last_stream_id=sid, error_code=len(payload) % 3)
    else:
        f = PriorityFrame(1, depends_on=len(payload))
    for flag in fl:
        if flag in {d.name for d in f.defined_flags}:
            f.flags.add(flag)
    raw = bytearray(f.serialize())
    raw[5:9] = sid.to_bytes(4, "big")
    return bytes(raw)


frames = st.builds(
    _frame,
    st.sampled_from(
        ["headers", "continuation", "data", "rst", "window", "settings", "ping", "goaway", "prio"]
    ),
    stream_ids,
    flags,
    st.binary(max_size=40),
    request_headers,
)
# Mostly frames, so that streams get far enough for the proxy's own logic to run.
pieces = st.lists(st.one_of(*[frames] * 8, st.binary(max_size=12)), max_size=20)


def _one_pod(_request: PickRequest) -> Choice:
    """The source side's mode (an upstream per key) with one key: upstream 0, the test's pod."""
    return Choice("pod")


class _Again:
    """Retries every retryable outcome twice, at once, to the same key."""

    def __init__(self) -> None:
        self.left = 2

    def after(self, status: int | None, first_byte: float, *, replayable: bool) -> float | None:
        if status not in (None, 503) or not replayable or not self.left:
            return None
        self.left -= 1
        return 0.0

    def next(self) -> Choice | LocalAnswer:
        return Choice("pod")


def _routed(request: PickRequest) -> Choice | LocalAnswer:
    """The source side with routes: some requests answered here, the others retried and timed."""
    if request.target.endswith("/nr"):
        return LocalAnswer(404, "NR", b"no route")
    return Choice("pod", retries=_Again(), timeout=3.0, edit_response=lambda block: block[:1])


def drive_arbitrary(
    p: H2Proxy | H2Relay,
    client: list[bytes],
    upstream: list[bytes],
    order: list[bool],
    cut: int,
    eof: bool,
) -> None:
    """Feed a destination core arbitrary frames from both sides, cut into reads of ``cut``
    (the pod's of three times that) in ``order``, then both ends' EOF: it must never raise,
    and the connection must be over."""
    client_bytes = PREFACE + b"".join(client)
    pod_bytes = peer(client_side=False).data_to_send() + b"".join(upstream)
    client_chunks = [client_bytes[i : i + cut] for i in range(0, len(client_bytes), cut)]
    pod_chunks = [pod_bytes[i : i + cut * 3] for i in range(0, len(pod_bytes), cut * 3)]
    for from_client in order:
        if from_client and client_chunks:
            p.receive_client(client_chunks.pop(0))
        elif pod_chunks:
            p.receive_upstream(pod_chunks.pop(0))
        p.take_to_client()
        p.take_to_upstream()
        p.take_completed()
    for chunk in client_chunks:
        p.receive_client(chunk)
    for chunk in pod_chunks:
        p.receive_upstream(chunk)
    if eof:
        p.receive_upstream(b"")
    p.receive_client(b"")
    p.take_to_client()
    assert p.closing and p.active_streams == 0  # whatever happened, the connection is over


@pytest.mark.fuzz
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    client=pieces,
    upstream=pieces,
    order=st.lists(st.booleans(), max_size=60),
    cut=st.integers(min_value=1, max_value=40),
    eof=st.booleans(),
    picked=st.booleans(),
)
def test_arbitrary_frames_from_both_sides_never_raise(
    client: list[bytes],
    upstream: list[bytes],
    order: list[bool],
    cut: int,
    eof: bool,
    picked: bool,
) -> None:
    p = H2Proxy(
        lambda h: Verdict(not h.path.startswith("/denied"), "p"),
        pick=_one_pod if picked else None,
        limits=H2Limits(max_premature_resets=3, max_empty_frames=3, max_concurrent_streams=4),
    )
    drive_arbitrary(p, client, upstream, order, cut, eof)


# -- well-formed peers doing random things, with an occasional hostile frame -----------------
# Weighted towards what makes streams progress; the hostile moves stay in.
OPS = [
    *["open", "open_grpc", "data", "end"] * 3,
    *["open_denied", "reset", "ping", "window", "raw"],
]
POD_OPS = [
    *["respond", "data", "trailers"] * 4,
    *["trailers_only", "reset", "goaway", "raw", "close"],
]


@pytest.mark.fuzz
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    ops=st.lists(
        st.tuples(
            st.booleans(),
            st.integers(0, len(OPS) - 1),
            st.integers(0, len(POD_OPS) - 1),
            st.binary(max_size=300),
        ),
        max_size=60,
    ),
    raw=frames,
    mode=st.sampled_from(["destination", "source", "routed"]),
)
def test_random_streams_between_real_peers_never_raise(
    ops: list[tuple[bool, int, int, bytes]], raw: bytes, mode: str
) -> None:
    client, pod = peer(client_side=True), peer(client_side=False)
    now = [0.0]
    p = H2Proxy(
        lambda h: Verdict(not h.path.startswith("/denied"), "p"),
        pick={"destination": None, "source": _one_pod, "routed": _routed}[mode],
        limits=H2Limits(stream_window=1024, connection_window=4096, max_premature_resets=3,
                        max_replay_body=512),
        clock=lambda: now[0],
    )  # fmt: skip
    pod_streams: list[int] = []
    for from_client, op, pick, payload in ops:
        now[0] += 1.0
        p.expire()  # the shell's timer: timeouts and retries due
        hostile = b""
        try:
            if from_client:
                hostile = _client_op(client, OPS[op], pick, payload, raw)
            else:
                hostile = _pod_op(pod, POD_OPS[pick], pod_streams, payload, raw)
        except (ProtocolError, ValueError):
            pass  # the peer itself refused the move: fine, the proxy never saw it
        out = client.data_to_send() + (hostile if from_client else b"")
        if out:
            p.receive_client(out)
        out = pod.data_to_send() + (b"" if from_client else hostile)
        if out:
            p.receive_upstream(out)
        if p.closing:
            break
        for data, conn, streams in (
            (p.take_to_upstream(), pod, pod_streams),
            (p.take_to_client(), client, None),
        ):
            if not data:
                continue
            try:
                events = conn.receive_data(data)
            except ProtocolError:
                continue
            if streams is not None:
                streams += [e.stream_id for e in events if isinstance(e, RequestReceived)]
        p.take_completed()
    p.receive_client(b"")
    assert p.closing and p.active_streams == 0


def _client_op(conn: H2Connection, op: str, pick: int, payload: bytes, raw: bytes) -> bytes:
    """Do ``op`` on the client; returns hostile bytes to send after what ``conn`` queued."""
    open_ids = sorted(conn.streams) or [1]
    sid = open_ids[pick % len(open_ids)]
    if op.startswith("open"):
        path = "/denied/x" if op == "open_denied" else "/pkg.Svc/Call"
        if len(payload) % 5 == 0 and op != "open_denied":
            path = "/pkg.Svc/nr"  # answered by the routed pick itself
        headers = [(":method", "POST"), (":scheme", "http"), (":authority", "s"), (":path", path)]
        if op == "open_grpc":
            headers.append(("content-type", "application/grpc"))
        conn.send_headers(conn.get_next_available_stream_id(), headers, end_stream=pick == 0)
    elif op == "data":
        conn.send_data(sid, payload[: conn.local_flow_control_window(sid)], end_stream=pick == 1)
    elif op == "end":
        conn.end_stream(sid)
    elif op == "reset":
        conn.reset_stream(sid)
    elif op == "ping":
        conn.ping(payload.ljust(8, b"\0")[:8])
    elif op == "window":
        conn.acknowledge_received_data(len(payload) + 1, sid)
    else:
        return raw
    return b""


def _pod_op(conn: H2Connection, op: str, streams: list[int], payload: bytes, raw: bytes) -> bytes:
    """Do ``op`` on the pod; returns hostile bytes to send after what ``conn`` queued."""
    sid = streams[len(payload) % len(streams)] if streams else 1
    grpc = [(":status", "200"), ("content-type", "application/grpc")]
    if op == "respond":
        conn.send_headers(sid, grpc)
    elif op == "data":
        conn.send_data(sid, payload[: conn.local_flow_control_window(sid)])
    elif op == "trailers":
        conn.send_headers(sid, [("grpc-status", str(len(payload) % 17))], end_stream=True)
    elif op == "trailers_only":
        status = "14" if len(payload) % 2 else "5"  # UNAVAILABLE: retried when routed
        conn.send_headers(sid, [*grpc, ("grpc-status", status)], end_stream=True)
    elif op == "reset":
        conn.reset_stream(sid)
    elif op == "goaway":
        conn.close_connection(last_stream_id=min(streams, default=0))
    elif op == "raw":
        return raw
    else:
        return b"\0" * 9 + b"\x07"  # garbage: a protocol error from the pod
    return b""
