"""What a compiled Gateway API route is made of, and what one request is matched with.

Compiled once per state version from the user's spec (``compile``), these records answer a
request without parsing anything: regular expressions are compiled, defaults are filled in,
durations are seconds. They are frozen because a route table is shared by every request of a
snapshot, on whatever task reads it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol
from urllib.parse import parse_qsl

from agent.policy.routes.faults import HttpFault

EXACT = "Exact"
PATH_PREFIX = "PathPrefix"
REGEX = "RegularExpression"

HTTP_ROUTE = "HTTPRoute"
GRPC_ROUTE = "GRPCRoute"
ROUTE_KINDS = (HTTP_ROUTE, GRPC_ROUTE)

RouteKey = tuple[str, str, str]  # kind, namespace, name
ServiceKey = tuple[str, str]  # namespace, name


class Regex(Protocol):
    """A compiled RE2 expression (``compile._regex``): linear time in the text it reads."""

    def fullmatch(self, text: str) -> object | None: ...


def _header(headers: Sequence[tuple[str, str]], name: str, authority: str) -> str | None:
    """All values of ``name`` joined by ``,`` (RFC 9110 §5.3), or ``None``. ``host`` is the
    authority when no ``host`` field was sent: HTTP/2 carries it as ``:authority`` (RFC 9113
    §8.3.1), and a route's ``host`` header match must not depend on the HTTP version."""
    values = [v for k, v in headers if k == name]
    if values:
        return ",".join(values)
    if name == "host" and authority:
        return authority
    return None


@dataclass(slots=True, unsafe_hash=True)
class HttpRequest:
    """The head of one HTTP request, as routing reads it.

    ``headers`` are (name, value) pairs with names in lower case (as h11 and h2 give them);
    ``query`` is the raw query string without its ``?``.

    Compared and hashed as a frozen one would be, but not frozen (nothing changes it once
    made; ``filters.rewrite_request`` makes a new one): one is made per request on the
    source's HTTP/1.1 and HTTP/2 paths, and a frozen dataclass's ``__init__`` sets each of
    its six fields through ``object.__setattr__``. As ``GrpcRequest`` below.
    """

    method: str
    path: str
    headers: Sequence[tuple[str, str]] = ()
    query: str = ""
    authority: str = ""
    scheme: str = "http"

    @classmethod
    def from_target(
        cls,
        method: str,
        target: str,
        headers: Sequence[tuple[str, str]] = (),
        *,
        authority: str = "",
        scheme: str = "http",
    ) -> HttpRequest:
        """From a request line's target (``/path?query``)."""
        path, _, query = target.partition("?")
        return cls(method, path or "/", headers, query, authority, scheme)

    def header(self, name: str) -> str | None:
        """All values of ``name`` joined by ``,`` (RFC 9110 §5.3), or ``None``."""
        return _header(self.headers, name, self.authority)

    def query_param(self, name: str) -> str | None:
        """The first value of a query parameter (the Gateway API leaves repeats undefined and
        encourages the first)."""
        for key, value in parse_qsl(self.query, keep_blank_values=True):
            if key == name:
                return value
        return None


@dataclass(slots=True, unsafe_hash=True)
class GrpcRequest:
    """A gRPC call: ``/service/method`` and its metadata (lower-case names).

    Compared and hashed as a frozen one would be, but not frozen (nothing changes it once
    made): one is made per call on the HTTP/2 source path, and a frozen dataclass's
    ``__init__`` sets each field through ``object.__setattr__`` (0.39 against 0.12 µs)."""

    service: str
    method: str
    headers: Sequence[tuple[str, str]] = ()
    authority: str = ""

    @classmethod
    def from_path(
        cls, path: str, headers: Sequence[tuple[str, str]] = (), *, authority: str = ""
    ) -> GrpcRequest | None:
        """From an HTTP/2 ``:path``; ``None`` when it is not ``/service/method``."""
        parts = path.split("/")
        if len(parts) != 3 or parts[0] or not parts[1] or not parts[2]:
            return None
        return cls(parts[1], parts[2], headers, authority)

    def header(self, name: str) -> str | None:
        return _header(self.headers, name, self.authority)

    def as_http(self) -> HttpRequest:
        """The same call as HTTPRoutes see it (a POST to ``/service/method``)."""
        path = f"/{self.service}/{self.method}"
        return HttpRequest("POST", path, self.headers, "", self.authority)


@dataclass(frozen=True, slots=True)
class StringMatch:
    """Exact or regular-expression (whole value) comparison of one string."""

    kind: str
    value: str
    regex: Regex | None = None

    def matches(self, text: str | None) -> bool:
        if text is None:
            return False
        if self.regex is not None:
            return self.regex.fullmatch(text) is not None
        return text == self.value


@dataclass(frozen=True, slots=True)
class NamedMatch:
    """A header or query parameter that must be present with a matching value."""

    name: str
    value: StringMatch


@dataclass(frozen=True, slots=True)
class PathMatch:
    kind: str
    value: str
    regex: Regex | None = None

    def matches(self, path: str) -> bool:
        if self.kind == EXACT:
            return path == self.value
        if self.kind == REGEX:
            return self.regex is not None and self.regex.fullmatch(path) is not None
        prefix = self.value.rstrip("/")  # element-wise: /abc matches /abc, /abc/, /abc/d
        return path == prefix or path.startswith(prefix + "/") or not prefix


@dataclass(frozen=True, slots=True)
class HttpMatch:
    """One entry of an HTTPRoute rule's ``matches``: every condition must hold."""

    path: PathMatch = PathMatch(PATH_PREFIX, "/")
    method: str | None = None
    headers: tuple[NamedMatch, ...] = ()
    query: tuple[NamedMatch, ...] = ()

    def matches(self, request: HttpRequest) -> bool:
        return (
            self.path.matches(request.path)
            and (self.method is None or self.method == request.method)
            and all(h.value.matches(request.header(h.name)) for h in self.headers)
            and all(q.value.matches(request.query_param(q.name)) for q in self.query)
        )


@dataclass(frozen=True, slots=True)
class GrpcMatch:
    """One entry of a GRPCRoute rule's ``matches``; no service/method matches every call."""

    service: StringMatch | None = None
    method: StringMatch | None = None
    headers: tuple[NamedMatch, ...] = ()

    def matches(self, request: GrpcRequest) -> bool:
        return (
            (self.service is None or self.service.matches(request.service))
            and (self.method is None or self.method.matches(request.method))
            and all(h.value.matches(request.header(h.name)) for h in self.headers)
        )


@dataclass(frozen=True, slots=True)
class Backend:
    """A weighted Service backend. ``resolved`` is false when the reference cannot be used
    (unknown Service, wrong kind, cross-namespace): its share of requests gets a 500, as the
    Gateway API requires, instead of being spread over the others. The header modifiers are
    the backendRef's own ``filters``, applied only to requests sent to it
    (``filters.for_backend``)."""

    namespace: str
    name: str
    port: int
    weight: int = 1
    resolved: bool = True
    request_headers: HeaderModifier | None = None
    response_headers: HeaderModifier | None = None

    @property
    def service(self) -> ServiceKey:
        return (self.namespace, self.name)


@dataclass(frozen=True, slots=True)
class HeaderModifier:
    """RequestHeaderModifier / ResponseHeaderModifier: names are lower case."""

    set: tuple[tuple[str, str], ...] = ()
    add: tuple[tuple[str, str], ...] = ()
    remove: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class PathModifier:
    """``ReplaceFullPath`` (``value`` is the new path) or ``ReplacePrefixMatch``."""

    kind: str
    value: str


@dataclass(frozen=True, slots=True)
class Redirect:
    scheme: str | None = None
    hostname: str | None = None
    path: PathModifier | None = None
    port: int | None = None
    status: int = 302


@dataclass(frozen=True, slots=True)
class Rewrite:
    hostname: str | None = None
    path: PathModifier | None = None


@dataclass(frozen=True, slots=True)
class Mirror:
    """Copy requests (fire and forget) to ``backend``, ``percent`` of them (0-100)."""

    backend: Backend
    percent: float = 100.0


@dataclass(frozen=True, slots=True)
class FaultRef:
    """An ``ExtensionRef`` filter naming a ``nodemesh.io`` HTTPFault; ``fault`` is None when
    the object does not exist (the rule answers 500 and ``ResolvedRefs`` says why)."""

    namespace: str
    name: str
    fault: HttpFault | None


@dataclass(frozen=True, slots=True)
class Filters:
    request_headers: HeaderModifier | None = None
    response_headers: HeaderModifier | None = None
    redirect: Redirect | None = None
    rewrite: Rewrite | None = None
    mirrors: tuple[Mirror, ...] = ()
    fault: FaultRef | None = None


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Seconds; ``None`` = no timeout (``0s`` in the spec also disables one)."""

    request: float | None = None
    backend_request: float | None = None


@dataclass(frozen=True, slots=True)
class Retry:
    """GEP-1731: retry up to ``attempts`` times on ``codes``, ``backoff`` seconds apart."""

    attempts: int = 1
    codes: frozenset[int] = frozenset()
    backoff: float | None = None


@dataclass(frozen=True, slots=True)
class Rule:
    """One rule of a route, compiled. ``matches`` holds ``HttpMatch`` or ``GrpcMatch``."""

    index: int
    matches: tuple[HttpMatch, ...] | tuple[GrpcMatch, ...]
    backends: tuple[Backend, ...]
    filters: Filters = Filters()
    timeouts: Timeouts = Timeouts()
    retry: Retry | None = None
    name: str = ""


@dataclass(frozen=True, slots=True)
class ParentRef:
    """A parentRef naming a Service (GAMMA); ``port`` ``None`` = every port."""

    namespace: str
    name: str
    port: int | None = None
    section: str | None = None

    def as_spec(self, route_namespace: str) -> dict[str, object]:
        """The ``parentRef`` as status repeats it (only the fields the user set, plus kind)."""
        out: dict[str, object] = {"group": "", "kind": "Service", "name": self.name}
        if self.namespace != route_namespace:
            out["namespace"] = self.namespace
        if self.port is not None:
            out["port"] = self.port
        if self.section is not None:
            out["sectionName"] = self.section
        return out


@dataclass(frozen=True, slots=True)
class Route:
    """A route that compiled: its parents and rules, plus what orders it among others."""

    kind: str
    namespace: str
    name: str
    created: str
    parents: tuple[ParentRef, ...]
    rules: tuple[Rule, ...]
    unresolved: tuple[str, ...] = field(default=())  # why a backendRef is not usable

    @property
    def key(self) -> RouteKey:
        return (self.kind, self.namespace, self.name)

    @property
    def age_order(self) -> tuple[str, str, str]:
        """Oldest first, then ``namespace/name`` alphabetically (the spec's tie-breakers).
        A route without a timestamp (the cluster document) sorts as oldest."""
        return (self.created, self.namespace, self.name)


@dataclass(frozen=True, slots=True)
class RouteAction:
    """What the chosen rule says to do with a request."""

    route: RouteKey
    rule: int
    backends: tuple[Backend, ...]
    filters: Filters
    timeouts: Timeouts
    retry: Retry | None
    match: HttpMatch | GrpcMatch | None = None  # the match that won (for ReplacePrefixMatch)


@dataclass(frozen=True, slots=True)
class NoMatchingRule:
    """Routes are attached to this Service port but none matched: answer 404 (HTTP) or
    ``UNIMPLEMENTED`` (gRPC), as the Gateway API requires."""

    routes: tuple[RouteKey, ...]


Decision = RouteAction | NoMatchingRule | None
