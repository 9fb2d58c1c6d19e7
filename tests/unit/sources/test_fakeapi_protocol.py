"""The fake API server speaks the protocol the official ``kubernetes`` client expects."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import urllib3
from kubernetes import client

from tests.fakeapi import FakeApiServer
from tests.fakeapi.store import Selector


@pytest.fixture
def api() -> Iterator[FakeApiServer]:
    with FakeApiServer(bookmark_interval=0.05) as fake:
        yield fake


def _client(api: FakeApiServer, token: str | None = None) -> client.ApiClient:
    config = client.Configuration(host=api.url)
    if token:
        config.api_key = {"authorization": f"Bearer {token}"}
    return client.ApiClient(config)


def _pod(name: str, ns: str = "default", **labels: str) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "namespace": ns, "labels": labels},
        "spec": {"nodeName": "node1", "containers": [{"name": "c", "image": "i"}]},
    }


def _events(resp: urllib3.BaseHTTPResponse, count: int) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    buf = b""
    for chunk in resp.stream(1024):
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            out.append(json.loads(line))
            if len(out) == count:
                resp.close()
                return out
    return out


def test_list_get_create_conflict_and_status(api: FakeApiServer) -> None:
    core = client.CoreV1Api(_client(api))
    core.create_namespace({"metadata": {"name": "shop", "labels": {"nodemesh.io/mesh": "enabled"}}})
    core.create_namespaced_pod("shop", _pod("a", "shop", app="a"))
    core.create_namespaced_pod("shop", _pod("b", "shop", app="b"))
    pods = core.list_pod_for_all_namespaces(label_selector="app in (a,c)")
    assert [p.metadata.name for p in pods.items] == ["a"]
    assert int(pods.metadata.resource_version) >= 3
    assert core.read_namespace("shop").metadata.labels == {"nodemesh.io/mesh": "enabled"}
    core.create_namespaced_secret("shop", {"metadata": {"name": "root"}, "data": {}})
    with pytest.raises(client.ApiException) as info:
        core.create_namespaced_secret("shop", {"metadata": {"name": "root"}, "data": {}})
    assert info.value.status == 409
    assert json.loads(info.value.body)["reason"] == "AlreadyExists"
    with pytest.raises(client.ApiException) as missing:
        core.read_namespaced_pod("zzz", "shop")
    assert missing.value.status == 404


def test_pages_and_field_selector(api: FakeApiServer) -> None:
    core = client.CoreV1Api(_client(api))
    for i in range(5):
        api.create("Pod", _pod(f"p{i}"))
    first = core.list_pod_for_all_namespaces(limit=2)
    second = core.list_pod_for_all_namespaces(limit=2, _continue=first.metadata._continue)
    third = core.list_pod_for_all_namespaces(limit=2, _continue=second.metadata._continue)
    names = [p.metadata.name for p in first.items + second.items + third.items]
    assert names == ["p0", "p1", "p2", "p3", "p4"]
    assert third.metadata._continue is None
    assert len(core.list_pod_for_all_namespaces(field_selector="metadata.name=p3").items) == 1


def test_watch_replays_from_version_then_streams_and_bookmarks(api: FakeApiServer) -> None:
    core = client.CoreV1Api(_client(api))
    api.create("Pod", _pod("a"))
    rv = core.list_pod_for_all_namespaces().metadata.resource_version
    api.create("Pod", _pod("b"))
    resp = core.list_pod_for_all_namespaces(
        watch=True, resource_version=rv, allow_watch_bookmarks=True, _preload_content=False
    )
    api.patch("Pod", "a", {"metadata": {"labels": {"x": "y"}}})
    api.delete("Pod", "b")
    events = _events(resp, 4)
    assert [(e["type"], e["object"]["metadata"].get("name")) for e in events] == [
        ("ADDED", "b"),
        ("MODIFIED", "a"),
        ("DELETED", "b"),
        ("BOOKMARK", None),
    ]
    assert int(events[3]["object"]["metadata"]["resourceVersion"]) > int(rv)


def test_watch_from_compacted_version_is_gone(api: FakeApiServer) -> None:
    core = client.CoreV1Api(_client(api))
    api.create("Pod", _pod("a"))
    rv = core.list_pod_for_all_namespaces().metadata.resource_version
    api.create("Pod", _pod("b"))
    api.restart(forget_history=True)
    resp = core.list_pod_for_all_namespaces(watch=True, resource_version=rv, _preload_content=False)
    (event,) = _events(resp, 1)
    assert event["type"] == "ERROR"
    assert event["object"]["code"] == 410


def test_restart_cuts_open_watches(api: FakeApiServer) -> None:
    core = client.CoreV1Api(_client(api))
    resp = core.list_namespace(
        watch=True, resource_version="1", _preload_content=False, _request_timeout=30
    )
    api.restart()
    with pytest.raises(urllib3.exceptions.ProtocolError):
        _events(resp, 1)


def test_custom_objects_status_subresource_and_generation(api: FakeApiServer) -> None:
    custom = client.CustomObjectsApi(_client(api))
    body = {
        "apiVersion": "nodemesh.io/v1alpha1",
        "kind": "TrafficPolicy",
        "metadata": {"name": "tp"},
        "spec": {"targetRef": {"kind": "Service", "name": "s"}},
        "status": {"ignored": True},
    }
    created = custom.create_namespaced_custom_object(
        "nodemesh.io", "v1alpha1", "default", "trafficpolicies", body
    )
    assert "status" not in created
    condition = {"type": "Accepted", "status": "True", "reason": "Valid", "message": ""}
    custom.patch_namespaced_custom_object_status(
        "nodemesh.io",
        "v1alpha1",
        "default",
        "trafficpolicies",
        "tp",
        {"status": {"conditions": [condition]}},
    )
    custom.patch_namespaced_custom_object(
        "nodemesh.io",
        "v1alpha1",
        "default",
        "trafficpolicies",
        "tp",
        {"spec": {"targetRef": {"name": "t"}}},
    )
    got = custom.get_namespaced_custom_object(
        "nodemesh.io", "v1alpha1", "default", "trafficpolicies", "tp"
    )
    assert got["status"]["conditions"] == [condition]
    assert got["metadata"]["generation"] == 2
    assert got["spec"]["targetRef"] == {"kind": "Service", "name": "t"}


def test_token_review_and_required_token() -> None:
    with FakeApiServer(require_token="agent-token") as api:
        api.add_token(
            "node1-token",
            "system:serviceaccount:nodemesh:agent",
            groups=("system:serviceaccounts",),
            audiences=("nodemesh-ca",),
        )
        with pytest.raises(client.ApiException) as info:
            client.CoreV1Api(_client(api)).list_namespace()
        assert info.value.status == 401
        auth = client.AuthenticationV1Api(_client(api, token="agent-token"))
        good = auth.create_token_review(
            {"spec": {"token": "node1-token", "audiences": ["nodemesh-ca"]}}
        )
        assert good.status.authenticated
        assert good.status.user.username == "system:serviceaccount:nodemesh:agent"
        wrong_aud = auth.create_token_review(
            {"spec": {"token": "node1-token", "audiences": ["other"]}}
        )
        unknown = auth.create_token_review({"spec": {"token": "nope"}})
        assert not wrong_aud.status.authenticated
        assert not unknown.status.authenticated


def test_two_resources_paged_at_one_revision_each_get_their_own_rest(
    api: FakeApiServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Reflectors list pods, Services and the rest at once, all at the same revision and page
    # size: each continue token must lead back to its own list. Tokens once named a list by
    # its id(), which a list freed on one thread hands on to the next one made: a pod list went
    # on with another resource's rest (a scale test's 3,000 workloads of 10,000, now and then).
    # Every list having one id here makes that reuse certain.
    monkeypatch.setattr("tests.fakeapi.server.id", lambda _obj: 1, raising=False)
    for i in range(3):
        api.create("Pod", _pod(f"p{i}"))
        api.create("Service", {"metadata": {"name": f"s{i}"}, "spec": {"ports": [{"port": 80}]}})
    pod, service = api.resource("Pod"), api.resource("Service")
    first = [api.list_page(r, "default", Selector(), {"limit": "1"}) for r in (pod, service)]
    for page in first:
        token = page["metadata"]["continue"]
        rest = api.list_page(pod, "default", Selector(), {"limit": "5", "continue": token})
        assert {o["kind"] for o in rest["items"]} == {page["kind"].removesuffix("List")}
