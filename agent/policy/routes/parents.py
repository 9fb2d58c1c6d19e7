"""Which Service ports a route is attached to, and the conditions its status reports per parent.

GAMMA attaches a route to a Service (``parentRefs`` with ``kind: Service``), optionally to one of
its ports. nodemesh programs a route only on ports *declared* HTTP (``agent.state.protocols``:
``appProtocol`` or the port name), because it never sniffs: TCP to an undeclared port keeps its
L4 behaviour, and the route's ``Accepted`` condition says so and how to declare the port.
An HTTPRoute attaches to ``http``, ``http2`` and ``grpc`` ports (gRPC is HTTP/2); a GRPCRoute
only to ``http2`` and ``grpc`` ports.

Reasons are the Gateway API's: ``Accepted``/``NoMatchingParent``/``UnsupportedValue``/
``IncompatibleFilters`` for ``Accepted``; ``ResolvedRefs``/``BackendNotFound``/``InvalidKind``/
``FilterNotFound`` for ``ResolvedRefs`` (never ``RefNotPermitted``: a mesh route's backendRef
may name any namespace, ``agent.policy.routes.compile``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from agent.policy.routes.compile import UNSUPPORTED, Compiled, Rejected
from agent.policy.routes.model import GRPC_ROUTE, ParentRef, ServiceKey
from agent.state.model import Service
from agent.state.protocols import GRPC, HTTP, HTTP2, port_protocol

ACCEPTED = "Accepted"
RESOLVED_REFS = "ResolvedRefs"
NO_MATCHING_PARENT = "NoMatchingParent"
ROUTE_PROTOCOLS = {GRPC_ROUTE: (HTTP2, GRPC)}
DEFAULT_PROTOCOLS = (HTTP, HTTP2, GRPC)
# nodemesh does not take the spec's PartiallyInvalid approaches (drop the invalid rules, or keep
# the last good version): the message says so, since the specification would allow either.
REFUSED_WHOLE = "nothing of this route is programmed until it is fixed (never a part of it)"


@dataclass(frozen=True, slots=True)
class Condition:
    type: str
    status: bool
    reason: str
    message: str = ""


@dataclass(frozen=True, slots=True)
class ParentVerdict:
    """One parent's outcome: the Service ports the route is programmed on (none when it is
    not accepted there) and its two conditions."""

    parent: ParentRef
    ports: tuple[int, ...]
    accepted: Condition
    resolved: Condition


def evaluate(
    compiled: Compiled, services: Mapping[ServiceKey, Service]
) -> tuple[ParentVerdict, ...]:
    """The verdict for every Service parent of a route (in ``parentRefs`` order)."""
    resolved = _resolved(compiled)
    return tuple(_parent(compiled, p, services, resolved) for p in compiled.parents)


def _resolved(compiled: Compiled) -> Condition:
    if isinstance(compiled, Rejected):
        return Condition(RESOLVED_REFS, False, UNSUPPORTED, "not resolved: the route is refused")
    if not compiled.unresolved:
        return Condition(RESOLVED_REFS, True, RESOLVED_REFS, "")
    reason = compiled.unresolved[0].split(":", 1)[0]
    return Condition(RESOLVED_REFS, False, reason, "; ".join(compiled.unresolved))


def _parent(
    compiled: Compiled,
    parent: ParentRef,
    services: Mapping[ServiceKey, Service],
    resolved: Condition,
) -> ParentVerdict:
    def refused(reason: str, message: str) -> ParentVerdict:
        return ParentVerdict(parent, (), Condition(ACCEPTED, False, reason, message), resolved)

    if isinstance(compiled, Rejected):
        return refused(compiled.error.reason, f"{compiled.error}; {REFUSED_WHOLE}")
    service = services.get((parent.namespace, parent.name))
    if service is None:
        return refused(
            NO_MATCHING_PARENT, f"Service {parent.namespace}/{parent.name} does not exist"
        )
    ports = [
        p
        for p in service.ports
        if (parent.port is None or p.port == parent.port)
        and (parent.section is None or p.name == parent.section)
    ]
    if not ports:
        which = [str(parent.port)] if parent.port is not None else []
        which += [f"named {parent.section!r}"] if parent.section is not None else []
        return refused(
            NO_MATCHING_PARENT,
            f"Service {parent.namespace}/{parent.name} has no port {' '.join(which)}",
        )
    wanted = ROUTE_PROTOCOLS.get(compiled.kind, DEFAULT_PROTOCOLS)
    programmed = tuple(p.port for p in ports if port_protocol(p) in wanted)
    l4 = [p.port for p in ports if p.port not in programmed]
    hint = (
        f"port(s) {', '.join(map(str, l4))} of Service {parent.namespace}/{parent.name} "
        f"are not declared {' or '.join(wanted)} and keep L4 behaviour; to route them set "
        f"appProtocol ({', '.join(wanted)}) or a port name such as {wanted[0]}-web"
    )
    if not programmed:
        return refused(UNSUPPORTED, hint)
    message = f"programmed on port(s) {', '.join(map(str, programmed))}"
    return ParentVerdict(
        parent,
        programmed,
        Condition(ACCEPTED, True, ACCEPTED, f"{message}; {hint}" if l4 else message),
        resolved,
    )
