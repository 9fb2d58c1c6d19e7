"""The source shell's direct path: an HBONE session's bytes handled from the connection's
callback (``deliver_directly``), a reader task only when that cannot be done.

A real ``TunnelStream`` over a fake HBONE protocol (it records what the stream writes), a
socket pair for the client: the tests play the HBONE connection's callbacks (``_on_data``,
``_on_end``) the way ``HboneProtocol.data_received`` calls them.
"""

from __future__ import annotations

import asyncio
import socket
from types import SimpleNamespace
from typing import Any, cast

from agent.proxy.budget import QueueBudget
from agent.proxy.core import ProxySettings
from agent.proxy.http_outbound import _ClientConnection, _Request
from agent.proxy.http_sessions import SessionKey, SessionPool, UpstreamSession
from agent.proxy.tunnel import TunnelStream
from agent.telemetry.records import OUTBOUND, ConnectionRecord

KEY = SessionKey("hbone", "10.244.1.2", "10.244.2.3", 9080, "default/web")
GET = b"GET /a HTTP/1.1\r\nHost: web\r\n\r\n"
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


class _Codec:
    """The HBONE codec as ``TunnelStream`` uses it: what is sent on a stream is recorded."""

    def __init__(self) -> None:
        self.sent = bytearray()
        self.queued = 0  # bytes waiting for the peer's windows (none here)

    def buffered(self, stream_id: int) -> int:
        return 0

    def send(self, stream_id: int, data: bytes) -> list[object]:
        self.sent += data
        return []

    def consumed(self, stream_id: int, n: int) -> None:
        pass


class _Proto:
    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()  # as HboneProtocol keeps it
        self.codec = _Codec()
        self.finished: list[TunnelStream] = []
        self.streams: dict[int, object] = {1: None}  # the HBONE connection's streams
        self.flushes: list[str] = []  # "now" (flush_and_wake), "soon" (flush_soon)
        self.queue_budget = QueueBudget(None)  # ``write_room`` asks it

    def out_full(self) -> bool:
        return False

    def dispatch(self, events: list[object]) -> None:
        pass

    def flush(self) -> None:
        pass

    def flush_soon(self) -> None:
        self.flushes.append("soon")

    def flush_and_wake(self) -> None:
        self.flushes.append("now")

    def charge_sent(self) -> None:  # the queue budget's charge after a write
        pass

    def finish(self, stream: TunnelStream) -> None:
        self.finished.append(stream)


class _Registry:
    def __init__(self) -> None:
        self.requests: list[tuple[int, str]] = []
        self.rejected: list[tuple[str, str]] = []

    def request_done(
        self, labels: ConnectionRecord, request: Any, *, carried_by: ConnectionRecord | None = None
    ) -> None:
        self.requests.append((request.status, request.response_flags))

    def http_rejected(self, cause: str, where: str) -> None:
        self.rejected.append((cause, where))


def _connection() -> tuple[_ClientConnection, socket.socket, SessionPool, _Registry]:
    ours, client = socket.socketpair()
    ours.setblocking(False)
    client.settimeout(5)
    registry, pool = _Registry(), SessionPool()
    # no request here reads the state
    core = SimpleNamespace(registry=registry, store=None, settings=ProxySettings())
    owner = SimpleNamespace(outbound=SimpleNamespace(core=core), sessions=pool)
    record = ConnectionRecord(OUTBOUND, "10.244.1.2:40000", "10.96.0.10:80")
    target = SimpleNamespace(service=SimpleNamespace(namespace="default", name="web"))
    conn = _ClientConnection(cast(Any, owner), ours, None, cast(Any, target), record, 1)
    return conn, client, pool, registry


async def _attached(conn: _ClientConnection) -> tuple[TunnelStream, _Proto, UpstreamSession]:
    conn.codec.receive_client(GET)
    assert conn.codec.pending is not None
    proto = _Proto()
    stream = TunnelStream(cast(Any, proto), 1)
    session = UpstreamSession(KEY, stream)
    conn._attach(session, _Request())
    assert conn._flush_now()
    assert bytes(proto.codec.sent).startswith(b"GET /a HTTP/1.1\r\n")
    return stream, proto, session


def test_a_response_is_answered_from_the_callback_and_its_session_pooled() -> None:
    async def main() -> None:
        conn, client, pool, registry = _connection()
        stream, _proto, session = await _attached(conn)
        stream._on_data(OK)  # as data_received calls it: no task runs in between
        assert client.recv(100) == b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
        assert conn.reader is None and conn.session is None  # no reader task was needed
        assert pool.take(KEY) is session  # reusable, and detached from this connection
        assert registry.requests == [(200, "-")]

    asyncio.run(main())


def test_a_refusal_is_logged_with_what_the_client_was_told() -> None:
    async def main() -> None:
        conn, client, _pool, registry = _connection()
        conn.codec.receive_client(b"GET / HTTP/2.0\r\nHost: s\r\n\r\n")
        conn._flush_now()
        assert client.recv(200).endswith(b"\r\n\r\nmalformed: HTTP version 2.0\n")
        where = "10.244.1.2:40000 -> default/web: malformed: HTTP version 2.0"
        assert registry.rejected == [("malformed", where)]

    asyncio.run(main())


def test_the_stream_ending_before_the_response_is_503_uc_by_a_reader() -> None:
    async def main() -> None:
        conn, client, pool, registry = _connection()
        stream, proto, _session = await _attached(conn)
        stream._on_end()  # the far side ended its half: no bytes for the sink to see
        assert conn.reader is not None  # the end started a reader, which reads it
        await asyncio.wait_for(conn.reader, 5)
        answer = client.recv(200)
        assert answer.startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
        assert answer.endswith(b"upstream connect error or disconnect/reset before headers\n")
        assert registry.requests == [(503, "UC")]
        assert pool.size == 0 and proto.finished == [stream]  # closed, never pooled

    asyncio.run(main())


def test_bytes_that_cannot_be_written_at_once_wait_for_a_reader_in_order() -> None:
    async def main() -> None:
        conn, client, _pool, _registry = _connection()
        stream, _proto, _session = await _attached(conn)
        big = b"x" * (4 << 20)  # more than the socket pair buffers: the client is not reading
        stream._on_data(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (len(big) + 4))
        stream._on_data(big)
        assert conn._down_backlog  # what the client did not take waits, in order
        stream._on_data(b"tail")  # not taken by the callback: queued for a reader
        assert conn.reader is not None
        client.setblocking(False)
        got, loop = bytearray(), asyncio.get_running_loop()
        while not got.endswith(b"tail"):
            got += await asyncio.wait_for(loop.sock_recv(client, 1 << 16), 5)
        assert got.count(b"x") == len(big) and got.startswith(b"HTTP/1.1 200 OK\r\n")

    asyncio.run(main())


def test_a_session_a_reader_task_served_is_read_from_the_callback_again() -> None:
    async def main() -> None:
        conn, client, pool, _registry = _connection()
        stream, _proto, session = await _attached(conn)
        conn._start_reader(session, _Request())  # as when a callback could not take bytes
        reader = conn.reader
        assert reader is not None
        await asyncio.sleep(0)  # the reader waits in read()
        stream._on_data(OK)
        await asyncio.wait_for(reader, 5)
        assert client.recv(100).endswith(b"ok") and pool.take(KEY) is session
        # The next request on the pooled session: its response comes through the callback,
        # though the reader that stopped had been handed a chunk last.
        conn.codec.receive_client(GET)
        conn._attach(session, _Request())
        assert conn._flush_now()
        stream._on_data(OK)
        assert client.recv(100) == b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
        assert conn.reader is None

    asyncio.run(main())


def test_a_request_on_the_connections_only_stream_goes_to_the_transport_at_once() -> None:
    """Before: the request's write scheduled the HBONE connection's flush for the loop's next
    pass (``flush_soon``), after whatever the callback did next. With other streams on the
    connection it still waits for the pass's end, so their writes share a TLS record."""

    async def main() -> None:
        conn, _client, _pool, _registry = _connection()
        _stream, proto, _session = await _attached(conn)
        assert proto.flushes == ["now"]
        conn, _client, _pool, _registry = _connection()
        conn.codec.receive_client(GET)
        shared = _Proto()
        shared.streams[3] = None
        conn._attach(UpstreamSession(KEY, TunnelStream(cast(Any, shared), 1)), _Request())
        assert conn._flush_now()
        assert shared.flushes == ["soon"]

    asyncio.run(main())


def test_a_requests_head_is_written_before_its_response_reader_and_timer_are_set_up() -> None:
    """Only the write is on the request's way: the sink that will take its response and the
    try's timer are set up just after it (``_watch_session``). Before, ``_attach`` did both
    ahead of the write."""

    async def main() -> None:
        conn, _client, _pool, _registry = _connection()
        conn.codec.receive_client(GET)
        proto = _Proto()
        stream = TunnelStream(cast(Any, proto), 1)
        seen: list[tuple[bool, bool]] = []
        send = proto.codec.send

        def watched(stream_id: int, data: bytes) -> list[object]:
            seen.append((stream._sink is None, conn.timer is None))
            return send(stream_id, data)

        proto.codec.send = watched  # type: ignore[method-assign]
        request = _Request(deadline=asyncio.get_running_loop().time() + 30)
        conn._attach(UpstreamSession(KEY, stream), request)
        assert conn._flush_now()
        assert seen == [(True, True)]  # neither was there when the head was written
        assert stream._sink is not None and conn.timer is not None and conn.timed is request
        conn._disarm()

    asyncio.run(main())


def test_a_response_reaches_the_client_before_its_session_is_pooled() -> None:
    """The session's settling (pooling it, or closing it) follows the client's write; before,
    it came ahead of it."""

    async def main() -> None:
        conn, client, pool, _registry = _connection()
        stream, _proto, session = await _attached(conn)
        pooled_at: list[bytes] = []
        put = pool.put

        def put_watched(s: UpstreamSession) -> None:
            client.setblocking(False)
            try:
                pooled_at.append(client.recv(100))  # what the client had by then
            except BlockingIOError:
                pooled_at.append(b"")
            put(s)

        pool.put = put_watched  # type: ignore[method-assign]
        stream._on_data(OK)
        assert pooled_at == [b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"]
        assert pool.take(KEY) is session

    asyncio.run(main())
