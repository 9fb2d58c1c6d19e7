"""The route filters that change a request or answer it, as pure functions of the head.

The data path calls these with what it parsed and sends what they return; they never see a
socket or a body. Header names are lower case in and out (h11 and h2 both use lower case).

* Header modifiers: ``remove`` first, then ``set`` (replaces every value of the name), then
  ``add`` (appends a value), so a rule that sets and adds the same name sends both values.
* ``RequestRedirect``: the ``Location`` of a redirect. Unset parts keep the request's; a port
  comes from the filter, else the scheme's well-known port when the filter changes the scheme,
  else the Service port; it is left out of ``Location`` when it is the scheme's default (80 for
  http, 443 for https). The query string is kept.
* ``URLRewrite``: the request as forwarded (path and/or ``Host``), the query string kept.
* A backendRef's own header modifiers (``for_backend``) apply only when that backend is
  chosen: on the request after the rule's, on the response before the rule's (the request
  passes the rule, then the backend; the response comes back the other way).
* ``ReplacePrefixMatch`` replaces the matched ``PathPrefix`` element-wise (the spec's table:
  ``/foo`` → ``/xyz`` turns ``/foo/bar`` into ``/xyz/bar`` and ``/foo`` into ``/xyz``; an
  empty replacement strips the prefix, ``/foo/bar`` → ``/bar`` and ``/foo`` → ``/``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from agent.policy.routes.model import (
    Backend,
    HeaderModifier,
    HttpMatch,
    HttpRequest,
    PathModifier,
    Redirect,
    Rewrite,
    RouteAction,
)

DEFAULT_PORTS = {"http": 80, "https": 443}

Headers = list[tuple[str, str]]


def modify_headers(headers: Sequence[tuple[str, str]], modifier: HeaderModifier) -> Headers:
    """``headers`` after a Request/ResponseHeaderModifier."""
    drop = set(modifier.remove) | {name for name, _ in modifier.set}
    out = [(k, v) for k, v in headers if k not in drop]
    out.extend(modifier.set)
    out.extend(modifier.add)
    return out


def then(first: HeaderModifier | None, second: HeaderModifier | None) -> HeaderModifier | None:
    """One modifier doing what ``first`` then ``second`` do (``modify_headers`` removes, then
    sets, then adds): what ``second`` removes or sets replaces what ``first`` set or added."""
    if first is None or second is None:
        return second or first
    replaced = set(second.remove) | {name for name, _ in second.set}
    return HeaderModifier(
        tuple(h for h in first.set if h[0] not in replaced) + second.set,
        tuple(h for h in first.add if h[0] not in replaced) + second.add,
        tuple(dict.fromkeys(first.remove + second.remove)),
    )


def for_backend(action: RouteAction, backend: Backend) -> RouteAction:
    """The rule's action for a request sent to ``backend``, with its backendRef's header
    modifiers composed with the rule's."""
    if backend.request_headers is None and backend.response_headers is None:
        return action
    filters = dataclasses.replace(
        action.filters,
        request_headers=then(action.filters.request_headers, backend.request_headers),
        response_headers=then(backend.response_headers, action.filters.response_headers),
    )
    return dataclasses.replace(action, filters=filters)


def _replaced_path(path: str, modifier: PathModifier, match: HttpMatch | None) -> str:
    if modifier.kind == "ReplaceFullPath":
        return modifier.value
    prefix = match.path.value.rstrip("/") if match is not None else ""
    rest = path[len(prefix) :]
    if not rest:
        return modifier.value or "/"  # an empty replacement strips the prefix: /foo -> /
    return modifier.value.rstrip("/") + rest


def _host(authority: str) -> str:
    """The host part of a Host header (IPv6 literals keep their brackets)."""
    if authority.startswith("["):
        return authority.split("]", 1)[0] + "]"
    return authority.rsplit(":", 1)[0] if authority.count(":") == 1 else authority


def redirect_location(
    request: HttpRequest, redirect: Redirect, match: HttpMatch | None, *, service_port: int
) -> str:
    """The ``Location`` header of a RequestRedirect (its status is ``redirect.status``)."""
    scheme = redirect.scheme or request.scheme
    host = redirect.hostname or _host(request.authority)
    if redirect.port is not None:
        port = redirect.port
    elif redirect.scheme is not None:
        port = DEFAULT_PORTS[redirect.scheme]
    else:
        port = service_port
    netloc = host if DEFAULT_PORTS.get(scheme) == port else f"{host}:{port}"
    path = request.path
    if redirect.path is not None:
        path = _replaced_path(path, redirect.path, match)
    query = f"?{request.query}" if request.query else ""
    return f"{scheme}://{netloc}{path}{query}"


def rewrite_request(request: HttpRequest, rewrite: Rewrite, match: HttpMatch | None) -> HttpRequest:
    """The request as a URLRewrite forwards it (``authority`` is the new ``Host``)."""
    path = request.path
    if rewrite.path is not None:
        path = _replaced_path(path, rewrite.path, match)
    authority = rewrite.hostname or request.authority
    headers = request.headers
    if rewrite.hostname is not None:
        headers = modify_headers(headers, HeaderModifier(set=(("host", rewrite.hostname),)))
    return dataclasses.replace(request, path=path, authority=authority, headers=headers)
