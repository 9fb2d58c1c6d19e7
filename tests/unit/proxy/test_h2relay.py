"""The destination's frame relay (``agent.proxy.h2relay``): ``test_h2proxy.py``'s destination
tests run against it, then what only the relay has (HPACK state across the relay)."""

from __future__ import annotations

import pytest
from h2.connection import ConnectionState, H2Connection
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    Event,
    RequestReceived,
    ResponseReceived,
    StreamEnded,
    StreamReset,
    TrailersReceived,
)
from h2.exceptions import ProtocolError
from h2.settings import SettingCodes
from hyperframe.frame import DataFrame
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tests.unit.proxy.h2peers as h2peers
import tests.unit.proxy.test_h2proxy as full
import tests.unit.proxy.test_h2proxy_fuzz as fuzz
from agent.proxy.h2limits import PROTOCOL_ERROR, H2Limits
from agent.proxy.h2proxy import H2Proxy
from agent.proxy.h2relay import H2Relay
from agent.proxy.h2wire import encode_field
from agent.proxy.http1 import Verdict
from tests.unit.proxy.h2peers import Wire, peer

# The destination's behaviours, as ``test_h2proxy.py`` states them for ``H2Proxy``. Left out,
# as they are about ``H2Proxy``'s own re-encoding of what it forwards (the relay forwards blocks
# as they came): cookies joined, literals not Huffman-coded, no dynamic table on the proxy's
# legs, per-call values made never-indexed.
SHARED = [
    "test_a_request_reaches_the_pod_with_a_request_id_and_its_response_comes_back",
    "test_a_request_id_the_client_sent_is_kept",
    "test_a_denied_request_gets_403_and_the_connection_keeps_serving",
    "test_a_denied_grpc_call_is_a_trailers_only_permission_denied",
    "test_grpc_status_comes_from_trailers_and_from_trailers_only_responses",
    "test_a_pod_that_does_not_read_stops_the_client_within_the_windows",
    "test_a_client_that_does_not_read_stops_the_pod_within_the_windows",
    "test_a_whole_response_then_a_reset_no_error_reaches_the_client_whole",
    "test_an_upstream_that_dies_is_unavailable_for_grpc_and_502_for_http",
    "test_an_upstream_that_dies_mid_response_resets_the_stream",
    "test_a_path_is_normalized_for_policy_and_the_pod_as_http1s_target_is",
    "test_a_pods_reset_after_its_response_began_reaches_the_client_with_its_code",
    "test_a_stream_the_client_resets_is_cancelled_at_the_pod",
    "test_a_drain_sends_goaway_refuses_streams_that_crossed_it_and_lets_open_ones_end",
    "test_a_ping_flood_closes_the_connection",
    "test_pings_the_shell_keeps_taking_answers_for_are_fine",
    "test_rapid_reset_closes_the_connection",
    "test_resets_of_streams_older_than_the_premature_lifetime_are_not_a_rapid_reset",
    "test_resets_after_the_response_began_are_not_a_rapid_reset",
    "test_a_malformed_request_block_closes_the_connection_as_a_protocol_error",
    "test_malformed_request_trailers_close_the_connection_as_a_protocol_error",
    "test_a_malformed_response_block_from_the_pod_is_unavailable_and_counted",
    "test_empty_request_trailers_are_forwarded",
    "test_relayed_data_skips_h2s_send_data",
    "test_a_continuation_flood_closes_the_connection",
    "test_a_header_block_over_the_limit_closes_the_connection",
    "test_more_streams_than_advertised_closes_the_connection",
    "test_a_run_of_empty_data_frames_closes_the_connection",
    "test_a_denied_head_is_authorized_with_method_path_and_authority",
    "test_response_bytes_not_yet_taken_are_not_counted_as_replies_to_the_client",
    "test_an_open_header_block_starts_the_header_clock_and_its_end_stops_it",
    "test_a_rate_limited_grpc_call_is_a_trailers_only_resource_exhausted",
]
for _name in SHARED:
    globals()[_name] = getattr(full, _name)


@pytest.fixture(autouse=True)
def _relay(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every ``H2Proxy`` these tests make at the destination is an ``H2Relay``."""
    monkeypatch.setattr(h2peers, "H2Proxy", H2Relay)
    monkeypatch.setattr(full, "H2Proxy", H2Relay)


# -- HPACK state across the relay ---------------------------------------------------------------
def _pod_requests(w: Wire) -> list[dict[bytes, bytes]]:
    return [dict(e.headers) for e in w.pod_events if isinstance(e, RequestReceived)]


def test_a_refused_request_that_filled_the_clients_table_leaves_the_pods_decoder_right() -> None:
    """The client's encoder indexes ``x-tenant`` in the denied request's block, which the pod
    never gets; the next request refers to that entry. The relay re-encodes it (and every later
    block) without the table, so the pod reads the right value instead of failing to decode."""
    w = Wire()
    w.request("/denied", extra=[(b"x-tenant", b"blue")])
    w.run()
    w.request("/fine", extra=[(b"x-tenant", b"blue")])
    w.request("/fine/2", extra=[(b"x-tenant", b"green")])
    w.run()
    got = [(r[b":path"], r[b"x-tenant"]) for r in _pod_requests(w)]
    assert got == [(b"/fine", b"blue"), (b"/fine/2", b"green")]
    assert w.proxy.take_rejections() == []


class _RawBlocks:
    """A client's HPACK encoder that sends the blocks given, byte for byte, one per head."""

    def __init__(self, blocks: list[bytes]) -> None:
        self.blocks = blocks
        self.header_table_size = 4096  # what h2 sets from the relay's SETTINGS

    def encode(self, _headers: object, huffman: bool = True) -> bytes:
        return self.blocks.pop(0)


def _literal(name: bytes, value: bytes, *, indexing: bool) -> bytes:
    return bytes((0x40 if indexing else 0x00, len(name))) + name + bytes((len(value),)) + value


def test_a_refused_request_that_inserted_the_newest_entry_again_leaves_the_pod_right() -> None:
    """The client's table holds two entries; the denied request inserts the newest one's field
    again, evicting the other: as many entries, the newest equal to the one before, so only a
    count of changes tells the relay's copy moved. The pod never got that block: the relay
    re-encodes the next request, which names the entry by index, and the pod reads what the
    relay read and authorized (not the entry its own table still holds there)."""
    w = Wire()

    def head(path: bytes) -> bytes:
        fields = [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"s"),
                  (b":path", path)]  # fmt: skip
        return b"".join(_literal(n, v, indexing=False) for n, v in fields)

    first = b"\x3f\x31" + head(b"/fine")  # a table of 80 bytes: two entries of 40
    first += _literal(b"x-aa", b"1111", indexing=True) + _literal(b"x-bb", b"2222", indexing=True)
    again = head(b"/denied") + _literal(b"x-bb", b"2222", indexing=True)
    third = head(b"/fine/3") + b"\xbf"  # index 63: the older of the two entries
    w.client.encoder = _RawBlocks([first, again, third])  # type: ignore[assignment]
    for path in ("/fine", "/denied", "/fine/3"):
        w.request(path)
        w.run()
    got = [(r[b":path"], r.get(b"x-aa"), r.get(b"x-bb")) for r in _pod_requests(w)]
    assert got == [(b"/fine", b"1111", b"2222"), (b"/fine/3", None, b"2222")]


def test_trailers_held_behind_data_are_re_encoded_and_later_blocks_stay_in_step() -> None:
    """Trailers that wait behind DATA the pod's window holds cannot go in the client's order:
    they are re-encoded without the table, and so is what follows (the client's later blocks
    may refer to the entries the trailers added)."""
    w = Wire()
    sid = w.request("/upload", end=False)
    w.run()
    body = b"x" * 65535 + b"y" * 1000  # beyond the pod's default window: the end is held
    for start in range(0, len(body), 16384):
        w.client.send_data(sid, body[start : start + 16384])
    w.client.send_headers(sid, [(b"x-checksum", b"abc")], end_stream=True)
    w.request("/next", extra=[(b"x-checksum", b"abc")])
    w.run()
    assert [r[b":path"] for r in _pod_requests(w)] == [b"/upload", b"/next"]
    assert _pod_requests(w)[1][b"x-checksum"] == b"abc"
    for e in w.pod_events:
        if isinstance(e, DataReceived):
            w.pod.acknowledge_received_data(e.flow_controlled_length, e.stream_id)
    w.run()
    trailers = [e.headers for e in w.pod_events if isinstance(e, TrailersReceived)]
    assert trailers == [[(b"x-checksum", b"abc")]]
    got = b"".join(e.data for e in w.pod_events if isinstance(e, DataReceived))
    assert got == body


def test_a_response_block_for_a_stream_the_client_reset_keeps_the_clients_decoder_right() -> None:
    """The pod's response to a stream the client reset meanwhile is not forwarded; the pod's
    encoder indexed a field in it, which the next response refers to."""
    w = Wire()
    first = w.request("/a")
    w.run()
    (req,) = [e for e in w.pod_events if isinstance(e, RequestReceived)]
    w.client.reset_stream(first)
    w.pod.send_headers(req.stream_id, [(b":status", b"200"), (b"x-shard", b"7")])
    w.run()
    w.pod_events.clear()
    second = w.request("/b")
    w.run()
    (req,) = [e for e in w.pod_events if isinstance(e, RequestReceived)]
    w.pod.send_headers(req.stream_id, [(b":status", b"200"), (b"x-shard", b"7")], end_stream=True)
    w.run()
    (resp,) = w.taken(ResponseReceived)
    assert resp.stream_id == second and dict(resp.headers)[b"x-shard"] == b"7"


def test_a_pod_with_a_smaller_header_table_gets_blocks_without_the_table() -> None:
    w = Wire()
    w.pod.update_settings({SettingCodes.HEADER_TABLE_SIZE: 0})
    w.run()
    for path in (b"/one", b"/two"):
        w.request(path.decode(), extra=[(b"x-tenant", b"blue")])
        w.run()
    assert [(r[b":path"], r[b"x-tenant"]) for r in _pod_requests(w)] == [
        (b"/one", b"blue"),
        (b"/two", b"blue"),
    ]
    assert w.proxy.take_rejections() == []


def test_the_request_id_is_appended_to_the_block_as_it_came() -> None:
    """No re-encoding to add ``x-request-id``: the client's block, then one literal field."""
    w = Wire()
    w.request("/a")
    block = w.client.data_to_send()
    w.proxy.receive_client(block)
    out = w.proxy.take_to_upstream()
    assert out.endswith(encode_field(b"x-request-id", b"rid-1", never_indexed=True))


# -- hypothesis: the relay never raises, and does what H2Proxy does ------------------------------
@pytest.mark.fuzz
@settings(max_examples=fuzz.EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    client=fuzz.pieces,
    upstream=fuzz.pieces,
    order=st.lists(st.booleans(), max_size=60),
    cut=st.integers(min_value=1, max_value=40),
    eof=st.booleans(),
)
def test_arbitrary_frames_from_both_sides_never_raise(
    client: list[bytes], upstream: list[bytes], order: list[bool], cut: int, eof: bool
) -> None:
    p = H2Relay(
        lambda h: Verdict(not h.path.startswith("/denied"), "p"),
        limits=H2Limits(max_premature_resets=3, max_empty_frames=3, max_concurrent_streams=4),
    )
    fuzz.drive_arbitrary(p, client, upstream, order, cut, eof)


CLIENT_OPS = ["open", "open_grpc", "data", "end"] * 3 + ["open_denied", "reset", "ping", "window"]
POD_OPS = ["respond", "data", "trailers"] * 4 + ["trailers_only", "reset", "goaway", "close"]
Seen = dict[object, list[tuple[str, object]]]


def _note(seen: Seen, key: object, kind: str, value: object) -> None:
    """One event of a stream; consecutive DATA joined (frame boundaries may differ)."""
    events = seen.setdefault(key, [])
    if kind == "data" and events and events[-1][0] == "data":
        events[-1] = ("data", events[-1][1] + value)  # type: ignore[operator]
    else:
        events.append((kind, value))


def _received(conn: H2Connection, data: bytes, seen: Seen) -> list[Event]:
    if conn.state_machine.state == ConnectionState.CLOSED:
        return []  # an h2 peer that sent GOAWAY takes nothing more (a stray RST is no news)
    try:
        return conn.receive_data(data) if data else []
    except ProtocolError:
        _note(seen, "connection", "protocol-error", None)
        return []


def _observe(seen: Seen, events: list[Event], order: list[int] | None) -> None:
    """Note ``events`` by stream: by id, or by position in ``order`` (the pod's requests)."""

    def key(sid: int) -> object:
        return order.index(sid) if order is not None and sid in order else sid

    for e in events:
        if isinstance(e, (RequestReceived, ResponseReceived, TrailersReceived)):
            _note(seen, key(e.stream_id), type(e).__name__, [tuple(h) for h in e.headers])
        elif isinstance(e, DataReceived):
            _note(seen, key(e.stream_id), "data", e.data)
        elif isinstance(e, StreamEnded):
            _note(seen, key(e.stream_id), "end", None)
        elif isinstance(e, StreamReset):
            _note(seen, key(e.stream_id), "reset", int(e.error_code))
        elif isinstance(e, ConnectionTerminated):
            _note(seen, "connection", "goaway", int(e.error_code))


def _play(kind: type, ops: list[tuple[bool, int, int, bytes]]) -> tuple[object, ...]:
    """Play ``ops`` between an ``h2`` client and pod through ``kind``; what each side saw."""
    client, pod = peer(client_side=True), peer(client_side=False)
    p = kind(lambda h: Verdict(not h.path.startswith("/denied"), "p"), new_request_id=lambda: "r")
    pod_streams: list[int] = []
    client_seen: Seen = {}
    pod_seen: Seen = {}
    for from_client, op, pick, payload in ops:
        try:
            if from_client:
                fuzz._client_op(client, CLIENT_OPS[op % len(CLIENT_OPS)], pick, payload, b"")
            else:
                fuzz._pod_op(pod, POD_OPS[pick % len(POD_OPS)], pod_streams, payload, b"")
        except (ProtocolError, ValueError):
            pass  # the peer itself refused the move
        for _ in range(4):  # until nothing moves
            out = client.data_to_send()
            if out and not p.closing:
                p.receive_client(out)
            out = pod.data_to_send()
            if out and not p.closing:
                p.receive_upstream(out)
            events = _received(pod, p.take_to_upstream(), pod_seen)
            pod_streams += [e.stream_id for e in events if isinstance(e, RequestReceived)]
            _observe(pod_seen, events, pod_streams)
            _observe(client_seen, _received(client, p.take_to_client(), client_seen), None)
    done = sorted(
        (x.head.path, x.status, x.grpc_status, x.flags, x.request_bytes, x.response_bytes)
        for x in p.take_completed()
    )
    return client_seen, pod_seen, done, p.take_rejections(), p.closing


@pytest.mark.fuzz
@settings(max_examples=fuzz.EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    ops=st.lists(
        st.tuples(
            st.booleans(),
            st.integers(0, len(CLIENT_OPS) - 1),
            st.integers(0, len(POD_OPS) - 1),
            st.binary(max_size=300),
        ),
        max_size=60,
    )
)
def test_the_relay_does_what_the_full_proxy_does_between_real_peers(
    ops: list[tuple[bool, int, int, bytes]],
) -> None:
    """The same moves of an ``h2`` client and pod through ``H2Proxy`` and through ``H2Relay``:
    the client sees the same responses, DATA, trailers, resets and GOAWAY; the pod the same
    requests in the same order; the same exchanges are reported and refusals counted."""
    full_run = _play(H2Proxy, ops)
    relay_run = _play(H2Relay, ops)
    assert relay_run == full_run


@pytest.mark.parametrize("kind", [H2Proxy, H2Relay])
def test_data_beyond_a_streams_window_closes_the_connection(kind: type) -> None:
    """What a client sends on one stream is bounded by the stream's window (256 KiB), not only by
    the connection's (1 MiB): beyond it, FLOW_CONTROL_ERROR (``H2Proxy``'s ``h2`` and the relay
    alike), while the pod reads nothing."""
    p = kind(lambda _h: Verdict(True))
    p.receive_client(peer(client_side=True).data_to_send())
    p.receive_client(full._headers_frame(1, end_stream=False))
    chunk = bytes(DataFrame(1, b"x" * 16384).serialize())
    for _ in range(16):  # 256 KiB: within the window
        p.receive_client(chunk)
    assert p.take_rejections() == [] and not p.closing
    p.receive_client(chunk)
    assert p.take_rejections() == [PROTOCOL_ERROR] and p.closing


def test_a_response_read_whole_goes_to_the_client_as_the_pod_sent_it() -> None:
    """A gRPC server writes a response at once (head, message, trailers), so the relay reads
    them together: the message goes out as it is read (the windows allow it), so the trailers
    behind it are forwarded as the pod encoded them, in order, not re-encoded without the
    table; and a pod whose encoder indexes its trailers' fields (``h2``'s, grpcio's) does not
    make the relay re-encode every later block of the connection. Three calls: the client
    gets the pod's bytes unchanged (before, the trailers were re-encoded on each call and,
    after the first call's indexing, the response heads too)."""
    w = Wire()
    for n in range(3):
        sid = w.request("/pkg.Echo/Unary", grpc=True)
        w.run()
        w.pod_answers_grpc(sid, [(b"grpc-status", b"0"), (b"grpc-message", b"ok")])
        sent = w.pod.data_to_send()
        w.proxy.receive_upstream(sent)
        out = w.proxy.take_to_client()
        assert out == sent, f"call {n}: not forwarded as the pod sent it"
        w.client_events += w.client.receive_data(out)
    trailers = [dict(e.headers) for e in w.client_events if isinstance(e, TrailersReceived)]
    assert trailers == [{b"grpc-status": b"0", b"grpc-message": b"ok"}] * 3
    assert [(x.status, x.grpc_status) for x in w.proxy.take_completed()] == [(200, "0")] * 3


def test_streams_that_end_with_nothing_held_discard_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Ten gRPC calls answered in full: each stream ends with both its queues empty, so none
    is walked to give windows back (two walks per stream before, each a ``sum`` over a
    generator); the calls are answered."""
    walks: list[int] = []
    real = H2Relay._discard

    def counted(queue: object, ack: object, s: object) -> None:
        walks.append(1)
        real(queue, ack, s)  # type: ignore[arg-type]

    monkeypatch.setattr(H2Relay, "_discard", staticmethod(counted))
    w = Wire()
    for _ in range(10):
        sid = w.request("/pkg.Echo/Unary", grpc=True)
        w.run()
        w.pod_answers_grpc(sid)
        w.run()
    assert [x.grpc_status for x in w.proxy.take_completed()] == ["0"] * 10
    assert walks == []
