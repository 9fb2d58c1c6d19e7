"""Workloads and state built by hand, for the unit and loopback tests of several areas.

The CA, identity, telemetry, admin and proxy tests each need a few pods in a ``StateStore``;
they differ only in names, nodes, addresses, service accounts and ``app`` labels, so one builder
with those as parameters serves them all.
"""

from __future__ import annotations

from collections.abc import Mapping

from agent.state import StateStore, Workload
from agent.state.model import frozen_map


def workload(
    name: str,
    node: str,
    ip: str,
    *,
    sa: str | None = None,
    app: str | None = None,
    meshed: bool = True,
    namespace: str = "default",
) -> Workload:
    """Pod ``name`` on ``node`` at ``ip``, annotated into (or, ``meshed=False``, out of) the mesh.

    Its service account is ``sa`` or, by default, its own name; ``app`` sets the ``app`` label
    that Services select on (no labels without it).
    """
    labels: Mapping[str, str] = frozen_map(None) if app is None else {"app": app}
    return Workload(
        uid=f"{namespace}/{name}",
        name=name,
        namespace=namespace,
        service_account=name if sa is None else sa,
        node=node,
        ips=(ip,),
        labels=labels,
        mesh_annotation="enabled" if meshed else "disabled",
    )


def store_with(*workloads: Workload) -> StateStore:
    """A store holding exactly ``workloads`` (no namespaces, services or policies)."""
    store = StateStore()
    with store.update() as txn:
        for w in workloads:
            txn.put_workload(w)
    return store
