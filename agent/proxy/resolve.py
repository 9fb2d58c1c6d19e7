"""Where an outbound connection goes: pure functions of the state snapshot.

The original destination is a meshed pod (tunnel to it, or a local relay when it is on this
node), a Service VIP, or anything else (plain passthrough). For a VIP, ``service`` only finds the
Service and its port: which endpoint serves the connection is traffic control's decision
(``agent.policy.traffic``, driven by ``balanced``), made again for every attempt, and
``endpoint_route`` turns each chosen endpoint into a route like any pod's.
"""

from __future__ import annotations

from dataclasses import dataclass

from agent.state import Service, ServicePort, Snapshot, Workload


class NoEndpoints(LookupError):
    """A Service VIP was addressed but the Service has no ready endpoint for that port;
    ``target`` is the Service and port when the port exists (an HTTP port answers 503)."""

    def __init__(self, message: str, target: ServiceTarget | None = None) -> None:
        super().__init__(message)
        self.target = target


def looped(src_ip: str, dst_ip: str) -> bool:
    """A connection from an address to itself: never one the capture took from a pod (a pod's
    traffic to its own IP stays inside it), but what the proxy's own passthrough to a local
    address looks like when it lands on the proxy's listener, the kernel giving it that address
    as source. A client that dialled NODE_IP:15001 directly would otherwise make the proxy dial
    it again, and again, until the node ran out of connections."""
    return src_ip == dst_ip


def node_loopback(snap: Snapshot, dst_ip: str) -> bool:
    """``dst_ip`` is this node's loopback (or ``0.0.0.0``, which reaches it too) and no pod:
    where the admin API and the kubelet's local ports listen. A pod reaches it only through
    the proxy, which runs in the node's namespace (its SYN to 127.0.0.1 passes the node's
    routing where ``route_localnet`` is on, as kube-proxy sets it), so the proxy refuses it."""
    loopback = dst_ip.startswith("127.") or dst_ip == "0.0.0.0"
    return loopback and dst_ip not in snap.workload_by_ip


@dataclass(frozen=True, slots=True)
class Route:
    """``kind`` is ``hbone`` (meshed pod elsewhere), ``local`` (meshed pod here) or
    ``passthrough``; ``source`` is the meshed client workload, if known."""

    kind: str
    ip: str
    port: int
    source: Workload | None = None
    target: Workload | None = None
    service: Service | None = None


@dataclass(frozen=True, slots=True)
class ServiceTarget:
    """A connection to a Service VIP: the Service, the port addressed, the address used."""

    service: Service
    port: ServicePort
    vip: str


@dataclass
class Resolver:
    node: str

    def source(self, snap: Snapshot, src_ip: str) -> Workload | None:
        """The meshed client workload on this node that owns ``src_ip``, if any."""
        source = snap.workload_by_ip.get(src_ip)
        if source is not None and source.node == self.node and snap.is_meshed(source):
            return source
        return None

    def service(self, snap: Snapshot, dst_ip: str, dst_port: int) -> ServiceTarget | None:
        """The Service behind ``dst_ip`` (None: not a VIP); NoEndpoints if it lacks the port."""
        service = snap.service_by_ip.get(dst_ip)
        if service is None:
            return None
        sport = next((p for p in service.ports if p.port == dst_port), None)
        if sport is None or not any(e.ready for e in service.endpoints):
            raise NoEndpoints(
                f"service {service.namespace}/{service.name} has no ready endpoint for port "
                f"{dst_port}",
                ServiceTarget(service, sport, dst_ip) if sport is not None else None,
            )
        return ServiceTarget(service, sport, dst_ip)

    def route(
        self,
        snap: Snapshot,
        source: Workload | None,
        dst_ip: str,
        dst_port: int,
        service: Service | None = None,
    ) -> Route:
        target = snap.workload_by_ip.get(dst_ip)
        if source is None or target is None or not snap.is_meshed(target):
            return Route("passthrough", dst_ip, dst_port, source, target, service)
        kind = "local" if target.node == self.node else "hbone"
        return Route(kind, dst_ip, dst_port, source, target, service)

    def endpoint_route(
        self, snap: Snapshot, source: Workload | None, target: ServiceTarget, endpoint_ip: str
    ) -> Route:
        """The route to one endpoint of ``target``, on the port its EndpointSlice names."""
        sport = target.port
        endpoint = next((e for e in target.service.endpoints if e.ip == endpoint_ip), None)
        port = endpoint.ports.get(sport.name, sport.target_port) if endpoint else sport.target_port
        return self.route(snap, source, endpoint_ip, port, target.service)
