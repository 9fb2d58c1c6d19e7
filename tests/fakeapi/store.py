"""The fake API server's object store: objects, resourceVersions, watch history and selectors.

It keeps what a watch needs to be faithful: one cluster-wide resourceVersion counter (as etcd's
revision), a history of change events that can be compacted (so a watch from a forgotten version
gets 410 Gone, as on a real API server after etcd compaction), and label/field selectors that turn
a MODIFIED event into ADDED or DELETED when an object enters or leaves the selection.
"""

from __future__ import annotations

import bisect
import copy
import datetime
import threading
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Resource:
    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool = True
    # Status is written only through /status (CRDs with the status subresource).
    status_subresource: bool = False

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version


GATEWAY_GROUP = "gateway.networking.k8s.io"
RESOURCES: tuple[Resource, ...] = (
    Resource("", "v1", "pods", "Pod"),
    Resource("", "v1", "namespaces", "Namespace", namespaced=False),
    Resource("", "v1", "services", "Service"),
    Resource("", "v1", "secrets", "Secret"),
    Resource("", "v1", "events", "Event"),
    Resource("coordination.k8s.io", "v1", "leases", "Lease"),
    Resource("discovery.k8s.io", "v1", "endpointslices", "EndpointSlice"),
    Resource(
        "nodemesh.io",
        "v1alpha1",
        "authorizationpolicies",
        "AuthorizationPolicy",
        status_subresource=True,
    ),
    Resource(
        "nodemesh.io",
        "v1alpha1",
        "peerauthentications",
        "PeerAuthentication",
        status_subresource=True,
    ),
    Resource(
        "nodemesh.io", "v1alpha1", "trafficpolicies", "TrafficPolicy", status_subresource=True
    ),
    Resource(
        "nodemesh.io",
        "v1alpha1",
        "ratelimitpolicies",
        "RateLimitPolicy",
        status_subresource=True,
    ),
    Resource("nodemesh.io", "v1alpha1", "httpfaults", "HTTPFault", status_subresource=True),
    # The Gateway API's standard channel (served unless the test turns its CRDs off).
    Resource(GATEWAY_GROUP, "v1", "httproutes", "HTTPRoute", status_subresource=True),
    Resource(GATEWAY_GROUP, "v1", "grpcroutes", "GRPCRoute", status_subresource=True),
)
BY_PATH = {(r.group, r.version, r.plural): r for r in RESOURCES}
BY_KIND = {r.kind: r for r in RESOURCES}


class ApiError(Exception):
    """Becomes a ``Status`` response with this HTTP code and reason."""

    def __init__(self, code: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message

    def status(self) -> dict[str, Any]:
        return {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        }


@dataclass(frozen=True)
class Change:
    rv: int
    type: str  # ADDED, MODIFIED, DELETED
    resource: Resource
    obj: dict[str, Any]
    old: dict[str, Any] | None


Key = tuple[Resource, str, str]
# Field values the real API server derives from defaulted fields (a pod's spec.hostNetwork is
# "false" in field selectors even when the manifest omits it).
FIELD_DEFAULTS = {"spec.hostNetwork": "false"}  # resource, namespace ("" if cluster-scoped), name


def _get(obj: dict[str, Any], dotted: str) -> str:
    node: Any = obj
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    if isinstance(node, bool):
        return str(node).lower()
    return "" if node is None else str(node)


def _label_term(term: str) -> Any:
    term = term.strip()
    if " in " in term or " notin " in term:
        neg = " notin " in term
        key, _, values = term.partition(" notin " if neg else " in ")
        wanted = {v.strip() for v in values.strip().strip("()").split(",")}
        return lambda labels: (labels.get(key.strip()) in wanted) != neg
    for op in ("!=", "==", "="):
        if op in term:
            key, _, value = term.partition(op)
            return lambda labels: (labels.get(key) == value) == (op != "!=")
    if term.startswith("!"):
        return lambda labels: term[1:] not in labels
    return lambda labels: term in labels


@dataclass(frozen=True)
class Selector:
    labels: str = ""
    fields: str = ""

    def matches(self, obj: dict[str, Any]) -> bool:
        labels = obj.get("metadata", {}).get("labels") or {}
        if self.labels and not all(_label_term(t)(labels) for t in _split(self.labels)):
            return False
        for term in _split(self.fields):
            neg = "!=" in term
            key, _, value = term.partition("!=" if neg else "=")
            actual = _get(obj, key.strip()) or FIELD_DEFAULTS.get(key.strip(), "")
            if (actual == value.lstrip("=")) == neg:
                return False
        return True


def _split(selector: str) -> list[str]:
    """Split on commas outside parentheses (``a in (x,y),b``)."""
    out, depth, cur = [], 0, ""
    for ch in selector:
        depth += ch == "("
        depth -= ch == ")"
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    return [t for t in [*out, cur] if t.strip()]


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch (also used for strategic merge patches of simple objects)."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


class ObjectStore:
    """All objects of the fake cluster; thread-safe; ``cond`` wakes watchers on every change."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.rv = 1
        self.objects: dict[Key, dict[str, Any]] = {}
        self.history: list[Change] = []
        self.compacted_rv = 0  # watches from a version below this get 410 Gone
        self.epoch = 0  # bumped by a restart: every open watch is cut

    def _key(self, resource: Resource, namespace: str, name: str) -> Key:
        return (resource, namespace if resource.namespaced else "", name)

    def _record(
        self, kind: str, resource: Resource, obj: dict[str, Any], old: dict[str, Any] | None
    ) -> dict[str, Any]:
        self.history.append(Change(self.rv, kind, resource, obj, old))
        self.cond.notify_all()
        return copy.deepcopy(obj)

    def create(self, resource: Resource, namespace: str, obj: dict[str, Any]) -> dict[str, Any]:
        obj = copy.deepcopy(obj)
        meta = obj.setdefault("metadata", {})
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
        name = meta.get("name")
        if not name:
            raise ApiError(422, "Invalid", f"{resource.kind}: metadata.name: Required value")
        with self.cond:
            key = self._key(resource, namespace, name)
            if key in self.objects:
                raise ApiError(409, "AlreadyExists", f'{resource.plural} "{name}" already exists')
            if resource.namespaced:
                meta["namespace"] = namespace
            if resource.status_subresource:
                obj.pop("status", None)
            self.rv += 1
            now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            meta.update(
                uid=str(uuid.uuid4()),
                resourceVersion=str(self.rv),
                generation=1,
                creationTimestamp=now,
            )
            obj["apiVersion"], obj["kind"] = resource.api_version, resource.kind
            self.objects[key] = obj
            return self._record("ADDED", resource, obj, None)

    def get(self, resource: Resource, namespace: str, name: str) -> dict[str, Any]:
        with self.cond:
            obj = self.objects.get(self._key(resource, namespace, name))
            if obj is None:
                raise ApiError(404, "NotFound", f'{resource.plural} "{name}" not found')
            return copy.deepcopy(obj)

    def update(
        self,
        resource: Resource,
        namespace: str,
        name: str,
        new: dict[str, Any],
        *,
        status: bool = False,
    ) -> dict[str, Any]:
        """PUT semantics; ``status`` selects the /status subresource (only status changes)."""
        new = copy.deepcopy(new)
        with self.cond:
            key = self._key(resource, namespace, name)
            old = self.objects.get(key)
            if old is None:
                raise ApiError(404, "NotFound", f'{resource.plural} "{name}" not found')
            wanted_rv = (new.get("metadata") or {}).get("resourceVersion")
            if wanted_rv and wanted_rv != old["metadata"]["resourceVersion"]:
                raise ApiError(
                    409,
                    "Conflict",
                    f"Operation cannot be fulfilled on "
                    f'{resource.plural} "{name}": the object has been modified',
                )
            if status:
                obj = copy.deepcopy(old)
                obj["status"] = new.get("status", {})
            else:
                obj = new
                obj["metadata"] = {**old["metadata"], **(new.get("metadata") or {})}
                if resource.status_subresource:
                    obj["status"] = old.get("status")
                    if obj["status"] is None:
                        obj.pop("status")
                if obj.get("spec") != old.get("spec"):
                    obj["metadata"]["generation"] = old["metadata"].get("generation", 1) + 1
            obj["apiVersion"], obj["kind"] = resource.api_version, resource.kind
            if obj == old:
                return copy.deepcopy(old)
            self.rv += 1
            obj["metadata"]["resourceVersion"] = str(self.rv)
            self.objects[key] = obj
            return self._record("MODIFIED", resource, obj, old)

    def patch(
        self,
        resource: Resource,
        namespace: str,
        name: str,
        patch: dict[str, Any],
        *,
        status: bool = False,
    ) -> dict[str, Any]:
        current = self.get(resource, namespace, name)
        merged = merge_patch(current, patch)
        if not (patch.get("metadata") or {}).get("resourceVersion"):
            merged["metadata"].pop("resourceVersion", None)  # else: a precondition, as in k8s
        return self.update(resource, namespace, name, merged, status=status)

    def delete(self, resource: Resource, namespace: str, name: str) -> dict[str, Any]:
        with self.cond:
            key = self._key(resource, namespace, name)
            old = self.objects.pop(key, None)
            if old is None:
                raise ApiError(404, "NotFound", f'{resource.plural} "{name}" not found')
            self.rv += 1
            gone = copy.deepcopy(old)
            gone["metadata"]["resourceVersion"] = str(self.rv)
            return self._record("DELETED", resource, gone, None)

    def list_objects(
        self, resource: Resource, namespace: str | None, selector: Selector
    ) -> tuple[int, list[dict[str, Any]]]:
        with self.cond:
            items = [
                copy.deepcopy(o)
                for (r, ns, _), o in sorted(self.objects.items(), key=lambda kv: kv[0][1:])
                if r == resource and (namespace is None or ns == namespace) and selector.matches(o)
            ]
            return self.rv, items

    def changes_since(self, rv: int) -> list[Change]:
        """Changes after ``rv``; the caller holds ``cond`` and checked ``rv >= compacted_rv``."""
        start = bisect.bisect_right(self.history, rv, key=lambda c: c.rv)
        return self.history[start:]

    def compact(self) -> None:
        """Forget the history: watches from any version before now get 410 Gone."""
        with self.cond:
            self.history.clear()
            self.compacted_rv = self.rv

    def cut_watches(self) -> None:
        with self.cond:
            self.epoch += 1
            self.cond.notify_all()


def watch_events(
    changes: Iterable[Change], resource: Resource, namespace: str | None, selector: Selector
) -> list[tuple[str, dict[str, Any]]]:
    """The events one watch sees: its resource, namespace and selector, with transitions."""
    out = []
    for c in changes:
        if c.resource != resource:
            continue
        ns = c.obj.get("metadata", {}).get("namespace", "")
        if namespace is not None and ns != namespace:
            continue
        now = selector.matches(c.obj)
        before = c.old is not None and selector.matches(c.old)
        if c.type == "MODIFIED" and now != before:
            out.append(("ADDED" if now else "DELETED", c.obj))
        elif now:
            out.append((c.type, c.obj))
    return out
