"""Istio TCP metrics and the access log, fed by a real connection registry."""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.base.promtext import Collector, CounterMetricFamily, GaugeMetricFamily, exposition
from agent.policy.authz import Decision
from agent.proxy.records import Registry
from agent.state import StateStore
from agent.state.model import Endpoint, Service, ServicePort
from agent.telemetry import tcp
from agent.telemetry.agentmetrics import AgentSources
from agent.telemetry.component import TelemetryComponent
from agent.telemetry.labels import TcpLabels, endpoint_services, host_of, tcp_labels
from agent.telemetry.records import (
    INBOUND,
    OUTBOUND,
    SECURITY_MTLS,
    SECURITY_NONE,
    ConnectionRecord,
)
from agent.telemetry.tcp import TcpMetrics
from tests.unit.telemetry.telemetry_helpers import (
    CLIENT_ID,
    SERVER_ID,
    VIP,
    inbound,
    make_store,
    outbound,
    samples,
    total,
)
from tests.workloads import workload

SENT = "istio_tcp_sent_bytes_total"
RECEIVED = "istio_tcp_received_bytes_total"
OPENED = "istio_tcp_connections_opened_total"
CLOSED = "istio_tcp_connections_closed_total"


def telemetry() -> tuple[Registry, TelemetryComponent]:
    registry = Registry()
    component = TelemetryComponent(
        store=make_store(),
        address=("127.0.0.1", 0),
        sources=AgentSources(rejections=lambda: registry.rejections),
    )
    registry.observers.append(component.tcp)
    return registry, component


def test_labels_of_an_outbound_connection_through_a_service() -> None:
    store = make_store()
    snap = store.snapshot()
    labels = tcp_labels(outbound(), snap, endpoint_services(snap))._asdict()
    assert labels == {
        "reporter": "source",
        "source_workload": "client",
        "source_canonical_service": "client",
        "source_canonical_revision": "latest",
        "source_workload_namespace": "default",
        "source_principal": CLIENT_ID,
        "source_app": "client",
        "source_version": "unknown",
        "source_cluster": "Kubernetes",
        "destination_service": "server.default.svc.cluster.local",
        "destination_service_namespace": "default",
        "destination_service_name": "server",
        "destination_workload": "server",  # the app label: both replicas share one series
        "destination_canonical_service": "server",
        "destination_canonical_revision": "latest",
        "destination_workload_namespace": "default",
        "destination_principal": SERVER_ID,
        "destination_app": "server",
        "destination_version": "unknown",
        "destination_cluster": "Kubernetes",
        "connection_security_policy": "mutual_tls",
        "response_flags": "-",
        "request_protocol": "tcp",
    }


def test_host_of_every_address_form() -> None:
    assert host_of("10.0.0.1:80") == host_of("10.0.0.1") == "10.0.0.1"
    assert host_of("[fd00::1]:443") == host_of("fd00::1") == "fd00::1"


def test_labels_of_an_inbound_connection_and_of_an_unknown_peer() -> None:
    snap = make_store().snapshot()
    by_endpoint = endpoint_services(snap)
    labels = tcp_labels(inbound(), snap, by_endpoint)
    assert labels.reporter == "destination"
    assert labels.destination_service == "server.default.svc.cluster.local"  # pod IP dialed
    stranger = outbound()
    stranger.source, stranger.source_identity = "192.0.2.9:1234", None
    stranger.destination, stranger.upstream, stranger.path = "198.51.100.1:443", "", "passthrough"
    stranger.destination_identity = None
    odd = tcp_labels(stranger, snap, by_endpoint)
    assert odd.source_workload == odd.destination_workload == odd.destination_service == "unknown"
    assert odd.source_principal == odd.destination_principal == "unknown"
    assert odd.connection_security_policy == "none"


def test_bytes_are_counted_while_the_connection_is_open_and_stay_after_close() -> None:
    registry, component = telemetry()
    record = outbound()
    conn_id = registry.add(record, lambda _reason: None)
    record.bytes_sent, record.bytes_received = 1000, 20
    live = samples(component.exposition())
    assert total(live, SENT, reporter="source") == 1000
    assert total(live, RECEIVED, reporter="source") == 20
    assert total(live, OPENED) == 1 and total(live, CLOSED) == 0
    assert total(live, "nodemesh_open_connections", direction="outbound") == 1
    record.bytes_sent += 500
    registry.remove(conn_id)
    done = samples(component.exposition())
    assert total(done, SENT) == 1500
    assert total(done, CLOSED, response_flags="-") == 1
    assert total(done, "nodemesh_open_connections") == 0
    assert component.tcp.live() == []


def test_a_denied_stream_and_a_refused_connection_set_response_flags() -> None:
    registry, component = telemetry()
    denied = inbound()
    registry.deny(Decision(False, "denied by default/p", "default/p"), "test", record=denied)
    record = outbound(40001)
    conn_id = registry.add(record, lambda _reason: None)
    registry.reject("upstream_unreachable", "test: nothing listens")  # same task: this record
    registry.remove(conn_id)
    parsed = samples(component.exposition())
    assert total(parsed, CLOSED, reporter="destination", response_flags="DENY") == 1
    assert total(parsed, OPENED, reporter="destination", response_flags="DENY") == 1
    assert total(parsed, CLOSED, reporter="source", response_flags="CONNECT") == 1
    assert record.failure == "upstream_unreachable"


def test_cardinality_stays_bounded_under_many_connections() -> None:
    registry, component = telemetry()
    for port in range(30000, 30500):
        record = outbound(port)
        record.bytes_sent = 10
        registry.remove(registry.add(record, lambda _reason: None))
    parsed = samples(component.exposition())
    series = {labels for (name, labels) in parsed if name == SENT}
    assert len(series) == 1
    assert total(parsed, SENT) == 5000 and total(parsed, CLOSED) == 500
    values = {value for (_name, labels) in parsed for _key, value in labels}
    assert not [v for v in values for port in range(30000, 30500) if str(port) in v]


def test_access_log_is_one_json_line_per_closed_connection(
    caplog: pytest.LogCaptureFixture,
) -> None:
    registry, _component = telemetry()
    record = outbound()
    conn_id = registry.add(record, lambda _reason: None)
    record.bytes_sent, record.bytes_received = 7, 9
    with caplog.at_level(logging.INFO, logger="nodemesh.access"):
        registry.remove(conn_id)
    lines = [r.getMessage() for r in caplog.records if r.name == "nodemesh.access"]
    assert len(lines) == 1
    entry = json.loads(lines[0])
    assert entry["source_address"] == "10.244.1.2:40000"
    assert entry["destination_address"] == "10.96.0.10:80"
    assert entry["upstream_address"] == "10.244.2.2:8080"
    assert (entry["source_workload"], entry["destination_workload"]) == ("client", "server")
    assert (entry["source_identity"], entry["destination_identity"]) == (CLIENT_ID, SERVER_ID)
    assert (entry["bytes_sent"], entry["bytes_received"]) == (7, 9)
    assert entry["direction"] == "outbound" and entry["security"] == "mutual_tls"
    assert entry["failure"] is None and entry["duration_ms"] >= 0


def test_a_failing_observer_never_breaks_the_connection(caplog: pytest.LogCaptureFixture) -> None:
    class Broken:
        def opened(self, record: object) -> None:
            raise KeyError("bug")

        def closed(self, record: object) -> None:
            raise KeyError("bug")

    registry, component = telemetry()
    registry.observers.insert(0, Broken())
    with caplog.at_level(logging.ERROR, logger="agent.proxy.records"):
        registry.remove(registry.add(outbound(), lambda _reason: None))
    assert len([r for r in caplog.records if "observer" in r.getMessage()]) == 2
    assert total(samples(component.exposition()), CLOSED) == 1  # the others still saw it


def test_a_client_connection_the_source_terminated_as_http_is_reported_per_request_only() -> None:
    """Its requests went to several endpoints (``reporter="source"`` request metrics) and the
    flows carrying them are the destination's TCP connections: no TCP series at the source,
    though it is a live connection of the proxy."""
    registry, component = telemetry()
    record = outbound()
    record.protocol = "http/1.1"
    conn_id = registry.add(record, lambda _reason: None)
    record.bytes_sent = 300
    live = samples(component.exposition())
    assert total(live, OPENED) == 0 and total(live, SENT) == 0
    assert total(live, "nodemesh_open_connections", direction="outbound") == 1
    assert len(component.tcp.live()) == 1
    registry.remove(conn_id)
    done = samples(component.exposition())
    assert total(done, CLOSED) == 0 and total(done, SENT) == 0
    assert total(done, "nodemesh_open_connections") == 0


def test_a_pod_behind_two_services_is_labelled_with_the_one_whose_port_was_reached() -> None:
    store = make_store()
    with store.update() as txn:  # "grpc" sorts before "server": the first by name must not win
        txn.put_service(
            Service(
                name="grpc",
                namespace="default",
                cluster_ips=("10.96.0.12",),
                ports=(ServicePort(50051, 50051, name="grpc", app_protocol="grpc"),),
                selector={"app": "server"},
                endpoints=(Endpoint("10.244.2.2", "default/server-0"),),
            )
        )
    snap = store.snapshot()
    by_endpoint = endpoint_services(snap)
    to_echo = inbound()  # 10.244.2.2:8080, Service server's target port
    to_grpc = inbound()
    to_grpc.destination = "10.244.2.2:50051"
    assert tcp_labels(to_echo, snap, by_endpoint).destination_service == (
        "server.default.svc.cluster.local"
    )
    assert tcp_labels(to_grpc, snap, by_endpoint).destination_service == (
        "grpc.default.svc.cluster.local"
    )


SOURCES = ["10.244.1.2:40000", "10.244.1.2:40001", "10.244.2.3:5000", "[fd00::1]:7", "9.9.9.9:1"]
DESTINATIONS = [f"{VIP}:80", "10.244.2.2:8080", "10.244.2.3:8080", "10.244.2.2:9000"]


def records(**more: st.SearchStrategy[str]) -> st.SearchStrategy[ConnectionRecord]:
    """Records of the few addresses, identities, paths and failures that label them, and
    ``more`` fields."""
    return st.builds(
        ConnectionRecord,
        st.sampled_from([OUTBOUND, INBOUND]),
        st.sampled_from(SOURCES),
        st.sampled_from(DESTINATIONS),
        source_identity=st.sampled_from([None, CLIENT_ID, SERVER_ID]),
        destination_identity=st.sampled_from([None, SERVER_ID]),
        security=st.sampled_from([SECURITY_NONE, SECURITY_MTLS]),
        path=st.sampled_from(["hbone", "local", "passthrough", "plaintext"]),
        upstream=st.sampled_from(["", *DESTINATIONS[1:]]),
        failure=st.sampled_from(["", "policy_denied", "upstream_unreachable"]),
        **more,
    )


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        records(service=st.sampled_from(["", "server.default.svc.cluster.local"])),
        min_size=1,
        max_size=12,
    ),
    st.integers(0, 12),
)
def test_cached_labels_are_what_tcp_labels_computes(
    records: list[ConnectionRecord], rename_at: int
) -> None:
    """Each opened record is labelled as ``tcp_labels`` labels it in the current state, also
    after a state change (the server pods' app label renamed) between records."""
    store = make_store()
    metrics = TcpMetrics(store, access_log=False)
    for i, record in enumerate(records):
        if i == rename_at:
            with store.update() as txn:
                for name, ip in (("server-0", "10.244.2.2"), ("server-1", "10.244.2.3")):
                    txn.put_workload(workload(name, "node2", ip, sa="server", app="renamed"))
        record.id = i + 1
        metrics.opened(record)
        snap = store.snapshot()
        expected = tcp_labels(record, snap, endpoint_services(snap))
        assert metrics._live[record.id][1].labels == expected


def test_labels_are_computed_once_per_client_pod_and_destination(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    computed: list[ConnectionRecord] = []

    def counting(record: ConnectionRecord, *args: object) -> object:
        computed.append(record)
        return tcp_labels(record, *args)  # type: ignore[arg-type]

    monkeypatch.setattr("agent.telemetry.tcp.tcp_labels", counting)
    metrics = TcpMetrics(make_store(), access_log=False)
    for port in range(40000, 40010):
        record = outbound(port)
        record.id = port
        metrics.opened(record)
        metrics.closed(record)
    assert len(computed) == 1


def test_a_connection_that_ends_as_it_opened_is_closed_under_its_open_labels() -> None:
    """No copy of the label tuple at close (``_replace``) when the response flags did not
    change, the usual close; a failure still changes them (``-`` to ``CONNECT``)."""
    metrics = TcpMetrics(make_store(), access_log=False)
    clean, failed = outbound(40001), outbound(40002)
    clean.id, failed.id = 1, 2
    metrics.opened(clean)
    metrics.opened(failed)
    (opened,) = metrics._opened
    metrics.closed(clean)
    (closed,) = metrics._closed
    assert closed is opened
    failed.failure = "upstream_unreachable"
    metrics.closed(failed)
    assert [(s.labels, s.closed) for s in metrics._closed] == [
        (opened.labels, 1),
        (opened.labels._replace(response_flags="CONNECT"), 1),
    ]


class CountersReference(Collector):
    """The TCP metrics' counting as main had it (0972f4a): a ``Counter`` per metric keyed by
    the label tuple, the close-time flags for ``closed``; ``TcpMetrics`` counts per label set
    since, and its exposition must read exactly as this one's, sample for sample, in order."""

    def __init__(self, store: StateStore) -> None:
        self._store = store
        self._live: dict[int, tuple[ConnectionRecord, TcpLabels]] = {}
        self._opened: Counter[TcpLabels] = Counter()
        self._closed: Counter[TcpLabels] = Counter()
        self._sent: Counter[TcpLabels] = Counter()
        self._received: Counter[TcpLabels] = Counter()

    def _labels(self, record: ConnectionRecord) -> TcpLabels:
        snap = self._store.snapshot()
        return tcp_labels(record, snap, endpoint_services(snap))

    def opened(self, record: ConnectionRecord) -> None:
        labels = self._labels(record)
        self._live[record.id] = (record, labels)
        if not (record.direction == OUTBOUND and record.protocol != "tcp"):
            self._opened[labels] += 1

    def closed(self, record: ConnectionRecord) -> None:
        live = self._live.pop(record.id, None)
        labels = live[1] if live is not None else self._labels(record)
        final = labels._replace(response_flags=tcp.response_flags(record.failure))
        if record.direction == OUTBOUND and record.protocol != "tcp":
            return
        self._sent[labels] += record.bytes_sent
        self._received[labels] += record.bytes_received
        self._closed[final] += 1

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        sent, received = Counter(self._sent), Counter(self._received)
        open_now: Counter[str] = Counter()
        for record, labels in self._live.values():
            open_now[record.direction] += 1
            if not (record.direction == OUTBOUND and record.protocol != "tcp"):
                sent[labels] += record.bytes_sent
                received[labels] += record.bytes_received
        metrics = {
            tcp.OPENED: (self._opened, "TCP connections opened (Istio standard metric)"),
            tcp.CLOSED: (self._closed, "TCP connections closed (Istio standard metric)"),
            tcp.SENT: (
                sent,
                "Bytes sent by the client side of TCP connections, live ones included",
            ),
            tcp.RECEIVED: (received, "Bytes sent back to the client side, live ones included"),
        }
        for name, (values, doc) in metrics.items():
            family = CounterMetricFamily(name, doc, labels=tcp.LABEL_NAMES)
            for labels, value in values.items():
                family.add_metric(list(labels), value)
            yield family
        gauge = GaugeMetricFamily(
            tcp.OPEN_NOW, "Connections open in the proxy", labels=["direction"]
        )
        for direction in ("outbound", "inbound"):
            gauge.add_metric([direction], open_now[direction])
        yield gauge


# A connection's life for ``test_the_exposition_is_the_counters_one``: which record (an index
# into the drawn ones), the failure it has at close ("" keeps its own), its byte counts, and
# whether it is closed without having been opened (a record the registry never told about).
_LIVES = st.lists(
    st.tuples(
        st.integers(0, 11),
        st.sampled_from(["", "", "policy_denied", "upstream_unreachable"]),
        st.integers(0, 2**40),
        st.integers(0, 2**40),
        st.booleans(),
    ),
    max_size=40,
)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        records(protocol=st.sampled_from(["tcp", "tcp", "http/1.1"])),
        min_size=12,
        max_size=12,
    ),
    _LIVES,
    st.integers(0, 40),
    st.integers(0, 40),
)
def test_the_exposition_is_the_counters_one(
    kinds: list[ConnectionRecord],
    lives: list[tuple[int, str, int, int, bool]],
    scrape_at: int,
    rename_at: int,
) -> None:
    """For any sequence of connections (opened and closed in turn, interleaved, some with a
    failure at close that changes their flags, some closed never opened, some counted per
    request only, a state change between them), ``/metrics`` reads as the ``Counter``s wrote
    it: every sample, its value and its place; also mid-way with connections live."""
    store = make_store()
    metrics, reference = TcpMetrics(store, access_log=False), CountersReference(store)
    observers: tuple[TcpMetrics | CountersReference, ...] = (metrics, reference)
    live: list[ConnectionRecord] = []
    for step, (kind, failure, sent, received, unopened) in enumerate(lives):
        if step == rename_at:
            with store.update() as txn:
                txn.put_workload(workload("server-0", "node2", "10.244.2.2", app="renamed"))
        record = kinds[kind].copy()
        record.id = step + 1
        if not unopened:
            for observer in observers:
                observer.opened(record)
        live.append(record)
        if step == scrape_at:
            assert exposition(metrics) == exposition(reference)
        if step % 3 != 2:  # every third step closes the newest live one; the rest, at the end
            continue
        record = live.pop()
        record.failure = failure or record.failure
        record.bytes_sent, record.bytes_received = sent, received
        for observer in observers:
            observer.closed(record)
    assert exposition(metrics) == exposition(reference)
    while live:
        record = live.pop()
        for observer in observers:
            observer.closed(record)
    assert exposition(metrics) == exposition(reference)
