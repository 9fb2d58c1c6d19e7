"""Kubernetes mode's authentication over real gRPC, with the API server behind a fake.

The fake implements ``KubeCluster`` (TokenReview answers and pods per node) so that the
decisions are tested here; ``agent.ca.kube`` only translates them into API calls.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from agent.ca.auth import KubeNodeAuthorizer, TokenReview, TokenReviewAuthenticator
from agent.ca.inprocess import InProcessCA
from agent.ca.kube import KubeApiError
from agent.identity.keysmith import build_csr, generate_key
from agent.identity.spiffe import SpiffeId
from agent.state import StateStore
from tests.unit.ca.ca_helpers import RawClient

CLIENT = "spiffe://cluster.local/ns/default/sa/client"
AGENT_SA = "system:serviceaccount:nodemesh-system:nodemesh-agent"


@dataclass
class FakeCluster:
    reviews: dict[str, TokenReview]
    pods: dict[str, set[tuple[str, str]]]  # node -> {(namespace, sa)}
    pod_nodes: dict[tuple[str, str], str] = field(default_factory=dict)

    def review_token(self, token: str) -> TokenReview:
        return self.reviews.get(token, TokenReview(authenticated=False, error="invalid token"))

    def pod_node(self, namespace: str, name: str) -> str | None:
        return self.pod_nodes.get((namespace, name))

    def has_pod_on(self, node: str, namespace: str, service_account: str) -> bool:
        return (namespace, service_account) in self.pods.get(node, set())


@pytest.fixture
def cluster() -> FakeCluster:
    return FakeCluster(
        reviews={
            "agent-node1": TokenReview(
                True, AGENT_SA, {"authentication.kubernetes.io/node-name": ["node1"]}
            ),
            "agent-by-pod": TokenReview(
                True, AGENT_SA, {"authentication.kubernetes.io/pod-name": ["nodemesh-agent-x"]}
            ),
            "agent-unbound": TokenReview(True, AGENT_SA, {}),
            "other-sa": TokenReview(
                True,
                "system:serviceaccount:default:client",
                {"authentication.kubernetes.io/node-name": ["node1"]},
            ),
            "a-user": TokenReview(True, "alice", {}),
        },
        pods={"node1": {("default", "client")}, "node2": {("default", "server")}},
        pod_nodes={("nodemesh-system", "nodemesh-agent-x"): "node1"},
    )


@pytest.fixture
def kube_ca(tmp_path: Path, cluster: FakeCluster) -> Iterator[InProcessCA]:
    authn = TokenReviewAuthenticator(
        cluster, frozenset({"nodemesh-system/nodemesh-agent"}), "cluster.local"
    )
    authz = KubeNodeAuthorizer(cluster)
    with InProcessCA(tmp_path / "ca", StateStore(), authenticator=authn, authorizer=authz) as ca:
        yield ca


@pytest.fixture
def kraw(kube_ca: InProcessCA) -> Iterator[RawClient]:
    with RawClient(kube_ca) as client:
        yield client


def csr(identity: str) -> str:
    return build_csr(SpiffeId.parse(identity), generate_key())


@pytest.mark.parametrize("token", ["agent-node1", "agent-by-pod"])
def test_trusted_agent_obtains_identity_of_a_pod_on_its_node(kraw: RawClient, token: str) -> None:
    resp = kraw.create(csr(CLIENT), token=token, impersonate=CLIENT)
    assert len(resp.cert_chain) == 2


@pytest.mark.parametrize(
    ("token", "identity", "expected"),
    [
        ("agent-node1", "spiffe://cluster.local/ns/default/sa/server", "PERMISSION_DENIED"),
        ("agent-unbound", CLIENT, "UNAUTHENTICATED"),
        ("other-sa", "spiffe://cluster.local/ns/default/sa/server", "PERMISSION_DENIED"),
        ("a-user", CLIENT, "UNAUTHENTICATED"),
        ("forged", CLIENT, "UNAUTHENTICATED"),
    ],
)
def test_refusals(kraw: RawClient, token: str, identity: str, expected: str) -> None:
    with pytest.raises(grpc.RpcError) as info:
        kraw.create(csr(identity), token=token, impersonate=identity)
    assert info.value.code().name == expected  # type: ignore[attr-defined]


def test_non_agent_account_gets_only_its_own_identity(kraw: RawClient) -> None:
    resp = kraw.create(csr(CLIENT), token="other-sa")
    assert len(resp.cert_chain) == 2


def test_api_failure_during_the_node_check_is_unavailable(
    kraw: RawClient, cluster: FakeCluster
) -> None:
    def broken(node: str, namespace: str, service_account: str) -> bool:
        raise KubeApiError("listing pods of default on node1 failed: 500")

    cluster.has_pod_on = broken  # type: ignore[method-assign]
    with pytest.raises(grpc.RpcError) as info:
        kraw.create(csr(CLIENT), token="agent-node1", impersonate=CLIENT)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
