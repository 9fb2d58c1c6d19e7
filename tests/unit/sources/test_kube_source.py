"""The Kubernetes source against the fake API server, through the official client."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from kubernetes import client

from agent.sources.kube import KubeSource
from agent.state import Snapshot, StateStore
from tests.fakeapi import FakeApiServer
from tests.fakeapi.objects import authz, endpoint_slice, pod, service, wait_for


class Cluster:
    def __init__(self, api: FakeApiServer, store: StateStore, source: KubeSource) -> None:
        self.api, self.store, self.source = api, store, source

    def snap(self) -> Snapshot:
        return self.store.snapshot()

    def names(self) -> set[str]:
        return {w.name for w in self.snap().workloads.values()}

    def meshed(self) -> set[str]:
        s = self.snap()
        return {w.name for w in s.workloads.values() if s.is_meshed(w)}


@pytest.fixture
def api() -> Iterator[FakeApiServer]:
    with FakeApiServer(bookmark_interval=0.05) as fake:
        fake.create("Namespace", {"metadata": {"name": "default"}})
        yield fake


def _start(api: FakeApiServer, **kw: object) -> tuple[StateStore, KubeSource, client.ApiClient]:
    store = StateStore()
    api_client = client.ApiClient(client.Configuration(host=api.url))
    source = KubeSource(api_client, store, node="node1", watch_timeout=5, **kw)  # type: ignore[arg-type]
    source.start()
    assert source.wait_ready(10), f"not ready: {source.not_ready()}"
    return store, source, api_client


@pytest.fixture
def cluster(api: FakeApiServer) -> Iterator[Cluster]:
    api.create("Pod", pod("a", "10.244.1.2", annotations={"nodemesh.io/mesh": "enabled"}))
    api.create("Pod", pod("b", "10.244.1.3", labels={"app": "server"}))
    store, source, api_client = _start(api)
    try:
        yield Cluster(api, store, source)
    finally:
        source.stop()
        api_client.close()


def test_initial_sync_and_membership(api: FakeApiServer) -> None:
    api.create(
        "Namespace", {"metadata": {"name": "shop", "labels": {"nodemesh.io/mesh": "enabled"}}}
    )
    api.create("Pod", pod("in-ns", "10.244.1.4", ns="shop"))
    api.create(
        "Pod", pod("opt-out", "10.244.1.5", ns="shop", annotations={"nodemesh.io/mesh": "disabled"})
    )
    api.create("Pod", pod("pending", None, ns="shop"))
    api.create("Pod", pod("hostnet", "192.168.0.1", ns="shop", host_network=True))
    done = pod("done", "10.244.1.6", ns="shop")
    done["status"]["phase"] = "Succeeded"
    api.create("Pod", done)
    api.create("Service", service("server", "10.96.0.10"))
    api.create("EndpointSlice", endpoint_slice("server-1", "server", ["10.244.1.3"]))
    api.create("AuthorizationPolicy", authz("allow"))
    store, source, api_client = _start(api, page_size=2)
    try:
        c = Cluster(api, store, source)
        assert c.names() == {"in-ns", "opt-out", "pending"}
        assert c.meshed() == {"in-ns"}
        snap = c.snap()
        svc = snap.service_by_ip["10.96.0.10"]
        assert [(e.ip, dict(e.ports)) for e in svc.endpoints] == [("10.244.1.3", {"http": 8080})]
        assert [p.name for p in snap.policies_of("AuthorizationPolicy")] == ["allow"]
        assert source.stats()["pods"]["lists"] == 1
        view = source.describe()
        assert view["source"] == "kubernetes" and view["synced"] is True
        assert view["sync"] == source.stats() and source.last_error is None
    finally:
        source.stop()
        api_client.close()


def test_add_change_delete_of_each_kind(cluster: Cluster) -> None:
    api = cluster.api
    api.create("Pod", pod("c", None, labels={"app": "server"}))
    wait_for(lambda: "c" in cluster.names())
    api.patch(
        "Pod",
        "c",
        {"status": {"podIP": "10.244.1.9", "podIPs": [{"ip": "10.244.1.9"}], "phase": "Running"}},
    )
    wait_for(lambda: "10.244.1.9" in cluster.snap().workload_by_ip)
    api.delete("Pod", "c")
    wait_for(lambda: "c" not in cluster.names())

    api.create("Service", service("server", "10.96.0.10"))
    wait_for(lambda: "10.96.0.10" in cluster.snap().service_by_ip)
    api.create("EndpointSlice", endpoint_slice("server-1", "server", ["10.244.1.3"]))
    wait_for(lambda: cluster.snap().service_by_ip["10.96.0.10"].endpoints)
    api.patch(
        "EndpointSlice",
        "server-1",
        {"endpoints": [{"addresses": ["10.244.1.3"], "conditions": {"ready": False}}]},
    )
    wait_for(lambda: not cluster.snap().service_by_ip["10.96.0.10"].endpoints[0].ready)
    api.delete("EndpointSlice", "server-1")
    wait_for(lambda: not cluster.snap().service_by_ip["10.96.0.10"].endpoints)
    api.delete("Service", "server")
    wait_for(lambda: not cluster.snap().services)

    api.create(
        "TrafficPolicy",
        {
            "apiVersion": "nodemesh.io/v1alpha1",
            "kind": "TrafficPolicy",
            "metadata": {"name": "tp"},
            "spec": {"targetRef": {"kind": "Service", "name": "server"}},
        },
    )
    wait_for(lambda: list(cluster.snap().policies_of("TrafficPolicy")))
    api.patch("TrafficPolicy", "tp", {"spec": {"loadBalancer": {"type": "RANDOM"}}})
    wait_for(
        lambda: (
            next(cluster.snap().policies_of("TrafficPolicy"))
            .spec.get("loadBalancer", {})
            .get("type")
            == "RANDOM"
        )
    )
    api.delete("TrafficPolicy", "tp")
    wait_for(lambda: not cluster.snap().policies)

    api.create("Namespace", {"metadata": {"name": "extra"}})
    wait_for(lambda: "extra" in cluster.snap().namespaces)
    api.delete("Namespace", "extra")
    wait_for(lambda: "extra" not in cluster.snap().namespaces)


def test_annotation_and_namespace_label_toggles(cluster: Cluster) -> None:
    api = cluster.api
    assert cluster.meshed() == {"a"}
    api.patch(
        "Namespace",
        "default",
        {"metadata": {"labels": {"nodemesh.io/mesh": "enabled"}}},
        namespace="",
    )
    wait_for(lambda: cluster.meshed() == {"a", "b"})
    api.patch("Pod", "b", {"metadata": {"annotations": {"nodemesh.io/mesh": "disabled"}}})
    wait_for(lambda: cluster.meshed() == {"a"})
    api.patch("Pod", "b", {"metadata": {"annotations": {"nodemesh.io/mesh": None}}})
    wait_for(lambda: cluster.meshed() == {"a", "b"})
    api.patch(
        "Namespace", "default", {"metadata": {"labels": {"nodemesh.io/mesh": None}}}, namespace=""
    )
    wait_for(lambda: cluster.meshed() == {"a"})
    api.patch("Pod", "a", {"metadata": {"annotations": {"nodemesh.io/mesh": "disabled"}}})
    wait_for(lambda: cluster.meshed() == set())


def test_gone_relists_without_losing_or_duplicating(cluster: Cluster) -> None:
    api = cluster.api
    api.available = False  # the watchers are cut and cannot come back for now
    api.restart()
    api.delete("Pod", "a")
    api.create("Pod", pod("c", "10.244.1.7"))
    api.patch("Pod", "b", {"metadata": {"labels": {"app": "v2"}}})
    api.restart(forget_history=True)  # the versions they saw are compacted away: 410 Gone
    api.available = True
    wait_for(lambda: cluster.names() == {"b", "c"})
    snap = cluster.snap()
    assert dict(snap.workload_by_ip["10.244.1.3"].labels) == {"app": "v2"}
    assert len(snap.workloads) == 2 and "10.244.1.2" not in snap.workload_by_ip
    stats = cluster.source.stats()["pods"]
    assert stats["gone"] >= 1 and stats["lists"] >= 2


def test_restart_mid_watch_resumes_without_relist(cluster: Cluster) -> None:
    api = cluster.api
    watches = cluster.source.stats()["pods"]["watches"]
    api.restart()
    api.create("Pod", pod("c", "10.244.1.7"))
    wait_for(lambda: "c" in cluster.names())
    stats = cluster.source.stats()["pods"]
    assert stats["watches"] > watches
    assert stats["lists"] == 1 and stats["gone"] == 0


def test_invalid_objects_are_skipped_and_reported(cluster: Cluster) -> None:
    api = cluster.api
    api.patch("Pod", "a", {"metadata": {"annotations": {"nodemesh.io/mesh": "yes please"}}})
    event = wait_for(lambda: api.list_objects("Event"))[0]
    assert event["involvedObject"]["name"] == "a"
    assert event["reason"] == "InvalidAnnotation" and "yes please" in event["message"]
    assert cluster.meshed() == {"a"}  # the previous valid version stays in force

    api.create(
        "Pod",
        pod(
            "other-node",
            "10.244.2.2",
            node="node2",
            annotations={"nodemesh.io/exclude-inbound-ports": "http"},
        ),
    )
    api.create("AuthorizationPolicy", authz("good"))
    bad = authz("bad")
    bad["spec"]["action"] = "MAYBE"  # slipped past validation (no CRD schema in the fake)
    api.create("AuthorizationPolicy", bad)

    def accepted(name: str) -> str | None:
        conditions = api.get("AuthorizationPolicy", name).get("status", {}).get("conditions")
        return conditions[0]["status"] if conditions else None

    assert wait_for(lambda: accepted("good")) == "True"
    assert wait_for(lambda: accepted("bad")) == "False"
    condition = api.get("AuthorizationPolicy", "bad")["status"]["conditions"][0]
    assert condition["reason"] == "InvalidSpec" and "spec.action" in condition["message"]
    assert "fail closed" in condition["message"]
    policies = {p.name: p for p in cluster.snap().policies_of("AuthorizationPolicy")}
    assert sorted(policies) == ["bad", "good"]
    assert dict(policies["bad"].spec) == {"action": "ALLOW"}  # refused, never seen valid: closed
    assert "other-node" not in cluster.names()
    assert len(api.list_objects("Event")) == 1  # only the pod's own node reports it


def test_malformed_event_does_not_stall_the_watch(cluster: Cluster) -> None:
    odd = pod("odd", "10.244.1.8")
    odd["status"]["podIPs"] = "10.244.1.8"
    cluster.api.create("Pod", odd)
    cluster.api.create("Pod", pod("after", "10.244.1.9"))
    wait_for(lambda: "after" in cluster.names())
    assert "odd" not in cluster.names()
    event = wait_for(lambda: cluster.api.list_objects("Event"))[0]
    assert event["reason"] == "MalformedObject"


def test_pod_that_finishes_leaves_the_state(cluster: Cluster) -> None:
    """The field selector drops finished pods; the watch reports the exit as DELETED."""
    cluster.api.patch("Pod", "b", {"status": {"phase": "Succeeded"}})
    wait_for(lambda: cluster.names() == {"a"})
    assert "10.244.1.3" not in cluster.snap().workload_by_ip


def test_status_is_written_once_per_verdict_not_per_agent(api: FakeApiServer) -> None:
    """Agents that find the verdict already in the status do not write it again."""
    agents = [_start(api)]
    try:
        api.create("AuthorizationPolicy", authz("p"))
        wait_for(lambda: api.get("AuthorizationPolicy", "p").get("status"))
        agents += [_start(api), _start(api)]  # they list the policy with its status

        def status_writes() -> int:
            return sum(1 for m, path in api.requests if m == "PATCH" and path.endswith("/status"))

        api.patch("AuthorizationPolicy", "p", {"metadata": {"labels": {"touched": "yes"}}})
        api.create("Pod", pod("c", "10.244.1.7"))
        for store, _, _ in agents:
            wait_for(lambda store=store: "10.244.1.7" in store.snapshot().workload_by_ip)
        assert status_writes() == 1
        conditions = api.get("AuthorizationPolicy", "p")["status"]["conditions"]
        assert [(c["type"], c["status"]) for c in conditions] == [("Accepted", "True")]
    finally:
        for _, source, api_client in agents:
            source.stop()
            api_client.close()
