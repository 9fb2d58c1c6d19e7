"""``H2Proxy``'s per-connection and per-stream state, and the move of queued DATA within the
send windows.

Why a module of its own: what a stream holds (its queues both ways, what is kept to send it
again, its deadlines) and what an upstream connection holds are plain records that every part
of ``H2Proxy`` reads and writes; ``move_queued`` is the one place DATA crosses from one side's
queue to the other side's connection, so the windows bound what the proxy holds (flow control
is acknowledged to the sender only for what was moved). Both are data, not decisions.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from agent.proxy.grpcframing import MessageEnds
from agent.proxy.h2exchange import H2Exchange, Header, HeaderEdit, Resend, Retries
from agent.proxy.h2limits import H2Limits, new_connection
from agent.proxy.h2wire import GracefulH2Connection, max_concurrent_streams, send_data_on


class Upstream:
    """One h2c connection to a pod (``uid`` names it to the shell)."""

    __slots__ = ("conn", "gone", "key", "peer_limit", "streams", "uid")

    def __init__(self, uid: int, key: object, limits: H2Limits) -> None:
        self.uid, self.key = uid, key
        self.conn = new_connection(client_side=True, limits=limits)
        self.streams: dict[int, Stream] = {}  # by its stream id
        self.gone = False  # closed, failed or sent GOAWAY: no new stream on it
        # The pod's MAX_CONCURRENT_STREAMS, kept here: read once per try by
        # ``H2Proxy._send_head``, it changes only with a SETTINGS frame from the pod, whose
        # ``RemoteSettingsChanged`` every byte from it passes to ``H2Proxy._upstream_event``
        # (the events of input that failed the connection are lost with it: no stream goes to
        # it after that).
        self.peer_limit: int = max_concurrent_streams(self.conn.remote_settings)


@dataclass(slots=True, eq=False)
class Stream:
    """One client stream: its upstream stream, the DATA queued each way with the window bytes
    owed for it, what is kept to send it again or copy it, and its timers."""

    client_id: int
    exchange: H2Exchange
    upstream: Upstream | None = None  # None: answered by the proxy itself
    upstream_id: int = 0
    to_upstream: deque[tuple[bytes, int]] = field(default_factory=deque)  # (data, window bytes)
    request_end: bool = False  # the client ended its side
    request_trailers: list[Header] | None = None
    request_sent: bool = False  # ... and we ended it upstream
    to_client: deque[tuple[bytes, int]] = field(default_factory=deque)
    response_started: bool = False
    response_end: bool = False
    response_trailers: list[Header] | None = None
    # A gRPC response under a deadline: where its bytes stand in its messages, so that its
    # timeout can end it with trailers rather than a reset (``H2Proxy._time_out``).
    response_messages: MessageEnds | None = None
    edit_request: HeaderEdit | None = None  # applied once, to the forwarded head
    edit_response: HeaderEdit | None = None
    deadline: float | None = None  # clock time the request's timeout expires
    retries: Retries | None = None
    resend: Resend | None = None
    replay_head: list[Header] | None = None  # what was sent, to send again
    replay_body: list[bytes] | None = field(default_factory=list)  # None: over the limit
    replay_size: int = 0
    retry_at: float | None = None  # clock time of the next try (waiting: no upstream)
    try_timeout: float | None = None  # seconds each try may take
    try_deadline: float | None = None  # clock time the current try's time runs out
    held: list[Header] | None = None  # the forwarded head, held for an injected delay
    held_key: object = None  # ... and the upstream it goes to
    send_at: float | None = None  # clock time the held head is sent
    mirror: bool = False  # a copy is owed once the request is complete
    parked: bool = False  # held until ``unpark`` names its upstream
    # The try's head reached its upstream's own proxy, which answered it there (``admit``):
    # sent as far as a copy goes, as a head a far node answers was.
    answered_there: bool = False

    @property
    def keeps_request(self) -> bool:
        """Are the head and body kept (to send again, or to copy)?"""
        return self.retries is not None or self.resend is not None or self.mirror


def move_queued(
    queue: deque[tuple[bytes, int]], conn: GracefulH2Connection, stream_id: int, *, end: bool
) -> tuple[int, bool]:
    """Send what ``queue`` holds on ``stream_id`` as far as the send windows allow, ending the
    stream with the last bytes if ``end``. Returns the window bytes (padding included) now
    forwarded, to be acknowledged to the sender, and whether the stream was ended."""
    acknowledged = 0
    while queue:
        data, flow = queue[0]
        last = end and len(queue) == 1
        if not data:
            queue.popleft()
            acknowledged += flow
            if last:
                conn.end_stream(stream_id)
                return acknowledged, True
            continue
        n = min(len(data), conn.local_flow_control_window(stream_id), conn.max_outbound_frame_size)
        if n <= 0:
            break
        if n < len(data):
            send_data_on(conn, stream_id, data[:n], end_stream=False)
            queue[0] = (data[n:], flow - n)
            acknowledged += n
        else:
            send_data_on(conn, stream_id, data, end_stream=last)
            queue.popleft()
            acknowledged += flow
            if last:
                return acknowledged, True
    return acknowledged, False
