from agent.state import Namespace, StateStore, Workload


def _pod(name: str, ns: str = "default", **kw: object) -> Workload:
    return Workload(
        uid=f"uid-{name}",
        name=name,
        namespace=ns,
        service_account=name,
        node="node1",
        ips=(f"10.0.0.{len(name)}",),
        **kw,  # type: ignore[arg-type]
    )


def test_update_is_atomic_and_notifies_changed_kinds() -> None:
    store = StateStore()
    seen: list[tuple[int, frozenset[str]]] = []
    store.subscribe(lambda snap, kinds: seen.append((snap.version, kinds)))
    before = store.snapshot()
    with store.update() as txn:
        txn.put_namespace(Namespace("default"))
        txn.put_workload(_pod("client"))
    after = store.snapshot()
    assert before.workloads == {}
    assert after.workload_by_ip["10.0.0.6"].name == "client"
    assert seen == [(1, frozenset({"namespaces", "workloads"}))]


def test_noop_update_keeps_version() -> None:
    store = StateStore()
    with store.update() as txn:
        txn.put_namespace(Namespace("default"))
    with store.update() as txn:
        txn.put_namespace(Namespace("default"))
    assert store.snapshot().version == 1


def test_membership_annotation_wins_over_namespace_label() -> None:
    store = StateStore()
    with store.update() as txn:
        txn.put_namespace(Namespace("default", {"nodemesh.io/mesh": "enabled"}))
        txn.put_workload(_pod("a"))
        txn.put_workload(_pod("bb", mesh_annotation="disabled"))
        txn.put_workload(_pod("ccc", host_network=True))
    snap = store.snapshot()
    meshed = {w.name for w in snap.meshed_workloads_on("node1")}
    assert meshed == {"a"}


def test_replace_removes_absent_objects() -> None:
    store = StateStore()
    with store.update() as txn:
        txn.put_workload(_pod("a"))
        txn.put_workload(_pod("bb"))
    with store.update() as txn:
        txn.replace("workloads", [_pod("bb")])
    assert {w.name for w in store.snapshot().workloads.values()} == {"bb"}
