"""What the kube source does with each resource's list and events (one class per resource).

Each handler writes the ``StateStore`` under the source's lock, so the seven reflector threads
still form a single writer. A relist (``replace``) is a whole-kind replacement in one
transaction, so objects deleted while the watch was down vanish and none is duplicated. An
invalid object keeps the previous valid version of the same object (never wiping good state) and
is handed to the ``Reporter``. Services and EndpointSlices arrive separately and are joined here:
a ``Service`` in the state carries the endpoints of all slices labelled with its name.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Protocol

from agent.policy.routes.faults import KIND as FAULT_KIND
from agent.sources import kubeobjects as ko
from agent.sources.kubeobjects import InvalidObject, Raw
from agent.state import Endpoint, Namespace, PolicyObject, RouteObject, Service, StateStore

ServiceKey = tuple[str, str]


class Reporter(Protocol):
    def report_invalid(self, obj: Raw, error: InvalidObject) -> None: ...

    def report_pod(self, obj: Raw, deleted: bool) -> None: ...

    def report_namespace(self, obj: Raw, deleted: bool) -> None: ...

    def report_policy(self, plural: str, obj: Raw, error: InvalidObject | None) -> None: ...

    def observe_route(self, kind: str, obj: Raw, deleted: bool) -> None: ...

    def report_routes(self) -> None: ...


class Context:
    """What every handler shares: the store, the writer lock, the reporter, the joins."""

    def __init__(self, store: StateStore, reporter: Reporter) -> None:
        self.store = store
        self.reporter = reporter
        self.lock = threading.Lock()
        self.services: dict[ServiceKey, Service] = {}  # without endpoints
        self.slice_owner: dict[tuple[str, str], ServiceKey] = {}  # (ns, slice) -> service
        self.slices: dict[ServiceKey, dict[str, tuple[Endpoint, ...]]] = {}
        self._reports: list[Callable[[], None]] = []
        self._routes_pending = False
        # A route's verdict depends on the Services: none is judged before their first list.
        self.services_listed = False

    @contextmanager
    def writing(self) -> Iterator[None]:
        """Hold the writer lock; reports queued meanwhile are sent after it is released, so a
        slow API server delays nobody's state update."""
        with self.lock:
            yield
            reports, self._reports = self._reports, []
            if self._routes_pending:
                self._routes_pending = False
                reports.append(self.reporter.report_routes)
        for report in reports:
            report()

    def invalid(self, obj: Raw, error: InvalidObject) -> None:
        self._reports.append(lambda: self.reporter.report_invalid(obj, error))

    def pod_seen(self, obj: Raw, deleted: bool = False) -> None:
        """A pod as it is now: the reporter warns of what its annotations say (once)."""
        self._reports.append(lambda: self.reporter.report_pod(obj, deleted))

    def namespace_seen(self, obj: Raw, deleted: bool = False) -> None:
        """A namespace as it is now: the reporter warns of a mesh label it cannot read."""
        self._reports.append(lambda: self.reporter.report_namespace(obj, deleted))

    def policy_verdict(self, plural: str, obj: Raw, error: InvalidObject | None) -> None:
        self._reports.append(lambda: self.reporter.report_policy(plural, obj, error))

    def routes_changed(self) -> None:
        """Routes or Services changed: the routes' status is re-evaluated after the write
        (once the Services were listed)."""
        self._routes_pending = self.services_listed

    def endpoints(self, key: ServiceKey) -> tuple[Endpoint, ...]:
        """The union of the service's slices; an IP in two slices (mid-move) counts once,
        ready if either says so."""
        by_ip: dict[str, Endpoint] = {}
        for endpoints in self.slices.get(key, {}).values():
            for ep in endpoints:
                if ep.ip not in by_ip or (ep.ready and not by_ip[ep.ip].ready):
                    by_ip[ep.ip] = ep
        return tuple(by_ip[ip] for ip in sorted(by_ip))

    def joined(self, key: ServiceKey) -> Service | None:
        svc = self.services.get(key)
        return None if svc is None else dataclasses.replace(svc, endpoints=self.endpoints(key))

    def all_joined(self) -> list[Service]:
        return [s for s in map(self.joined, self.services) if s is not None]


class Pods:
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    def _convert(self, obj: Raw, previous: Any) -> Any:
        """The workload, ``None`` to drop it, or ``previous`` if ``obj`` is invalid."""
        try:
            return ko.guarded(ko.workload_of, obj)
        except InvalidObject as e:
            self.ctx.invalid(obj, e)
            return previous

    def replace(self, items: list[Raw]) -> None:
        with self.ctx.writing():
            old = self.ctx.store.snapshot().workloads
            fresh = [self._convert(o, old.get(o["metadata"]["uid"])) for o in items]
            with self.ctx.store.update() as txn:
                txn.replace("workloads", [w for w in fresh if w is not None])
            for obj in items:
                self.ctx.pod_seen(obj)

    def event(self, kind: str, obj: Raw) -> None:
        uid = obj["metadata"]["uid"]
        with self.ctx.writing(), self.ctx.store.update() as txn:
            w = None if kind == "DELETED" else self._convert(obj, txn.get("workloads", uid))
            self.ctx.pod_seen(obj, deleted=kind == "DELETED")
            if w is None:
                txn.delete("workloads", uid)
            else:
                txn.put_workload(w)


class Namespaces:
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    def _convert(self, obj: Raw, previous: Namespace | None) -> Namespace | None:
        try:
            return ko.guarded(ko.namespace_of, obj)
        except InvalidObject as e:
            self.ctx.invalid(obj, e)
            return previous

    def replace(self, items: list[Raw]) -> None:
        with self.ctx.writing():
            old = self.ctx.store.snapshot().namespaces
            fresh = [self._convert(o, old.get(o["metadata"]["name"])) for o in items]
            with self.ctx.store.update() as txn:
                txn.replace("namespaces", [n for n in fresh if n is not None])
            for obj in items:
                self.ctx.namespace_seen(obj)

    def event(self, kind: str, obj: Raw) -> None:
        name = obj["metadata"]["name"]
        with self.ctx.writing(), self.ctx.store.update() as txn:
            ns = None if kind == "DELETED" else self._convert(obj, txn.get("namespaces", name))
            self.ctx.namespace_seen(obj, deleted=kind == "DELETED")
            if ns is None:
                txn.delete("namespaces", name)
            else:
                txn.put_namespace(ns)


class Services:
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    def _convert(self, obj: Raw) -> Service | None:
        key = (obj["metadata"]["namespace"], obj["metadata"]["name"])
        try:
            return ko.guarded(ko.service_of, obj)
        except InvalidObject as e:
            self.ctx.invalid(obj, e)
            return self.ctx.services.get(key)

    def replace(self, items: list[Raw]) -> None:
        with self.ctx.writing():
            converted = [self._convert(o) for o in items]
            self.ctx.services = {s.key: s for s in converted if s is not None}
            with self.ctx.store.update() as txn:
                txn.replace("services", self.ctx.all_joined())
            self.ctx.services_listed = True
            self.ctx.routes_changed()

    def event(self, kind: str, obj: Raw) -> None:
        key = (obj["metadata"]["namespace"], obj["metadata"]["name"])
        with self.ctx.writing(), self.ctx.store.update() as txn:
            svc = None if kind == "DELETED" else self._convert(obj)
            if svc is None:
                self.ctx.services.pop(key, None)
                txn.delete("services", key)
            else:
                self.ctx.services[key] = svc
                txn.put_service(dataclasses.replace(svc, endpoints=self.ctx.endpoints(key)))
            self.ctx.routes_changed()


class EndpointSlices:
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    def _forget(self, slice_key: tuple[str, str]) -> ServiceKey | None:
        owner = self.ctx.slice_owner.pop(slice_key, None)
        if owner is not None:
            members = self.ctx.slices.get(owner, {})
            members.pop(slice_key[1], None)
            if not members:
                self.ctx.slices.pop(owner, None)
        return owner

    def _parse(self, obj: Raw) -> tuple[ServiceKey | None, tuple[Endpoint, ...]] | None:
        """(owning service, endpoints), or ``None`` if the slice cannot be read (reported)."""
        try:
            return ko.guarded(ko.slice_service, obj), ko.guarded(ko.slice_endpoints, obj)
        except InvalidObject as e:
            self.ctx.invalid(obj, e)
            return None

    def _file(
        self, name: tuple[str, str], owner: ServiceKey | None, endpoints: tuple[Endpoint, ...]
    ) -> ServiceKey | None:
        if owner is not None:
            self.ctx.slice_owner[name] = owner
            self.ctx.slices.setdefault(owner, {})[name[1]] = endpoints
        return owner

    def replace(self, items: list[Raw]) -> None:
        with self.ctx.writing():
            previous = {
                name: (owner, self.ctx.slices[owner][name[1]])
                for name, owner in self.ctx.slice_owner.items()
            }
            self.ctx.slice_owner.clear()
            self.ctx.slices.clear()
            for obj in items:
                name = (obj["metadata"]["namespace"], obj["metadata"]["name"])
                parsed = self._parse(obj) or previous.get(name)
                if parsed is not None:
                    self._file(name, *parsed)
            with self.ctx.store.update() as txn:
                txn.replace("services", self.ctx.all_joined())

    def event(self, kind: str, obj: Raw) -> None:
        name = (obj["metadata"]["namespace"], obj["metadata"]["name"])
        with self.ctx.writing(), self.ctx.store.update() as txn:
            parsed = None if kind == "DELETED" else self._parse(obj)
            if kind != "DELETED" and parsed is None:
                return  # unreadable: the previous version of the slice stays in force
            touched = [self._forget(name)]
            if parsed is not None:
                touched.append(self._file(name, *parsed))
            for key in {k for k in touched if k is not None}:
                svc = self.ctx.joined(key)
                if svc is not None:
                    txn.put_service(svc)


def _describe(stand_in: PolicyObject) -> str:
    scope = "its selector" if stand_in.spec.get("selector") else "the whole namespace"
    what = "a DENY of every request" if stand_in.spec["action"] == "DENY" else "an ALLOW of nothing"
    return f"{what} for {scope}"


class Policies:
    """One nodemesh CRD kind; its objects share the store's ``policies`` with the other two.

    A refused object keeps its previous valid version; a refused AuthorizationPolicy without
    one is enforced by ``kubeobjects.fail_closed_stand_in`` (never dropped: that fails open).
    Which keys hold a stand-in is remembered: a stand-in is no valid version, so a refused
    object seen again (its own status write comes back as an event) is stood in for again, from
    what it says now, and its status keeps saying so.
    """

    def __init__(self, ctx: Context, kind: str, plural: str) -> None:
        self.ctx = ctx
        self.kind = kind
        self.plural = plural
        self._standing_in: set[tuple[str, str, str]] = set()

    def _convert(self, obj: Raw, previous: Any) -> Any:
        key = self._key(obj)
        try:
            policy = ko.guarded(ko.policy_of, obj)
        except InvalidObject as e:
            if (previous is None or key in self._standing_in) and (
                stand_in := ko.fail_closed_stand_in(obj)
            ) is not None:
                e = InvalidObject(
                    e.reason,
                    f"{e.message}; until it is fixed it is enforced as {_describe(stand_in)} "
                    "(fail closed)",
                )
                previous = stand_in
                self._standing_in.add(key)
            self.ctx.invalid(obj, e)
            self.ctx.policy_verdict(self.plural, obj, e)
            return previous
        self._standing_in.discard(key)
        self.ctx.policy_verdict(self.plural, obj, None)
        return policy

    def _key(self, obj: Raw) -> tuple[str, str, str]:
        return (self.kind, obj["metadata"]["namespace"], obj["metadata"]["name"])

    def replace(self, items: list[Raw]) -> None:
        with self.ctx.writing():
            old = self.ctx.store.snapshot().policies
            fresh = [self._convert(o, old.get(self._key(o))) for o in items]
            keep = {p.key for p in fresh if p is not None}
            self._standing_in &= keep
            with self.ctx.store.update() as txn:
                for key in [k for k in old if k[0] == self.kind and k not in keep]:
                    txn.delete("policies", key)
                for policy in fresh:
                    if policy is not None:
                        txn.put_policy(policy)
            self._affects_routes()

    def event(self, kind: str, obj: Raw) -> None:
        key = self._key(obj)
        with self.ctx.writing(), self.ctx.store.update() as txn:
            policy = None if kind == "DELETED" else self._convert(obj, txn.get("policies", key))
            if policy is None:
                self._standing_in.discard(key)
                txn.delete("policies", key)
            else:
                txn.put_policy(policy)
            self._affects_routes()

    def _affects_routes(self) -> None:
        """An HTTPFault resolves (or no longer resolves) the ExtensionRef filters of routes:
        their status is evaluated again."""
        if self.kind == FAULT_KIND:
            self.ctx.routes_changed()


class Routes:
    """One Gateway API route kind (HTTPRoute or GRPCRoute) into the store's ``routes``.

    The spec is stored as written; whether it is valid depends on the Services, so the verdict
    (and the status written back) comes from ``agent.policy.routes`` after every change of
    routes or Services. Each raw object is also shown to the reporter, which keeps its current
    ``status.parents`` to decide whether a write is needed.
    """

    def __init__(self, ctx: Context, kind: str) -> None:
        self.ctx = ctx
        self.kind = kind

    def _convert(self, obj: Raw, previous: RouteObject | None) -> RouteObject | None:
        try:
            return ko.guarded(lambda o: ko.route_of(self.kind, o), obj)
        except InvalidObject as e:
            self.ctx.invalid(obj, e)
            return previous

    def _key(self, obj: Raw) -> tuple[str, str, str]:
        return (self.kind, obj["metadata"]["namespace"], obj["metadata"]["name"])

    def replace(self, items: list[Raw]) -> None:
        with self.ctx.writing():
            old = self.ctx.store.snapshot().routes
            fresh = [self._convert(o, old.get(self._key(o))) for o in items]
            keep = {r.key for r in fresh if r is not None}
            with self.ctx.store.update() as txn:
                for key in [k for k in old if k[0] == self.kind and k not in keep]:
                    txn.delete("routes", key)
                for route in fresh:
                    if route is not None:
                        txn.put_route(route)
            for obj in items:
                self.ctx.reporter.observe_route(self.kind, obj, False)
            self.ctx.routes_changed()

    def event(self, kind: str, obj: Raw) -> None:
        key = self._key(obj)
        with self.ctx.writing(), self.ctx.store.update() as txn:
            deleted = kind == "DELETED"
            route = None if deleted else self._convert(obj, txn.get("routes", key))
            if route is None:
                txn.delete("routes", key)
            else:
                txn.put_route(route)
            self.ctx.reporter.observe_route(self.kind, obj, deleted)
            self.ctx.routes_changed()
