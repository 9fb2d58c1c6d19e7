"""The routing table of one snapshot: for a Service port and a request, the rule that applies.

Built once per state version (``RouteTable.build``) and then read by every request, so the
per-request work is a walk down a list already sorted by precedence, stopping at the first match.

Precedence is the Gateway API's. For HTTPRoute, across all routes attached to the port, the
match with, in turn: an ``Exact`` path; a ``RegularExpression`` path (the spec leaves regex
precedence to implementations: above prefixes, so that a regex rule is not shadowed by a
catch-all ``/``); the longest ``PathPrefix``; a ``method``; the most header matches; the most
query parameter matches. Ties go to the oldest route (``creationTimestamp``), then
``namespace/name`` alphabetically, then the first rule and match in list order. For
GRPCRoute: the most characters of an exact ``service`` match, then of an exact ``method``
match, then the most header matches, then the same tie-breakers. HTTPRoutes and GRPCRoutes
are never merged: a gRPC call uses the port's GRPCRoutes when it has any, else its HTTPRoutes
(which see ``POST /service/method``).

Producer and consumer routes (GAMMA, GEP-1294): a route in the Service's namespace applies to
every client; a route in another namespace applies only to clients of that namespace, and for
them replaces the producer routes entirely, of both kinds (GEP-1686: consumer routes have
priority): a consumer HTTPRoute on a gRPC port takes that namespace's calls even where the
producer attached a GRPCRoute. A route in any other namespace is ignored.

When routes are attached to the port but none matches, the answer is ``NoMatchingRule`` (404,
or ``UNIMPLEMENTED`` for gRPC); when none is attached it is ``None`` (the Service's ordinary
behaviour).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

from agent.policy.routes.compile import Compiled, compile_route
from agent.policy.routes.faults import KIND as FAULT_KIND
from agent.policy.routes.faults import HttpFault, compile_fault
from agent.policy.routes.model import (
    EXACT,
    GRPC_ROUTE,
    HTTP_ROUTE,
    PATH_PREFIX,
    REGEX,
    Backend,
    Decision,
    GrpcMatch,
    GrpcRequest,
    HttpMatch,
    HttpRequest,
    NoMatchingRule,
    Route,
    RouteAction,
    RouteKey,
    Rule,
    ServiceKey,
    StringMatch,
)
from agent.policy.routes.parents import ParentVerdict, evaluate
from agent.state.model import PolicyObject, RouteObject, Service
from agent.state.snapshot import Snapshot

PortKey = tuple[ServiceKey, int]  # service, service port
_PATH_RANK = {EXACT: 3, REGEX: 2, PATH_PREFIX: 1}


@dataclass(frozen=True, slots=True)
class _Candidate:
    route: Route
    rule: Rule
    match: HttpMatch | GrpcMatch


def _http_rank(c: _Candidate) -> tuple[object, ...]:
    m = c.match
    if not isinstance(m, HttpMatch):
        raise TypeError(f"an HTTPRoute match expected, got {m!r}")
    length = len(m.path.value.rstrip("/")) if m.path.kind == PATH_PREFIX else 0
    return (
        -_PATH_RANK[m.path.kind],
        -length,
        m.method is None,
        -len(m.headers),
        -len(m.query),
        *c.route.age_order,
        c.rule.index,
    )


def _exact_chars(match: StringMatch | None) -> int:
    return len(match.value) if match is not None and match.kind == EXACT else 0


def _grpc_rank(c: _Candidate) -> tuple[object, ...]:
    m = c.match
    if not isinstance(m, GrpcMatch):
        raise TypeError(f"a GRPCRoute match expected, got {m!r}")
    return (
        -_exact_chars(m.service),
        -_exact_chars(m.method),
        -len(m.headers),
        *c.route.age_order,
        c.rule.index,
    )


@dataclass(frozen=True, slots=True)
class _Attached:
    """The routes of one kind that one namespace attached to a Service port, and their matches
    in precedence order. ``routes`` is kept apart from the matches because a GRPCRoute may
    have no rule at all (``rules: []`` is valid there): it still answers every call
    ``UNIMPLEMENTED``, and ``NoMatchingRule`` must still name it."""

    routes: tuple[RouteKey, ...]
    candidates: tuple[_Candidate, ...]


def _candidates(routes: Sequence[Route]) -> Iterator[_Candidate]:
    for route in routes:
        for rule in route.rules:
            for match in rule.matches:
                yield _Candidate(route, rule, match)


class RouteTable:
    """Compiled routes, their verdicts per parent, and per Service port the sorted matches."""

    def __init__(
        self,
        compiled: Mapping[RouteKey, Compiled],
        verdicts: Mapping[RouteKey, tuple[ParentVerdict, ...]],
        attached: Mapping[PortKey, Mapping[str, Mapping[str, _Attached]]],
    ) -> None:
        self.compiled = compiled
        self.verdicts = verdicts
        self._attached = attached

    @classmethod
    def build(cls, snap: Snapshot) -> RouteTable:
        return cls.of(snap.routes, snap.services, fault_objects(snap.policies_of(FAULT_KIND)))

    @classmethod
    def of(
        cls,
        routes: Mapping[RouteKey, RouteObject],
        services: Mapping[ServiceKey, Service],
        faults: Mapping[tuple[str, str], HttpFault] | None = None,
    ) -> RouteTable:
        """The table of these routes over these Services and HTTPFaults (``build`` for a
        snapshot)."""
        compiled: dict[RouteKey, Compiled] = {}
        verdicts: dict[RouteKey, tuple[ParentVerdict, ...]] = {}
        by_port: dict[PortKey, dict[str, dict[str, list[Route]]]] = {}
        for key in sorted(routes):
            result = compiled[key] = compile_route(routes[key], services, faults)
            verdicts[key] = evaluate(result, services)
            if not isinstance(result, Route):
                continue
            for verdict in verdicts[key]:
                service = (verdict.parent.namespace, verdict.parent.name)
                for port in verdict.ports:
                    by_namespace = by_port.setdefault((service, port), {})
                    by_kind = by_namespace.setdefault(result.namespace, {})
                    bucket = by_kind.setdefault(result.kind, [])
                    if result not in bucket:
                        bucket.append(result)
        attached = {
            key: {
                ns: {
                    kind: _Attached(
                        tuple(r.key for r in kind_routes),
                        tuple(
                            sorted(
                                _candidates(kind_routes),
                                key=_grpc_rank if kind == GRPC_ROUTE else _http_rank,
                            )
                        ),
                    )
                    for kind, kind_routes in by_kind.items()
                }
                for ns, by_kind in namespaces.items()
            }
            for key, namespaces in by_port.items()
        }
        return cls(compiled, verdicts, attached)

    def _applicable(
        self, service: ServiceKey, port: int, client_namespace: str
    ) -> Mapping[str, _Attached]:
        """The routes of each kind that apply to this client: its namespace's (consumer
        routes) if it has any on this port, else the Service namespace's (producer routes)."""
        by_namespace = self._attached.get((service, port), {})
        if client_namespace != service[0] and client_namespace in by_namespace:
            return by_namespace[client_namespace]  # consumer routes replace producer routes
        return by_namespace.get(service[0], {})

    def routed(self, service: ServiceKey, port: int) -> bool:
        """Whether any route is programmed on this Service port (for any client)."""
        return (service, port) in self._attached

    def http(
        self, service: ServiceKey, port: int, request: HttpRequest, *, client_namespace: str
    ) -> Decision:
        """The rule an HTTP request to ``service``:``port`` from ``client_namespace`` takes."""
        attached = self._applicable(service, port, client_namespace).get(HTTP_ROUTE)
        if attached is None:
            return None
        return _first_http(attached, service, port, request)

    def grpc(
        self, service: ServiceKey, port: int, request: GrpcRequest, *, client_namespace: str
    ) -> Decision:
        """The rule a gRPC call takes: the port's GRPCRoutes, else its HTTPRoutes (both of the
        client's namespace when it has routes there)."""
        applicable = self._applicable(service, port, client_namespace)
        grpc = applicable.get(GRPC_ROUTE)
        if grpc is None:
            http = applicable.get(HTTP_ROUTE)
            return None if http is None else _first_http(http, service, port, request.as_http())
        for c in grpc.candidates:
            if isinstance(c.match, GrpcMatch) and c.match.matches(request):
                return _action(c, service, port)
        return NoMatchingRule(grpc.routes)


def _first_http(
    attached: _Attached, service: ServiceKey, port: int, request: HttpRequest
) -> RouteAction | NoMatchingRule:
    for c in attached.candidates:
        if isinstance(c.match, HttpMatch) and c.match.matches(request):
            return _action(c, service, port)
    return NoMatchingRule(attached.routes)


def _action(c: _Candidate, service: ServiceKey, port: int) -> RouteAction:
    rule = c.rule
    backends = rule.backends
    if not backends and rule.filters.redirect is None:
        backends = (Backend(service[0], service[1], port),)  # GAMMA: the parent Service
    return RouteAction(
        c.route.key, rule.index, backends, rule.filters, rule.timeouts, rule.retry, c.match
    )


def choose_backend(backends: Sequence[Backend], point: float) -> Backend | None:
    """The backend a uniform ``point`` in [0, 1) picks by weight; ``None`` when every weight is
    zero. A chosen backend with ``resolved`` false must be answered 500 (its share is not
    given to the others)."""
    total = sum(b.weight for b in backends)
    if total <= 0:
        return None
    target = point * total
    for backend in backends:
        if target < backend.weight:
            return backend
        target -= backend.weight
    return next(b for b in reversed(backends) if b.weight)


def fault_objects(policies: Iterable[PolicyObject]) -> Mapping[tuple[str, str], HttpFault]:
    """The HTTPFault objects among ``policies``, compiled, by (namespace, name)."""
    return {(p.namespace, p.name): compile_fault(p) for p in policies if p.kind == FAULT_KIND}


class RouteTableCache:
    """The table of the latest snapshot, rebuilt only when its routes, Services or policies
    (the HTTPFaults) changed.

    A commit that leaves a kind alone keeps that kind's mapping object in the new snapshot, so
    comparing the two mappings by identity is exact and costs nothing per request.
    """

    def __init__(self) -> None:
        self._inputs: tuple[object, ...] | None = None
        self._table = RouteTable({}, {}, {})

    def get(self, snap: Snapshot) -> RouteTable:
        inputs = (snap.routes, snap.services, snap.policies)
        if self._inputs is None or any(
            a is not b for a, b in zip(inputs, self._inputs, strict=True)
        ):
            self._table = RouteTable.build(snap)
            self._inputs = inputs
        return self._table
