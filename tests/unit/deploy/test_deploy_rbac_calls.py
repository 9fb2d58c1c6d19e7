"""The RBAC of daemonset/ against the API calls the agent and the CA really make.

The agent's Kubernetes source runs against the fake API server (tests/fakeapi) through the
official client, through every path that calls the API: list and watch of each resource, an
Event for a pod with an invalid annotation and one for a policy that never matches, the status
of a good and of an invalid policy. Each request the server saw is turned into Kubernetes'
(verb, group, resource, namespace, name) and must be allowed by the rendered roles. So a new API
call in the code fails here until the manifests grant it, and a permission the code stops using
shows up as unused.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from kubernetes import client

from agent.ca.kube import ApiServerCluster, load_or_create_secret, publish_bundle_configmap
from agent.sources.kube import KubeSource
from agent.state import StateStore
from tests.fakeapi import FakeApiServer
from tests.fakeapi.objects import authz, pod, wait_for
from tests.unit.deploy.manifests import Obj, find, flags, pod_spec, render

NAMESPACE = "nodemesh-system"


@dataclass(frozen=True)
class Call:
    verb: str
    group: str
    resource: str  # with "/subresource"
    namespace: str
    name: str


def call_of(method: str, target: str) -> Call:
    """Kubernetes' request attributes of one HTTP request to the API server."""
    url = urlsplit(target)
    parts = url.path.strip("/").split("/")
    group, rest = ("", parts[2:]) if parts[0] == "api" else (parts[1], parts[3:])
    namespace = ""
    if rest[0] == "namespaces" and len(rest) > 2:
        namespace, rest = rest[1], rest[2:]
    resource, name, sub = rest[0], rest[1] if len(rest) > 1 else "", rest[2:]
    watch = parse_qs(url.query).get("watch", ["false"])[-1].lower() in ("true", "1")
    verb = {
        "GET": "get" if name else ("watch" if watch else "list"),
        "POST": "create",
        "PUT": "update",
        "PATCH": "patch",
        "DELETE": "delete",
    }[method]
    return Call(verb, group, "/".join([resource, *sub]), namespace, name)


def allowed(call: Call, roles: list[tuple[Obj, str | None]]) -> bool:
    """Whether any rule of ``roles`` ((role, namespace it applies in or None)) allows ``call``."""
    for role, scope in roles:
        if scope is not None and call.namespace != scope:
            continue
        for rule in role["rules"]:
            names = rule.get("resourceNames")
            if (
                call.group in rule["apiGroups"]
                and call.resource in rule["resources"]
                and call.verb in rule["verbs"]
                and (names is None or (call.name and call.name in names))
            ):
                return True
    return False


def agent_roles() -> list[tuple[Obj, str | None]]:
    objs = render("daemonset")
    return [
        (find(objs, "ClusterRole", "nodemesh-agent"), None),
        (find(objs, "Role", "nodemesh-agent"), NAMESPACE),
    ]


def ca_roles() -> list[tuple[Obj, str | None]]:
    objs = render("daemonset")
    return [
        (find(objs, "ClusterRole", "nodemesh-ca"), None),
        (find(objs, "Role", "nodemesh-ca"), NAMESPACE),
    ]


@pytest.fixture
def api() -> Iterator[FakeApiServer]:
    with FakeApiServer(bookmark_interval=0.05) as fake:
        yield fake


def api_client(api: FakeApiServer) -> Any:
    return client.ApiClient(client.Configuration(host=api.url))


def test_the_agent_roles_allow_every_call_of_the_kubernetes_source(api: FakeApiServer) -> None:
    api.create("Namespace", {"metadata": {"name": "default"}})
    api.create("Pod", pod("a", "10.244.1.2", annotations={"nodemesh.io/mesh": "enabled"}))
    api.create("AuthorizationPolicy", authz("good"))
    bad = authz("bad")
    bad["spec"]["action"] = "MAYBE"
    api.create("AuthorizationPolicy", bad)
    never = authz("never")  # accepted, but warned of: an Event from the Lease holder
    never["spec"]["rules"] = [{"to": [{"operation": {"methods": ["get"]}}]}]
    api.create("AuthorizationPolicy", never)
    connection = api_client(api)
    source = KubeSource(connection, StateStore(), node="node1", watch_timeout=5)
    source.start()
    try:
        assert source.wait_ready(10), source.not_ready()
        api.patch("Pod", "a", {"metadata": {"annotations": {"nodemesh.io/mesh": "yes please"}}})
        for reason in ("InvalidAnnotation", "NeverMatches"):
            wait_for(lambda r=reason: any(e["reason"] == r for e in api.list_objects("Event")))
        wait_for(lambda: api.get("AuthorizationPolicy", "bad").get("status"))
        wait_for(source.election.leading)  # the route-status Lease: created, then renewed
        wait_for(lambda: ("PUT", f"/apis/coordination.k8s.io/v1/namespaces/{NAMESPACE}/leases/"
                          "nodemesh-route-status") in api.requests)  # fmt: skip
    finally:
        source.stop()
        connection.close()
    calls = {call_of(method, target) for method, target in api.requests}
    refused = sorted(c for c in calls if not allowed(c, agent_roles()))  # type: ignore[type-var]
    assert not refused, f"daemonset/agent-rbac.yaml does not allow: {refused}"
    used = {(c.verb, c.group, c.resource) for c in calls}
    for wanted in [
        ("watch", "", "pods"),
        ("list", "discovery.k8s.io", "endpointslices"),
        ("create", "", "events"),
        ("patch", "nodemesh.io", "authorizationpolicies/status"),
        ("create", "coordination.k8s.io", "leases"),
        ("update", "coordination.k8s.io", "leases"),
    ]:
        assert wanted in used, f"the scenario did not exercise {wanted}"


class Recorder:
    """A CoreV1Api stand-in for the ConfigMap calls (the fake API server has no ConfigMaps):
    it records each call as the request the client would send and answers like the server."""

    def __init__(self) -> None:
        self.calls: list[Call] = []
        self.stored: Any = None

    def read_namespaced_config_map(self, name: str, namespace: str) -> Any:
        self.calls.append(Call("get", "", "configmaps", namespace, name))
        if self.stored is None:
            raise client.ApiException(status=404, reason="Not Found")
        return self.stored

    def create_namespaced_config_map(self, namespace: str, body: Any) -> Any:
        self.calls.append(Call("create", "", "configmaps", namespace, ""))
        self.stored = body
        return body

    def replace_namespaced_config_map(self, name: str, namespace: str, body: Any) -> Any:
        self.calls.append(Call("update", "", "configmaps", namespace, name))
        self.stored = body
        return body


def test_the_ca_roles_allow_every_call_of_kubernetes_mode(api: FakeApiServer) -> None:
    ca = pod_spec(find(render("daemonset"), "Deployment", "nodemesh-ca"))["containers"][0]
    secret_ns, _, secret = flags(ca)["--root-secret"].partition("/")
    configmap_ns, _, configmap = flags(ca)["--root-configmap"].partition("/")
    api.add_token("t-agent", f"system:serviceaccount:{NAMESPACE}:nodemesh-agent")
    api.create("Pod", pod("a", "10.244.1.2", sa="client"))
    cluster = ApiServerCluster(api_client(api), audiences=["nodemesh-ca"])
    authority = load_or_create_secret(cluster.core, secret_ns, secret, "cluster.local")
    load_or_create_secret(cluster.core, secret_ns, secret, "cluster.local")  # a second replica
    cluster.review_token("t-agent")
    cluster.pod_node("default", "a")
    cluster.has_pod_on("node1", "default", "client")
    recorder = Recorder()
    publish_bundle_configmap(recorder, configmap_ns, configmap, authority)
    recorder.stored.data = {"root.pem": "an older bundle"}
    publish_bundle_configmap(recorder, configmap_ns, configmap, authority)
    calls = {call_of(method, target) for method, target in api.requests} | set(recorder.calls)
    refused = sorted(c for c in calls if not allowed(c, ca_roles()))  # type: ignore[type-var]
    assert not refused, f"daemonset/ca-rbac.yaml does not allow: {refused}"
    assert {c.verb for c in recorder.calls} == {"get", "create", "update"}
    assert Call("create", "authentication.k8s.io", "tokenreviews", "", "") in calls


def test_a_call_outside_the_roles_is_refused() -> None:
    # The check above can fail: reading any Secret, or the CA's by another verb, is not allowed.
    assert not allowed(Call("get", "", "secrets", NAMESPACE, "other"), ca_roles())
    assert not allowed(Call("delete", "", "secrets", NAMESPACE, "nodemesh-ca"), ca_roles())
    assert not allowed(Call("get", "", "secrets", "default", "nodemesh-ca"), ca_roles())
    assert not allowed(Call("get", "", "pods", "default", "a"), agent_roles())
    assert call_of("GET", "/api/v1/pods?watch=true") == Call("watch", "", "pods", "", "")
    assert call_of("PATCH", "/apis/nodemesh.io/v1alpha1/namespaces/d/trafficpolicies/t/status") == (
        Call("patch", "nodemesh.io", "trafficpolicies/status", "d", "t")
    )
