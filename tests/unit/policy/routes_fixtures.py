"""Snapshots with Services and Gateway API routes, for the route tests."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from agent.state import RouteObject, Service, ServicePort, StateStore
from agent.state.snapshot import Snapshot

NS = "gateway-conformance-mesh"


def svc(name: str, *ports: tuple[int, str], namespace: str = NS) -> Service:
    """A Service whose ports are (port, name); a name such as ``http`` declares HTTP."""
    return Service(
        name,
        namespace,
        ("10.96.0.1",),
        tuple(ServicePort(p, p, name=n) for p, n in ports or ((80, "http"),)),
    )


def route(
    name: str,
    rules: list[dict[str, Any]],
    *,
    kind: str = "HTTPRoute",
    namespace: str = NS,
    parents: list[dict[str, Any]] | None = None,
    created: str = "2026-01-01T00:00:00Z",
    extra: Mapping[str, Any] | None = None,
) -> RouteObject:
    spec: dict[str, Any] = {
        "parentRefs": parents
        if parents is not None
        else [{"group": "", "kind": "Service", "name": "echo", "port": 80}],
        "rules": rules,
        **(extra or {}),
    }
    return RouteObject(kind, namespace, name, spec, generation=1, uid=name, created=created)


def backend(name: str, port: int = 80, weight: int | None = None) -> dict[str, Any]:
    ref: dict[str, Any] = {"name": name, "port": port}
    if weight is not None:
        ref["weight"] = weight
    return ref


def snapshot(services: Iterable[Service], routes: Iterable[RouteObject]) -> Snapshot:
    store = StateStore()
    with store.update() as txn:
        for s in services:
            txn.put_service(s)
        for r in routes:
            txn.put_route(r)
    return store.snapshot()


def mesh_services() -> list[Service]:
    """The conformance mesh's Services: ``echo`` (the parent), ``echo-v1``, ``echo-v2``."""
    return [svc("echo"), svc("echo-v1"), svc("echo-v2")]
