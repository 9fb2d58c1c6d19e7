"""From a cluster document to the state model's objects.

This is what the local-file source loads into the ``StateStore`` and what the lab shows in
``lab status``. Service endpoints are computed here from the selector, as the Kubernetes
endpoints controller would: every pod of the service's namespace that matches the selector and
has an IP (a pod without one is pending and cannot receive traffic).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from agent.state.model import (
    EXCLUDE_INBOUND_ANNOTATION,
    EXCLUDE_OUTBOUND_ANNOTATION,
    HTTP_PORTS_ANNOTATION,
    MESH_ANNOTATION,
    Endpoint,
    Namespace,
    PolicyObject,
    RouteObject,
    Service,
    ServicePort,
    Workload,
    frozen_map,
)

if TYPE_CHECKING:
    from agent.sources.document import ClusterDocument, PodSpec


@dataclass(frozen=True)
class ClusterState:
    """Everything a cluster document says, as state objects ready for a ``StateStore``."""

    trust_domain: str
    namespaces: tuple[Namespace, ...]
    workloads: tuple[Workload, ...]
    services: tuple[Service, ...]
    policies: tuple[PolicyObject, ...]
    routes: tuple[RouteObject, ...] = ()


def _ports(value: str | None) -> frozenset[int]:
    from agent.sources.document import parse_port_list

    return parse_port_list(value) if value else frozenset()


def workload_of(pod: PodSpec, node: str) -> Workload:
    return Workload(
        uid=pod.uid,
        name=pod.name,
        namespace=pod.namespace,
        service_account=pod.service_account,
        node=node,
        ips=(pod.ip,) if pod.ip else (),
        labels=frozen_map(pod.labels),
        mesh_annotation=pod.annotations.get(MESH_ANNOTATION),
        exclude_outbound_ports=_ports(pod.annotations.get(EXCLUDE_OUTBOUND_ANNOTATION)),
        exclude_inbound_ports=_ports(pod.annotations.get(EXCLUDE_INBOUND_ANNOTATION)),
        http_ports=_ports(pod.annotations.get(HTTP_PORTS_ANNOTATION)),
    )


def _selects(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    """Kubernetes semantics: an empty selector selects nothing for endpoints."""
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def document_state(doc: ClusterDocument) -> ClusterState:
    workloads = tuple(workload_of(pod, node.name) for node, pod in doc.pods())
    declared = {ns.name: Namespace(ns.name, frozen_map(ns.labels)) for ns in doc.namespaces}
    # A namespace used by a pod or service but not declared exists with no labels, as it
    # would in a cluster where someone ran `kubectl create namespace`.
    for name in sorted({w.namespace for w in workloads} | {s.namespace for s in doc.services}):
        declared.setdefault(name, Namespace(name))
    services = []
    for svc in doc.services:
        selector = dict(svc.selector)
        endpoints = tuple(
            Endpoint(ip=w.ips[0], workload_uid=w.uid)
            for w in workloads
            if w.namespace == svc.namespace and w.ips and _selects(selector, w.labels)
        )
        services.append(
            Service(
                name=svc.name,
                namespace=svc.namespace,
                cluster_ips=(svc.cluster_ip,) if svc.cluster_ip else (),
                ports=tuple(
                    ServicePort(
                        port=p.port,
                        target_port=p.target_port,
                        name=p.name,
                        app_protocol=p.app_protocol,
                    )
                    for p in svc.ports
                ),
                selector=frozen_map(selector),
                endpoints=endpoints,
            )
        )
    return ClusterState(
        trust_domain=doc.trust_domain,
        namespaces=tuple(declared.values()),
        workloads=workloads,
        services=tuple(services),
        policies=doc.policies,
        routes=doc.routes,
    )
