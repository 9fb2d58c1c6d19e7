"""Handlers: relists replace exactly their own kind, and malformed objects never remove state."""

from __future__ import annotations

from typing import Any

from agent.policy.authz import Authorizer, Request
from agent.sources import kubehandlers as kh
from agent.sources.kubeobjects import InvalidObject, Raw
from agent.state import StateStore
from tests.fakeapi.objects import authz, endpoint_slice, pod, service
from tests.workloads import workload


class _Reports:
    def __init__(self) -> None:
        self.invalid: list[tuple[str, str]] = []
        self.verdicts: list[tuple[str, bool]] = []

    def report_invalid(self, obj: Raw, error: InvalidObject) -> None:
        self.invalid.append((obj["metadata"]["name"], error.reason))

    def report_pod(self, obj: Raw, deleted: bool) -> None:
        return None

    def report_namespace(self, obj: Raw, deleted: bool) -> None:
        return None

    def report_policy(self, plural: str, obj: Raw, error: InvalidObject | None) -> None:
        self.verdicts.append((obj["metadata"]["name"], error is None))

    def observe_route(self, kind: str, obj: Raw, deleted: bool) -> None:
        return None

    def report_routes(self) -> None:
        return None


def _ctx() -> tuple[kh.Context, _Reports]:
    reports = _Reports()
    return kh.Context(StateStore(), reports), reports


def _uid(obj: dict[str, Any]) -> dict[str, Any]:
    obj["metadata"]["uid"] = f"uid-{obj['metadata']['name']}"
    return obj


def _traffic(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "nodemesh.io/v1alpha1",
        "kind": "TrafficPolicy",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"targetRef": {"kind": "Service", "name": "s"}},
    }


def test_relist_of_one_policy_kind_keeps_the_others() -> None:
    ctx, reports = _ctx()
    authzs = kh.Policies(ctx, "AuthorizationPolicy", "authorizationpolicies")
    traffic = kh.Policies(ctx, "TrafficPolicy", "trafficpolicies")
    authzs.replace([authz("a1"), authz("a2")])
    traffic.replace([_traffic("t1")])
    authzs.replace([authz("a2")])
    snap = ctx.store.snapshot()
    assert [p.name for p in snap.policies_of("AuthorizationPolicy")] == ["a2"]
    assert [p.name for p in snap.policies_of("TrafficPolicy")] == ["t1"]
    assert ("a1", True) in reports.verdicts


def test_invalid_policy_keeps_its_previous_version() -> None:
    ctx, reports = _ctx()
    policies = kh.Policies(ctx, "AuthorizationPolicy", "authorizationpolicies")
    policies.event("ADDED", authz("p", "DENY"))
    broken = authz("p")
    broken["spec"]["rules"] = "everything"
    policies.event("MODIFIED", broken)
    policies.replace([broken])
    (kept,) = ctx.store.snapshot().policies_of("AuthorizationPolicy")
    assert kept.spec["action"] == "DENY"
    assert reports.verdicts[-1] == ("p", False)
    assert reports.invalid[-1] == ("p", "InvalidSpec")


def test_malformed_pod_and_namespace_are_skipped_not_fatal() -> None:
    ctx, reports = _ctx()
    pods, namespaces = kh.Pods(ctx), kh.Namespaces(ctx)
    good = _uid(pod("good", "10.0.0.1"))
    odd = _uid(pod("odd", "10.0.0.2"))
    odd["status"]["podIPs"] = "10.0.0.2"  # a string where a list belongs
    pods.replace([good, odd])
    namespaces.replace(
        [
            {"metadata": {"name": "default"}},
            {"metadata": {"name": "weird", "labels": ["not", "a", "map"]}},
        ]
    )
    snap = ctx.store.snapshot()
    assert {w.name for w in snap.workloads.values()} == {"good"}
    assert set(snap.namespaces) == {"default"}
    assert ("odd", "MalformedObject") in reports.invalid
    assert ("weird", "MalformedObject") in reports.invalid


def test_unreadable_slice_keeps_previous_endpoints() -> None:
    ctx, reports = _ctx()
    kh.Services(ctx).replace([service("s", "10.96.0.1")])
    slices = kh.EndpointSlices(ctx)
    slices.replace([endpoint_slice("s-1", "s", ["10.0.0.1"])])
    broken = endpoint_slice("s-1", "s", ["10.0.0.9"])
    broken["ports"] = [{"name": "http", "port": "eighty"}]
    slices.event("MODIFIED", broken)
    slices.replace([broken])
    svc = ctx.store.snapshot().service_by_ip["10.96.0.1"]
    assert [e.ip for e in svc.endpoints] == ["10.0.0.1"]
    assert reports.invalid == [("s-1", "MalformedObject")] * 2
    slices.event("DELETED", broken)
    assert not ctx.store.snapshot().service_by_ip["10.96.0.1"].endpoints


def test_istio_dry_run_annotation_is_read_from_the_cluster() -> None:
    ctx, reports = _ctx()
    policies = kh.Policies(ctx, "AuthorizationPolicy", "authorizationpolicies")
    trial = authz("trial", "DENY")
    trial["metadata"]["annotations"] = {"istio.io/dry-run": "true"}
    policies.event("ADDED", trial)
    (policy,) = ctx.store.snapshot().policies_of("AuthorizationPolicy")
    assert policy.dry_run is True
    assert reports.verdicts == [("trial", True)]


def _first_seen_invalid(spec: dict[str, Any]) -> tuple[Any, _Reports, list[str]]:
    """An AuthorizationPolicy the agent refuses on its first sight, and what stands in for it."""
    ctx, reports = _ctx()
    messages: list[str] = []
    reports.report_policy = lambda plural, obj, error: messages.append(  # type: ignore[method-assign]
        "" if error is None else error.message
    )
    broken = authz("p")
    broken["spec"] = spec
    kh.Policies(ctx, "AuthorizationPolicy", "authorizationpolicies").replace([broken])
    return list(ctx.store.snapshot().policies_of("AuthorizationPolicy")), reports, messages


def _decide(policies: Any, workload: Any) -> bool:
    request = Request("10.0.0.9", workload.ips[0], 8080, "spiffe://cluster.local/ns/default/sa/c")
    return Authorizer.compile(policies).evaluate(request, workload).allowed


def test_a_refused_allow_policy_without_a_valid_version_fails_closed() -> None:
    # `from: []` matched nothing before minItems existed, so this ALLOW admitted nobody; dropping
    # it at the agent's first sight would admit everybody.
    selector = {"matchLabels": {"app": "server"}}
    spec = {"action": "ALLOW", "selector": selector, "rules": [{"from": []}]}
    (stand_in,), reports, messages = _first_seen_invalid(spec)
    assert dict(stand_in.spec) == {"action": "ALLOW", "selector": selector}
    assert reports.invalid == [("p", "InvalidSpec")]
    assert "enforced as an ALLOW of nothing for its selector (fail closed)" in messages[-1]
    server = workload("server-0", "node1", "10.244.1.5", app="server")
    other = workload("other-0", "node1", "10.244.1.6", app="other")
    assert not _decide([stand_in], server)
    assert _decide([stand_in], other)


def test_a_refused_deny_policy_denies_everything_it_selects() -> None:
    spec = {"action": "DENY", "selector": {"matchLabels": "garbled"}, "rules": [{"to": []}]}
    (stand_in,), _, messages = _first_seen_invalid(spec)
    assert dict(stand_in.spec) == {"action": "DENY", "rules": [{}]}  # unreadable selector: all
    assert "a DENY of every request for the whole namespace" in messages[-1]
    assert not _decide([stand_in], workload("any-0", "node1", "10.244.1.7"))


def test_a_refused_audit_policy_has_no_stand_in() -> None:
    policies, reports, _ = _first_seen_invalid({"action": "AUDIT", "rules": [{"from": []}]})
    assert policies == []
    assert reports.invalid == [("p", "InvalidSpec")]


def test_a_refused_policy_seen_again_is_still_stood_in_for_and_says_so() -> None:
    """The agent's own status write comes back as a MODIFIED event of the same refused object:
    the stand-in is not a valid version, so the status must keep saying "fail closed" (it said
    "the previous valid version stays in force" on the second sight), and an edit that is still
    invalid gets a stand-in from what the object says now."""
    ctx, reports = _ctx()
    messages: list[str] = []
    reports.report_policy = lambda plural, obj, error: messages.append(  # type: ignore[method-assign]
        "" if error is None else error.message
    )
    policies = kh.Policies(ctx, "AuthorizationPolicy", "authorizationpolicies")
    broken = authz("p", "DENY")
    broken["spec"]["rules"] = "everything"
    policies.event("ADDED", broken)
    policies.event("MODIFIED", broken)  # its status write, seen again
    policies.replace([broken])  # a relist
    assert len(messages) == 3 and all("(fail closed)" in m for m in messages), messages
    (stand_in,) = ctx.store.snapshot().policies_of("AuthorizationPolicy")
    assert stand_in.spec["action"] == "DENY"
    broken["spec"]["action"] = "ALLOW"  # edited, still invalid: the stand-in follows it
    policies.event("MODIFIED", broken)
    (stand_in,) = ctx.store.snapshot().policies_of("AuthorizationPolicy")
    assert stand_in.spec["action"] == "ALLOW" and "an ALLOW of nothing" in messages[-1]
    fixed = authz("p", "DENY")
    policies.event("MODIFIED", fixed)  # valid again: no stand-in, and a later refusal keeps it
    policies.event("MODIFIED", broken)
    (kept,) = ctx.store.snapshot().policies_of("AuthorizationPolicy")
    assert kept.spec["rules"] == fixed["spec"]["rules"] and "(fail closed)" not in messages[-1]
