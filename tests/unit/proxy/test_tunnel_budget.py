"""The outgoing budget of one HBONE connection (``TunnelStream.write``): streams whose peer
stopped reading hold at most a bounded queue each, the others keep flowing, and writers waiting
for the budget go on as soon as WINDOW_UPDATEs free it."""

from __future__ import annotations

import asyncio
from typing import Any

from agent.proxy import hbone_events as ev
from agent.proxy.h2wire import KIB, MIB, HboneSettings
from agent.proxy.hbone import HboneConnection
from agent.proxy.hbone_limits import MAX_WRITE, OUT_BUDGET
from agent.proxy.tunnel import HIGH_WATER, HboneProtocol, TunnelStream
from tests.unit.proxy.memtransport import MemoryTransport

CHUNK = 256 * 1024


async def connected(
    server_settings: HboneSettings | None = None,
) -> tuple[HboneProtocol, dict[int, TunnelStream]]:
    """A client protocol and the server's streams by id (every CONNECT accepted)."""
    accepted: dict[int, TunnelStream] = {}

    def on_request(proto: HboneProtocol, event: ev.TunnelRequested) -> None:
        accepted[event.stream_id] = proto.streams[event.stream_id]
        proto.codec.respond(event.stream_id, 200)
        proto.flush()

    client = HboneProtocol(HboneConnection(client_side=True))
    server = HboneProtocol(
        HboneConnection(client_side=False, settings=server_settings), on_request=on_request
    )
    to_server, to_client = MemoryTransport(server), MemoryTransport(client)
    to_server.other, to_client.other = to_client, to_server
    server.connection_made(to_client)
    client.connection_made(to_server)
    return client, accepted


async def write_all(stream: TunnelStream, total: int, chunk: int = CHUNK) -> None:
    for _ in range(total // chunk):
        await stream.write(b"w" * chunk)


async def read_all(stream: TunnelStream, total: int) -> None:
    got = 0
    while got < total:
        data = await stream.read()
        assert data is not None
        got += len(data)
        stream.consumed(len(data))


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 20))


def test_streams_whose_peer_stopped_reading_leave_the_others_flowing() -> None:
    async def main() -> None:
        client, accepted = await connected()
        stalled = [await client.open("10.0.0.2:80", None) for _ in range(2)]
        beyond = 2 * HboneSettings().stream_window  # more than the peer's window lets through
        writers = [asyncio.create_task(write_all(s, beyond)) for s in stalled]
        await asyncio.sleep(0.1)  # the server never reads these: their writers block
        assert not any(w.done() for w in writers)
        assert client.codec.queued <= OUT_BUDGET + MAX_WRITE
        flowing = await client.open("10.0.0.2:80", None)
        await asyncio.gather(
            write_all(flowing, 4 * MIB), read_all(accepted[flowing.stream_id], 4 * MIB)
        )
        for w in writers:
            w.cancel()

    run(main())


def test_writers_waiting_for_the_budget_go_on_once_window_updates_free_it() -> None:
    async def main() -> None:
        window = 512 * KIB  # with WINDOW_UPDATEs every quarter of it, 128 KiB read sends one
        client, accepted = await connected(  # and the connection one once 1 MiB is due
            HboneSettings(stream_window=window, connection_window=4 * MIB)
        )
        big, *others, waiting = [await client.open("10.0.0.2:80", None) for _ in range(5)]
        await big.write(b"b" * window)  # fills its window
        await big.write(b"B" * HIGH_WATER)  # queued: the peer reads nothing yet
        await big.write(b"B" * MAX_WRITE)  # the most a stream queues: a write past its high water
        for other in others:
            await other.write(b"o" * window)
            await other.write(b"O" * MAX_WRITE)
        assert client.codec.queued > OUT_BUDGET  # the connection holds more than its budget
        blocked = asyncio.create_task(waiting.write(b"w"))
        await asyncio.sleep(0.05)
        assert not blocked.done()
        server_big = accepted[big.stream_id]
        freed = 0
        while freed < 128 * KIB:  # the server reads part of ``big``: a WINDOW_UPDATE
            data = await server_big.read()
            assert data is not None
            server_big.consumed(len(data))
            freed += len(data)
        await asyncio.wait_for(blocked, 5)
        assert client.codec.buffered(big.stream_id) > 0  # ``big`` did not drain completely

    run(main())
