"""The sans-IO unary gRPC call against an HTTP/2 server written with h2 in the test: what it
sends, and what every kind of answer becomes (the interop with grpcio's server is covered by the
identity manager's tests, which use the real CA)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import DataReceived, RequestReceived, StreamEnded

from agent.identity.grpcunary import CallError, Status, UnaryCall, encode_timeout, frame

Headers = list[tuple[str, str]]


class Server:
    """The server end: collects the request, answers with what a test tells it."""

    def __init__(self) -> None:
        self.conn = H2Connection(H2Configuration(client_side=False, header_encoding="utf-8"))
        self.conn.initiate_connection()
        self.headers: dict[str, str] = {}
        self.body = bytearray()
        self.ended = False
        self.stream = 0

    def receive(self, data: bytes) -> bytes:
        for event in self.conn.receive_data(data):
            if isinstance(event, RequestReceived):
                self.stream = event.stream_id
                self.headers = dict(event.headers)  # type: ignore[arg-type]
            elif isinstance(event, DataReceived):
                self.body += event.data
                self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, StreamEnded):
                self.ended = True
        return self.conn.data_to_send()


def run(
    answer: Callable[[Server], None], *, message: bytes = b"hello", timeout: float = 10.0
) -> tuple[UnaryCall, Server]:
    """Exchange bytes until the call is done; ``answer`` runs once the request is complete (and
    may be run again for data the server still has to send once windows open)."""
    server = Server()
    call = UnaryCall(
        authority="ca:15012",
        path="/pkg.Service/Method",
        message=message,
        timeout=timeout,
        metadata=(("authorization", "Bearer t0ken"),),
    )
    to_server = call.start()
    answered = False
    for _ in range(1000):
        to_client = server.receive(to_server)
        if server.ended and not answered:
            answer(server)
            answered = True
            to_client += server.conn.data_to_send()
        to_server = call.receive(to_client) if to_client else b""
        if call.done:
            return call, server
        assert to_server or to_client, "the exchange stalled"
    raise AssertionError("the exchange did not finish")


def reply(
    headers: Headers, data: bytes = b"", trailers: Headers | None = None
) -> Callable[[Server], None]:
    def answer(server: Server) -> None:
        server.conn.send_headers(server.stream, headers, end_stream=not data and trailers is None)
        if data:
            server.conn.send_data(server.stream, data, end_stream=trailers is None)
        if trailers is not None:
            server.conn.send_headers(server.stream, trailers, end_stream=True)

    return answer


GRPC_OK = [(":status", "200"), ("content-type", "application/grpc")]


def test_request_is_a_grpc_post_with_the_framed_message_and_the_metadata() -> None:
    call, server = run(reply(GRPC_OK, frame(b"answer"), [("grpc-status", "0")]), timeout=2.5)
    assert call.result() == b"answer"
    assert server.headers[":method"] == "POST"
    assert server.headers[":path"] == "/pkg.Service/Method"
    assert server.headers[":authority"] == "ca:15012"
    assert server.headers["content-type"] == "application/grpc"
    assert server.headers["te"] == "trailers"
    assert server.headers["grpc-timeout"] == "2500m"
    assert server.headers["authorization"] == "Bearer t0ken"
    assert bytes(server.body) == b"\x00\x00\x00\x00\x05hello"


def test_trailers_only_error_carries_the_decoded_message() -> None:
    call, _ = run(reply([*GRPC_OK, ("grpc-status", "7"), ("grpc-message", "node%20n1%3A%20no%25")]))
    with pytest.raises(CallError) as info:
        call.result()
    assert info.value.status is Status.PERMISSION_DENIED
    assert info.value.details == "node n1: no%"


def test_error_in_trailers_after_headers() -> None:
    call, _ = run(reply(GRPC_OK, b"", [("grpc-status", "16"), ("grpc-message", "bad token")]))
    with pytest.raises(CallError) as info:
        call.result()
    assert (info.value.status, info.value.details) == (Status.UNAUTHENTICATED, "bad token")


@pytest.mark.parametrize(
    ("answer", "status", "says"),
    [
        (reply([(":status", "503")]), Status.UNAVAILABLE, "HTTP 503"),
        (reply([(":status", "404")]), Status.UNIMPLEMENTED, "HTTP 404"),
        (reply([(":status", "200"), ("content-type", "text/html")]), Status.UNKNOWN, "text/html"),
        (reply(GRPC_OK, frame(b"x")), Status.INTERNAL, "without a grpc-status"),
        (reply(GRPC_OK, b"", [("grpc-status", "0")]), Status.UNIMPLEMENTED, "without a message"),
        (reply(GRPC_OK, b"\x01" + frame(b"x")[1:], [("grpc-status", "0")]), Status.INTERNAL,
         "compressed"),
        (reply(GRPC_OK, frame(b"x") + frame(b"y"), [("grpc-status", "0")]), Status.INTERNAL,
         "second message"),
        (reply(GRPC_OK, frame(b"xyz")[:-1], [("grpc-status", "0")]), Status.INTERNAL, "truncated"),
        (reply(GRPC_OK, b"", [("grpc-status", "x")]), Status.INTERNAL, "not a number"),
        (reply(GRPC_OK, b"", [("grpc-status", "99"), ("grpc-message", "new")]), Status.UNKNOWN,
         "new"),
    ],
)  # fmt: skip
def test_malformed_or_non_grpc_answers(
    answer: Callable[[Server], None], status: Status, says: str
) -> None:
    call, _ = run(answer)
    with pytest.raises(CallError, match=says) as info:
        call.result()
    assert info.value.status is status


@pytest.mark.parametrize(
    ("code", "status"),
    [
        (ErrorCodes.REFUSED_STREAM, Status.UNAVAILABLE),
        (ErrorCodes.CANCEL, Status.CANCELLED),
        (ErrorCodes.INTERNAL_ERROR, Status.INTERNAL),
    ],
)
def test_stream_reset(code: ErrorCodes, status: Status) -> None:
    call, _ = run(lambda server: server.conn.reset_stream(server.stream, code))
    with pytest.raises(CallError) as info:
        call.result()
    assert info.value.status is status


def test_goaway_before_the_answer_is_unavailable() -> None:
    call, _ = run(lambda server: server.conn.close_connection())
    with pytest.raises(CallError, match="GOAWAY NO_ERROR") as info:
        call.result()
    assert info.value.status is Status.UNAVAILABLE


def test_a_closed_connection_is_unavailable() -> None:
    call = UnaryCall(authority="a", path="/p", message=b"", timeout=1)
    call.start()
    call.connection_lost("reset by peer")
    with pytest.raises(CallError, match="reset by peer") as info:
        call.result()
    assert info.value.status is Status.UNAVAILABLE


def test_large_messages_both_ways_flow_past_the_initial_windows() -> None:
    """65,535 bytes is HTTP/2's initial window: without the call's acknowledgements and its
    waiting for WINDOW_UPDATE, these exchanges stall."""
    big_answer = bytes(range(256)) * 1000  # 256,000 bytes

    def answer(server: Server) -> None:
        server.conn.send_headers(server.stream, GRPC_OK)
        server.pending = frame(big_answer)  # type: ignore[attr-defined]
        flush(server)

    def flush(server: Server) -> None:
        pending: bytes = server.pending  # type: ignore[attr-defined]
        while pending:
            room = min(
                server.conn.local_flow_control_window(server.stream),
                server.conn.max_outbound_frame_size,
            )
            if room == 0:
                break
            server.conn.send_data(server.stream, pending[:room])
            pending = pending[room:]
        server.pending = pending  # type: ignore[attr-defined]
        if not pending:
            server.conn.send_headers(server.stream, [("grpc-status", "0")], end_stream=True)

    server = Server()
    call = UnaryCall(authority="a", path="/p", message=b"m" * 100_000, timeout=5)
    to_server = call.start()
    for _ in range(1000):
        to_client = server.receive(to_server)
        if server.ended:
            if not hasattr(server, "pending"):
                answer(server)
            elif server.pending:  # type: ignore[attr-defined]
                flush(server)
            to_client += server.conn.data_to_send()
        to_server = call.receive(to_client)
        if call.done:
            break
    assert call.result() == big_answer
    assert bytes(server.body) == frame(b"m" * 100_000)


def test_grpc_timeout_header() -> None:
    assert encode_timeout(10) == "10000m"
    assert encode_timeout(0.0001) == "1m"  # never 0: that would be an expired deadline
    assert encode_timeout(200_000) == "200000S"  # over 8 digits of milliseconds
