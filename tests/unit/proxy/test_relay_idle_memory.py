"""An idle relayed connection holds no read buffer: the relay allocates a chunk only once bytes
arrived (issue 18: memory per idle proxied connection)."""

from __future__ import annotations

import asyncio
import gc
import socket
import tracemalloc
from collections.abc import Callable, Coroutine
from typing import Any

from agent.proxy.hbone import HboneConnection
from agent.proxy.relay import MIN_CHUNK, relay_sockets, relay_tunnel
from agent.proxy.tunnel import HboneProtocol, TunnelStream
from agent.telemetry.records import ConnectionRecord
from tests.unit.proxy.memtransport import MemoryTransport

CONNECTIONS = 50  # below the codec's 100 concurrent streams


def _nonblocking_pair() -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    return a, b


async def _settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


async def _connection() -> tuple[HboneProtocol, HboneProtocol]:
    """An HBONE connection in memory whose server accepts every CONNECT: (client, server)."""

    def on_request(proto: HboneProtocol, event: Any) -> None:
        proto.codec.respond(event.stream_id, 200)
        proto.flush()

    client = HboneProtocol(HboneConnection(client_side=True))
    server = HboneProtocol(HboneConnection(client_side=False), on_request=on_request)
    client.connection_made(MemoryTransport(server))
    server.connection_made(MemoryTransport(client))
    return client, server


async def _open(client: HboneProtocol, n: int) -> list[TunnelStream]:
    return [await asyncio.wait_for(client.open("10.0.0.2:80", None), 5) for _ in range(n)]


async def _idle_bytes_per_relay(start: Callable[[int], Coroutine[Any, Any, None]]) -> float:
    """What ``CONNECTIONS`` idle relays (started by ``start(i)``) hold, per relay."""
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        tasks = [asyncio.create_task(start(i)) for i in range(CONNECTIONS)]
        await _settle()
        gc.collect()
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return held / CONNECTIONS


def test_an_idle_socket_relay_holds_no_read_buffers() -> None:
    pairs = [_nonblocking_pair() for _ in range(2 * CONNECTIONS)]

    def relay(i: int) -> Coroutine[Any, Any, None]:
        record = ConnectionRecord("outbound", "10.0.0.1:1", "10.0.0.2:80")
        return relay_sockets(pairs[2 * i][0], pairs[2 * i + 1][0], record)

    try:
        per_relay = asyncio.run(_idle_bytes_per_relay(relay))
    finally:
        for a, b in pairs:
            a.close()
            b.close()
    assert per_relay < 2 * MIN_CHUNK  # two reading directions, less than one buffer's worth


def test_an_idle_tunnel_relay_holds_no_read_buffer() -> None:
    pairs = [_nonblocking_pair() for _ in range(CONNECTIONS)]

    async def main() -> float:
        client, _ = await _connection()
        streams = await _open(client, CONNECTIONS)

        def relay(i: int) -> Coroutine[Any, Any, None]:
            record = ConnectionRecord("outbound", "10.0.0.1:1", "10.0.0.2:80")
            return relay_tunnel(pairs[i][0], streams[i], record, outbound=True)

        return await _idle_bytes_per_relay(relay)

    try:
        per_relay = asyncio.run(main())
    finally:
        for a, b in pairs:
            a.close()
            b.close()
    assert per_relay < MIN_CHUNK  # one reading direction, less than one buffer's worth


def test_an_idle_tunnel_stream_holds_no_events_and_no_queue() -> None:
    """Both ends of streams that carried data, all of it read: what each end holds (stream,
    codec state) stays below 2 KiB; two ``asyncio.Event``s and an empty deque were 3.5 KiB."""

    async def main() -> float:
        client, server = await _connection()
        await _open(client, 1)  # the connection's first-stream allocations are not per stream
        gc.collect()
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            streams = await _open(client, CONNECTIONS)
            for stream in streams:
                await stream.write(b"x" * 100)
            await _settle()
            for end in list(server.streams.values())[1:]:
                chunk = await end.read()
                assert chunk == b"x" * 100
                end.consumed(len(chunk))
            await _settle()
            gc.collect()
            held = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
        return held / (2 * CONNECTIONS)

    assert asyncio.run(main()) < 2048
