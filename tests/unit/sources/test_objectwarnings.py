"""The warning ledgers: what is new to say of a pod or a policy, and who says it (no I/O)."""

from __future__ import annotations

from typing import Any

from agent.policy.warnings import ConfigWarning, policy_warnings
from agent.sources.objectwarnings import PodWarnings, PolicyWarnings
from tests.fakeapi.objects import authz, pod


def _pod(annotations: dict[str, str], *, node: str = "node1", uid: str = "u1") -> dict[str, Any]:
    obj = pod("web", "10.244.1.2", node=node, annotations=annotations)
    obj["metadata"]["uid"] = uid
    return obj


def _keys(due: list[Any]) -> list[str]:
    return [d.warning.message.split(":")[0].removeprefix("annotation ") for d in due]


def test_a_pod_is_told_once_per_uid_and_only_on_its_node() -> None:
    ledger = PodWarnings("node1")
    typo = {"nodemesh.io/http-port": "8080"}
    assert ledger.observe(_pod(typo, node="node2")) == []
    assert ledger.observe(_pod(typo, node="")) == []  # not scheduled yet: no one's pod
    [due] = ledger.observe(_pod(typo))  # scheduled here
    assert (due.key, due.uid, due.warning.reason) == (("Pod", "default", "web"), "u1",
                                                      "UnknownAnnotation")  # fmt: skip
    assert ledger.observe(_pod(typo)) == []  # a resync
    both = {**typo, "nodemesh.io/zzz": "1"}
    assert _keys(ledger.observe(_pod(both))) == ["nodemesh.io/zzz"]  # only what is new
    assert len(ledger.current()) == 2
    assert ledger.observe(_pod({})) == [] and ledger.current() == []  # fixed
    assert _keys(ledger.observe(_pod(typo))) == ["nodemesh.io/http-port"]  # broken again
    assert ledger.observe(_pod(typo), deleted=True) == []
    assert _keys(ledger.observe(_pod(typo, uid="u2"))) == ["nodemesh.io/http-port"]  # a new pod
    assert PodWarnings(None).observe(_pod(typo)) == []  # an agent with no node speaks for none


def _policy(methods: list[str], generation: int = 1, uid: str = "p1") -> dict[str, Any]:
    obj = authz("web")
    obj["spec"]["rules"] = [{"to": [{"operation": {"methods": methods}}]}]
    obj["metadata"].update(uid=uid, generation=generation)
    return obj


def _observe(ledger: PolicyWarnings, obj: dict[str, Any]) -> None:
    spec = obj["spec"]
    warnings = policy_warnings("AuthorizationPolicy", spec, trust_domain="cluster.local")
    ledger.observe("AuthorizationPolicy", obj, warnings)


KEY = ("AuthorizationPolicy", "default", "web")


def test_a_policy_warning_is_due_once_per_generation_and_only_to_the_writer() -> None:
    ledger = PolicyWarnings()
    _observe(ledger, _policy(["get"]))
    assert ledger.due({KEY}, write=False) == []  # a follower holds it
    [due] = ledger.due({KEY}, write=True)  # and records it once it leads
    assert (due.key, due.uid, due.warning.reason) == (KEY, "p1", "NeverMatches")
    assert ledger.due({KEY}, write=True) == []
    _observe(ledger, _policy(["get"]))  # same generation (a status or metadata change)
    assert ledger.due({KEY}, write=True) == []
    _observe(ledger, _policy(["get"], generation=2))  # still wrong in a new generation
    assert [d.warning for d in ledger.due({KEY}, write=True)] == [due.warning]
    _observe(ledger, _policy(["GET"], generation=3))  # fixed
    assert ledger.due({KEY}, write=True) == [] and ledger.current() == []


def test_a_deleted_policy_is_forgotten_and_a_refused_one_has_no_warnings() -> None:
    ledger = PolicyWarnings()
    _observe(ledger, _policy(["get"]))
    assert ledger.due(set(), write=True) == []  # gone from the state before anyone wrote
    assert ledger.current() == []
    ledger.observe("AuthorizationPolicy", _policy(["get"], uid="p2"), [])  # refused: no warnings
    assert ledger.due({KEY}, write=True) == []
    ledger.observe("AuthorizationPolicy", _policy(["get"], uid="p3"), [ConfigWarning("R", "m")])
    assert [d.uid for d in ledger.due({KEY}, write=True)] == ["p3"]  # recreated: a new object
