"""The reconciler's plan: desired pods and interfaces against what the kernel holds."""

from __future__ import annotations

from agent.datapath.desired import LocalPod, plan
from agent.datapath.layout import PodEntry
from agent.state import Namespace, StateStore, Workload
from agent.wiring import local_pods


def store_with(*workloads: Workload, ns_meshed: bool = False) -> StateStore:
    store = StateStore()
    with store.update() as txn:
        txn.put_namespace(
            Namespace("default", {"nodemesh.io/mesh": "enabled"} if ns_meshed else {})
        )
        for w in workloads:
            txn.put_workload(w)
    return store


def pod(name: str, ip: str, node: str = "n1", **kw: object) -> Workload:
    return Workload(f"default/{name}", name, "default", name, node, (ip,) if ip else (), **kw)  # type: ignore[arg-type]


def test_local_pods_keep_local_ipv4_pods_with_membership() -> None:
    snap = store_with(
        pod("a", "10.0.0.2", mesh_annotation="enabled", exclude_outbound_ports=frozenset({22})),
        pod("b", "10.0.0.3"),
        pod("c", "10.0.1.2", node="n2", mesh_annotation="enabled"),
        pod("pending", ""),
        pod("host", "10.1.0.1", host_network=True),
        pod("v6", "fd00::2", mesh_annotation="enabled"),
    ).snapshot()
    pods = local_pods(snap, "n1")
    assert pods == [
        LocalPod("10.0.0.2", "default/a", True, frozenset({22}), frozenset()),
        LocalPod("10.0.0.3", "default/b", False, frozenset(), frozenset()),
    ]


def test_namespace_label_meshes_and_annotation_wins() -> None:
    snap = store_with(pod("a", "10.0.0.2"), pod("b", "10.0.0.3", mesh_annotation="disabled"),
                      ns_meshed=True).snapshot()  # fmt: skip
    assert [p.meshed for p in local_pods(snap, "n1")] == [True, False]


IFACES = {"10.0.0.2": 4, "10.0.0.3": 5}.get


def desired() -> list[LocalPod]:
    return [
        LocalPod("10.0.0.2", "default/a", True, frozenset(), frozenset()),
        LocalPod("10.0.0.3", "default/b", False, frozenset(), frozenset()),
    ]


def test_fresh_node_gets_entries_and_filters() -> None:
    p = plan(desired(), IFACES, {}, {}, uplinks=[2])
    assert [e.ip for e in p.put] == ["10.0.0.2", "10.0.0.3"]
    assert p.attach_pod == (4, 5) and p.attach_uplink == (2,) and not p.detach


def test_matching_kernel_state_gives_an_empty_plan() -> None:
    current = {
        "10.0.0.2": PodEntry("10.0.0.2", 4, True),
        "10.0.0.3": PodEntry("10.0.0.3", 5, False),
    }
    attached = {4: "nm_pod_ingress", 5: "nm_pod_ingress", 2: "nm_uplink_ingress"}
    assert plan(desired(), IFACES, current, attached, uplinks=[2]).empty


def test_membership_change_is_only_a_map_update() -> None:
    current = {
        "10.0.0.2": PodEntry("10.0.0.2", 4, False),
        "10.0.0.3": PodEntry("10.0.0.3", 5, False),
    }
    attached = {4: "nm_pod_ingress", 5: "nm_pod_ingress", 2: "nm_uplink_ingress"}
    p = plan(desired(), IFACES, current, attached, uplinks=[2])
    assert p.put == (PodEntry("10.0.0.2", 4, True),)
    assert not (p.attach_pod or p.attach_uplink or p.detach or p.delete)


def test_departed_pod_loses_entry_and_filter() -> None:
    current = {
        "10.0.0.2": PodEntry("10.0.0.2", 4, True),
        "10.0.0.9": PodEntry("10.0.0.9", 9, True),
    }
    attached = {4: "nm_pod_ingress", 9: "nm_pod_ingress", 2: "nm_uplink_ingress"}
    p = plan(desired()[:1], IFACES, current, attached, uplinks=[2])
    assert p.delete == ("10.0.0.9",) and p.detach == (9,)


def test_unrouted_pod_is_reported_not_programmed() -> None:
    p = plan(desired(), {"10.0.0.2": 4}.get, {}, {}, uplinks=[])
    assert p.unresolved == ("10.0.0.3",) and [e.ip for e in p.put] == ["10.0.0.2"]


def test_interface_that_is_both_uplink_and_pod_gets_the_pod_program() -> None:
    p = plan(desired(), IFACES, {}, {}, uplinks=[4, 2])
    assert 4 in p.attach_pod and p.attach_uplink == (2,)
