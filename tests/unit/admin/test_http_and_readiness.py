"""The agent's HTTP plumbing, and readiness as each precondition goes and comes back."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable
from pathlib import Path

import pytest

from agent.admin.component import AdminComponent
from agent.app import Agent, ReadinessServer
from agent.base.constants import Listener
from agent.base.http import (
    MAX_CONNECTIONS,
    MAX_PER_SOURCE,
    HttpServer,
    Request,
    Response,
    parse_request_line,
)
from agent.base.metrics import REGISTRY
from agent.config import AgentConfig
from agent.telemetry.component import TelemetryComponent


def test_request_line_parsing() -> None:
    assert parse_request_line(b"POST /logging?level=debug&logger=x HTTP/1.1\r\n\r\n") == Request(
        "POST", "/logging", {"level": "debug", "logger": "x"}
    )
    assert parse_request_line(b"\x16\x03\x01garbage\r\n\r\n") is None


async def _exchange(port: int, raw: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw)
    data = await reader.read()
    writer.close()
    return data


def test_server_answers_errors_and_survives_a_failing_handler() -> None:
    def handler(request: Request) -> Response:
        if request.path == "/boom":
            raise ValueError("handler bug")
        return Response.json(200, {"path": request.path})

    async def scenario() -> list[bytes]:
        server = HttpServer(handler)
        port = await server.start("127.0.0.1", 0)
        try:
            return [
                await _exchange(port, b"GET /boom HTTP/1.1\r\n\r\n"),
                await _exchange(port, b"not http at all\r\n\r\n"),
                await _exchange(port, b"GET /ok HTTP/1.1\r\nHost: x\r\n\r\n"),
            ]
        finally:
            await server.stop()

    boom, garbage, ok = asyncio.run(scenario())
    assert boom.startswith(b"HTTP/1.1 500") and b"handler bug" in boom
    assert garbage.startswith(b"HTTP/1.1 400")
    assert ok.startswith(b"HTTP/1.1 200") and b'"/ok"' in ok


def test_connections_past_the_limit_are_closed_unread_and_the_others_served() -> None:
    """Readiness and metrics listen on the node's addresses: connections are bounded per
    server (``max_connections``); one past it is closed at once and counted, and once the
    served ones end a new one is served again."""
    entered: list[str] = []
    release = asyncio.Event()

    async def handler(request: Request) -> Response:
        entered.append(request.path)
        await release.wait()
        return Response.json(200, {"path": request.path})

    async def scenario() -> tuple[list[bytes], bytes, bytes, int]:
        server = HttpServer(handler, max_connections=2)
        port = await server.start("127.0.0.1", 0)
        try:
            held = [
                asyncio.create_task(_exchange(port, b"GET /%d HTTP/1.1\r\n\r\n" % i))
                for i in range(2)
            ]
            await asyncio.wait_for(_until(lambda: len(entered) == 2), 30)
            try:
                extra = await _exchange(port, b"GET /extra HTTP/1.1\r\n\r\n")
            except ConnectionResetError:
                extra = b""
            release.set()
            answers = list(await asyncio.gather(*held))
            after = await _exchange(port, b"GET /after HTTP/1.1\r\n\r\n")
            return answers, extra, after, server.refused
        finally:
            await server.stop()

    before = _refusals("connection_limit")
    answers, extra, after, refused = asyncio.run(scenario())
    assert all(a.startswith(b"HTTP/1.1 200") for a in answers)
    assert extra == b"" and refused == 1 and "/extra" not in entered
    assert _refusals("connection_limit") == before + 1
    assert after.startswith(b"HTTP/1.1 200")


def test_one_address_holding_connections_cannot_starve_the_probes_of_another(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Readiness listens on the node's addresses: a client outside the mesh (127.0.0.2 here)
    that held 64 idle connections made every kubelet probe (127.0.0.3) fail. Now one address
    holds at most ``MAX_PER_SOURCE``; the rest are closed unread, counted, and logged once
    while it stays at its limit, and another address is answered. (The head timeout is set
    long so that the held connections stay held however slow the machine is.)"""

    async def scenario() -> tuple[int, bytes, int]:
        server = HttpServer(lambda _r: Response.json(200, {"ready": True}), timeout=600)
        port = await server.start("127.0.0.1", 0)
        held: list[asyncio.StreamWriter] = []
        try:
            for _ in range(MAX_CONNECTIONS):
                _, writer = await asyncio.open_connection(
                    "127.0.0.1", port, local_addr=("127.0.0.2", 0)
                )
                held.append(writer)
            refused = lambda: _refusals("source_connection_limit") - before  # noqa: E731
            await asyncio.wait_for(_until(lambda: server.active + refused() == 64), 30)
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, local_addr=("127.0.0.3", 0)
            )
            writer.write(b"GET /healthz/ready HTTP/1.1\r\n\r\n")
            try:
                probe = await reader.read()
            except ConnectionResetError:
                probe = b""
            writer.close()
            return server.active, probe, int(refused())
        finally:
            for writer in held:
                writer.close()
            await server.stop()

    before = _refusals("source_connection_limit")
    with caplog.at_level(logging.WARNING, logger="agent.base.http"):
        active, probe, refused = asyncio.run(scenario())
    assert probe.startswith(b"HTTP/1.1 200")
    assert active == MAX_PER_SOURCE and refused == MAX_CONNECTIONS - MAX_PER_SOURCE
    said = [r.getMessage() for r in caplog.records if "127.0.0.2" in r.getMessage()]
    assert len(said) == 1 and "limit per source address" in said[0]


def test_readiness_and_metrics_limit_each_address_and_the_loopback_admin_api_does_not() -> None:
    assert ReadinessServer(list)._server.per_source == MAX_PER_SOURCE
    metrics = TelemetryComponent.per_source
    assert metrics == MAX_PER_SOURCE and AdminComponent.per_source is None


def test_an_answer_in_parts_arrives_whole_with_its_length() -> None:
    """``Response.parts`` (the agent's ``/metrics``): the parts in order, never joined by the
    server, under one head whose Content-Length is their sum; empty parts are harmless."""
    parts = (b"a" * 300_000, b"", b"b\n" * 100_000, b"c")

    async def scenario() -> bytes:
        server = HttpServer(lambda _r: Response(200, b"", "text/plain", parts))
        port = await server.start("127.0.0.1", 0)
        try:
            return await _exchange(port, b"GET /metrics HTTP/1.1\r\n\r\n")
        finally:
            await server.stop()

    head, _, body = asyncio.run(scenario()).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert f"Content-Length: {len(b''.join(parts))}".encode() in head
    assert body == b"".join(parts)


def test_an_answer_the_client_does_not_take_is_dropped_with_its_connection() -> None:
    """A client that asked and never reads held the whole answer for as long as it stayed
    connected; now the answer must be taken within ``timeout`` (here 0.2 s), else the
    connection is aborted and nothing of it is held. (The outer wait only guards against
    the hang the bound prevents; nothing is asserted about time.)"""
    body = b"m" * (32 << 20)  # more than the kernel's buffers on both ends take

    async def scenario() -> tuple[int, int]:
        asked: list[str] = []

        def handler(request: Request) -> Response:
            asked.append(request.path)
            return Response(200, body, "text/plain")

        server = HttpServer(handler, timeout=0.2)
        port = await server.start("127.0.0.1", 0)
        client = socket.socket()
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        client.setblocking(False)
        try:
            await asyncio.get_running_loop().sock_connect(client, ("127.0.0.1", port))
            client.sendall(b"GET /metrics HTTP/1.1\r\n\r\n")
            await asyncio.wait_for(_until(lambda: bool(asked) and server.active == 0), 30)
            return server.active, server.refused
        finally:
            client.close()
            await server.stop()

    before = _refusals("answer_not_taken")
    assert asyncio.run(scenario()) == (0, 0)
    assert _refusals("answer_not_taken") == before + 1


def _refusals(cause: str) -> float:
    found = REGISTRY.get_sample_value("nodemesh_http_server_refusals_total", {"cause": cause})
    return found or 0.0


async def _until(condition: Callable[[], bool]) -> None:
    while not condition():
        await asyncio.sleep(0.01)


class _Source:
    ready = True
    last_error = None


class _Identity:
    name = "identity"

    def __init__(self) -> None:
        self.pending: list[str] = []
        self.troubled: list[str] = []

    def not_ready(self) -> list[str]:
        return list(self.pending)

    def degraded(self) -> list[str]:
        return list(self.troubled)


def test_readiness_flips_with_each_precondition(tmp_path: Path) -> None:
    """State loaded, listeners open, datapath reconciled (and the last pass succeeded),
    certificates present, metrics and admin listening: remove each, then restore it."""
    config = AgentConfig(
        node="node1",
        pin_dir=tmp_path / "pins",
        cluster_file=tmp_path / "cluster.yaml",
        admin_address=("127.0.0.1", 0),
        metrics_port=0,
    )
    degraded: list[list[str]] = []

    async def scenario() -> list[list[str]]:
        agent = Agent(config)
        identity = _Identity()
        agent.components.append(identity)
        seen = [agent.not_ready()]
        for c in agent.components:
            if c.name in ("telemetry", "admin"):
                await c.start()
        agent.source = _Source()  # type: ignore[assignment]
        agent.listeners = {slot: socket.socket() for slot in Listener}
        agent._synced = True
        seen.append(agent.not_ready())
        steps = [
            (lambda: setattr(agent.source, "ready", False),
             lambda: setattr(agent.source, "ready", True)),
            (lambda: agent.listeners[Listener.HBONE].close(),
             lambda: agent.listeners.__setitem__(Listener.HBONE, socket.socket())),
            (lambda: setattr(agent, "_reconcile_error", "netlink: EBUSY"),
             lambda: setattr(agent, "_reconcile_error", None)),
            (lambda: identity.pending.append("identity: no certificate yet for x"),
             identity.pending.clear),
            (lambda: identity.troubled.append("identity: CA unreachable since t"),
             identity.troubled.clear),
        ]  # fmt: skip
        for remove, restore in steps:
            remove()
            seen.append(agent.not_ready())
            degraded.append(agent.degraded())
            restore()
            seen.append(agent.not_ready())
        for c in agent.components:
            if c.name in ("telemetry", "admin"):
                await c.stop()
        seen.append(agent.not_ready())
        for sock in agent.listeners.values():
            sock.close()
        return seen

    seen = asyncio.run(scenario())
    first, ready, *flips, stopped = seen
    assert "datapath: not reconciled" in first
    assert "listeners: not all of 15001/15006/15008 are open" in first
    assert "telemetry: /metrics is not listening" in first  # not started yet
    assert ready == []
    removed, restored = flips[0::2], flips[1::2]
    assert removed == [
        ["state: not loaded"],
        ["listeners: not all of 15001/15006/15008 are open"],
        ["datapath: last reconcile failed: netlink: EBUSY"],
        ["identity: no certificate yet for x"],
        [],  # degraded is not a readiness failure
    ]
    assert restored == [[], [], [], [], []]
    assert degraded[-1] == ["identity: CA unreachable since t"] and degraded[:-1] == [[]] * 4
    assert stopped == ["telemetry: /metrics is not listening", "admin: API is not listening"]
