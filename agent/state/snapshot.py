"""A consistent, read-only view of the state at one version, with the queries readers need.

Every query is answered from an index (by IP, node, namespace, label, policy scope) so that the
proxy's per-connection lookups and the reconcilers' per-node scans stay cheap at 10,000 pods.
Membership is derived here rather than stored, so a namespace relabel needs no pod rewrite.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

from agent.state.cowmap import CowMap
from agent.state.index import Indexes, LabelKey, PolicyScope
from agent.state.model import (
    DEFAULT_TRUST_DOMAIN,
    Namespace,
    PolicyObject,
    RouteObject,
    Service,
    Workload,
)

KINDS = ("namespaces", "workloads", "services", "policies", "routes")


@dataclass(frozen=True)
class Snapshot:
    """Everything the mesh knows at ``version``; never changes once published.

    ``changed_keys`` says which keys of each kind the commit that produced this snapshot added,
    changed or removed (namespaces by name, workloads by uid, services by (namespace, name),
    policies and routes by (kind, namespace, name)), so a subscriber can act on the difference
    instead of rescanning everything.
    """

    version: int = 0
    trust_domain: str = DEFAULT_TRUST_DOMAIN
    namespaces: CowMap[str, Namespace] = field(default_factory=CowMap)
    workloads: CowMap[str, Workload] = field(default_factory=CowMap)  # by uid
    services: CowMap[tuple[str, str], Service] = field(default_factory=CowMap)
    policies: CowMap[tuple[str, str, str], PolicyObject] = field(default_factory=CowMap)
    # Gateway API routes by (kind, namespace, name); ``agent.policy.routes`` compiles them.
    routes: CowMap[tuple[str, str, str], RouteObject] = field(default_factory=CowMap)
    changed_keys: Mapping[str, frozenset[object]] = field(default_factory=dict)
    indexes: Indexes = field(default_factory=Indexes, repr=False, compare=False)

    @property
    def workload_by_ip(self) -> Mapping[str, Workload]:
        return self.indexes.workload_by_ip

    @property
    def service_by_ip(self) -> Mapping[str, Service]:
        return self.indexes.service_by_ip

    @property
    def workloads_by_node(self) -> Mapping[str, frozenset[str]]:
        return self.indexes.by_node

    @property
    def workloads_by_namespace(self) -> Mapping[str, frozenset[str]]:
        return self.indexes.by_namespace

    @property
    def workloads_by_label(self) -> Mapping[LabelKey, frozenset[str]]:
        """(namespace, label key, label value) -> uids of the workloads carrying it."""
        return self.indexes.by_label

    @property
    def policies_by_scope(self) -> Mapping[PolicyScope, tuple[PolicyObject, ...]]:
        """(kind, namespace) -> that namespace's policies of that kind, sorted by name."""
        return self.indexes.policies_by_scope

    def is_meshed(self, workload: Workload) -> bool:
        """Effective membership: host-network and pending (no IP) pods never; the pod
        annotation wins; else the namespace label ``nodemesh.io/mesh=enabled``."""
        if workload.host_network or not workload.ips:
            return False
        if workload.mesh_annotation == "enabled":
            return True
        if workload.mesh_annotation == "disabled":
            return False
        ns = self.namespaces.get(workload.namespace)
        return ns is not None and ns.mesh_enabled

    def _by_uids(self, uids: frozenset[str]) -> Iterator[Workload]:
        return (self.workloads[u] for u in sorted(uids))

    def workloads_on(self, node: str) -> Iterator[Workload]:
        return self._by_uids(self.workloads_by_node.get(node, frozenset()))

    def meshed_workloads_on(self, node: str) -> Iterator[Workload]:
        return (w for w in self.workloads_on(node) if self.is_meshed(w))

    def workloads_in(self, namespace: str) -> Iterator[Workload]:
        return self._by_uids(self.workloads_by_namespace.get(namespace, frozenset()))

    def select_workloads(self, namespace: str, match_labels: Mapping[str, str]) -> list[Workload]:
        """Workloads of ``namespace`` whose labels include all of ``match_labels``.

        An empty ``match_labels`` selects every workload of the namespace (the policy-selector
        meaning; Service selectors, where empty selects nothing, are the caller's business).
        """
        if not match_labels:
            return list(self.workloads_in(namespace))
        buckets = [
            self.workloads_by_label.get((namespace, k, v), frozenset())
            for k, v in match_labels.items()
        ]
        buckets.sort(key=len)
        return list(self._by_uids(frozenset.intersection(*buckets)))

    def policies_of(self, kind: str) -> Iterator[PolicyObject]:
        return (
            p
            for (k, _), scope in sorted(self.policies_by_scope.items())
            if k == kind
            for p in scope
        )

    def policies_in(self, kind: str, namespace: str) -> tuple[PolicyObject, ...]:
        """The ``kind`` policies of one namespace, sorted by name."""
        return self.policies_by_scope.get((kind, namespace), ())

    def policies_selecting(self, kind: str, workload: Workload) -> list[PolicyObject]:
        """Policies of the workload's own namespace whose ``spec.selector.matchLabels`` match
        its labels, or that have no selector (namespace-wide). Mesh-wide (root namespace)
        policies are the policy evaluator's business: ask ``policies_in`` for them."""
        out = []
        for policy in self.policies_in(kind, workload.namespace):
            selector = policy.spec.get("selector")
            labels = selector.get("matchLabels", {}) if isinstance(selector, Mapping) else {}
            if all(workload.labels.get(k) == v for k, v in labels.items()):
                out.append(policy)
        return out
