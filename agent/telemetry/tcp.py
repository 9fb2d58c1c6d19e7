"""Istio's TCP metrics, fed by the proxy's connection records at open and close only.

Why nothing runs per chunk: the relay already adds every chunk to its record's byte counters
(it needs them for the access log and ``/connections``). This collector remembers the live
records; at scrape time a byte counter is the sum over closed connections plus the current
counters of the live ones. So bytes of a long-lived connection are visible while it is open,
and the data path pays two dictionary operations per connection, not per chunk.

Monotonic counters across the open → closed move: a connection's bytes stay under the label
set it had when it opened (its ``response_flags`` may only be known at close, so
``istio_tcp_connections_closed_total`` uses the close-time flags while the byte counters and
``istio_tcp_connections_opened_total`` keep the open-time ones).

A client connection the source node terminates as HTTP (a Service port declared HTTP) is not a
TCP flow to one destination: its requests go to several endpoints, each reported per request
(``reporter="source"`` request metrics), and the TCP flows that carry them (HBONE streams) are
counted by the destination. So it is left out of these counters, as Istio's proxies report an
HTTP listener's traffic as requests only; it still shows in ``/connections`` and the access log.

Labels are computed once per label-relevant shape of a record (``_labelled``): the addresses
without the client's port, the dialled Service, direction, identities, security, path and
failure, for the state version they were computed in. Every connection of one client pod to one
Service looks the same, so a new connection costs a tuple and a dictionary look-up instead of
the workload and Service look-ups of ``tcp_labels``.

Single-threaded by design: records, observers and ``collect`` all run on the agent's event loop
(the metrics endpoint is served there), so no lock is needed.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator, Mapping

from agent.base.promtext import Collector, CounterMetricFamily, GaugeMetricFamily, LabelTexts
from agent.state import StateStore
from agent.telemetry.accesslog import connection_entry, write_access_log
from agent.telemetry.labels import (
    LABEL_NAMES,
    TcpLabels,
    endpoint_services,
    host_of,
    response_flags,
    tcp_labels,
)
from agent.telemetry.records import OUTBOUND, ConnectionRecord

OPENED = "istio_tcp_connections_opened_total"
CLOSED = "istio_tcp_connections_closed_total"
SENT = "istio_tcp_sent_bytes_total"
RECEIVED = "istio_tcp_received_bytes_total"
OPEN_NOW = "nodemesh_open_connections"
# Label sets kept per state version (``TcpMetrics._labelled``); past this the cache starts over.
LABEL_CACHE_SIZE = 4096


class _Series:
    """The counts of one label set: the four counters' values, and whether each has a sample
    yet (a label set shows in a family once counted there, with a 0 too; ``TcpMetrics`` keeps
    each family's label sets in the order of their first count, as a ``Counter`` per family
    did, so the exposition reads as it did)."""

    __slots__ = ("closed", "flowed", "labels", "opened", "received", "sent")

    def __init__(self, labels: TcpLabels) -> None:
        self.labels = labels
        self.opened = 0
        self.closed = 0
        self.sent = 0
        self.received = 0
        self.flowed = False  # sent and received counted (at a close, with these labels)


class TcpMetrics(Collector):
    """A ``ConnectionObserver`` (``Registry.observers``) and a prometheus-client collector.

    Why one object per label set (``_Series``) and not a ``Counter`` per metric: a connection
    counted four times, and each count hashed and compared its 12-field label tuple twice; the
    label cache holds the ``_Series`` itself and a live connection keeps its own, so a
    connection's open finds it with the cache's one look-up and its close counts on it
    directly (a look-up only when the close-time flags differ, or a record never opened)."""

    def __init__(self, store: StateStore, *, access_log: bool = True) -> None:
        self._store = store
        self._access_log = access_log
        self._live: dict[int, tuple[ConnectionRecord, _Series]] = {}
        self._series: dict[TcpLabels, _Series] = {}
        # Each family's label sets, in the order of their first count (see ``_Series``).
        self._opened: list[_Series] = []
        self._closed: list[_Series] = []
        self._flowed: list[_Series] = []
        self._endpoints: tuple[int, Mapping[str, str]] = (-1, {})
        self._label_cache: dict[tuple[str | None, ...], _Series] = {}
        # Each label set's exposition text, made at its first scrape and kept, as the label
        # sets are (``promtext.LabelText``): a scrape formats the labels of new ones only.
        self._texts = LabelTexts(LABEL_NAMES)
        self._directions = LabelTexts(["direction"])

    # -- ConnectionObserver ------------------------------------------------------------------
    def opened(self, record: ConnectionRecord) -> None:
        series = self._labelled(record)
        self._live[record.id] = (record, series)
        if _counted(record):
            if not series.opened:
                self._opened.append(series)
            series.opened += 1

    def closed(self, record: ConnectionRecord) -> None:
        """``_counted``, ``response_flags`` and ``_with_flags`` written out: every connection
        closes here (three calls fewer each)."""
        live = self._live.pop(record.id, None)
        series = live[1] if live is not None else self._labelled(record)
        labels, failure = series.labels, record.failure
        flags = response_flags(failure) if failure else "-"
        final = labels if labels.response_flags == flags else labels._replace(response_flags=flags)
        if record.direction != OUTBOUND or record.protocol == "tcp":  # ``_counted``
            if not series.flowed:
                series.flowed = True
                self._flowed.append(series)
            series.sent += record.bytes_sent
            series.received += record.bytes_received
            ended = series if final is labels else self._series_of(final)
            if not ended.closed:
                self._closed.append(ended)
            ended.closed += 1
        if self._access_log:
            write_access_log(record, final)

    # -- readers -----------------------------------------------------------------------------
    def live(self) -> list[dict[str, object]]:
        """Live connections with the access log's fields (for ``/connections``)."""
        now = time.time()
        for r, _series in list(self._live.values()):
            r.refresh()
        return [
            connection_entry(r, _with_flags(series.labels, response_flags(r.failure)), now)
            for r, series in list(self._live.values())
        ]

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        sent = {s.labels: s.sent for s in self._flowed}
        received = {s.labels: s.received for s in self._flowed}
        open_now: Counter[str] = Counter()
        for record, series in list(self._live.values()):
            record.refresh()
            open_now[record.direction] += 1
            if _counted(record):
                labels = series.labels
                sent[labels] = sent.get(labels, 0) + record.bytes_sent
                received[labels] = received.get(labels, 0) + record.bytes_received
        docs = {
            OPENED: (
                {s.labels: s.opened for s in self._opened},
                "TCP connections opened (Istio standard metric)",
            ),
            CLOSED: (
                {s.labels: s.closed for s in self._closed},
                "TCP connections closed (Istio standard metric)",
            ),
            SENT: (sent, "Bytes sent by the client side of TCP connections, live ones included"),
            RECEIVED: (received, "Bytes sent back to the client side, live ones included"),
        }
        texts = self._texts
        for name, (values, doc) in docs.items():
            family = CounterMetricFamily(name, doc, labels=LABEL_NAMES)
            for labels, value in values.items():
                family.add_metric(texts[labels], value)
            yield family
        gauge = GaugeMetricFamily(OPEN_NOW, "Connections open in the proxy", labels=["direction"])
        for direction in ("outbound", "inbound"):
            gauge.add_metric(self._directions[(direction,)], open_now[direction])
        yield gauge

    def _labelled(self, record: ConnectionRecord) -> _Series:
        """The series of ``record``'s labels (those it has now)."""
        snap = self._store.snapshot()
        cache = self._label_cache
        if self._endpoints[0] != snap.version:
            self._endpoints = (snap.version, endpoint_services(snap))
            cache.clear()
        # Everything ``tcp_labels`` reads of the record (the source's port it does not).
        key = (
            host_of(record.source),
            record.destination,
            record.upstream,
            record.service,
            record.direction,
            record.source_identity,
            record.destination_identity,
            record.security,
            record.path,
            record.failure,
        )
        series = cache.get(key)
        if series is None:
            series = self._series_of(tcp_labels(record, snap, self._endpoints[1]))
            if len(cache) >= LABEL_CACHE_SIZE:
                cache.clear()
            cache[key] = series
        return series

    def _series_of(self, labels: TcpLabels) -> _Series:
        series = self._series.get(labels)
        if series is None:
            series = self._series[labels] = _Series(labels)
        return series


def _with_flags(labels: TcpLabels, flags: str) -> TcpLabels:
    """``labels`` with ``response_flags`` = ``flags``: the same tuple when they already are
    (a connection that ended as it opened, the usual close), not a copy (``_replace``)."""
    return labels if labels.response_flags == flags else labels._replace(response_flags=flags)


def _counted(record: ConnectionRecord) -> bool:
    """False for a client connection the source node terminated as HTTP (module docstring)."""
    return not (record.direction == OUTBOUND and record.protocol != "tcp")
