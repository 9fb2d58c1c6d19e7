"""Gateway API route manifests inside a cluster document (``routes:``).

Full ``gateway.networking.k8s.io/v1`` HTTPRoute and GRPCRoute manifests, as ``kubectl apply``
takes them, so a route tried in the lab applies to a cluster unchanged. A document is
all-or-nothing, so where the Kubernetes source would report a problem in the route's status
(a refused value, a Service that does not exist, a port not declared HTTP) the document is
refused instead, naming the field inside the manifest and the fix: the lab has no status to
show, and a route that silently does nothing there would be a trap.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any

from agent.policy.routes import ROUTE_KINDS, Rejected, RouteTable
from agent.policy.routes.compile import FILTER_NOT_FOUND
from agent.policy.routes.table import fault_objects
from agent.sources.fields import DocumentError, check_unique, type_name
from agent.state.model import PolicyObject, RouteObject, Service

API_VERSION = "gateway.networking.k8s.io/v1"
_KEYS = ("apiVersion", "kind", "metadata", "spec")


def _route(source: str, path: str, item: object) -> RouteObject:
    if not isinstance(item, Mapping):
        raise DocumentError(source, path, f"expected a route manifest, got {type_name(item)}")
    for key in item:
        if key not in _KEYS:
            raise DocumentError(source, f"{path}.{key}", f"unknown key; use {', '.join(_KEYS)}")
    if item.get("apiVersion") != API_VERSION:
        raise DocumentError(
            source, f"{path}.apiVersion", f"{item.get('apiVersion')!r}: use {API_VERSION}"
        )
    kind = item.get("kind")
    if kind not in ROUTE_KINDS:
        raise DocumentError(source, f"{path}.kind", f"{kind!r}: use {' or '.join(ROUTE_KINDS)}")
    meta = item.get("metadata")
    if not isinstance(meta, Mapping) or not isinstance(meta.get("name"), str) or not meta["name"]:
        raise DocumentError(source, f"{path}.metadata.name", "every route needs a name")
    spec = item.get("spec")
    if not isinstance(spec, Mapping):
        raise DocumentError(source, f"{path}.spec", f"expected a mapping, got {type_name(spec)}")
    namespace = str(meta.get("namespace") or "default")
    return RouteObject(str(kind), namespace, meta["name"], MappingProxyType(dict(spec)))


def parse_routes(
    source: str, items: list[tuple[str, object]]
) -> tuple[tuple[RouteObject, ...], tuple[Mapping[str, Any], ...]]:
    """The routes of a document, with the manifests as written; duplicates are refused."""
    routes = tuple(_route(source, path, item) for path, item in items)
    check_unique(
        source,
        "route",
        [(f"{path}.metadata.name", r.key) for (path, _), r in zip(items, routes, strict=True)],
    )
    return routes, tuple(item for _, item in items if isinstance(item, Mapping))


def check_routes(
    source: str,
    paths: Sequence[str],
    routes: Sequence[RouteObject],
    services: Sequence[Service],
    policies: Sequence[PolicyObject] = (),
) -> None:
    """Refuse the document if any route would not be programmed as written (the HTTPFaults
    its ExtensionRef filters name are among ``policies``)."""
    table = RouteTable.of(
        {r.key: r for r in routes}, {s.key: s for s in services}, fault_objects(policies)
    )
    for path, route in zip(paths, routes, strict=True):
        compiled = table.compiled[route.key]
        if isinstance(compiled, Rejected):
            raise DocumentError(source, f"{path}.{compiled.error.path}", compiled.error.message)
        if compiled.unresolved:
            first = compiled.unresolved[0]
            kind, section = (
                ("HTTPFault", "policies") if first.startswith(FILTER_NOT_FOUND) else
                ("Service", "services")
            )  # fmt: skip
            # Said for `nodemesh lab apply` (its usual reader) and for a cluster document.
            raise DocumentError(
                source,
                f"{path}.spec",
                f"{first} (apply the {kind} with the route, e.g. in the same file, or list it "
                f"under {section} in a cluster document; or fix the reference)",
            )
        for verdict in table.verdicts[route.key]:
            if not verdict.accepted.status:
                raise DocumentError(source, f"{path}.spec.parentRefs", verdict.accepted.message)
