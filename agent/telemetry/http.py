"""Istio's request metrics for every HTTP request a node proxied, by either reporter.

The destination node reports what it served (``reporter="destination"``); the source node, which
terminates HTTP on Service ports declared HTTP, reports what it sent (``reporter="source"``, with
``destination_service`` the Service the client dialled). Queries pick one reporter per pair, as
Istio's dashboards do.

Names, labels and buckets are Istio's, so its dashboards and Kiali-style queries work unchanged:
``istio_requests_total``, ``istio_request_duration_milliseconds``, ``istio_request_bytes`` and
``istio_response_bytes`` (body sizes), with the TCP metrics' labels (``agent.telemetry.labels``:
the connection's workloads, principals, service and security policy) plus ``response_code`` and
``grpc_response_status`` (empty but for gRPC), ``request_protocol`` (``http``, or ``grpc`` for a
gRPC call: ``RequestRecord.protocol``) and the request's own
``response_flags`` (``RBAC`` for an L7 denial, ``UC`` when the pod failed it, ``DC`` when the
client left). No label is a path or an address, so the cardinality is bounded by workloads times
codes: a response code has three digits (llhttp's rule, ``h2headers`` for HTTP/2) and a gRPC
status outside gRPC's codes is labelled UNKNOWN (``GRPC_CODES``). Histograms are kept as
bucket counts per label set here (not in the process-wide registry), so two agents in one test
process never mix their series.

The HTTP layer's refusals are counted by cause (``nodemesh_http_rejected_requests_total``) and
dry-run policies' would-be denials by policy (``nodemesh_http_dry_run_denials_total``).

Each request is also written to the access log when ``RequestSampler`` keeps it, and added to
the ring of recent requests (``agent.telemetry.tap``) that ``nodemesh requests`` reads; requests
a viewer fell too far behind to see are counted (``nodemesh_tap_missed_requests_total``).

Single-threaded like ``TcpMetrics``: everything runs on the agent's event loop.
"""

from __future__ import annotations

import bisect
import functools
import itertools
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from typing import NamedTuple

from agent.base.promtext import (
    Collector,
    CounterMetricFamily,
    HistogramMetricFamily,
    LabelTexts,
)
from agent.state import Snapshot, StateStore
from agent.telemetry.accesslog import (
    RequestSampler,
    RequestShape,
    labels_tail,
    request_shape,
    write_request_log,
)
from agent.telemetry.labels import LABEL_NAMES, endpoint_services, tcp_labels
from agent.telemetry.records import ConnectionRecord, RequestRecord
from agent.telemetry.tap import RequestRing

REQUESTS = "istio_requests_total"
DURATION = "istio_request_duration_milliseconds"
REQUEST_BYTES = "istio_request_bytes"
RESPONSE_BYTES = "istio_response_bytes"
REJECTED = "nodemesh_http_rejected_requests_total"
DRY_RUN = "nodemesh_http_dry_run_denials_total"
TAP_MISSED = "nodemesh_tap_missed_requests_total"

# Istio's default buckets (the stats plugin's): milliseconds, and bytes.
DURATION_BUCKETS: tuple[float, ...] = (
    0.5, 1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000, 300000,
    600000, 1800000, 3600000,
)  # fmt: skip
BYTES_BUCKETS: tuple[float, ...] = tuple(float(10**i) for i in range(10))  # 1 .. 1e9

REQUEST_LABEL_NAMES = (*LABEL_NAMES, "response_code", "grpc_response_status")
# The values ``grpc_response_status`` takes: gRPC's codes (0 OK to 16 UNAUTHENTICATED), "" when
# not gRPC. A response may carry any text in ``grpc-status``, and every label set is kept for
# the agent's life: labelled as received, an upstream that varied it grew ``/metrics`` (and
# this collector's memory) without bound. Any other value is labelled 2 (UNKNOWN), the code a
# gRPC client reports for a status it does not know; the access log and the tap keep it as it
# came (bounded by the header limits).
GRPC_CODES = frozenset(("", *(str(code) for code in range(17))))
GRPC_UNKNOWN = "2"
# Label sets remembered between state changes (``HttpMetrics._series``): far more than the
# connections a node serves at once; past it the cache starts over (it is only a shortcut).
MAX_CACHED_SERIES = 4096


class RequestLabels(NamedTuple):
    values: tuple[str, ...]  # in REQUEST_LABEL_NAMES order


class _Histogram:
    """Cumulative bucket counts and a sum, as Prometheus exposes a histogram."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.total = 0.0

    def observe(self, value: float) -> None:
        """Count ``value`` (``HttpMetrics.requested`` does the same inline)."""
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value

    def buckets(self) -> list[tuple[str, float]]:
        """(bound as exposed, cumulative count) per bucket, the bounds' text made once."""
        return list(zip(_les(self.bounds), itertools.accumulate(self.counts), strict=True))


class _Series(NamedTuple):
    """One label set's counters on one connection, as ``HttpMetrics.requested`` updates them;
    ``named`` is the labels by name for the tap (shared by its entries, never changed),
    ``log_shape`` the access log line's constant runs, rendered once
    (``accesslog.request_shape``). The request count is the duration histogram's count (one
    observation per request), so a request looks no label set up: the series holds its
    histograms."""

    labels: RequestLabels
    named: Mapping[str, str]
    log_shape: RequestShape
    duration: _Histogram
    request_bytes: _Histogram
    response_bytes: _Histogram


_bisect = bisect.bisect_left
_time = time.time


def _le(bound: float) -> str:
    return str(int(bound)) if bound == int(bound) else str(bound)


@functools.cache
def _les(bounds: tuple[float, ...]) -> tuple[str, ...]:
    """A histogram's bucket bounds as exposed, ``+Inf`` last (one of two bound tuples)."""
    return (*map(_le, bounds), "+Inf")


class HttpMetrics(Collector):
    """A ``RequestObserver`` (``Registry.request_observers``) and a prometheus collector."""

    def __init__(
        self,
        store: StateStore,
        *,
        access_log: bool = True,
        sampler: RequestSampler | None = None,
        tap: RequestRing | None = None,
    ) -> None:
        self._store = store
        self._access_log = access_log
        self._sampler = sampler or RequestSampler()
        self.tap = tap if tap is not None else RequestRing()
        self._histograms: dict[str, dict[RequestLabels, _Histogram]] = {
            DURATION: {},
            REQUEST_BYTES: {},
            RESPONSE_BYTES: {},
        }
        self._rejected: Counter[str] = Counter()
        self._dry_run: Counter[str] = Counter()
        self._endpoints: tuple[int, Mapping[str, str]] = (-1, {})
        # Per state version: what labelled one request labels the next one alike (_Series).
        self._series: dict[tuple[object, ...], _Series] = {}
        self._series_version = -1
        # Each label set's exposition text, made at its first scrape and kept, as the label
        # sets are (``promtext.LabelText``): a scrape formats the labels of new ones only.
        self._texts = LabelTexts(REQUEST_LABEL_NAMES)

    # -- RequestObserver ---------------------------------------------------------------------
    def requested(self, connection: ConnectionRecord, request: RequestRecord) -> None:
        """Count the request in its series, add it to the tap and log it (when sampled).

        Per request this hashes no label set (the series, found by its key, holds its
        histograms; the request count is the duration histogram's), calls no method per
        histogram (``_Histogram.observe``'s two lines, in one loop over the three), reads the
        time once for the tap and the line, and renders only the request's own fields of the
        line (``log_shape``)."""
        series = self._series_of(connection, request)
        for hist, value in (
            (series.duration, request.duration_ms),
            (series.request_bytes, request.request_bytes),  # an int: the same bucket and sum
            (series.response_bytes, request.response_bytes),
        ):
            hist.counts[_bisect(hist.bounds, value)] += 1
            hist.total += value
        now = _time()
        self.tap.add(connection, request, series.named, now)
        if self._access_log:
            sampler = self._sampler
            if sampler.rate >= 1.0 or sampler.keep(request):  # ``keep`` is True at rate 1
                write_request_log(connection, request, series.log_shape, now)

    def rejected(self, cause: str) -> None:
        self._rejected[cause] += 1

    def would_deny(self, policy: str) -> None:
        self._dry_run[policy] += 1

    # -- collector ---------------------------------------------------------------------------
    def collect(self) -> Iterator[CounterMetricFamily | HistogramMetricFamily]:
        family = CounterMetricFamily(
            REQUESTS, "Requests served (Istio standard metric)", labels=REQUEST_LABEL_NAMES
        )
        # A label set's requests: its duration histogram's observations, one per request, in
        # the order the label sets were first seen (as the counter kept them).
        texts = self._texts
        for labels, h in self._histograms[DURATION].items():
            family.add_metric(texts[labels.values], sum(h.counts))
        yield family
        docs = {
            DURATION: "Request duration in milliseconds (Istio standard metric)",
            REQUEST_BYTES: "Request body sizes in bytes (Istio standard metric)",
            RESPONSE_BYTES: "Response body sizes in bytes (Istio standard metric)",
        }
        for name, doc in docs.items():
            hist = HistogramMetricFamily(name, doc, labels=REQUEST_LABEL_NAMES)
            for labels, h in self._histograms[name].items():
                hist.add_metric(texts[labels.values], h.buckets(), h.total)
            yield hist
        rejected = CounterMetricFamily(
            REJECTED, "HTTP requests the proxy refused as bad input, by cause", labels=["cause"]
        )
        for cause, value in self._rejected.items():
            rejected.add_metric([cause], value)
        yield rejected
        dry = CounterMetricFamily(
            DRY_RUN, "HTTP requests a dry-run policy would have denied", labels=["policy"]
        )
        for policy, value in self._dry_run.items():
            dry.add_metric([policy], value)
        yield dry
        missed = CounterMetricFamily(
            TAP_MISSED,
            "Recent requests a nodemesh requests viewer fell too far behind to see",
        )
        missed.add_metric([], self.tap.missed_total)
        yield missed

    def _series_of(self, connection: ConnectionRecord, request: RequestRecord) -> _Series:
        """The request's series, found by what its labels and its line's shape are made of:
        the connection's fields that ``tcp_labels`` reads, the request's own label values, its
        upstream (the line's ``upstream_address``) and the state version. A busy connection's
        requests share one key, so the labels and the line's constant runs are worked out once
        per connection (and again after a state change), not per request."""
        snap = self._store.snapshot()
        if self._series_version != snap.version or len(self._series) >= MAX_CACHED_SERIES:
            self._series.clear()
            self._series_version = snap.version
        key = (
            connection.direction,
            connection.source,
            connection.destination,
            connection.upstream,
            connection.service,
            connection.source_identity,
            connection.destination_identity,
            connection.security,
            connection.path,
            request.protocol,
            request.response_flags,
            request.status,
            request.grpc_status,
            request.upstream,
        )
        series = self._series.get(key)
        if series is None:
            labels = self._labels(connection, request, snap)
            named = dict(zip(REQUEST_LABEL_NAMES, labels.values, strict=True))
            series = self._series[key] = _Series(
                labels,
                named,
                request_shape(connection, request, labels_tail(named)),
                self._histogram(DURATION, labels, DURATION_BUCKETS),
                self._histogram(REQUEST_BYTES, labels, BYTES_BUCKETS),
                self._histogram(RESPONSE_BYTES, labels, BYTES_BUCKETS),
            )
        return series

    def _histogram(self, name: str, labels: RequestLabels, bounds: tuple[float, ...]) -> _Histogram:
        per = self._histograms[name]
        found = per.get(labels)
        if found is None:
            found = per[labels] = _Histogram(bounds)
        return found

    def _labels(
        self, connection: ConnectionRecord, request: RequestRecord, snap: Snapshot
    ) -> RequestLabels:
        if self._endpoints[0] != snap.version:
            self._endpoints = (snap.version, endpoint_services(snap))
        tcp = tcp_labels(connection, snap, self._endpoints[1])._replace(
            request_protocol=request.protocol, response_flags=request.response_flags
        )
        grpc = request.grpc_status if request.grpc_status in GRPC_CODES else GRPC_UNKNOWN
        return RequestLabels((*tcp, str(request.status), grpc))
