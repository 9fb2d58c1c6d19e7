"""What a small request/response costs the tunnel path, in counts (never in time): a client
socket, the source relay, an HBONE stream, the destination relay and a pod socket, with 1 KB
round trips through them. Each count is work the path did per message beyond what it must
(docs/performance/round-trip.md, "A round trip in counts")."""

from __future__ import annotations

import asyncio
import socket
import sys
from collections.abc import Callable, Iterator
from types import FrameType

import pytest

from agent.proxy.relay import relay_tunnel
from agent.proxy.tunnel import HboneProtocol, TunnelStream
from tests.unit.proxy.recvs import recv_exactly
from tests.unit.proxy.test_relay import pairs, record  # noqa: F401 (fixture)
from tests.unit.proxy.test_tunnel_direct import settle, tunnel

MESSAGE = b"x" * 1024
ROUND_TRIPS = 20


async def round_trips(
    sockets: tuple[socket.socket, ...],
    start: Callable[[], object],
    stop: Callable[[], object] = lambda: None,
) -> None:
    """Relay client <-> stream ... stream <-> upstream and make ``ROUND_TRIPS`` 1 KB round
    trips; ``start()`` is called once the path is warm, ``stop()`` after the last one (what
    is counted lies between them)."""
    client, near, far, upstream = sockets
    loop = asyncio.get_running_loop()
    sender, receiver = await tunnel()
    relays = [
        asyncio.create_task(relay_tunnel(near, sender, record(), outbound=True)),
        asyncio.create_task(relay_tunnel(far, receiver, record(), outbound=False)),
    ]
    try:
        for i in range(ROUND_TRIPS + 1):
            if i == 1:
                start()
            await loop.sock_sendall(client, MESSAGE)
            await loop.sock_sendall(upstream, await recv_exactly(upstream, len(MESSAGE)))
            assert await recv_exactly(client, len(MESSAGE)) == MESSAGE
        stop()
    finally:
        for task in relays:
            task.cancel()
        await asyncio.gather(*relays, return_exceptions=True)
        await settle()


@pytest.fixture
def loop_lookups(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Every ``asyncio.get_running_loop()`` made by the agent's code (the test's own and the
    event loop's are not counted): on Python 3.11 each is a ``getpid`` system call."""
    real = asyncio.get_running_loop
    calls: list[str] = []

    def counted() -> asyncio.AbstractEventLoop:
        caller = sys._getframe(1).f_globals.get("__name__", "")
        if caller.startswith("agent."):
            calls.append(caller)
        return real()

    monkeypatch.setattr(asyncio, "get_running_loop", counted)
    yield calls


def test_a_round_trip_looks_the_loop_up_nowhere(
    pairs: tuple[socket.socket, ...],  # noqa: F811
    loop_lookups: list[str],
) -> None:
    """Before: one lookup, so one ``getpid``, for every message written to the tunnel
    (``flush_soon``): two per round trip."""

    async def main() -> None:
        await round_trips(pairs, loop_lookups.clear)

    asyncio.run(main())
    assert loop_lookups == []


def test_a_relayed_message_asks_the_stream_for_room_once(
    pairs: tuple[socket.socket, ...],  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The relay asks ``write_room`` (``can_write``'s questions and how much it may read)
    before it reads the socket; it then writes without asking again (before: ``try_write``
    asked a second time, with nothing changed in between)."""
    asked: list[int] = []
    real_room, real_can = TunnelStream.write_room, TunnelStream.can_write

    def counted(self: TunnelStream) -> int:
        asked.append(self.stream_id)
        return real_room(self)

    def counted_can(self: TunnelStream) -> bool:
        asked.append(self.stream_id)
        return real_can(self)

    monkeypatch.setattr(TunnelStream, "write_room", counted)
    monkeypatch.setattr(TunnelStream, "can_write", counted_can)

    async def main() -> None:
        await round_trips(pairs, asked.clear)

    asyncio.run(main())
    # one message into the tunnel per round trip (the answer comes out of the far relay's
    # stream, which the near relay never asks): one question each
    assert len(asked) == 2 * ROUND_TRIPS


# Python functions the agent's code runs and built-ins it calls, per 1 KB round trip through
# both relays and the stream (both directions: two messages into the tunnel, two out of it).
# Measured: 190 before the changes of "A round trip in counts" (docs/performance/round-trip.md), 144
# after. A change that adds work to every message raises it: measure what it costs
# (tests/bench/proxy/bench_rr_counts.py) and move the bound with the reason. 148 since session
# 12: the codec takes ``h2``'s output with ``h2wire.move_output`` (agent code, counted here)
# instead of ``h2``'s ``data_to_send`` (not counted: ``h2``'s code), once per flush; it copies
# nothing and makes no new buffer, so the work per message fell (about 0.05 µs less per call
# with nothing queued, timeit; docs/performance/connection-cost.md, session 12).
# Measured 146 in session 15; 132 since a read of one whole DATA frame is taken without the
# splitter's tokens (``DataFlow.take_single``: 183 k instead of 212 k instructions per round
# trip, both proxies, callgrind); 126 since ``DataFlow.send`` frames a DATA header inline; 120
# since ``HboneProtocol.data_received`` hands such a frame to its stream without an event
# (``HboneConnection.take_data_frame``); 110 since a stream's queued bytes are asked for only
# when the connection has any queued and the relay counts bytes inline; 106 since a delivered
# frame that framed nothing (no WINDOW_UPDATE due) is not followed by an empty ``flush``; 104
# since a DATA frame's send windows are taken in one call; 100 since ``DataFlow`` compares
# instead of calling ``min`` (155 k instructions).
CALLS_PER_ROUND_TRIP = 100


def test_a_round_trip_makes_no_more_calls_than_measured(
    pairs: tuple[socket.socket, ...],  # noqa: F811
) -> None:
    """Per message the path reads once, frames once, encrypts once and writes once; what it
    calls around that is Python's cost per hop. Before: every received message walked the
    event type chain (seven ``isinstance`` and a ``getattr``), every sent one asked
    ``can_write`` twice and dispatched an empty event list, and every message's byte count
    went through ``getattr`` and ``setattr``."""
    calls = 0

    def count(frame: FrameType, event: str, _arg: object) -> None:
        nonlocal calls
        if event in ("call", "c_call") and frame.f_globals.get("__name__", "").startswith("agent."):
            calls += 1

    async def main() -> None:
        await round_trips(pairs, lambda: sys.setprofile(count), lambda: sys.setprofile(None))

    try:
        asyncio.run(main())
    finally:
        sys.setprofile(None)
    assert calls / ROUND_TRIPS <= CALLS_PER_ROUND_TRIP


def test_the_only_stream_of_a_connection_writes_without_a_scheduled_flush(
    pairs: tuple[socket.socket, ...],  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Before: every message into the tunnel scheduled a callback (``flush_soon``) that ran in
    the loop's next pass of its ready queue, two per round trip."""
    scheduled: list[int] = []
    real = HboneProtocol._scheduled_flush

    def counted(self: HboneProtocol) -> None:
        scheduled.append(len(self.streams))
        real(self)

    monkeypatch.setattr(HboneProtocol, "_scheduled_flush", counted)

    async def main() -> None:
        await round_trips(pairs, scheduled.clear, lambda: scheduled.append(-1))

    asyncio.run(main())
    assert scheduled[: scheduled.index(-1)] == []


def test_writes_of_several_streams_in_one_pass_leave_in_one_flush() -> None:
    """With more than one stream on the connection the relays' writes of one pass of the loop
    still wait for its end and go to the transport together (one TLS record)."""

    async def main() -> None:
        first, _ = await tunnel()
        proto = first.proto
        second = await asyncio.wait_for(proto.open("10.0.0.2:81", None), 5)
        await settle()
        writes: list[bytes] = []
        assert proto.transport is not None
        real_write = proto.transport.write

        def write(data: bytes | bytearray | memoryview) -> None:
            writes.append(bytes(data))
            real_write(data)

        proto.transport.write = write  # type: ignore[method-assign]
        for stream in (first, second):
            assert stream.try_write(MESSAGE)
        assert writes == []  # not yet: the pass is not over
        await settle()
        assert len(writes) == 1 and writes[0].count(MESSAGE) == 2

    asyncio.run(main())
