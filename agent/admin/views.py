"""JSON shapes of the state for the admin API (pure: a snapshot in, plain data out).

The field names are a contract (ARCHITECTURE.md, "Admin API"): the CLI and operators' scripts
read them. Lists are sorted so two dumps of the same state compare equal.
"""

from __future__ import annotations

from collections.abc import Mapping

from agent.policy.routes import RouteTable
from agent.policy.routes.model import (
    EXACT,
    PATH_PREFIX,
    GrpcMatch,
    HttpMatch,
    NamedMatch,
    PathMatch,
    Route,
    RouteKey,
    Rule,
    StringMatch,
)
from agent.policy.routes.parents import Condition
from agent.state import Snapshot, Workload
from agent.state.model import PolicyObject, Service
from agent.state.protocols import port_protocol


def workload_view(w: Workload, snap: Snapshot, node: str) -> dict[str, object]:
    return {
        "uid": w.uid,
        "name": w.name,
        "namespace": w.namespace,
        "node": w.node,
        "local": w.node == node,
        "ips": list(w.ips),
        "service_account": w.service_account,
        "identity": w.identity(snap.trust_domain),
        "meshed": snap.is_meshed(w),
        "labels": dict(w.labels),
        "exclude_outbound_ports": sorted(w.exclude_outbound_ports),
        "exclude_inbound_ports": sorted(w.exclude_inbound_ports),
        "http_ports": sorted(w.http_ports),
    }


def workloads_view(
    snap: Snapshot, node: str, *, local_only: bool = False
) -> list[dict[str, object]]:
    items = sorted(snap.workloads.values(), key=lambda w: (w.namespace, w.name))
    return [workload_view(w, snap, node) for w in items if not local_only or w.node == node]


def service_view(s: Service) -> dict[str, object]:
    return {
        "name": s.name,
        "namespace": s.namespace,
        "hostname": s.hostname(),
        "cluster_ips": list(s.cluster_ips),
        "ports": [
            {
                "name": p.name,
                "port": p.port,
                "target_port": p.target_port,
                "protocol": p.protocol,
                "app_protocol": p.app_protocol,
                "declared": port_protocol(p),
            }
            for p in s.ports
        ],
        "selector": dict(s.selector) if s.selector is not None else None,
        "endpoints": [
            {"ip": e.ip, "workload": e.workload_uid, "ready": e.ready} for e in s.endpoints
        ],
    }


def services_view(snap: Snapshot) -> list[dict[str, object]]:
    return [service_view(snap.services[k]) for k in sorted(snap.services)]


def policy_view(p: PolicyObject) -> dict[str, object]:
    return {
        "kind": p.kind,
        "namespace": p.namespace,
        "name": p.name,
        "generation": p.generation,
        "dry_run": p.dry_run,
        "spec": p.spec,
    }


def policies_view(snap: Snapshot) -> list[dict[str, object]]:
    return [policy_view(snap.policies[k]) for k in sorted(snap.policies)]


def summary(snap: Snapshot, node: str) -> dict[str, int]:
    local = list(snap.workloads_on(node))
    return {
        "workloads": len(snap.workloads),
        "local_workloads": len(local),
        "local_meshed": sum(1 for w in local if snap.is_meshed(w)),
        "services": len(snap.services),
        "policies": len(snap.policies),
    }


def routes_view(
    snap: Snapshot, routed: Mapping[tuple[RouteKey, int, str], int]
) -> list[dict[str, object]]:
    """Gateway API routes as this agent compiled them: per parent the conditions it reports,
    per rule its backends with their weights and the requests this node sent to each
    (``routed``: (route, rule, backend ``namespace/name``) → count)."""
    table = RouteTable.build(snap)
    out: list[dict[str, object]] = []
    for key in sorted(table.compiled):
        compiled = table.compiled[key]
        kind, namespace, name = key
        parents = [
            {
                "service": f"{v.parent.namespace}/{v.parent.name}",
                "ports": list(v.ports),
                "accepted": _condition(v.accepted),
                "resolved_refs": _condition(v.resolved),
            }
            for v in table.verdicts.get(key, ())
        ]
        entry: dict[str, object] = {
            "kind": kind,
            "namespace": namespace,
            "name": name,
            "parents": parents,
        }
        if isinstance(compiled, Route):
            entry["rules"] = [_rule_view(key, rule, routed) for rule in compiled.rules]
        else:
            entry["error"] = str(compiled.error)
        out.append(entry)
    return out


def _condition(c: Condition) -> dict[str, object]:
    return {"status": c.status, "reason": c.reason, "message": c.message}


def _string(m: StringMatch) -> str:
    return m.value if m.kind == EXACT else f"~{m.value}"


def _named(sep: str, m: NamedMatch) -> str:
    return f"{m.name}{sep}{_string(m.value)}"


def _path(m: PathMatch) -> str:
    """``/api*`` for a prefix (``""`` for ``/``, every path), ``=/x`` exact, ``~re`` regex."""
    if m.kind == EXACT:
        return f"={m.value}"
    if m.kind != PATH_PREFIX:
        return f"~{m.value}"
    return "" if m.value.rstrip("/") == "" else f"{m.value.rstrip('/')}*"


def match_text(m: HttpMatch | GrpcMatch) -> str:
    """One ``matches`` entry in a line (``GET /api* x-canary=true ?v=2``); ``*`` matches all.
    Why: a rule is known by what it matches, not by its index in the route's YAML."""
    if isinstance(m, HttpMatch):
        parts = [m.method or "", _path(m.path), *(_named("=", h) for h in m.headers)]
        parts += [f"?{_named('=', q)}" for q in m.query]
    else:
        service = _string(m.service) if m.service else "*"
        method = _string(m.method) if m.method else "*"
        call = "" if (service, method) == ("*", "*") else f"/{service}/{method}"
        parts = [call, *(_named("=", h) for h in m.headers)]
    return " ".join(p for p in parts if p) or "*"


def _rule_view(
    key: RouteKey, rule: Rule, routed: Mapping[tuple[RouteKey, int, str], int]
) -> dict[str, object]:
    backends = []
    for b in rule.backends:
        ref = f"{b.namespace}/{b.name}"
        backends.append(
            {
                "service": ref,
                "port": b.port,
                "weight": b.weight,
                "resolved": b.resolved,
                "requests": routed.get((key, rule.index, ref), 0),
            }
        )
    return {
        "index": rule.index,
        "name": rule.name,
        "matches": len(rule.matches),
        "match": " | ".join(match_text(m) for m in rule.matches),
        "backends": backends,
    }
