"""The routing table of one snapshot: for a Service port and a request, the rule that applies.

Built once per state version (``RouteTable.build``) and then read by every request, so the
per-request work is a walk down a list already sorted by precedence, stopping at the first match
(``http``, ``grpc``) — or less: the data path asks ``port(service, port, client_namespace)``
once per table and decides through it, which keeps each decision per request shape
(``agent.policy.routes.decisions``) and answers a shape seen before without the walk.

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
from agent.policy.routes.decisions import DecisionCache, PortRoutes, shape_of
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


class Attached:
    """The routes of one kind that one namespace attached to a Service port, and their matches
    in precedence order, each with the action it leads to on this port (made once per table:
    a request that matches gets the same ``RouteAction`` object every time). ``routes`` is kept
    apart from the matches because a GRPCRoute may have no rule at all (``rules: []`` is valid
    there): it still answers every call ``UNIMPLEMENTED``, and ``NoMatchingRule`` must still
    name it. A plain class: its identity is its hash (it is part of a decision's cache key,
    ``agent.policy.routes.decisions``)."""

    __slots__ = ("actions", "candidates", "kind", "no_match", "routes", "shape")

    def __init__(
        self,
        kind: str,
        routes: tuple[RouteKey, ...],
        candidates: tuple[_Candidate, ...],
        service: ServiceKey,
        port: int,
    ) -> None:
        self.kind = kind
        self.routes = routes
        self.candidates = candidates
        self.actions = tuple((c.match, _action(c, service, port)) for c in candidates)
        self.no_match = NoMatchingRule(routes)
        self.shape = shape_of(self.actions, self.no_match)

    def first_http(self, request: HttpRequest) -> RouteAction | NoMatchingRule:
        """The action of the first match (in precedence order) the request meets."""
        for match, action in self.actions:
            if isinstance(match, HttpMatch) and match.matches(request):
                return action
        return self.no_match

    def first_grpc(self, request: GrpcRequest) -> RouteAction | NoMatchingRule:
        for match, action in self.actions:
            if isinstance(match, GrpcMatch) and match.matches(request):
                return action
        return self.no_match


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
        attached: Mapping[PortKey, Mapping[str, Mapping[str, Attached]]],
    ) -> None:
        self.compiled = compiled
        self.verdicts = verdicts
        self._attached = attached
        self.decisions = DecisionCache()

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
                    kind: Attached(
                        kind,
                        tuple(r.key for r in kind_routes),
                        tuple(
                            sorted(
                                _candidates(kind_routes),
                                key=_grpc_rank if kind == GRPC_ROUTE else _http_rank,
                            )
                        ),
                        *key,
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
    ) -> Mapping[str, Attached]:
        """The routes of each kind that apply to this client: its namespace's (consumer
        routes) if it has any on this port, else the Service namespace's (producer routes)."""
        by_namespace = self._attached.get((service, port), {})
        if client_namespace != service[0] and client_namespace in by_namespace:
            return by_namespace[client_namespace]  # consumer routes replace producer routes
        return by_namespace.get(service[0], {})

    def port(self, service: ServiceKey, port: int, client_namespace: str) -> PortRoutes:
        """The routes of this Service port for this client, deciding through the table's
        ``decisions`` (``http``/``grpc`` as below, kept per request shape)."""
        applicable = self._applicable(service, port, client_namespace)
        return PortRoutes(applicable.get(HTTP_ROUTE), applicable.get(GRPC_ROUTE), self.decisions)

    def routed(self, service: ServiceKey, port: int) -> bool:
        """Whether any route is programmed on this Service port (for any client)."""
        return (service, port) in self._attached

    def http(
        self, service: ServiceKey, port: int, request: HttpRequest, *, client_namespace: str
    ) -> Decision:
        """The rule an HTTP request to ``service``:``port`` from ``client_namespace`` takes."""
        attached = self._applicable(service, port, client_namespace).get(HTTP_ROUTE)
        return None if attached is None else attached.first_http(request)

    def grpc(
        self, service: ServiceKey, port: int, request: GrpcRequest, *, client_namespace: str
    ) -> Decision:
        """The rule a gRPC call takes: the port's GRPCRoutes, else its HTTPRoutes (both of the
        client's namespace when it has routes there)."""
        applicable = self._applicable(service, port, client_namespace)
        grpc = applicable.get(GRPC_ROUTE)
        if grpc is None:
            http = applicable.get(HTTP_ROUTE)
            return None if http is None else http.first_http(request.as_http())
        return grpc.first_grpc(request)


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
    weights = [b.weight for b in backends]
    index = choose_index(weights, sum(weights), point)
    return None if index is None else backends[index]


def choose_index(weights: Sequence[int], total: int, point: float) -> int | None:
    """``choose_backend`` over the weights alone (``total`` their sum, made once per rule): the
    index ``point`` picks, ``None`` when every weight is zero."""
    if total <= 0:
        return None
    target = point * total
    for index, weight in enumerate(weights):
        if target < weight:
            return index
        target -= weight
    return next(i for i in reversed(range(len(weights))) if weights[i])


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
