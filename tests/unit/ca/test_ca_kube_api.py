"""Kubernetes mode against the fake API server: TokenReview, pods on a node, the root Secret."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from kubernetes import client

from agent.ca.auth import TokenReviewAuthenticator
from agent.ca.issuer import Rejected
from agent.ca.kube import ApiServerCluster, load_or_create_secret
from tests.fakeapi import FakeApiServer


@pytest.fixture
def api() -> Iterator[FakeApiServer]:
    with FakeApiServer() as fake:
        yield fake


def cluster_of(api: FakeApiServer) -> ApiServerCluster:
    return ApiServerCluster(client.ApiClient(client.Configuration(host=api.url)))


def pod(name: str, node: str, sa: str, phase: str = "Running") -> dict[str, Any]:
    return {
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"nodeName": node, "serviceAccountName": sa, "containers": [{"name": "c"}]},
        "status": {"phase": phase},
    }


def test_pods_on_a_node_decide_the_node_check(api: FakeApiServer) -> None:
    api.create("Pod", pod("a", "node1", "client"))
    api.create("Pod", pod("b", "node2", "server"))
    api.create("Pod", pod("done", "node1", "batch", phase="Succeeded"))
    cluster = cluster_of(api)
    assert cluster.has_pod_on("node1", "default", "client")
    assert not cluster.has_pod_on("node1", "default", "server")
    assert not cluster.has_pod_on("node1", "default", "batch")
    assert cluster.pod_node("default", "b") == "node2"
    assert cluster.pod_node("default", "missing") is None


def test_token_review_through_the_api(api: FakeApiServer) -> None:
    api.add_token("t-client", "system:serviceaccount:default:client")
    api.add_token("t-agent", "system:serviceaccount:nodemesh-system:nodemesh-agent")
    authn = TokenReviewAuthenticator(
        cluster_of(api), frozenset({"nodemesh-system/nodemesh-agent"}), "cluster.local"
    )
    caller = authn.authenticate("t-client")
    assert caller.identity == "spiffe://cluster.local/ns/default/sa/client"
    assert caller.node is None
    with pytest.raises(Rejected, match="TokenReview refused"):
        authn.authenticate("nope")
    # An agent token that is not bound to a pod gives no node: refused rather than guessed.
    with pytest.raises(Rejected, match="not bound to a pod"):
        authn.authenticate("t-agent")


def test_two_replicas_starting_together_share_one_root_secret(api: FakeApiServer) -> None:
    api.create("Namespace", {"metadata": {"name": "nodemesh-system"}})
    prints: list[bytes] = []

    def start() -> None:
        core = client.CoreV1Api(client.ApiClient(client.Configuration(host=api.url)))
        authority = load_or_create_secret(core, "nodemesh-system", "nodemesh-ca", "cluster.local")
        prints.append(authority.signing_cert.fingerprint(hashes.SHA256()))

    threads = [threading.Thread(target=start) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(prints) == 4
    assert len(set(prints)) == 1
    assert len(api.list_objects("Secret", "nodemesh-system")) == 1
