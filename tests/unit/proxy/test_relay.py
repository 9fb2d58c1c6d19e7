"""The callback relay: bytes both ways, half-close, backpressure, errors, cancellation, for
socket <-> socket and socket <-> tunnel stream."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Iterator

import pytest

from agent.proxy import relay
from agent.proxy.h2wire import HboneSettings
from agent.proxy.relay import relay_sockets, relay_tunnel, start_sockets, start_tunnel
from agent.proxy.tunnel import TunnelError, TunnelStream
from agent.telemetry.records import ConnectionRecord
from tests.unit.proxy.recvs import recv_exactly, recv_to_eof
from tests.unit.proxy.test_connection_setup import RegisteringLoop
from tests.unit.proxy.test_tunnel_direct import settle, tunnel

# More than a stream's window, its HIGH_WATER and the socket buffers take: a sender that stalls.
BEYOND = 4 * HboneSettings().stream_window


def record() -> ConnectionRecord:
    return ConnectionRecord(direction="outbound", source="10.0.0.1:1000", destination="10.0.0.2:80")


@pytest.fixture
def pairs() -> Iterator[tuple[socket.socket, socket.socket, socket.socket, socket.socket]]:
    """(client, relay's client side, relay's upstream side, upstream): two socketpairs."""
    client, near = socket.socketpair()
    far, upstream = socket.socketpair()
    for s in (client, near, far, upstream):
        s.setblocking(False)
    try:
        yield client, near, far, upstream
    finally:
        for s in (client, near, far, upstream):
            s.close()


def test_sockets_copy_both_ways_and_end_on_both_half_closes(
    pairs: tuple[socket.socket, ...],
) -> None:
    client, near, far, upstream = pairs

    async def main() -> None:
        rec = record()
        task = asyncio.create_task(relay_sockets(near, far, rec))
        client.send(b"ping")
        assert await recv_exactly(upstream, 4) == b"ping"
        upstream.send(b"pong!")
        assert await recv_exactly(client, 5) == b"pong!"
        client.shutdown(socket.SHUT_WR)
        assert await recv_to_eof(upstream) == b""
        assert not task.done()  # the other direction still flows
        upstream.send(b"late")
        upstream.shutdown(socket.SHUT_WR)
        assert await recv_to_eof(client) == b"late"
        await asyncio.wait_for(task, 5)
        assert (rec.bytes_sent, rec.bytes_received) == (4, 9)

    asyncio.run(main())


def test_sockets_a_slow_reader_stops_its_writer_and_gets_every_byte(
    pairs: tuple[socket.socket, ...],
) -> None:
    client, near, far, upstream = pairs
    payload = bytes(range(256)) * 16 * 1024  # 4 MiB: far more than the socket buffers hold

    async def main() -> None:
        loop = asyncio.get_running_loop()
        task = asyncio.create_task(relay_sockets(near, far, record()))
        writer = asyncio.create_task(loop.sock_sendall(client, payload))
        await asyncio.sleep(0.05)
        assert not writer.done()  # nobody reads upstream: the relay stopped reading the client
        received = await recv_exactly(upstream, len(payload))
        await asyncio.wait_for(writer, 5)
        assert received == payload
        client.shutdown(socket.SHUT_WR)
        upstream.shutdown(socket.SHUT_WR)
        await asyncio.wait_for(task, 5)

    asyncio.run(main())


def test_sockets_cancelled_relay_removes_its_callbacks(pairs: tuple[socket.socket, ...]) -> None:
    client, near, far, _upstream = pairs

    async def main() -> None:
        task = asyncio.create_task(relay_sockets(near, far, record()))
        await settle()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        client.send(b"after")
        await settle()
        assert near.recv(100) == b"after"  # nobody read it: the reader is gone

    asyncio.run(main())


def test_sockets_an_error_ends_the_relay_with_it(pairs: tuple[socket.socket, ...]) -> None:
    client, near, far, upstream = pairs

    async def main() -> None:
        task = asyncio.create_task(relay_sockets(near, far, record()))
        await settle()
        upstream.close()  # the relay's send to it fails
        client.send(b"x" * 100)
        for _ in range(3):
            client.send(b"x" * 100)
            await asyncio.sleep(0.01)
        with pytest.raises(OSError):
            await asyncio.wait_for(task, 5)

    asyncio.run(main())


@pytest.fixture
def pod() -> Iterator[tuple[socket.socket, socket.socket]]:
    """(relay's socket, the pod or client at its other end)."""
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    try:
        yield a, b
    finally:
        a.close()
        b.close()


def test_tunnel_copies_both_ways_and_ends_cleanly(
    pod: tuple[socket.socket, socket.socket],
) -> None:
    sock, peer = pod

    async def main() -> None:
        sender, receiver = await tunnel()
        rec = record()
        task = asyncio.create_task(relay_tunnel(sock, receiver, rec, outbound=True))
        peer.send(b"request")
        await settle()
        assert await asyncio.wait_for(sender.read(), 5) == b"request"
        sender.consumed(7)
        await sender.write(b"response")
        assert await recv_exactly(peer, 8) == b"response"
        sender.write_eof()
        assert await recv_to_eof(peer) == b""
        peer.shutdown(socket.SHUT_WR)
        assert await asyncio.wait_for(sender.read(), 5) is None
        await asyncio.wait_for(task, 5)
        assert receiver.complete
        assert (rec.bytes_sent, rec.bytes_received) == (7, 8)

    asyncio.run(main())


def test_tunnel_bytes_queued_before_the_relay_are_written_first(
    pod: tuple[socket.socket, socket.socket],
) -> None:
    sock, peer = pod

    async def main() -> None:
        sender, receiver = await tunnel()
        await sender.write(b"early")
        sender.write_eof()
        await settle()
        task = asyncio.create_task(relay_tunnel(sock, receiver, record(), outbound=False))
        assert await recv_to_eof(peer) == b"early"
        peer.shutdown(socket.SHUT_WR)
        await asyncio.wait_for(task, 5)

    asyncio.run(main())


def test_tunnel_a_pod_that_does_not_read_closes_the_window_and_loses_nothing(
    pod: tuple[socket.socket, socket.socket],
) -> None:
    sock, peer = pod
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    payload = bytes(range(256)) * 4 * 1024  # 1 MiB: more than a stream window

    async def main() -> None:
        sender, receiver = await tunnel()
        task = asyncio.create_task(relay_tunnel(sock, receiver, record(), outbound=False))
        writer = asyncio.create_task(sender.write(payload))
        await asyncio.sleep(0.05)
        # The window is given back only for what the pod's socket took: the rest waits in the
        # sender's queue, not in the receiver's.
        assert sum(map(len, receiver._chunks or ())) <= receiver.proto.codec.settings.stream_window
        received = await recv_exactly(peer, len(payload))
        await asyncio.wait_for(writer, 5)
        assert received == payload
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    asyncio.run(main())


def test_tunnel_a_full_stream_stops_reading_the_socket_until_it_has_room(
    pod: tuple[socket.socket, socket.socket],
) -> None:
    sock, peer = pod
    payload = bytes(range(256)) * (BEYOND // 256)  # beyond the windows and HIGH_WATER

    async def main() -> None:
        loop = asyncio.get_running_loop()
        sender, receiver = await tunnel()
        task = asyncio.create_task(relay_tunnel(sock, receiver, record(), outbound=True))
        writer = asyncio.create_task(loop.sock_sendall(peer, payload))
        await asyncio.sleep(0.05)
        assert not writer.done()  # the far side does not read: the relay stopped reading
        got = bytearray()
        while len(got) < len(payload):
            chunk = await asyncio.wait_for(sender.read(), 5)
            assert chunk is not None
            got += chunk
            sender.consumed(len(chunk))
        await asyncio.wait_for(writer, 5)
        assert bytes(got) == payload
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    asyncio.run(main())


def test_tunnel_a_reset_stream_ends_the_relay_with_its_error(
    pod: tuple[socket.socket, socket.socket],
) -> None:
    sock, _peer = pod

    async def main() -> None:
        sender, receiver = await tunnel()
        task = asyncio.create_task(relay_tunnel(sock, receiver, record(), outbound=False))
        await settle()
        sender.reset()
        with pytest.raises(TunnelError):
            await asyncio.wait_for(task, 5)
        assert receiver.waker is None and receiver._sink is None  # nothing left registered

    asyncio.run(main())


def test_tunnel_a_full_stream_keeps_asking_to_be_woken_until_it_has_room(
    pod: tuple[socket.socket, socket.socket],
) -> None:
    """A WINDOW_UPDATE that leaves the stream above its high-water mark wakes the relay, which
    must ask again to be woken by the next one: otherwise it would resume only once the whole
    queue drained, and a bulk flow would stop and go (300 MiB through the loopback mesh took
    7.5-13 s instead of 3.4-4.5 s)."""
    sock, peer = pod
    payload = bytes(range(256)) * (BEYOND // 256)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        sender, _receiver = await tunnel()
        task = asyncio.create_task(relay_tunnel(sock, sender, record(), outbound=True))
        writer = asyncio.create_task(loop.sock_sendall(peer, payload))
        await asyncio.sleep(0.05)
        proto = sender.proto
        assert not sender.can_write()  # paused: the peer granted no more window
        proto.data_received(b"")  # woken (as by a WINDOW_UPDATE) while still full
        assert proto.writers_waiting
        writer.cancel()
        task.cancel()
        await asyncio.gather(writer, task, return_exceptions=True)

    asyncio.run(main())


def test_tunnel_an_unexpected_codec_error_ends_the_relay_with_it(
    pod: tuple[socket.socket, socket.socket], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Raised inside a callback, it would otherwise go to the event loop's handler and leave the
    relay waiting forever with its reader still registered."""
    sock, peer = pod

    async def main() -> None:
        sender, _receiver = await tunnel()

        def broken(_stream: TunnelStream, _data: object) -> None:
            raise RuntimeError("codec failed")

        monkeypatch.setattr(TunnelStream, "write_now", broken)
        task = asyncio.create_task(relay_tunnel(sock, sender, record(), outbound=True))
        peer.send(b"x")
        with pytest.raises(RuntimeError, match="codec failed"):
            await asyncio.wait_for(task, 5)

    asyncio.run(main())


class _Closer:
    """An ``Owner`` as the proxy's: closes the socket ends once the relay ended cleanly."""

    def __init__(self) -> None:
        self.ended: list[asyncio.Future[None]] = []

    def relay_ended(
        self,
        done: asyncio.Future[None],
        rec: ConnectionRecord,
        sock: socket.socket,
        peer: socket.socket | TunnelStream,
    ) -> None:
        self.ended.append(done)
        sock.close()
        if isinstance(peer, socket.socket):
            peer.close()


@pytest.fixture
def shutdowns(monkeypatch: pytest.MonkeyPatch) -> list[socket.socket]:
    calls: list[socket.socket] = []
    shut = relay._shutdown_write

    def counting(sock: socket.socket) -> None:
        calls.append(sock)
        shut(sock)

    monkeypatch.setattr(relay, "_shutdown_write", counting)
    return calls


def test_sockets_a_detached_relay_leaves_its_last_half_close_to_the_owners_close(
    pairs: tuple[socket.socket, ...], shutdowns: list[socket.socket]
) -> None:
    """The first end is passed on as a half-close (the other direction still flows); the
    last is the owner's ``close``, which sends the FIN itself: one ``shutdown`` fewer."""
    client, near, far, upstream = pairs

    async def main() -> None:
        owner = _Closer()
        start_sockets(near, far, record(), owner)
        client.shutdown(socket.SHUT_WR)
        assert await recv_to_eof(upstream) == b""
        upstream.send(b"late")
        upstream.shutdown(socket.SHUT_WR)
        assert await recv_to_eof(client) == b"late"
        assert shutdowns == [far]
        assert owner.ended and owner.ended[0].result() is None

    asyncio.run(main())


def test_sockets_an_awaited_relay_half_closes_both_ends(
    pairs: tuple[socket.socket, ...], shutdowns: list[socket.socket]
) -> None:
    """Its caller may do more before it closes: every end is passed on as a half-close."""
    client, near, far, upstream = pairs

    async def main() -> None:
        task = asyncio.create_task(relay_sockets(near, far, record()))
        client.shutdown(socket.SHUT_WR)
        upstream.shutdown(socket.SHUT_WR)
        await asyncio.wait_for(task, 5)
        assert sorted(s.fileno() for s in shutdowns) == sorted([near.fileno(), far.fileno()])
        assert await recv_to_eof(client) == b""

    asyncio.run(main())


def test_tunnel_a_detached_relay_leaves_its_last_half_close_to_the_owners_close(
    pod: tuple[socket.socket, socket.socket], shutdowns: list[socket.socket]
) -> None:
    """The source's client socket: the client's end went into the tunnel first; the far
    end's END_STREAM, the last, reaches the client as the owner's close."""
    sock, peer = pod

    async def main() -> None:
        sender, receiver = await tunnel()
        owner = _Closer()
        start_tunnel(sock, receiver, record(), owner, outbound=True)
        peer.shutdown(socket.SHUT_WR)
        assert await asyncio.wait_for(sender.read(), 5) is None
        await sender.write(b"response")
        sender.write_eof()
        assert await recv_to_eof(peer) == b"response"
        assert shutdowns == []
        assert owner.ended and owner.ended[0].result() is None
        assert receiver.complete

    asyncio.run(main())


@pytest.mark.parametrize("outbound", [True, False], ids=["source", "destination"])
def test_tunnel_relay_times_the_first_upstream_byte_once(
    pod: tuple[socket.socket, socket.socket], outbound: bool
) -> None:
    """``first_byte`` (traffic control's latency sample) is the time of the first byte from
    upstream: from the stream at the source (``outbound``), from the socket at the
    destination; bytes the other way, and later ones, leave it as it is."""
    sock, peer = pod

    async def main() -> None:
        sender, receiver = await tunnel()
        rec = record()
        task = asyncio.create_task(relay_tunnel(sock, receiver, rec, outbound=outbound))
        before = time.monotonic()
        peer.send(b"from the socket")
        await settle()
        assert await asyncio.wait_for(sender.read(), 5) == b"from the socket"
        sender.consumed(15)
        if outbound:
            assert rec.first_byte == 0.0
        else:
            assert before <= rec.first_byte <= time.monotonic()
        await sender.write(b"stream")
        assert await recv_exactly(peer, 6) == b"stream"
        first = rec.first_byte
        assert first >= before
        await asyncio.sleep(0.01)
        await sender.write(b"stream")
        assert await recv_exactly(peer, 6) == b"stream"
        peer.send(b"more")
        await settle()
        assert rec.first_byte == first
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    asyncio.run(main())


def test_sockets_a_relay_removes_only_what_it_registered(
    pairs: tuple[socket.socket, ...],
) -> None:
    """A same-node connection's relay over its whole life (bytes both ways, both ends, the
    stop): each direction's reader added once and removed at its end, and the stop removes
    nothing more (each uvloop call checks the descriptor against its transports, raising and
    catching a ``KeyError``; the stop removed both directions' readers and writers again,
    four calls for nothing). Backpressure still swaps a reader for a writer and back, and a
    stop in the middle removes what is registered then."""
    client, near, far, upstream = pairs
    loop = RegisteringLoop()

    async def main() -> None:
        owner = _Closer()
        start_sockets(near, far, record(), owner)
        client.send(b"ping")
        assert await recv_exactly(upstream, 4) == b"ping"
        upstream.send(b"pong")
        assert await recv_exactly(client, 4) == b"pong"
        client.shutdown(socket.SHUT_WR)
        assert await recv_to_eof(upstream) == b""
        upstream.shutdown(socket.SHUT_WR)
        assert await recv_to_eof(client) == b""
        assert owner.ended and owner.ended[0].result() is None

    try:
        loop.run_until_complete(main())
    finally:
        loop.close()
    assert loop.calls == ["add_reader", "add_reader", "remove_reader", "remove_reader"]


def test_sockets_a_relay_stopped_while_held_back_removes_its_writer() -> None:
    """A direction whose destination was full holds a writer instead of its reader; a stop
    then (a cancelled relay) removes that writer and the other direction's reader."""
    client, near = socket.socketpair()
    far, upstream = socket.socketpair()
    for s in (client, near, far, upstream):
        s.setblocking(False)
    loop = RegisteringLoop()

    async def main() -> None:
        task = asyncio.ensure_future(relay_sockets(near, far, record()))
        while True:  # upstream reads nothing: the relay ends up holding bytes for it
            try:
                client.send(b"x" * 65536)
            except BlockingIOError:
                break
            await asyncio.sleep(0)
        for _ in range(50):
            if loop.calls.count("add_writer"):
                break
            await asyncio.sleep(0.01)
        assert loop.calls.count("add_writer") == 1
        loop.calls.clear()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    try:
        loop.run_until_complete(main())
    finally:
        loop.close()
        for s in (client, near, far, upstream):
            s.close()
    assert sorted(loop.calls) == ["remove_reader", "remove_writer"]
