"""Who may ask the CA for what: caller authentication and the node check.

Two modes, one shape. The caller sends ``authorization: Bearer <token>``; an ``Authenticator``
turns the token into a ``Caller`` (or refuses with ``UNAUTHENTICATED``), and a ``NodeAuthorizer``
answers "does this identity have a pod on that node?" from the cluster state. The issuer combines
them, so a node agent can obtain the identities of its own pods and nothing else: a compromised
node cannot mint certificates for workloads elsewhere.

- Standalone: per-node tokens from a YAML file ``{tokens: [{node: node1, token: "..."}]}``, and the
  state the CA reads from the cluster document.
- Kubernetes: TokenReview; the reviewed user must be one of the trusted node-agent service
  accounts, and its node comes from the bound token's ``node-name`` extra (or its pod's
  ``spec.nodeName``). Pods on that node are listed fresh for each check (see ``agent.ca.kube``).
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import grpc
import yaml

from agent.ca.issuer import Caller, Rejected
from agent.identity.spiffe import SpiffeId
from agent.state import StateStore

log = logging.getLogger(__name__)


class AuthConfigError(ValueError):
    """The CA's authentication configuration (e.g. the node tokens file) is invalid."""


class Authenticator(Protocol):
    def authenticate(self, token: str) -> Caller:
        """The caller a bearer token belongs to; raises ``Rejected(UNAUTHENTICATED)``."""


def bearer_token(metadata: Iterable[tuple[str, str | bytes]]) -> str:
    """The token from ``authorization: Bearer <token>`` call metadata."""
    for key, value in metadata:
        if key.lower() != "authorization":
            continue
        text = value.decode("latin-1") if isinstance(value, bytes) else value
        scheme, _, token = text.partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
        raise Rejected(
            grpc.StatusCode.UNAUTHENTICATED,
            "the authorization metadata is not 'Bearer <token>'",
        )
    raise Rejected(
        grpc.StatusCode.UNAUTHENTICATED,
        "no bearer token: send 'authorization: Bearer <token>' call metadata",
    )


@dataclass(frozen=True)
class NodeTokenAuthenticator:
    """Standalone mode: a shared secret per node."""

    tokens: Mapping[str, str]  # token -> node

    @classmethod
    def from_file(cls, path: Path) -> NodeTokenAuthenticator:
        try:
            doc = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as e:
            raise AuthConfigError(f"cannot read node tokens file {path}: {e}") from e
        entries = doc.get("tokens") if isinstance(doc, dict) else None
        if not isinstance(entries, list) or set(doc) != {"tokens"}:
            raise AuthConfigError(
                f"{path}: expected a mapping with only 'tokens: [{{node: NAME, token: SECRET}}]'"
            )
        return cls(cls._parse(entries, str(path)))

    @staticmethod
    def _parse(entries: Sequence[object], where: str) -> dict[str, str]:
        tokens: dict[str, str] = {}
        for i, entry in enumerate(entries):
            if (
                not isinstance(entry, dict)
                or set(entry) != {"node", "token"}
                or not all(isinstance(v, str) and v for v in entry.values())
            ):
                raise AuthConfigError(
                    f"{where}: tokens[{i}] must be {{node: NAME, token: SECRET}} "
                    "with non-empty strings"
                )
            if len(entry["token"]) < 16:
                raise AuthConfigError(f"{where}: tokens[{i}].token is shorter than 16 characters")
            if entry["token"] in tokens:
                raise AuthConfigError(f"{where}: tokens[{i}] repeats another node's token")
            tokens[entry["token"]] = entry["node"]
        return tokens

    def authenticate(self, token: str) -> Caller:
        node = None
        # Compare against every entry so the time taken does not reveal a matching prefix.
        for known, known_node in self.tokens.items():
            if hmac.compare_digest(known.encode(), token.encode()):
                node = known_node
        if node is None:
            raise Rejected(grpc.StatusCode.UNAUTHENTICATED, "the bearer token is not a node token")
        return Caller(name=f"node agent on {node}", node=node)


@dataclass(frozen=True)
class StoreNodeAuthorizer:
    """Standalone mode: the node check against the state the CA reads from the document."""

    store: StateStore

    def has_workload_on(self, node: str, identity: SpiffeId) -> bool:
        return any(
            w.namespace == identity.namespace and w.service_account == identity.service_account
            for w in self.store.snapshot().workloads_on(node)
        )


@dataclass(frozen=True)
class TokenReview:
    """The parts of a TokenReview status the CA uses."""

    authenticated: bool
    username: str = ""
    extra: Mapping[str, Sequence[str]] | None = None
    error: str = ""


class KubeCluster(Protocol):
    """What the Kubernetes mode needs from the API server (implemented in ``agent.ca.kube``)."""

    def review_token(self, token: str) -> TokenReview: ...

    def pod_node(self, namespace: str, name: str) -> str | None: ...

    def has_pod_on(self, node: str, namespace: str, service_account: str) -> bool: ...


SA_PREFIX = "system:serviceaccount:"
NODE_NAME_EXTRA = "authentication.kubernetes.io/node-name"
POD_NAME_EXTRA = "authentication.kubernetes.io/pod-name"


@dataclass(frozen=True)
class TokenReviewAuthenticator:
    """Kubernetes mode: TokenReview, then the trusted node-agent check and the caller's node."""

    cluster: KubeCluster
    trusted_agents: frozenset[str]  # "namespace/serviceaccount"
    trust_domain: str

    def authenticate(self, token: str) -> Caller:
        review = self.cluster.review_token(token)
        if not review.authenticated:
            reason = f": {review.error}" if review.error else ""
            raise Rejected(
                grpc.StatusCode.UNAUTHENTICATED, f"TokenReview refused the token{reason}"
            )
        if not review.username.startswith(SA_PREFIX):
            raise Rejected(
                grpc.StatusCode.UNAUTHENTICATED,
                f"{review.username} is not a service account; only service-account tokens work",
            )
        ns, _, sa = review.username[len(SA_PREFIX) :].partition(":")
        own = str(SpiffeId(self.trust_domain, ns, sa))
        if f"{ns}/{sa}" not in self.trusted_agents:
            # Not a node agent: it may still obtain its own identity, nothing else.
            return Caller(name=f"service account {ns}/{sa}", identity=own)
        extra = review.extra or {}
        node = next(iter(extra.get(NODE_NAME_EXTRA, ())), None)
        pod = next(iter(extra.get(POD_NAME_EXTRA, ())), None)
        if node is None and pod is not None:
            node = self.cluster.pod_node(ns, pod)
        if node is None:
            raise Rejected(
                grpc.StatusCode.UNAUTHENTICATED,
                f"the token of node agent {ns}/{sa} is not bound to a pod, so its node is "
                "unknown; mount a projected service-account token",
            )
        return Caller(name=f"node agent {ns}/{sa} on {node}", node=node, identity=own)


@dataclass(frozen=True)
class KubeNodeAuthorizer:
    cluster: KubeCluster

    def has_workload_on(self, node: str, identity: SpiffeId) -> bool:
        return self.cluster.has_pod_on(node, identity.namespace, identity.service_account)
