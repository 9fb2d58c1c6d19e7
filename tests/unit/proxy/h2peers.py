"""An ``H2Proxy`` between an ``h2`` client and an ``h2`` pod, all in memory (sans-IO tests)."""

from __future__ import annotations

from collections.abc import Sequence

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.events import Event

from agent.proxy.h2limits import H2Limits
from agent.proxy.h2proxy import H2Proxy
from agent.proxy.h2wire import GracefulH2Connection
from agent.proxy.http1 import RequestHead, Verdict

Header = tuple[bytes, bytes]


def peer(*, client_side: bool, graceful: bool = False) -> H2Connection:
    """An ``h2`` peer; ``graceful``: one that keeps its open streams at a GOAWAY, as grpcio
    does (``h2``'s own closes everything)."""
    kind = GracefulH2Connection if graceful else H2Connection
    conn = kind(H2Configuration(client_side=client_side, header_encoding=None))
    conn.initiate_connection()
    return conn


def deny_prefix(prefix: str) -> object:
    def authorize(head: RequestHead) -> Verdict:
        return Verdict(not head.path.startswith(prefix), "deny-" + prefix)

    return authorize


class Wire:
    """client <-> proxy <-> pod; ``run`` moves bytes until nothing moves, collecting events."""

    def __init__(
        self,
        *,
        deny: str = "/denied",
        limits: H2Limits | None = None,
        graceful_client: bool = False,
    ) -> None:
        self.client = peer(client_side=True, graceful=graceful_client)
        self.pod = peer(client_side=False)
        self.proxy = H2Proxy(
            deny_prefix(deny),  # type: ignore[arg-type]
            limits=limits,
            new_request_id=lambda: "rid-1",
        )
        self.client_events: list[Event] = []
        self.pod_events: list[Event] = []
        self.run()

    def run(self) -> None:
        moved = True
        while moved:
            moved = False
            out = self.client.data_to_send()
            if out and not self.proxy.closing:
                self.proxy.receive_client(out)
                moved = True
            out = self.pod.data_to_send()
            if out and not self.proxy.closing:
                self.proxy.receive_upstream(out)
                moved = True
            out = self.proxy.take_to_upstream()
            if out:
                self.pod_events += self.pod.receive_data(out)
                moved = True
            out = self.proxy.take_to_client()
            if out:
                self.client_events += self.client.receive_data(out)
                moved = True

    def request(
        self, path: str, *, grpc: bool = False, end: bool = True, extra: Sequence[Header] = ()
    ) -> int:
        sid: int = self.client.get_next_available_stream_id()
        headers = [
            (b":method", b"POST" if grpc else b"GET"),
            (b":scheme", b"http"),
            (b":authority", b"server:50051"),
            (b":path", path.encode()),
        ]
        if grpc:
            headers += [(b"content-type", b"application/grpc"), (b"te", b"trailers")]
        self.client.send_headers(sid, [*headers, *extra], end_stream=end)
        return sid

    def pod_answers_grpc(
        self, sid: int, trailers: Sequence[Header] = ((b"grpc-status", b"0"),)
    ) -> None:
        """The pod answers call ``sid`` as a gRPC server does: a head, one message, trailers
        (queued on the pod's connection: ``run`` or ``data_to_send`` takes them)."""
        self.pod.send_headers(sid, [(b":status", b"200"), (b"content-type", b"application/grpc")])
        self.pod.send_data(sid, b"\0\0\0\0\x02hi")
        self.pod.send_headers(sid, list(trailers), end_stream=True)

    def taken(self, kind: type[Event]) -> list[Event]:
        """Client-side events of one kind, removed from the list."""
        out = [e for e in self.client_events if isinstance(e, kind)]
        self.client_events = [e for e in self.client_events if not isinstance(e, kind)]
        return out
