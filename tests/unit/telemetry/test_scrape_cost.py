"""What a scrape of the Istio metrics does grows with the label sets new since the last one, not
with all of them (``promtext.LabelText``): a series' label text is made at its first scrape and
written from then on as it is. Counted by calls, not timed."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from unittest.mock import patch

import pytest

from agent.base import promtext
from agent.base.http import Request, Response
from agent.proxy.records import Registry
from agent.telemetry.agentmetrics import AgentSources
from agent.telemetry.component import TelemetryComponent
from agent.telemetry.http import REQUEST_LABEL_NAMES
from agent.telemetry.records import RequestRecord
from tests.unit.telemetry.telemetry_helpers import inbound, make_store, outbound


@pytest.fixture
def component() -> Iterator[TelemetryComponent]:
    component = TelemetryComponent(
        store=make_store(), address=("127.0.0.1", 0), sources=AgentSources()
    )
    component.tcp._access_log = component.http._access_log = False
    yield component


def _traffic(component: TelemetryComponent, statuses: list[int]) -> None:
    """A TCP connection (out and in, two label sets) and a request per status (a label set
    each)."""
    registry = Registry()
    registry.observers.append(component.tcp)
    registry.request_observers.append(component.http)
    for record in (outbound(), inbound()):
        registry.remove(registry.add(record, lambda _reason: None))
    for status in statuses:
        registry.request_done(
            inbound(), RequestRecord("GET", "/", "server:80", status, 2.0, 10, 20, "-", "rid")
        )


def _scrape(component: TelemetryComponent) -> tuple[bytes, int]:
    """The Istio collectors' exposition and how many label values it escaped."""
    escape = promtext.escape_label_value
    calls = 0

    def counted(value: str) -> str:
        nonlocal calls
        calls += 1
        return escape(value)

    with patch.object(promtext, "escape_label_value", counted):
        body = promtext.exposition(component.tcp) + promtext.exposition(component.http)
    return body, calls


def test_a_scrape_formats_the_labels_of_new_series_only(component: TelemetryComponent) -> None:
    _traffic(component, [200, 404])
    first, first_calls = _scrape(component)
    assert first_calls > 0 and b'response_code="404"' in first
    again, again_calls = _scrape(component)
    assert (again, again_calls) == (first, 0)
    _traffic(component, [200, 503])  # the same TCP and 200 label sets, one new: 503
    later, later_calls = _scrape(component)
    assert later_calls == len(REQUEST_LABEL_NAMES)
    assert later != first and b'response_code="503"' in later
    assert _scrape(component)[1] == 0


def test_the_metrics_endpoint_lets_the_loop_run_between_parts_of_a_scrape(
    component: TelemetryComponent,
) -> None:
    """``GET /metrics`` renders a part at a time (``promtext.PART_LINES``) and lets the loop
    serve other work between parts: another task runs at least once per part while one
    scrape is made, and the body is the exposition made at once."""
    _traffic(component, list(range(200, 230)))  # 30 request label sets: about 1,500 lines
    ticks = 0

    async def other_connection() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    async def scrape() -> Response:
        ticker = asyncio.create_task(other_connection())
        await asyncio.sleep(0)
        before = ticks
        response = await component._handle(Request("GET", "/metrics"))
        during = ticks - before
        ticker.cancel()
        assert during > 0
        parts = sum(1 for _ in promtext.exposition_parts(component.registry))
        assert parts >= 3 and during >= parts - 1
        return response

    response = asyncio.run(scrape())
    assert response.status == 200
    assert len(response.parts) > 1 and response.body == b""  # sent in parts, never joined
    assert b"".join(response.chunks()) == component.exposition()
