"""A route's spec, checked and compiled: all of it or none of it.

Why all-or-nothing: a route with one rule dropped (a bad regex, a filter this mesh does not
implement) would still send traffic, but not where its author said; a canary meant to receive
only ``x-canary`` requests could receive everything. So any value nodemesh cannot honour rejects
the whole route with ``Accepted=False``, the field's path and the fix; the route is then absent
from the routing table, as if it did not exist.

Backend references are the exception the Gateway API itself makes: a ``backendRef`` to a
Service that does not exist or lacks the named port (``BackendNotFound``) or of another kind
(``InvalidKind``) leaves the route accepted with ``ResolvedRefs=False``, and the share of
requests its weight would have received is answered with 500, never moved to the other
backends.

A ``backendRef`` may name a Service in any namespace, with no ReferenceGrant: GEP-1294 lets
mesh routes do so unless the mesh would thereby reach "a broader scope than would otherwise be
reachable", and nodemesh does not: a routed request travels with the client pod's own identity
(its certificate on the HBONE stream, its IP on a same-node connection) and meets the
backend's authorization and rate limits as if the client had dialled that Service itself,
which it may. So ``RefNotPermitted`` is never reported, and ReferenceGrants are not read.

The spec's ``PartiallyInvalid`` approaches (drop the invalid rules, or fall back to the last
good version) are not taken: a route with any invalid rule is refused whole, for the reason
above, and ``PartiallyInvalid`` is never set.

``hostnames`` is read but not matched: a mesh route applies to the Service the client
connected to, whatever ``Host`` says (GAMMA; conformance ``MeshFrontendHostname``).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from agent.policy.routes.durations import parse_gateway_duration
from agent.policy.routes.faults import GROUP as FAULT_GROUP
from agent.policy.routes.faults import KIND as FAULT_KIND
from agent.policy.routes.faults import HttpFault
from agent.policy.routes.model import (
    EXACT,
    GRPC_ROUTE,
    HTTP_ROUTE,
    PATH_PREFIX,
    REGEX,
    Backend,
    FaultRef,
    Filters,
    GrpcMatch,
    HeaderModifier,
    HttpMatch,
    Mirror,
    NamedMatch,
    ParentRef,
    PathMatch,
    PathModifier,
    Redirect,
    Regex,
    Retry,
    Rewrite,
    Route,
    RouteKey,
    Rule,
    ServiceKey,
    StringMatch,
    Timeouts,
)
from agent.state.model import RouteObject, Service

UNSUPPORTED = "UnsupportedValue"
INCOMPATIBLE_FILTERS = (
    "IncompatibleFilters"  # the spec's reason for filters that exclude each other
)
BACKEND_NOT_FOUND = "BackendNotFound"
INVALID_KIND = "InvalidKind"
FILTER_NOT_FOUND = "FilterNotFound"  # an ExtensionRef's object does not exist

MAX_MATCHES = 128  # across all rules of a route (the spec's CEL rule)
MAX_RETRY_ATTEMPTS = 1000  # nodemesh's bound on HTTPRouteRetry.attempts (the API sets none)
METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH")
REDIRECT_CODES = (301, 302, 303, 307, 308)
# Filter type -> the field holding its configuration.
FILTER_FIELDS = {
    "RequestHeaderModifier": "requestHeaderModifier",
    "ResponseHeaderModifier": "responseHeaderModifier",
    "RequestRedirect": "requestRedirect",
    "URLRewrite": "urlRewrite",
    "RequestMirror": "requestMirror",
    "ExtensionRef": "extensionRef",
}
HTTP_FILTERS = tuple(FILTER_FIELDS)
GRPC_FILTERS = ("RequestHeaderModifier", "ResponseHeaderModifier", "RequestMirror", "ExtensionRef")
_RULE_KEYS = {
    HTTP_ROUTE: ("name", "matches", "filters", "backendRefs", "timeouts", "retry"),
    GRPC_ROUTE: ("name", "matches", "filters", "backendRefs"),
}
# Headers that frame the message or belong to one connection: a modifier changing them would
# make the proxy send a body its head does not describe (or steer the hop itself).
_FIXED_HEADERS = frozenset(
    {
        "content-length",
        "transfer-encoding",
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "upgrade",
    }
)
_HEADER_NAME = re.compile(r"^[A-Za-z0-9!#$%&'*+\-.^_`|~]+$")
# What a header value may not hold (RFC 9110 5.5): control characters but HTAB, and DEL
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
# The Gateway API's checks on an Exact or PathPrefix value (HTTPPathMatch's CEL rules): the
# characters of an RFC 3986 path, no empty, dot or encoded-slash segment, no query or fragment.
_PATH_CHARS = re.compile(r"^(?:[-A-Za-z0-9/._~!$&'()*+,;=:@]|%[0-9a-fA-F]{2})+$")
_PATH_FORBIDDEN = ("//", "/./", "/../", "%2f", "%2F", "#")
# GRPCMethodMatch's CEL rules for Exact: a protobuf service and method name (no ``/``).
_GRPC_SERVICE = re.compile(r"^\.?[a-zA-Z_][a-zA-Z_0-9]*(\.[a-zA-Z_][a-zA-Z_0-9]*)*$")
_GRPC_METHOD = re.compile(r"^[A-Za-z_][A-Za-z_0-9]*$")
# SectionName (a rule's ``name``) and PreciseHostname (a redirect's or rewrite's ``hostname``).
_SECTION_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_HOSTNAME = _SECTION_NAME

T = TypeVar("T")


class RouteError(ValueError):
    """Why a route cannot be honoured: the field's path in the spec, the fix, and the
    ``Accepted`` reason it gives (``UnsupportedValue`` unless filters conflict)."""

    def __init__(self, path: str, message: str, reason: str = UNSUPPORTED) -> None:
        super().__init__(f"{path}: {message}")
        self.path = path
        self.message = message
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Rejected:
    """A route refused as a whole (``Accepted=False``, reason ``error.reason``)."""

    kind: str
    namespace: str
    name: str
    parents: tuple[ParentRef, ...]
    error: RouteError

    @property
    def key(self) -> RouteKey:
        return (self.kind, self.namespace, self.name)


Compiled = Route | Rejected


@dataclass(slots=True)
class _Context:
    """What the parsers of one route share: the route, its parents, the Services, and the
    backend references found unusable so far."""

    obj: RouteObject
    parents: tuple[ParentRef, ...]
    services: Mapping[ServiceKey, Service]
    unresolved: list[str]
    faults: Mapping[tuple[str, str], HttpFault]


def compile_route(
    obj: RouteObject,
    services: Mapping[ServiceKey, Service],
    faults: Mapping[tuple[str, str], HttpFault] | None = None,
) -> Compiled:
    """Check and compile one route against the Services and the HTTPFaults (by namespace and
    name) it names."""
    parents: tuple[ParentRef, ...] = ()
    try:
        spec = _mapping(obj.spec, "spec")
        _keys(spec, "spec", ("parentRefs", "hostnames", "rules"))
        parents = _parents(spec.get("parentRefs"), obj.namespace)
        _list(spec.get("hostnames", []), "spec.hostnames")
        ctx = _Context(obj, parents, services, [], faults or {})
        rules = tuple(
            _rule(ctx, i, r) for i, r in enumerate(_list(spec.get("rules", [{}]), "spec.rules"))
        )
        if obj.kind == HTTP_ROUTE and not rules:  # the API's MinItems=1
            raise RouteError(
                "spec.rules",
                "is empty, so every request would be answered 404; leave it out for the "
                "default (every request to the parent Service) or give it a rule",
            )
        _unique_names(rules)
        if sum(len(rule.matches) for rule in rules) > MAX_MATCHES:
            raise RouteError(
                "spec.rules",
                f"has more than {MAX_MATCHES} matches in all; the Gateway API allows at most "
                f"{MAX_MATCHES} per route (split it into several routes)",
            )
    except RouteError as e:
        return Rejected(obj.kind, obj.namespace, obj.name, parents, e)
    return Route(
        obj.kind, obj.namespace, obj.name, obj.created, parents, rules, tuple(ctx.unresolved)
    )


# -- shapes ----------------------------------------------------------------------------------
def _mapping(value: object, path: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise RouteError(path, f"expected a mapping, got {type(value).__name__}")
    return value


def _list(value: object, path: str, most: int = 16) -> Sequence[Any]:
    """A list of at most ``most`` items: the API's ``MaxItems`` (16 for most route lists),
    which the lab, without an API server, would not otherwise enforce. They bound the
    sorted matches every request walks."""
    if not isinstance(value, list | tuple):
        raise RouteError(path, f"expected a list, got {type(value).__name__}")
    if len(value) > most:
        raise RouteError(path, f"has {len(value)} items; the Gateway API allows at most {most}")
    return value


def _keys(value: Mapping[str, Any], path: str, allowed: Sequence[str]) -> None:
    for key in value:
        if key not in allowed:
            raise RouteError(
                f"{path}.{key}",
                f"is not supported by nodemesh; remove it (supported here: {', '.join(allowed)})",
            )


def _str(value: object, path: str) -> str:
    if not isinstance(value, str) or not value:
        raise RouteError(path, "expected a non-empty string")
    return value


def _int(value: object, path: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise RouteError(path, f"expected an integer from {low} to {high}, got {value!r}")
    return value


def _each(
    values: object, path: str, parse: Callable[[Any, str], T], most: int = 16
) -> tuple[T, ...]:
    return tuple(parse(v, f"{path}[{i}]") for i, v in enumerate(_list(values, path, most)))


def _regex(value: str, path: str) -> Regex:
    """RE2, as Envoy-based meshes read ``RegularExpression``: linear in the text, so a client
    cannot make a match backtrack; constructs RE2 lacks (lookaround, backreferences) are
    refused here rather than at the first request. Imported here, at the first regex match a
    route asks for: the RE2 library adds 2.6 MiB to every agent, most of which see none."""
    import re2

    options = re2.Options()
    options.log_errors = False  # the error is the route's status, not a line on stderr
    try:
        compiled: Regex = re2.compile(value, options=options)
    except re2.error as e:
        reason = e.args[0].decode() if e.args and isinstance(e.args[0], bytes) else str(e)
        raise RouteError(
            path, f"invalid regular expression {value!r} (RE2 syntax): {reason}"
        ) from e
    return compiled


# -- parents ---------------------------------------------------------------------------------
def _parents(values: object, namespace: str) -> tuple[ParentRef, ...]:
    """The Service parents (GAMMA); a Gateway parent belongs to another controller."""
    out = []
    for i, ref in enumerate(_list(values or [], "spec.parentRefs", 32)):
        path = f"spec.parentRefs[{i}]"
        ref = _mapping(ref, path)
        if (ref.get("group", "gateway.networking.k8s.io"), ref.get("kind", "Gateway")) != (
            "",
            "Service",
        ):
            continue
        port, section = ref.get("port"), ref.get("sectionName")
        out.append(
            ParentRef(
                str(ref.get("namespace") or namespace),
                _str(ref.get("name"), f"{path}.name"),
                None if port is None else _int(port, f"{path}.port", 1, 65535),
                None if section is None else _str(section, f"{path}.sectionName"),
            )
        )
    return tuple(out)


# -- rules -----------------------------------------------------------------------------------
def _unique_names(rules: Sequence[Rule]) -> None:
    """A rule's ``name`` must be unique within its route (the spec's CEL rule): it is how
    status, telemetry and policies name one rule."""
    seen: dict[str, int] = {}
    for rule in rules:
        if not rule.name:
            continue
        if rule.name in seen:
            raise RouteError(
                f"spec.rules[{rule.index}].name",
                f"{rule.name!r} is also the name of spec.rules[{seen[rule.name]}]; "
                "give each rule its own name",
            )
        seen[rule.name] = rule.index


def _rule_name(value: object, path: str) -> str:
    if value is None:
        return ""
    name = _str(value, path)
    if len(name) > 253 or not _SECTION_NAME.fullmatch(name):
        raise RouteError(
            path, f"{name!r} is not a valid rule name (lower-case letters, digits, '-' and '.')"
        )
    return name


def _rule(ctx: _Context, index: int, value: object) -> Rule:
    obj = ctx.obj
    path = f"spec.rules[{index}]"
    rule = _mapping(value, path)
    if obj.kind == GRPC_ROUTE:
        for key in ("timeouts", "retry"):  # HTTPRoute fields an Istio user reaches for first
            if key in rule:
                raise RouteError(
                    f"{path}.{key}",
                    f"GRPCRoute has no {key}: remove it and attach an HTTPRoute with the {key} to "
                    "the same Service port (it sees each call as POST /package.Service/Method)",
                )
    _keys(rule, path, _RULE_KEYS[obj.kind])
    match_path = f"{path}.matches"
    matches: tuple[HttpMatch, ...] | tuple[GrpcMatch, ...]
    if obj.kind == HTTP_ROUTE:
        matches = _each(rule.get("matches") or [{}], match_path, _http_match, 64)
    else:
        matches = _each(rule.get("matches") or [{}], match_path, _grpc_match, 64)
    backends = tuple(
        _backend(ctx, b, f"{path}.backendRefs[{i}]")
        for i, b in enumerate(_list(rule.get("backendRefs", []), f"{path}.backendRefs"))
    )
    filters = _filters(ctx, rule.get("filters", []), f"{path}.filters")
    _check_combination(filters, backends, matches, path)
    return Rule(
        index,
        matches,
        backends,
        filters,
        _timeouts(rule.get("timeouts"), f"{path}.timeouts"),
        _retry(rule.get("retry"), f"{path}.retry"),
        _rule_name(rule.get("name"), f"{path}.name"),
    )


def _check_combination(
    filters: Filters,
    backends: tuple[Backend, ...],
    matches: tuple[HttpMatch, ...] | tuple[GrpcMatch, ...],
    path: str,
) -> None:
    if filters.redirect is not None and filters.rewrite is not None:
        raise RouteError(
            f"{path}.filters",
            "RequestRedirect and URLRewrite exclude each other",
            INCOMPATIBLE_FILTERS,
        )
    if filters.redirect is not None and backends:
        raise RouteError(
            f"{path}.backendRefs", "a rule with RequestRedirect answers itself; remove its backends"
        )
    for f in (filters.redirect, filters.rewrite):
        if f is None or f.path is None or f.path.kind != "ReplacePrefixMatch":
            continue
        if not all(isinstance(m, HttpMatch) and m.path.kind == PATH_PREFIX for m in matches):
            raise RouteError(
                f"{path}.filters",
                "ReplacePrefixMatch needs every match of the rule to be a PathPrefix path match",
            )


def _http_match(value: object, path: str) -> HttpMatch:
    match = _mapping(value, path)
    _keys(match, path, ("path", "headers", "queryParams", "method"))
    method = match.get("method")
    if method is not None and method not in METHODS:
        raise RouteError(f"{path}.method", f"{method!r} is not one of {', '.join(METHODS)}")
    return HttpMatch(
        _path_match(match.get("path"), f"{path}.path"),
        method,
        _named_matches(match.get("headers", []), f"{path}.headers", header=True),
        _named_matches(match.get("queryParams", []), f"{path}.queryParams", header=False),
    )


def _path_match(value: object, path: str) -> PathMatch:
    if value is None:
        return PathMatch(PATH_PREFIX, "/")
    match = _mapping(value, path)
    _keys(match, path, ("type", "value"))
    kind = match.get("type", PATH_PREFIX)
    text = _str(match.get("value", "/"), f"{path}.value")
    if kind == REGEX:
        return PathMatch(REGEX, text, _regex(text, f"{path}.value"))
    if kind not in (EXACT, PATH_PREFIX):
        raise RouteError(f"{path}.type", f"{kind!r}: use Exact, PathPrefix or RegularExpression")
    if (
        not text.startswith("/")
        or any(s in text for s in _PATH_FORBIDDEN)
        or text.endswith(("/.", "/.."))
        or not _PATH_CHARS.fullmatch(text)
    ):
        raise RouteError(
            f"{path}.value",
            f"{text!r} must be an absolute path of URL path characters (percent-encoded "
            "otherwise), without //, /./, /../, %2F, a trailing /. or /.., ? or #",
        )
    return PathMatch(kind, text)


def _string_match(kind: object, value: object, path: str) -> StringMatch:
    text = _str(value, path)
    if kind == REGEX:
        return StringMatch(REGEX, text, _regex(text, path))
    if kind != EXACT:
        raise RouteError(path, f"match type {kind!r}: use Exact or RegularExpression")
    return StringMatch(EXACT, text)


def _named_matches(values: object, path: str, *, header: bool) -> tuple[NamedMatch, ...]:
    """Header names compare case-insensitively, query parameter names exactly; a repeated
    name counts once (the first)."""
    out: dict[str, NamedMatch] = {}
    for i, value in enumerate(_list(values, path)):
        item_path = f"{path}[{i}]"
        item = _mapping(value, item_path)
        _keys(item, item_path, ("type", "name", "value"))
        name = _str(item.get("name"), f"{item_path}.name")
        if not _HEADER_NAME.fullmatch(name):  # a query parameter's name has the same type
            what = "header" if header else "query parameter"
            raise RouteError(f"{item_path}.name", f"{name!r} is not a valid {what} name")
        if header:
            name = name.lower()
        kind = item.get("type", EXACT)
        out.setdefault(name, NamedMatch(name, _string_match(kind, item.get("value"), item_path)))
    return tuple(out.values())


def _grpc_match(value: object, path: str) -> GrpcMatch:
    match = _mapping(value, path)
    _keys(match, path, ("method", "headers"))
    service = method = None
    if match.get("method") is not None:
        mpath = f"{path}.method"
        m = _mapping(match["method"], mpath)
        _keys(m, mpath, ("type", "service", "method"))
        kind = m.get("type", EXACT)
        if m.get("service") is None and m.get("method") is None:
            raise RouteError(mpath, "set service, method or both")
        if m.get("service") is not None:
            service = _string_match(kind, m["service"], f"{mpath}.service")
            _grpc_name(service, _GRPC_SERVICE, f"{mpath}.service", "package.Service")
        if m.get("method") is not None:
            method = _string_match(kind, m["method"], f"{mpath}.method")
            _grpc_name(method, _GRPC_METHOD, f"{mpath}.method", "Method")
    headers = _named_matches(match.get("headers", []), f"{path}.headers", header=True)
    return GrpcMatch(service, method, headers)


def _grpc_name(match: StringMatch, form: re.Pattern[str], path: str, example: str) -> None:
    """An Exact service or method must be a protobuf name: one with ``/`` or a space would
    never equal a call's, and the route would silently match nothing."""
    if match.kind == EXACT and not form.fullmatch(match.value):
        raise RouteError(
            path,
            f"{match.value!r} is not a gRPC name (letters, digits, _ and, for a service, "
            f"dots: e.g. {example}); use type RegularExpression for a pattern",
        )


# -- backends and filters -------------------------------------------------------------------
def _backend(ctx: _Context, value: object, path: str, *, weighted: bool = True) -> Backend:
    obj, unresolved = ctx.obj, ctx.unresolved
    ref = _mapping(value, path)
    allowed = ("group", "kind", "name", "namespace", "port", "weight", "filters")
    _keys(ref, path, allowed if weighted else allowed[:-2])
    modifiers = _backend_filters(ref.get("filters", []), f"{path}.filters")
    name = _str(ref.get("name"), f"{path}.name")
    namespace = str(ref.get("namespace") or obj.namespace)
    weight = _int(ref.get("weight", 1), f"{path}.weight", 0, 1_000_000) if weighted else 1
    group, kind = ref.get("group", ""), ref.get("kind", "Service")
    if (group, kind) != ("", "Service"):
        unresolved.append(
            f"{INVALID_KIND}: {path} is a {group or 'core'}/{kind}; only Services are backends"
        )
        return Backend(namespace, name, 0, weight, resolved=False)
    port = _int(ref.get("port"), f"{path}.port", 1, 65535)
    backend = Backend(namespace, name, port, weight)
    service = ctx.services.get(backend.service)  # in any namespace (GEP-1294: module docstring)
    if service is None:
        unresolved.append(
            f"{BACKEND_NOT_FOUND}: {path} names Service {namespace}/{name}, which does not exist"
        )
        return Backend(namespace, name, port, weight, resolved=False)
    if all(p.port != port for p in service.ports):
        # The data path can only answer 500 for it (no port to send to): say so in status.
        ports = ", ".join(str(p.port) for p in service.ports) or "none"
        unresolved.append(
            f"{BACKEND_NOT_FOUND}: {path} names port {port} of Service {namespace}/{name}, "
            f"which has no such port (its ports: {ports})"
        )
        return Backend(namespace, name, port, weight, resolved=False)
    return dataclasses.replace(backend, request_headers=modifiers[0], response_headers=modifiers[1])


_BACKEND_FILTERS = ("RequestHeaderModifier", "ResponseHeaderModifier")


def _backend_filters(
    values: object, path: str
) -> tuple[HeaderModifier | None, HeaderModifier | None]:
    """A backendRef's own ``filters``: the header modifiers (the mesh conformance feature
    ``MeshHTTPRouteBackendRequestHeaderModification``). Other filters there are refused: a
    redirect, rewrite or mirror per backend would need the choice of backend to come before
    the rule's own filters."""
    found: dict[str, HeaderModifier] = {}
    for i, value in enumerate(_list(values, path)):
        fpath = f"{path}[{i}]"
        f = _mapping(value, fpath)
        kind = f.get("type")
        if kind not in _BACKEND_FILTERS:
            raise RouteError(
                f"{fpath}.type",
                f"filter {kind!r} on a backendRef is not supported by nodemesh (only "
                f"{' and '.join(_BACKEND_FILTERS)}); put it in the rule's filters",
            )
        field = FILTER_FIELDS[kind]
        _keys(f, fpath, ("type", field))
        if kind in found:
            raise RouteError(
                f"{fpath}.type", f"{kind} may appear once per backendRef", INCOMPATIBLE_FILTERS
            )
        found[kind] = _header_modifier(
            _mapping(f.get(field), f"{fpath}.{field}"), f"{fpath}.{field}"
        )
    return found.get(_BACKEND_FILTERS[0]), found.get(_BACKEND_FILTERS[1])


def _filters(ctx: _Context, values: object, path: str) -> Filters:
    obj = ctx.obj
    allowed = HTTP_FILTERS if obj.kind == HTTP_ROUTE else GRPC_FILTERS
    found: dict[str, Any] = {}
    mirrors = []
    for i, value in enumerate(_list(values, path)):
        fpath = f"{path}[{i}]"
        f = _mapping(value, fpath)
        kind = f.get("type")
        if not isinstance(kind, str) or kind not in allowed:
            raise RouteError(
                f"{fpath}.type",
                f"filter {kind!r} is not supported by nodemesh on a {obj.kind}; "
                f"use {', '.join(allowed)}",
            )
        field = FILTER_FIELDS[kind]
        _keys(f, fpath, ("type", field))
        body = _mapping(f.get(field), f"{fpath}.{field}")
        if kind == "RequestMirror":
            mirrors.append(_mirror(ctx, body, f"{fpath}.{field}"))
            continue
        if kind in found:
            raise RouteError(
                f"{fpath}.type", f"{kind} may appear once per rule", INCOMPATIBLE_FILTERS
            )
        if kind == "ExtensionRef":
            found[kind] = _fault_ref(ctx, body, f"{fpath}.{field}")
            continue
        found[kind] = _FILTER_PARSERS[kind](body, f"{fpath}.{field}")
    return Filters(
        found.get("RequestHeaderModifier"),
        found.get("ResponseHeaderModifier"),
        found.get("RequestRedirect"),
        found.get("URLRewrite"),
        tuple(mirrors),
        found.get("ExtensionRef"),
    )


def _fault_ref(ctx: _Context, body: Mapping[str, Any], path: str) -> FaultRef:
    """An ExtensionRef: only ``nodemesh.io`` HTTPFault, in the route's namespace (the Gateway
    API's LocalObjectReference). A missing object leaves the route accepted with
    ``ResolvedRefs=False``; the rule's requests are answered 500, never passed unfaulted."""
    _keys(body, path, ("group", "kind", "name"))
    group, kind = body.get("group"), body.get("kind")
    if (group, kind) != (FAULT_GROUP, FAULT_KIND):
        raise RouteError(
            path,
            f"ExtensionRef to {group}/{kind} is not supported by nodemesh; the one extension "
            f"filter is group {FAULT_GROUP}, kind {FAULT_KIND}",
        )
    name = _str(body.get("name"), f"{path}.name")
    fault = ctx.faults.get((ctx.obj.namespace, name))
    if fault is None:
        ctx.unresolved.append(
            f"{FILTER_NOT_FOUND}: {path} names {FAULT_KIND} {ctx.obj.namespace}/{name}, which "
            "does not exist; the rule's requests are answered 500 until it does"
        )
    elif fault.abort_grpc_status is not None and ctx.obj.kind == HTTP_ROUTE:
        raise RouteError(
            f"{path}.name",
            f"{FAULT_KIND} {fault.name} aborts with grpcStatus, which an HTTPRoute cannot "
            "answer; use abort.httpStatus, or name it from a GRPCRoute",
        )
    return FaultRef(ctx.obj.namespace, name, fault)


def _header_modifier(body: Mapping[str, Any], path: str) -> HeaderModifier:
    _keys(body, path, ("set", "add", "remove"))

    def pairs(key: str) -> tuple[tuple[str, str], ...]:
        out = []
        for i, item in enumerate(_list(body.get(key, []), f"{path}.{key}")):
            ipath = f"{path}.{key}[{i}]"
            item = _mapping(item, ipath)
            _keys(item, ipath, ("name", "value"))
            name = _str(item.get("name"), f"{ipath}.name")
            if not _HEADER_NAME.fullmatch(name):
                raise RouteError(f"{ipath}.name", f"{name!r} is not a valid header name")
            _modifiable(name, f"{ipath}.name")
            value = item.get("value")
            if not isinstance(value, str) or _CONTROL.search(value):
                # RFC 9110 5.5: a value the peer's parser (llhttp, Envoy) refuses 400, as the
                # far node's would, so that every request the rule edits would fail
                raise RouteError(
                    f"{ipath}.value", "expected a string without control characters (tab aside)"
                )
            out.append((name.lower(), value))
        return tuple(out)

    remove = tuple(
        _modifiable(_str(n, f"{path}.remove[{i}]").lower(), f"{path}.remove[{i}]")
        for i, n in enumerate(_list(body.get("remove", []), f"{path}.remove"))
    )
    return HeaderModifier(pairs("set"), pairs("add"), remove)


def _modifiable(name: str, path: str) -> str:
    if name.lower() in _FIXED_HEADERS:
        raise RouteError(
            path,
            f"{name!r} frames the message or belongs to the connection; the proxy sets it, "
            "so a header modifier may not: remove it from the filter",
        )
    return name


def _path_modifier(value: object, path: str) -> PathModifier | None:
    if value is None:
        return None
    body = _mapping(value, path)
    _keys(body, path, ("type", "replaceFullPath", "replacePrefixMatch"))
    kind = body.get("type")
    if kind not in ("ReplaceFullPath", "ReplacePrefixMatch"):
        raise RouteError(f"{path}.type", f"{kind!r}: use ReplaceFullPath or ReplacePrefixMatch")
    field = kind[0].lower() + kind[1:]
    text = body.get(field)
    # The spec's ReplacePrefixMatch table takes an empty replacement: /foo/bar -> /bar.
    if text == "" and kind == "ReplacePrefixMatch":
        return PathModifier(kind, text)
    # The value becomes a request target or a Location header: URL path characters only
    # (percent-encode others), so it can neither break the head nor carry a query.
    if not isinstance(text, str) or not text.startswith("/") or not _PATH_CHARS.fullmatch(text):
        raise RouteError(
            f"{path}.{field}",
            "set it to an absolute path (starting with /) of URL path characters "
            "(percent-encode others)",
        )
    return PathModifier(kind, text)


def _hostname(value: object, path: str) -> str | None:
    """A PreciseHostname: it becomes ``Host`` or part of ``Location``, so it must be a DNS
    name (lower case, no port, no wildcard)."""
    if value is None:
        return None
    text = _str(value, path)
    if len(text) > 253 or not _HOSTNAME.fullmatch(text):
        raise RouteError(
            path, f"{text!r} is not a hostname (lower-case DNS labels, no port or wildcard)"
        )
    return text


def _redirect(body: Mapping[str, Any], path: str) -> Redirect:
    _keys(body, path, ("scheme", "hostname", "path", "port", "statusCode"))
    scheme = body.get("scheme")
    if scheme is not None and scheme not in ("http", "https"):
        raise RouteError(f"{path}.scheme", f"{scheme!r}: use http or https")
    status = body.get("statusCode", 302)
    if status not in REDIRECT_CODES:
        raise RouteError(
            f"{path}.statusCode", f"{status!r}: use one of {', '.join(map(str, REDIRECT_CODES))}"
        )
    port = body.get("port")
    hostname = body.get("hostname")
    return Redirect(
        scheme,
        _hostname(hostname, f"{path}.hostname"),
        _path_modifier(body.get("path"), f"{path}.path"),
        None if port is None else _int(port, f"{path}.port", 1, 65535),
        status,
    )


def _rewrite(body: Mapping[str, Any], path: str) -> Rewrite:
    _keys(body, path, ("hostname", "path"))
    return Rewrite(
        _hostname(body.get("hostname"), f"{path}.hostname"),
        _path_modifier(body.get("path"), f"{path}.path"),
    )


def _mirror(ctx: _Context, body: Mapping[str, Any], path: str) -> Mirror:
    _keys(body, path, ("backendRef", "percent", "fraction"))
    backend = _backend(ctx, body.get("backendRef"), f"{path}.backendRef", weighted=False)
    percent = 100.0
    if "percent" in body and "fraction" in body:
        raise RouteError(path, "set percent or fraction, not both")
    if "percent" in body:
        percent = float(_int(body["percent"], f"{path}.percent", 0, 100))
    if "fraction" in body:
        fpath = f"{path}.fraction"
        fraction = _mapping(body["fraction"], fpath)
        _keys(fraction, fpath, ("numerator", "denominator"))
        denominator = _int(fraction.get("denominator", 100), f"{fpath}.denominator", 1, 2**31)
        numerator = _int(fraction.get("numerator"), f"{fpath}.numerator", 0, denominator)
        percent = 100.0 * numerator / denominator
    return Mirror(backend, percent)


_FILTER_PARSERS: Mapping[str, Callable[[Mapping[str, Any], str], object]] = {
    "RequestHeaderModifier": _header_modifier,
    "ResponseHeaderModifier": _header_modifier,
    "RequestRedirect": _redirect,
    "URLRewrite": _rewrite,
}


# -- timeouts and retry ----------------------------------------------------------------------
def _duration(value: object, path: str) -> float:
    try:
        return parse_gateway_duration(value)  # type: ignore[arg-type]
    except ValueError as e:
        raise RouteError(path, str(e)) from e


def _timeouts(value: object, path: str) -> Timeouts:
    if value is None:
        return Timeouts()
    body = _mapping(value, path)
    _keys(body, path, ("request", "backendRequest"))
    request = _duration(body["request"], f"{path}.request") if "request" in body else 0.0
    backend = (
        _duration(body["backendRequest"], f"{path}.backendRequest")
        if "backendRequest" in body
        else 0.0
    )
    if request and backend and backend > request:
        raise RouteError(
            f"{path}.backendRequest", "must not be longer than request (each attempt fits in it)"
        )
    return Timeouts(request or None, backend or None)


def _retry(value: object, path: str) -> Retry | None:
    if value is None:
        return None
    body = _mapping(value, path)
    _keys(body, path, ("codes", "attempts", "backoff"))
    codes = frozenset(
        _int(c, f"{path}.codes[{i}]", 400, 599)
        for i, c in enumerate(_list(body.get("codes", []), f"{path}.codes", 200))  # 400-599
    )
    backoff = body.get("backoff")
    return Retry(
        _attempts(body.get("attempts", 1), f"{path}.attempts"),
        codes,
        None if backoff is None else _duration(backoff, f"{path}.backoff"),
    )


def _attempts(value: object, path: str) -> int:
    """HTTPRouteRetry.attempts, at least 1 (the API's ``Minimum=1``): 0 would be a ``retry``
    that never retries, which the API server refuses; the lab, without one, would otherwise
    accept it and a reader of the route would believe requests are retried."""
    if value == 0 and not isinstance(value, bool):
        raise RouteError(
            path,
            f"is 0, but the Gateway API's minimum is 1 (valid: 1 to {MAX_RETRY_ATTEMPTS}); "
            "to not retry, remove the rule's retry",
        )
    return _int(value, path, 1, MAX_RETRY_ATTEMPTS)
