"""One unary gRPC call over HTTP/2, sans-IO: bytes in, bytes out, a message or a status at the end.

Why not grpcio: the agent makes one kind of call (a certificate request, a few times a day per
identity), and the grpc library with protobuf costs every agent about 18 MiB of RSS and six
threads. A unary call is small on the wire (gRPC's PROTOCOL-HTTP2): a POST with
``content-type: application/grpc``, ``te: trailers`` and ``grpc-timeout``; the message as one
5-byte-prefixed frame (flag 0 = uncompressed, 4-byte big-endian length); the answer's headers,
its single message, and trailers carrying ``grpc-status`` and a percent-encoded
``grpc-message`` (or a "trailers-only" answer: the status in the headers). The HTTP/2 framing,
HPACK and flow control are the ``h2`` library's, which the proxy already uses.

What a failure becomes, as grpcio reports it (so the CA client, its metrics and readiness keep
the same codes): a non-200 HTTP status maps per gRPC's HTTP-to-gRPC table; a stream reset
``REFUSED_STREAM`` or a GOAWAY before the answer is ``UNAVAILABLE`` (safe to retry), another
reset is ``INTERNAL`` (``CANCEL`` is ``CANCELLED``); a closed connection is ``UNAVAILABLE``; a
malformed answer (no status, a compressed or second message, an HTTP/2 protocol error) is
``INTERNAL``; an OK answer without a message is ``UNIMPLEMENTED``, as grpcio says.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable, Sequence
from urllib.parse import unquote

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    ResponseReceived,
    StreamEnded,
    StreamReset,
    TrailersReceived,
    WindowUpdated,
)
from h2.exceptions import H2Error

MAX_MESSAGE_BYTES = 4 * 2**20  # grpcio's default receive limit


class Status(enum.IntEnum):
    """gRPC status codes (``grpc/status.h``); ``.name`` is how they are shown and counted."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


# gRPC's "HTTP to gRPC status code mapping", for answers that carry no grpc-status.
_HTTP_STATUS = {
    400: Status.INTERNAL,
    401: Status.UNAUTHENTICATED,
    403: Status.PERMISSION_DENIED,
    404: Status.UNIMPLEMENTED,
    429: Status.UNAVAILABLE,
    502: Status.UNAVAILABLE,
    503: Status.UNAVAILABLE,
    504: Status.UNAVAILABLE,
}


class CallError(Exception):
    """The call ended with a status other than OK; ``details`` is the peer's grpc-message (or
    what went wrong on the way)."""

    def __init__(self, status: Status, details: str) -> None:
        super().__init__(f"{status.name}: {details}")
        self.status = status
        self.details = details


def encode_timeout(seconds: float) -> str:
    """``grpc-timeout``: at most 8 digits and a unit; milliseconds, rounded up, while they fit."""
    millis = max(1, math.ceil(seconds * 1000))
    if millis <= 99_999_999:
        return f"{millis}m"
    return f"{min(math.ceil(seconds), 99_999_999)}S"


def frame(message: bytes) -> bytes:
    """A gRPC length-prefixed message: flag 0 (uncompressed), 4-byte big-endian length."""
    return b"\x00" + len(message).to_bytes(4, "big") + message


class UnaryCall:
    """Client side of one call on a fresh connection: feed it what the server sends
    (``receive``), send what it returns; ``done`` once the answer is complete, then ``result``.
    ``metadata`` pairs are sent as request headers (lower-case names; never logged here)."""

    def __init__(
        self,
        *,
        authority: str,
        path: str,
        message: bytes,
        timeout: float,
        metadata: Sequence[tuple[str, str]] = (),
    ) -> None:
        self._conn = H2Connection(H2Configuration(client_side=True, header_encoding="utf-8"))
        self._headers = [
            (":method", "POST"),
            (":scheme", "https"),
            (":path", path),
            (":authority", authority),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
            ("grpc-timeout", encode_timeout(timeout)),
            *metadata,
        ]
        self._unsent = frame(message)
        self._stream = 0
        self._body = bytearray()
        self._http_status: int | None = None
        self._outcome: bytes | CallError | None = None

    @property
    def done(self) -> bool:
        return self._outcome is not None

    def start(self) -> bytes:
        """The connection preface, the request's headers and as much of its body as the peer's
        flow-control window takes (all of it, for the CA's requests of about 1 KB)."""
        self._conn.initiate_connection()
        self._stream = self._conn.get_next_available_stream_id()
        self._conn.send_headers(self._stream, self._headers)
        self._send_body()
        return self._conn.data_to_send()

    def receive(self, data: bytes) -> bytes:
        """Take bytes from the server; returns bytes to send back (acknowledgements, the rest of
        the request body)."""
        if self._outcome is not None:
            return b""
        try:
            events = self._conn.receive_data(data)
        except H2Error as e:
            self._fail(Status.INTERNAL, f"HTTP/2 protocol error from the server: {e}")
            return self._conn.data_to_send()
        for event in events:
            self._on(event)
            if self._outcome is not None:
                break
        return self._conn.data_to_send()

    def connection_lost(self, why: str) -> None:
        """The connection ended (EOF or an error, named by ``why``) before the answer did."""
        if self._outcome is None:
            self._fail(Status.UNAVAILABLE, f"connection closed before the answer: {why}")

    def result(self) -> bytes:
        """The answer's message; raises ``CallError`` for any other outcome."""
        if self._outcome is None:
            raise RuntimeError("result() before the call is done")
        if isinstance(self._outcome, CallError):
            raise self._outcome
        return self._outcome

    def _send_body(self) -> None:
        while self._unsent:
            room = min(
                self._conn.local_flow_control_window(self._stream),
                self._conn.max_outbound_frame_size,
            )
            if room <= 0:
                return  # the rest after the peer's WINDOW_UPDATE
            chunk, self._unsent = self._unsent[:room], self._unsent[room:]
            self._conn.send_data(self._stream, chunk, end_stream=not self._unsent)

    def _fail(self, status: Status, details: str) -> None:
        self._outcome = CallError(status, details)

    def _on(self, event: object) -> None:
        if isinstance(event, WindowUpdated):
            self._send_body()
        elif isinstance(event, ResponseReceived) and event.stream_id == self._stream:
            self._on_headers(_as_dict(event.headers), ended=event.stream_ended is not None)
        elif isinstance(event, DataReceived) and event.stream_id == self._stream:
            self._conn.acknowledge_received_data(event.flow_controlled_length, self._stream)
            self._body += event.data
            if len(self._body) > MAX_MESSAGE_BYTES + 5:
                self._fail(
                    Status.RESOURCE_EXHAUSTED, f"answer larger than {MAX_MESSAGE_BYTES} bytes"
                )
        elif isinstance(event, TrailersReceived) and event.stream_id == self._stream:
            self._on_status(_as_dict(event.headers))
        elif isinstance(event, StreamEnded) and event.stream_id == self._stream:
            if self._outcome is None:  # ended without trailers
                self._fail(Status.INTERNAL, "the answer ended without a grpc-status")
        elif isinstance(event, StreamReset) and event.stream_id == self._stream:
            self._on_reset(int(event.error_code or 0))
        elif isinstance(event, ConnectionTerminated):
            self._fail(
                Status.UNAVAILABLE,
                f"the server closed the connection (GOAWAY {_code_name(event.error_code)})",
            )

    def _on_headers(self, headers: dict[str, str], *, ended: bool) -> None:
        status = headers.get(":status", "")
        self._http_status = int(status) if status.isdigit() else None
        if "grpc-status" in headers:  # trailers-only: the status comes with the headers
            self._on_status(headers)
            return
        if self._http_status != 200:
            code = _HTTP_STATUS.get(self._http_status or 0, Status.UNKNOWN)
            self._fail(code, f"the server answered HTTP {status or '(no status)'}, not gRPC")
        elif not headers.get("content-type", "").startswith("application/grpc"):
            self._fail(
                Status.UNKNOWN,
                f"the server answered content-type {headers.get('content-type')!r}, not gRPC",
            )
        elif ended:
            self._fail(Status.INTERNAL, "the answer ended without a grpc-status")

    def _on_status(self, trailers: dict[str, str]) -> None:
        raw = trailers.get("grpc-status", "")
        if not raw.isdigit():
            self._fail(Status.INTERNAL, f"the answer's grpc-status {raw!r} is not a number")
            return
        try:
            status = Status(int(raw))
        except ValueError:
            status = Status.UNKNOWN
        details = unquote(trailers.get("grpc-message", ""), errors="replace")
        if status is not Status.OK:
            self._fail(status, details)
            return
        self._outcome = self._message()

    def _message(self) -> bytes | CallError:
        body = bytes(self._body)
        if not body:
            return CallError(Status.UNIMPLEMENTED, "the server answered OK without a message")
        if len(body) < 5:
            return CallError(Status.INTERNAL, "the answer's message frame is truncated")
        if body[0] != 0:
            return CallError(Status.INTERNAL, "the answer is compressed, which was not asked for")
        size = int.from_bytes(body[1:5], "big")
        if len(body) != 5 + size:
            problem = "truncated" if len(body) < 5 + size else "followed by a second message"
            return CallError(Status.INTERNAL, f"the answer's message is {problem}")
        return body[5:]

    def _on_reset(self, code: int) -> None:
        if code == ErrorCodes.REFUSED_STREAM:
            self._fail(Status.UNAVAILABLE, "the server refused the stream")
        elif code == ErrorCodes.CANCEL:
            self._fail(Status.CANCELLED, "the server cancelled the stream")
        else:
            self._fail(Status.INTERNAL, f"the server reset the stream ({_code_name(code)})")


def _as_dict(headers: Iterable[tuple[bytes | str, bytes | str]] | None) -> dict[str, str]:
    """Header pairs as text (the connection decodes them as UTF-8 already; bytes are the
    library's type for the general case)."""
    return {
        (k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
        for k, v in headers or ()
    }


def _code_name(code: int | None) -> str:
    try:
        return ErrorCodes(code or 0).name
    except ValueError:
        return f"error code {code}"
