"""nodemesh's own metrics, read at scrape time from the components that already count them.

Why a scrape-time collector instead of counters incremented in place: the proxy's registry
already counts rejections and denials, the identity manager knows every certificate's expiry,
the BPF programs count captures in a per-CPU map, and the state source counts its lists and
watch events. Reading those when Prometheus asks costs the data path nothing and cannot drift
from the numbers the admin API shows. Metrics that have no other home (CA request outcomes,
traffic control) are declared in ``agent.base.metrics`` and incremented where they happen.

Every label value here comes from a bounded set: a rejection reason, a policy name, a local
identity, a BPF program and counter, a Kubernetes resource.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from agent.base.promtext import Collector, CounterMetricFamily, GaugeMetricFamily

log = logging.getLogger(__name__)

# Rejection reasons (agent.proxy) that are failures of the TLS/HBONE handshake itself.
HANDSHAKE_CAUSES = frozenset(
    {"tls_handshake_failed", "handshake_timeout", "wrong_alpn", "peer_identity"}
)

Family = CounterMetricFamily | GaugeMetricFamily


@dataclass
class AgentSources:
    """Where the collector reads; each is optional (an agent without a CA has no proxy)."""

    rejections: Callable[[], Mapping[str, int]] | None = None
    denials: Callable[[], Mapping[str, int]] | None = None
    rate_limited: Callable[[], Mapping[str, int]] | None = None
    pool_size: Callable[[], int] | None = None
    inbound_tunnels: Callable[[], int] | None = None
    hbone_budget: Callable[[], Mapping[str, int | None]] | None = None
    certificates: Callable[[], list[dict[str, object]]] | None = None
    capture_counters: Callable[[], Mapping[str, Mapping[str, int]]] | None = None
    state_stats: Callable[[], Mapping[str, Mapping[str, int]]] | None = None
    state_version: Callable[[], int] | None = None
    state_error: Callable[[], str | None] | None = None
    state_changed_at: Callable[[], float] | None = None


def _counter(name: str, doc: str, labels: list[str], values: Mapping[Any, int]) -> Family:
    family = CounterMetricFamily(name, doc, labels=labels)
    for key, value in sorted(values.items()):
        family.add_metric(list(key) if isinstance(key, tuple) else [key], value)
    return family


def _gauge(name: str, doc: str, value: float) -> Family:
    return GaugeMetricFamily(name, doc, value=value)


def _budget(snapshot: Mapping[str, int | None]) -> Iterator[Family]:
    """The HBONE buffer budget (``agent.proxy.budget.HboneBudget.snapshot``)."""
    used = GaugeMetricFamily(
        "nodemesh_hbone_buffer_bytes",
        "Bytes HBONE connections hold (received, not yet written to the pod) or have promised "
        "to peers (open connection windows), together bounded by the buffer budget, and hold "
        "for peers (queued: outgoing, not yet read by the peer), bounded by the queue budget; "
        "by kind",
        labels=["kind"],
    )
    for kind in ("held", "promised", "queued"):
        used.add_metric([kind], snapshot.get(kind) or 0)
    yield used
    queue_limit = snapshot.get("queue_limit")
    if queue_limit is not None:
        yield _gauge(
            "nodemesh_hbone_queue_budget_bytes",
            "The HBONE outgoing queue budget (--hbone-queue-budget; summed over the workers)",
            queue_limit,
        )
    limit = snapshot["limit"]
    if limit is not None:
        yield _gauge(
            "nodemesh_hbone_buffer_budget_bytes",
            "The HBONE buffer budget (--hbone-buffer-budget; summed over the workers)",
            limit,
        )


class AgentCollector(Collector):
    def __init__(self, sources: AgentSources) -> None:
        self.sources = sources

    def collect(self) -> Iterator[Family]:
        for produce in (self._proxy, self._identity, self._capture, self._state):
            try:
                yield from produce()
            except OSError as e:  # a kernel map read failed: skip it, keep the rest
                log.warning("metrics: %s skipped this scrape: %s", produce.__name__, e)

    def _proxy(self) -> Iterator[Family]:
        s = self.sources
        if s.rejections is not None:
            rejections = dict(s.rejections())
            yield _counter(
                "nodemesh_rejected_connections_total",
                "Connections or HBONE streams refused by the proxy, by reason",
                ["reason"],
                rejections,
            )
            handshakes = {k: v for k, v in rejections.items() if k in HANDSHAKE_CAUSES}
            yield _counter(
                "nodemesh_handshake_failures_total",
                "Inbound TLS/HBONE handshakes that failed, by cause",
                ["cause"],
                {cause: handshakes.get(cause, 0) for cause in HANDSHAKE_CAUSES},
            )
        if s.denials is not None:
            yield _counter(
                "nodemesh_policy_denials_total",
                "Connections denied by authorization policy, by deciding policy "
                "(no-allow-match: ALLOW policies exist and none matched)",
                ["policy"],
                dict(s.denials()),
            )
        if s.rate_limited is not None:
            yield _counter(
                "nodemesh_rate_limited_requests_total",
                "HTTP requests answered 429 (gRPC RESOURCE_EXHAUSTED) by a RateLimitPolicy, "
                "by target Service",
                ["service"],
                dict(s.rate_limited()),
            )
        if s.pool_size is not None:
            yield _gauge(
                "nodemesh_hbone_pool_connections",
                "Outbound HBONE (mTLS) connections held in the pool",
                s.pool_size(),
            )
        if s.inbound_tunnels is not None:
            yield _gauge(
                "nodemesh_hbone_inbound_connections",
                "Inbound HBONE (mTLS) connections from peers",
                s.inbound_tunnels(),
            )

        if s.hbone_budget is not None:
            yield from _budget(s.hbone_budget())

    def _identity(self) -> Iterator[Family]:
        if self.sources.certificates is None:
            return
        expiry = GaugeMetricFamily(
            "nodemesh_certificate_expiry_timestamp_seconds",
            "Expiry (Unix time) of the certificate held for each local identity",
            labels=["identity"],
        )
        failing = GaugeMetricFamily(
            "nodemesh_certificate_renewal_failing_seconds",
            "Seconds since certificate requests for each local identity started failing "
            "(0 when the last one succeeded); alert on it with the expiry gauge",
            labels=["identity"],
        )
        states: dict[str, int] = {}
        now = time.time()
        for entry in self.sources.certificates():
            state = str(entry["state"])
            states[state] = states.get(state, 0) + 1
            cert = entry.get("certificate")
            if isinstance(cert, Mapping):
                not_after = dt.datetime.fromisoformat(str(cert["not_after"]))
                expiry.add_metric([str(entry["identity"])], not_after.timestamp())
            since = entry.get("failing_since")
            started = dt.datetime.fromisoformat(str(since)).timestamp() if since else now
            failing.add_metric([str(entry["identity"])], max(now - started, 0.0))
        yield expiry
        yield failing
        by_state = GaugeMetricFamily(
            "nodemesh_certificates", "Local identities by certificate state", labels=["state"]
        )
        for state in ("Initializing", "Available", "Unavailable"):
            by_state.add_metric([state], states.get(state, 0))
        yield by_state

    def _capture(self) -> Iterator[Family]:
        if self.sources.capture_counters is None:
            return
        values = {
            (program, outcome): n
            for program, counters in self.sources.capture_counters().items()
            for outcome, n in counters.items()
        }
        yield _counter(
            "nodemesh_capture_packets_total",
            "Decisions of the BPF capture programs (sum over CPUs), by program and outcome",
            ["program", "outcome"],
            values,
        )

    def _state(self) -> Iterator[Family]:
        s = self.sources
        if s.state_version is not None:
            yield _gauge(
                "nodemesh_state_version", "Version of the agent's state", s.state_version()
            )
        if s.state_changed_at is not None:
            yield _gauge(
                "nodemesh_state_last_change_timestamp_seconds",
                "When the state last changed (Unix time; time() minus this is how stale the "
                "agent's view may be when the cluster is known to have changed since)",
                s.state_changed_at(),
            )
        if s.state_error is not None:
            yield _gauge(
                "nodemesh_state_source_error",
                "1 while the state source's last load or sync failed (the previous state is kept)",
                1 if s.state_error() else 0,
            )
        if s.state_stats is not None:
            values = {
                (resource, event): n
                for resource, stats in s.state_stats().items()
                for event, n in stats.items()
            }
            yield _counter(
                "nodemesh_state_sync_events_total",
                "State source activity (Kubernetes: lists, watches, events, relists, errors; "
                "local file: loads, errors), by resource and event",
                ["resource", "event"],
                values,
            )
