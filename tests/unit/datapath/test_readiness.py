"""The readiness endpoint: 200 when nothing is pending, 503 with the reasons otherwise."""

from __future__ import annotations

import asyncio
import json

from agent.app import ReadinessServer


async def get(port: int, path: str) -> tuple[int, dict[str, object]]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    raw = await reader.read()
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def test_ready_and_not_ready() -> None:
    reasons: list[str] = ["datapath: not reconciled"]

    async def scenario() -> list[tuple[int, dict[str, object]]]:
        server = ReadinessServer(lambda: list(reasons))
        port = await server.start(0, host="127.0.0.1")
        try:
            first = await get(port, "/healthz/ready")
            reasons.clear()
            second = await get(port, "/healthz/ready")
            other = await get(port, "/metrics")
        finally:
            await server.stop()
        return [first, second, other]

    first, second, other = asyncio.run(scenario())
    assert first == (503, {"ready": False, "not_ready": ["datapath: not reconciled"]})
    assert second == (200, {"ready": True})
    assert other[0] == 404
