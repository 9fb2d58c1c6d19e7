"""The cluster document: one YAML format for the lab topology and the local-file source.

Why one format: the lab builds namespaces from it, the agents and the CA of a lab (or of a
standalone install) read the same file through ``agent.sources.localfile``, and ``nodemesh lab
annotate/apply/delete`` edit it. If the lab and the agents parsed different formats, a pod could
exist in the kernel and not in the mesh's state. Parsing is strict (unknown keys, duplicates and
bad values are refused with the file, the path inside it and what is allowed) and all-or-nothing:
``parse_document`` returns a complete, valid ``ClusterDocument`` or raises ``DocumentError``, so a
caller never builds half a lab or loads half a state.

Format (README "Topology format" documents it for users)::

    trustDomain: cluster.local            # optional
    nodes:
      - name: node1                       # ip, podCIDR: optional, filled in by the lab
        pods:
          - {name: client, namespace: default, serviceAccount: client, ip: 10.244.1.2,
             labels: {app: client}, annotations: {nodemesh.io/mesh: enabled}}
    namespaces: [{name: default, labels: {}}]                        # optional
    services:
      - {name: server, namespace: default, selector: {app: server},
         ports: [{port: 80, targetPort: 8080}], clusterIP: 10.96.0.10}  # clusterIP optional
    # a port may declare HTTP: appProtocol (http, http2, kubernetes.io/h2c, grpc) or a name
    # such as http-web; a pod annotation nodemesh.io/http-ports: "8080" declares direct traffic
    policies: []                          # full nodemesh.io/v1alpha1 manifests
    routes: []                            # full gateway.networking.k8s.io/v1 HTTPRoute/GRPCRoute
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from agent.sources.fields import DocumentError, Fields, check_unique, load_yaml
from agent.sources.policies import parse_policies
from agent.sources.routes import check_routes, parse_routes
from agent.sources.stateview import ClusterState, document_state
from agent.state.model import (
    DEFAULT_TRUST_DOMAIN,
    MESH_NAMESPACE_LABEL,
    MESH_VALUES,
    PolicyObject,
    RouteObject,
)

__all__ = [
    "ClusterDocument",
    "ClusterState",
    "DocumentError",
    "NamespaceSpec",
    "NodeSpec",
    "PodSpec",
    "PortSpec",
    "ServiceSpec",
    "dump_document",
    "load_document",
    "parse_document",
]

_TOP_KEYS = ("trustDomain", "nodes", "namespaces", "services", "policies", "routes")
_NODE_KEYS = ("name", "ip", "podCIDR", "pods")
_POD_KEYS = ("name", "namespace", "serviceAccount", "ip", "labels", "annotations")
_NS_KEYS = ("name", "labels")
_SVC_KEYS = ("name", "namespace", "selector", "ports", "clusterIP")
_PORT_KEYS = ("port", "targetPort", "name", "protocol", "appProtocol")


@dataclass(frozen=True)
class PodSpec:
    name: str
    namespace: str = "default"
    service_account: str = "default"
    ip: str | None = None
    labels: Mapping[str, str] = field(default_factory=dict)
    annotations: Mapping[str, str] = field(default_factory=dict)

    @property
    def uid(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class NodeSpec:
    name: str
    pods: tuple[PodSpec, ...] = ()
    ip: str | None = None
    pod_cidr: str | None = None


@dataclass(frozen=True)
class NamespaceSpec:
    name: str
    labels: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class PortSpec:
    port: int
    target_port: int
    name: str = ""
    protocol: str = "TCP"
    app_protocol: str = ""


@dataclass(frozen=True)
class ServiceSpec:
    name: str
    namespace: str
    selector: Mapping[str, str]
    ports: tuple[PortSpec, ...]
    cluster_ip: str | None = None


@dataclass(frozen=True)
class ClusterDocument:
    """A parsed, validated cluster document. Immutable: edits build a new one (``replace``)."""

    nodes: tuple[NodeSpec, ...]
    trust_domain: str = DEFAULT_TRUST_DOMAIN
    namespaces: tuple[NamespaceSpec, ...] = ()
    services: tuple[ServiceSpec, ...] = ()
    policies: tuple[PolicyObject, ...] = ()
    # The manifests as written, in the order of ``policies``, so a rewrite keeps them verbatim.
    policy_manifests: tuple[Mapping[str, Any], ...] = ()
    routes: tuple[RouteObject, ...] = ()
    route_manifests: tuple[Mapping[str, Any], ...] = ()

    def pods(self) -> Iterator[tuple[NodeSpec, PodSpec]]:
        for node in self.nodes:
            for pod in node.pods:
                yield node, pod

    def to_state(self) -> ClusterState:
        """The state objects (namespaces, workloads, services with endpoints, policies)."""
        return document_state(self)

    def to_mapping(self) -> dict[str, Any]:
        """The document as plain data, in the format ``parse_document`` reads."""
        out = {
            "trustDomain": self.trust_domain,
            "nodes": [_node_mapping(n) for n in self.nodes],
            "namespaces": [{"name": ns.name, "labels": dict(ns.labels)} for ns in self.namespaces],
            "services": [_service_mapping(s) for s in self.services],
            "policies": [dict(m) for m in self.policy_manifests],
        }
        if self.route_manifests:
            out["routes"] = [dict(m) for m in self.route_manifests]
        return out


def _node_mapping(node: NodeSpec) -> dict[str, Any]:
    out: dict[str, Any] = {"name": node.name}
    if node.ip:
        out["ip"] = node.ip
    if node.pod_cidr:
        out["podCIDR"] = node.pod_cidr
    out["pods"] = [_pod_mapping(p) for p in node.pods]
    return out


def _pod_mapping(pod: PodSpec) -> dict[str, Any]:
    out: dict[str, Any] = {
        "name": pod.name,
        "namespace": pod.namespace,
        "serviceAccount": pod.service_account,
    }
    if pod.ip:
        out["ip"] = pod.ip
    out["labels"] = dict(pod.labels)
    out["annotations"] = dict(pod.annotations)
    return out


def _service_mapping(svc: ServiceSpec) -> dict[str, Any]:
    out: dict[str, Any] = {
        "name": svc.name,
        "namespace": svc.namespace,
        "selector": dict(svc.selector),
        "ports": [
            {"port": p.port, "targetPort": p.target_port}
            | ({"name": p.name} if p.name else {})
            | ({"protocol": p.protocol} if p.protocol != "TCP" else {})
            | ({"appProtocol": p.app_protocol} if p.app_protocol else {})
            for p in svc.ports
        ],
    }
    if svc.cluster_ip:
        out["clusterIP"] = svc.cluster_ip
    return out


def parse_document(text: str, *, source: str) -> ClusterDocument:
    """Parse and validate a cluster document; ``source`` (a file name) appears in every error."""
    data = load_yaml(text, source=source)
    top = Fields(data, source=source, path="", allowed=_TOP_KEYS)
    trust_domain = top.subdomain("trustDomain") if top.has("trustDomain") else DEFAULT_TRUST_DOMAIN
    nodes = tuple(_parse_node(top, path, item) for path, item in top.items("nodes"))
    if not nodes:
        top.fail("nodes", "at least one node is required (nodes: [{name: node1, pods: [...]}])")
    namespaces = tuple(_parse_namespace(top, p, item) for p, item in top.items("namespaces"))
    services = tuple(_parse_service(top, p, item) for p, item in top.items("services"))
    policies, manifests = parse_policies(source, top.items("policies"))
    route_items = top.items("routes")
    routes, route_manifests = parse_routes(source, route_items)
    doc = ClusterDocument(
        nodes=nodes,
        trust_domain=trust_domain,
        namespaces=namespaces,
        services=services,
        policies=policies,
        policy_manifests=manifests,
        routes=routes,
        route_manifests=route_manifests,
    )
    _check_cross_references(source, doc)
    if routes:
        check_routes(source, [p for p, _ in route_items], routes, doc.to_state().services, policies)
    return doc


def load_document(path: str | Path) -> ClusterDocument:
    """Read and parse the cluster document at ``path``."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise DocumentError(str(path), "", f"cannot read the file: {e.strerror}") from e
    return parse_document(text, source=str(path))


def dump_document(doc: ClusterDocument) -> str:
    """YAML text that ``parse_document`` reads back into an equal document."""
    return yaml.safe_dump(doc.to_mapping(), sort_keys=False, default_flow_style=False)


def _parse_node(top: Fields, path: str, item: object) -> NodeSpec:
    f = Fields(item, source=top.source, path=path, allowed=_NODE_KEYS)
    pods = tuple(_parse_pod(f, p, pod) for p, pod in f.items("pods"))
    return NodeSpec(
        name=f.name("name"), pods=pods, ip=f.ipv4("ip"), pod_cidr=f.ipv4_network("podCIDR")
    )


def _parse_pod(node: Fields, path: str, item: object) -> PodSpec:
    f = Fields(item, source=node.source, path=path, allowed=_POD_KEYS)
    annotations = f.string_map("annotations", keys="annotation")
    _check_annotations(f, annotations)
    return PodSpec(
        name=f.name("name"),
        namespace=f.name("namespace", default="default"),
        service_account=f.subdomain("serviceAccount") if f.has("serviceAccount") else "default",
        ip=f.ipv4("ip"),
        labels=f.string_map("labels"),
        annotations=annotations,
    )


def _check_annotations(f: Fields, annotations: Mapping[str, str]) -> None:
    """Values the mesh interprets must be valid now, not when an agent first reads them."""
    mesh = annotations.get("nodemesh.io/mesh")
    if mesh is not None and mesh not in MESH_VALUES:
        f.fail("annotations.nodemesh.io/mesh", f"{mesh!r} is not allowed: use enabled or disabled")
    for key in (
        "nodemesh.io/exclude-outbound-ports",
        "nodemesh.io/exclude-inbound-ports",
        "nodemesh.io/http-ports",
    ):
        value = annotations.get(key)
        if value is not None:
            try:
                parse_port_list(value)
            except ValueError as e:
                f.fail(f"annotations.{key}", str(e))


def parse_port_list(value: str) -> frozenset[int]:
    """``"15020, 9090"`` -> {15020, 9090}; raises ValueError naming the bad entry."""
    ports: set[int] = set()
    for part in value.split(","):
        text = part.strip()
        if not text:
            continue
        if not text.isdigit() or not 1 <= int(text) <= 65535:
            raise ValueError(f"{text!r} is not a port: use a comma list of ports 1-65535 (80,443)")
        ports.add(int(text))
    return frozenset(ports)


def _parse_namespace(top: Fields, path: str, item: object) -> NamespaceSpec:
    f = Fields(item, source=top.source, path=path, allowed=_NS_KEYS)
    labels = f.string_map("labels")
    # As a pod's annotation: another value (Istio's habit, "true") would mesh nothing, silently.
    mesh = labels.get(MESH_NAMESPACE_LABEL)
    if mesh is not None and mesh not in MESH_VALUES:
        f.fail(
            f"labels.{MESH_NAMESPACE_LABEL}", f"{mesh!r} is not allowed: use enabled or disabled"
        )
    return NamespaceSpec(name=f.name("name"), labels=labels)


def _parse_service(top: Fields, path: str, item: object) -> ServiceSpec:
    f = Fields(item, source=top.source, path=path, allowed=_SVC_KEYS)
    ports = tuple(_parse_port(f, p, port) for p, port in f.items("ports"))
    if not ports:
        f.fail("ports", "at least one port is required ([{port: 80, targetPort: 8080}])")
    check_unique(
        top.source, "service port", [(f"{f.at('ports')}[{i}]", p.port) for i, p in enumerate(ports)]
    )
    return ServiceSpec(
        name=f.name("name"),
        namespace=f.name("namespace", default="default"),
        selector=f.string_map("selector"),
        ports=ports,
        cluster_ip=f.ipv4("clusterIP"),
    )


def _parse_port(svc: Fields, path: str, item: object) -> PortSpec:
    f = Fields(item, source=svc.source, path=path, allowed=_PORT_KEYS)
    port = f.port("port")
    target = f.raw("targetPort")
    if isinstance(target, str):
        f.fail("targetPort", f"named target ports ({target!r}) are not supported: use a number")
    protocol = f.string("protocol", default="TCP")
    if protocol != "TCP":
        f.fail("protocol", f"{protocol!r} is not supported: the mesh carries TCP only")
    return PortSpec(
        port=port,
        target_port=f.port("targetPort", default=port),
        name=f.name("name") if f.has("name") else "",
        app_protocol=f.string("appProtocol") if f.has("appProtocol") else "",
    )


def _check_cross_references(source: str, doc: ClusterDocument) -> None:
    """Duplicates across the document: nodes, pods per namespace, IPs, services, namespaces."""
    check_unique(source, "node", [(f"nodes[{i}].name", n.name) for i, n in enumerate(doc.nodes)])
    pod_paths = [
        (f"nodes[{i}].pods[{j}]", pod)
        for i, node in enumerate(doc.nodes)
        for j, pod in enumerate(node.pods)
    ]
    check_unique(source, "pod", [(f"{p}.name", pod.uid) for p, pod in pod_paths])
    ips = [(f"{p}.ip", pod.ip) for p, pod in pod_paths if pod.ip]
    ips += [(f"nodes[{i}].ip", n.ip) for i, n in enumerate(doc.nodes) if n.ip]
    ips += [
        (f"services[{i}].clusterIP", s.cluster_ip)
        for i, s in enumerate(doc.services)
        if s.cluster_ip
    ]
    check_unique(source, "IP address", ips)  # type: ignore[arg-type]
    check_unique(
        source,
        "service",
        [(f"services[{i}].name", (s.namespace, s.name)) for i, s in enumerate(doc.services)],
    )
    check_unique(
        source,
        "namespace",
        [(f"namespaces[{i}].name", n.name) for i, n in enumerate(doc.namespaces)],
    )
