"""The state store: one writer per source, immutable snapshots for every reader.

Why copy-on-write snapshots: the proxy, the datapath reconciler, the identity manager and the
admin API all read the state from different tasks and threads. Handing each of them an immutable
``Snapshot`` means a reader never sees half of an update (a pod without its namespace, a service
without its endpoints) and never needs a lock. Writers batch their changes in ``StateStore.update``
so that a relist replaces a whole kind atomically.

Why a transaction records the keys it touched: deciding what changed by comparing whole
mappings is O(cluster) per event. A transaction instead remembers each key it wrote or deleted,
keeps only those whose value really differs from the base snapshot, and hands that set to the
index maintenance (``index``) and to subscribers (``Snapshot.changed_keys``). A no-op write (a
resync that repeats what is known) publishes nothing and wakes nobody.

Subscribers run on the writer's thread right after the commit, outside the write lock; a
subscriber on an asyncio loop must hand work over with ``loop.call_soon_threadsafe``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from types import MappingProxyType
from typing import Any

from agent.state import index
from agent.state.cowmap import CowMap, CowMapEdit
from agent.state.model import (
    DEFAULT_TRUST_DOMAIN,
    Namespace,
    PolicyObject,
    RouteObject,
    Service,
    Workload,
)
from agent.state.snapshot import KINDS, Snapshot

log = logging.getLogger(__name__)

Subscriber = Callable[[Snapshot, frozenset[str]], None]

__all__ = ["KINDS", "Snapshot", "StateStore", "Subscriber", "Transaction"]


def _key(kind: str, obj: Any) -> object:
    """The key an object is stored under in its kind's mapping."""
    if kind == "namespaces":
        return obj.name
    if kind == "workloads":
        return obj.uid
    return obj.key


class Transaction:
    """Changes staged by one writer; committed atomically when the ``update`` block ends."""

    def __init__(self, base: Snapshot) -> None:
        self._base = base
        self._data: dict[str, CowMapEdit[Any, Any]] = {}
        self._touched: dict[str, set[Any]] = {}
        self.trust_domain = base.trust_domain

    def _kind(self, kind: str) -> CowMapEdit[Any, Any]:
        if kind not in KINDS:
            raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")
        if kind not in self._data:
            self._data[kind] = getattr(self._base, kind).edit()
            self._touched[kind] = set()
        return self._data[kind]

    def _put(self, kind: str, key: object, obj: object) -> None:
        self._kind(kind)[key] = obj
        self._touched[kind].add(key)

    def put_namespace(self, ns: Namespace) -> None:
        self._put("namespaces", ns.name, ns)

    def put_workload(self, w: Workload) -> None:
        self._put("workloads", w.uid, w)

    def put_service(self, s: Service) -> None:
        self._put("services", s.key, s)

    def put_policy(self, p: PolicyObject) -> None:
        self._put("policies", p.key, p)

    def put_route(self, r: RouteObject) -> None:
        self._put("routes", r.key, r)

    def get(self, kind: str, key: object) -> Any:
        """The object as this transaction sees it (staged writes included), or ``None``."""
        data = self._data.get(kind)
        return (data if data is not None else getattr(self._base, kind)).get(key)

    def delete(self, kind: str, key: object) -> None:
        if self._kind(kind).pop(key, None) is not None:
            self._touched[kind].add(key)

    def replace(self, kind: str, objects: Iterable[object]) -> None:
        """Replace every object of ``kind`` (a relist): what is absent from ``objects`` is gone."""
        current = self._kind(kind)
        touched = self._touched[kind]
        fresh = {_key(kind, obj): obj for obj in objects}
        touched.update(k for k in current if k not in fresh)
        for key, obj in fresh.items():
            if key in current and current[key] == obj:
                fresh[key] = current[key]  # keep the instance the indexes already hold
            else:
                touched.add(key)
        self._data[kind] = CowMap.of(fresh).edit()

    def changes(self) -> dict[str, frozenset[Any]]:
        """Per kind, the keys whose value differs from the base snapshot."""
        out = {}
        for kind, keys in self._touched.items():
            base: Mapping[Any, Any] = getattr(self._base, kind)
            data = self._data[kind]
            real = set()
            for key in keys:
                if base.get(key) != data.get(key):
                    real.add(key)
                elif key in base:
                    data[key] = base[key]  # equal rewrite: keep the published instance
            if real:
                out[kind] = frozenset(real)
        return out

    def changed_kinds(self) -> frozenset[str]:
        return frozenset(self.changes())

    def build(self, version: int, changes: Mapping[str, frozenset[Any]]) -> Snapshot:
        base = self._base
        ix = base.indexes.edit()
        if "workloads" in changes:
            index.refile_workloads(
                ix, base.workloads, self._data["workloads"], changes["workloads"]
            )
        if "services" in changes:
            index.refile_services(ix, base.services, self._data["services"], changes["services"])
        if "policies" in changes:
            index.refile_policies(ix, self._data["policies"], changes["policies"])
        kinds = {k: self._data[k].freeze() if k in changes else getattr(base, k) for k in KINDS}
        return Snapshot(
            version=version,
            trust_domain=self.trust_domain,
            changed_keys=MappingProxyType(dict(changes)),
            indexes=ix.freeze(),
            **kinds,
        )


class StateStore:
    """Holds the current ``Snapshot``; writers use ``update()``, readers ``snapshot()``."""

    def __init__(self, trust_domain: str = DEFAULT_TRUST_DOMAIN) -> None:
        self._snapshot = Snapshot(trust_domain=trust_domain)
        self._write_lock = threading.Lock()
        self._subscribers: list[Subscriber] = []

    def snapshot(self) -> Snapshot:
        return self._snapshot

    def subscribe(self, callback: Subscriber) -> Callable[[], None]:
        """Call ``callback(snapshot, changed_kinds)`` after each committed change; returns the
        function that unsubscribes it."""
        self._subscribers.append(callback)
        return lambda: self._subscribers.remove(callback)

    @contextmanager
    def update(self) -> Iterator[Transaction]:
        """Stage changes; they become visible together when the block exits without error."""
        with self._write_lock:
            txn = Transaction(self._snapshot)
            yield txn
            changes = txn.changes()
            if not changes and txn.trust_domain == self._snapshot.trust_domain:
                return
            self._snapshot = txn.build(self._snapshot.version + 1, changes)
            snap = self._snapshot
        kinds = frozenset(changes)
        for cb in list(self._subscribers):
            try:
                cb(snap, kinds)
            except Exception:
                log.exception("state subscriber %r failed; the store keeps serving", cb)
