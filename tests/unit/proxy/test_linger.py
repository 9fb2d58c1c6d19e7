"""The lingering close's bounds (``agent.proxy.linger``), over a scripted reader."""

from __future__ import annotations

import asyncio

from agent.proxy.linger import Lingering, linger


def test_lingering_ends_at_the_clients_end_or_past_the_byte_bound() -> None:
    count = Lingering(10)
    assert count.discarded(b"abcd")
    assert not count.discarded(None)  # the client closed
    assert not count.discarded(b"")
    assert not Lingering(10).discarded(b"x" * 10)  # the bound reached


def test_linger_reads_until_the_client_closes() -> None:
    reads = [b"SETTINGS", b"HEADERS", None, b"never read"]

    async def read() -> bytes | None:
        return reads.pop(0)

    assert asyncio.run(linger(read, seconds=60, limit=1000)) == len(b"SETTINGSHEADERS")
    assert reads == [b"never read"]


def test_linger_stops_past_the_byte_bound_of_a_client_that_keeps_sending() -> None:
    calls = 0

    async def read() -> bytes | None:
        nonlocal calls
        calls += 1
        return b"x" * 1000

    assert asyncio.run(linger(read, seconds=60, limit=4500)) == 5000
    assert calls == 5


def test_linger_stops_past_the_time_bound_of_a_client_that_sends_nothing() -> None:
    async def read() -> bytes | None:
        await asyncio.Event().wait()  # neither bytes nor an end, ever
        return None

    assert asyncio.run(asyncio.wait_for(linger(read, seconds=0.01, limit=1000), 30)) == 0


def test_a_read_error_ends_it() -> None:
    async def read() -> bytes | None:
        raise ConnectionResetError

    assert asyncio.run(linger(read, seconds=60, limit=1000)) == 0
