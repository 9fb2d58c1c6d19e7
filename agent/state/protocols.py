"""Which ports speak HTTP: only what Kubernetes and Istio let an owner *declare*, never a guess.

Why declared only: sniffing the first bytes stalls server-speaks-first protocols (MySQL, SMTP)
until a timeout, and a wrong guess breaks a connection that L4 would have carried fine. So a port
is HTTP when

* a Service port says so: ``appProtocol`` (``http``, ``http2``, ``kubernetes.io/h2c``,
  ``grpc``) wins, else Istio's port-name convention (``http``/``http-*``, ``http2``/``http2-*``,
  ``grpc``/``grpc-*``); it then applies to the pod port the Service port targets, on every
  endpoint of the Service;
* or, for direct pod-to-pod traffic, the pod's annotation ``nodemesh.io/http-ports``
  (``model.HTTP_PORTS_ANNOTATION``) lists it
  (a comma list of HTTP/1.1 ports, validated like the other port annotations).

Everything else is ``TCP`` (opaque L4). An ``appProtocol`` this mesh does not know (``mysql``,
``example.com/x``) is TCP, not an error: Kubernetes allows any value there.
"""

from __future__ import annotations

from collections.abc import Mapping

from agent.state.model import Service, ServicePort
from agent.state.snapshot import Snapshot

TCP = "tcp"
HTTP = "http"  # HTTP/1.1
HTTP2 = "http2"
GRPC = "grpc"

APP_PROTOCOLS: Mapping[str, str] = {
    "http": HTTP,
    "http2": HTTP2,
    "kubernetes.io/h2c": HTTP2,
    "grpc": GRPC,
}
NAME_PREFIXES: tuple[tuple[str, str], ...] = (("http2", HTTP2), ("grpc", GRPC), ("http", HTTP))


def declared_protocol(app_protocol: str, name: str) -> str:
    """The protocol a Service port declares: ``appProtocol`` first, then its name's prefix."""
    if app_protocol:
        return APP_PROTOCOLS.get(app_protocol.lower(), TCP)
    for prefix, protocol in NAME_PREFIXES:
        if name == prefix or name.startswith(prefix + "-"):
            return protocol
    return TCP


def port_protocol(port: ServicePort) -> str:
    return declared_protocol(port.app_protocol, port.name)


def _target_ports(service: Service, port: ServicePort) -> dict[str, int]:
    """Endpoint IP -> the pod port ``port`` reaches on it (named targets per endpoint)."""
    out: dict[str, int] = {}
    for endpoint in service.endpoints:
        target = port.target_port or endpoint.ports.get(port.name, 0)
        if target:
            out[endpoint.ip] = target
    return out


def declared_pod_ports(snap: Snapshot) -> Mapping[tuple[str, int], str]:
    """(pod IP, pod port) -> declared protocol, for every pod port that is not plain TCP.

    Built once per state version by its reader (the inbound proxy), so that a connection's
    protocol is one dictionary lookup. Annotations come first; among Services, the first by
    name decides when two disagree (a misconfiguration Kubernetes does not prevent).
    """
    out: dict[tuple[str, int], str] = {}
    for workload in snap.workloads.values():
        for ip in workload.ips:
            for p in workload.http_ports:
                out[(ip, p)] = HTTP
    for key in sorted(snap.services):
        service = snap.services[key]
        for port in service.ports:
            protocol = port_protocol(port)
            if protocol == TCP:
                continue
            for ip, target in _target_ports(service, port).items():
                out.setdefault((ip, target), protocol)
    return out
