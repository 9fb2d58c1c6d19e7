"""The agent's single source of truth: workloads, namespaces, services, policies and routes.

Sources (``agent.sources``) are the only writers; everything else reads immutable snapshots and
subscribes to changes. See ``model`` for the objects and ``store`` for the store.
"""

from agent.state.model import (
    MESH_ANNOTATION,
    MESH_NAMESPACE_LABEL,
    Endpoint,
    Namespace,
    PolicyObject,
    RouteObject,
    Service,
    ServicePort,
    Workload,
    spiffe_id,
)
from agent.state.snapshot import Snapshot
from agent.state.store import StateStore, Transaction

__all__ = [
    "MESH_ANNOTATION",
    "MESH_NAMESPACE_LABEL",
    "Endpoint",
    "Namespace",
    "PolicyObject",
    "RouteObject",
    "Service",
    "ServicePort",
    "Snapshot",
    "StateStore",
    "Transaction",
    "Workload",
    "spiffe_id",
]
