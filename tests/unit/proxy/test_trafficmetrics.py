"""Traffic-control events become counter increments (agent.proxy.trafficmetrics), each on the
series of its own Service, event and detail, also when the counter child is remembered."""

from __future__ import annotations

from agent.base.metrics import REGISTRY
from agent.proxy.trafficmetrics import observe


def count(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_each_event_counts_on_its_own_series_every_time() -> None:
    web, api = "test-trafficmetrics/web", "test-trafficmetrics/api"
    for _ in range(3):
        observe(web, "connections", "")
    observe(api, "connections", "")
    observe(web, "rejected", "max_connections")
    observe(web, "rejected", "max_pending")
    observe(web, "rejected", "max_pending")
    observe(web, "panic", "")
    observe(web, "panic", "")
    assert count("nodemesh_service_connections_total", service=web) == 3
    assert count("nodemesh_service_connections_total", service=api) == 1
    rejections = "nodemesh_service_rejections_total"
    assert count(rejections, service=web, reason="max_connections") == 1
    assert count(rejections, service=web, reason="max_pending") == 2
    assert count(rejections, service=api, reason="max_pending") == 0
    assert count("nodemesh_service_traffic_events_total", service=web, event="panic") == 2
