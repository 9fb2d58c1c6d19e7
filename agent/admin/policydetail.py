"""``nodemesh policies NAME`` (and ``--rules``): one policy as a reader wants it, each rule a line.

The table (``agent.admin.cli.format_policies``) says ``DENY, 2 rule(s)``, which answers "is
there a policy" but not "what does it refuse"; ``-o json`` answers that but is a dump. Here each
AuthorizationPolicy rule is one line in the CRD's own field names, so what is read maps back to
the YAML that was applied: ``from`` entries are alternatives (``or``), the fields of one entry
all apply (spaces), ``when`` conditions all apply (``and``). Other kinds have no rules; their
spec is shown as ``key: value`` lines. Pure: the admin API's ``/policies`` entries in, text out.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any


class PolicyNotFound(ValueError):
    """NAME names no policy the agent holds; the message lists the known ones."""


def find_policies(policies: Sequence[Mapping[str, Any]], name: str) -> list[Mapping[str, Any]]:
    """The policies called ``[NS/]NAME`` (any kind; without ``NS/`` every namespace), or
    :class:`PolicyNotFound` naming the policies there are."""
    namespace, _, bare = name.rpartition("/")
    found = [
        p for p in policies if p["name"] == bare and (not namespace or p["namespace"] == namespace)
    ]
    if not found:
        known = ", ".join(sorted(f"{p['namespace']}/{p['name']}" for p in policies))
        raise PolicyNotFound(f"no policy {name}; known: {known or 'none'}")
    return found


def _values(values: object) -> str:
    if isinstance(values, list | tuple):
        return ",".join(str(v) for v in values)
    return str(values)


def _fields(entry: Mapping[str, Any]) -> str:
    """``principals=a,b namespaces=x`` (the fields of one ``source`` or ``operation``)."""
    return " ".join(f"{k}={_values(v)}" for k, v in entry.items()) or "(any)"


def _alternatives(entries: Sequence[Mapping[str, Any]], inner: str) -> str:
    parts = [_fields(e.get(inner) or {}) for e in entries]
    if len(parts) == 1:
        return parts[0]
    return " or ".join(f"({p})" for p in parts)


def _condition(cond: Mapping[str, Any]) -> str:
    key = cond.get("key", "?")
    parts = []
    if "values" in cond:
        parts.append(f"{key} in [{_values(cond['values'])}]")
    if "notValues" in cond:
        parts.append(f"{key} not in [{_values(cond['notValues'])}]")
    return " and ".join(parts) or str(key)


def rule_line(rule: Mapping[str, Any]) -> str:
    """One rule in a line: ``from: ...; to: ...; when: ...`` (a rule with none of them
    matches every request)."""
    parts = []
    if rule.get("from"):
        parts.append("from: " + _alternatives(rule["from"], "source"))
    if rule.get("to"):
        parts.append("to: " + _alternatives(rule["to"], "operation"))
    if rule.get("when"):
        parts.append("when: " + " and ".join(_condition(c) for c in rule["when"]))
    return "; ".join(parts) or "every request"


def _rules(spec: Mapping[str, Any]) -> list[str]:
    rules = spec.get("rules") or []
    if not rules:
        action = spec.get("action", "ALLOW")
        then = " (ALLOW: the pods it applies to admit nothing)" if action == "ALLOW" else ""
        return [f"  rules:      none: it matches no request{then}"]
    lines = [f"  rules:      {len(rules)} (a request that any one matches)"]
    lines += [f"    [{i}] {rule_line(rule)}" for i, rule in enumerate(rules)]
    return lines


def format_policy(p: Mapping[str, Any], applies_to: str) -> str:
    """One policy: kind and name, what it applies to, its action and dry-run, then its rules
    (AuthorizationPolicy) or its spec's other fields."""
    spec = p.get("spec") or {}
    lines = [
        f"{p['kind']} {p['namespace']}/{p['name']} (generation {p.get('generation', '-')})",
        f"  applies to: {applies_to}",
    ]
    if p["kind"] == "AuthorizationPolicy":
        lines.append(f"  action:     {spec.get('action', 'ALLOW')}")
    lines.append("  dry-run:    " + ("yes (logged, not enforced)" if p.get("dry_run") else "no"))
    if p["kind"] == "AuthorizationPolicy":
        lines += _rules(spec)
    else:
        for key, value in spec.items():
            if key not in ("selector", "targetRef"):
                # The label column fits "applies to:"; a longer name (requestsPerSecond) still
                # gets its space.
                lines.append(f"  {key + ':':<11} {json.dumps(value, sort_keys=True)}")
    return "\n".join(lines)
