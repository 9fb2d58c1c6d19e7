"""Whether ``nodemesh stat``'s NAME names a workload or Service the agent knows (pure).

Why: stat's rows come from metrics, which hold only what had traffic, so a name without rows is
either idle or a typo, and the table alone (``(no traffic in the window)``) cannot tell them
apart. The agent's ``/workloads`` and ``/services`` can: as kubectl refuses a missing object
(``NotFound``, exit 1), stat refuses a name that matches nothing there and lists the names that
would, while a known but idle one keeps the empty table. Names match as ``aggregate.named``
matches rows: a workload by its canonical name (``web`` for pods ``web-0``/``web-1``, as the
metrics carry it) with or without ``namespace/``, a Service by its name or hostname.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from agent.admin.names import canonical_name


def _workload_problem(
    name: str, namespace: str | None, workloads: Sequence[Mapping[str, Any]]
) -> str | None:
    wanted_ns, _, bare = name.rpartition("/")
    wanted_ns = wanted_ns or namespace or ""
    known = sorted({f"{w.get('namespace')}/{canonical_name(w)}" for w in workloads})
    if any(k.endswith(f"/{bare}") and (not wanted_ns or k == f"{wanted_ns}/{bare}") for k in known):
        return None
    pods = [w for w in workloads if w.get("name") == bare and wanted_ns in ("", w.get("namespace"))]
    pod = (
        f" (pod {bare} is in workload {pods[0].get('namespace')}/{canonical_name(pods[0])}: the "
        "metrics name the workload)"
        if pods
        else ""
    )
    return f"workload {name} not found{pod}; workloads: {', '.join(known) or '(none)'}"


def _service_problem(
    name: str, namespace: str | None, services: Sequence[Mapping[str, Any]]
) -> str | None:
    def named(s: Mapping[str, Any]) -> bool:
        return name in (s.get("name"), s.get("hostname")) and (
            not namespace or s.get("namespace") == namespace
        )

    if any(named(s) for s in services):
        return None
    known = sorted(f"{s.get('namespace')}/{s.get('name')}" for s in services)
    return f"service {name} not found; Services: {', '.join(known) or '(none)'}"


def missing(
    resource: str,
    name: str,
    namespace: str | None,
    workloads: Sequence[Mapping[str, Any]],
    services: Sequence[Mapping[str, Any]],
) -> str | None:
    """Why ``stat RESOURCE NAME [-n NAMESPACE]`` names nothing, or None when it names a workload
    (``resource="workload"``) or Service the agent knows."""
    if resource == "service":
        return _service_problem(name, namespace, services)
    return _workload_problem(name, namespace, workloads)
