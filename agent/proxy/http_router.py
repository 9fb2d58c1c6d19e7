"""Per-request upstream choice on a declared HTTP port of a Service VIP: head in, endpoint out.

Why a piece of its own, sans-IO: on an HTTP port the unit of balancing is the request, not the
connection, and *which backend serves a request* is the Gateway API's HTTPRoute (matches on
path, headers and method, weighted ``backendRefs``, filters, retries, timeouts). All of that
is a function of the request head and the state, so it lives here, apart from sockets and from
the codec; the shell (``agent.proxy.http_outbound``) only performs what this decides.

Three steps per request:

1. ``route`` — the Gateway API HTTPRoutes attached to the dialled Service port (GAMMA
   ``parentRef``; ``agent.policy.routes``) match the head (path, query, headers, method):
   none attached → the dialled Service serves, as without routes; attached but none matches →
   404 with Envoy's flag ``NR``; a rule → its ``RequestRedirect`` is answered here (3xx,
   ``Location``), else a weighted ``backendRef`` is chosen (``choose_backend``; every weight
   zero, or a reference that does not resolve, or a port the Service lacks → 500, the share is
   never given to another backend). The rule's ``ExtensionRef`` to an HTTPFault
   (``agent.policy.routes.faults``) aborts the request here (its status, flag ``FI``) or
   delays it (``RoutePlan.delay``, flag ``DI``); one whose object is missing answers 500.
   The rule's ``RequestHeaderModifier`` and ``URLRewrite``
   edit the forwarded head (``edit_request``), its ``ResponseHeaderModifier`` the response
   head (``edit_response``), and its ``timeouts``, ``retry`` and the ``RequestMirror``
   backends this request is copied to (each rolled by its percentage; one that does not
   resolve is skipped: its status already says so) ride on the ``RoutePlan``. What depends
   only on the state is not redone per request: the port's routes are looked up once per route
   table, the rule they choose is kept per request shape (``agent.policy.routes.decisions``),
   and a chosen rule's backends are resolved and its filters composed once per table
   (``_Rule``); every draw (backend, faults, mirrors, backoff) is still made per request.
2. ``admit`` — the chosen backend Service's traffic control, per request
   (``agent.policy.traffic``): limits (``maxConnections`` bounds concurrent requests here,
   like Envoy's ``max_requests``), faults, then ``Attempts``: ``next_endpoint`` is the
   latency-aware choice (peak-EWMA over connect times and, per request, time to first
   response byte), outlier detection ejects an endpoint after consecutive connect failures,
   resets before a response, or 5xx answers (``finish``), and a failed connect is retried on
   another endpoint within the budget.
3. ``RoutePlan.retry_after`` — after a try that gave no answer for the client (a status in the
   rule's ``retry.codes``, a reset before the response head, a per-try timeout): whether to
   try again (``agent.policy.routes.retry``: replayable, attempts left, the backend Service's
   retry budget), and after which backoff.

What the client sees when the request is answered here is decided here too
(``LocalResponse``, ``Unroutable`` for the 503s): 503 with Envoy's response flag ``UH`` (no
healthy endpoint), ``UF`` (every attempt to connect failed), ``UO`` (over a limit) or ``FI``
(a TrafficPolicy's injected abort); a route's HTTPFault abort with its own status and ``FI``;
404 ``NR``; 500 for an unusable backend or fault filter; a redirect.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import overload

from agent.policy.routes import (
    GrpcRequest,
    NoMatchingRule,
    RouteAction,
    RouteTable,
    RouteTableCache,
    for_backend,
    modify_headers,
    redirect_location,
    rewrite_request,
)
from agent.policy.routes.decisions import PortRoutes
from agent.policy.routes.faults import NO_FAULT, FaultDecision
from agent.policy.routes.faults import decide as decide_fault
from agent.policy.routes.model import (
    Backend,
    HeaderModifier,
    HttpMatch,
    HttpRequest,
    Mirror,
    Retry,
    Rewrite,
    RouteKey,
)
from agent.policy.routes.retry import ATTEMPTED, BUDGET_EXHAUSTED, RequestRetry
from agent.policy.routes.table import choose_index
from agent.policy.traffic.attempts import Attempts
from agent.policy.traffic.control import TrafficControl
from agent.policy.traffic.service import Rejected, ServiceTraffic
from agent.proxy.resolve import ServiceTarget
from agent.state import Snapshot

NO_HEALTHY_UPSTREAM = "UH"
UPSTREAM_CONNECT_FAILURE = "UF"
UPSTREAM_OVERFLOW = "UO"
FAULT_INJECTED = "FI"
DELAY_INJECTED = "DI"
NO_ROUTE = "NR"
UPSTREAM_TIMEOUT = "UT"
NO_FLAGS = "-"

BODIES = {
    NO_HEALTHY_UPSTREAM: b"no healthy upstream\n",
    UPSTREAM_CONNECT_FAILURE: b"upstream connect error or disconnect/reset before headers\n",
    UPSTREAM_OVERFLOW: b"upstream overflow: over the Service's request limit\n",
    FAULT_INJECTED: b"fault filter abort\n",
    NO_ROUTE: b"no route matched the request\n",
    UPSTREAM_TIMEOUT: b"upstream request timeout\n",
}
BACKEND_UNUSABLE_BODY = b"the route's backend cannot be used\n"
FILTER_UNUSABLE_BODY = b"the route's filter cannot be applied\n"

Headers = list[tuple[str, str]]


class TextHeaders(Sequence[tuple[str, str]]):
    """A request's header fields as routes read them (text), decoded when first read: most
    Services have no HTTPRoute, or none matching on headers, and decoding every field of
    every request was a visible share of its routing."""

    __slots__ = ("_fields", "_text")

    def __init__(self, fields: Sequence[tuple[bytes, bytes]]) -> None:
        self._fields = fields
        self._text: list[tuple[str, str]] | None = None

    def _decoded(self) -> list[tuple[str, str]]:
        text = self._text
        if text is None:
            text = [(n.decode("latin-1"), v.decode("latin-1")) for n, v in self._fields]
            self._text = text
        return text

    @overload
    def __getitem__(self, index: int) -> tuple[str, str]: ...

    @overload
    def __getitem__(self, index: slice) -> Sequence[tuple[str, str]]: ...

    def __getitem__(self, index: int | slice) -> tuple[str, str] | Sequence[tuple[str, str]]:
        return self._decoded()[index]

    def __len__(self) -> int:
        return len(self._fields)

    def __iter__(self) -> Iterator[tuple[str, str]]:
        return iter(self._decoded())


class LocalResponse(Exception):
    """Answer this request here: ``status``, Envoy's response ``flags``, ``body``, and extra
    response ``headers`` (a redirect's ``location``); ``grpc_status`` is the status a gRPC call
    gets instead of the one its HTTP status maps to (a GRPCRoute fault's ``grpcStatus``)."""

    def __init__(
        self,
        status: int,
        flags: str,
        detail: str,
        body: bytes = b"",
        headers: Sequence[tuple[str, str]] = (),
        *,
        grpc_status: int | None = None,
    ) -> None:
        super().__init__(f"{status} {flags}: {detail}")
        self.status = status
        self.flags = flags
        self.detail = detail
        self.body = body
        self.headers = tuple(headers)
        self.grpc_status = grpc_status


class Unroutable(LocalResponse):
    """No upstream for this request: answer 503 with ``flags`` (``BODIES[flags]``)."""

    def __init__(self, flags: str, detail: str) -> None:
        super().__init__(503, flags, detail, BODIES[flags])


@dataclass(slots=True)
class RoutePlan:
    """What one request does: the Service that serves it, its traffic-control attempts, and
    what its route rule adds (edits of the heads, timeouts in seconds, retries)."""

    backend: ServiceTarget
    attempts: Attempts
    action: RouteAction | None = None
    edit_request: Callable[[str, Headers], tuple[str, Headers]] | None = None
    edit_response: Callable[[Headers], Headers] | None = None
    request_timeout: float | None = None
    try_timeout: float | None = None
    retry: RequestRetry | None = None
    retries: int = field(default=0)
    mirrors: list[ServiceTarget] = field(default_factory=list)
    delay: float = 0.0  # seconds injected by the rule's HTTPFault before forwarding (``DI``)

    @property
    def injected_delay(self) -> float:
        """Seconds the request waits before it is sent: the rule's HTTPFault delay and the
        backend Service's TrafficPolicy fault delay."""
        return self.delay + self.attempts.fault.delay

    def flags(self, flags: str) -> str:
        """The request's response flags with ``DI`` added when a delay was injected."""
        if not self.delay:
            return flags
        return DELAY_INJECTED if flags == NO_FLAGS else f"{flags},{DELAY_INJECTED}"

    def finish(self, status: int, first_byte_at: float, *, reset_before_response: bool) -> None:
        """The request ended: account its outcome against the endpoint (latency, outliers)."""
        self.attempts.finish(
            reset_before_data=reset_before_response,
            first_byte_at=first_byte_at,
            server_error=status >= 500 and not reset_before_response,
        )

    def retry_after(
        self, status: int | None, first_byte_at: float, *, replayable: bool
    ) -> float | None:
        """The try ended with ``status`` (``None``: no response head: reset, closed, per-try
        timeout). Seconds to wait before trying again on another endpoint, or ``None`` when the
        outcome goes to the client (not retried by the rule, not replayable, attempts or budget
        spent: each counted)."""
        retry = self.retry
        if retry is None or not retry.retryable(status):
            return None
        svc = self.attempts.service
        refusal = retry.refusal(replayable)
        if refusal is None and not svc.budget.try_retry(svc.clock()):
            refusal = BUDGET_EXHAUSTED
        if refusal is not None:
            svc.count("http_retry", refusal)
            return None
        svc.count("http_retry", ATTEMPTED)
        self.retries += 1
        self.attempts.again(
            reset_before_data=status is None,
            first_byte_at=first_byte_at,
            server_error=status is not None and status >= 500,
        )
        return retry.spend()


@dataclass(frozen=True, slots=True)
class _Backend:
    """One backendRef of a rule as the router sends to it, made once per route table: its
    ``ServiceTarget`` (``None``: it does not resolve, its share is answered 500), the rule's
    action with the backendRef's own filters (``for_backend``), what that action sets on a
    plan, and its key in ``HttpRouter.routed``."""

    ref: Backend
    target: ServiceTarget | None
    action: RouteAction
    routed: tuple[RouteKey, int, str]
    edit_request: Callable[[str, Headers], tuple[str, Headers]] | None
    edit_response: Callable[[Headers], Headers] | None
    retry: Retry | None  # the rule's retry when it has attempts


@dataclass(frozen=True, slots=True)
class _Rule:
    """A chosen rule's per-table part (what does not depend on the request or the draws):
    its name for messages, its weights and their total, its backends and mirrors resolved."""

    action: RouteAction  # kept: its ``id`` is the key of ``HttpRouter._rules``
    name: str
    weights: tuple[int, ...]
    total: int
    backends: tuple[_Backend, ...]
    mirrors: tuple[tuple[Mirror, ServiceTarget | None], ...]


class HttpRouter:
    """Routes the requests of all HTTP client connections of one node (shares the Services'
    traffic state with the L4 path, so both see the same endpoint health).

    What depends only on the state is looked up once per route table, not per request: the
    routes that apply to a (Service port, client namespace) (``PortRoutes``, which also keeps
    the rule chosen per request shape) and, per chosen rule, its backends resolved to
    ``ServiceTarget``s with their filters composed (``_Rule``). What is drawn — the backend by
    weight, faults, mirrors, retries' backoff — is still drawn per request, in the same order
    from ``rng``."""

    def __init__(self, traffic: TrafficControl, rng: random.Random | None = None) -> None:
        self.traffic = traffic
        self.routes = RouteTableCache()
        self.rng = rng or random.Random()
        # Requests sent per (route, rule, backend Service): the share each backend actually got,
        # for ``nodemesh routes``. Bounded by the routes' configuration, not by traffic.
        self.routed: Counter[tuple[RouteKey, int, str]] = Counter()
        # Of the route table last used (both bounded by the state: dialled Service ports and
        # client namespaces, the table's rules); emptied when the table changes.
        self._snap: Snapshot | None = None
        self._table: RouteTable | None = None
        self._ports: dict[tuple[str, str, int, str], PortRoutes] = {}
        self._rules: dict[int, _Rule] = {}

    def admit(
        self,
        snap: Snapshot,
        dialled: ServiceTarget,
        request: HttpRequest | GrpcRequest | Callable[[], HttpRequest],
        source_ip: str,
        source_labels: Mapping[str, str] | None,
        source_node: tuple[str, str | None],
        *,
        client_namespace: str,
        may_queue: bool = False,
    ) -> RoutePlan:
        """Plan one request (a ``GrpcRequest`` for a gRPC call on an HTTP/2 port: GRPCRoutes
        first), or raise ``LocalResponse`` (no route, a redirect, an unusable backend, limits,
        an injected abort). With ``may_queue`` a request over the backend Service's
        ``maxConnections`` may wait (``plan.attempts.queued``: the shell waits for its
        ``on_admitted`` before it picks an endpoint). An HTTP request may come as the function
        that makes it, called only when a route on the port may read it: most Services have
        none, and the request's fields were made for every request and never read."""
        routes = self._port_routes(snap, dialled, client_namespace)
        if isinstance(request, GrpcRequest):
            action = routes.grpc(request)
        elif not routes.routes_http:
            action = None
        else:
            if not isinstance(request, HttpRequest):
                request = request()
            action = routes.http(request)
        if action is None:  # no route: the dialled Service serves
            traffic = self.traffic.service(snap, dialled.service)
            attempts = self._attempts(traffic, source_ip, source_labels, source_node, may_queue)
            return RoutePlan(dialled, attempts)
        if isinstance(action, NoMatchingRule):
            names = ", ".join("/".join(key[1:]) for key in action.routes)
            raise LocalResponse(404, NO_ROUTE, f"no rule of {names} matched", BODIES[NO_ROUTE])
        assert isinstance(request, HttpRequest | GrpcRequest)  # made above: a route reads it
        rule = self._rule(snap, action)
        fault = NO_FAULT if action.filters.fault is None else self._fault(request, rule)
        chosen = self._backend(dialled, request, rule)
        assert chosen.target is not None  # _backend answered 500 otherwise
        traffic = self.traffic.service(snap, chosen.target.service)
        attempts = self._attempts(traffic, source_ip, source_labels, source_node, may_queue)
        plan = RoutePlan(chosen.target, attempts, chosen.action, delay=fault.delay)
        plan.edit_request, plan.edit_response = chosen.edit_request, chosen.edit_response
        timeouts = action.timeouts
        plan.request_timeout, plan.try_timeout = timeouts.request, timeouts.backend_request
        if chosen.retry is not None:
            plan.retry = RequestRetry(chosen.retry, self.rng)
        if rule.mirrors:
            plan.mirrors = self._mirrors(rule)
        return plan

    def _port_routes(
        self, snap: Snapshot, dialled: ServiceTarget, client_namespace: str
    ) -> PortRoutes:
        """The routes of the dialled port for this client, from the table of ``snap``."""
        if snap is not self._snap:
            table = self.routes.get(snap)
            if table is not self._table:
                self._table, self._ports, self._rules = table, {}, {}
            self._snap = snap
        service = dialled.service
        key = (service.namespace, service.name, dialled.port.port, client_namespace)
        routes = self._ports.get(key)
        if routes is None:
            assert self._table is not None
            routes = self._table.port(key[:2], key[2], client_namespace)
            self._ports[key] = routes
        return routes

    def _rule(self, snap: Snapshot, action: RouteAction) -> _Rule:
        """The per-table part of the chosen rule (made the first time it is chosen)."""
        rule = self._rules.get(id(action))
        if rule is None:
            rule = self._rules[id(action)] = _prepare(snap, action)
        return rule

    def _mirrors(self, rule: _Rule) -> list[ServiceTarget]:
        out = []
        for mirror, target in rule.mirrors:
            if self.rng.random() * 100.0 >= mirror.percent or not mirror.backend.resolved:
                continue
            if target is not None:
                out.append(target)
        return out

    def _fault(self, request: HttpRequest | GrpcRequest, rule: _Rule) -> FaultDecision:
        """The rule's HTTPFault for this request: an abort is raised (flag ``FI``), a delay
        returned; a filter whose HTTPFault does not exist answers 500 (Gateway API: a filter
        that cannot be applied is never skipped)."""
        ref = rule.action.filters.fault
        if ref is None:
            return NO_FAULT
        if ref.fault is None:
            raise LocalResponse(
                500,
                NO_FLAGS,
                f"{rule.name}: HTTPFault {ref.namespace}/{ref.name} does not exist",
                FILTER_UNUSABLE_BODY,
            )
        decision = decide_fault(ref.fault, request.headers, self.rng)
        if decision.aborted:
            raise LocalResponse(
                # a gRPC status is answered trailers-only: HTTP 200 (Envoy's fault filter too)
                decision.abort_status or 200,
                FAULT_INJECTED,
                f"{rule.name}: abort injected by HTTPFault {ref.fault.name}",
                BODIES[FAULT_INJECTED],
                grpc_status=decision.abort_grpc_status,
            )
        return decision

    def _backend(
        self, dialled: ServiceTarget, request: HttpRequest | GrpcRequest, rule: _Rule
    ) -> _Backend:
        """The rule's redirect (raised), or its weighted choice (a backendRef that resolves;
        500 raised otherwise), counted in ``routed``."""
        action = rule.action
        redirect = action.filters.redirect
        if redirect is not None:
            if isinstance(request, GrpcRequest):  # an HTTPRoute serving a gRPC call
                request = request.as_http()
            match = action.match if isinstance(action.match, HttpMatch) else None
            location = redirect_location(request, redirect, match, service_port=dialled.port.port)
            raise LocalResponse(
                redirect.status,
                NO_FLAGS,
                f"redirect to {location}",
                headers=[("location", location)],
            )
        index = choose_index(rule.weights, rule.total, self.rng.random())
        if index is None:
            raise LocalResponse(
                500, NO_FLAGS, f"{rule.name}: every backend weight is 0", BACKEND_UNUSABLE_BODY
            )
        chosen = rule.backends[index]
        if chosen.target is None:
            ref = chosen.ref
            raise LocalResponse(
                500,
                NO_FLAGS,
                f"{rule.name}: backend {ref.namespace}/{ref.name}:{ref.port} does not resolve",
                BACKEND_UNUSABLE_BODY,
            )
        self.routed[chosen.routed] += 1
        return chosen

    @staticmethod
    def _attempts(
        traffic: ServiceTraffic,
        source_ip: str,
        source_labels: Mapping[str, str] | None,
        source_node: tuple[str, str | None],
        may_queue: bool,
    ) -> Attempts:
        if not traffic.endpoints:
            raise Unroutable(NO_HEALTHY_UPSTREAM, f"service {traffic.name} has no ready endpoint")
        try:
            attempts = traffic.admit(source_ip, source_labels, source_node, may_queue=may_queue)
        except Rejected as e:
            raise Unroutable(UPSTREAM_OVERFLOW, str(e)) from e
        if attempts.fault.abort is not None:
            attempts.finish()
            raise Unroutable(FAULT_INJECTED, f"service {traffic.name}: injected abort")
        return attempts


def _prepare(snap: Snapshot, action: RouteAction) -> _Rule:
    """A rule's per-table part, resolved against ``snap`` (whose Services the table was built
    from: the router makes a ``_Rule`` again when the table changes)."""
    backends = []
    for ref in action.backends:
        composed = for_backend(action, ref)
        filters = composed.filters
        match = composed.match if isinstance(composed.match, HttpMatch) else None
        edit_request = None
        if filters.request_headers is not None or filters.rewrite is not None:
            edit_request = _request_editor(filters.request_headers, filters.rewrite, match)
        retry = action.retry if action.retry is not None and action.retry.attempts > 0 else None
        backends.append(
            _Backend(
                ref,
                _target(snap, ref.service, ref.port) if ref.resolved else None,
                composed,
                (action.route, action.rule, f"{ref.namespace}/{ref.name}"),
                edit_request,
                _response_editor(filters.response_headers),
                retry,
            )
        )
    mirrors = tuple(
        (m, _target(snap, m.backend.service, m.backend.port) if m.backend.resolved else None)
        for m in action.filters.mirrors
    )
    weights = tuple(ref.weight for ref in action.backends)
    name = f"{'/'.join(action.route[1:])} rule {action.rule}"
    return _Rule(action, name, weights, sum(weights), tuple(backends), mirrors)


def _target(snap: Snapshot, key: tuple[str, str], port_number: int) -> ServiceTarget | None:
    """A backendRef's Service and port, if both exist (the VIP only labels telemetry)."""
    service = snap.services.get(key)
    if service is None:
        return None
    port = next((p for p in service.ports if p.port == port_number), None)
    if port is None:
        return None
    return ServiceTarget(service, port, service.cluster_ips[0] if service.cluster_ips else "")


def _response_editor(modifier: HeaderModifier | None) -> Callable[[Headers], Headers] | None:
    """The response head after the rule's (and backendRef's) ResponseHeaderModifier."""
    if modifier is None:
        return None
    return lambda headers: modify_headers(headers, modifier)


def _request_editor(
    modifier: HeaderModifier | None, rewrite: Rewrite | None, match: HttpMatch | None
) -> Callable[[str, Headers], tuple[str, Headers]]:
    """The forwarded head after the rule's RequestHeaderModifier, then its URLRewrite (the
    ``host`` header is never dropped: HTTP/1.1 requires it)."""

    def edit(target: str, headers: Headers) -> tuple[str, Headers]:
        host = next((v for k, v in headers if k == "host"), "")
        if modifier is not None:
            headers = modify_headers(headers, modifier)
        if rewrite is not None:
            request = rewrite_request(HttpRequest.from_target("", target, headers), rewrite, match)
            query = f"?{request.query}" if request.query else ""
            target, headers = request.path + query, list(request.headers)
        if not any(k == "host" for k, _ in headers):
            headers.append(("host", host))
        return target, headers

    return edit
