"""The workers' copy of the state: the main process's commits, replayed into a local store.

A ``Snapshot`` is not sent whole on every change (its indexes are derived data, and most
changes touch a few objects): the main process sends each commit's changed objects
(``Snapshot.changed_keys``: per kind, the new object, or None when it was deleted), in commit
order, and a worker replays them in one ``StateStore.update()``, so its store's subscribers (the
proxy's policy re-check, traffic control) see the same changes as they would in one process.
A worker that starts (or restarts) gets the full state first. The model's objects are frozen
dataclasses: they pickle, and both sides keep them immutable.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from agent.state import Snapshot, StateStore, Transaction
from agent.state.snapshot import KINDS


@dataclass(frozen=True)
class StateDelta:
    trust_domain: str
    # per kind: key -> object (put) or None (deleted); with ``full``, every object of the kind
    changes: Mapping[str, Mapping[Any, object | None]]
    full: bool = False


def full_state(snapshot: Snapshot) -> StateDelta:
    return StateDelta(
        snapshot.trust_domain,
        {kind: dict(getattr(snapshot, kind).items()) for kind in KINDS},
        full=True,
    )


def changes_of(snapshot: Snapshot, kinds: frozenset[str]) -> StateDelta:
    """What ``snapshot``'s commit changed in ``kinds`` (the store's subscriber arguments)."""
    out: dict[str, dict[Any, object | None]] = {}
    for kind in kinds:
        objects = getattr(snapshot, kind)
        keys = snapshot.changed_keys.get(kind, frozenset())
        out[kind] = {key: objects.get(key) for key in keys}
    return StateDelta(snapshot.trust_domain, out)


def _put(txn: Transaction, kind: str, obj: Any) -> None:
    puts: dict[str, Callable[[Any], None]] = {
        "namespaces": txn.put_namespace,
        "workloads": txn.put_workload,
        "services": txn.put_service,
        "policies": txn.put_policy,
        "routes": txn.put_route,
    }
    puts[kind](obj)


def apply(store: StateStore, delta: StateDelta) -> None:
    """Replay ``delta`` into ``store`` as one commit."""
    with store.update() as txn:
        txn.trust_domain = delta.trust_domain
        for kind, objects in delta.changes.items():
            if delta.full:
                txn.replace(kind, objects.values())
                continue
            for key, obj in objects.items():
                if obj is None:
                    txn.delete(kind, key)
                else:
                    _put(txn, kind, obj)
