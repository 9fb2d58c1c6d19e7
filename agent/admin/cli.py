"""``nodemesh status|workloads|connections|certs|policies|traffic``: read an agent's admin API
(``nodemesh requests``, which follows an agent, is ``agent.admin.tapcli``).

Each command fetches one endpoint and prints it as a table (``-o table``, the default, at most
100 columns) or as the endpoint's JSON (``-o json``, stable field names for scripts);
``policies NAME`` and ``policies --rules`` show policies in detail, each rule on a line
(``agent.admin.policydetail``). Errors (agent not reachable, wrong address, unknown NAME) go to
stderr with what to try, exit status 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from agent.admin import tapcli
from agent.admin.client import DEFAULT_ADMIN, AdminError, admin_address, request
from agent.admin.policydetail import PolicyNotFound, find_policies, format_policy
from agent.admin.tables import human_bytes, render
from agent.policy.authz import DEFAULT_ROOT_NAMESPACE, selects_pod
from agent.policy.warnings import policy_warnings

Formatter = Callable[[Any], str]


def _short_identity(spiffe: object) -> str:
    """``spiffe://td/ns/N/sa/S`` → ``N/S`` (the trust domain is the same everywhere)."""
    parts = str(spiffe or "").split("/")
    return f"{parts[4]}/{parts[6]}" if len(parts) >= 7 and parts[3] == "ns" else str(spiffe or "-")


def _who(workload: object, namespace: object, address: object) -> str:
    if workload and workload != "unknown":
        return f"{namespace}/{workload}"
    return str(address)


def format_status(st: Mapping[str, Any]) -> str:
    counts, state, dp = st["counts"], st["state"], st["datapath"]
    ready = "yes" if st["ready"] else "NO: " + "; ".join(st["not_ready"])
    source = state.get("source") or "-"
    if source == "file":
        source = f"file {state.get('path')} ({state.get('loads')} loads)"
        if state.get("last_error"):
            source += f"; last error: {state['last_error']}"
    lines = [
        ("node", st["node"]),
        ("version", st["version"]),
        ("ready", ready),
        ("degraded", "; ".join(st.get("degraded") or []) or "no"),
        ("uptime", f"{st['uptime_seconds']:.0f}s"),
        ("state", f"version {state['version']}, trust domain {state['trust_domain']}"),
        ("source", source),
        (
            "workloads",
            f"{counts['workloads']} in the cluster, {counts['local_workloads']} on this node "
            f"({counts['local_meshed']} meshed)",
        ),
        ("services", counts["services"]),
        ("policies", counts["policies"]),
        (
            "certificates",
            f"{counts['certificates_available']} of {counts['certificates']} available",
        ),
        ("connections", f"{counts['connections']} open"),
        (
            "datapath",
            f"{dp.get('failure_mode') or '-'}, {dp.get('pods') or 0} pods programmed, "
            f"generation {dp.get('generation') or '-'}",
        ),
    ]
    table = "\n".join(f"{k + ':':<14}{v}" for k, v in lines)
    # What the source warns of (also Events on the objects): this node's pods, the policies.
    warnings = [f"warning: {w['object']}: {w['message']}" for w in state.get("warnings") or ()]
    return "\n\n".join([table, "\n".join(warnings)]) if warnings else table


def format_workloads(data: Mapping[str, Any]) -> str:
    rows = [
        [
            w["namespace"],
            w["name"],
            w["node"],
            ",".join(w["ips"]) or "(pending)",
            "yes" if w["meshed"] else "no",
            w["service_account"],
        ]
        for w in data["workloads"]
    ]
    return render(["NAMESPACE", "NAME", "NODE", "IP", "MESHED", "SERVICE ACCOUNT"], rows)


def format_connections(data: Mapping[str, Any]) -> str:
    rows = [
        [
            "out" if c["direction"] == "outbound" else "in",
            _who(c["source_workload"], c["source_namespace"], c["source_address"]),
            _who(c["destination_workload"], c["destination_namespace"], c["destination_address"]),
            "mTLS" if c["security"] == "mutual_tls" else "none",
            human_bytes(c["bytes_sent"]),
            human_bytes(c["bytes_received"]),
            f"{c['duration_ms'] / 1000:.0f}s",
            _requests(c),
            # which replica and port: a Service's connections differ only there
            c.get("upstream_address") or c["destination_address"],
        ]
        for c in data["connections"]
    ]
    if not rows:
        return "no open connections"
    headers = ["DIR", "SOURCE", "DESTINATION", "SECURITY", "SENT", "RECEIVED", "AGE", "REQUESTS"]
    # A connection a policy change refused is listed until it has closed; what refused it is
    # a line below the table (a column would cut every other one to fit 100 columns).
    refused = [
        f"{_who(c['source_workload'], c['source_namespace'], c['source_address'])} -> "
        f"{c.get('upstream_address') or c['destination_address']}: closing, refused by "
        f"{c['policy']}"
        for c in data["connections"]
        if c.get("policy")
    ]
    return "\n".join([render([*headers, "UPSTREAM"], rows), *refused])


def _requests(c: Mapping[str, Any]) -> str:
    """``http/1.1 12``: the HTTP requests finished on the connection; ``-`` for plain TCP."""
    protocol = c.get("protocol", "tcp")
    return "-" if protocol == "tcp" else f"{protocol} {c.get('requests', 0)}"


def format_certs(data: Mapping[str, Any]) -> str:
    rows = []
    for c in data["certificates"]:
        cert = c.get("certificate") or {}
        rows.append(
            [
                _short_identity(c["identity"]),
                c["state"],
                str(cert.get("serial", "-"))[:16],
                str(cert.get("not_after", "-"))[:19],
                # Roots the identity trusts: a root rotation waits until every agent shows 2.
                str(len(cert["roots"])) if "roots" in cert else "-",
                c.get("last_error") or "",
            ]
        )
    if not rows:
        return "no local identities (no meshed pod on this node, or no --ca-address)"
    headers = ["IDENTITY (NS/SA)", "STATE", "SERIAL", "EXPIRES (UTC)", "ROOTS", "LAST ERROR"]
    return render(headers, rows)


def _policy_summary(p: Mapping[str, Any]) -> str:
    spec = p.get("spec") or {}
    if p["kind"] == "AuthorizationPolicy":
        return f"{spec.get('action', 'ALLOW')}, {len(spec.get('rules') or [])} rule(s)"
    if p["kind"] == "PeerAuthentication":
        return f"mTLS {(spec.get('mtls') or {}).get('mode', 'UNSET')}"
    if p["kind"] == "RateLimitPolicy":
        # Its numbers, not its field names: perIdentity is always there (false by default).
        rate = f"{spec.get('requestsPerSecond', '?')} rps, burst {spec.get('burst', '-')}"
        return rate + (", per identity" if spec.get("perIdentity") else "")
    return ", ".join(sorted(set(spec) - {"targetRef"})) or "-"


def _applies_to(p: Mapping[str, Any]) -> str:
    """What a policy governs, as Istio reads it: the pods of its namespace its selector names
    (all without one), of every namespace when it sits in the root namespace; a Service
    (``targetRef``); an HTTPFault, the route rules whose filter names it."""
    spec = p.get("spec") or {}
    target = spec.get("targetRef")
    if isinstance(target, Mapping):
        return f"{target.get('kind', 'Service')} {target.get('name')}"
    if p["kind"] == "HTTPFault":
        return "route rules naming it"
    labels = (spec.get("selector") or {}).get("matchLabels") or {}
    pods = (
        "pods " + ",".join(f"{k}={v}" for k, v in sorted(labels.items())) if labels else "all pods"
    )
    return f"{pods} (mesh-wide)" if p["namespace"] == DEFAULT_ROOT_NAMESPACE else pods


def format_policies(data: Mapping[str, Any]) -> str:
    rows = [
        [
            p["kind"],
            p["namespace"],
            p["name"],
            _applies_to(p),
            _policy_summary(p) + (" (dry-run)" if p.get("dry_run") else ""),
        ]
        for p in data["policies"]
    ]
    if not rows:
        return "no policies"
    table = render(["KIND", "NAMESPACE", "NAME", "APPLIES TO", "SUMMARY"], rows)
    return _with_warnings(table, data)


def _with_warnings(text: str, data: Mapping[str, Any]) -> str:
    """``text``, then the policies' warnings; principals of another trust domain only when the
    agent named its own (``/policies``: an agent from before the field does not)."""
    trust_domain = data.get("trust_domain")
    warnings = [
        f"warning: {p['kind']} {p['namespace']}/{p['name']}: {warning.message}"
        for p in data["policies"]
        for warning in policy_warnings(p["kind"], p.get("spec") or {}, trust_domain=trust_domain)
    ]
    return "\n\n".join([text, "\n".join(warnings)]) if warnings else text


def format_policy_rules(data: Mapping[str, Any]) -> str:
    """``nodemesh policies NAME`` / ``--rules``: each policy with its rules, one per line
    (``agent.admin.policydetail``), then the warnings as in the table."""
    if not data["policies"]:
        return "no policies"
    text = "\n\n".join(format_policy(p, _applies_to(p)) for p in data["policies"])
    return _with_warnings(text, data)


def _ejections(events: Mapping[str, int]) -> str:
    """Ejections so far; those refused by ``maxEjectionPercent`` apart (they ejected nothing)."""
    capped = events.get("capped", 0)
    return f"{events.get('ejected', 0)}" + (f" ({capped} capped)" if capped else "")


def format_traffic(data: Mapping[str, Any]) -> str:
    """TrafficPolicy conditions, one row per endpoint of each Service in use (its in-flight
    connections or requests, latency estimate, failures), then per Service what is in flight and
    pending, the retry budget's window and the ejections so far."""
    policies = [
        [name, c["reason"], c.get("message") or "-"] for name, c in data["policies"].items()
    ]
    rows = []
    for service, st in sorted(data["services"].items()):
        policy = st["policy"].get("policy") or "(defaults)"
        for e in st["endpoints"]:
            state = e["state"]
            if state == "EJECTED":
                state += f" {e['ejected_for']:.0f}s"
            rows.append(
                [service, policy, e["ip"], e["subset"] or "-", state, e["active"],
                 f"{e['rtt_estimate_ms']:.1f}", e["consecutive_failures"]]
            )  # fmt: skip
    totals = [
        [service, st.get("active", 0), st.get("pending", 0),
         f"{st.get('retry_budget', {}).get('retries', 0)}/"
         f"{st.get('retry_budget', {}).get('requests', 0)}",
         _ejections(st.get("ejections", {}))]
        for service, st in sorted(data["services"].items())
    ]  # fmt: skip
    parts = []
    if policies:
        parts.append(render(["TRAFFICPOLICY", "CONDITION", "MESSAGE"], policies))
    if rows:
        headers = ["SERVICE", "POLICY", "ENDPOINT", "SUBSET", "STATE", "OPEN", "RTT MS", "FAILS"]
        parts.append(render(headers, rows))
        # in flight, waiting for a slot, the retry budget's window (retries/requests), ejections
        parts.append(
            render(["SERVICE", "IN FLIGHT", "PENDING", "RETRIES/REQS", "EJECTIONS"], totals)
        )
    return "\n\n".join(parts) or "no TrafficPolicy and no Service connection yet"


def format_routes(data: Mapping[str, Any]) -> str:
    """One row per backend of each rule: weight, the share of weights, and the requests this
    node sent it (the share actually observed); a route's parents and conditions above."""
    parents, rows = [], []
    for r in data["routes"]:
        route = f"{r['kind']} {r['namespace']}/{r['name']}"
        for p in r["parents"]:
            ok = p["accepted"]["status"] and p["resolved_refs"]["status"]
            why = "-" if ok else p["accepted"]["message"] or p["resolved_refs"]["message"] or "-"
            parents.append(
                [route, p["service"], ",".join(map(str, p["ports"])) or "-",
                 p["accepted"]["reason"], p["resolved_refs"]["reason"], why]
            )  # fmt: skip
        if "error" in r:
            rows.append([route, "-", "-", "refused", "-", "-", r["error"]])
        for rule in r.get("rules", []):
            weights = sum(b["weight"] for b in rule["backends"]) or 1
            sent = sum(b["requests"] for b in rule["backends"]) or 1
            for b in rule["backends"]:
                rows.append(
                    [route, rule["index"], rule.get("match", "-"), f"{b['service']}:{b['port']}",
                     f"{b['weight']} ({100 * b['weight'] / weights:.0f}%)",
                     f"{b['requests']} ({100 * b['requests'] / sent:.0f}%)",
                     "-" if b["resolved"] else "unresolved"]
                )  # fmt: skip
    if not parents and not rows:
        return "no routes (Gateway API HTTPRoute/GRPCRoute attached to a Service)"
    return "\n\n".join(
        [
            render(["ROUTE", "PARENT", "PORTS", "ACCEPTED", "RESOLVEDREFS", "MESSAGE"], parents),
            render(["ROUTE", "RULE", "MATCH", "BACKEND", "WEIGHT", "REQUESTS", "NOTE"], rows),
        ]
    )


COMMANDS: dict[str, tuple[str, str, Formatter]] = {
    "status": ("/status", "the agent's readiness, state, certificates and datapath", format_status),
    "workloads": (
        "/workloads",
        "workloads the agent knows (--local: this node's)",
        format_workloads,
    ),
    "connections": (
        "/connections",
        "live connections through this node's proxy",
        format_connections,
    ),
    "certs": ("/certs", "certificates of this node's identities", format_certs),
    "policies": ("/policies", "policies in the agent's state", format_policies),
    "routes": (
        "/routes",
        "Gateway API routes: status per parent Service, rules, requests sent to each backend",
        format_routes,
    ),
    "traffic": (
        "/traffic",
        "traffic control: TrafficPolicy conditions, endpoint health per Service",
        format_traffic,
    ),
}


class PodNotFound(ValueError):
    """``--pod`` names no pod the agent knows; the message lists the known ones."""


def policies_for_pod(
    policies: Sequence[Mapping[str, Any]],
    workloads: Sequence[Mapping[str, Any]],
    services: Sequence[Mapping[str, Any]],
    pod: str,
) -> list[Mapping[str, Any]]:
    """The policies that govern pod ``[NS/]NAME`` (``istioctl x describe pod``'s question):
    AuthorizationPolicy and PeerAuthentication that select it (its namespace or the root one,
    as ``agent.policy.authz`` does), and the policies whose ``targetRef`` Service selects it.
    HTTPFault objects act through route rules, not on pods, and are left out."""
    namespace, _, name = pod.rpartition("/")
    namespace = namespace or "default"
    found = [w for w in workloads if (w.get("namespace"), w.get("name")) == (namespace, name)]
    if not found:
        known = ", ".join(sorted(f"{w.get('namespace')}/{w.get('name')}" for w in workloads))
        raise PodNotFound(f"no pod {namespace}/{name}; known: {known or 'none'}")
    labels = found[0].get("labels") or {}
    fronting = {
        s.get("name")
        for s in services
        if s.get("namespace") == namespace
        and s.get("selector")
        and all(labels.get(k) == v for k, v in (s.get("selector") or {}).items())
    }
    out = []
    for p in policies:
        target = (p.get("spec") or {}).get("targetRef")
        if isinstance(target, Mapping):
            if p.get("namespace") == namespace and target.get("name") in fronting:
                out.append(p)
        elif p["kind"] != "HTTPFault" and selects_pod(p, found[0]):
            out.append(p)
    return out


def run(args: argparse.Namespace) -> int:
    path, _, formatter = COMMANDS[args.command]
    if getattr(args, "local", False):
        path += "?local=1"
    try:
        data = request(args.admin, path, timeout=args.timeout)
        if getattr(args, "pod", None):
            workloads = request(args.admin, "/workloads", timeout=args.timeout)["workloads"]
            services = request(args.admin, "/services", timeout=args.timeout)["services"]
            data = {
                **data,
                "policies": policies_for_pod(data["policies"], workloads, services, args.pod),
            }
        if getattr(args, "name", None):
            data = {**data, "policies": find_policies(data["policies"], args.name)}
    except (AdminError, PodNotFound, PolicyNotFound) as e:
        print(f"nodemesh {args.command}: {e}", file=sys.stderr)
        return 1
    if getattr(args, "name", None) or getattr(args, "rules", False):
        formatter = format_policy_rules
    print(json.dumps(data, indent=2) if args.output == "json" else formatter(data))
    return 0


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--admin",
        type=admin_address,
        default=DEFAULT_ADMIN,
        metavar="HOST:PORT",
        help=f"the agent's admin API (default {DEFAULT_ADMIN})",
    )
    common.add_argument(
        "-o",
        "--output",
        choices=["table", "json"],
        default="table",
        help="table (default) or the admin API endpoint's JSON (stable field names)",
    )
    common.add_argument("--timeout", type=float, default=5.0, help="seconds to wait (default 5)")
    for name, (_path, help_text, _fmt) in COMMANDS.items():
        p = subparsers.add_parser(name, parents=[common], help=help_text, description=help_text)
        if name == "workloads":
            p.add_argument("--local", action="store_true", help="only this node's workloads")
        if name == "policies":
            p.add_argument(
                "--pod",
                metavar="[NS/]NAME",
                help="only the policies that govern this pod (its selectors, its Services)",
            )
            p.add_argument(
                "name",
                nargs="?",
                metavar="[NS/]NAME",
                help="this policy in detail: action, dry-run and each rule on one line",
            )
            p.add_argument(
                "--rules", action="store_true", help="every policy in detail, as with NAME"
            )
        p.set_defaults(func=run)
    tapcli.register(subparsers)
