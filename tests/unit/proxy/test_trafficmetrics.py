"""Traffic-control events become counts (agent.proxy.trafficmetrics), each on the series of its
own Service, event and detail, exposed exactly as prometheus_client's Counters exposed them."""

from __future__ import annotations

from unittest.mock import patch

from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import (
    CollectorRegistry,
    Counter,
    disable_created_metrics,
    enable_created_metrics,
    generate_latest,
)

from agent.base import promtext
from agent.base.metrics import REGISTRY
from agent.proxy import trafficmetrics
from agent.proxy.trafficmetrics import observe
from agent.workers import merge


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


# Events as traffic control reports them: every event kind, details the counters label and
# details they do not (which must fold into one series), a few Services.
_EVENTS = st.tuples(
    st.sampled_from(["default/web", "default/api", "other/web"]),
    st.sampled_from(
        ["connections", "retries", "retry_budget_exhausted", "rejected", "failed", "outlier",
         "fault", "split", "http_retry", "http_mirror", "panic", "queued", "no_endpoints"]
    ),
    st.sampled_from(["", "max_pending", "refused", "v1", "attempted"]),
)  # fmt: skip


def _counters_registry(events: list[tuple[str, str, str]], clock: list[float]) -> CollectorRegistry:
    """What ``observe`` did before: a prometheus_client Counter per family, the child of each
    (service, event, detail) made on its first event and incremented."""
    registry = CollectorRegistry(auto_describe=True)
    counters = {
        family: Counter(family.name, family.doc, list(family.labels), registry=registry)
        for family in trafficmetrics._FAMILIES
    }
    children = {}
    for key in events:
        clock[0] += 1.0
        if key not in children:
            family, values = trafficmetrics.series(*key)
            children[key] = counters[family].labels(*values)
        children[key].inc()
    return registry


def _collector_registry(
    events: list[tuple[str, str, str]], clock: list[float]
) -> promtext.Registry:
    registry = promtext.Registry(describe_by_collect=True)
    counters = trafficmetrics.ServiceCounters()
    registry.register(counters)
    for key in events:
        clock[0] += 1.0
        counters.observe(*key)
    return registry


@settings(max_examples=150, deadline=None)
@given(
    workers=st.lists(st.lists(_EVENTS, max_size=40), min_size=1, max_size=3),
    created=st.booleans(),
)
def test_the_exposition_is_the_counters_one_also_merged_across_workers(
    workers: list[list[tuple[str, str, str]]], created: bool
) -> None:
    """For any events, the collector's exposition is byte for byte what prometheus_client's
    Counters give, ``_created`` samples included (or left out when turned off), and so is the
    merge of several workers' (``agent.workers.merge``)."""
    clock = [1.7e9]
    default = promtext.created_series()
    (enable_created_metrics if created else disable_created_metrics)()
    promtext.set_created_series(created)
    try:
        with patch("time.time", lambda: clock[0]):
            ours, theirs = [], []
            for events in workers:
                start = clock[0]
                ours.append(_collector_registry(events, clock))
                clock[0] = start  # the same events at the same times
                theirs.append(_counters_registry(events, clock))
        for mine, reference in zip(ours, theirs, strict=True):
            assert promtext.exposition(mine) == generate_latest(reference)
        assert merge.expositions([promtext.exposition(r) for r in ours]) == merge.expositions(
            [generate_latest(r) for r in theirs]
        )
    finally:
        enable_created_metrics()
        promtext.set_created_series(default)


def test_the_agents_registry_serves_the_families_where_the_counters_were() -> None:
    """Every family is in the agent's registry (HELP and TYPE even before any event), next to
    the metrics declared with ``agent.base.metrics``, and an event shows at once."""
    observe("test-trafficmetrics/scrape", "split", "v2")
    text = promtext.exposition(REGISTRY).decode()
    for family in trafficmetrics._FAMILIES:
        name = family.name.removesuffix("_total")
        assert f"# HELP {name}_total {family.doc}\n# TYPE {name}_total counter\n" in text
    assert (
        'nodemesh_service_split_decisions_total{service="test-trafficmetrics/scrape",'
        'subset="v2"} 1.0' in text
    )
