"""Warnings as Kubernetes Events (``agent.sources.objectwarnings``), against the fake API server
through the official client: an unknown pod annotation on the agent's node, an
AuthorizationPolicy value that can never match."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from kubernetes import client

from agent.sources.kube import KubeSource
from agent.state import StateStore
from tests.fakeapi import FakeApiServer
from tests.fakeapi.objects import authz, pod, wait_for

FAST_LEASE = (1.5, 1.0, 0.1)  # duration, renew deadline, retry period (seconds)
Start = Callable[..., KubeSource]


@pytest.fixture
def api() -> Iterator[FakeApiServer]:
    with FakeApiServer(bookmark_interval=0.05) as fake:
        fake.create("Namespace", {"metadata": {"name": "default"}})
        yield fake


@pytest.fixture
def start(api: FakeApiServer) -> Iterator[Start]:
    """``start(node, **kw)``: an agent's Kubernetes source, synced; all are stopped after."""
    started: list[tuple[KubeSource, Any]] = []

    def run(node: str, trust_domain: str = "cluster.local", **kw: Any) -> KubeSource:
        connection = client.ApiClient(client.Configuration(host=api.url))
        store = StateStore(trust_domain)
        source = KubeSource(connection, store, node=node, watch_timeout=5, **kw)
        started.append((source, connection))
        source.start()
        assert source.wait_ready(10), f"not ready: {source.not_ready()}"
        return source

    yield run
    for source, connection in started:
        source.stop()
        connection.close()


def _events(api: FakeApiServer, reason: str, *, at_least: int = 0) -> list[dict[str, Any]]:
    """The Events of ``reason``; none until there are ``at_least`` (for ``wait_for``)."""
    events = [e for e in api.list_objects("Event") if e["reason"] == reason]
    return events if len(events) >= at_least else []


def test_an_unknown_pod_annotation_is_one_warning_event_from_the_pods_node(
    api: FakeApiServer, start: Start
) -> None:
    typo = {"nodemesh.io/mesh": "enabled", "nodemesh.io/http-port": "8080"}
    api.create("Pod", pod("elsewhere", "10.244.2.2", node="node2", annotations=typo))
    api.create("Pod", pod("web", "10.244.1.2", annotations=typo))
    source = start("node1")
    [event] = wait_for(lambda: _events(api, "UnknownAnnotation"))
    assert event["type"] == "Warning"
    assert event["involvedObject"]["kind"] == "Pod" and event["involvedObject"]["name"] == "web"
    assert event["involvedObject"]["uid"] == api.get("Pod", "web")["metadata"]["uid"]
    assert "nodemesh.io/http-port:" in event["message"]
    assert "did you mean nodemesh.io/http-ports?" in event["message"]
    snap = source.store.snapshot()
    assert {w.name for w in snap.workloads.values() if snap.is_meshed(w)} == {"web", "elsewhere"}
    assert source.describe()["warnings"] == [
        {"object": "Pod default/web", "reason": "UnknownAnnotation", "message": event["message"]}
    ]

    # A change of the pod, a relist after the history is gone: nothing new to say.
    api.patch("Pod", "web", {"metadata": {"labels": {"touched": "yes"}}})
    api.restart(forget_history=True)
    wait_for(lambda: source.stats()["pods"]["lists"] == 2)
    api.create("Pod", pod("marker", "10.244.1.3", annotations={"nodemesh.io/mesh": "enabled"}))
    wait_for(lambda: "10.244.1.3" in source.store.snapshot().workload_by_ip)
    assert len(_events(api, "UnknownAnnotation")) == 1

    # A second unknown key is news (said once more, of that key only); fixing both is silent.
    api.patch("Pod", "web", {"metadata": {"annotations": {"nodemesh.io/meshh": "enabled"}}})
    events = wait_for(lambda: _events(api, "UnknownAnnotation", at_least=2))
    assert sorted(e["message"].split(":")[0] for e in events) == [
        "annotation nodemesh.io/http-port",
        "annotation nodemesh.io/meshh",
    ]
    api.patch("Pod", "web", {"metadata": {"annotations": {
        "nodemesh.io/http-port": None, "nodemesh.io/meshh": None}}})  # fmt: skip
    wait_for(lambda: not source.describe()["warnings"])
    assert len(_events(api, "UnknownAnnotation")) == 2


def _policy(methods: list[str]) -> dict[str, Any]:
    policy = authz("web")
    policy["spec"]["rules"] = [{"to": [{"operation": {"methods": methods}}]}]
    return policy


def test_a_never_matching_policy_gets_one_event_from_the_lease_holder_per_generation(
    api: FakeApiServer, start: Start
) -> None:
    api.create("AuthorizationPolicy", _policy(["get"]))
    agents = {node: start(node, lease_timing=FAST_LEASE) for node in ("node1", "node2")}
    lease = wait_for(lambda: api.find("Lease", "nodemesh-route-status", "nodemesh-system"))
    holder = lease["spec"]["holderIdentity"]
    [event] = wait_for(lambda: _events(api, "NeverMatches"))
    assert event["type"] == "Warning" and event["source"]["host"] == holder
    involved = event["involvedObject"]
    assert (involved["kind"], involved["apiVersion"], involved["name"]) == (
        "AuthorizationPolicy",
        "nodemesh.io/v1alpha1",
        "web",
    )
    assert "spec.rules[0].to[0].operation.methods[0]" in event["message"]
    assert "'get' never matches" in event["message"]
    for source in agents.values():  # every agent knows it; only the holder recorded it
        wait_for(lambda source=source: source.describe()["warnings"])
    # Its own status write and a metadata change keep the generation: nothing new to say.
    wait_for(lambda: api.get("AuthorizationPolicy", "web").get("status"))
    dry_run = {"metadata": {"annotations": {"nodemesh.io/dry-run": "true"}}}
    api.patch("AuthorizationPolicy", "web", dry_run)
    for source in agents.values():
        wait_for(
            lambda source=source: all(p.dry_run for p in source.store.snapshot().policies.values())
        )
    assert len(_events(api, "NeverMatches")) == 1

    api.patch("AuthorizationPolicy", "web", {"spec": {"rules": [
        {"to": [{"operation": {"methods": ["GET"]}}]}]}})  # fmt: skip
    for source in agents.values():
        wait_for(lambda source=source: not source.describe()["warnings"])
    assert len(_events(api, "NeverMatches")) == 1


def test_a_principal_of_another_trust_domain_is_warned_and_one_of_the_mesh_is_not(
    api: FakeApiServer, start: Start, caplog: pytest.LogCaptureFixture
) -> None:
    """In a mesh of example.org, ``cluster.local/ns/default/sa/client`` never matches: the
    agent logs it once per generation, ``nodemesh status`` shows it and the Lease holder records
    an Event naming the principal, the mesh's trust domain and the fix; a policy of the mesh's
    own trust domain, or of a pattern that covers it, has none."""
    foreign = authz("foreign")
    foreign["spec"]["rules"] = [{"from": [{"source": {"principals": [
        "cluster.local/ns/default/sa/client"]}}]}]  # fmt: skip
    own = authz("own")
    own["spec"]["rules"] = [{"from": [{"source": {"principals": [
        "example.org/ns/default/sa/client", "*/ns/default/sa/other"]}}]}]  # fmt: skip
    api.create("AuthorizationPolicy", own)
    api.create("AuthorizationPolicy", foreign)
    with caplog.at_level("WARNING", logger="agent.sources.objectwarnings"):
        source = start("node1", trust_domain="example.org", lease_timing=FAST_LEASE)
        [event] = wait_for(lambda: _events(api, "ForeignTrustDomain"))
    assert event["involvedObject"]["name"] == "foreign"
    assert "'cluster.local/ns/default/sa/client' is of trust domain cluster.local, but this " \
        "mesh's is example.org" in event["message"]  # fmt: skip
    assert "write example.org/ns/default/sa/client" in event["message"]
    assert source.describe()["warnings"] == [{
        "object": "AuthorizationPolicy default/foreign", "reason": "ForeignTrustDomain",
        "message": event["message"]}]  # fmt: skip
    logged = [r.getMessage() for r in caplog.records if "trust domain" in r.getMessage()]
    assert logged == [f"AuthorizationPolicy default/foreign (generation 1): {event['message']}"]


def test_a_follower_records_what_it_held_once_it_takes_the_lease(
    api: FakeApiServer, start: Start
) -> None:
    spec = {"holderIdentity": "node9", "leaseDurationSeconds": 4, "renewTime": "0"}
    lease = {"metadata": {"name": "nodemesh-route-status"}, "spec": spec}
    api.create("Lease", lease, namespace="nodemesh-system")
    api.create("AuthorizationPolicy", _policy(["get"]))
    source = start("node1", lease_timing=(4.0, 3.0, 0.1))
    wait_for(lambda: source.describe()["warnings"])  # computed and logged, not recorded
    assert not source.election.leading() and _events(api, "NeverMatches") == []
    wait_for(source.election.leading)  # node9 never renewed: taken over
    [event] = wait_for(lambda: _events(api, "NeverMatches"))
    assert event["source"]["host"] == "node1"


def _event_posts(api: FakeApiServer) -> int:
    return sum(1 for method, path in api.requests if method == "POST" and "/events" in path)


def test_a_restarted_agent_does_not_repeat_a_pods_warning(api: FakeApiServer, start: Start) -> None:
    """The new process knows nothing of what the last one said; the Event's name does."""
    typo = {"nodemesh.io/mesh": "enabled", "nodemesh.io/http-port": "8080"}
    api.create("Pod", pod("web", "10.244.1.2", annotations=typo))
    first = start("node1")
    [event] = wait_for(lambda: _events(api, "UnknownAnnotation"))
    first.stop()
    posts = _event_posts(api)
    second = start("node1")
    api.create("Pod", pod("marker", "10.244.1.3", annotations={"nodemesh.io/mesh": "enabled"}))
    wait_for(lambda: "10.244.1.3" in second.store.snapshot().workload_by_ip)
    assert _event_posts(api) == posts + 1  # it said it again, and was told it is said
    assert _events(api, "UnknownAnnotation") == [event]
    assert second.describe()["warnings"] == first.describe()["warnings"]


def test_a_new_lease_holder_does_not_repeat_a_policys_warning_but_a_new_generation_is_news(
    api: FakeApiServer, start: Start
) -> None:
    api.create("AuthorizationPolicy", _policy(["get"]))
    agents = {node: start(node, lease_timing=FAST_LEASE) for node in ("node1", "node2")}
    [event] = wait_for(lambda: _events(api, "NeverMatches"))
    holder = event["source"]["host"]
    posts = _event_posts(api)
    agents[holder].stop()  # gives the Lease up: the other takes it and records what it holds
    [other] = [source for node, source in agents.items() if node != holder]
    wait_for(other.election.leading)
    wait_for(lambda: _event_posts(api) == posts + 1)
    assert _events(api, "NeverMatches") == [event]

    # Another wrong value: a new generation, said by the new holder.
    api.patch("AuthorizationPolicy", "web", {"spec": {"rules": [
        {"to": [{"operation": {"methods": ["post"]}}]}]}})  # fmt: skip
    events = wait_for(lambda: _events(api, "NeverMatches", at_least=2))
    [new] = [e for e in events if e != event]
    assert "'post' never matches" in new["message"] and new["source"]["host"] != holder


def test_a_namespace_mesh_label_no_agent_reads_is_one_warning_event_from_the_lease_holder(
    api: FakeApiServer, start: Start
) -> None:
    # `nodemesh.io/mesh=true` (Istio's and Linkerd's habits: istio-injection=enabled,
    # linkerd.io/inject: enabled) meshes nothing, as before; it is said where kubectl describe
    # namespace shows it, instead of leaving the namespace's traffic silently unmeshed.
    api.create("Namespace", {"metadata": {"name": "shop", "labels": {"nodemesh.io/mesh": "true"}}})
    api.create(
        "Namespace", {"metadata": {"name": "fine", "labels": {"nodemesh.io/mesh": "enabled"}}}
    )
    agents = {node: start(node, lease_timing=FAST_LEASE) for node in ("node1", "node2")}
    [event] = wait_for(lambda: _events(api, "InvalidLabel"))
    assert event["type"] == "Warning" and event["metadata"]["namespace"] == "default"
    involved = event["involvedObject"]
    assert (involved["kind"], involved["apiVersion"], involved["name"]) == (
        "Namespace",
        "v1",
        "shop",
    )
    assert involved["uid"] == api.get("Namespace", "shop", namespace="")["metadata"]["uid"]
    assert "label nodemesh.io/mesh: 'true'" in event["message"]
    assert "use enabled" in event["message"]
    for source in agents.values():  # every agent knows it; only the holder recorded it
        wait_for(lambda source=source: source.describe()["warnings"])
        assert not source.store.snapshot().namespaces["shop"].mesh_enabled

    # Fixed: the warning goes; nothing new is recorded.
    api.patch("Namespace", "shop", {"metadata": {"labels": {"nodemesh.io/mesh": "enabled"}}}, "")
    for source in agents.values():
        wait_for(lambda source=source: not source.describe()["warnings"])
    assert len(_events(api, "InvalidLabel")) == 1
