"""Telemetry as a component of ``nodemesh agent``: ``GET /metrics`` on ``--metrics-port``.

The endpoint serves one ``CollectorRegistry`` per agent holding: the shared declared metrics
(``agent.telemetry.registry``), the Istio TCP metrics of this agent's proxy (``TcpMetrics``,
which is also the access log), and nodemesh's scrape-time collector (``AgentCollector``). It is
served from the data plane's event loop: collectors read the proxy's live records without locks.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from agent.admin.http import HttpServer, Request, Response
from agent.proxy.records import Registry
from agent.state import StateStore
from agent.telemetry.agentmetrics import AgentCollector, AgentSources
from agent.telemetry.registry import REGISTRY
from agent.telemetry.tcp import TcpMetrics

log = logging.getLogger(__name__)


class _Declared(Collector):
    """The metrics declared with ``agent.telemetry.registry`` (shared by the process)."""

    def collect(self) -> Iterator[Metric]:
        yield from REGISTRY.collect()


class TelemetryComponent:
    name = "telemetry"

    def __init__(
        self,
        *,
        store: StateStore,
        address: tuple[str, int],
        sources: AgentSources,
        connections: Registry | None = None,
    ) -> None:
        self.address = address
        self.tcp = TcpMetrics(store)
        self.registry = CollectorRegistry(auto_describe=False)
        for collector in (_Declared(), self.tcp, AgentCollector(sources)):
            self.registry.register(collector)
        if connections is not None:
            connections.observers.append(self.tcp)
        self._server = HttpServer(self._handle)
        self.port = address[1]

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    def _handle(self, request: Request) -> Response:
        if request.path != "/metrics":
            return Response.json(404, {"error": "only /metrics is served on this port"})
        if request.method != "GET":
            return Response.json(405, {"error": "use GET /metrics"})
        return Response(200, self.exposition(), CONTENT_TYPE_LATEST)

    async def start(self) -> None:
        host, port = self.address
        try:
            self.port = await self._server.start(host, port)
        except OSError as e:
            raise OSError(
                f"cannot serve metrics on {host}:{port}: {e.strerror}; is another agent running "
                "in this network namespace? choose another --metrics-port"
            ) from e
        log.info("metrics on http://%s:%d/metrics", host, self.port)

    def not_ready(self) -> list[str]:
        return [] if self._server.listening else ["telemetry: /metrics is not listening"]

    async def stop(self) -> None:
        await self._server.stop()
