"""Direct delivery of tunnel bytes to the relay's socket: sent from data_received when the relay
is idle, queued for the relay otherwise, and never out of order."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from typing import Any

import pytest

from agent.proxy.h2data import window_update_frame
from agent.proxy.hbone import HboneConnection
from agent.proxy.tunnel import HboneProtocol, TunnelError, TunnelStream
from tests.unit.proxy.memtransport import MemoryTransport


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """A non-blocking socket (the relay's pod socket) and its peer (the pod)."""
    a, b = socket.socketpair()
    a.setblocking(False)
    try:
        yield a, b
    finally:
        a.close()
        b.close()


async def tunnel() -> tuple[TunnelStream, TunnelStream]:
    """An accepted stream: (client side, server side)."""
    accepted: list[TunnelStream] = []

    def on_request(proto: HboneProtocol, event: Any) -> None:
        accepted.append(proto.streams[event.stream_id])
        proto.codec.respond(event.stream_id, 200)
        proto.flush()

    client = HboneProtocol(HboneConnection(client_side=True))
    server = HboneProtocol(HboneConnection(client_side=False), on_request=on_request)
    client.connection_made(MemoryTransport(server))
    server.connection_made(MemoryTransport(client))
    stream = await asyncio.wait_for(client.open("10.0.0.2:80", None), 5)
    return stream, accepted[0]


class Counted:
    """A ``Waker`` that counts what was sent to the socket for it (as the relay does)."""

    def __init__(self) -> None:
        self.counts: list[int] = []

    def stream_changed(self) -> None:
        pass

    def delivered(self, n: int) -> None:
        self.counts.append(n)


async def settle() -> None:
    for _ in range(10):
        await asyncio.sleep(0)


def test_idle_relay_gets_bytes_sent_for_it(pair: tuple[socket.socket, socket.socket]) -> None:
    async def main() -> None:
        sender, receiver = await tunnel()
        counted = Counted()
        receiver.waker = counted
        receiver.deliver_directly(pair[0])
        await sender.write(b"hello")
        await settle()
        assert pair[1].recv(100) == b"hello"
        assert counted.counts == [5]
        assert not receiver._chunks  # nothing left for the relay to copy
        receiver.deliver_directly(None)
        await sender.write(b"queued")
        await settle()
        assert await receiver.read() == b"queued"

    asyncio.run(main())


def test_bytes_never_overtake_what_the_relay_holds(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    async def main() -> None:
        sender, receiver = await tunnel()
        sock, pod = pair
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        counted = Counted()
        receiver.waker = counted
        receiver.deliver_directly(sock)
        # 256 KiB: more than the socket takes unread, less than a stream window (this relay
        # never acknowledges what it writes)
        payload = bytes(range(256)) * 1024
        await sender.write(payload)
        await settle()
        held = await receiver.read()  # the relay holds this chunk, not yet written
        assert held is not None and 0 < len(held) < len(payload)
        assert not receiver._chunks
        pod.setblocking(False)
        received = bytearray()
        while True:  # the pod reads: the socket could take more now
            try:
                received += pod.recv(len(payload))
            except BlockingIOError:
                break
        await sender.write(b"tail")  # must queue behind ``held``, not go out directly
        await settle()
        loop = asyncio.get_running_loop()

        async def drain() -> None:
            while len(received) < len(payload) + 4:
                received.extend(await loop.sock_recv(pod, 65536))

        drainer = asyncio.create_task(drain())
        chunk: bytes | None = held
        while chunk is not None:
            await loop.sock_sendall(sock, chunk)
            counted.counts.append(len(chunk))
            chunk = await receiver.read() if receiver._chunks else None
        await asyncio.wait_for(drainer, 5)
        assert bytes(received) == payload + b"tail"
        assert sum(counted.counts) == len(payload) + 4

    asyncio.run(main())


def test_a_blocking_socket_is_refused() -> None:
    async def main() -> None:
        _, receiver = await tunnel()
        a, b = socket.socketpair()
        try:
            with pytest.raises(ValueError, match="non-blocking"):
                receiver.deliver_directly(a)
        finally:
            a.close()
            b.close()

    asyncio.run(main())


def test_a_relay_stopped_before_ending_its_half_resets_the_stream() -> None:
    """The peer half-closed, then the relay stopped (a policy re-check or the drain deadline
    cancelled it) before it ended its own half: the peer must learn the stream is over, or it
    waits for bytes that never come (a denied client hung until its own timeout)."""

    async def main() -> None:
        client, server = await tunnel()
        client.write_eof()
        await settle()
        assert server.eof
        server.proto.finish(server)
        await settle()
        with pytest.raises(TunnelError):
            await asyncio.wait_for(client.read(), 1)

    asyncio.run(main())


def test_a_relay_that_ended_both_halves_closes_the_stream_cleanly() -> None:
    async def main() -> None:
        client, server = await tunnel()
        client.write_eof()
        server.write_eof()
        await settle()
        server.proto.finish(server)
        await settle()
        assert await asyncio.wait_for(client.read(), 1) is None

    asyncio.run(main())


def test_a_chunk_the_relay_failed_to_write_goes_back_to_the_connection_window(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    """The relay took a chunk with ``read`` and its pod had gone (broken pipe): when the relay
    finishes the stream, the connection window gets those bytes back. Before, each such failure
    shrank the window for good; the bench's connection-churn runs stalled every stream of the
    pooled HBONE connection after a few minutes."""

    async def main() -> None:
        client, server = await tunnel()
        await client.write(b"x" * 1000)
        await settle()
        assert await server.read() == b"x" * 1000  # handed to the relay, not consumed yet
        pair[1].close()  # the pod went away: the relay's write would fail
        assert server.proto.codec.held_bytes() == 1000
        server.proto.finish(server)
        assert server.proto.codec.held_bytes() == 0

    asyncio.run(main())


def test_a_stream_reset_locally_gives_back_what_its_relay_held() -> None:
    async def main() -> None:
        client, server = await tunnel()
        await client.write(b"y" * 700)
        await settle()
        assert await server.read() == b"y" * 700
        server.reset()
        assert server.proto.codec.held_bytes() == 0

    asyncio.run(main())


def test_leaked_chunks_never_stall_the_connection() -> None:
    """Many streams whose relays fail mid-write (more bytes in all than the connection window):
    a new stream on the same connection still carries its bytes."""

    async def main() -> None:
        client, server = await tunnel()
        proto = server.proto
        window = proto.codec.settings.connection_window
        chunk = 60_000
        for _ in range(window // chunk + 4):
            sender = await asyncio.wait_for(client.proto.open("10.0.0.2:80", None), 5)
            await asyncio.wait_for(sender.write(b"z" * chunk), 5)
            await settle()
            (receiver,) = [s for s in proto.streams.values() if s is not server]
            got = 0
            while got < chunk:
                data = await asyncio.wait_for(receiver.read(), 5)
                assert data is not None
                got += len(data)
            proto.finish(receiver)  # the relay failed: nothing of it was consumed
            client.proto.finish(sender)
            await settle()
        await asyncio.wait_for(client.write(b"still flowing"), 5)
        await settle()
        assert await asyncio.wait_for(server.read(), 5) == b"still flowing"

    asyncio.run(main())


def test_a_data_frame_for_a_stream_the_protocol_no_longer_has_goes_back_to_the_window() -> None:
    """A whole DATA frame (``HboneConnection.take_data_frame``, the read of every relayed
    message) for a stream the codec still receives on but no ``TunnelStream`` holds: nobody
    will read it, so its bytes are given back at once, as ``dispatch`` gives back an event's."""

    async def main() -> None:
        client, server = await tunnel()
        proto = server.proto
        del proto.streams[server.stream_id]
        taken: list[int] = []
        real = proto.codec.take_data_frame

        def counted(data: bytes) -> int:
            taken.append(real(data))
            return taken[-1]

        proto.codec.take_data_frame = counted  # type: ignore[method-assign]
        await client.write(b"n" * 500)
        await settle()
        assert taken == [server.stream_id]
        assert proto.codec.held_received == 0 and proto.codec.held_bytes() == 0

    asyncio.run(main())


def test_window_updates_due_on_a_delivered_frame_leave_in_the_same_callback(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    """A DATA frame delivered straight to the relay's socket gives its window back there; the
    WINDOW_UPDATE that makes due goes to the transport in that same ``data_received`` (it
    flushes only when something was framed, not for every frame)."""

    async def main() -> None:
        client, server = await tunnel()
        server.deliver_directly(pair[0])
        proto = server.proto
        assert proto.transport is not None
        real_write = proto.transport.write
        written: list[bytes] = []

        def write(data: bytes | bytearray | memoryview) -> None:
            written.append(bytes(data))
            real_write(data)

        proto.transport.write = write  # type: ignore[method-assign]
        quarter = proto.codec.settings.stream_window // 4
        update = window_update_frame(server.stream_id, quarter)
        chunk, sent = 16 * 1024, 0
        while sent < quarter:
            await client.write(b"w" * chunk)
            await settle()
            sent += chunk
            got = 0
            while got < chunk:
                got += len(pair[1].recv(chunk))
            calls = len(written)
            assert (update in b"".join(written)) == (sent >= quarter)
        assert written and update in written[calls - 1]

    asyncio.run(main())
