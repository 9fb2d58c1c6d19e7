"""nodemesh's own metrics: scrape-time collector, CA outcomes, the shared registry, log levels."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter

import pytest

from agent.base.metrics import MetricDeclarationError, counter
from agent.identity.caclient import CaError
from agent.identity.grpcunary import Status
from agent.identity.metrics import CountingFetcher
from agent.identity.spiffe import SpiffeId
from agent.telemetry.agentmetrics import AgentSources
from agent.telemetry.component import TelemetryComponent
from agent.telemetry.loglevel import LogLevelError, levels, set_level
from tests.unit.telemetry.telemetry_helpers import CLIENT_ID, make_store, samples, total

CERT_STATES = [
    {
        "identity": CLIENT_ID,
        "state": "Available",
        "certificate": {"not_after": "2030-01-01T00:00:00+00:00"},
        "failing_since": None,
    },
    {
        "identity": "spiffe://cluster.local/ns/default/sa/b",
        "state": "Unavailable",
        "certificate": None,
        "failing_since": "2020-01-01T00:00:00+00:00",
    },
]


def component(sources: AgentSources) -> TelemetryComponent:
    return TelemetryComponent(store=make_store(), address=("127.0.0.1", 0), sources=sources)


def test_collector_reads_every_source_at_scrape_time() -> None:
    rejections = Counter({"tls_handshake_failed": 2, "no_endpoints": 1})
    sources = AgentSources(
        rejections=lambda: rejections,
        denials=lambda: {"default/deny-all": 3},
        rate_limited=lambda: {"web.default.svc.cluster.local": 7},
        pool_size=lambda: 4,
        inbound_tunnels=lambda: 1,
        certificates=lambda: CERT_STATES,
        capture_counters=lambda: {"pod_ingress": {"captured": 5, "failed_closed": 1}},
        state_stats=lambda: {"pods": {"lists": 1, "events": 9}},
        state_version=lambda: 12,
        state_error=lambda: "bad YAML",
        state_changed_at=lambda: 1700000000.0,
    )
    scraped = time.time()
    parsed = samples(component(sources).exposition())
    assert total(parsed, "nodemesh_rejected_connections_total", reason="no_endpoints") == 1
    assert total(parsed, "nodemesh_handshake_failures_total", cause="tls_handshake_failed") == 2
    assert total(parsed, "nodemesh_handshake_failures_total", cause="wrong_alpn") == 0
    assert total(parsed, "nodemesh_policy_denials_total", policy="default/deny-all") == 3
    web = "web.default.svc.cluster.local"
    assert total(parsed, "nodemesh_rate_limited_requests_total", service=web) == 7
    assert total(parsed, "nodemesh_hbone_pool_connections") == 4
    assert total(parsed, "nodemesh_hbone_inbound_connections") == 1
    expiry = total(parsed, "nodemesh_certificate_expiry_timestamp_seconds", identity=CLIENT_ID)
    assert expiry == 1893456000
    assert total(parsed, "nodemesh_certificates", state="Unavailable") == 1
    failing = "nodemesh_certificate_renewal_failing_seconds"
    assert total(parsed, failing, identity=CLIENT_ID) == 0
    since_2020 = total(parsed, failing, identity="spiffe://cluster.local/ns/default/sa/b")
    assert scraped - 1577836800 <= since_2020 <= time.time() - 1577836800
    captured = total(
        parsed, "nodemesh_capture_packets_total", program="pod_ingress", outcome="captured"
    )
    assert captured == 5
    assert total(parsed, "nodemesh_state_sync_events_total", resource="pods", event="events") == 9
    assert total(parsed, "nodemesh_state_version") == 12
    assert total(parsed, "nodemesh_state_source_error") == 1
    assert total(parsed, "nodemesh_state_last_change_timestamp_seconds") == 1700000000
    rejections["no_endpoints"] += 1  # read again at the next scrape, not copied at start
    again = samples(component(sources).exposition())
    assert total(again, "nodemesh_rejected_connections_total", reason="no_endpoints") == 2


def test_a_failing_kernel_read_skips_only_its_family() -> None:
    def broken() -> dict[str, dict[str, int]]:
        raise OSError("map gone")

    parsed = samples(
        component(AgentSources(capture_counters=broken, state_version=lambda: 1)).exposition()
    )
    assert total(parsed, "nodemesh_state_version") == 1
    assert not [n for n, _ in parsed if n.startswith("nodemesh_capture")]


class _Fetcher:
    def __init__(self, error: Exception | None) -> None:
        self.error = error

    async def fetch(self, identity: SpiffeId) -> object:
        if self.error is not None:
            raise self.error
        return identity


def test_ca_request_outcomes_are_counted() -> None:
    def outcome(name: str) -> float:
        exposition = component(AgentSources()).exposition()
        return total(samples(exposition), "nodemesh_ca_requests_total", outcome=name)

    ident = SpiffeId.parse(CLIENT_ID)
    before = {k: outcome(k) for k in ("ok", "PERMISSION_DENIED", "error")}
    asyncio.run(CountingFetcher(_Fetcher(None)).fetch(ident))  # type: ignore[arg-type]
    for error in (CaError("no", Status.PERMISSION_DENIED), ValueError("bad answer")):
        with pytest.raises(type(error)):
            asyncio.run(CountingFetcher(_Fetcher(error)).fetch(ident))  # type: ignore[arg-type]
    assert outcome("ok") == before["ok"] + 1
    assert outcome("PERMISSION_DENIED") == before["PERMISSION_DENIED"] + 1
    assert outcome("error") == before["error"] + 1


def test_registry_returns_the_same_metric_and_refuses_a_conflicting_declaration() -> None:
    first = counter("nodemesh_test_things_total", "things", ["kind"])
    assert counter("nodemesh_test_things_total", "things", ["kind"]) is first
    with pytest.raises(MetricDeclarationError, match="same type and labels"):
        counter("nodemesh_test_things_total", "things", ["other"])
    first.labels(kind="a").inc(2)
    parsed = samples(component(AgentSources()).exposition())
    assert total(parsed, "nodemesh_test_things_total", kind="a") == 2


def test_log_levels_change_at_run_time_and_reject_unknown_names() -> None:
    proxy = logging.getLogger("agent.proxy")
    old = proxy.level
    try:
        assert set_level("debug", "agent.proxy")["agent.proxy"] == "debug"
        assert proxy.isEnabledFor(logging.DEBUG)
        with pytest.raises(LogLevelError, match="use one of debug"):
            set_level("loud", "agent.proxy")
        with pytest.raises(LogLevelError, match="unknown logger"):
            set_level("info", "agent.nope")
        assert levels()["agent.proxy"] == "debug"
    finally:
        proxy.setLevel(old)


def test_the_hbone_buffer_budget_is_read_at_scrape_time() -> None:
    from agent.proxy.budget import HboneBudget

    budget = HboneBudget(64 << 20)

    class Holder:
        held = 1000

    holder = Holder()
    account = budget.open(holder)
    account.take(5000)
    parsed = samples(component(AgentSources(hbone_budget=budget.snapshot)).exposition())
    assert total(parsed, "nodemesh_hbone_buffer_bytes", kind="held") == 1000
    assert total(parsed, "nodemesh_hbone_buffer_bytes", kind="promised") == 65535 + 5000 - 1000
    assert total(parsed, "nodemesh_hbone_buffer_budget_bytes") == 64 << 20


def test_the_hbone_queue_budget_is_read_at_scrape_time() -> None:
    from agent.proxy.budget import HboneBudget

    budget = HboneBudget(64 << 20, queue_limit=8 << 20)
    account = budget.queue.open()
    account.set(300_000)
    parsed = samples(component(AgentSources(hbone_budget=budget.snapshot)).exposition())
    assert total(parsed, "nodemesh_hbone_buffer_bytes", kind="queued") == 300_000
    assert total(parsed, "nodemesh_hbone_queue_budget_bytes") == 8 << 20
