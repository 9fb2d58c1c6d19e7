"""What an HBONE connection tells its owner: events, named in the past tense.

The codec (``agent.proxy.hbone``) turns bytes from the peer into these; the asyncio layer reacts to
them and never looks at HTTP/2 frames itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field


class Cause:
    """Why the codec failed a connection: ``ConnectionFailed.cause``, and the label of
    ``nodemesh_hbone_refusals_total`` (``agent.proxy.hbone_limits``)."""

    CONTROL_FLOOD = "control_flood"  # replies queued beyond max_unsent_replies
    OVERSIZED_FRAME = "oversized_frame"  # a non-DATA frame beyond max_control_frame
    HEADER_BLOCK = "header_block"  # HEADERS + CONTINUATION beyond max_header_block
    FLOW_CONTROL = "flow_control"  # DATA beyond a window we granted
    RAPID_RESET = "rapid_reset"  # too many answered-before-reset streams in flight
    INVALID_HEADER = "invalid_header"  # a header that is not UTF-8
    H2_LIMIT = "h2_limit"  # h2's own limits (header list size, ...)
    PROTOCOL_ERROR = "protocol_error"  # any other HTTP/2 violation
    UNPARSEABLE = "unparseable"  # bytes h2 failed on without a protocol error


@dataclass(frozen=True, slots=True)
class TunnelRequested:
    """Server side: a well-formed CONNECT for ``host:port`` arrived; answer with ``respond``."""

    stream_id: int
    host: str
    port: int
    forwarded_for: str | None = None
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def authority(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class RequestRejected:
    """Server side: the codec answered a bad request itself (``status``, ``reason`` for logs)."""

    stream_id: int
    status: int
    reason: str


@dataclass(frozen=True, slots=True)
class TunnelAccepted:
    """Client side: the server answered 200; data may flow both ways."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class TunnelRefused:
    """Client side: the server answered with a status other than 200."""

    stream_id: int
    status: int


@dataclass(frozen=True, slots=True)
class DataReceived:
    """Tunnel bytes; call ``consumed(stream_id, len(data))`` once they are written onwards."""

    stream_id: int
    data: bytes


@dataclass(frozen=True, slots=True)
class StreamEnded:
    """The peer half-closed the stream (END_STREAM): reproduce it with ``shutdown(SHUT_WR)``."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class StreamReset:
    """The stream is gone (RST_STREAM from the peer, or ours); drop both sockets' pairing."""

    stream_id: int
    error_code: int
    remote: bool


@dataclass(frozen=True, slots=True)
class StreamDrained:
    """Everything queued for the stream went out: reading from its TCP socket may resume."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class GoAwayReceived:
    """The peer will accept no new streams; streams up to ``last_stream_id`` may finish."""

    error_code: int
    last_stream_id: int


@dataclass(frozen=True, slots=True)
class PingAcknowledged:
    opaque: bytes


@dataclass(frozen=True, slots=True)
class ConnectionFailed:
    """A connection-level protocol error; GOAWAY is queued: flush, then close the transport.
    ``cause``: one of ``Cause``."""

    reason: str
    error_code: int
    cause: str = ""


Event = (
    TunnelRequested
    | RequestRejected
    | TunnelAccepted
    | TunnelRefused
    | DataReceived
    | StreamEnded
    | StreamReset
    | StreamDrained
    | GoAwayReceived
    | PingAcknowledged
    | ConnectionFailed
)
