"""What opening one proxied connection costs, counted (never timed): the upstream connect runs
in the caller's task without resolving its numeric address, an upstream socket is non-blocking
from ``socket`` itself, a transparent one leaves its port to ``connect`` (no bind-time search of
the port range), the peer's SPIFFE ID is read from its certificate once per HBONE connection,
not once per stream, and what several streams write in one pass of the loop goes out in one
write on their HBONE connection."""

from __future__ import annotations

import asyncio
import errno
import fcntl
import os
import socket
from collections.abc import Callable, Coroutine, Generator
from typing import Any

import pytest
import uvloop

from agent.base.accepted import AcceptedSocket, accepting
from agent.identity.tls import PeerIdentityError
from agent.proxy import hbone_events as ev
from agent.proxy import relay, sockets
from agent.proxy.hbone import HboneConnection
from agent.proxy.tunnel import HboneProtocol, TunnelStream
from agent.telemetry.records import OUTBOUND, ConnectionRecord
from tests.unit.proxy.memtransport import MemoryTransport


def test_the_upstream_connect_creates_no_task() -> None:
    created: list[object] = []

    def factory(
        loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, Any] | Generator[Any, None, Any]
    ) -> asyncio.Task[Any]:
        created.append(coro)
        return asyncio.Task(coro, loop=loop)  # type: ignore[arg-type]

    async def main() -> None:
        with socket.create_server(("127.0.0.1", 0)) as server:
            asyncio.get_running_loop().set_task_factory(factory)
            created.clear()
            sock = await sockets.connect(server.getsockname(), mark=0, timeout=5.0)
            with sock:
                assert sock.getpeername() == server.getsockname()
        assert created == []

    asyncio.run(main())


class _CountingLoop(uvloop.Loop):
    """uvloop's loop, counting what an upstream connect asks of it beyond the connect."""

    def __init__(self) -> None:
        super().__init__()
        self.asked: list[str] = []

    async def getaddrinfo(self, *args: Any, **kwargs: Any) -> Any:
        self.asked.append("getaddrinfo")
        return await super().getaddrinfo(*args, **kwargs)

    def run_in_executor(self, executor: Any, func: Any, *args: Any) -> Any:  # type: ignore[override]
        self.asked.append("run_in_executor")
        return super().run_in_executor(executor, func, *args)


def test_the_upstream_connect_resolves_nothing() -> None:
    """uvloop's ``sock_connect`` ran ``getaddrinfo`` in libuv's thread pool for the numeric
    address of every upstream connect (a future, a worker thread, the loop woken back); the
    proxy's connect goes straight to ``connect``, and a refused one still raises its error."""
    loop = _CountingLoop()

    async def main() -> None:
        with socket.create_server(("127.0.0.1", 0)) as server:
            sock = await sockets.connect(server.getsockname(), mark=0, timeout=5.0)
            with sock:
                assert sock.getpeername() == server.getsockname()
            port = server.getsockname()[1]
        with pytest.raises(ConnectionRefusedError):
            await sockets.connect(("127.0.0.1", port), mark=0, timeout=5.0)

    try:
        loop.run_until_complete(main())
    finally:
        loop.close()
    assert loop.asked == []


def test_a_transparent_upstream_socket_gets_its_port_from_connect() -> None:
    """``bind((client_ip, 0))`` must not choose the port: that searches the range for one no
    socket on the address holds (TIME_WAIT ones too), per connection. Bound with
    ``IP_BIND_ADDRESS_NO_PORT`` the port stays 0 until ``connect`` picks one for the pair."""
    if os.geteuid() != 0:
        pytest.skip("IP_TRANSPARENT needs root")

    async def main() -> None:
        with socket.create_server(("127.0.0.1", 0)) as server:
            sock = sockets.upstream_socket(0, source_ip="127.0.0.2")
            with sock:
                assert sock.getsockname() == ("127.0.0.2", 0)
                await asyncio.get_running_loop().sock_connect(sock, server.getsockname())
                accepted, peer = server.accept()
                with accepted:
                    assert peer == sock.getsockname()
                    assert peer[0] == "127.0.0.2" and peer[1] != 0

    asyncio.run(main())


def test_an_upstream_socket_is_non_blocking_from_its_creation(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``SOCK_NONBLOCK`` at ``socket``: no ``setblocking`` call afterwards (an ``ioctl`` per
    connection), and the descriptor and the Python object are both non-blocking."""
    calls: list[object] = []
    monkeypatch.setattr(socket.socket, "setblocking", lambda self, flag: calls.append(flag))
    with sockets.upstream_socket(0) as sock:
        assert sock.gettimeout() == 0.0
        assert fcntl.fcntl(sock.fileno(), fcntl.F_GETFL) & os.O_NONBLOCK
        assert sock.type == socket.SOCK_STREAM
    assert calls == []


def test_an_upstream_connect_past_its_timeout_raises_timeout_error() -> None:
    async def main() -> None:
        # A listener that never accepts, its queue filled: the next SYN is dropped, so the
        # connect waits until the timeout.
        with socket.create_server(("127.0.0.1", 0), backlog=0) as server:
            held = []
            try:
                for _ in range(4):
                    c = socket.socket()
                    c.setblocking(False)
                    c.connect_ex(server.getsockname())
                    held.append(c)
                with pytest.raises(TimeoutError):
                    await sockets.connect(server.getsockname(), mark=0, timeout=0.3)
            finally:
                for c in held:
                    c.close()

    asyncio.run(main())


class _SSLObject:
    def __init__(self, uris: list[str]) -> None:
        self.uris = uris
        self.reads = 0

    def getpeercert(self) -> dict[str, Any]:
        self.reads += 1
        return {"subjectAltName": tuple(("URI", u) for u in self.uris)}


class _TlsTransport(MemoryTransport):
    def __init__(self, peer: asyncio.Protocol, ssl_object: _SSLObject) -> None:
        super().__init__(peer)
        self.ssl_object = ssl_object

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.ssl_object if name == "ssl_object" else default


def _protocol(ssl_object: _SSLObject) -> HboneProtocol:
    proto = HboneProtocol(HboneConnection(client_side=False))
    proto.connection_made(
        _TlsTransport(HboneProtocol(HboneConnection(client_side=True)), ssl_object)
    )
    return proto


def test_a_captured_connections_source_is_the_address_accept_returned(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No ``getpeername`` per captured connection: the source is what ``accept`` returned."""

    def unasked(sock: socket.socket) -> None:
        raise AssertionError("getpeername called")

    monkeypatch.setattr(AcceptedSocket, "getpeername", unasked)
    with (
        socket.create_server(("127.0.0.1", 0)) as server,
        socket.create_connection(server.getsockname()) as client,
        accepting(server)() as conn,
    ):
        got = sockets.captured_addresses(conn, ("127.0.2.1", 80))
        assert got == (*client.getsockname(), "127.0.2.1", 80)


def test_the_peer_identity_is_read_once_per_connection() -> None:
    async def main() -> None:
        ssl_object = _SSLObject(["spiffe://cluster.local/ns/a/sa/client"])
        proto = _protocol(ssl_object)
        for _ in range(3):  # one call per stream
            assert proto.peer_identity() == "spiffe://cluster.local/ns/a/sa/client"
        assert ssl_object.reads == 1

    asyncio.run(main())


def test_a_peer_without_an_identity_is_refused_on_every_stream() -> None:
    async def main() -> None:
        ssl_object = _SSLObject(["spiffe://cluster.local/ns/a/sa/x", "https://example.com"])
        proto = _protocol(ssl_object)
        for _ in range(2):
            with pytest.raises(PeerIdentityError, match="2 URI SANs"):
                proto.peer_identity()
        assert ssl_object.reads == 1

    asyncio.run(main())


class _CountingTransport(MemoryTransport):
    """Counts the writes (TLS records and sends, on a real connection) and keeps the bytes."""

    def __init__(self, peer: asyncio.Protocol) -> None:
        super().__init__(peer)
        self.writes: list[bytes] = []

    def write(self, data: Any) -> None:
        self.writes.append(bytes(data))
        super().write(data)

    def close(self) -> None:
        self.writes.append(b"<close>")
        super().close()


def _ends_stream(data: bytes, stream_id: int) -> bool:
    """Does ``data`` (whole frames) hold a frame with END_STREAM for ``stream_id``?"""
    at = 0
    while at + 9 <= len(data):
        length = int.from_bytes(data[at : at + 3], "big")
        kind, flags = data[at + 3], data[at + 4]
        sid = int.from_bytes(data[at + 5 : at + 9], "big") & 0x7FFFFFFF
        if sid == stream_id and kind in (0, 1) and flags & 1:
            return True
        at += 9 + length
    return False


async def _pair() -> tuple[HboneProtocol, _CountingTransport, dict[int, TunnelStream]]:
    accepted: dict[int, TunnelStream] = {}

    def on_request(proto: HboneProtocol, event: ev.TunnelRequested) -> None:
        accepted[event.stream_id] = proto.streams[event.stream_id]
        proto.codec.respond(event.stream_id, 200)
        proto.flush()

    client = HboneProtocol(HboneConnection(client_side=True))
    server = HboneProtocol(HboneConnection(client_side=False), on_request=on_request)
    to_server, to_client = _CountingTransport(server), MemoryTransport(client)
    to_server.other, to_client.other = to_client, to_server
    server.connection_made(to_client)
    client.connection_made(to_server)
    return client, to_server, accepted


def test_streams_written_in_one_pass_of_the_loop_share_one_write() -> None:
    """Three streams' bytes and ends, written by their relays in one pass of the loop (as the
    relays' socket callbacks do), go out in one write, in order, and all arrive."""

    async def main() -> None:
        client, to_server, accepted = await _pair()
        streams = [await client.open("10.0.0.2:80", None) for _ in range(3)]
        await asyncio.sleep(0)
        to_server.writes.clear()
        for n, stream in enumerate(streams):
            assert stream.try_write(b"%d" % n * 100)
            stream.write_eof()
        assert to_server.writes == []  # nothing yet: at the end of the pass
        await asyncio.sleep(0)
        assert len(to_server.writes) == 1
        for n, stream in enumerate(streams):
            far = accepted[stream.stream_id]
            for _ in range(20):
                if far.eof:
                    break
                await asyncio.sleep(0)
            assert await far.read() == b"%d" % n * 100
            assert await far.read() is None

    asyncio.run(main())


def test_a_draining_connection_sends_the_last_streams_end_before_it_closes() -> None:
    """The last stream of a connection going away ends cleanly: its END_STREAM, still waiting
    for the end of the loop's pass, is written before the transport is closed."""

    async def main() -> None:
        client, to_server, accepted = await _pair()
        stream = await client.open("10.0.0.2:80", None)
        await asyncio.sleep(0)
        accepted[stream.stream_id].write_eof()
        client.goaway()
        for _ in range(20):
            if stream.eof:
                break
            await asyncio.sleep(0)
        assert stream.eof
        to_server.writes.clear()
        stream.write_eof()
        client.finish(stream)  # both halves ended: no reset; the connection closes now
        assert to_server.writes[-1] == b"<close>"
        assert any(_ends_stream(w, stream.stream_id) for w in to_server.writes[:-1])

    asyncio.run(main())


def test_a_streams_end_wakes_no_other_stream() -> None:
    """A tunnel's END_STREAM with nothing queued is no drain: the other streams of the
    connection are not woken (every end of every tunnel woke them all, eight or so per
    connection under the connection-rate load), and the end still arrives."""

    class _Waker:
        def __init__(self) -> None:
            self.woken = 0

        def stream_changed(self) -> None:
            self.woken += 1

        def delivered(self, n: int) -> None:
            pass

    async def main() -> None:
        client, _to_server, accepted = await _pair()
        ending, *others = [await client.open("10.0.0.2:80", None) for _ in range(3)]
        await asyncio.sleep(0)
        wakers = [_Waker() for _ in others]
        for stream, waker in zip(others, wakers, strict=True):
            stream.waker = waker
        ending.write_eof()
        await asyncio.sleep(0)
        assert [w.woken for w in wakers] == [0, 0]
        far = accepted[ending.stream_id]
        for _ in range(20):
            if far.eof:
                break
            await asyncio.sleep(0)
        assert await far.read() is None

    asyncio.run(main())


class RegisteringLoop(uvloop.Loop):
    """uvloop's loop, recording the reader and writer registration calls made on it and the
    timers armed (``test_relay`` uses it too)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []
        self.timers: list[object] = []

    def add_reader(self, fd: Any, callback: Any, *args: Any) -> None:
        self.calls.append("add_reader")
        super().add_reader(fd, callback, *args)

    def add_writer(self, fd: Any, callback: Any, *args: Any) -> None:
        self.calls.append("add_writer")
        super().add_writer(fd, callback, *args)

    def remove_reader(self, fd: Any) -> bool:
        self.calls.append("remove_reader")
        return bool(super().remove_reader(fd))

    def remove_writer(self, fd: Any) -> bool:
        self.calls.append("remove_writer")
        return bool(super().remove_writer(fd))

    def call_later(  # type: ignore[override]
        self, delay: float, callback: Any, *args: Any, context: Any = None
    ) -> asyncio.TimerHandle:
        self.timers.append(callback)
        return super().call_later(delay, callback, *args, context=context)  # type: ignore[no-any-return]


def _in_one_step(
    loop: RegisteringLoop, connect: Callable[[], Coroutine[Any, Any, socket.socket]]
) -> socket.socket | BaseException:
    """What ``connect()`` ended with in the first step of its coroutine (its socket or what it
    raised), with nothing registered and no timer armed meanwhile. The kernel runs a loopback
    handshake inside the ``connect`` call unless it leaves its softirq work to ``ksoftirqd``
    (a loaded machine, now and then): up to ten connects are tried for one that finished so;
    one that waits is closed. On main none finishes in its first step."""
    for _ in range(10):
        loop.calls.clear()
        loop.timers.clear()
        coro = connect()
        try:
            coro.send(None)
        except StopIteration as finished:
            ended: socket.socket | BaseException = finished.value
        except OSError as e:
            ended = e
        else:
            coro.close()  # it waits: its ``finally`` removes the writer and the timer
            continue
        assert loop.calls == [] and loop.timers == []
        return ended
    raise AssertionError("no connect finished within its first step")


def test_a_connect_the_kernel_finished_within_the_call_neither_waits_nor_registers() -> None:
    """To a listener on this host (a pod behind its veth, or loopback) the kernel completes
    the handshake inside the ``connect`` call, though the call answers EINPROGRESS; asked
    again at once, it says connected. Such a connect finishes in one step of its coroutine
    (it never suspends the caller's task), with no writer, no timer and no placeholder
    reader, whether a reader is to be held or not; a refused one raises in that step too.
    On main each waited: a writer, the timeout's timer, a pass of the loop, and for a held
    reader the placeholder."""
    loop = RegisteringLoop()

    async def main() -> None:
        with socket.create_server(("127.0.0.1", 0), backlog=64) as server:
            address = server.getsockname()
            for hold in (False, True):
                sock = _in_one_step(
                    loop,
                    lambda h=hold: sockets.connect(address, mark=0, timeout=5.0, hold_reader=h),
                )
                assert isinstance(sock, socket.socket)
                with sock:
                    assert sock.getpeername() == address
                    sockets.release(sock)  # nothing held: nothing to drop
        refused = _in_one_step(
            loop, lambda: sockets.connect(address, mark=0, timeout=5.0, hold_reader=True)
        )
        assert isinstance(refused, ConnectionRefusedError)

    try:
        loop.run_until_complete(main())
    finally:
        loop.close()


def _still_under_way(sock: socket.socket, address: tuple[str, int]) -> int:
    """``sockets._asked_again`` for a peer whose handshake takes longer (another host): the
    connect waits for its socket to be writable."""
    return errno.EALREADY


def test_a_connect_still_under_way_waits_for_its_writer_within_its_timeout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """When asking again finds the handshake under way, the connect waits as before: a writer
    until the socket is writable, bounded by a timer, its ``SO_ERROR`` read; then it leaves
    nothing registered (no reader was to be held)."""
    monkeypatch.setattr(sockets, "_asked_again", _still_under_way)
    loop = RegisteringLoop()

    async def main() -> None:
        with socket.create_server(("127.0.0.1", 0)) as server:
            sock = await sockets.connect(server.getsockname(), mark=0, timeout=5.0)
            with sock:
                assert sock.getpeername() == server.getsockname()

    try:
        loop.run_until_complete(main())
    finally:
        loop.close()
    assert loop.calls == ["add_writer", "remove_writer"]
    assert loop.timers == [sockets._wake]


def test_a_held_reader_nobody_takes_over_steps_aside_and_loses_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``connect(hold_reader=True)`` that had to wait leaves a placeholder reader for the
    relay to take over; if the loop polls before anyone does, the placeholder removes itself
    (no busy loop on a readable socket) and the bytes wait in the socket."""
    runs: list[int] = []
    unclaimed = sockets._unclaimed

    def counting(loop: asyncio.AbstractEventLoop, fd: int) -> None:
        runs.append(fd)
        unclaimed(loop, fd)

    monkeypatch.setattr(sockets, "_unclaimed", counting)
    monkeypatch.setattr(sockets, "_asked_again", _still_under_way)

    async def main() -> None:
        with socket.create_server(("127.0.0.1", 0)) as server:
            sock = await sockets.connect(
                server.getsockname(), mark=0, timeout=5.0, hold_reader=True
            )
            accepted, _ = server.accept()
            with accepted:
                accepted.sendall(b"first")
                for _ in range(20):  # polls: the placeholder runs once, then is gone
                    await asyncio.sleep(0.01)
                assert runs == [sock.fileno()]
                assert sock.recv(16) == b"first"
                sockets.release(sock)
                assert sock.fileno() == -1

    uvloop.run(main())


def test_a_tunnel_relay_takes_the_loop_from_its_stream(monkeypatch: pytest.MonkeyPatch) -> None:
    """Starting a tunnel relay does not look the running loop up (a ``getpid`` system call
    per look-up on Python 3.11, twice per cross-node connection): its stream's protocol has it."""

    class _Owner:
        def relay_ended(self, *args: object) -> None:
            pass

    async def main() -> None:
        client, _, _ = await _pair()
        stream = await client.open("10.0.0.2:80", None)
        a, b = socket.socketpair()
        a.setblocking(False)
        looked_up: list[object] = []
        running = asyncio.get_running_loop

        def counting() -> asyncio.AbstractEventLoop:
            looked_up.append(1)
            return running()

        monkeypatch.setattr(asyncio, "get_running_loop", counting)
        done = relay.start_tunnel(
            a, stream, ConnectionRecord(OUTBOUND, "a", "b"), _Owner(), outbound=True
        )
        monkeypatch.setattr(asyncio, "get_running_loop", running)
        assert looked_up == []
        done.cancel()
        await asyncio.sleep(0)
        a.close()
        b.close()

    asyncio.run(main())


def test_a_tunnel_relays_reader_and_writer_are_asked_for_only_when_they_change(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Over a tunnel relay's whole life (bytes both ways, both ends, the stop), every call that
    turns its socket's reader or writer on or off changes it: the stop and a drained write do
    not call them to find nothing to do (two or three calls per side of every connection)."""
    calls: list[tuple[str, bool, bool]] = []
    read, write = relay._TunnelRelay._read, relay._TunnelRelay._write

    def counting_read(self: Any, on: bool) -> None:
        calls.append(("read", on, self._reading))
        read(self, on)

    def counting_write(self: Any, on: bool) -> None:
        calls.append(("write", on, self._writing))
        write(self, on)

    monkeypatch.setattr(relay._TunnelRelay, "_read", counting_read)
    monkeypatch.setattr(relay._TunnelRelay, "_write", counting_write)

    class _Owner:
        def __init__(self) -> None:
            self.ended = 0

        def relay_ended(
            self, done: object, record: object, sock: socket.socket, *_: object
        ) -> None:
            self.ended += 1
            sock.close()  # as the proxies' owners do (the relay leaves its last FIN to it)

    async def main() -> None:
        client, _, accepted = await _pair()
        stream = await client.open("10.0.0.2:80", None)
        far = accepted[stream.stream_id]
        a, b = socket.socketpair()
        a.setblocking(False)
        b.setblocking(False)
        owner = _Owner()
        done = relay.start_tunnel(
            a, stream, ConnectionRecord(OUTBOUND, "a", "b"), owner, outbound=True
        )
        loop = asyncio.get_running_loop()
        await loop.sock_sendall(b, b"x" * 100)
        assert await far.read() == b"x" * 100
        far.consumed(100)
        await far.write(b"y" * 100)
        assert await loop.sock_recv(b, 200) == b"y" * 100
        b.shutdown(socket.SHUT_WR)
        assert await far.read() is None
        far.write_eof()
        await asyncio.wait_for(done, 10)
        assert owner.ended == 1
        assert await loop.sock_recv(b, 10) == b""
        b.close()

    asyncio.run(asyncio.wait_for(main(), 30))
    assert calls, "the relay never registered its reader"
    assert all(on != was for _, on, was in calls), calls
