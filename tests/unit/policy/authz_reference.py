"""The rule matcher ``agent.policy.authz`` compiled rules with before session 16 (closures and
``any`` over generators per field), and the walk over the selected policies ``evaluate`` made
before session 17, kept as the reference its generated matchers and set functions must decide
exactly as (``test_authz_compiled``, ``test_authz_sets``). Not used by the agent."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from agent.policy.authz import (
    HTTP_OPERATION_FIELDS,
    L7_OPERATION_FIELDS,
    L7_SOURCE_FIELDS,
    CompiledPolicy,
    Decision,
    HttpAttributes,
    Request,
    header_name,
    rule_ref,
    string_matcher,
)
from agent.state.model import PolicyObject

Predicate = Callable[[Request], bool]


def _any_string(values: Sequence[str], attr: Callable[[Request], str | None]) -> Predicate:
    matchers = [string_matcher(v.removeprefix("spiffe://")) for v in values]
    return lambda r: any(m(attr(r)) for m in matchers)


def _any_ip(blocks: Sequence[str], attr: Callable[[Request], str]) -> Predicate:
    nets = [ipaddress.ip_network(b, strict=False) for b in blocks]
    return lambda r: any(ipaddress.ip_address(attr(r)) in n for n in nets)


def _host_name(host: str | None) -> str | None:
    """A Host header without its port, lowercase (``Example.com:8080`` → ``example.com``)."""
    if host is None:
        return None
    if host.startswith("["):
        return host.partition("]")[0] + "]"
    return host.rpartition(":")[0].lower() if host.count(":") == 1 else host.lower()


def _http_field(key: str, values: Sequence[str]) -> Callable[[HttpAttributes], bool]:
    """``methods``/``paths``/``hosts`` of one request."""
    if key == "hosts":
        hosts = [string_matcher(v.lower()) for v in values]
        return lambda h: any(m(_host_name(h.host)) or m(h.host.lower()) for m in hosts)
    matchers = [string_matcher(v) for v in values]
    if key == "methods":
        return lambda h: any(m(h.method) for m in matchers)
    return lambda h: any(m(h.path) for m in matchers)


def _per_request(
    field: Callable[[HttpAttributes], bool], *, negated: bool, lenient: bool
) -> Predicate:
    """An HTTP field as a rule condition: per request on HTTP ports; on a connection (no
    ``http``) it counts as matched in a DENY or AUDIT rule and as not matched in an ALLOW rule
    (see the module docstring)."""
    if negated:
        return lambda r: lenient if r.http is None else not field(r.http)
    return lambda r: lenient if r.http is None else field(r.http)


def _any_port(ports: Sequence[str | int]) -> Predicate:
    wanted = frozenset(int(p) for p in ports)
    return lambda r: r.destination_port in wanted


_SOURCE_FIELDS: dict[str, Callable[[Sequence[str]], Predicate]] = {
    "principals": lambda v: _any_string(v, lambda r: r.principal_name),
    "namespaces": lambda v: _any_string(v, lambda r: r.source_namespace),
    "ipBlocks": lambda v: _any_ip(v, lambda r: r.source_ip),
    "remoteIpBlocks": lambda v: _any_ip(v, lambda r: r.source_ip),
}


_WHEN_KEYS: dict[str, Callable[[Sequence[str]], Predicate]] = {
    "source.ip": _SOURCE_FIELDS["ipBlocks"],
    "remote.ip": _SOURCE_FIELDS["ipBlocks"],
    "source.namespace": _SOURCE_FIELDS["namespaces"],
    "source.principal": _SOURCE_FIELDS["principals"],
    "destination.ip": lambda v: _any_ip(v, lambda r: r.destination_ip),
    "destination.port": _any_port,
}


def _negate(p: Predicate) -> Predicate:
    return lambda r: not p(r)


def _all(preds: Sequence[Predicate]) -> Predicate:
    return lambda r: all(p(r) for p in preds)


def _any(preds: Sequence[Predicate]) -> Predicate:
    return lambda r: any(p(r) for p in preds)


class _Unenforceable(Exception):
    """A rule uses an attribute L4 cannot see (handled per action, see the module docstring)."""


def _fields(
    spec: Mapping[str, Any],
    table: Mapping[str, Callable[[Sequence[str]], Predicate]],
    l7: Sequence[str],
    lenient: bool,
) -> list[Predicate]:
    preds: list[Predicate] = []
    for key, values in spec.items():
        positive = key[3].lower() + key[4:] if key.startswith("not") else key
        if positive in HTTP_OPERATION_FIELDS and key in l7:
            field = _http_field(positive, values)
            preds.append(_per_request(field, negated=key != positive, lenient=lenient))
            continue
        if key in l7:
            if not lenient:
                raise _Unenforceable(key)
            continue
        pred = table[positive](values)
        preds.append(_negate(pred) if key.startswith("not") else pred)
    return preds


def _header_condition(cond: Mapping[str, Any], name: str, lenient: bool) -> Predicate:
    """A ``request.headers[name]`` condition: per request, like the operation fields."""

    def matcher(values: Sequence[str]) -> Callable[[HttpAttributes], bool]:
        matchers = [(lambda _v: True) if v == "*" else string_matcher(v) for v in values]
        return lambda h: (value := h.header(name)) is not None and any(m(value) for m in matchers)

    preds = []
    if "values" in cond:
        preds.append(_per_request(matcher(cond["values"]), negated=False, lenient=lenient))
    if "notValues" in cond:
        preds.append(_per_request(matcher(cond["notValues"]), negated=True, lenient=lenient))
    return _all(preds)


def _when(cond: Mapping[str, Any], lenient: bool) -> Predicate | None:
    key = cond["key"]
    name = header_name(key)
    if name is not None:
        return _header_condition(cond, name, lenient)
    if key not in _WHEN_KEYS:
        if not lenient:
            raise _Unenforceable(f"when {key}")
        return None
    preds = []
    if "values" in cond:
        preds.append(_WHEN_KEYS[key](cond["values"]))
    if "notValues" in cond:
        preds.append(_negate(_WHEN_KEYS[key](cond["notValues"])))
    return _all(preds)


def compile_rule(rule: Mapping[str, Any], *, lenient: bool) -> Predicate | None:
    """A rule's predicate, or None when it can never match (an ALLOW rule with L7 fields).

    ``lenient`` (DENY and AUDIT) drops unenforceable conditions instead of refusing the rule.
    """
    try:
        parts: list[Predicate] = []
        if "from" in rule:
            srcs = [
                _all(_fields(f["source"], _SOURCE_FIELDS, L7_SOURCE_FIELDS, lenient))
                for f in rule["from"]
            ]
            parts.append(_any(srcs))
        if "to" in rule:
            ops = [
                _all(_fields(t["operation"], {"ports": _any_port}, L7_OPERATION_FIELDS, lenient))
                for t in rule["to"]
            ]
            parts.append(_any(ops))
        for cond in rule.get("when", ()):
            pred = _when(cond, lenient)
            if pred is not None:
                parts.append(pred)
    except _Unenforceable:
        return None
    return _all(parts)


def reference_policy(policy: PolicyObject) -> CompiledPolicy:
    """``compile_policy`` as it was: a closure per rule, ``any`` over them (``compile_rule``)."""
    spec: dict[str, Any] = dict(policy.spec)
    action = str(spec.get("action", "ALLOW"))
    compiled = [compile_rule(r, lenient=action != "ALLOW") for r in spec.get("rules") or ()]
    live = [(i, r) for i, r in enumerate(compiled) if r is not None]
    return CompiledPolicy(
        policy.namespace,
        policy.name,
        action,
        policy.dry_run,
        None,
        own=(
            lambda r: any(rule(r) for _, rule in live),
            lambda r: next((i for i, rule in live if rule(r)), None),
        ),
    )


def reference_decision(selected: Sequence[CompiledPolicy], request: Request) -> Decision:
    """``Authorizer.evaluate`` as it was before session 17: the policies that select the
    workload (in ``Authorizer.policies`` order) asked one by one, each through its own
    ``matches`` and ``first_rule``: dry-run ones, then AUDIT, DENY and ALLOW."""
    if not selected:
        return Decision(True, "no ALLOW policy applies")
    dry = [p for p in selected if p.dry_run]
    verbs = {"ALLOW": "allow", "DENY": "deny", "AUDIT": "audit"}
    would = tuple(
        f"{p.ref} (dry-run) would {verbs[p.action]}"
        if p.matches(request)
        else f"{p.ref} (dry-run) does not match"
        for p in dry
    )
    denying = [p for p in dry if (p.action == "DENY") == p.matches(request) and p.action != "AUDIT"]
    would_deny = tuple(p.ref for p in denying)
    would_rules = tuple(
        rule_ref(p.ref, p.first_rule(request) if p.action == "DENY" else None) for p in denying
    )
    enforced = [p for p in selected if not p.dry_run]
    audited = tuple(p.ref for p in enforced if p.action == "AUDIT" and p.matches(request))
    for p in enforced:
        if p.action == "DENY" and p.matches(request):
            rule = p.first_rule(request)
            reason = f"denied by DENY policy {rule_ref(p.ref, rule)}"
            return Decision(False, reason, p.ref, audited, would, would_deny, rule, would_rules)
    allows = [p for p in enforced if p.action == "ALLOW"]
    if not allows:
        reason = "no ALLOW policy applies"
        return Decision(True, reason, None, audited, would, would_deny, None, would_rules)
    for p in allows:
        if p.matches(request):
            reason = f"allowed by ALLOW policy {p.ref}"
            return Decision(True, reason, p.ref, audited, would, would_deny, None, would_rules)
    refs = ", ".join(p.ref for p in allows)
    reason = f"no ALLOW policy matched (applicable: {refs})"
    return Decision(False, reason, None, audited, would, would_deny, None, would_rules)
