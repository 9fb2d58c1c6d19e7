"""Istio's full standard label set on the TCP and request metrics (``agent.telemetry.labels``).

The expected names are written out from Istio's "Istio Standard Metrics" reference (the labels
section) and ztunnel's ``CommonTrafficLabels``, not computed from the code: Kiali's graph and
users' queries select on these names.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

from agent.proxy.records import Registry
from agent.state import StateStore
from agent.state.model import Endpoint, Service, ServicePort, Workload
from agent.telemetry.agentmetrics import AgentSources
from agent.telemetry.component import TelemetryComponent
from agent.telemetry.labels import TcpLabels, endpoint_services, tcp_labels
from agent.telemetry.records import INBOUND, ConnectionRecord, RequestRecord
from agent.view.series import Series, from_exposition
from tests.unit.telemetry.telemetry_helpers import inbound, make_store
from tests.unit.telemetry.telemetry_helpers import outbound as client_to_vip
from tests.workloads import workload

# Istio's standard labels of every metric (Istio docs, "Labels"; ztunnel's TCP label set).
ISTIO_LABELS = frozenset(
    {
        "reporter",
        "source_workload",
        "source_workload_namespace",
        "source_principal",
        "source_app",
        "source_version",
        "source_canonical_service",
        "source_canonical_revision",
        "source_cluster",
        "destination_workload",
        "destination_workload_namespace",
        "destination_principal",
        "destination_app",
        "destination_version",
        "destination_service",
        "destination_service_name",
        "destination_service_namespace",
        "destination_canonical_service",
        "destination_canonical_revision",
        "destination_cluster",
        "request_protocol",
        "connection_security_policy",
        "response_flags",
    }
)
# "present only on HTTP metrics" / "only on gRPC metrics" (empty for HTTP, as Envoy's stats).
ISTIO_REQUEST_LABELS = ISTIO_LABELS | {"response_code", "grpc_response_status"}
TCP_SAMPLES = (
    "istio_tcp_connections_opened_total",
    "istio_tcp_connections_closed_total",
    "istio_tcp_sent_bytes_total",
    "istio_tcp_received_bytes_total",
)
REQUEST_SAMPLES = (
    "istio_requests_total",
    "istio_request_duration_milliseconds_count",
    "istio_request_duration_milliseconds_sum",
    "istio_request_bytes_count",
    "istio_response_bytes_sum",
)


def pod(name: str, ip: str, labels: Mapping[str, str]) -> Workload:
    return replace(workload(name, "node1", ip, namespace="shop"), labels=labels)


def side(labels: TcpLabels, prefix: str) -> tuple[str, ...]:
    """``prefix``'s canonical service and revision, app, version and cluster."""
    named = labels._asdict()
    return tuple(
        named[f"{prefix}_{n}"]
        for n in ("canonical_service", "canonical_revision", "app", "version", "cluster")
    )


def scrape() -> dict[str, list[Series]]:
    """One TCP connection and one request through a real registry, scraped and parsed by the
    view's parser (``agent.view.series.from_exposition``)."""
    registry = Registry()
    component = TelemetryComponent(
        store=make_store(), address=("127.0.0.1", 0), sources=AgentSources()
    )
    registry.observers.append(component.tcp)
    registry.request_observers.append(component.http)
    conn_id = registry.add(client_to_vip(), lambda _reason: None)
    registry.request_done(
        inbound(), RequestRecord("GET", "/", "server:80", 200, 2.0, 10, 20, "-", "rid")
    )
    registry.remove(conn_id)
    text = component.exposition().decode()
    return from_exposition(text, TCP_SAMPLES + REQUEST_SAMPLES, 0.0, instance="node1")


def names(series: Series) -> set[str]:
    return {k for k, _ in series.labels} - {"instance"}


def test_every_tcp_metric_carries_istios_standard_labels() -> None:
    parsed = scrape()
    for sample in TCP_SAMPLES:
        assert parsed[sample], sample
        for series in parsed[sample]:
            assert names(series) == ISTIO_LABELS, sample


def test_every_request_metric_carries_istios_standard_labels_and_the_codes() -> None:
    parsed = scrape()
    for sample in REQUEST_SAMPLES:
        assert parsed[sample], sample
        for series in parsed[sample]:
            assert names(series) == ISTIO_REQUEST_LABELS, sample
    (requests,) = parsed["istio_requests_total"]
    assert requests.label("destination_service_name") == "server"
    assert requests.label("destination_cluster") == "Kubernetes"


def store_of(*workloads: Workload) -> StateStore:
    store = StateStore()
    with store.update() as txn:
        for w in workloads:
            txn.put_workload(w)
        txn.put_service(
            Service(
                name="reviews",
                namespace="shop",
                cluster_ips=("10.96.1.1",),
                ports=(ServicePort(9080, 9080),),
                selector={"app": "reviews"},
                endpoints=tuple(Endpoint(w.ips[0], w.uid) for w in workloads[1:]),
            )
        )
    return store


def connection(src: str, dst: str, *, direction: str = INBOUND) -> ConnectionRecord:
    return ConnectionRecord(
        direction,
        f"{src}:5000",
        f"{dst}:9080",
        source_identity="spiffe://cluster.local/ns/shop/sa/src",
        destination_identity="spiffe://cluster.local/ns/shop/sa/dst",
        path="hbone",
    )


def test_canonical_labels_follow_istios_order_of_pod_labels() -> None:
    """Canonical name: ``service.istio.io/canonical-name``, ``app.kubernetes.io/name``, ``app``;
    revision: ``service.istio.io/canonical-revision``, ``app.kubernetes.io/version``,
    ``version``; version: ``version``, then ``app.kubernetes.io/version``."""
    istio = pod(
        "front-abc",
        "10.1.0.1",
        {
            "service.istio.io/canonical-name": "frontend",
            "service.istio.io/canonical-revision": "r7",
            "app.kubernetes.io/name": "front",
            "app.kubernetes.io/version": "2.0",
            "app": "web",
            "version": "v2",
        },
    )
    k8s = pod("reviews-v3-x", "10.1.0.2", {"app.kubernetes.io/name": "reviews",
                                           "app.kubernetes.io/version": "3.1"})  # fmt: skip
    snap = store_of(istio, k8s).snapshot()
    labels = tcp_labels(connection("10.1.0.1", "10.1.0.2"), snap, endpoint_services(snap))
    assert side(labels, "source") == ("frontend", "r7", "web", "v2", "Kubernetes")
    assert side(labels, "destination") == ("reviews", "3.1", "reviews", "3.1", "Kubernetes")
    assert (
        labels.destination_service,
        labels.destination_service_name,
        labels.destination_service_namespace,
    ) == ("reviews.shop.svc.cluster.local", "reviews", "shop")


def test_a_pod_without_labels_falls_back_to_its_name_latest_and_unknown() -> None:
    bare = pod("batch-0", "10.1.0.3", {})
    dst = pod("reviews-0", "10.1.0.4", {"app": "reviews", "version": "v1"})
    snap = store_of(bare, dst).snapshot()
    labels = tcp_labels(connection("10.1.0.3", "10.1.0.4"), snap, endpoint_services(snap))
    assert side(labels, "source") == ("batch-0", "latest", "unknown", "unknown", "Kubernetes")
    assert (labels.destination_canonical_revision, labels.destination_version) == ("v1", "v1")


def test_a_peer_outside_the_state_is_unknown_but_for_what_its_principal_tells() -> None:
    dst = pod("reviews-0", "10.1.0.4", {"app": "reviews"})
    snap = store_of(pod("x", "10.1.0.9", {}), dst).snapshot()
    by_endpoint = endpoint_services(snap)
    meshed = tcp_labels(connection("192.0.2.1", "10.1.0.4"), snap, by_endpoint)
    assert side(meshed, "source") == ("unknown", "unknown", "unknown", "unknown", "Kubernetes")
    assert meshed.source_workload_namespace == "shop"
    plain = connection("192.0.2.1", "198.51.100.7")
    plain.source_identity = plain.destination_identity = None
    outside = tcp_labels(plain, snap, by_endpoint)
    assert {
        outside.source_cluster,
        outside.destination_cluster,
        outside.destination_canonical_service,
        outside.destination_service,
        outside.destination_service_name,
        outside.destination_service_namespace,
    } == {"unknown"}


def test_the_new_labels_add_no_series_per_workload_only_per_version() -> None:
    """Pods of one workload (one canonical name and revision) share one series, as they did:
    each series projected on the labels nodemesh had before is distinct. A second version of
    a workload is a series of its own, as in Istio (Kiali's versioned graph needs it)."""
    old = (
        "reporter", "source_workload", "source_workload_namespace", "source_principal",
        "source_app", "destination_service", "destination_workload",
        "destination_workload_namespace", "destination_principal",
        "connection_security_policy", "response_flags", "request_protocol",
    )  # fmt: skip
    v1 = {"app": "reviews", "version": "v1"}
    client = pod("client-0", "10.1.0.1", {"app": "client"})
    pods = [pod(f"reviews-v1-{i}", f"10.1.1.{i}", v1) for i in range(1, 6)]
    snap = store_of(client, *pods).snapshot()
    by_endpoint = endpoint_services(snap)
    sets = {tcp_labels(connection("10.1.0.1", p.ips[0]), snap, by_endpoint) for p in pods}
    assert len(sets) == len({tuple(s._asdict()[n] for n in old) for s in sets}) == 1
    v2 = pod("reviews-v2-1", "10.1.2.1", {"app": "reviews", "version": "v2"})
    snap = store_of(client, *pods, v2).snapshot()
    by_endpoint = endpoint_services(snap)
    both = {tcp_labels(connection("10.1.0.1", p.ips[0]), snap, by_endpoint) for p in [*pods, v2]}
    assert sorted(s.destination_version for s in both) == ["v1", "v2"]
