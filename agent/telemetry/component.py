"""Telemetry as a component of ``nodemesh agent``: ``GET /metrics`` on ``--metrics-port``.

The endpoint serves one ``promtext.Registry`` per agent holding: the shared declared metrics
(``agent.base.metrics``), the Istio TCP metrics of this agent's proxy (``TcpMetrics``,
which is also the access log), its Istio request metrics (``HttpMetrics``), and nodemesh's
scrape-time collector (``AgentCollector``). It is served from the data plane's event loop:
collectors read the proxy's live records without locks.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator

from agent.base.endpoint import HttpComponent
from agent.base.http import Request, Response
from agent.base.metrics import REGISTRY
from agent.base.promtext import (
    CONTENT_TYPE,
    Collector,
    MetricFamily,
    Registry,
    exposition,
    exposition_parts,
)
from agent.state import StateStore
from agent.telemetry.accesslog import RequestSampler
from agent.telemetry.agentmetrics import AgentCollector, AgentSources
from agent.telemetry.http import HttpMetrics
from agent.telemetry.tcp import TcpMetrics


class _Declared(Collector):
    """The metrics declared with ``agent.base.metrics`` (shared by the process)."""

    def collect(self) -> Iterator[MetricFamily]:
        yield from REGISTRY.collect()


class TelemetryComponent(HttpComponent):
    name = "telemetry"
    serves = "metrics"
    url_path = "/metrics"
    option = "--metrics-port"
    not_listening = "telemetry: /metrics is not listening"

    def __init__(
        self,
        *,
        store: StateStore,
        address: tuple[str, int],
        sources: AgentSources,
        access_log_sample: float = 1.0,
        merge: Callable[[bytes], Awaitable[bytes]] | None = None,
    ) -> None:
        super().__init__(self._handle, address)
        # --workers N: this process's exposition merged with the workers' (agent.workers.views)
        self._merge = merge
        self.tcp = TcpMetrics(store)
        self.http = HttpMetrics(store, sampler=RequestSampler(access_log_sample))
        self.registry = Registry()
        for collector in (_Declared(), self.tcp, self.http, AgentCollector(sources)):
            self.registry.register(collector)

    def exposition(self) -> bytes:
        return exposition(self.registry)

    async def render(self) -> bytes:
        """The exposition, made a part at a time with the loop let run between parts
        (``render_parts``), joined (a worker's answer to the main process, the merge)."""
        return b"".join(await self.render_parts())

    async def render_parts(self) -> tuple[bytes, ...]:
        """The exposition's parts, made with the loop let run between them: the connections
        this loop relays wait one part (under 1 ms measured), not the whole scrape
        (``promtext.exposition_parts``; tens of ms from a few hundred label sets)."""
        parts = []
        for part in exposition_parts(self.registry):
            parts.append(part)
            await asyncio.sleep(0)
        return tuple(parts)

    async def _handle(self, request: Request) -> Response:
        if request.path != "/metrics":
            return Response.json(404, {"error": "only /metrics is served on this port"})
        if request.method != "GET":
            return Response.json(405, {"error": "use GET /metrics"})
        if self._merge is not None:
            return Response(200, await self._merge(await self.render()), CONTENT_TYPE)
        return Response(200, b"", CONTENT_TYPE, await self.render_parts())
