"""Traffic-control counters of the agent's metrics, kept as plain integers and exposed at scrape.

``agent.policy.traffic`` counts events without knowing about Prometheus; its observer hook calls
``observe(service, event, detail)`` here, which adds one to the event's count. Label values are
bounded: a Service (``namespace/name``), a subset name from its policy, or one of a fixed set of
reasons, causes and fault kinds.

Why integers and a collector rather than Counters (``agent.base.promtext``, as
prometheus_client's): every HTTP request and
gRPC call through a Service port counts its admission (``connections``), and a Counter's ``inc``
is five Python calls and a lock on each (a child's ``inc``, its value's, the lock's enter and
exit); ``observe`` is one dict increment. ``ServiceCounters.collect`` builds the families at
scrape, as ``agent.telemetry.http.HttpMetrics`` does for Istio's request metrics, and gives
exactly the exposition the Counters gave: the same names, HELP, TYPE, labels and values, and
a ``_created`` sample per series, taken when its first event came (when the Counter's child
was made), unless ``promtext.set_created_series(False)`` (or the environment) turned those off.
``tests/unit/proxy/test_trafficmetrics.py`` holds both expositions equal for random event
sequences (hypothesis), also merged across processes as ``agent.workers.merge`` merges the
workers'. The collector is registered in ``agent.base.metrics``'s registry where the Counters
were declared, so the families keep their place in ``/metrics``.

Single-threaded: traffic control's observers and the scrape run on the process's event loop.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

from agent.base import promtext
from agent.base.metrics import REGISTRY
from agent.base.promtext import Collector, CounterMetricFamily

Event = tuple[str, str, str]  # service, event, detail


@dataclass(frozen=True, slots=True)
class _Family:
    """One counter as it is exposed (``name`` with ``_total``, as the Counter was declared)."""

    name: str
    doc: str
    labels: tuple[str, ...]


_SERVICE = ("service",)

CONNECTIONS = _Family(
    "nodemesh_service_connections_total", "Connections to a Service VIP admitted", _SERVICE
)
REJECTIONS = _Family(
    "nodemesh_service_rejections_total",
    "Connections to a Service refused at once by its limits, by reason "
    "(max_connections, max_pending; for HTTP requests max_pending_requests: the queue of "
    "requests waiting for a max_connections slot was full)",
    (*_SERVICE, "reason"),
)
FAILURES = _Family(
    "nodemesh_service_connect_failures_total",
    "Failed connect attempts to a Service's endpoints, by cause "
    "(connect-failure, refused, reset-before-data)",
    (*_SERVICE, "cause"),
)
RETRIES = _Family("nodemesh_service_retries_total", "Connect attempts retried", _SERVICE)
BUDGET = _Family(
    "nodemesh_service_retry_budget_exhausted_total",
    "Retries refused because the Service's retry budget was spent",
    _SERVICE,
)
OUTLIER = _Family(
    "nodemesh_service_outlier_events_total",
    "Outlier detection: endpoints ejected, returned after a probe, or left in because of "
    "maxEjectionPercent (capped)",
    (*_SERVICE, "event"),
)
FAULTS = _Family(
    "nodemesh_service_faults_injected_total",
    "Faults injected into new connections (delay, abort_reset, abort_refuse)",
    (*_SERVICE, "fault"),
)
SPLITS = _Family(
    "nodemesh_service_split_decisions_total",
    "Connections sent to each subset of a weighted split",
    (*_SERVICE, "subset"),
)
HTTP_RETRIES = _Family(
    "nodemesh_http_retries_total",
    "HTTP requests a route rule's retry would try again, by outcome (attempted: sent again; "
    "budget_exhausted: refused by the backend Service's retry budget; attempts_exhausted: the "
    "rule's attempts were spent; unsafe: the request could not be replayed)",
    (*_SERVICE, "outcome"),
)
HTTP_MIRRORS = _Family(
    "nodemesh_http_mirrored_total",
    "Copies of HTTP requests for a route's RequestMirror, by the mirror Service and outcome "
    "(sent; failed; denied: same-node policy; too_large: body over the replay limit; "
    "overflow: too many copies in flight)",
    (*_SERVICE, "outcome"),
)
OTHER = _Family(
    "nodemesh_service_traffic_events_total",
    "Other traffic-control events (panic: every endpoint ejected, so all were candidates; "
    "no_endpoints; retry_deadline: the overall connect timeout ended the retries; queued: an "
    "HTTP request waited for a max_connections slot; dequeued: it gave up waiting)",
    (*_SERVICE, "event"),
)

_FAMILIES = (
    CONNECTIONS, REJECTIONS, FAILURES, RETRIES, BUDGET, OUTLIER, FAULTS, SPLITS, HTTP_RETRIES,
    HTTP_MIRRORS, OTHER,
)  # fmt: skip
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


def series(service: str, event: str, detail: str) -> tuple[_Family, tuple[str, ...]]:
    """The counter and label values an event counts on (events that differ only in a detail
    their counter has no label for count on one series)."""
    if event in _BY_DETAIL:
        return _BY_DETAIL[event], (service, detail)
    if event in _PLAIN:
        return _PLAIN[event], (service,)
    return OTHER, (service, event)


class ServiceCounters(Collector):
    """The count of each (service, event, detail) seen, and when it was first seen; the
    traffic counters made of them at scrape. The keys are bounded as the label values are, and
    never removed (as a Counter's children were not)."""

    __slots__ = ("_counts", "_first")

    def __init__(self) -> None:
        self._counts: dict[Event, int] = {}
        self._first: dict[Event, float] = {}

    def observe(self, service: str, event: str, detail: str) -> None:
        """The traffic-control observer: one event of ``service`` adds one to its count."""
        key = (service, event, detail)
        try:
            self._counts[key] += 1
        except KeyError:
            self._first[key] = time.time()
            self._counts[key] = 1

    def collect(self) -> Iterator[CounterMetricFamily]:
        # Per counter, its series in the order their first events came (a Counter's children
        # in the order they were made), summed over the events that count on one series.
        totals: dict[_Family, dict[tuple[str, ...], tuple[int, float]]] = {
            family: {} for family in _FAMILIES
        }
        for key, count in list(self._counts.items()):
            family, values = series(*key)
            first = self._first[key]
            seen = totals[family].get(values)
            if seen is not None:
                count, first = count + seen[0], min(first, seen[1])
            totals[family][values] = (count, first)
        created = promtext.created_series()
        for family in _FAMILIES:
            out = CounterMetricFamily(family.name, family.doc, labels=family.labels)
            for values, (count, first) in totals[family].items():
                out.add_metric(values, float(count), created=first if created else None)
            yield out


COUNTERS = ServiceCounters()
REGISTRY.register(COUNTERS)
observe = COUNTERS.observe
