"""Route decisions kept per request shape: what the matches on a Service port read of a
request, and the rule they chose for those values.

Why: the routes attached to a port are walked per request (``Attached.first_http``: every
match in precedence order until one holds), yet the rule they choose depends only on the table
and on the few request fields the matches name — the path when a match tests it, the method
when one names it, the values of the headers and query parameters they name (for a GRPCRoute:
the call's service and method, and headers). The table changes only with the state. So the
choice is kept per (attached routes, those fields), and a request whose fields were seen before
gets it without the walk. When the first match in precedence order holds for every request
(a rule without ``matches``, or ``PathPrefix /`` alone), nothing is read at all: that choice is
made once, when the table is built (``Shape.fixed``).

Only the *match* is kept. What a rule draws per request — the weighted backend, an HTTPFault's
percentages, each mirror's percentage, the retries — is drawn by the router after the choice,
per request, exactly as before.

Memory is bounded whatever clients send. The cache belongs to one ``RouteTable`` (a new table,
made when routes, Services or policies change, starts empty, so a change is seen by the very
next request); it holds at most ``DECISIONS`` entries and is emptied when full (fields an
attacker varies cannot grow it, and cannot keep the usual shapes out for longer than the next
``DECISIONS`` new ones); and a request whose read fields are longer than ``MAX_KEY_CHARS`` in
all is decided by the walk without being kept.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from agent.policy.routes.model import (
    PATH_PREFIX,
    Decision,
    GrpcMatch,
    GrpcRequest,
    HttpMatch,
    HttpRequest,
    NoMatchingRule,
    RouteAction,
)

if TYPE_CHECKING:
    from agent.policy.routes.table import Attached

DECISIONS = 1024  # decisions kept per route table
MAX_KEY_CHARS = 512  # longest request fields (summed) whose decision is kept

Chosen = RouteAction | NoMatchingRule


@dataclass(frozen=True, slots=True)
class Shape:
    """What the matches of one attached list read of a request, up to the first match that
    holds for every request (those after it are never reached); ``fixed`` is the decision when
    nothing is read."""

    path: bool = False
    method: bool = False
    headers: tuple[str, ...] = ()
    query: tuple[str, ...] = ()
    service: bool = False  # GRPCRoute: the call's service
    grpc_method: bool = False
    fixed: Chosen | None = None


def _reads_path(match: HttpMatch) -> bool:
    """``PathPrefix /`` (the default) holds for every path: it reads nothing."""
    return match.path.kind != PATH_PREFIX or bool(match.path.value.rstrip("/"))


def shape_of(actions: Sequence[tuple[HttpMatch | GrpcMatch, RouteAction]], none: Chosen) -> Shape:
    """The ``Shape`` of matches in precedence order (``none``: the decision when none holds)."""
    path = method = service = grpc_method = False
    headers: dict[str, None] = {}
    query: dict[str, None] = {}
    for match, action in actions:
        if isinstance(match, HttpMatch):
            reads_path = _reads_path(match)
            always = not reads_path and match.method is None
            always = always and not match.headers and not match.query
            path |= reads_path
            method |= match.method is not None
            query.update(dict.fromkeys(q.name for q in match.query))
        else:
            always = match.service is None and match.method is None and not match.headers
            service |= match.service is not None
            grpc_method |= match.method is not None
        headers.update(dict.fromkeys(h.name for h in match.headers))
        if always:
            read = path or method or service or grpc_method or headers or query
            return Shape(path, method, tuple(headers), tuple(query), service, grpc_method,
                         None if read else action)  # fmt: skip
    if not actions:
        return Shape(fixed=none)
    return Shape(path, method, tuple(headers), tuple(query), service, grpc_method)


class DecisionCache:
    """The decisions of one route table, by (attached routes, request fields read); at most
    ``cap`` entries (emptied when full). ``emptied`` counts how often that happened."""

    __slots__ = ("cap", "emptied", "entries")

    def __init__(self, cap: int = DECISIONS) -> None:
        self.entries: dict[tuple[object, ...], Chosen] = {}
        self.cap = cap
        self.emptied = 0

    def keep(self, key: tuple[object, ...], decision: Chosen) -> None:
        if len(self.entries) >= self.cap:
            self.entries.clear()
            self.emptied += 1
        if self.cap:
            self.entries[key] = decision


class PortRoutes:
    """The routes that apply to one client namespace's requests to one Service port (its
    consumer routes, else the producer's), deciding through the table's ``DecisionCache``.
    ``http``/``grpc`` answer what ``RouteTable.http``/``grpc`` answer for the same request."""

    __slots__ = ("_cache", "_grpc", "_http")

    def __init__(self, http: Attached | None, grpc: Attached | None, cache: DecisionCache) -> None:
        self._http = http
        self._grpc = grpc
        self._cache = cache

    @property
    def routes_http(self) -> bool:
        """Any route on the port for this client's HTTP requests (else ``http`` answers None
        whatever the request, so it need not be made)."""
        return self._http is not None

    def http(self, request: HttpRequest) -> Decision:
        """The rule an HTTP request takes (``None``: no route on the port for this client)."""
        attached = self._http
        return None if attached is None else self._decided(attached, request)

    def grpc(self, request: GrpcRequest) -> Decision:
        """The rule a gRPC call takes: the port's GRPCRoutes, else its HTTPRoutes."""
        attached = self._grpc
        if attached is not None:
            return self._decided(attached, request)
        http = self._http
        if http is None:
            return None
        if http.shape.fixed is not None:  # no need to make the call's HTTP request
            return http.shape.fixed
        return self._decided(http, request.as_http())

    def _decided(self, attached: Attached, request: HttpRequest | GrpcRequest) -> Chosen:
        """``attached``'s decision for ``request``: fixed, kept, or walked (and kept)."""
        fixed = attached.shape.fixed
        if fixed is not None:
            return fixed
        key = _key(attached, request)
        decision = None if key is None else self._cache.entries.get(key)
        if decision is None:
            if isinstance(request, GrpcRequest):
                decision = attached.first_grpc(request)
            else:
                decision = attached.first_http(request)
            if key is not None:
                self._cache.keep(key, decision)
        return decision


def _key(attached: Attached, request: HttpRequest | GrpcRequest) -> tuple[object, ...] | None:
    """``attached`` and the fields of ``request`` its matches read (``Shape``); ``None`` when
    they are too long to keep."""
    shape = attached.shape
    fields: list[str | None] = []
    if isinstance(request, GrpcRequest):
        if shape.service:
            fields.append(request.service)
        if shape.grpc_method:
            fields.append(request.method)
    else:
        if shape.path:
            fields.append(request.path)
        if shape.method:
            fields.append(request.method)
        for name in shape.query:
            fields.append(request.query_param(name))
    for name in shape.headers:
        fields.append(request.header(name))
    size = 0
    for value in fields:
        if value is not None:
            size += len(value)
    return (attached, *fields) if size <= MAX_KEY_CHARS else None
