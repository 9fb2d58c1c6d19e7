"""Where outbound connections go, decided from the state alone."""

from __future__ import annotations

from types import MappingProxyType

import pytest

from agent.proxy.resolve import NoEndpoints, Resolver
from agent.state import Endpoint, Namespace, Service, ServicePort, Snapshot, StateStore, Workload


def pod(name: str, node: str, ip: str, meshed: bool = True) -> Workload:
    return Workload(
        uid=f"default/{name}", name=name, namespace="default", service_account=name, node=node,
        ips=(ip,), mesh_annotation="enabled" if meshed else "disabled",
    )  # fmt: skip


def snapshot(*services: Service) -> Snapshot:
    store = StateStore()
    with store.update() as txn:
        txn.put_namespace(Namespace("default"))
        for w in (
            pod("client", "node1", "10.0.1.2"),
            pod("neighbor", "node1", "10.0.1.3"),
            pod("legacy", "node1", "10.0.1.4", meshed=False),
            pod("server", "node2", "10.0.2.2"),
            pod("elsewhere", "node2", "10.0.2.3"),
        ):
            txn.put_workload(w)
        for s in services:
            txn.put_service(s)
    return store.snapshot()


SVC = Service(
    name="server", namespace="default", cluster_ips=("10.96.0.10",),
    ports=(ServicePort(port=80, target_port=8080, name="http"),),
    endpoints=(
        Endpoint("10.0.2.2", "default/server"),
        Endpoint("10.0.2.3", "default/elsewhere", ports=MappingProxyType({"http": 9090})),
        Endpoint("10.0.2.9", None, ready=False),
    ),
)  # fmt: skip
R = Resolver("node1")


@pytest.mark.parametrize(
    ("src", "expected"),
    [("10.0.1.2", "client"), ("10.0.1.4", None), ("10.0.2.2", None), ("192.168.0.1", None)],
)
def test_source_is_a_meshed_pod_of_this_node(src: str, expected: str | None) -> None:
    found = R.source(snapshot(), src)
    assert (found.name if found else None) == expected


@pytest.mark.parametrize(
    ("src", "dst", "kind"),
    [
        ("10.0.1.2", "10.0.2.2", "hbone"),  # meshed pod on another node
        ("10.0.1.2", "10.0.1.3", "local"),  # meshed pod on this node
        ("10.0.1.2", "10.0.1.4", "passthrough"),  # pod outside the mesh
        ("10.0.1.2", "1.1.1.1", "passthrough"),  # not a pod at all
        ("10.0.1.4", "10.0.2.2", "passthrough"),  # client outside the mesh
    ],
)
def test_route_kind(src: str, dst: str, kind: str) -> None:
    snap = snapshot()
    route = R.route(snap, R.source(snap, src), dst, 8080)
    assert (route.kind, route.ip, route.port) == (kind, dst, 8080)


def test_service_vip_and_endpoint_ports() -> None:
    snap = snapshot(SVC)
    target = R.service(snap, "10.96.0.10", 80)
    assert target is not None and target.port.target_port == 8080
    source = R.source(snap, "10.0.1.2")
    plain = R.endpoint_route(snap, source, target, "10.0.2.2")
    named = R.endpoint_route(snap, source, target, "10.0.2.3")
    assert (plain.kind, plain.port, named.port) == ("hbone", 8080, 9090)
    assert plain.service is SVC


def test_not_a_vip() -> None:
    assert R.service(snapshot(SVC), "10.0.2.2", 80) is None


def test_vip_port_without_service_port_or_ready_endpoints() -> None:
    with pytest.raises(NoEndpoints, match="default/server has no ready endpoint for port 443"):
        R.service(snapshot(SVC), "10.96.0.10", 443)
    idle = Service(
        name="idle", namespace="default", cluster_ips=("10.96.0.11",),
        ports=(ServicePort(80, 8080),), endpoints=(Endpoint("10.0.2.2", ready=False),),
    )  # fmt: skip
    with pytest.raises(NoEndpoints):
        R.service(snapshot(idle), "10.96.0.11", 80)
