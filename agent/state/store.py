"""The state store: one writer per source, immutable snapshots for every reader.

Why copy-on-write snapshots: the proxy, the datapath reconciler, the identity manager and the
admin API all read the state from different tasks and threads. Handing each of them an immutable
``Snapshot`` means a reader never sees half of an update (a pod without its namespace, a service
without its endpoints) and never needs a lock. Writers batch their changes in ``StateStore.update``
so that a relist replaces a whole kind atomically; subscribers are called after every committed
update with the new snapshot and the set of kinds that changed.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import MappingProxyType

from agent.state.model import (
    DEFAULT_TRUST_DOMAIN,
    Namespace,
    PolicyObject,
    Service,
    Workload,
)

log = logging.getLogger(__name__)

Subscriber = Callable[["Snapshot", frozenset[str]], None]

KINDS = ("namespaces", "workloads", "services", "policies")


@dataclass(frozen=True)
class Snapshot:
    """A consistent, read-only view of everything the mesh knows at one version."""

    version: int = 0
    trust_domain: str = DEFAULT_TRUST_DOMAIN
    namespaces: Mapping[str, Namespace] = field(default_factory=dict)
    workloads: Mapping[str, Workload] = field(default_factory=dict)  # by uid
    services: Mapping[tuple[str, str], Service] = field(default_factory=dict)
    policies: Mapping[tuple[str, str, str], PolicyObject] = field(default_factory=dict)
    workload_by_ip: Mapping[str, Workload] = field(default_factory=dict)
    service_by_ip: Mapping[str, Service] = field(default_factory=dict)

    def is_meshed(self, workload: Workload) -> bool:
        """Effective membership: host-network pods never; the pod annotation wins; else the
        namespace label ``nodemesh.io/mesh=enabled``."""
        if workload.host_network or not workload.ips:
            return False
        if workload.mesh_annotation == "enabled":
            return True
        if workload.mesh_annotation == "disabled":
            return False
        ns = self.namespaces.get(workload.namespace)
        return ns is not None and ns.mesh_enabled

    def workloads_on(self, node: str) -> Iterator[Workload]:
        return (w for w in self.workloads.values() if w.node == node)

    def meshed_workloads_on(self, node: str) -> Iterator[Workload]:
        return (w for w in self.workloads_on(node) if self.is_meshed(w))

    def policies_of(self, kind: str) -> Iterator[PolicyObject]:
        return (p for p in self.policies.values() if p.kind == kind)


def _index(snap_kwargs: dict[str, object]) -> None:
    workloads: Mapping[str, Workload] = snap_kwargs["workloads"]  # type: ignore[assignment]
    services: Mapping[tuple[str, str], Service] = snap_kwargs["services"]  # type: ignore[assignment]
    by_ip: dict[str, Workload] = {}
    for w in workloads.values():
        for ip in w.ips:
            by_ip[ip] = w
    svc_by_ip: dict[str, Service] = {}
    for s in services.values():
        for ip in s.cluster_ips:
            svc_by_ip[ip] = s
    snap_kwargs["workload_by_ip"] = MappingProxyType(by_ip)
    snap_kwargs["service_by_ip"] = MappingProxyType(svc_by_ip)


def _key(kind: str, obj: object) -> object:
    """The key an object is stored under in its kind's mapping."""
    if kind == "namespaces":
        return obj.name  # type: ignore[attr-defined]
    if kind == "workloads":
        return obj.uid  # type: ignore[attr-defined]
    return obj.key  # type: ignore[attr-defined]


class Transaction:
    """Changes staged by one writer; committed atomically when the ``update`` block ends."""

    def __init__(self, base: Snapshot) -> None:
        self._base = base
        self._data: dict[str, dict[object, object]] = {}
        self.trust_domain = base.trust_domain

    def _kind(self, kind: str) -> dict[object, object]:
        if kind not in self._data:
            self._data[kind] = dict(getattr(self._base, kind))
        return self._data[kind]

    def put_namespace(self, ns: Namespace) -> None:
        self._kind("namespaces")[ns.name] = ns

    def put_workload(self, w: Workload) -> None:
        self._kind("workloads")[w.uid] = w

    def put_service(self, s: Service) -> None:
        self._kind("services")[s.key] = s

    def put_policy(self, p: PolicyObject) -> None:
        self._kind("policies")[p.key] = p

    def delete(self, kind: str, key: object) -> None:
        self._kind(kind).pop(key, None)

    def replace(self, kind: str, objects: Iterable[object]) -> None:
        """Replace every object of ``kind`` (a relist): what is absent from ``objects`` is gone."""
        if kind not in KINDS:
            raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")
        target = self._data[kind] = {}
        for obj in objects:
            target[_key(kind, obj)] = obj

    def changed_kinds(self) -> frozenset[str]:
        return frozenset(k for k, v in self._data.items() if v != dict(getattr(self._base, k)))

    def build(self, version: int) -> Snapshot:
        kwargs: dict[str, object] = {
            k: MappingProxyType(self._data[k]) if k in self._data else getattr(self._base, k)
            for k in KINDS
        }
        _index(kwargs)
        return Snapshot(version=version, trust_domain=self.trust_domain, **kwargs)  # type: ignore[arg-type]


class StateStore:
    """Holds the current ``Snapshot``; writers use ``update()``, readers ``snapshot()``."""

    def __init__(self, trust_domain: str = DEFAULT_TRUST_DOMAIN) -> None:
        self._snapshot = Snapshot(trust_domain=trust_domain)
        self._write_lock = threading.Lock()
        self._subscribers: list[Subscriber] = []

    def snapshot(self) -> Snapshot:
        return self._snapshot

    def subscribe(self, callback: Subscriber) -> Callable[[], None]:
        """Call ``callback(snapshot, changed_kinds)`` after each committed change."""
        self._subscribers.append(callback)
        return lambda: self._subscribers.remove(callback)

    @contextmanager
    def update(self) -> Iterator[Transaction]:
        """Stage changes; they become visible together when the block exits without error."""
        with self._write_lock:
            txn = Transaction(self._snapshot)
            yield txn
            changed = txn.changed_kinds()
            if not changed and txn.trust_domain == self._snapshot.trust_domain:
                return
            self._snapshot = txn.build(self._snapshot.version + 1)
            snap = self._snapshot
        for cb in list(self._subscribers):
            try:
                cb(snap, changed)
            except Exception:
                log.exception("state subscriber %r failed; the store keeps serving", cb)
