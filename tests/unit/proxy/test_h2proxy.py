"""The destination's HTTP/2 and gRPC layer, sans-IO: an h2 client, the proxy and an h2 pod."""

from __future__ import annotations

import sys
from collections.abc import Callable
from types import FrameType

import pytest
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    Event,
    InformationalResponseReceived,
    RemoteSettingsChanged,
    RequestReceived,
    ResponseReceived,
    StreamEnded,
    StreamReset,
    TrailersReceived,
)
from h2.settings import SettingCodes
from hpack import Encoder, HeaderTuple, NeverIndexedHeaderTuple
from hyperframe.frame import ContinuationFrame, HeadersFrame, PingFrame, RstStreamFrame

from agent.proxy.h2exchange import (
    NO_REPORTS,
    UPSTREAM_OVERFLOW,
    Admit,
    Choice,
    H2Exchange,
    LocalAnswer,
    Pick,
    PickRequest,
)
from agent.proxy.h2guard import CONTINUATION_FLOOD, HEADER_BLOCK
from agent.proxy.h2limits import (
    CONTROL_FLOOD,
    EMPTY_FRAMES,
    PROTOCOL_ERROR,
    RAPID_RESET,
    TOO_MANY_STREAMS,
    H2Limits,
)
from agent.proxy.h2proxy import H2Proxy
from agent.proxy.h2wire import WALK_FROM, GracefulH2Connection
from agent.proxy.http1 import UPSTREAM_PROTOCOL, RequestHead, Verdict
from tests.unit.proxy.h2peers import Wire, peer

OK_TRAILERS = [(b"grpc-status", b"0")]


def _respond(w: Wire, body: bytes = b"hello", *, grpc: bool = False) -> int:
    """The pod answers the one request it has; returns the pod's stream id."""
    (req,) = [e for e in w.pod_events if isinstance(e, RequestReceived)]
    w.pod_events.clear()
    sid: int = req.stream_id
    ctype = b"application/grpc" if grpc else b"text/plain"
    w.pod.send_headers(sid, [(b":status", b"200"), (b"content-type", ctype)])
    w.pod.send_data(sid, body, end_stream=not grpc)
    if grpc:
        w.pod.send_headers(sid, OK_TRAILERS, end_stream=True)
    w.run()
    return sid


def test_a_request_reaches_the_pod_with_a_request_id_and_its_response_comes_back() -> None:
    w = Wire()
    sid = w.request("/hello?x=1")
    w.run()
    (req,) = [e for e in w.pod_events if isinstance(e, RequestReceived)]
    assert (b"x-request-id", b"rid-1") in req.headers
    assert (b":path", b"/hello?x=1") in req.headers
    _respond(w)
    (resp,) = w.taken(ResponseReceived)
    assert resp.stream_id == sid and (b":status", b"200") in resp.headers
    assert [e.data for e in w.taken(DataReceived)] == [b"hello"]
    assert [e.stream_id for e in w.taken(StreamEnded)] == [sid]
    (ex,) = w.proxy.take_completed()
    assert (ex.head.method, ex.head.path, ex.head.host) == ("GET", "/hello", "server:50051")
    assert (ex.status, ex.response_bytes, ex.flags, ex.grpc) == (200, 5, "-", False)


def test_a_request_id_the_client_sent_is_kept() -> None:
    w = Wire()
    w.request("/a", extra=[(b"x-request-id", b"mine")])
    w.run()
    (req,) = [e for e in w.pod_events if isinstance(e, RequestReceived)]
    assert [v for k, v in req.headers if k == b"x-request-id"] == [b"mine"]


def test_a_denied_request_gets_403_and_the_connection_keeps_serving() -> None:
    w = Wire()
    denied = w.request("/denied/x", end=False)
    w.client.send_data(denied, b"body the pod must never see", end_stream=True)
    allowed = w.request("/fine")
    w.run()
    pod_paths = [dict(e.headers)[b":path"] for e in w.pod_events if isinstance(e, RequestReceived)]
    assert pod_paths == [b"/fine"]
    assert not [e for e in w.pod_events if isinstance(e, DataReceived)]
    _respond(w)
    by_stream = {e.stream_id: dict(e.headers)[b":status"] for e in w.taken(ResponseReceived)}
    assert by_stream == {denied: b"403", allowed: b"200"}
    bodies = {e.stream_id: e.data for e in w.taken(DataReceived)}
    assert bodies == {denied: b"RBAC: access denied", allowed: b"hello"}
    flags = sorted((ex.head.path, ex.status, ex.flags) for ex in w.proxy.take_completed())
    assert flags == [("/denied/x", 403, "RBAC"), ("/fine", 200, "-")]


def test_a_denied_grpc_call_is_a_trailers_only_permission_denied() -> None:
    w = Wire()
    sid = w.request("/denied.Svc/Call", grpc=True)
    w.run()
    (resp,) = w.taken(ResponseReceived)
    headers = dict(resp.headers)
    assert resp.stream_ended is not None  # trailers-only: one HEADERS frame with END_STREAM
    assert (headers[b":status"], headers[b"grpc-status"]) == (b"200", b"7")
    assert headers[b"grpc-message"] == b"RBAC: access denied"
    assert resp.stream_id == sid
    (ex,) = w.proxy.take_completed()
    assert (ex.grpc, ex.status, ex.grpc_status, ex.flags) == (True, 200, "7", "RBAC")
    assert w.taken(StreamReset) == []  # the call was complete: nothing to cut short


def test_grpc_status_comes_from_trailers_and_from_trailers_only_responses() -> None:
    w = Wire()
    w.request("/pkg.Svc/Ok", grpc=True)
    w.run()
    _respond(w, b"\x00\x00\x00\x00\x00", grpc=True)
    (trailers,) = w.taken(TrailersReceived)
    assert trailers.headers == OK_TRAILERS
    w.request("/pkg.Svc/Missing", grpc=True)
    w.run()
    (req,) = [e for e in w.pod_events if isinstance(e, RequestReceived)]
    w.pod.send_headers(
        req.stream_id,
        [(b":status", b"200"), (b"content-type", b"application/grpc"), (b"grpc-status", b"5")],
        end_stream=True,
    )
    w.run()
    statuses = [(ex.head.path, ex.grpc_status) for ex in w.proxy.take_completed()]
    assert statuses == [("/pkg.Svc/Ok", "0"), ("/pkg.Svc/Missing", "5")]
    trailers_only = [e for e in w.taken(ResponseReceived) if dict(e.headers).get(b"grpc-status")]
    assert len(trailers_only) == 1 and trailers_only[0].stream_ended is not None


def test_a_pod_that_does_not_read_stops_the_client_within_the_windows() -> None:
    limits = H2Limits(stream_window=64 * 1024, connection_window=128 * 1024)
    w = Wire(limits=limits)
    sid = w.request("/upload", end=False)
    w.run()
    sent = 0
    chunk = b"x" * 16384
    for _ in range(64):  # 1 MiB offered
        n = min(len(chunk), w.client.local_flow_control_window(sid))
        if n:
            w.client.send_data(sid, chunk[:n])
            sent += n
        w.run()
    received = sum(len(e.data) for e in w.pod_events if isinstance(e, DataReceived))
    # The pod never acknowledged: its windows (65535 bytes, the protocol's default) are full, the
    # proxy holds at most one stream window it has not reopened to the client, and the client is
    # stopped.
    assert received == 65535
    assert 0 < sent - received <= limits.stream_window
    assert w.client.local_flow_control_window(sid) == 0
    # The pod reads: everything moves on, and the client may send again.
    for e in w.pod_events:
        if isinstance(e, DataReceived):
            w.pod.acknowledge_received_data(e.flow_controlled_length, sid)
    w.pod_events.clear()
    w.run()
    assert sum(len(e.data) for e in w.pod_events if isinstance(e, DataReceived)) > 0
    assert w.client.local_flow_control_window(sid) > 0


def test_a_client_that_does_not_read_stops_the_pod_within_the_windows() -> None:
    limits = H2Limits(stream_window=64 * 1024, connection_window=128 * 1024)
    w = Wire(limits=limits)
    w.request("/download")
    w.run()
    (req,) = [e for e in w.pod_events if isinstance(e, RequestReceived)]
    w.pod.send_headers(req.stream_id, [(b":status", b"200")])
    sent = 0
    for _ in range(64):
        n = min(16384, w.pod.local_flow_control_window(req.stream_id))
        if n:
            w.pod.send_data(req.stream_id, b"y" * n)
            sent += n
        w.run()
    got = sum(len(e.data) for e in w.client_events if isinstance(e, DataReceived))
    assert got == 65535  # the client's default stream window, never acknowledged
    assert 0 < sent - got <= limits.stream_window  # what the proxy holds for the pod
    assert w.pod.local_flow_control_window(req.stream_id) == 0  # and the pod is stopped


def test_a_whole_response_then_a_reset_no_error_reaches_the_client_whole() -> None:
    """A gRPC server answers a client-streaming call before the client finished sending: its
    whole response, then RST_STREAM NO_ERROR (RFC 9113 8.1: "stop sending the request", as
    grpcio does). Part of the response still waits in the proxy for the client's window: it
    and the trailers still reach the client, then the reset NO_ERROR. Before, the reset was
    taken for a lost upstream: the client's stream was reset INTERNAL_ERROR, the end of the
    response dropped, and grpcio failed the call INTERNAL."""
    w = Wire()
    sid = w.request("/pkg.Svc/Upload", grpc=True, end=False)
    w.client.send_data(sid, b"\0\0\0\0\x01a")
    w.run()
    (req,) = [e for e in w.pod_events if isinstance(e, RequestReceived)]
    message = b"\0" + (70_000).to_bytes(4) + b"m" * 70_000  # beyond the client's window
    w.pod.send_headers(
        req.stream_id, [(b":status", b"200"), (b"content-type", b"application/grpc")]
    )
    for i in range(0, len(message), 16_384):
        w.pod.send_data(req.stream_id, message[i : i + 16_384])
    w.pod.send_headers(req.stream_id, [(b"grpc-status", b"0")], end_stream=True)
    w.pod.reset_stream(req.stream_id, ErrorCodes.NO_ERROR)
    w.run()
    got = b""
    for _ in range(10):  # the client reads what came, which lets the rest come
        for e in w.client_events:
            if isinstance(e, DataReceived):
                got += e.data
                w.client.acknowledge_received_data(e.flow_controlled_length, sid)
        w.client_events = [e for e in w.client_events if not isinstance(e, DataReceived)]
        w.run()
    assert got == message
    (trailers,) = w.taken(TrailersReceived)
    assert dict(trailers.headers)[b"grpc-status"] == b"0"
    assert [e.error_code for e in w.taken(StreamReset)] in ([], [ErrorCodes.NO_ERROR])


def test_the_bytes_held_for_a_stream_the_client_resets_give_both_peers_their_windows() -> None:
    """What the proxy held for a stream (request bytes the pod did not take, response bytes
    the client did not) goes nowhere once the client resets it: their connection windows
    are given back to the peer that sent them (``_discard_request``, ``_release_response``)."""
    limits = H2Limits(stream_window=64 * 1024, connection_window=128 * 1024)
    w = Wire(limits=limits)
    up = w.request("/upload", end=False)
    down = w.request("/download")
    w.run()
    requests = {dict(e.headers)[b":path"]: e.stream_id for e in w.pod_events
                if isinstance(e, RequestReceived)}  # fmt: skip
    download = requests[b"/download"]
    w.pod.send_headers(download, [(b":status", b"200")])
    for _ in range(8):  # neither the pod nor the client reads: the proxy holds some of each
        n = min(16384, w.client.local_flow_control_window(up))
        if n:
            w.client.send_data(up, b"x" * n)
        n = min(16384, w.pod.local_flow_control_window(download))
        if n:
            w.pod.send_data(download, b"y" * n)
        w.run()
    client_window, pod_window = (
        w.client.outbound_flow_control_window,
        w.pod.outbound_flow_control_window,
    )
    w.client.reset_stream(up)
    w.client.reset_stream(down)
    w.run()
    assert w.client.outbound_flow_control_window > client_window
    assert w.pod.outbound_flow_control_window > pod_window


def test_an_upstream_that_dies_is_unavailable_for_grpc_and_502_for_http() -> None:
    w = Wire()
    grpc = w.request("/pkg.Svc/Slow", grpc=True)
    http = w.request("/slow")
    w.run()
    w.proxy.receive_upstream(b"")
    w.run()
    answers = {e.stream_id: dict(e.headers) for e in w.taken(ResponseReceived)}
    assert answers[grpc][b"grpc-status"] == b"14"
    assert answers[http][b":status"] == b"502"
    assert [e.error_code for e in w.taken(ConnectionTerminated)] == [ErrorCodes.NO_ERROR]
    done = sorted(
        (ex.head.path, ex.status, ex.grpc_status, ex.flags) for ex in w.proxy.take_completed()
    )
    assert done == [("/pkg.Svc/Slow", 200, "14", "UC"), ("/slow", 502, "", "UC")]
    assert w.proxy.closing


def test_an_upstream_that_dies_mid_response_resets_the_stream() -> None:
    w = Wire()
    sid = w.request("/stream", grpc=True)
    w.run()
    (req,) = [e for e in w.pod_events if isinstance(e, RequestReceived)]
    w.pod.send_headers(
        req.stream_id, [(b":status", b"200"), (b"content-type", b"application/grpc")]
    )
    w.run()
    w.proxy.receive_upstream(b"")
    w.run()
    (reset,) = w.taken(StreamReset)
    # CONNECT_ERROR (``h2core.POD_LOST``): the source ends it as its own endpoint's loss (was
    # INTERNAL_ERROR, which it could not tell from the pod's own reset)
    assert (reset.stream_id, reset.error_code) == (sid, ErrorCodes.CONNECT_ERROR)
    (ex,) = w.proxy.take_completed()
    assert ex.flags == "UC"


POD_RESETS = [
    (ErrorCodes.CANCEL, ErrorCodes.CANCEL),  # grpcio: CANCELLED
    (ErrorCodes.REFUSED_STREAM, ErrorCodes.REFUSED_STREAM),  # UNAVAILABLE
    (ErrorCodes.ENHANCE_YOUR_CALM, ErrorCodes.ENHANCE_YOUR_CALM),  # RESOURCE_EXHAUSTED
    (ErrorCodes.INADEQUATE_SECURITY, ErrorCodes.INADEQUATE_SECURITY),  # PERMISSION_DENIED
    (ErrorCodes.NO_ERROR, ErrorCodes.INTERNAL_ERROR),  # cut short: INTERNAL
]


@pytest.mark.parametrize(("sent", "expected"), POD_RESETS)
def test_a_pods_reset_after_its_response_began_reaches_the_client_with_its_code(
    sent: ErrorCodes, expected: ErrorCodes
) -> None:
    """The pod resets a stream whose response began: the client gets the pod's code (gRPC's
    mapping gives the status the server meant), not INTERNAL_ERROR whatever it was (before)."""
    w = Wire()
    sid = w.request("/stream", grpc=True)
    w.run()
    (req,) = [e for e in w.pod_events if isinstance(e, RequestReceived)]
    head = [(b":status", b"200"), (b"content-type", b"application/grpc")]
    w.pod.send_headers(req.stream_id, head)
    w.pod.send_data(req.stream_id, b"\0\0\0\0\x02hi")
    w.run()
    w.pod.reset_stream(req.stream_id, sent)
    w.run()
    assert [(e.stream_id, e.error_code) for e in w.taken(StreamReset)] == [(sid, expected)]
    (ex,) = w.proxy.take_completed()
    assert ex.flags == "UR"


def test_a_stream_the_client_resets_is_cancelled_at_the_pod() -> None:
    w = Wire()
    sid = w.request("/slow")
    w.run()
    w.client.reset_stream(sid, ErrorCodes.CANCEL)
    w.run()
    (reset,) = [e for e in w.pod_events if isinstance(e, StreamReset)]
    assert reset.error_code == ErrorCodes.CANCEL
    (ex,) = w.proxy.take_completed()
    assert ex.flags == "DC"


def test_a_drain_sends_goaway_refuses_streams_that_crossed_it_and_lets_open_ones_end() -> None:
    """The agent drains: GOAWAY (no error) names the last stream taken; a stream the client
    opened before it read the GOAWAY is refused (REFUSED_STREAM: never processed, the client
    sends it again on a new connection) and never reaches the pod; the open call goes on to its
    end, and then the connection closes."""
    w = Wire(graceful_client=True)
    open_call = w.request("/pkg.Svc/Watch", grpc=True, end=False)
    w.run()
    crossed = w.request("/pkg.Svc/Unary", grpc=True)  # on the wire as the GOAWAY is
    w.proxy.drain()
    w.run()
    (goaway,) = w.taken(ConnectionTerminated)
    assert (goaway.error_code, goaway.last_stream_id) == (ErrorCodes.NO_ERROR, open_call)
    (refused,) = w.taken(StreamReset)
    assert (refused.stream_id, refused.error_code) == (crossed, ErrorCodes.REFUSED_STREAM)
    assert not w.proxy.closing
    w.client.send_data(open_call, b"\0\0\0\0\0", end_stream=True)
    w.run()
    w.pod_answers_grpc(open_call)
    w.run()
    assert [e.stream_id for e in w.pod_events if isinstance(e, RequestReceived)] == [open_call]
    assert any(isinstance(e, StreamEnded) and e.stream_id == open_call for e in w.client_events)
    assert w.proxy.closing and w.proxy.take_rejections() == []


# -- flood limits: raw frames, as a hostile client writes them -------------------------------
def _raw_client(limits: H2Limits | None = None) -> H2Proxy:
    proxy = H2Proxy(lambda _h: Verdict(True), limits=limits)
    proxy.receive_client(peer(client_side=True).data_to_send())  # preface and SETTINGS
    proxy.take_to_client()
    return proxy


def _headers_frame(stream_id: int, *, end_headers: bool = True, end_stream: bool = True) -> bytes:
    block = Encoder().encode(
        [(":method", "GET"), (":scheme", "http"), (":authority", "s"), (":path", "/")]
    )
    frame = HeadersFrame(stream_id, block)
    frame.flags = {"END_HEADERS"} if end_headers else set()
    if end_stream:
        frame.flags.add("END_STREAM")
    return bytes(frame.serialize())


def test_a_ping_flood_closes_the_connection() -> None:
    proxy = _raw_client()
    proxy.receive_client(b"".join(PingFrame(0, b"12345678").serialize() for _ in range(2000)))
    assert proxy.take_rejections() == [CONTROL_FLOOD] and proxy.closing
    assert proxy.refusal == (  # what the log line names: the cause and the limit
        "h2 control flood: 34000 bytes of replies (PING/SETTINGS ACKs, RST_STREAMs) queued,"
        " over the limit of 16384"
    )


def test_pings_the_shell_keeps_taking_answers_for_are_fine() -> None:
    proxy = _raw_client()
    for _ in range(50):
        proxy.receive_client(b"".join(PingFrame(0, b"12345678").serialize() for _ in range(40)))
        proxy.take_to_client()
    assert proxy.take_rejections() == [] and not proxy.closing


def test_rapid_reset_closes_the_connection() -> None:
    proxy = _raw_client()
    frames = b""
    for i in range(150):
        sid = 2 * i + 1
        frames += _headers_frame(sid, end_stream=False)
        frames += RstStreamFrame(sid, error_code=ErrorCodes.CANCEL).serialize()
    proxy.receive_client(frames)
    proxy.take_to_upstream()
    assert proxy.take_rejections() == [RAPID_RESET] and proxy.closing
    assert proxy.refusal == (
        "h2 rapid reset: 101 of 101 streams reset before their response, over the limit of"
        " 100 and half of them"
    )


def test_resets_of_streams_older_than_the_premature_lifetime_are_not_a_rapid_reset() -> None:
    """A stream the client keeps a second (Envoy's ``premature_reset_min_stream_lifetime``)
    before resetting it is an ordinary call's end (its deadline, a cancel): 150 of them leave
    the connection open, where 150 reset at once close it (the test above)."""
    now = [0.0]
    proxy = H2Proxy(lambda _h: Verdict(True), clock=lambda: now[0])
    proxy.receive_client(peer(client_side=True).data_to_send())
    for i in range(150):
        sid = 2 * i + 1
        proxy.receive_client(_headers_frame(sid, end_stream=False))
        now[0] += 1.0  # H2Limits.premature_reset_lifetime
        proxy.receive_client(RstStreamFrame(sid, error_code=ErrorCodes.CANCEL).serialize())
        proxy.take_to_upstream()
    assert proxy.take_rejections() == [] and not proxy.closing


def test_resets_after_the_response_began_are_not_a_rapid_reset() -> None:
    """A gRPC client cancels a server-streaming call once it read what it wanted: 150 such
    cancels, each right after the pod's response head, leave the connection open (before, the
    101st closed it, ENHANCE_YOUR_CALM, and every other call on it failed)."""
    w = Wire()
    for _ in range(150):
        sid = w.request("/watch", grpc=True, end=False)
        w.run()
        w.pod.send_headers(sid, [(b":status", b"200"), (b"content-type", b"application/grpc")])
        w.run()
        w.client.reset_stream(sid, ErrorCodes.CANCEL)
        w.run()
    assert w.proxy.take_rejections() == [] and not w.proxy.closing


def _unchecked(conn: H2Connection) -> None:
    """Let an ``h2`` peer send (and take) header blocks that break RFC 9113."""
    conn.config.validate_outbound_headers = False
    conn.config.normalize_outbound_headers = False
    conn.config.validate_inbound_headers = False
    conn.config.normalize_inbound_headers = False


MALFORMED = [
    pytest.param([(b"X-Upper", b"1")], id="uppercase-name"),
    pytest.param([(b"x-split", b"a\r\nx-injected: 1")], id="crlf-in-value"),
    pytest.param([(b"x-space", b" padded")], id="leading-space"),
    pytest.param([(b"connection", b"close")], id="connection-specific"),
    pytest.param([(b"te", b"gzip")], id="te-not-trailers"),
    pytest.param([(b":path", b"/again")], id="pseudo-after-regular"),
    pytest.param([(b"host", b"elsewhere")], id="host-not-authority"),
]


@pytest.mark.parametrize("extra", MALFORMED)
def test_a_malformed_request_block_closes_the_connection_as_a_protocol_error(
    extra: list[tuple[bytes, bytes]],
) -> None:
    w = Wire()
    _unchecked(w.client)
    w.request("/pkg.Svc/Call", grpc=True, extra=extra)
    w.run()
    assert w.proxy.take_rejections() == [PROTOCOL_ERROR] and w.proxy.closing
    refusal = w.proxy.refusal or ""  # the log line names the header that broke the rule
    assert refusal.startswith("h2 protocol error: ") and extra[0][0].decode() in refusal
    assert [e.error_code for e in w.taken(ConnectionTerminated)] == [ErrorCodes.PROTOCOL_ERROR]
    assert not [e for e in w.pod_events if isinstance(e, RequestReceived)]


def test_malformed_request_trailers_close_the_connection_as_a_protocol_error() -> None:
    w = Wire()
    _unchecked(w.client)
    sid = w.request("/pkg.Svc/Call", grpc=True, end=False)
    w.run()
    w.client.send_headers(sid, [(b":path", b"/"), (b"x-checksum", b"1")], end_stream=True)
    w.run()
    assert w.proxy.take_rejections() == [PROTOCOL_ERROR] and w.proxy.closing


@pytest.mark.parametrize("extra", MALFORMED[:5])
def test_a_malformed_response_block_from_the_pod_is_unavailable_and_counted(
    extra: list[tuple[bytes, bytes]],
) -> None:
    w = Wire()
    _unchecked(w.pod)
    sid = w.request("/pkg.Svc/Call", grpc=True)
    w.run()
    (req,) = [e for e in w.pod_events if isinstance(e, RequestReceived)]
    w.pod.send_headers(req.stream_id, [(b":status", b"200"), *extra])
    w.run()
    (answer,) = w.taken(ResponseReceived)
    assert answer.stream_id == sid and dict(answer.headers)[b"grpc-status"] == b"14"
    assert w.proxy.take_rejections() == [UPSTREAM_PROTOCOL]
    refusal = w.proxy.refusal or ""
    assert refusal.startswith("upstream protocol error: the pod's HTTP/2: ")
    assert extra[0][0].decode() in refusal
    assert not any(n.lower() == extra[0][0].lower() for n, _ in answer.headers)


def test_h2s_own_header_checks_are_not_run_on_the_proxys_connections(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The proxy checks each received block once itself (``h2headers.check_block``): ``h2``'s
    generator chain, a tenth of a call's time at four connection ends, is off."""

    def refuse(*_args: object) -> None:
        raise AssertionError("h2 validated a header block the proxy received")

    monkeypatch.setattr("h2.stream.validate_headers", refuse)
    monkeypatch.setattr("h2.stream.normalize_inbound_headers", refuse)
    w = Wire()
    _unchecked(w.client)
    _unchecked(w.pod)
    sid = w.request("/pkg.Svc/Call", grpc=True, extra=[(b"cookie", b"a=1"), (b"cookie", b"b=2")])
    w.run()
    (req,) = [e for e in w.pod_events if isinstance(e, RequestReceived)]
    assert (b"cookie", b"a=1; b=2") in req.headers
    _respond(w, grpc=True)
    assert [e.stream_id for e in w.taken(TrailersReceived)] == [sid]


def test_forwarded_header_literals_are_not_huffman_coded() -> None:
    """The proxy's own legs spend no CPU on Huffman coding (``h2wire.tableless_headers``)."""
    value = b"0f8fad5b-d9cb-469f-a165-70867728950e"
    w = Wire()
    w.request("/pkg.Svc/Call", grpc=True, extra=[(b"x-request-id", value)])
    w.proxy.receive_client(w.client.data_to_send())
    assert value in w.proxy.take_to_upstream()


def test_forwarded_header_blocks_use_no_dynamic_table() -> None:
    """The proxy encodes each block alone (``h2wire.TablelessEncoder``): no HPACK table work at
    either end of its legs, and a block's encoding depends only on its fields."""
    w = Wire()
    for _ in range(2):
        w.request("/pkg.Svc/Call", grpc=True)
        w.run()
        _respond(w, grpc=True)
    assert len(w.taken(TrailersReceived)) == 2
    assert not w.pod.decoder.header_table.dynamic_entries
    assert not w.client.decoder.header_table.dynamic_entries


def test_empty_request_trailers_are_forwarded() -> None:
    """An empty trailers block is a valid end of a request (RFC 9113 8.1): it is forwarded as
    one (``h2``'s own ``send_headers`` failed on an empty block with an IndexError)."""
    w = Wire()
    sid = w.request("/pkg.Svc/Call", grpc=True, end=False)
    w.client.send_data(sid, b"\0\0\0\0\0")
    w.run()
    frame = HeadersFrame(sid, b"")
    frame.flags = {"END_HEADERS", "END_STREAM"}
    w.proxy.receive_client(bytes(frame.serialize()))
    w.run()
    assert [e.headers for e in w.pod_events if isinstance(e, TrailersReceived)] == [[]]
    _respond(w, grpc=True)
    assert [e.stream_id for e in w.taken(TrailersReceived)] == [sid]


def test_header_blocks_skip_h2s_send_headers(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every block the proxy sends (the request head that opens the upstream stream, the
    response head, trailers) is framed by ``h2wire.send_headers_on``: ``h2``'s own
    ``send_headers`` never runs on the proxy's connections."""

    def refuse(*_args: object, **_kw: object) -> None:
        raise AssertionError("h2's send_headers framed a block the proxy sent")

    monkeypatch.setattr(GracefulH2Connection, "send_headers", refuse)
    w = Wire()
    sid = w.request("/pkg.Svc/Call", grpc=True)
    w.run()
    _respond(w, grpc=True)
    assert [e.stream_id for e in w.taken(TrailersReceived)] == [sid]
    assert [e.stream_id for e in w.taken(ResponseReceived)] == [sid]
    w.request("/denied", grpc=True)  # answered by the proxy itself
    w.run()
    (answer,) = w.taken(ResponseReceived)
    assert dict(answer.headers)[b"grpc-status"] == b"7"


def test_relayed_data_skips_h2s_send_data(monkeypatch: pytest.MonkeyPatch) -> None:
    """DATA the proxy relays is framed by ``h2wire.send_data_on`` (the windows and stream
    states ``h2`` keeps, no hyperframe objects): ``h2``'s ``send_data`` never runs on the
    proxy's connections, both ways, also when a body spans several frames and windows."""

    def refuse(*_args: object, **_kw: object) -> None:
        raise AssertionError("h2's send_data framed relayed DATA")

    monkeypatch.setattr(GracefulH2Connection, "send_data", refuse)
    w = Wire()
    body = bytes(range(256)) * 1200  # 300 KiB: beyond every window, 19 frames or more
    sid = w.request("/upload", end=False)
    for start in range(0, len(body), 16000):
        end = start + 16000 >= len(body)
        w.client.send_data(sid, body[start : start + 16000], end_stream=end)
        _run_reading(w)
    got = b"".join(e.data for e in w.pod_events if isinstance(e, DataReceived))
    assert got == body
    w.pod_events = [e for e in w.pod_events if not isinstance(e, DataReceived)]
    (req,) = [e for e in w.pod_events if isinstance(e, RequestReceived)]
    w.pod.send_headers(req.stream_id, [(b":status", b"200")])
    for start in range(0, len(body), 16000):
        w.pod.send_data(req.stream_id, body[start : start + 16000], end_stream=False)
        _run_reading(w)
    w.pod.end_stream(req.stream_id)
    _run_reading(w)
    assert b"".join(e.data for e in w.taken(DataReceived)) == body  # type: ignore[attr-defined]
    assert [e.stream_id for e in w.taken(StreamEnded)] == [sid]


def _run_reading(w: Wire) -> None:
    """``w.run`` with both peers reading: what each received is acknowledged (its window
    reopened) until nothing moves."""
    acked: set[int] = set()
    while True:
        w.run()
        fresh = [
            (peer_, e)
            for peer_, events in ((w.pod, w.pod_events), (w.client, w.client_events))
            for e in events
            if isinstance(e, DataReceived) and id(e) not in acked and e.flow_controlled_length
        ]
        if not fresh:
            return
        for peer_, e in fresh:
            acked.add(id(e))
            peer_.acknowledge_received_data(e.flow_controlled_length, e.stream_id)


def test_per_call_values_are_forwarded_never_indexed() -> None:
    """A request id (ours or the client's) and ``grpc-timeout`` change with every call: they
    must not fill the upstream connection's HPACK table, nor may credentials enter it
    (``NEVER_INDEXED``)."""
    w = Wire()
    _unchecked(w.client)  # sends every field indexable, ``authorization`` too
    extra = [(b"grpc-timeout", b"999u"), (b"authorization", b"Bearer x")]
    w.request("/pkg.Svc/Call", grpc=True, extra=extra)
    w.run()
    (req,) = [e for e in w.pod_events if isinstance(e, RequestReceived)]
    kinds = {n: type(h) for h in req.headers for n in [h[0]]}
    assert kinds[b"x-request-id"] is NeverIndexedHeaderTuple
    assert kinds[b"grpc-timeout"] is NeverIndexedHeaderTuple
    assert kinds[b"authorization"] is NeverIndexedHeaderTuple
    assert kinds[b"content-type"] is HeaderTuple  # what every call repeats stays indexable


def test_a_continuation_flood_closes_the_connection() -> None:
    proxy = _raw_client()
    data = _headers_frame(1, end_headers=False)
    data += b"".join(ContinuationFrame(1, b"").serialize() for _ in range(17))
    proxy.receive_client(data)
    assert proxy.take_rejections() == [CONTINUATION_FLOOD] and proxy.closing
    assert proxy.refusal == (
        "h2 continuation flood: 17 CONTINUATION frames in one header block, over the limit of 16"
    )


def test_a_header_block_over_the_limit_closes_the_connection() -> None:
    proxy = _raw_client(H2Limits(max_header_block=4096))
    data = _headers_frame(1, end_headers=False)
    data += b"".join(ContinuationFrame(1, b"\x00" * 1024).serialize() for _ in range(4))
    proxy.receive_client(data)
    assert proxy.take_rejections() == [HEADER_BLOCK] and proxy.closing
    assert proxy.refusal == (
        "h2 header block: a header block of 4102 bytes so far, over the limit of 4096 bytes"
    )


def test_more_streams_than_advertised_closes_the_connection() -> None:
    proxy = _raw_client(H2Limits(max_concurrent_streams=5))
    proxy.receive_client(b"".join(_headers_frame(2 * i + 1, end_stream=False) for i in range(6)))
    assert proxy.take_rejections() == [TOO_MANY_STREAMS] and proxy.closing
    assert proxy.refusal == "h2 max concurrent streams: a stream over the limit of 5 open"


def test_a_run_of_empty_data_frames_closes_the_connection() -> None:
    proxy = _raw_client()
    empty = bytes.fromhex("000000000000000001")  # DATA, no flags, stream 1, no payload
    proxy.receive_client(_headers_frame(1, end_stream=False) + empty * 101)
    assert proxy.take_rejections() == [EMPTY_FRAMES] and proxy.closing
    assert proxy.refusal == (
        "h2 empty frames: 101 empty DATA frames in a row, over the limit of 100"
    )


def test_a_denied_head_is_authorized_with_method_path_and_authority() -> None:
    seen: list[RequestHead] = []

    def authorize(head: RequestHead) -> Verdict:
        seen.append(head)
        return Verdict(False, "p")

    proxy = H2Proxy(authorize, new_request_id=lambda: "r")
    proxy.receive_client(peer(client_side=True).data_to_send())
    proxy.receive_client(_headers_frame(1))
    assert seen == [RequestHead("GET", "/", "s", "r")]


def test_a_path_is_normalized_for_policy_and_the_pod_as_http1s_target_is() -> None:
    """A ``:path`` spelled otherwise than the pod reads it (``%61`` for ``a``, dot segments,
    ``\\``) is normalized where the head is read (``policy.paths.normalized_path``): policy
    sees ``/admin``, the pod is sent the normalized path (with its query as sent); a usual
    path goes as sent. Before, both were forwarded raw. A later request, its block using the
    client's table, still reaches the pod whole (the relay re-encoded the changed one)."""
    w = Wire(deny="/admin")
    w.request("/%61dmin/x")
    w.request("/public/../admin")
    w.request("/a/./b\\%7e%2f?q=%61")
    w.request("/pkg.Svc/M", grpc=True)
    w.request("/a/./b\\%7e%2f?q=%61")
    w.run()
    statuses = [dict(e.headers)[b":status"] for e in w.taken(ResponseReceived)]
    assert statuses[:2] == [b"403", b"403"]
    got = [(dict(e.headers)[b":path"], dict(e.headers)[b":authority"])
           for e in w.pod_events if isinstance(e, RequestReceived)]  # fmt: skip
    on = b"server:50051"
    assert got == [(b"/a/b/~%2F?q=%61", on), (b"/pkg.Svc/M", on), (b"/a/b/~%2F?q=%61", on)]


# -- the source side: an upstream per pick key ------------------------------------------------
class Pods:
    """An ``H2Proxy`` with ``pick`` by the first path segment, and one h2 pod per key."""

    def __init__(
        self,
        pick: Pick | None = None,
        clock: Callable[[], float] = lambda: 0.0,
        admit: Admit | None = None,
        direct: Callable[[object], bool] | None = None,
    ) -> None:
        self.client = peer(client_side=True)
        self.pods: dict[object, H2Connection] = {}
        self.uids: dict[object, int] = {}
        self.proxy = H2Proxy(
            lambda _h: Verdict(True),
            pick=pick or self.pick,
            admit=admit,
            direct=direct,
            clock=clock,
        )
        self.pod_events: dict[object, list[Event]] = {}
        self.client_events: list[Event] = []
        self.down: dict[object, str] = {}  # keys whose upstream cannot be opened, and why
        self.unreachable: list[bool] = []  # what ``upstream_unreachable`` returned

    @staticmethod
    def pick(request: PickRequest) -> Choice | None:
        key = request.head.path.split("/")[1]
        return None if key == "none" else Choice(key, tag=f"tag-{key}")

    def run(self) -> None:
        moved = True
        while moved:
            moved = False
            out = self.client.data_to_send()
            if out:
                self.proxy.receive_client(out)
                moved = True
            for uid, key in self.proxy.take_new_upstreams():
                if key in self.down:
                    self.unreachable.append(self.proxy.upstream_unreachable(uid, self.down[key]))
                    moved = True
                    continue
                self.pods[key], self.uids[key] = peer(client_side=False), uid
                self.pod_events[key] = []
            for key, pod in self.pods.items():
                out = pod.data_to_send()
                if out:
                    self.proxy.receive_upstream(out, self.uids[key])
                    moved = True
                out = self.proxy.take_to_upstream(self.uids[key])
                if out:
                    self.pod_events[key] += pod.receive_data(out)
                    moved = True
            out = self.proxy.take_to_client()
            if out:
                self.client_events += self.client.receive_data(out)
                moved = True

    def request(self, path: str, *, grpc: bool = False) -> int:
        sid: int = self.client.get_next_available_stream_id()
        headers = [(":method", "GET"), (":scheme", "http"), (":authority", "s"), (":path", path)]
        if grpc:
            headers[0] = (":method", "POST")
            headers.append(("content-type", "application/grpc"))
        self.client.send_headers(sid, headers, end_stream=True)
        return sid

    def responses(self) -> dict[int, dict[bytes, bytes]]:
        return {e.stream_id: dict(e.headers) for e in self.client_events
                if isinstance(e, ResponseReceived)}  # fmt: skip

    def respond(self, key: str) -> None:
        for e in self.pod_events[key]:
            if isinstance(e, RequestReceived):
                self.pods[key].send_headers(e.stream_id, [(":status", "200")])
                self.pods[key].send_data(e.stream_id, key.encode(), end_stream=True)
        self.pod_events[key].clear()
        self.run()


def test_each_request_goes_to_the_upstream_its_key_names() -> None:
    w = Pods()
    w.request("/a/1")
    w.request("/b/1")
    w.request("/a/2")
    w.run()
    assert sorted(w.pods) == ["a", "b"]  # one upstream per key, the second request reused "a"
    w.respond("a")
    w.respond("b")
    done = sorted((ex.head.path, ex.upstream, ex.tag, ex.status) for ex in w.proxy.take_completed())
    assert done == [
        ("/a/1", "a", "tag-a", 200),
        ("/a/2", "a", "tag-a", 200),
        ("/b/1", "b", "tag-b", 200),
    ]
    bodies = sorted(e.data for e in w.client_events if isinstance(e, DataReceived) and e.data)
    assert bodies == [b"a", b"a", b"b"]


def test_calls_one_after_another_count_open_streams_once_per_walk_from_streams(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``H2Proxy`` counts the upstream's open streams against the pod's limit before a try's
    head goes (REFUSED_STREAM above it), and the client's at each new request, only once
    ``WALK_FROM`` streams are known (fewer cannot be at a limit of more; the walk also forgets
    the closed ones): a walk on each side per call before, and two on the upstream's side
    before ``send_headers_on`` was told of the first."""
    counted: list[bool] = []
    real = GracefulH2Connection._open_streams

    def count(self: GracefulH2Connection, remainder: int) -> int:
        counted.append(self.config.client_side)
        return real(self, remainder)

    monkeypatch.setattr(GracefulH2Connection, "_open_streams", count)
    w = Pods()
    calls = 3 * WALK_FROM
    for n in range(calls):
        w.request(f"/a/{n}")
        w.run()
        w.respond("a")
    walks = calls // (WALK_FROM - 1) + 1
    assert 0 < counted.count(True) <= walks  # the upstream's (we are its client)
    assert 0 < counted.count(False) <= walks  # the client's
    assert len(w.proxy.take_completed()) == calls
    for u in w.proxy._upstreams.values():
        assert len(u.conn.streams) <= WALK_FROM  # closed streams forgotten by the walks
    assert len(w.proxy.client.streams) <= WALK_FROM


def test_the_pods_stream_limit_is_followed_as_its_settings_change() -> None:
    """The pod's MAX_CONCURRENT_STREAMS, kept per upstream for ``_send_head``, follows every
    SETTINGS frame: lowered to one, a second request while one is open is refused
    (REFUSED_STREAM, ``UO``) without reaching the pod; raised again, it goes."""
    w = Pods()
    w.request("/a/1")
    w.run()
    w.pods["a"].update_settings({SettingCodes.MAX_CONCURRENT_STREAMS: 1})
    w.run()
    refused = w.request("/a/2")
    w.run()
    resets = [e.error_code for e in w.client_events
              if isinstance(e, StreamReset) and e.stream_id == refused]  # fmt: skip
    assert resets == [ErrorCodes.REFUSED_STREAM]
    assert len([e for e in w.pod_events["a"] if isinstance(e, RequestReceived)]) == 1
    (ex,) = w.proxy.take_completed()
    assert (ex.head.path, ex.flags) == ("/a/2", UPSTREAM_OVERFLOW)
    w.pods["a"].update_settings({SettingCodes.MAX_CONCURRENT_STREAMS: 2})
    w.run()
    w.request("/a/3")
    w.run()
    w.respond("a")
    assert sorted((ex.head.path, ex.status) for ex in w.proxy.take_completed()) == [
        ("/a/1", 200),
        ("/a/3", 200),
    ]


def test_h2s_events_the_proxy_tells_apart_have_no_subclasses() -> None:
    """``H2Proxy`` tells the events it acts on apart by their class (``type(event) is``), not
    ``isinstance``: the same only while ``h2`` subclasses none of them."""
    told_apart = [ConnectionTerminated, DataReceived, InformationalResponseReceived,
                  RemoteSettingsChanged, RequestReceived, ResponseReceived, StreamEnded,
                  StreamReset, TrailersReceived]  # fmt: skip
    assert {cls: cls.__subclasses__() for cls in told_apart} == {cls: [] for cls in told_apart}


def test_the_proxys_connections_know_their_side_without_a_call() -> None:
    """``h2`` reads ``config.client_side`` at each new stream and each count of open streams;
    on ``H2Proxy``'s connections that read makes no Python call (``_SidedConfiguration``),
    and each still says its own side."""
    w = Pods()
    w.request("/a/1")
    w.run()
    calls: list[str] = []

    def profile(frame: FrameType, event: str, arg: object) -> None:
        if event == "call":
            calls.append(frame.f_code.co_name)
        elif event == "c_call" and arg is not sys.setprofile:  # the one that stops this
            calls.append(str(arg))

    upstream, client = w.proxy._upstreams[w.uids["a"]].conn, w.proxy.client
    sys.setprofile(profile)
    sides = (upstream.config.client_side, client.config.client_side)
    sys.setprofile(None)
    assert sides == (True, False) and calls == []


def test_the_reports_are_taken_in_one_call_and_none_is_one_constant() -> None:
    """``take_reports`` gives what the four takes would, and while nothing finished it makes
    nothing (``NO_REPORTS``: the source's shell asks after every input)."""
    w = Pods()
    w.request("/a/1")
    w.run()
    assert w.proxy.take_reports() is NO_REPORTS
    w.respond("a")
    completed, dropped, rejections, mirrors = w.proxy.take_reports()
    assert [ex.head.path for ex in completed] == ["/a/1"]
    assert (dropped, rejections, mirrors) == ((), (), ())
    assert w.proxy.take_reports() is NO_REPORTS and w.proxy.take_completed() == []
    w.proxy.receive_upstream(b"\x00\x00\x04\x09\x00\x00\x00\x00\x01junk", w.uids["a"])
    assert w.proxy.take_reports() == ((), (), [UPSTREAM_PROTOCOL], ())


def test_a_failed_upstream_fails_its_requests_only_and_the_next_request_opens_another() -> None:
    w = Pods()
    lost = w.request("/a/1")
    kept = w.request("/b/1")
    w.run()
    w.proxy.upstream_failed(w.uids["a"])
    w.run()
    assert {e.stream_id: dict(e.headers)[b":status"] for e in w.client_events
            if isinstance(e, ResponseReceived)} == {lost: b"502"}  # fmt: skip
    assert not [e for e in w.client_events if isinstance(e, ConnectionTerminated)]
    w.respond("b")
    assert any(isinstance(e, StreamEnded) and e.stream_id == kept for e in w.client_events)
    first = w.uids["a"]
    w.request("/a/2")
    w.run()
    assert w.uids["a"] != first  # a new connection for key "a"
    w.respond("a")
    paths = sorted((ex.head.path, ex.status, ex.flags) for ex in w.proxy.take_completed())
    assert paths == [("/a/1", 502, "UC"), ("/a/2", 200, "-"), ("/b/1", 200, "-")]
    assert not w.proxy.closing


def test_no_upstream_to_pick_is_503_no_healthy_upstream() -> None:
    w = Pods()
    sid = w.request("/none/x")
    w.run()
    (resp,) = [e for e in w.client_events if isinstance(e, ResponseReceived)]
    assert (resp.stream_id, dict(resp.headers)[b":status"]) == (sid, b"503")
    (ex,) = w.proxy.take_completed()
    assert (ex.status, ex.flags) == (503, "UH")


def test_response_bytes_not_yet_taken_are_not_counted_as_replies_to_the_client() -> None:
    w = Wire()
    w.request("/big")
    w.run()
    (req,) = [e for e in w.pod_events if isinstance(e, RequestReceived)]
    w.pod.send_headers(req.stream_id, [(b":status", b"200")])
    for _ in range(4):
        w.pod.send_data(req.stream_id, b"z" * 15000)
    w.proxy.receive_upstream(w.pod.data_to_send())  # the shell has not written these out yet
    w.client.ping(b"12345678")
    w.proxy.receive_client(w.client.data_to_send())
    assert w.proxy.take_rejections() == [] and not w.proxy.closing


def test_an_open_header_block_starts_the_header_clock_and_its_end_stops_it() -> None:
    now = [100.0]
    proxy = H2Proxy(lambda _h: Verdict(True), clock=lambda: now[0])
    proxy.receive_client(peer(client_side=True).data_to_send())
    proxy.receive_client(_headers_frame(1, end_headers=False))  # a block left open
    assert proxy.head_started == 100.0
    end = ContinuationFrame(1, b"")
    end.flags.add("END_HEADERS")
    now[0] = 101.0
    proxy.receive_client(bytes(end.serialize()))
    assert proxy.head_started is None and proxy.active_streams == 1
    now[0] = 102.0
    proxy.receive_client(_headers_frame(3, end_headers=False))
    assert proxy.head_started == 102.0
    proxy.header_timeout()  # the shell's timer ran out
    assert proxy.take_rejections() == ["h2_header_timeout"] and proxy.closing
    assert proxy.refusal == (
        "h2 header timeout: a header block not finished within the header timeout"
    )


def test_a_rate_limited_grpc_call_is_a_trailers_only_resource_exhausted() -> None:
    w = Wire()
    w.proxy.authorize = lambda _h: Verdict(
        False, "ns/limit", status=429, flag="RL", body=b"local_rate_limited", grpc_status=8
    )
    w.request("/pkg.Svc/Call", grpc=True)
    w.run()
    (resp,) = w.taken(ResponseReceived)
    headers = dict(resp.headers)
    assert resp.stream_ended is not None
    assert (headers[b":status"], headers[b"grpc-status"]) == (b"200", b"8")
    assert headers[b"grpc-message"] == b"local_rate_limited"
    (ex,) = w.proxy.take_completed()
    assert (ex.grpc_status, ex.flags, ex.denied_by) == ("8", "RL", "ns/limit")
    assert not [e for e in w.pod_events if isinstance(e, RequestReceived)]


# -- the source side: a pick's local answers, header edits and timeouts --------------------------
def _answer_here(request: PickRequest) -> LocalAnswer:
    return LocalAnswer(404, "NR", b"no route matched the request\n", tag=request.target)


def test_a_local_answer_is_a_404_for_http_and_trailers_only_unimplemented_for_grpc() -> None:
    w = Pods(_answer_here)
    plain = w.request("/x?q=1")
    call = w.request("/pkg.Svc/Method", grpc=True)
    w.run()
    assert not w.pods  # no upstream opened
    answers = w.responses()
    assert answers[plain][b":status"] == b"404"
    assert (answers[call][b":status"], answers[call][b"grpc-status"]) == (b"200", b"12")
    assert answers[call][b"grpc-message"] == b"no route matched the request"
    body = b"".join(e.data for e in w.client_events if isinstance(e, DataReceived))
    assert body == b"no route matched the request\n"
    done = sorted((ex.grpc, ex.status, ex.grpc_status, ex.flags, ex.tag)
                  for ex in w.proxy.take_completed())  # fmt: skip
    assert done == [
        (False, 404, "", "NR", "/x?q=1"),  # the pick saw the path with its query
        (True, 200, "12", "NR", "/pkg.Svc/Method"),
    ]


def test_a_pick_edits_the_forwarded_and_the_response_header_blocks() -> None:
    def pick(request: PickRequest) -> Choice:
        return Choice(
            "a",
            edit_request=lambda block: [*block, (b"x-routed", b"yes")],
            edit_response=lambda block: [(k, v) for k, v in block if k != b"server"],
        )

    w = Pods(pick)
    sid = w.request("/a/1")
    w.run()
    (req,) = [e for e in w.pod_events["a"] if isinstance(e, RequestReceived)]
    assert dict(req.headers)[b"x-routed"] == b"yes"
    w.pods["a"].send_headers(req.stream_id, [(":status", "200"), ("server", "pod")])
    w.pods["a"].send_data(req.stream_id, b"ok", end_stream=True)
    w.pod_events["a"].clear()
    w.run()
    assert w.responses()[sid] == {b":status": b"200"}


def _timed(now: list[float]) -> Pods:
    return Pods(lambda request: Choice("a", timeout=0.2), clock=lambda: now[0])


@pytest.mark.parametrize(("grpc", "status", "grpc_status"), [(False, b"504", None),
                                                             (True, b"200", b"4")])  # fmt: skip
def test_a_request_past_its_timeout_is_reset_upstream_and_answered_ut(
    grpc: bool, status: bytes, grpc_status: bytes | None
) -> None:
    now = [10.0]
    w = _timed(now)
    sid = w.request("/a/slow", grpc=grpc)
    w.run()
    assert w.proxy.next_deadline() == pytest.approx(10.2)
    now[0] = 10.1
    w.proxy.expire()  # early: nothing happens
    w.run()
    assert w.responses() == {}
    now[0] = 10.2
    w.proxy.expire()
    w.run()
    answer = w.responses()[sid]
    assert (answer[b":status"], answer.get(b"grpc-status")) == (status, grpc_status)
    assert any(isinstance(e, StreamReset) and e.error_code == ErrorCodes.CANCEL
               for e in w.pod_events["a"])  # fmt: skip
    (ex,) = w.proxy.take_completed()
    assert ex.flags == "UT"
    assert w.proxy.next_deadline() is None
    assert not w.proxy.closing


def test_a_timeout_after_the_response_began_resets_the_stream_both_ways() -> None:
    now = [10.0]
    w = _timed(now)
    sid = w.request("/a/stream")
    w.run()
    (req,) = [e for e in w.pod_events["a"] if isinstance(e, RequestReceived)]
    w.pods["a"].send_headers(req.stream_id, [(":status", "200")])
    w.pods["a"].send_data(req.stream_id, b"part")
    w.run()
    now[0] = 11.0
    w.proxy.expire()
    w.run()
    assert any(isinstance(e, StreamReset) and e.stream_id == sid for e in w.client_events)
    assert any(isinstance(e, StreamReset) for e in w.pod_events["a"])
    (ex,) = w.proxy.take_completed()
    assert (ex.status, ex.flags) == (200, "UT")


WHOLE_OR_HALF = [b"\0\0\0\0\x02hi", b"\0\0\0\0\x05hi"]  # a whole message, half of one


def _answer_begun(w: Pods, sent: bytes) -> None:
    """A gRPC call to ``a`` whose pod answered a head and ``sent``."""
    w.request("/a/Watch", grpc=True)
    w.run()
    (req,) = [e for e in w.pod_events["a"] if isinstance(e, RequestReceived)]
    head = [(":status", "200"), ("content-type", "application/grpc")]
    w.pods["a"].send_headers(req.stream_id, head)
    w.pods["a"].send_data(req.stream_id, sent)
    w.run()


def _how_it_ended(w: Pods, sent: bytes, status: bytes, reset: ErrorCodes) -> tuple[object, ...]:
    """What the client got (trailers' ``grpc-status``, resets) and the report's gRPC status,
    and what it should have got: ``status`` after a whole message, else ``reset``."""
    ended = [dict(e.headers).get(b"grpc-status") for e in w.client_events
             if isinstance(e, TrailersReceived)]  # fmt: skip
    resets = [e.error_code for e in w.client_events if isinstance(e, StreamReset)]
    (ex,) = w.proxy.take_completed()
    whole = sent[4] == len(sent) - 5
    expected = ([status], [], status.decode()) if whole else ([], [reset], "")
    return (ended, resets, ex.grpc_status), expected


@pytest.mark.parametrize("sent", WHOLE_OR_HALF)
def test_a_grpc_timeout_after_the_answer_began_ends_it_with_deadline_exceeded(sent: bytes) -> None:
    """A gRPC call's timeout after the pod's first message: the client is sent trailers
    ``grpc-status: 4`` (grpcio: DEADLINE_EXCEEDED; a reset CANCEL reads as CANCELLED, as if the
    caller had cancelled), the pod a reset CANCEL; unless the client got half a message, which
    trailers cannot follow (grpcio would fail the call as malformed): then reset as before."""
    now = [10.0]
    w = _timed(now)
    _answer_begun(w, sent)
    now[0] = 11.0
    w.proxy.expire()
    w.run()
    assert any(isinstance(e, StreamReset) and e.error_code == ErrorCodes.CANCEL
               for e in w.pod_events["a"])  # fmt: skip
    got, expected = _how_it_ended(w, sent, b"4", ErrorCodes.CANCEL)
    assert got == expected


@pytest.mark.parametrize("sent", WHOLE_OR_HALF)
def test_a_grpc_answer_whose_upstream_is_lost_ends_unavailable(sent: bytes) -> None:
    """The source loses an endpoint's connection (its node's drain ended, it died) after a
    gRPC answer began: trailers ``grpc-status: 14`` (grpcio: UNAVAILABLE, as it reports its
    own connection's loss; a reset INTERNAL_ERROR reads as the server's bug), unless the
    client got half a message: reset INTERNAL_ERROR as before."""
    w = Pods()
    _answer_begun(w, sent)
    w.proxy.upstream_failed(w.uids["a"])
    w.run()
    got, expected = _how_it_ended(w, sent, b"14", ErrorCodes.INTERNAL_ERROR)
    assert got == expected


@pytest.mark.parametrize(("code", "expected"), POD_RESETS)
def test_an_endpoints_reset_after_a_grpc_answer_began_reaches_the_client_with_its_code(
    code: ErrorCodes, expected: ErrorCodes
) -> None:
    """An endpoint (a far node's destination passing its pod's on, or a same-node pod) resets
    a gRPC call whose answer began: the source passes the code on (before: INTERNAL_ERROR)."""
    w = Pods()
    _answer_begun(w, WHOLE_OR_HALF[0])
    (req,) = [e for e in w.pod_events["a"] if isinstance(e, RequestReceived)]
    w.pods["a"].reset_stream(req.stream_id, code)
    w.run()
    assert [e.error_code for e in w.client_events if isinstance(e, StreamReset)] == [expected]
    assert not [e for e in w.client_events if isinstance(e, TrailersReceived)]


@pytest.mark.parametrize("sent", WHOLE_OR_HALF)
def test_a_far_destinations_lost_pod_ends_a_grpc_answer_unavailable(sent: bytes) -> None:
    """The far destination lost its pod's connection after the answer began and says so with
    a reset CONNECT_ERROR (``h2core.POD_LOST``): the source ends the call as it ends its own
    endpoint connection's loss, trailers ``grpc-status: 14`` after whole messages (grpcio:
    UNAVAILABLE, a transport failure; before: a reset INTERNAL_ERROR, grpcio ``INTERNAL``),
    else a reset INTERNAL_ERROR; flagged ``UC``."""
    w = Pods()
    _answer_begun(w, sent)
    (req,) = [e for e in w.pod_events["a"] if isinstance(e, RequestReceived)]
    w.pods["a"].reset_stream(req.stream_id, ErrorCodes.CONNECT_ERROR)
    w.run()
    flags = w.proxy._completed[0].flags
    got, expected = _how_it_ended(w, sent, b"14", ErrorCodes.INTERNAL_ERROR)
    assert (got, flags) == (expected, "UC")


def test_the_source_routes_and_forwards_a_normalized_path() -> None:
    """At the source the pick (routes: ``h2route``) sees the normalized ``:path`` with its
    query, and the endpoint is sent it: a route on ``/admin`` takes ``/%61dmin`` too, which
    the pod serves as ``/admin`` (before, it saw and forwarded the path as sent)."""
    seen: list[str] = []

    def pick(request: PickRequest) -> Choice | None:
        seen.append(request.target)
        return Pods.pick(request)

    w = Pods(pick)
    w.request("/%61dmin/./x?y=%61")
    w.run()
    (req,) = [e for e in w.pod_events["admin"] if isinstance(e, RequestReceived)]
    assert (seen, dict(req.headers)[b":path"]) == (["/admin/x?y=%61"], b"/admin/x?y=%61")


def test_a_request_that_ends_in_time_leaves_no_deadline() -> None:
    now = [10.0]
    w = _timed(now)
    w.request("/a/fast")
    w.run()
    w.respond("a")
    assert w.proxy.next_deadline() is None
    (ex,) = w.proxy.take_completed()
    assert (ex.status, ex.flags) == (200, "-")


def test_a_stream_the_pod_refuses_is_refused_to_the_client_and_reported() -> None:
    """Reported, so that the source's shell finishes the request's attempt (no leaked slot)."""
    w = Pods()
    sid = w.request("/a/1")
    w.run()
    (req,) = [e for e in w.pod_events["a"] if isinstance(e, RequestReceived)]
    w.pods["a"].reset_stream(req.stream_id, ErrorCodes.REFUSED_STREAM)
    w.run()
    assert any(isinstance(e, StreamReset) and e.stream_id == sid
               and e.error_code == ErrorCodes.REFUSED_STREAM for e in w.client_events)  # fmt: skip
    (ex,) = w.proxy.take_completed()
    assert (ex.tag, ex.status, ex.flags) == ("tag-a", 0, "UR")
    assert w.proxy.active_streams == 0


# -- the source side: retries before any response byte reached the client --------------------
class FakeRetries:
    """Retries 503s and missing responses up to ``limit`` times, each to the next key."""

    def __init__(self, keys: list[str], limit: int = 1) -> None:
        self.keys, self.limit = keys, limit
        self.asked: list[tuple[int | None, bool]] = []

    def after(self, status: int | None, first_byte: float, *, replayable: bool) -> float | None:
        self.asked.append((status, replayable))
        if status not in (None, 503) or not replayable or len(self.keys) == 0 or not self.limit:
            return None
        self.limit -= 1
        return 0.05

    def next(self) -> Choice | LocalAnswer:
        return Choice(self.keys.pop(0), tag="tag")


def _retrying(retries: FakeRetries, now: list[float], max_replay_body: int = 64 * 1024) -> Pods:
    w = Pods(lambda _r: Choice("a", tag="tag", retries=retries), clock=lambda: now[0])
    w.proxy.limits = H2Limits(max_replay_body=max_replay_body)
    return w


def _grpc_call(w: Pods, body: bytes) -> int:
    sid: int = w.client.get_next_available_stream_id()
    headers = [(":method", "POST"), (":scheme", "http"), (":authority", "s"),
               (":path", "/pkg.Svc/Do"), ("content-type", "application/grpc")]  # fmt: skip
    w.client.send_headers(sid, headers)
    w.client.send_data(sid, body, end_stream=True)
    return sid


def _unavailable(w: Pods, key: str) -> None:
    (req,) = [e for e in w.pod_events[key] if isinstance(e, RequestReceived)]
    head = [(":status", "200"), ("content-type", "application/grpc"), ("grpc-status", "14")]
    w.pods[key].send_headers(req.stream_id, head, end_stream=True)
    w.pod_events[key].clear()
    w.run()


def test_a_trailers_only_unavailable_is_retried_on_another_upstream_with_the_same_body() -> None:
    now, retries = [10.0], FakeRetries(["b"])
    w = _retrying(retries, now)
    sid = _grpc_call(w, b"payload")
    w.run()
    got = b"".join(e.data for e in w.pod_events["a"] if isinstance(e, DataReceived))
    assert got == b"payload"
    _unavailable(w, "a")
    assert w.responses() == {}  # nothing reached the client
    assert retries.asked == [(503, True)]
    assert w.proxy.next_deadline() == pytest.approx(10.05)
    now[0] = 10.05
    w.proxy.expire()
    w.run()
    (req,) = [e for e in w.pod_events["b"] if isinstance(e, RequestReceived)]
    assert dict(req.headers)[b":path"] == b"/pkg.Svc/Do"
    body = b"".join(e.data for e in w.pod_events["b"] if isinstance(e, DataReceived))
    assert body == b"payload"
    assert any(isinstance(e, StreamEnded) for e in w.pod_events["b"])
    w.pods["b"].send_headers(req.stream_id, [(":status", "200")])
    w.pods["b"].send_data(req.stream_id, b"answer")
    w.pods["b"].send_headers(req.stream_id, OK_TRAILERS, end_stream=True)
    w.pod_events["b"].clear()
    w.run()
    assert w.responses()[sid][b":status"] == b"200"
    (ex,) = w.proxy.take_completed()
    assert (ex.upstream, ex.status, ex.grpc_status, ex.flags) == ("b", 200, "0", "-")


def test_the_last_unavailable_reaches_the_client_when_retries_say_no() -> None:
    now, retries = [10.0], FakeRetries(["b"], limit=1)
    w = _retrying(retries, now)
    sid = _grpc_call(w, b"x")
    w.run()
    _unavailable(w, "a")
    now[0] = 11.0
    w.proxy.expire()
    w.run()
    _unavailable(w, "b")
    assert retries.asked == [(503, True), (503, True)]
    assert w.responses()[sid][b"grpc-status"] == b"14"
    (ex,) = w.proxy.take_completed()
    assert (ex.upstream, ex.grpc_status) == ("b", "14")


def test_a_refused_stream_is_retried_and_a_body_over_the_limit_is_not_replayable() -> None:
    now, retries = [10.0], FakeRetries(["b", "c"], limit=2)
    w = _retrying(retries, now, max_replay_body=4)
    sid = _grpc_call(w, b"0123")
    w.run()
    (req,) = [e for e in w.pod_events["a"] if isinstance(e, RequestReceived)]
    w.pods["a"].reset_stream(req.stream_id, ErrorCodes.REFUSED_STREAM)
    w.run()
    now[0] = 10.05
    w.proxy.expire()
    w.run()
    assert "b" in w.pods and retries.asked == [(None, True)]
    big = _grpc_call(w, b"01234")
    w.run()
    (req,) = [e for e in w.pod_events["a"] if isinstance(e, RequestReceived)
              and e.stream_id != 1]  # fmt: skip
    w.pods["a"].reset_stream(req.stream_id, ErrorCodes.REFUSED_STREAM)
    w.run()
    assert retries.asked[-1] == (None, False)
    assert any(isinstance(e, StreamReset) and e.stream_id == big for e in w.client_events)
    assert sid != big


def test_a_response_that_began_is_never_retried() -> None:
    now, retries = [10.0], FakeRetries(["b"])
    w = _retrying(retries, now)
    sid = _grpc_call(w, b"x")
    w.run()
    (req,) = [e for e in w.pod_events["a"] if isinstance(e, RequestReceived)]
    w.pods["a"].send_headers(req.stream_id, [(":status", "200")])
    w.pods["a"].send_data(req.stream_id, b"part")
    w.run()
    assert retries.asked == [(200, True)]  # asked of the head: a 200 is not retried
    w.pods["a"].reset_stream(req.stream_id, ErrorCodes.INTERNAL_ERROR)
    w.run()
    assert retries.asked == [(200, True)]  # not asked again once the response began
    assert any(isinstance(e, StreamReset) and e.stream_id == sid for e in w.client_events)
    (ex,) = w.proxy.take_completed()
    assert ex.flags == "UR"


def test_a_reset_before_the_head_that_retries_decline_asks_them_once() -> None:
    # Retries count each answer they give (``nodemesh_http_retries_total``'s declined
    # outcomes): a reset the retries decline must not be put to them twice.
    now, retries = [10.0], FakeRetries(["b"], limit=0)
    w = _retrying(retries, now)
    sid = _grpc_call(w, b"x")
    w.run()
    (req,) = [e for e in w.pod_events["a"] if isinstance(e, RequestReceived)]
    w.pods["a"].reset_stream(req.stream_id, ErrorCodes.INTERNAL_ERROR)
    w.run()
    assert retries.asked == [(None, True)]
    assert w.responses()[sid][b"grpc-status"] == b"14"  # answered UNAVAILABLE, as before
    (ex,) = w.proxy.take_completed()
    assert ex.flags == "UR"


# -- the source side: an injected delay and per-try timeouts ----------------------------------
def test_a_delayed_request_is_held_with_its_body_and_sent_when_the_delay_is_over() -> None:
    now = [10.0]
    w = Pods(lambda _r: Choice("a", tag="tag", delay=1.0, timeout=1.2), clock=lambda: now[0])
    sid = _grpc_call(w, b"held body")
    w.run()
    assert "a" not in w.pods  # no upstream opened, no head sent while the delay runs
    assert w.proxy.next_deadline() == pytest.approx(11.0)
    now[0] = 11.0
    w.proxy.expire()
    w.run()
    (req,) = [e for e in w.pod_events["a"] if isinstance(e, RequestReceived)]
    body = b"".join(e.data for e in w.pod_events["a"] if isinstance(e, DataReceived))
    assert body == b"held body" and any(isinstance(e, StreamEnded) for e in w.pod_events["a"])
    assert w.proxy.next_deadline() == pytest.approx(11.2)  # the timeout, from the choice
    w.pods["a"].send_headers(req.stream_id, [(":status", "200")])
    w.pods["a"].send_headers(req.stream_id, OK_TRAILERS, end_stream=True)
    w.pod_events["a"].clear()
    w.run()
    assert w.responses()[sid][b":status"] == b"200"
    (ex,) = w.proxy.take_completed()
    assert (ex.upstream, ex.status, ex.grpc_status) == ("a", 200, "0")


def test_a_deadline_that_passes_during_the_delay_answers_without_an_upstream() -> None:
    now = [10.0]
    w = Pods(lambda _r: Choice("a", delay=1.0, timeout=0.5), clock=lambda: now[0])
    sid = _grpc_call(w, b"x")
    w.run()
    now[0] = 10.5
    w.proxy.expire()
    w.run()
    assert w.responses()[sid][b"grpc-status"] == b"4"
    assert "a" not in w.pods and w.proxy.next_deadline() is None
    (ex,) = w.proxy.take_completed()
    assert ex.flags == "UT"


def test_a_try_past_its_own_timeout_is_retried_elsewhere_and_the_last_one_answered_ut() -> None:
    now, retries = [10.0], FakeRetries(["b"], limit=1)
    w = Pods(lambda _r: Choice("a", tag="tag", retries=retries, try_timeout=0.2, timeout=5.0),
             clock=lambda: now[0])  # fmt: skip
    sid = _grpc_call(w, b"x")
    w.run()
    assert w.proxy.next_deadline() == pytest.approx(10.2)
    now[0] = 10.2
    w.proxy.expire()
    w.run()
    assert retries.asked == [(None, True)] and w.responses() == {}
    assert any(isinstance(e, StreamReset) and e.error_code == ErrorCodes.CANCEL
               for e in w.pod_events["a"])  # fmt: skip
    now[0] = 10.25
    w.proxy.expire()  # the backoff is over: the second try, with a timer of its own
    w.run()
    assert any(isinstance(e, RequestReceived) for e in w.pod_events["b"])
    assert w.proxy.next_deadline() == pytest.approx(10.45)
    now[0] = 10.45
    w.proxy.expire()
    w.run()
    assert retries.asked == [(None, True), (None, True)]  # asked, and refused: none left
    assert w.responses()[sid][b"grpc-status"] == b"4"
    (ex,) = w.proxy.take_completed()
    assert (ex.upstream, ex.flags) == ("b", "UT")


def test_a_parked_request_waits_with_its_body_and_goes_where_unpark_says() -> None:
    now = [10.0]
    plan = object()  # the shell's note: the request is found by it (identity)
    w = Pods(lambda _r: Choice(None, tag=plan, parked=True, timeout=5.0), clock=lambda: now[0])
    sid = _grpc_call(w, b"waiting body")
    w.run()
    assert w.pods == {} and w.proxy.next_deadline() == pytest.approx(15.0)
    assert not w.proxy.unpark(object(), Choice("a"))
    assert w.proxy.unpark(plan, Choice("a", tag=plan))
    w.run()
    body = b"".join(e.data for e in w.pod_events["a"] if isinstance(e, DataReceived))
    assert body == b"waiting body"
    _unavailable(w, "a")
    assert w.responses()[sid][b"grpc-status"] == b"14"
    (ex,) = w.proxy.take_completed()
    assert (ex.upstream, ex.tag) == ("a", plan)
    assert not w.proxy.unpark(plan, Choice("a"))  # it ended: nothing waits any more


def test_a_parked_request_can_be_answered_and_a_parked_delay_waits_for_both() -> None:
    now, tags = [10.0], {"/first": object(), "/second": object()}  # tags are compared by id
    w = Pods(lambda r: Choice(None, tag=tags[r.head.path], parked=True, delay=1.0),
             clock=lambda: now[0])  # fmt: skip
    first, second = w.request("/first"), w.request("/second")
    w.run()
    assert w.proxy.unpark(tags["/first"], LocalAnswer(503, "UH", b"no healthy upstream"))
    w.run()
    assert w.responses()[first][b":status"] == b"503"
    assert w.proxy.unpark(tags["/second"], Choice("b"))  # admitted; its delay is not over
    w.run()
    assert "b" not in w.pods
    now[0] = 11.0
    w.proxy.expire()
    w.run()
    assert any(isinstance(e, RequestReceived) for e in w.pod_events["b"])
    w.respond("b")
    assert w.responses()[second][b":status"] == b"200"


# -- the source side: a try the endpoint never processed, sent again at once ------------------
class FakeResend:
    """Sends an unprocessed try to the next key, ``limit`` times; no key left: 503 ``UF``."""

    def __init__(self, keys: list[str], limit: int = 1) -> None:
        self.keys, self.limit = keys, limit
        self.asked: list[tuple[str, bool]] = []

    def unprocessed(self, cause: str, *, replayable: bool) -> Choice | LocalAnswer | None:
        self.asked.append((cause, replayable))
        if not replayable or not self.limit:
            return None
        self.limit -= 1
        if not self.keys:
            return LocalAnswer(503, "UF", b"upstream connect error")
        return Choice(self.keys.pop(0), tag="tag")


def _resending(
    *,
    keys: list[str] | None = None,
    limit: int = 1,
    retries: FakeRetries | None = None,
    max_replay_body: int = 64 * 1024,
) -> tuple[Pods, list[FakeResend]]:
    """Requests to key "a", each with a ``FakeResend`` of its own to ``keys`` (["b"])."""
    made: list[FakeResend] = []

    def pick(_request: PickRequest) -> Choice:
        made.append(FakeResend(list(keys if keys is not None else ["b"]), limit))
        return Choice("a", tag="tag", retries=retries, resend=made[-1])

    w = Pods(pick, clock=lambda: 10.0)
    w.proxy.limits = H2Limits(max_replay_body=max_replay_body)
    return w, made


def _answer_all(w: Pods, key: str) -> list[bytes]:
    """The pod ``key`` answers every call it has OK; returns the bodies it received."""
    events, w.pod_events[key] = w.pod_events[key], []
    pod = w.pods[key]
    bodies = {e.stream_id: b"" for e in events if isinstance(e, RequestReceived)}
    for e in events:
        if isinstance(e, DataReceived):
            bodies[e.stream_id] += e.data
    for sid in bodies:
        pod.send_headers(sid, [(":status", "200"), ("content-type", "application/grpc")])
        pod.send_headers(sid, OK_TRAILERS, end_stream=True)
    w.run()
    return list(bodies.values())


def test_calls_waiting_for_an_upstream_that_cannot_be_opened_go_at_once_to_another() -> None:
    w, made = _resending()
    w.down["a"] = "refused"
    first = _grpc_call(w, b"one")
    second = _grpc_call(w, b"two")
    w.run()
    assert "a" not in w.pods and [m.asked for m in made] == [[("refused", True)]] * 2
    assert w.unreachable == [False]  # every call went elsewhere: no failure to count
    assert w.proxy.next_deadline() is None  # no backoff: sent again at once
    assert sorted(_answer_all(w, "b")) == [b"one", b"two"]
    assert [b"grpc-status" in h for h in w.responses().values()] == [False, False]  # no UF
    ends = {e.stream_id: dict(e.headers) for e in w.client_events
            if isinstance(e, TrailersReceived)}  # fmt: skip
    assert {sid: h[b"grpc-status"] for sid, h in ends.items()} == {first: b"0", second: b"0"}
    done = sorted((ex.upstream, ex.status, ex.grpc_status, ex.flags)
                  for ex in w.proxy.take_completed())  # fmt: skip
    assert done == [("b", 200, "0", "-")] * 2


def test_a_streaming_call_is_sent_again_with_what_came_so_far_and_the_rest_follows() -> None:
    w, made = _resending()
    w.down["a"] = "connect-failure"
    sid: int = w.client.get_next_available_stream_id()
    headers = [(":method", "POST"), (":scheme", "http"), (":authority", "s"),
               (":path", "/pkg.Svc/Upload"), ("content-type", "application/grpc")]  # fmt: skip
    w.client.send_headers(sid, headers)
    w.client.send_data(sid, b"first;")
    w.run()
    assert made[0].asked == [("connect-failure", True)]
    w.client.send_data(sid, b"second", end_stream=True)
    w.run()
    assert _answer_all(w, "b") == [b"first;second"]
    (ex,) = w.proxy.take_completed()
    assert (ex.upstream, ex.grpc_status, ex.request_bytes) == ("b", "0", 12)


@pytest.mark.parametrize("grpc", [True, False])
def test_an_upstream_that_cannot_be_opened_answers_503_uf_when_not_sent_again(grpc: bool) -> None:
    w, made = _resending(limit=0)
    w.down["a"] = "connect-failure"
    sid = _grpc_call(w, b"x") if grpc else w.request("/a/plain")
    w.run()
    assert made[0].asked == [("connect-failure", True)]
    assert w.unreachable == [True]  # the client sees this failure: the shell counts it
    head = w.responses()[sid]
    assert (head[b":status"], head.get(b"grpc-status")) == ((b"200", b"14") if grpc else
                                                           (b"503", None))  # fmt: skip
    (ex,) = w.proxy.take_completed()
    assert (ex.upstream, ex.flags) == ("a", "UF")


def test_an_upstream_that_cannot_be_opened_without_resend_answers_503_uf() -> None:
    w = Pods()
    w.down["a"] = "refused"
    sid = w.request("/a/1")
    w.run()
    assert w.responses()[sid][b":status"] == b"503" and w.unreachable == [True]
    (ex,) = w.proxy.take_completed()
    assert ex.flags == "UF"


def test_a_body_beyond_the_replay_limit_is_not_sent_again_and_no_endpoint_left_is_uf() -> None:
    w, made = _resending(max_replay_body=4)
    w.down["a"] = "refused"
    big = _grpc_call(w, b"01234")
    w.run()
    assert made[0].asked == [("refused", False)]  # asked, so the failure is counted
    assert w.responses()[big][b"grpc-status"] == b"14"
    w, made = _resending(keys=[])  # the resend has no endpoint left
    w.down["a"] = "refused"
    sid = _grpc_call(w, b"0123")
    w.run()
    assert w.responses()[sid][b"grpc-status"] == b"14" and w.unreachable == [False]
    (ex,) = w.proxy.take_completed()
    assert ex.flags == "UF"


def test_a_refused_stream_is_resent_before_the_rules_retries_are_asked() -> None:
    retries = FakeRetries(["c"])
    w, made = _resending(retries=retries)
    sid = _grpc_call(w, b"x")
    w.run()
    (req,) = [e for e in w.pod_events["a"] if isinstance(e, RequestReceived)]
    w.pods["a"].reset_stream(req.stream_id, ErrorCodes.REFUSED_STREAM)
    w.run()
    assert made[0].asked == [("refused", True)] and retries.asked == []
    assert _answer_all(w, "b") == [b"x"]
    assert w.responses()[sid][b":status"] == b"200"
    # when the resend says no, the rule's retries decide, as after any reset
    retries = FakeRetries(["c"])
    w, made = _resending(limit=0, retries=retries)
    _grpc_call(w, b"y")
    w.run()
    (req,) = [e for e in w.pod_events["a"] if isinstance(e, RequestReceived)]
    w.pods["a"].reset_stream(req.stream_id, ErrorCodes.REFUSED_STREAM)
    w.run()
    assert made[0].asked == [("refused", True)] and retries.asked == [(None, True)]


def test_a_reset_that_is_no_refusal_is_not_resent() -> None:
    w, made = _resending()
    sid = _grpc_call(w, b"x")
    w.run()
    (req,) = [e for e in w.pod_events["a"] if isinstance(e, RequestReceived)]
    w.pods["a"].reset_stream(req.stream_id, ErrorCodes.INTERNAL_ERROR)  # maybe processed
    w.run()
    assert made[0].asked == [] and "b" not in w.pods
    assert w.responses()[sid][b"grpc-status"] == b"14"
    (ex,) = w.proxy.take_completed()
    assert ex.flags == "UR"


def test_calls_above_the_pods_goaway_are_resent_and_those_below_are_answered_by_it() -> None:
    w, made = _resending()
    kept = _grpc_call(w, b"kept")
    moved = _grpc_call(w, b"moved")
    w.run()
    ids = [e.stream_id for e in w.pod_events["a"] if isinstance(e, RequestReceived)]
    w.pods["a"].close_connection(ErrorCodes.NO_ERROR, last_stream_id=min(ids))
    w.run()
    assert [m.asked for m in made] == [[], [("refused", True)]]
    assert _answer_all(w, "b") == [b"moved"]
    assert moved in w.responses() and kept not in w.responses()


# -- the source side: an endpoint's own answer (a same-node endpoint's policy) ----------------
DENIED = LocalAnswer(403, "RBAC", b"RBAC: access denied", grpc_status=7, upstream="b")


class DeniedThere(FakeResend):
    """Sends an unprocessed try to "b", whose policy refuses it."""

    def unprocessed(self, cause: str, *, replayable: bool) -> Choice | LocalAnswer | None:
        self.asked.append((cause, replayable))
        return DENIED


class DeniedRetry(FakeRetries):
    def next(self) -> Choice | LocalAnswer:
        return DENIED


def _denied_as_the_destination_answers(w: Pods, sid: int, tag: object) -> None:
    """The call got the destination's trailers-only PERMISSION_DENIED, reported at "b"."""
    answer = w.responses()[sid]
    assert (answer[b":status"], answer[b"grpc-status"]) == (b"200", b"7")
    assert answer[b"grpc-message"] == b"RBAC: access denied"
    (ex,) = w.proxy.take_completed()
    assert (ex.upstream, ex.tag, ex.status, ex.grpc_status, ex.flags) == (
        "b",
        tag,
        200,
        "7",
        "RBAC",
    )


def test_a_resend_its_endpoint_refuses_is_answered_with_that_endpoints_grpc_status() -> None:
    resend = DeniedThere([])
    w = Pods(lambda _r: Choice("a", tag="tag", resend=resend), clock=lambda: 10.0)
    w.down["a"] = "refused"
    sid = _grpc_call(w, b"x")
    w.run()
    assert resend.asked == [("refused", True)] and w.unreachable == [False]
    _denied_as_the_destination_answers(w, sid, "tag")


def test_a_retry_its_endpoint_refuses_is_answered_with_that_endpoints_grpc_status() -> None:
    now = [10.0]
    w = _retrying(DeniedRetry(["b"]), now)
    sid = _grpc_call(w, b"x")
    w.run()
    _unavailable(w, "a")
    now[0] = 11.0
    w.proxy.expire()
    w.run()
    _denied_as_the_destination_answers(w, sid, "tag")


def test_a_parked_request_its_endpoint_refuses_is_answered_with_its_status() -> None:
    plan = object()
    w = Pods(lambda _r: Choice(None, tag=plan, parked=True), clock=lambda: 10.0)
    call, plain = _grpc_call(w, b"x"), w.request("/plain")
    w.run()
    assert w.proxy.unpark(plan, DENIED)
    w.run()
    _denied_as_the_destination_answers(w, call, plan)
    assert w.proxy.unpark(plan, DENIED)  # the plain request carries the same tag here
    w.run()
    assert w.responses()[plain][b":status"] == b"403"
    body = b"".join(e.data for e in w.client_events
                    if isinstance(e, DataReceived) and e.stream_id == plain)  # fmt: skip
    assert body == b"RBAC: access denied"


def test_a_streaming_call_keeps_no_body_for_resending_once_its_response_started() -> None:
    w, _made = _resending()
    sid: int = w.client.get_next_available_stream_id()
    headers = [(":method", "POST"), (":scheme", "http"), (":authority", "s"),
               (":path", "/pkg.Svc/Upload"), ("content-type", "application/grpc")]  # fmt: skip
    w.client.send_headers(sid, headers)
    w.client.send_data(sid, b"x" * 1000)
    w.run()
    assert w.proxy.replay_held == 1000  # the pod may still refuse it: kept to send again
    pod_sid = next(e.stream_id for e in w.pod_events["a"] if isinstance(e, RequestReceived))
    w.pods["a"].send_headers(pod_sid, [(":status", "200"), ("content-type", "application/grpc")])
    w.run()
    assert w.proxy.replay_held == 0  # the response is the client's: never sent again
    w.client.send_data(sid, b"y" * 1000)
    w.run()
    assert w.proxy.replay_held == 0
    received = b"".join(e.data for e in w.pod_events["a"] if isinstance(e, DataReceived))
    assert received == b"x" * 1000 + b"y" * 1000


# -- the source side: a try admitted where its head goes (a same-node endpoint's) -------------
LIMITED = LocalAnswer(429, "RL", b"local_rate_limited", grpc_status=8, upstream="a")


class Admission:
    """The shell's ``admit``: the answers in turn for upstream "a" (then True), every upstream
    sent to; "b" always admits."""

    def __init__(self, *answers: LocalAnswer | bool) -> None:
        self.answers, self.asked = list(answers), []

    def __call__(self, exchange: H2Exchange, key: object, uid: int) -> LocalAnswer | bool:
        self.asked.append(key)
        if key != "a" or not self.answers:
            return True
        return self.answers.pop(0)


class Retries429(FakeRetries):
    def after(self, status: int | None, first_byte: float, *, replayable: bool) -> float | None:
        return super().after(503 if status == 429 else status, first_byte, replayable=replayable)


def test_a_try_held_by_its_admission_waits_with_its_body_and_goes_when_unparked() -> None:
    admission = Admission(False)
    w = Pods(lambda _r: Choice("a", tag="tag"), clock=lambda: 10.0, admit=admission)
    sid = _grpc_call(w, b"payload")
    w.run()
    assert admission.asked == ["a"]  # its upstream opens: held
    assert not [e for e in w.pod_events["a"] if isinstance(e, RequestReceived)]
    assert w.proxy.unpark("tag", Choice("a"))
    w.run()
    assert admission.asked == ["a", "a"]
    (req,) = [e for e in w.pod_events["a"] if isinstance(e, RequestReceived)]
    body = b"".join(e.data for e in w.pod_events["a"] if isinstance(e, DataReceived))
    assert body == b"payload" and req.stream_id
    w.pod_events["a"].clear()
    w.pods["a"].send_headers(req.stream_id, [(":status", "200")])
    w.pods["a"].send_data(req.stream_id, b"x", end_stream=True)
    w.run()
    assert w.responses()[sid][b":status"] == b"200"


def test_a_refusal_where_a_try_is_sent_is_that_tries_answer_which_a_retry_may_drop() -> None:
    """A plain request answered 429 where it was to go ("a"): retried like a far pod's 429,
    the try dropped as answered there, the next try sent to "b" when its backoff is over."""
    now, retries = [10.0], Retries429(["b"])
    admission = Admission(LIMITED)
    w = Pods(lambda _r: Choice("a", tag="tag", retries=retries), clock=lambda: now[0],
             admit=admission)  # fmt: skip
    sid = w.request("/x")
    w.run()
    assert retries.asked == [(503, True)] and w.responses() == {}
    assert not [e for e in w.pod_events["a"] if isinstance(e, RequestReceived)]
    (tried,) = w.proxy.take_dropped()
    assert (tried.upstream, tried.status, tried.flags) == ("a", 429, "RL")
    assert tried.sent == tried.ended == 10.0 and tried.response_bytes == len(b"local_rate_limited")
    now[0] = 10.05
    w.proxy.expire()
    w.run()
    assert admission.asked == ["a", "b"]
    w.respond("b")
    assert w.responses()[sid][b":status"] == b"200"
    (ex,) = w.proxy.take_completed()
    assert (ex.upstream, ex.status, ex.sent) == ("b", 200, 10.05)


def test_a_grpc_call_refused_where_it_is_sent_is_a_trailers_only_answer_not_a_429() -> None:
    """Its status, as the rule's retry sees a far node's trailers-only answer, is 200."""
    retries = Retries429(["b"])
    w = Pods(lambda _r: Choice("a", tag="tag", retries=retries), clock=lambda: 10.0,
             admit=Admission(LIMITED))  # fmt: skip
    sid = _grpc_call(w, b"x")
    w.run()
    assert retries.asked == [(200, True)]
    answer = w.responses()[sid]
    assert (answer[b":status"], answer[b"grpc-status"]) == (b"200", b"8")
    assert not w.proxy.take_dropped()
    (ex,) = w.proxy.take_completed()
    assert (ex.upstream, ex.grpc_status, ex.flags, ex.sent) == ("a", "8", "RL", 10.0)


def test_a_try_its_pod_answered_and_a_retry_dropped_is_kept_as_its_pod_saw_it() -> None:
    now, retries = [10.0], FakeRetries(["b"])
    w = _retrying(retries, now)
    _grpc_call(w, b"x")
    w.run()
    now[0] = 10.5
    _unavailable(w, "a")
    (tried,) = w.proxy.take_dropped()
    assert (tried.upstream, tried.status, tried.grpc_status, tried.flags) == ("a", 200, "14", "-")
    assert (tried.sent, tried.ended) == (10.0, 10.5)


# -- the source side: a same-node pod's reset, seen as its far node's answer would be ---------
class CodesRetries(FakeRetries):
    """A rule's retry: a missing response head and ``codes`` are retried."""

    def __init__(self, keys: list[str], codes: set[int]) -> None:
        super().__init__(keys)
        self.codes = codes

    def after(self, status: int | None, first_byte: float, *, replayable: bool) -> float | None:
        self.asked.append((status, replayable))
        if status is not None and status not in self.codes:
            return None
        if not replayable or not self.keys or not self.limit:
            return None
        self.limit -= 1
        return 0.05


def _reset_there(grpc: bool, codes: set[int], *, direct: bool) -> tuple[object, ...]:
    """Pod "a" resets the request: itself (``direct``, a same-node pod) or, far, as its node
    answers the source for it (502; gRPC: trailers-only UNAVAILABLE). What the rule's retries
    were asked, what the client got, and which pods saw a request."""
    now, retries = [10.0], CodesRetries(["b"], codes)
    w = Pods(lambda _r: Choice("a", tag="tag", retries=retries), clock=lambda: now[0],
             direct=(lambda key: key == "a") if direct else None)  # fmt: skip
    sid = _grpc_call(w, b"x") if grpc else w.request("/x")
    w.run()
    (req,) = [e for e in w.pod_events["a"] if isinstance(e, RequestReceived)]
    if direct:
        w.pods["a"].reset_stream(req.stream_id, ErrorCodes.INTERNAL_ERROR)
    elif grpc:
        head = [(":status", "200"), ("content-type", "application/grpc"), ("grpc-status", "14")]
        w.pods["a"].send_headers(req.stream_id, head, end_stream=True)
    else:
        w.pods["a"].send_headers(req.stream_id, [(":status", "502")], end_stream=True)
    w.pod_events["a"].clear()
    w.run()
    now[0] = 11.0
    w.proxy.expire()
    w.run()
    if "b" in w.pods:
        w.respond("b")
    answer = w.responses()[sid]
    return set(retries.asked), answer[b":status"], answer.get(b"grpc-status"), sorted(w.pods)


@pytest.mark.parametrize(
    ("grpc", "codes", "retried"),
    [(False, {503}, False), (False, {502}, True), (True, {503}, True), (True, {500}, False)],
)
def test_a_direct_pods_reset_is_retried_only_as_its_far_nodes_answer_would_be(
    grpc: bool, codes: set[int], retried: bool
) -> None:
    """A far pod's reset reaches the source as its node's 502 (gRPC: UNAVAILABLE, 503 to a
    rule), retried only if the rule's codes have it. A same-node pod's own reset (``direct``:
    no proxy of its own in front) is decided the same way, not retried whatever the codes."""
    far = _reset_there(grpc, codes, direct=False)
    assert _reset_there(grpc, codes, direct=True) == far
    assert far[3] == (["a", "b"] if retried else ["a"])
