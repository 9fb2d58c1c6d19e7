"""What an idle relayed connection holds in Python objects, measured with tracemalloc.

The relay (``agent.proxy.relay``) and the tunnel stream (``agent.proxy.tunnel``) live as long
as the connection: an idle one must hold no read buffer, no queue and no task of its own. The
bounds below are per connection, with the caller's task awaiting the relay included (what the
agent's handler adds on top is its record and registry entry, not measured here); the kernel's
socket memory is not Python's and is not counted. Measured on the event loop the agent runs
(uvloop).
"""

from __future__ import annotations

import asyncio
import gc
import socket
import tracemalloc
from collections.abc import Awaitable, Callable
from typing import Any

import uvloop

from agent.proxy.hbone import HboneConnection
from agent.proxy.relay import relay_sockets, relay_tunnel
from agent.proxy.tunnel import HboneProtocol, TunnelStream
from agent.telemetry.records import ConnectionRecord
from tests.unit.proxy.memtransport import MemoryTransport
from tests.unit.proxy.test_tunnel_direct import settle, tunnel

CONNECTIONS = 200
# Measured 3.0 KiB (socket <-> socket) and 2.9 KiB (socket <-> tunnel stream) per connection,
# test's record and task included (uvloop's reader registration is about 0.6 KiB of each fd's
# share); the task-based relay this replaced held 24.1 and 15.7 KiB here, and the tunnel relay
# of two objects and a tuple, whose stream kept two bound methods, 3.2 KiB. Run after other
# tests in one process (``-n 2``) the same relay measures 2.9 to 3.1 KiB: the allocator's and
# uvloop's tables are in another state, so the bound leaves that room. A read buffer or a task
# per connection would add more than 1 KiB each.
SOCKETS_BOUND = 4 * 1024
TUNNEL_BOUND = 3 * 1024 + 512
# Measured 1.6 KiB for both ends of a stream (h2's stream state is about 0.8 KiB of it); with
# a receive queue and two Events per end, and a dict for attributes, it was 6.8 KiB.
STREAM_BOUND = 2048


def _record() -> ConnectionRecord:
    return ConnectionRecord(direction="outbound", source="10.0.0.1:1", destination="10.0.0.2:2")


def _pair() -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    return a, b


async def _per_connection(start: Callable[[int], Awaitable[list[asyncio.Task[None]]]]) -> float:
    """Bytes per connection that ``start`` (opening CONNECTIONS relays, each after one
    exchange, and letting them go idle) leaves allocated."""
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        tasks = await start(CONNECTIONS)
        gc.collect()
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    grown = sum(s.size_diff for s in after.compare_to(before, "filename"))
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return grown / CONNECTIONS


def test_an_idle_socket_relay_holds_no_buffer_and_no_task() -> None:
    pairs = [(_pair(), _pair()) for _ in range(CONNECTIONS)]

    async def start(n: int) -> list[asyncio.Task[None]]:
        tasks = [
            asyncio.create_task(relay_sockets(near, far, _record()))
            for (_client, near), (far, _upstream) in pairs[:n]
        ]
        await settle()
        for (client, _near), _upstream_pair in pairs[:n]:
            client.send(b"x" * 1024)
        await asyncio.sleep(0.05)
        for (_client, _near), (_far, upstream) in pairs[:n]:
            assert upstream.recv(4096) == b"x" * 1024
        return tasks

    try:
        per = uvloop.run(_per_connection(start))
    finally:
        for a, b in pairs:
            for s in (*a, *b):
                s.close()
    assert per <= SOCKETS_BOUND, f"{per:.0f} bytes per idle socket relay"


def test_an_idle_tunnel_relay_holds_no_buffer_and_no_task() -> None:
    pairs = [_pair() for _ in range(CONNECTIONS)]

    async def main() -> float:
        streams = [await tunnel() for _ in range(CONNECTIONS)]

        async def start(n: int) -> list[asyncio.Task[None]]:
            tasks = [
                asyncio.create_task(relay_tunnel(sock, receiver, _record(), outbound=False))
                for (sock, _pod), (_sender, receiver) in zip(pairs[:n], streams, strict=True)
            ]
            await settle()
            for _sock, pod in pairs[:n]:
                pod.send(b"x" * 1024)
            await asyncio.sleep(0.05)
            for sender, _receiver in streams[:n]:
                chunk = await asyncio.wait_for(sender.read(), 5)
                assert chunk == b"x" * 1024
                sender.consumed(len(chunk))
            await settle()
            return tasks

        return await _per_connection(start)

    try:
        per = uvloop.run(main())
    finally:
        for a, b in pairs:
            a.close()
            b.close()
    assert per <= TUNNEL_BOUND, f"{per:.0f} bytes per idle tunnel relay"


def test_an_idle_tunnel_stream_holds_no_queue_and_no_events() -> None:
    """Both ends of an idle CONNECT stream (``TunnelStream`` and h2's stream state) on one
    HBONE connection, after one exchange."""
    streams = 90  # under h2wire's default MAX_CONCURRENT_STREAMS (100)

    async def main() -> float:
        accepted: list[TunnelStream] = []

        def on_request(proto: HboneProtocol, event: Any) -> None:
            accepted.append(proto.streams[event.stream_id])
            proto.codec.respond(event.stream_id, 200)
            proto.flush()

        client = HboneProtocol(HboneConnection(client_side=True))
        server = HboneProtocol(HboneConnection(client_side=False), on_request=on_request)
        client.connection_made(MemoryTransport(server))
        server.connection_made(MemoryTransport(client))
        await asyncio.wait_for(client.open("10.0.0.2:80", None), 5)  # connection-wide state
        gc.collect()
        tracemalloc.start()
        try:
            before = tracemalloc.take_snapshot()
            opened = [
                await asyncio.wait_for(client.open("10.0.0.2:80", "10.0.0.1"), 5)
                for _ in range(streams)
            ]
            for sender, receiver in zip(opened, accepted[1:], strict=True):
                await sender.write(b"x" * 1024)
                await settle()
                chunk = await asyncio.wait_for(receiver.read(), 5)
                assert chunk == b"x" * 1024
                receiver.consumed(len(chunk))
            await settle()
            gc.collect()
            after = tracemalloc.take_snapshot()
        finally:
            tracemalloc.stop()
        return sum(s.size_diff for s in after.compare_to(before, "filename")) / streams

    per = asyncio.run(main())
    assert per <= STREAM_BOUND, f"{per:.0f} bytes per idle tunnel stream (both ends)"
