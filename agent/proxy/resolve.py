"""Where an outbound connection goes: a pure function of the state snapshot.

The original destination is a meshed pod (tunnel to it, or a local relay when it is on this
node), a Service VIP (pick an endpoint, then as for a pod), or anything else (plain passthrough).
The endpoint choice is a per-Service round robin over ready endpoints: fair and predictable; the
traffic-control work replaces it with the Service's configured load balancer.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field

from agent.state import Service, Snapshot, Workload


class NoEndpoints(LookupError):
    """A Service VIP was addressed but the Service has no ready endpoint for that port."""


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


@dataclass
class Resolver:
    node: str
    _cursors: dict[tuple[str, str], Iterator[int]] = field(default_factory=dict)

    def resolve(self, snap: Snapshot, src_ip: str, dst_ip: str, dst_port: int) -> Route:
        source = snap.workload_by_ip.get(src_ip)
        if source is not None and not (source.node == self.node and snap.is_meshed(source)):
            source = None
        service = snap.service_by_ip.get(dst_ip)
        if service is not None:
            dst_ip, dst_port = self._pick(snap, service, dst_port)
        target = snap.workload_by_ip.get(dst_ip)
        if source is None or target is None or not snap.is_meshed(target):
            return Route("passthrough", dst_ip, dst_port, source, target, service)
        kind = "local" if target.node == self.node else "hbone"
        return Route(kind, dst_ip, dst_port, source, target, service)

    def _pick(self, snap: Snapshot, service: Service, port: int) -> tuple[str, int]:
        sport = next((p for p in service.ports if p.port == port), None)
        ready = [e for e in service.endpoints if e.ready]
        if sport is None or not ready:
            raise NoEndpoints(
                f"service {service.namespace}/{service.name} has no ready endpoint for port {port}"
            )
        cursor = self._cursors.setdefault(service.key, itertools.count())
        endpoint = ready[next(cursor) % len(ready)]
        return endpoint.ip, endpoint.ports.get(sport.name, sport.target_port)
