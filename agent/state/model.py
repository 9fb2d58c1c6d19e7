"""Plain, immutable records of what the mesh knows about the cluster.

They keep only the fields the mesh needs, so that a cluster of ten thousand pods fits in a few
tens of megabytes, and they are frozen so that a snapshot handed to a reader can never change
under it. Mesh membership is *derived* (pod annotation wins over the namespace label, host-network
pods never join) rather than stored, so that a namespace relabel needs no rewrite of its pods.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

MESH_ANNOTATION = "nodemesh.io/mesh"
MESH_NAMESPACE_LABEL = "nodemesh.io/mesh"
MESH_VALUES = ("enabled", "disabled")  # of both; anything else meshes nothing
EXCLUDE_OUTBOUND_ANNOTATION = "nodemesh.io/exclude-outbound-ports"
EXCLUDE_INBOUND_ANNOTATION = "nodemesh.io/exclude-inbound-ports"
HTTP_PORTS_ANNOTATION = "nodemesh.io/http-ports"
DEFAULT_TRUST_DOMAIN = "cluster.local"

_EMPTY: Mapping[str, str] = MappingProxyType({})


def spiffe_id(trust_domain: str, namespace: str, service_account: str) -> str:
    """The SPIFFE ID Istio and nodemesh give a service account."""
    return f"spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}"


def frozen_map(values: Mapping[str, str] | None) -> Mapping[str, str]:
    """A read-only copy, so records stay immutable even if the caller's dict changes."""
    return MappingProxyType(dict(values)) if values else _EMPTY


@dataclass(frozen=True, slots=True)
class Namespace:
    name: str
    labels: Mapping[str, str] = field(default_factory=lambda: _EMPTY)

    @property
    def mesh_enabled(self) -> bool:
        return self.labels.get(MESH_NAMESPACE_LABEL) == "enabled"


@dataclass(frozen=True, slots=True)
class Workload:
    """A pod, as far as the mesh is concerned.

    ``mesh_annotation`` is the raw value of ``nodemesh.io/mesh`` (``enabled``, ``disabled`` or
    ``None``); use ``Snapshot.is_meshed`` for the effective membership.
    """

    uid: str
    name: str
    namespace: str
    service_account: str
    node: str
    ips: tuple[str, ...]
    labels: Mapping[str, str] = field(default_factory=lambda: _EMPTY)
    mesh_annotation: str | None = None
    host_network: bool = False
    exclude_outbound_ports: frozenset[int] = frozenset()
    exclude_inbound_ports: frozenset[int] = frozenset()
    # Ports declared HTTP/1.1 by ``nodemesh.io/http-ports`` (``agent.state.protocols``).
    http_ports: frozenset[int] = frozenset()

    @property
    def key(self) -> tuple[str, str]:
        return (self.namespace, self.name)

    def identity(self, trust_domain: str = DEFAULT_TRUST_DOMAIN) -> str:
        return spiffe_id(trust_domain, self.namespace, self.service_account)


@dataclass(frozen=True, slots=True)
class ServicePort:
    port: int
    target_port: int
    name: str = ""
    protocol: str = "TCP"
    app_protocol: str = ""  # Kubernetes ``appProtocol`` as written ("" = none)


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One backend of a Service: an address and, when it is a pod we know, its uid."""

    ip: str
    workload_uid: str | None = None
    ready: bool = True
    # Port name -> port, from an EndpointSlice; empty means "use the ServicePort's target_port".
    ports: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))


@dataclass(frozen=True, slots=True)
class Service:
    name: str
    namespace: str
    cluster_ips: tuple[str, ...] = ()
    ports: tuple[ServicePort, ...] = ()
    selector: Mapping[str, str] | None = None
    endpoints: tuple[Endpoint, ...] = ()

    @property
    def key(self) -> tuple[str, str]:
        return (self.namespace, self.name)

    def hostname(self, cluster_domain: str = "cluster.local") -> str:
        return f"{self.name}.{self.namespace}.svc.{cluster_domain}"


@dataclass(frozen=True, slots=True)
class PolicyObject:
    """A nodemesh.io/v1alpha1 policy (AuthorizationPolicy, PeerAuthentication, TrafficPolicy).

    ``spec`` has already been validated (``agent.policy.schema.validate_policy``, which also
    applies the schema's defaults) by the source that wrote it; ``agent.policy`` compiles it into
    the form its evaluators use. It is plain JSON-like data: readers must not mutate it.
    ``dry_run`` mirrors the ``nodemesh.io/dry-run: "true"`` annotation (log, do not enforce).
    """

    kind: str
    namespace: str
    name: str
    spec: Mapping[str, object]
    generation: int = 0
    uid: str = ""
    dry_run: bool = False

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.kind, self.namespace, self.name)


@dataclass(frozen=True, slots=True)
class RouteObject:
    """A ``gateway.networking.k8s.io/v1`` HTTPRoute or GRPCRoute, as its source read it.

    The spec is kept as the plain JSON-like data the user wrote: ``agent.policy.routes`` compiles
    it (and refuses it, with the reason its status shows) against the Services of the same
    snapshot, because whether a route is valid depends on them. ``created`` is
    ``metadata.creationTimestamp`` (RFC 3339, "" when the source has none): the Gateway API
    breaks precedence ties between routes by age. Readers must not mutate ``spec``.
    """

    kind: str
    namespace: str
    name: str
    spec: Mapping[str, object]
    generation: int = 0
    uid: str = ""
    created: str = ""

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.kind, self.namespace, self.name)
