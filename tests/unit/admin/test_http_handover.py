"""Readiness, metrics and admin ports move to a successor agent without a gap: every agent binds
with SO_REUSEPORT and the newest member of the port's group takes every new connection."""

from __future__ import annotations

import asyncio

from agent.base.http import HttpServer, Response


def _server(name: str) -> HttpServer:
    return HttpServer(lambda _request: Response.json(200, {"agent": name}))


async def _who(port: int) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /healthz/ready HTTP/1.1\r\n\r\n")
    data = await reader.read()
    writer.close()
    return data.rsplit(b'"agent": ', 1)[1].split(b'"')[1]


def test_the_newest_agent_answers_from_the_moment_it_binds_until_the_next_one() -> None:
    async def scenario() -> list[set[bytes]]:
        old, new, newer = _server("old"), _server("new"), _server("newer")
        port = await old.start("127.0.0.1", 0)
        seen = [{await _who(port) for _ in range(20)}]
        await new.start("127.0.0.1", port)  # binds while the old one still listens
        seen.append({await _who(port) for _ in range(20)})
        await old.stop()
        seen.append({await _who(port) for _ in range(20)})
        await newer.start("127.0.0.1", port)
        seen.append({await _who(port) for _ in range(20)})
        await new.stop()
        await newer.stop()
        return seen

    assert asyncio.run(asyncio.wait_for(scenario(), 10)) == [
        {b"old"},
        {b"new"},
        {b"new"},
        {b"newer"},
    ]
