"""A ``RequestMirror`` copy on an HTTP/2 or gRPC port: one request on a fresh h2c connection.

Why a piece of its own, sans-IO: the copy of a request that ``H2Proxy`` handed over
(``H2Mirrored``: the forwarded head, the body it kept, the trailers) goes to an endpoint of the
mirror Service on a connection of its own, never the client's upstream connections, so that
the copy can neither slow nor break the primary. ``MirrorCall`` is that connection's client:
bytes out (the preface, the head with ``:authority`` suffixed ``-shadow`` as Envoy marks shadow
traffic, the body within the peer's windows, the trailers), bytes in (the response, read and
dropped: its DATA is acknowledged at once so the peer never stalls), ``done`` once the response
ended, was reset, or the connection closed. The shell (``h2outbound``) opens the tunnel (for a
same-node endpoint, once its policy allowed ``shadow_request``), moves the bytes under a
deadline and counts the outcome (``nodemesh_http_mirrored_total``).
"""

from __future__ import annotations

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    ResponseReceived,
    StreamEnded,
    StreamReset,
)
from h2.exceptions import ProtocolError

from agent.proxy.http1 import SHADOW_SUFFIX, RequestHead

Header = tuple[bytes, bytes]


def shadow_head(head: list[Header]) -> list[Header]:
    """``head`` with ``:authority`` (and a ``host`` header, if any) suffixed ``-shadow``."""
    return [(n, v + SHADOW_SUFFIX if n in (b":authority", b"host") else v) for n, v in head]


def shadow_request(head: list[Header]) -> RequestHead:
    """What the copy's destination authorizes of it (a same-node endpoint's policy is asked by
    the shell): its method, path without the query, ``-shadow`` authority and headers."""
    block = shadow_head(head)
    pseudo = {n: v.decode("latin-1") for n, v in block if n[:1] == b":"}
    return RequestHead(
        pseudo.get(b":method", ""),
        pseudo.get(b":path", "").split("?", 1)[0],
        pseudo.get(b":authority", ""),
        "",
        headers=[(n, v) for n, v in block if n[:1] != b":"],
    )


class MirrorCall:
    """One copied request on its own h2c connection (stream 1), its response dropped."""

    def __init__(self, head: list[Header], body: bytes, trailers: list[Header] | None) -> None:
        self.conn = H2Connection(
            H2Configuration(client_side=True, header_encoding=None, validate_inbound_headers=True)
        )
        self.conn.initiate_connection()
        self.stream_id = self.conn.get_next_available_stream_id()
        self.status = 0  # the response's :status, 0 until it came
        self.done = False
        self._body, self._trailers = body, trailers
        self._sent = not body and trailers is None  # the request's end went out
        self.conn.send_headers(self.stream_id, shadow_head(head), end_stream=self._sent)
        self._pump()

    def data_to_send(self) -> bytes:
        return self.conn.data_to_send()

    def receive(self, data: bytes) -> None:
        """Bytes from the mirror endpoint; ``b""`` when it closed."""
        if self.done:
            return
        if not data:
            self.done = True
            return
        try:
            events = self.conn.receive_data(data)
        except ProtocolError:
            self.done = True
            return
        for event in events:
            if isinstance(event, ResponseReceived):
                status = dict(event.headers).get(b":status", b"0")
                self.status = int(status) if status.isdigit() else 0
            elif isinstance(event, DataReceived) and event.flow_controlled_length:
                self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, StreamEnded | StreamReset | ConnectionTerminated):
                self.done = True
        if not self.done:
            self._pump()  # a window may have opened (WINDOW_UPDATE, SETTINGS)

    def _pump(self) -> None:
        """Send what the windows allow of the body, then the request's end."""
        conn, sid = self.conn, self.stream_id
        while self._body:
            n = min(len(self._body), conn.local_flow_control_window(sid))
            n = min(n, conn.max_outbound_frame_size)
            if n <= 0:
                return
            chunk, self._body = self._body[:n], self._body[n:]
            conn.send_data(sid, chunk, end_stream=not self._body and self._trailers is None)
            if not self._body and self._trailers is None:
                self._sent = True
        if not self._sent:
            if self._trailers is not None:
                conn.send_headers(sid, self._trailers, end_stream=True)
            else:
                conn.end_stream(sid)
            self._sent = True
