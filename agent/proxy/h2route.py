"""Gateway API routes per request on the HTTP/2 and gRPC source path: a request in, a choice out.

Why a piece of its own, sans-IO: the decisions are the HTTP/1.1 path's (``http_router``:
``HttpRouter.admit`` matches the routes attached to the dialled port, picks a weighted backend
Service and runs its traffic control), so they are not repeated here; what is particular to
HTTP/2 is how a decision is expressed to ``H2Proxy``: a ``Choice`` (an endpoint of the backend
Service, the rule's header edits on header blocks with pseudo-headers, a timeout) or a
``LocalAnswer`` (which ``H2Proxy`` turns into a trailers-only gRPC status for a gRPC call).

A gRPC call (``content-type: application/grpc*`` and a ``/service/method`` path) is matched
against the port's GRPCRoutes, else its HTTPRoutes (``RouteTable.grpc``); any other request
against the HTTPRoutes. What the client sees when the request is answered here:

* no rule matches: 404 ``NR``, for gRPC ``UNIMPLEMENTED`` (12), as the Gateway API asks;
* every weight zero, or a backend that does not resolve: 500, for gRPC ``UNAVAILABLE`` (14)
  (GRPCRoute's rule for an invalid backend; Envoy would map its 500 to ``UNKNOWN``);
* no endpoint, over a limit, an injected abort: 503 (``UH``/``UO``/``FI``), gRPC
  ``UNAVAILABLE``; a GRPCRoute HTTPFault's ``grpcStatus`` abort: that status, trailers-only;
* the rule's ``timeouts.request`` (the whole request, retries included) or the call's own
  ``grpc-timeout`` (as Linkerd honours it; Envoy only with ``max_grpc_timeout``), whichever is
  sooner, expires, or the last try's ``timeouts.backendRequest``: 504 ``UT``, gRPC
  ``DEADLINE_EXCEEDED`` (4).

Retries: an HTTPRoute rule's ``retry`` (GEP-1731; GRPCRoute has no retry field) applies to the
HTTP/2 requests and gRPC calls it routes, decided as on HTTP/1.1 (``RoutePlan.retry_after``:
the rule's ``codes`` and attempts, only a request received whole with a body of at most
``H2Limits.max_replay_body``, under the backend Service's retry budget, counted in
``nodemesh_http_retries_total``). ``H2Proxy`` asks only before any response byte reached the
client: after a response head whose status is in ``codes`` (a gRPC call's trailers-only
``UNAVAILABLE`` counts as 503, gRPC's HTTP mapping), a reset (a refused stream too) or a lost
upstream before the response, or its ``backendRequest`` (per-try) timeout expired; the next
try goes to another endpoint after the backoff.

The backend Service's TrafficPolicy ``retries`` (``ServiceRetries``, every choice's
``resend``) take a try its endpoint never processed, before the rule's ``retry`` and with no
backoff, as the HTTP/1.1 path retries a failed connect: its tunnel could not be opened
(``connect-failure``: a timeout, an unreachable node, a failed tunnel; ``refused``: an HBONE
503, or a same-node TCP refusal), or the pod refused its stream or left it above its GOAWAY
(``refused``, RFC 9113 8.7: not processed, so safe). Each failure is counted against its
endpoint with its cause (``Attempts.failed``: balancer, outlier detection,
``nodemesh_service_connect_failures_total``), and the retry is the L4 path's decision
(``Attempts.may_retry``: ``retryOn``, ``attempts``, the connect deadline, the retry budget;
counted in ``nodemesh_service_retries_total``). A try's tunnel waits at most its
``perTryTimeout`` (``Endpoint.connect_timeout``). ``reset-before-data`` is never a reason to
send a request again (as on HTTP/1.1: the pod may have processed it); such a reset is counted
against the endpoint when the request ends, and the rule's ``retry`` may still take it.
When the TrafficPolicy does not retry, the rule's ``retry`` is asked as after any reset (an
HTTP/1.1 request never reaches its rule's retry for a failed connect: there it is answered 503
``UF`` at once).

An endpoint chosen for a request (by ``route_request``, ``admitted`` for a parked one, or
either kind of retry) counts as connected at once: a same-node endpoint's L7 policy and rate
limits are asked later, where the try's head goes to its open connection (the shell's
``H2Proxy`` admission, as the endpoint's destination node would on receiving it), and a
refusal there is that try's answer, as a far node's would be.

An injected delay (the rule's HTTPFault, flag ``DI``, and the TrafficPolicy's) is
``Choice.delay``: ``H2Proxy`` holds the request; the route's ``timeouts.request`` starts after
it, a call's ``grpc-timeout`` at once.

``RequestMirror``: ``Choice.mirror`` when the rule rolled any copy; the mirror Services ride on
the ``RoutePlan`` (``mirrors``), copied by the shell once ``H2Proxy`` hands the request over.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from operator import itemgetter

from agent.policy.routes import GrpcRequest, HttpRequest
from agent.policy.traffic.attempts import Narrow
from agent.proxy.h2exchange import Choice, Header, HeaderEdit, LocalAnswer, PickRequest, header
from agent.proxy.http_router import (
    BODIES,
    NO_HEALTHY_UPSTREAM,
    UPSTREAM_CONNECT_FAILURE,
    Headers,
    HttpRouter,
    LocalResponse,
    RoutePlan,
    TextHeaders,
)
from agent.proxy.resolve import ServiceTarget
from agent.state import Snapshot

# grpc-timeout units (gRPC over HTTP/2: TimeoutValue is at most 8 digits)
_GRPC_UNITS = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}


class Endpoint(tuple[tuple[str, str], int, str]):
    """An upstream key: one endpoint of one backend Service port (a pod can back two Services
    with different target ports, so the IP alone does not name it), with the backend Service
    (``target``) and the try's connect timeout riding along, neither compared nor hashed.

    A tuple of (service, port, IP), so that it is hashed and compared in C: a call looks its
    endpoint up in three dicts (the session's routes and records, the proxy's upstreams by
    key), and a dataclass's generated ``__hash__`` and ``__eq__`` were Python calls, eight a
    call. Nothing changes one once made (one is made per try)."""

    target: ServiceTarget
    # Seconds the tunnel may take to open: the per-try timeout of the try that chose it.
    connect_timeout: float | None

    service = property(itemgetter(0))  # (namespace, name); read in C, not a Python call
    port = property(itemgetter(1))
    ip = property(itemgetter(2))

    def __new__(
        cls,
        service: tuple[str, str],
        port: int,
        ip: str,
        target: ServiceTarget,
        connect_timeout: float | None = None,
    ) -> Endpoint:
        self = super().__new__(cls, (service, port, ip))
        self.target, self.connect_timeout = target, connect_timeout
        return self

    def __str__(self) -> str:
        return f"{self[0][0]}/{self[0][1]}:{self[1]}@{self[2]}"

    def __repr__(self) -> str:
        return f"Endpoint({self})"


def grpc_timeout(value: str | None) -> float | None:
    """Seconds of a ``grpc-timeout`` header (``100m``, ``2S``), or None if absent or malformed."""
    if not value or len(value) > 9 or value[-1] not in _GRPC_UNITS or not value[:-1].isdigit():
        return None
    return int(value[:-1]) * _GRPC_UNITS[value[-1]]


def route_request(
    router: HttpRouter,
    snap: Snapshot,
    dialled: ServiceTarget,
    request: PickRequest,
    source_ip: str,
    source_labels: Mapping[str, str] | None,
    source_node: tuple[str, str | None],
    *,
    client_namespace: str,
    narrow: Narrow | None = None,
) -> Choice | LocalAnswer:
    """Where one request on an HTTP/2 port goes (its ``RoutePlan`` is the choice's tag, to be
    finished with the request), or how it is answered here. ``narrow``: the candidates the
    caller prefers among the chosen backend's (``Attempts.narrow``, its key the backend's
    ``ServiceTarget``), for every pick of the request (its first, a parked one's, its
    retries'); the backend is chosen first, by the route's weights, and never changed by it."""
    head = request.head
    headers = TextHeaders(head.headers)  # decoded only if a route's match reads them
    call = GrpcRequest.from_path(head.path, headers, authority=head.host) if request.grpc else None
    routed = call or HttpRequest.from_target(
        head.method, request.target, headers, authority=head.host
    )
    try:
        plan = router.admit(
            snap,
            dialled,
            routed,
            source_ip,
            source_labels,
            source_node,
            client_namespace=client_namespace,
            may_queue=True,
        )
    except LocalResponse as e:
        extra = tuple((k.encode("latin-1"), v.encode("latin-1")) for k, v in e.headers)
        return LocalAnswer(e.status, e.flags, e.body, extra, grpc_status=e.grpc_status)
    if narrow is not None:
        attempts = plan.attempts
        attempts.narrow, attempts.narrow_key = narrow, plan.backend
    key: Endpoint | None = None
    if not plan.attempts.queued:
        endpoint = admitted(plan)
        if isinstance(endpoint, LocalAnswer):
            plan.attempts.finish()
            return endpoint
        key = endpoint
    return Choice(
        key,
        plan,
        edit_request=_request_edit(plan.edit_request) if plan.edit_request else None,
        edit_response=_response_edit(plan.edit_response) if plan.edit_response else None,
        timeout=_timeout(plan, head.headers if call is not None else None),
        retries=PlanRetries(plan) if plan.retry is not None else None,
        try_timeout=plan.try_timeout,
        delay=plan.injected_delay,
        resend=ServiceRetries(plan),
        mirror=bool(plan.mirrors),
        parked=plan.attempts.queued,
    )


def admitted(plan: RoutePlan) -> Endpoint | LocalAnswer:
    """The endpoint of a request its backend Service admitted (at once, or when its turn in
    the ``maxPendingRequests`` queue came), or 503 ``UH`` when there is none."""
    ip = plan.attempts.next_endpoint()
    if ip is None:
        return LocalAnswer(503, NO_HEALTHY_UPSTREAM, BODIES[NO_HEALTHY_UPSTREAM])
    return _sent_to(plan, ip)


def _sent_to(plan: RoutePlan, ip: str) -> Endpoint:
    """Endpoint ``ip``, chosen for the request's next try: the try counts as connected (a
    request is "connected" once it is sent on an upstream), its timeout from that instant
    (``Attempts.sent``: one clock reading for both)."""
    timeout = plan.attempts.sent(ip)
    backend = plan.backend
    return Endpoint(
        (backend.service.namespace, backend.service.name), backend.port.port, ip, backend, timeout
    )


class PlanRetries:
    """``H2Proxy``'s ``Retries`` for a request whose rule has ``retry``: the decision is the
    HTTP/1.1 path's (``RoutePlan.retry_after``: the rule's codes, attempts, replayable, the
    backend Service's retry budget, each outcome counted), the next try another endpoint of
    the same backend Service."""

    def __init__(self, plan: RoutePlan) -> None:
        self.plan = plan

    def after(self, status: int | None, first_byte: float, *, replayable: bool) -> float | None:
        return self.plan.retry_after(status, first_byte, replayable=replayable)

    def next(self) -> Choice | LocalAnswer:
        attempts = self.plan.attempts
        ip = attempts.next_endpoint()
        if ip is None:
            return LocalAnswer(503, NO_HEALTHY_UPSTREAM, BODIES[NO_HEALTHY_UPSTREAM])
        return Choice(_sent_to(self.plan, ip), self.plan)


class ServiceRetries:
    """``H2Proxy``'s ``Resend`` for every request: the backend Service's TrafficPolicy
    retries of a try its endpoint never processed (see the module docstring)."""

    __slots__ = ("plan",)

    def __init__(self, plan: RoutePlan) -> None:
        self.plan = plan

    def unprocessed(self, cause: str, *, replayable: bool) -> Choice | LocalAnswer | None:
        attempts = self.plan.attempts
        if attempts.current is not None:
            attempts.failed(attempts.current, cause)
        if not replayable or not attempts.may_retry(cause):
            return None
        ip = attempts.next_endpoint()
        if ip is None:  # the Service has no endpoint left: this failure is the answer
            return LocalAnswer(503, UPSTREAM_CONNECT_FAILURE, BODIES[UPSTREAM_CONNECT_FAILURE])
        return Choice(_sent_to(self.plan, ip), self.plan)


def _timeout(plan: RoutePlan, call_fields: Sequence[Header] | None) -> float | None:
    """The request's whole time from now: the route's ``timeouts.request`` starts after an
    injected delay (Envoy's route timeout starts after its fault filter), a call's own
    ``grpc-timeout`` (in ``call_fields``, a gRPC call's) now (it is the caller's deadline)."""
    timeout = plan.request_timeout
    if timeout is not None:
        timeout += plan.injected_delay
    if call_fields is not None:
        deadline = _call_deadline(call_fields)
        if deadline is not None and (timeout is None or deadline < timeout):
            timeout = deadline
    return timeout


def _call_deadline(fields: Sequence[Header]) -> float | None:
    """A call's ``grpc-timeout`` in seconds, read from its fields as received (not from their
    text, which is decoded only for a route that reads it): its values joined with ``,`` as
    ``GrpcRequest.header`` joins them, so a repeated one is malformed (None)."""
    value = None
    for name, one in fields:
        if name == b"grpc-timeout":
            value = one if value is None else value + b"," + one
    return None if value is None else grpc_timeout(value.decode("latin-1"))


def _decode(block: list[Header]) -> tuple[list[Header], Headers]:
    pseudo = [(k, v) for k, v in block if k.startswith(b":")]
    regular = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in block if k[:1] != b":"]
    return pseudo, regular


def _encode(headers: Headers) -> list[Header]:
    return [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers]


def _request_edit(edit: Callable[[str, Headers], tuple[str, Headers]]) -> HeaderEdit:
    """The rule's request edit (header modifier, URL rewrite) on an HTTP/2 header block: the
    edited path becomes ``:path``, a rewritten host ``:authority``."""

    def apply(block: list[Header]) -> list[Header]:
        pseudo, regular = _decode(block)
        path = (header(pseudo, b":path") or b"/").decode("latin-1")
        authority = (header(pseudo, b":authority") or b"").decode("latin-1")
        had_host = any(k == "host" for k, _ in regular)
        if not had_host:
            regular.append(("host", authority))
        path, regular = edit(path, regular)
        host = next((v for k, v in regular if k == "host"), authority)
        if not had_host:
            regular = [(k, v) for k, v in regular if k != "host"]
        changed = {b":path": path.encode("latin-1"), b":authority": host.encode("latin-1")}
        pseudo = [(k, changed.get(k, v)) for k, v in pseudo]
        return pseudo + _encode(regular)

    return apply


def _response_edit(edit: Callable[[Headers], Headers]) -> HeaderEdit:
    """The rule's ResponseHeaderModifier on an HTTP/2 header block (``:status`` kept)."""

    def apply(block: list[Header]) -> list[Header]:
        pseudo, regular = _decode(block)
        return pseudo + _encode(edit(regular))

    return apply
