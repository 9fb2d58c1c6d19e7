"""The HBONE pool over in-memory transports: stream limits, one dial per key, idle close."""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import pytest
from h2.errors import ErrorCodes

from agent.proxy import hbone_events as ev
from agent.proxy.hbone import HboneConnection
from agent.proxy.pool import HbonePool, PoolKey
from agent.proxy.tunnel import HboneProtocol, TunnelError
from tests.unit.proxy.looptimers import record_timers
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
        self.servers: list[HboneProtocol] = []
        self.on_request: Any = accept_all

    async def __call__(self, key: PoolKey, on_idle: Any) -> HboneProtocol:
        self.dials += 1
        await asyncio.sleep(0.01)  # a handshake takes time: concurrent openers must wait for it
        if self.fail is not None:
            raise self.fail
        client = HboneProtocol(HboneConnection(client_side=True), on_idle=on_idle)
        server = HboneProtocol(HboneConnection(client_side=False), on_request=self.on_request)
        self.servers.append(server)
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


def test_a_connection_idle_after_every_stream_keeps_one_idle_timer() -> None:
    """One client connection at a time: the pooled connection goes idle at every stream's end.
    Each end made an idle timer and the next open cancelled it; now the time is noted and the
    one timer, when it fires, finds the connection busy (and the next idle arms another)."""

    async def scenario() -> tuple[int, int, bool]:
        dialer = Dialer()
        pool = HbonePool(dialer, idle_timeout=60.0)
        timers = record_timers(asyncio.get_running_loop())
        for _ in range(5):
            stream = await pool.open(KEY, "10.0.0.2:80", None)
            stream.write_eof()
            stream.proto.finish(stream)
        idle_timers = sum(1 for t in timers if t == pool._close_idle)
        return idle_timers, dialer.dials, dialer.client_transports[0].is_closing()

    assert run(scenario()) == (1, 1, False)


def test_a_connection_busy_meanwhile_is_closed_a_whole_timeout_after_its_last_idle() -> None:
    """The timer that fires while the connection idles for less than the timeout (it was busy
    in between) waits for the rest of it (the loop's clock set by the test: the timer is
    fired by calling it)."""

    async def scenario() -> list[bool]:
        dialer = Dialer()
        pool = HbonePool(dialer, idle_timeout=10.0)
        loop = asyncio.get_running_loop()
        stream = await pool.open(KEY, "10.0.0.2:80", None)
        conn, transport = stream.proto, dialer.client_transports[0]
        now = [100.0]
        loop.time = lambda: now[0]  # type: ignore[method-assign]
        conn.finish(stream)  # idle at 100: the timer is due at 110
        now[0] = 105.0
        stream = await pool.open(KEY, "10.0.0.2:80", None)
        conn.finish(stream)  # idle again at 105
        seen = []
        for now[0] in (110.0, 115.0):  # the timer fires (at 110; then when it set itself)
            pool._close_idle(conn)
            seen.append(transport.is_closing())
        return seen

    assert run(scenario()) == [False, True]


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


def test_a_stream_sent_as_the_peer_drains_is_opened_again_on_a_new_connection() -> None:
    """The peer's GOAWAY (an agent draining for an upgrade) crosses our CONNECT: the peer
    never processed it (above the GOAWAY's last stream id), so the pool dials and opens it
    again instead of failing the client's connection."""

    async def scenario() -> tuple[int, bool]:
        dialer = Dialer()
        pool = HbonePool(dialer)
        first = await pool.open(KEY, "10.0.0.2:80", None)
        dialer.servers[0].goaway()  # in flight while the next CONNECT is sent
        second = await pool.open(KEY, "10.0.0.2:80", None)
        return dialer.dials, second.proto is not first.proto

    assert run(scenario()) == (2, True)


def test_a_refused_stream_is_opened_again() -> None:
    async def scenario() -> int:
        dialer = Dialer()
        refused: list[int] = []

        def refuse_once(proto: HboneProtocol, request: ev.TunnelRequested) -> None:
            if not refused:
                refused.append(request.stream_id)
                proto.codec.reset(request.stream_id, ErrorCodes.REFUSED_STREAM)
                proto.flush()
                return
            accept_all(proto, request)

        dialer.on_request = refuse_once
        pool = HbonePool(dialer)
        await pool.open(KEY, "10.0.0.2:80", None)
        return dialer.dials

    assert run(scenario()) == 1


def test_a_stream_the_peer_rejected_is_not_opened_again() -> None:
    async def scenario() -> None:
        dialer = Dialer()

        def deny(proto: HboneProtocol, request: ev.TunnelRequested) -> None:
            proto.codec.respond(request.stream_id, 401)
            proto.flush()

        dialer.on_request = deny
        await HbonePool(dialer).open(KEY, "10.0.0.2:80", None)

    with pytest.raises(TunnelError) as caught:
        run(scenario())
    assert caught.value.status == 401 and not caught.value.unprocessed


def test_a_closed_connection_leaves_the_pool_and_the_open_ones_stay() -> None:
    """Before each open the pool drops its connections that closed (a plain loop since
    session 13, not ``any`` over a generator per stream), keeping the others in order."""

    async def scenario() -> tuple[int, bool, bool]:
        dialer = Dialer()
        pool = HbonePool(dialer)
        first = await pool.open(KEY, "10.0.0.2:80", None)
        first.proto.connection_lost(None)  # the peer went away
        second = await pool.open(KEY, "10.0.0.2:80", None)
        third = await pool.open(KEY, "10.0.0.2:80", None)
        kept = pool._conns[KEY]
        return dialer.dials, kept == [second.proto], third.proto is second.proto

    assert run(scenario()) == (2, True, True)


def test_a_pool_key_is_hashed_and_compared_without_python_calls() -> None:
    """The pool looks its key up for every stream opened: a key is a tuple, hashed and
    compared in C (a frozen dataclass's generated ``__hash__`` and ``__eq__`` were a
    Python-level call each per look-up), and still equal only to a key of the same fields."""
    calls: list[str] = []
    same = PoolKey(KEY.source_id, KEY.destination_id, KEY.destination_ip)
    other = PoolKey(KEY.source_id, KEY.destination_id, "10.0.0.3")

    def profile(frame: Any, event: str, arg: Any) -> None:
        if event == "call":
            calls.append(frame.f_code.co_name)

    sys.setprofile(profile)
    try:
        found = {KEY: 1}.get(same), {KEY: 1}.get(other)
    finally:
        sys.setprofile(None)
    assert found == (1, None)
    assert calls == []
