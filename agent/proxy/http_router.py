"""Per-request upstream choice on a declared HTTP port of a Service VIP: head in, endpoint out.

Why a piece of its own, sans-IO: on an HTTP port the unit of balancing is the request, not the
connection, and *which backend serves a request* is about to grow (Gateway API HTTPRoute:
matches on path, headers and method, weighted ``backendRefs``, retries, timeouts). All of that
is a function of the request head and the state, so it lives here, apart from sockets and from
the codec; the shell (``agent.proxy.http_outbound``) only performs what this decides.

Two steps per request:

1. ``backend(snap, dialled, head)`` — which Service (and port) serves the request. Today it is
   the Service the client dialled. **This is where HTTPRoute plugs in**: a route attached to
   the dialled Service (GAMMA ``parentRef``) picks a rule by ``head`` (method, path, host;
   headers to be added to ``RequestHead`` when matches need them) and a weighted backendRef,
   and returns its ``ServiceTarget``; a ``RoutePlan`` may then carry the rule's timeouts and
   retry policy.
2. ``admit`` — the backend Service's traffic control, per request (``agent.policy.traffic``):
   limits (``maxConnections`` bounds concurrent requests here, like Envoy's ``max_requests``),
   faults, then ``Attempts``: ``next_endpoint`` is the latency-aware choice (peak-EWMA over
   connect times and, per request, time to first response byte), outlier detection ejects an
   endpoint after consecutive connect failures, resets before a response, or 5xx answers
   (``finish``), and a failed connect is retried on another endpoint within the budget.

What the client sees when no upstream can be had is decided here too (``Unroutable``): 503
with Envoy's response flag ``UH`` (no healthy endpoint), ``UF`` (every attempt to connect
failed), ``UO`` (over a limit) or ``FI`` (an injected abort).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from agent.policy.traffic.attempts import Attempts
from agent.policy.traffic.control import TrafficControl
from agent.policy.traffic.service import Rejected
from agent.proxy.http1 import RequestHead
from agent.proxy.resolve import ServiceTarget
from agent.state import Snapshot

NO_HEALTHY_UPSTREAM = "UH"
UPSTREAM_CONNECT_FAILURE = "UF"
UPSTREAM_OVERFLOW = "UO"
FAULT_INJECTED = "FI"

BODIES = {
    NO_HEALTHY_UPSTREAM: b"no healthy upstream\n",
    UPSTREAM_CONNECT_FAILURE: b"upstream connect error or disconnect/reset before headers\n",
    UPSTREAM_OVERFLOW: b"upstream overflow: over the Service's request limit\n",
    FAULT_INJECTED: b"fault filter abort\n",
}


class Unroutable(Exception):
    """No upstream for this request: answer 503 with ``flags`` (``BODIES[flags]``)."""

    def __init__(self, flags: str, detail: str) -> None:
        super().__init__(f"{flags}: {detail}")
        self.flags = flags
        self.detail = detail


@dataclass(slots=True)
class RoutePlan:
    """What one request does: the Service that serves it and its traffic-control attempts."""

    backend: ServiceTarget
    attempts: Attempts

    def finish(self, status: int, first_byte_at: float, *, reset_before_response: bool) -> None:
        """The request ended: account its outcome against the endpoint (latency, outliers)."""
        self.attempts.finish(
            reset_before_data=reset_before_response,
            first_byte_at=first_byte_at,
            server_error=status >= 500 and not reset_before_response,
        )


class HttpRouter:
    """Routes the requests of all HTTP client connections of one node (shares the Services'
    traffic state with the L4 path, so both see the same endpoint health)."""

    def __init__(self, traffic: TrafficControl) -> None:
        self.traffic = traffic

    def backend(self, snap: Snapshot, dialled: ServiceTarget, head: RequestHead) -> ServiceTarget:
        """The Service and port that serve ``head`` (the HTTPRoute integration point: see the
        module docstring). Without routes: the dialled one."""
        return dialled

    def admit(
        self,
        snap: Snapshot,
        dialled: ServiceTarget,
        head: RequestHead,
        source_ip: str,
        source_labels: Mapping[str, str] | None,
        source_node: tuple[str, str | None],
    ) -> RoutePlan:
        """Plan one request, or raise ``Unroutable`` (limits, injected abort)."""
        backend = self.backend(snap, dialled, head)
        traffic = self.traffic.service(snap, backend.service)
        if not traffic.endpoints:
            raise Unroutable(NO_HEALTHY_UPSTREAM, f"service {traffic.name} has no ready endpoint")
        try:
            attempts = traffic.admit(source_ip, source_labels, source_node)
        except Rejected as e:
            raise Unroutable(UPSTREAM_OVERFLOW, str(e)) from e
        if attempts.fault.abort is not None:
            attempts.finish()
            raise Unroutable(FAULT_INJECTED, f"service {traffic.name}: injected abort")
        return RoutePlan(backend, attempts)
