"""The HTTP endpoints as agent components: listening, readiness, and a taken address."""

from __future__ import annotations

import asyncio
import socket
import urllib.request

import pytest

from agent.base.endpoint import HttpComponent
from agent.telemetry.agentmetrics import AgentSources
from agent.telemetry.component import TelemetryComponent
from tests.unit.telemetry.telemetry_helpers import make_store


def telemetry(port: int) -> TelemetryComponent:
    return TelemetryComponent(
        store=make_store(), address=("127.0.0.1", port), sources=AgentSources()
    )


def test_a_taken_address_names_what_and_the_option_to_change() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        component = telemetry(port)
        with pytest.raises(OSError) as info:
            asyncio.run(component.start())
    message = str(info.value)
    assert message.startswith(f"cannot serve metrics on 127.0.0.1:{port}: ")
    assert message.endswith("choose another --metrics-port")
    assert isinstance(info.value.__cause__, OSError)
    assert component.not_ready() == ["telemetry: /metrics is not listening"]


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=5) as response:
        body: bytes = response.read()
        return body


def test_ready_while_listening_on_the_bound_port_and_not_after_stop() -> None:
    component: HttpComponent = telemetry(0)

    async def scenario() -> tuple[list[str], int, bytes, list[str]]:
        await component.start()
        ready = component.not_ready()
        url = f"http://127.0.0.1:{component.port}/metrics"
        body = await asyncio.to_thread(_get, url)
        await component.stop()
        return ready, component.port, body, component.not_ready()

    ready, port, body, stopped = asyncio.run(scenario())
    assert ready == [] and port != 0
    assert b"# TYPE" in body
    assert stopped == ["telemetry: /metrics is not listening"]
