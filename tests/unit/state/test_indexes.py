"""The incrementally maintained indexes always equal indexes rebuilt from scratch."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from agent.state import Namespace, PolicyObject, Service, Snapshot, StateStore, Workload
from agent.state.model import frozen_map

IPS = [f"10.0.0.{i}" for i in range(1, 6)]
workloads = st.builds(
    lambda uid, node, ns, ips, labels: Workload(
        uid=uid,
        name=uid,
        namespace=ns,
        service_account="sa",
        node=node,
        ips=tuple(ips),
        labels=frozen_map(labels),
    ),
    uid=st.sampled_from(["a", "b", "c", "d"]),
    node=st.sampled_from(["n1", "n2"]),
    ns=st.sampled_from(["x", "y"]),
    ips=st.lists(st.sampled_from(IPS), max_size=2, unique=True),
    labels=st.dictionaries(st.sampled_from(["app", "v"]), st.sampled_from(["1", "2"])),
)
services = st.builds(
    lambda name, ips: Service(name=name, namespace="x", cluster_ips=tuple(ips)),
    name=st.sampled_from(["s1", "s2"]),
    ips=st.lists(st.sampled_from(["10.96.0.1", "10.96.0.2"]), max_size=1),
)
policies = st.builds(
    lambda name, ns: PolicyObject(kind="AuthorizationPolicy", namespace=ns, name=name, spec={}),
    name=st.sampled_from(["p1", "p2", "p3"]),
    ns=st.sampled_from(["x", "y"]),
)
ops = st.lists(
    st.one_of(
        st.tuples(st.just("put"), workloads),
        st.tuples(st.just("put"), services),
        st.tuples(st.just("put"), policies),
        st.tuples(st.just("del_w"), st.sampled_from(["a", "b", "c", "d"])),
        st.tuples(st.just("del_p"), st.sampled_from(["p1", "p2", "p3"])),
        st.tuples(st.just("replace_w"), st.lists(workloads, max_size=3)),
    ),
    max_size=12,
)


def _expected(snap: Snapshot) -> dict[str, Any]:
    by_node: dict[str, set[str]] = {}
    by_label: dict[tuple[str, str, str], set[str]] = {}
    for w in snap.workloads.values():
        by_node.setdefault(w.node, set()).add(w.uid)
        for k, v in w.labels.items():
            by_label.setdefault((w.namespace, k, v), set()).add(w.uid)
    ip_holders = {ip for w in snap.workloads.values() for ip in w.ips}
    svc_ips = {ip: s for s in snap.services.values() for ip in s.cluster_ips}
    return {"node": by_node, "label": by_label, "ips": ip_holders, "svc": svc_ips}


def _apply(store: StateStore, batch: list[tuple[str, Any]]) -> None:
    with store.update() as txn:
        for op, arg in batch:
            if op == "put" and isinstance(arg, Workload):
                txn.put_workload(arg)
            elif op == "put" and isinstance(arg, Service):
                txn.put_service(arg)
            elif op == "put":
                txn.put_policy(arg)
            elif op == "del_w":
                txn.delete("workloads", arg)
            elif op == "del_p":
                txn.delete("policies", ("AuthorizationPolicy", "x", arg))
            else:
                txn.replace("workloads", arg)


@settings(max_examples=150, deadline=None)
@given(st.lists(ops, min_size=1, max_size=6))
def test_incremental_indexes_equal_a_rebuild(batches: list[list[tuple[str, Any]]]) -> None:
    store = StateStore()
    for batch in batches:
        before = store.snapshot()
        _apply(store, batch)
        snap = store.snapshot()
        want = _expected(snap)
        assert {k: set(v) for k, v in snap.workloads_by_node.items()} == want["node"]
        assert {k: set(v) for k, v in snap.workloads_by_label.items()} == want["label"]
        assert set(snap.workload_by_ip) == want["ips"]
        for ip, w in snap.workload_by_ip.items():
            assert ip in w.ips and snap.workloads[w.uid] is w
        assert set(snap.service_by_ip) == set(want["svc"])
        expected_policies = sorted(snap.policies.values(), key=lambda p: (p.namespace, p.name))
        assert list(snap.policies_of("AuthorizationPolicy")) == expected_policies
        if snap.version == before.version:
            continue
        for kind, keys in snap.changed_keys.items():
            for key in keys:
                assert getattr(before, kind).get(key) != getattr(snap, kind).get(key)


def _pod(uid: str, ns: str = "shop", **labels: str) -> Workload:
    return Workload(
        uid=uid,
        name=uid,
        namespace=ns,
        service_account="sa",
        node="n1",
        ips=(f"10.1.0.{len(uid)}",),
        labels=frozen_map(labels),
    )


def test_select_workloads_and_policies_selecting() -> None:
    store = StateStore()
    wide = PolicyObject("AuthorizationPolicy", "shop", "all", {"action": "DENY"})
    narrow = PolicyObject(
        "AuthorizationPolicy", "shop", "srv", {"selector": {"matchLabels": {"app": "server"}}}
    )
    with store.update() as txn:
        txn.put_namespace(Namespace("shop"))
        txn.put_workload(_pod("s1", app="server", version="v1"))
        txn.put_workload(_pod("s22", app="server", version="v2"))
        txn.put_workload(_pod("c333", app="client"))
        txn.put_workload(_pod("o4444", "other", app="server"))
        txn.put_policy(narrow)
        txn.put_policy(wide)
    snap = store.snapshot()
    assert [w.uid for w in snap.select_workloads("shop", {"app": "server"})] == ["s1", "s22"]
    assert [w.uid for w in snap.select_workloads("shop", {"app": "server", "version": "v2"})] == [
        "s22"
    ]
    assert len(snap.select_workloads("shop", {})) == 3
    assert snap.policies_selecting("AuthorizationPolicy", snap.workloads["s1"]) == [wide, narrow]
    assert snap.policies_selecting("AuthorizationPolicy", snap.workloads["c333"]) == [wide]
    assert [w.uid for w in snap.workloads_in("other")] == ["o4444"]


def test_changed_keys_name_only_real_changes() -> None:
    store = StateStore()
    with store.update() as txn:
        txn.put_workload(_pod("a"))
        txn.put_workload(_pod("bb"))
    with store.update() as txn:
        txn.replace("workloads", [_pod("a"), _pod("bb", app="x"), _pod("ccc")])
    assert store.snapshot().changed_keys == {"workloads": frozenset({"bb", "ccc"})}


def test_reused_ip_survives_removal_of_the_old_pod() -> None:
    store = StateStore()
    old = Workload(
        uid="old", name="old", namespace="x", service_account="sa", node="n1", ips=("10.9.9.9",)
    )
    new = Workload(
        uid="new", name="new", namespace="x", service_account="sa", node="n1", ips=("10.9.9.9",)
    )
    with store.update() as txn:
        txn.put_workload(old)
    with store.update() as txn:
        txn.put_workload(new)
    assert store.snapshot().workload_by_ip["10.9.9.9"] is new
    with store.update() as txn:
        txn.delete("workloads", "old")
    assert store.snapshot().workload_by_ip["10.9.9.9"] is new
