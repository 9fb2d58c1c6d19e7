"""Traffic-control counters in the agent's metric registry (``agent.base.metrics``).

``agent.policy.traffic`` counts events without knowing about Prometheus; its observer hook calls
``observe(service, event, detail)`` here, which increments the matching metric. Label values are
bounded: a Service (``namespace/name``), a subset name from its policy, or one of a fixed set of
reasons, causes and fault kinds.
"""

from __future__ import annotations

from prometheus_client import Counter

from agent.base.metrics import counter

_SERVICE = ["service"]

CONNECTIONS = counter(
    "nodemesh_service_connections_total", "Connections to a Service VIP admitted", _SERVICE
)
REJECTIONS = counter(
    "nodemesh_service_rejections_total",
    "Connections to a Service refused at once by its limits, by reason "
    "(max_connections, max_pending; for HTTP requests max_pending_requests: the queue of "
    "requests waiting for a max_connections slot was full)",
    [*_SERVICE, "reason"],
)
FAILURES = counter(
    "nodemesh_service_connect_failures_total",
    "Failed connect attempts to a Service's endpoints, by cause "
    "(connect-failure, refused, reset-before-data)",
    [*_SERVICE, "cause"],
)
RETRIES = counter("nodemesh_service_retries_total", "Connect attempts retried", _SERVICE)
BUDGET = counter(
    "nodemesh_service_retry_budget_exhausted_total",
    "Retries refused because the Service's retry budget was spent",
    _SERVICE,
)
OUTLIER = counter(
    "nodemesh_service_outlier_events_total",
    "Outlier detection: endpoints ejected, returned after a probe, or left in because of "
    "maxEjectionPercent (capped)",
    [*_SERVICE, "event"],
)
FAULTS = counter(
    "nodemesh_service_faults_injected_total",
    "Faults injected into new connections (delay, abort_reset, abort_refuse)",
    [*_SERVICE, "fault"],
)
SPLITS = counter(
    "nodemesh_service_split_decisions_total",
    "Connections sent to each subset of a weighted split",
    [*_SERVICE, "subset"],
)
HTTP_RETRIES = counter(
    "nodemesh_http_retries_total",
    "HTTP requests a route rule's retry would try again, by outcome (attempted: sent again; "
    "budget_exhausted: refused by the backend Service's retry budget; attempts_exhausted: the "
    "rule's attempts were spent; unsafe: the request could not be replayed)",
    [*_SERVICE, "outcome"],
)
HTTP_MIRRORS = counter(
    "nodemesh_http_mirrored_total",
    "Copies of HTTP requests for a route's RequestMirror, by the mirror Service and outcome "
    "(sent; failed; denied: same-node policy; too_large: body over the replay limit; "
    "overflow: too many copies in flight)",
    [*_SERVICE, "outcome"],
)
OTHER = counter(
    "nodemesh_service_traffic_events_total",
    "Other traffic-control events (panic: every endpoint ejected, so all were candidates; "
    "no_endpoints; retry_deadline: the overall connect timeout ended the retries; queued: an "
    "HTTP request waited for a max_connections slot; dequeued: it gave up waiting)",
    [*_SERVICE, "event"],
)

_BY_DETAIL = {
    "rejected": REJECTIONS,
    "failed": FAILURES,
    "outlier": OUTLIER,
    "fault": FAULTS,
    "split": SPLITS,
    "http_retry": HTTP_RETRIES,
    "http_mirror": HTTP_MIRRORS,
}
_PLAIN = {"connections": CONNECTIONS, "retries": RETRIES, "retry_budget_exhausted": BUDGET}
# The counter child of each (service, event, detail) seen: ``labels()`` costs a few µs (a lock,
# the values checked and joined) and an HTTP Service port counts every request. The keys are
# the metrics' own label values, as bounded; the children are never removed from the metrics.
_children: dict[tuple[str, str, str], Counter] = {}


def observe(service: str, event: str, detail: str) -> None:
    """The traffic-control observer: one event of ``service`` becomes one counter increment."""
    key = (service, event, detail)
    child = _children.get(key)
    if child is None:
        child = _children[key] = _child(service, event, detail)
    child.inc()


def _child(service: str, event: str, detail: str) -> Counter:
    if event in _BY_DETAIL:
        return _BY_DETAIL[event].labels(service, detail)
    if event in _PLAIN:
        return _PLAIN[event].labels(service)
    return OTHER.labels(service, event)
