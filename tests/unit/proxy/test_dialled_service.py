"""The destination learns which Service the client dialled (CONNECT ``nodemesh-service``),
for labels only and only among the Services that select the pod (agent.proxy.inbound)."""

from __future__ import annotations

from dataclasses import replace

from agent.proxy.hbone import SERVICE_HEADER, HboneConnection
from agent.proxy.hbone_events import TunnelRequested
from agent.proxy.inbound import dialled_service
from agent.state.model import Endpoint, Service, ServicePort
from agent.telemetry.labels import endpoint_services, tcp_labels
from tests.unit.telemetry.telemetry_helpers import inbound, make_store

POD = "10.244.2.2"
WEB = "web.default.svc.cluster.local"


def _store_with_web():  # type: ignore[no-untyped-def]
    """Services ``server`` (both pods; first by name among those selecting them), ``web``
    (server-0 only) and ``other`` (nobody)."""
    store = make_store()
    with store.update() as txn:
        txn.put_service(
            Service(
                name="web",
                namespace="default",
                cluster_ips=("10.96.0.11",),
                ports=(ServicePort(80, 9080, name="http", app_protocol="http"),),
                selector={"app": "server"},
                endpoints=(Endpoint(POD, "default/server-0"),),
            )
        )
        txn.put_service(Service("other", "default", ("10.96.0.12",), (ServicePort(80, 80),), {}))
    return store


def test_the_named_service_is_believed_when_it_selects_the_pod() -> None:
    snap = _store_with_web().snapshot()
    assert dialled_service(snap, "default/web", POD) == WEB
    assert dialled_service(snap, "default/other", POD) == ""  # does not select the pod
    assert dialled_service(snap, "default/web", "10.244.2.3") == ""  # web lacks that pod
    assert dialled_service(snap, "kube-system/web", POD) == ""
    assert dialled_service(snap, None, POD) == ""
    assert dialled_service(snap, "garbage", POD) == ""


def test_destination_service_label_is_the_dialled_one_not_the_first_selecting() -> None:
    snap = _store_with_web().snapshot()
    by_endpoint = endpoint_services(snap)
    record = inbound()  # to the pod's IP: the address alone cannot say which Service
    assert tcp_labels(record, snap, by_endpoint).destination_service == (
        "server.default.svc.cluster.local"
    )
    dialled = replace(record, service=dialled_service(snap, "default/web", POD))
    assert tcp_labels(dialled, snap, by_endpoint).destination_service == WEB


def test_the_connect_carries_the_dialled_service_to_the_far_node() -> None:
    client, server = HboneConnection(client_side=True), HboneConnection(client_side=False)
    server.receive(client.data_to_send())
    client.receive(server.data_to_send())
    client.open_tunnel("10.244.2.2:9080", client_ip="10.244.1.2", service="default/web")
    client.open_tunnel("10.244.2.2:8080", client_ip="10.244.1.2")  # a pod dialled directly
    requests = [e for e in server.receive(client.data_to_send()) if isinstance(e, TunnelRequested)]
    assert [r.headers.get(SERVICE_HEADER) for r in requests] == ["default/web", None]
