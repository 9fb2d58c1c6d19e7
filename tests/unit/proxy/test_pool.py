"""The HBONE pool over in-memory transports: stream limits, one dial per key, idle close."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from agent.proxy import hbone_events as ev
from agent.proxy.hbone import HboneConnection
from agent.proxy.pool import HbonePool, PoolKey
from agent.proxy.tunnel import HboneProtocol
from tests.unit.proxy.memtransport import MemoryTransport

KEY = PoolKey("spiffe://td/ns/a/sa/client", "spiffe://td/ns/a/sa/server", "10.0.0.2")


def accept_all(proto: HboneProtocol, request: ev.TunnelRequested) -> None:
    proto.codec.respond(request.stream_id, 200)
    proto.flush()


class Dialer:
    """Dials in-memory HBONE connections; ``fail`` makes the next dials raise."""

    def __init__(self) -> None:
        self.dials = 0
        self.fail: Exception | None = None
        self.client_transports: list[MemoryTransport] = []

    async def __call__(self, key: PoolKey, on_idle: Any) -> HboneProtocol:
        self.dials += 1
        await asyncio.sleep(0.01)  # a handshake takes time: concurrent openers must wait for it
        if self.fail is not None:
            raise self.fail
        client = HboneProtocol(HboneConnection(client_side=True), on_idle=on_idle)
        server = HboneProtocol(HboneConnection(client_side=False), on_request=accept_all)
        to_server, to_client = MemoryTransport(server), MemoryTransport(client)
        to_server.other, to_client.other = to_client, to_server
        server.connection_made(to_client)
        client.connection_made(to_server)
        self.client_transports.append(to_server)
        return client


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 10))


def test_concurrent_opens_share_connections_up_to_the_stream_limit() -> None:
    async def scenario() -> tuple[int, int]:
        dialer = Dialer()
        pool = HbonePool(dialer)
        streams = await asyncio.gather(*(pool.open(KEY, "10.0.0.2:80", None) for _ in range(250)))
        return dialer.dials, len({id(s.proto) for s in streams})

    assert run(scenario()) == (3, 3)


def test_a_failed_dial_fails_its_waiters_once_and_the_next_open_dials_again() -> None:
    async def scenario() -> tuple[list[str], int, int]:
        dialer = Dialer()
        dialer.fail = ConnectionRefusedError("nobody on 15008")
        pool = HbonePool(dialer)
        results = await asyncio.gather(
            *(pool.open(KEY, "10.0.0.2:80", None) for _ in range(20)), return_exceptions=True
        )
        failed_dials = dialer.dials
        dialer.fail = None
        await pool.open(KEY, "10.0.0.2:80", None)
        return [type(r).__name__ for r in results], failed_dials, dialer.dials

    names, failed_dials, dials = run(scenario())
    assert names == ["ConnectionRefusedError"] * 20
    assert (failed_dials, dials) == (1, 2)


def test_idle_connection_is_closed_after_the_timeout() -> None:
    async def scenario() -> tuple[bool, bool]:
        dialer = Dialer()
        pool = HbonePool(dialer, idle_timeout=0.05)
        stream = await pool.open(KEY, "10.0.0.2:80", None)
        stream.write_eof()
        stream.proto.finish(stream)  # the relay is done: the connection has no stream left
        await asyncio.sleep(0.01)
        open_before = not dialer.client_transports[0].is_closing()
        await asyncio.sleep(0.1)
        return open_before, dialer.client_transports[0].is_closing()

    assert run(scenario()) == (True, True)


def test_reuse_cancels_the_idle_timer() -> None:
    async def scenario() -> tuple[bool, int]:
        dialer = Dialer()
        pool = HbonePool(dialer, idle_timeout=0.05)
        first = await pool.open(KEY, "10.0.0.2:80", None)
        first.proto.finish(first)
        await pool.open(KEY, "10.0.0.2:80", None)  # reused before the timer fired
        await asyncio.sleep(0.1)
        return dialer.client_transports[0].is_closing(), dialer.dials

    assert run(scenario()) == (False, 1)


@pytest.mark.parametrize("goaway", [True, False])
def test_goaway_stops_new_streams_on_a_connection(goaway: bool) -> None:
    async def scenario() -> int:
        dialer = Dialer()
        pool = HbonePool(dialer)
        stream = await pool.open(KEY, "10.0.0.2:80", None)
        if goaway:
            pool.goaway_all()
        await asyncio.sleep(0.01)
        await pool.open(KEY, "10.0.0.2:80", None)
        stream.proto.finish(stream)
        return dialer.dials

    assert run(scenario()) == (2 if goaway else 1)
