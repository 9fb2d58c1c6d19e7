"""``Authorizer``'s selection index: the policies that select a workload are found through the
namespace index and kept per workload, with decisions equal to the walk over every policy."""

from __future__ import annotations

import gc
import random
import weakref
from typing import Any

import pytest

from agent.policy.authz import (
    Authorizer,
    CompiledPolicy,
    Decision,
    HttpAttributes,
    Request,
    compile_policy,
)
from agent.proxy.core import Core
from agent.state.model import PolicyObject, Workload
from agent.state.store import StateStore
from tests.unit.policy.authz_reference import reference_decision

ROOT = "nodemesh-system"
NAMESPACES = (ROOT, "shop", "bank", "lab")
LABELS = (("app", ("web", "db")), ("tier", ("front", "back")))


def reference_evaluate(authz: Authorizer, request: Request, workload: Workload) -> Decision:
    """``Authorizer.evaluate`` as it was before the index: every policy asked ``selects``, the
    selected ones asked one by one (``reference_decision``)."""
    selected = [p for p in authz.policies if p.selects(workload, authz.root_namespace)]
    return reference_decision(selected, request)


def _labels(rng: random.Random) -> dict[str, str]:
    return {k: rng.choice(vs) for k, vs in LABELS if rng.random() < 0.6}


def _rule(rng: random.Random) -> dict[str, Any]:
    return rng.choice(
        [
            {},
            {"from": [{"source": {"namespaces": [rng.choice(NAMESPACES)]}}]},
            {"from": [{"source": {"principals": ["cluster.local/ns/shop/sa/*"]}}]},
            {"from": [{"source": {"notPrincipals": ["*"]}}]},
            {"to": [{"operation": {"ports": [str(rng.choice([80, 8080]))]}}]},
            {"to": [{"operation": {"methods": ["GET"]}}]},
            {"to": [{"operation": {"notPaths": ["/admin*"]}}]},
            {"when": [{"key": "request.headers[x-a]", "values": ["1"]}]},
        ]
    )


def _policy(rng: random.Random, i: int) -> PolicyObject:
    spec: dict[str, Any] = {"action": rng.choice(["ALLOW", "ALLOW", "DENY", "AUDIT"])}
    if rng.random() < 0.6:
        spec["selector"] = {"matchLabels": _labels(rng)}
    if rng.random() < 0.9:
        spec["rules"] = [_rule(rng) for _ in range(rng.randint(1, 3))]
    ns = rng.choice(NAMESPACES)
    return PolicyObject("AuthorizationPolicy", ns, f"p{i}", spec, dry_run=rng.random() < 0.2)


def _workload(rng: random.Random, i: int) -> Workload:
    ns = rng.choice(NAMESPACES)
    return Workload(f"u{i}", f"w{i}", ns, "sa", "node1", ("10.244.1.3",), _labels(rng))


def _request(rng: random.Random) -> Request:
    http = None
    if rng.random() < 0.5:
        headers = [(b"x-a", b"1")] if rng.random() < 0.5 else []
        http = HttpAttributes(
            rng.choice(["GET", "POST"]), rng.choice(["/", "/admin"]), "h", headers
        )
    principal = rng.choice(
        [None, "spiffe://cluster.local/ns/shop/sa/a", "cluster.local/ns/lab/sa/b"]
    )
    return Request("10.244.2.2", "10.244.1.3", rng.choice([80, 8080]), principal, http)


@pytest.mark.parametrize("seed", range(40))
def test_decisions_equal_the_walk_over_every_policy(seed: int) -> None:
    rng = random.Random(seed)
    objs = [_policy(rng, i) for i in range(rng.randint(0, 30))]
    compiled = [compile_policy(p) for p in objs]
    rng.shuffle(compiled)  # any order the constructor is given is kept, not only compile's sort
    authzs = [
        Authorizer(compiled, root_namespace=ROOT),
        Authorizer(compiled, root_namespace=ROOT, cache_size=2),  # evicting all the time
        Authorizer.compile(objs, root_namespace=ROOT),
    ]
    workloads = [_workload(rng, i) for i in range(12)]
    for _ in range(150):
        w = rng.choice(workloads)
        if rng.random() < 0.3:  # an equal workload that is another object: the label cache
            w = Workload(w.uid, w.name, w.namespace, "sa", "node1", w.ips, dict(w.labels))
        request = _request(rng)
        for authz in authzs:
            assert authz.evaluate(request, w) == reference_evaluate(authz, request, w)
            assert authz.applies_to(w) == any(p.selects(w, ROOT) for p in authz.policies)


def _counting(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    calls: list[str] = []
    original = CompiledPolicy.selects

    def selects(self: CompiledPolicy, workload: Workload, root_namespace: str) -> bool:
        calls.append(self.ref)
        return original(self, workload, root_namespace)

    monkeypatch.setattr(CompiledPolicy, "selects", selects)
    return calls


def _spread(count: int) -> list[PolicyObject]:
    """``count`` ALLOW policies over 50 namespaces, none of them the workload's."""
    return [
        PolicyObject("AuthorizationPolicy", f"ns{i % 50}", f"p{i}", {"rules": [{}]})
        for i in range(count)
    ]


SHOP = Workload("u", "w", "shop", "sa", "node1", ("10.244.1.3",), {"app": "web"})
REQ = Request("10.244.2.2", "10.244.1.3", 8080, "spiffe://cluster.local/ns/x/sa/y")


def test_a_second_evaluate_for_the_workload_asks_no_policy(monkeypatch: pytest.MonkeyPatch) -> None:
    mine = PolicyObject("AuthorizationPolicy", "shop", "mine", {"rules": [{}]})
    authz = Authorizer.compile([*_spread(200), mine], root_namespace=ROOT)
    calls = _counting(monkeypatch)
    assert authz.evaluate(REQ, SHOP).policy == "shop/mine"
    assert calls == ["shop/mine"]  # only the workload's namespace (and the root's) asked
    calls.clear()
    assert authz.evaluate(REQ, SHOP).policy == "shop/mine"
    assert authz.applies_to(SHOP)
    assert calls == []


def test_another_pod_with_the_same_labels_shares_the_selection(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    authz = Authorizer.compile(_spread(100), root_namespace=ROOT)
    calls = _counting(monkeypatch)
    authz.evaluate(REQ, SHOP)
    twin = Workload("u2", "w2", "shop", "sa", "node1", ("10.244.1.4",), {"app": "web"})
    assert authz.evaluate(REQ, twin) is authz.evaluate(REQ, SHOP)
    assert calls == []  # nothing in shop or the root namespace, and not one walk for the twin


def test_the_selection_caches_are_bounded() -> None:
    objs = [PolicyObject("AuthorizationPolicy", "shop", "p", {"rules": [{}]})]
    authz = Authorizer.compile(objs, root_namespace=ROOT)
    authz.cache_size = 3
    pods = [Workload(f"u{i}", f"w{i}", "shop", "sa", "n", (), {"app": f"a{i}"}) for i in range(10)]
    for w in pods:
        assert authz.evaluate(REQ, w).allowed
    assert len(authz._by_workload) == 3 and len(authz._by_labels) == 3
    assert len(authz._by_set) == 1  # one policy set: every pod shares its functions
    assert [entry[0] for entry in authz._by_workload.values()] == pods[-3:]  # the oldest went


def test_a_cache_size_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="cache_size 0 must be at least 1"):
        Authorizer([], root_namespace=ROOT, cache_size=0)


def test_the_selection_goes_with_the_state_version() -> None:
    """``Core.policies`` builds an Authorizer per state version: a new policy selects a pod
    the old version's cache said nothing selected, and the old Authorizer (its caches with it)
    is freed."""
    store = StateStore()
    with store.update() as tx:
        tx.put_workload(SHOP)
    core = Core(node="node1", store=store, identities=None)  # type: ignore[arg-type]
    old = core.policies().authz
    assert old.evaluate(REQ, SHOP).policy is None and old._by_workload
    gone = weakref.ref(old)
    del old
    with store.update() as tx:
        tx.put_policy(PolicyObject("AuthorizationPolicy", "shop", "none", {}))
    assert not core.policies().authz.evaluate(REQ, SHOP).allowed
    gc.collect()
    assert gone() is None


def test_a_state_version_that_changed_no_policy_compiles_none() -> None:
    """``Core.policies`` hands the last version's Authorizer on: a version that changed a pod
    keeps every compiled policy (the store keeps unchanged objects), one that changed a policy
    compiles that one."""
    store = StateStore()
    kept = PolicyObject("AuthorizationPolicy", "shop", "kept", {"rules": [{}]})
    with store.update() as tx:
        tx.put_workload(SHOP)
        tx.put_policy(kept)
    core = Core(node="node1", store=store, identities=None)  # type: ignore[arg-type]
    first = core.policies().authz
    with store.update() as tx:
        tx.put_workload(Workload("u2", "w2", "shop", "sa", "node1", (), {}))
    second = core.policies().authz
    assert second is not first and second.policies[0] is first.policies[0]
    with store.update() as tx:
        tx.put_policy(PolicyObject("AuthorizationPolicy", "shop", "new", {}))
    third = core.policies().authz
    assert [p.name for p in third.policies] == ["kept", "new"]
    assert third.policies[0] is first.policies[0]
