"""``status.parents[]`` of a route as nodemesh writes it: pure, so every agent computes the same.

Each Gateway API controller owns the entries with its ``controllerName`` and must leave other
controllers' entries alone (a route may also have a Gateway parent, or be read by another mesh
during a migration). nodemesh's name is ``nodemesh.io/mesh-controller``, in the
``<domain>/<path>`` form Istio (``istio.io/mesh-controller``) and Linkerd
(``linkerd.io/policy-controller``) use. Like them, ``observedGeneration`` is set on each
condition (route status has no top-level one), and ``lastTransitionTime`` changes only when a
condition's status does.

``merged_parents`` returns ``None`` when what is there already says the same, so a writer that
finds its work done sends nothing: with every agent computing the same verdict, the first write
wins and the others become no-ops (the rule the policies' ``Accepted`` condition follows).

Within its own entry nodemesh writes only ``Accepted`` and ``ResolvedRefs``; any other
condition type found there (another tool's) is kept where it was, as the spec requires. A
condition whose ``observedGeneration`` is newer than the generation this verdict was computed
from is left as it is: this agent's copy of the route is stale, and the next event brings the
new one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from agent.policy.routes.parents import Condition, ParentVerdict

CONTROLLER_NAME = "nodemesh.io/mesh-controller"


def _condition(c: Condition, generation: int, now: str, old: Mapping[str, Any]) -> dict[str, Any]:
    seen = old.get("observedGeneration")
    if isinstance(seen, int) and seen > generation:
        return dict(old)  # written from a newer route than ours: not ours to overwrite
    status = "True" if c.status else "False"
    since = old.get("lastTransitionTime") if old.get("status") == status else None
    return {
        "type": c.type,
        "status": status,
        "reason": c.reason,
        "message": c.message,
        "observedGeneration": generation,
        "lastTransitionTime": since or now,
    }


def _parent_entry(
    verdict: ParentVerdict,
    route_namespace: str,
    generation: int,
    now: str,
    old: Mapping[str, Any] | None,
) -> dict[str, Any]:
    ours = {c.type: c for c in (verdict.accepted, verdict.resolved)}
    conditions: list[dict[str, Any]] = []
    for found in (old or {}).get("conditions") or ():
        mine = ours.pop(str(found.get("type")), None)
        conditions.append(dict(found) if mine is None else _condition(mine, generation, now, found))
    conditions += [_condition(c, generation, now, {}) for c in ours.values()]
    return {
        "parentRef": verdict.parent.as_spec(route_namespace),
        "controllerName": CONTROLLER_NAME,
        "conditions": conditions,
    }


def _same_ref(a: Mapping[str, Any], b: Mapping[str, Any], route_namespace: str) -> bool:
    def norm(ref: Mapping[str, Any]) -> tuple[object, ...]:
        return (
            ref.get("group", "gateway.networking.k8s.io"),
            ref.get("kind", "Gateway"),
            ref.get("namespace") or route_namespace,
            ref.get("name"),
            ref.get("port"),
            ref.get("sectionName"),
        )

    return norm(a) == norm(b)


def merged_parents(
    current: Sequence[Mapping[str, Any]],
    verdicts: Sequence[ParentVerdict],
    *,
    route_namespace: str,
    generation: int,
    now: str,
) -> list[dict[str, Any]] | None:
    """The new ``status.parents`` (others' entries kept, ours replaced), or ``None`` if the
    current one already says it (timestamps aside)."""
    others = [dict(p) for p in current if p.get("controllerName") != CONTROLLER_NAME]
    ours_old = [p for p in current if p.get("controllerName") == CONTROLLER_NAME]
    ours = []
    for verdict in verdicts:
        ref = verdict.parent.as_spec(route_namespace)
        old = next(
            (p for p in ours_old if _same_ref(p.get("parentRef") or {}, ref, route_namespace)),
            None,
        )
        ours.append(_parent_entry(verdict, route_namespace, generation, now, old))
    if _strip_times(ours) == _strip_times(ours_old):
        return None
    return others + ours


def _strip_times(entries: Sequence[Mapping[str, Any]]) -> list[object]:
    return [
        (
            e.get("parentRef"),
            [
                {k: v for k, v in c.items() if k != "lastTransitionTime"}
                for c in e.get("conditions") or ()
            ],
        )
        for e in entries
    ]
