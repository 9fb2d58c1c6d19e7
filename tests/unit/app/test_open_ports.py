"""A successor's readiness never answers 503 because its own metrics or admin port is not bound
yet: ``open_ports`` binds readiness last. In an upgrade every new connection to a port goes to
the agent that bound it last, so a readiness bound before the others answered a kubelet probe
that arrived between the binds with 503 (seen once in CI's lab upgrade test)."""

from __future__ import annotations

import asyncio
import json
import socket

from agent.app import ReadinessServer, open_ports
from agent.base.endpoint import HttpComponent
from agent.base.http import Response


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _probe(port: int) -> tuple[int, dict[str, object]] | None:
    """``GET /healthz/ready`` on ``port``: (status, body), or None when nothing listens."""
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except ConnectionRefusedError:
        return None
    writer.write(b"GET /healthz/ready HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    raw = await reader.read()
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


class ProbedWhileStarting(HttpComponent):
    """An HTTP endpoint that, just before it binds (where the real start yields to the loop),
    sends the probe a kubelet could send at that moment."""

    serves = "a test endpoint"
    url_path = "/"
    option = "--test-address"

    def __init__(self, name: str, ready_port: int, answers: list[tuple[int, object]]) -> None:
        super().__init__(lambda _r: Response.json(200, {}), ("127.0.0.1", 0))
        self.name = name
        self.not_listening = f"{name}: not listening"
        self.ready_port = ready_port
        self.answers = answers

    async def start(self) -> None:
        if (answer := await _probe(self.ready_port)) is not None:
            self.answers.append(answer)
        await super().start()


def test_readiness_is_bound_only_once_metrics_and_admin_listen() -> None:
    async def run() -> tuple[list[tuple[int, object]], tuple[int, dict[str, object]] | None]:
        port = _free_port()
        answers: list[tuple[int, object]] = []
        http = [ProbedWhileStarting(n, port, answers) for n in ("metrics", "admin")]
        ready = ReadinessServer(lambda: [r for c in http for r in c.not_ready()])
        try:
            await open_ports(ready, ("127.0.0.1", port), list(http))
            return answers, await _probe(port)
        finally:
            await ready.stop()
            for c in http:
                await c.stop()

    early, after = asyncio.run(run())
    assert early == [], early  # readiness bound first: [(503, {... "metrics: not listening"})]
    assert after == (200, {"ready": True})
