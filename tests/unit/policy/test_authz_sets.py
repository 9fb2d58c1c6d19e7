"""Every policy that selects a workload decided by one generated function per kind
(``authz._SetCompiler``): over random sets of policies (ALLOW, DENY, AUDIT, dry-run, the
fail-closed stand-ins of refused ones, now and then a malformed one) and random L4 and HTTP
requests, ``Authorizer.evaluate`` gives the ``Decision`` of the old walk over the closures
(``authz_reference``), policy, rule and reports included, and refuses a malformed set with the
same error; a decision costs the same Python calls whatever the number of policies; no policy
value is in the generated text; a large set is cut into functions that share code."""

from __future__ import annotations

import functools
import random
from collections.abc import Iterator
from types import CodeType, FrameType
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.policy import authz
from agent.policy.authz import Authorizer, HttpAttributes, Request
from agent.state.model import PolicyObject, Workload
from tests.bench.policy.bench_authz_match import mixed
from tests.bench.policy.bench_authz_match import policies as allows
from tests.calls import CallCount
from tests.unit.policy.authz_reference import reference_decision, reference_policy
from tests.unit.policy.test_authz_compiled import request, specs

POD = Workload("u", "web", "shop", "sa", "node1", ("10.0.0.9",), {"app": "web"})
ROOT = "nodemesh-system"
# What ``kubeobjects.fail_closed_stand_in`` enforces for a refused ALLOW and a refused DENY.
STAND_INS = st.sampled_from([{"action": "ALLOW"}, {"action": "DENY", "rules": [{}]}])
SETS = st.lists(
    st.tuples(specs | STAND_INS, st.booleans(), st.sampled_from(["shop", ROOT])),
    min_size=1,
    max_size=8,
)


KINDS = ("dry", "audit", "deny", "allow")  # the fields of a selection holding its functions


def generated(authz_: Authorizer, workload: Workload) -> list[CodeType]:
    """The code of every generated function that decides for ``workload``."""
    selection = authz_._selection(workload)
    codes = []
    for kind in KINDS:
        fn = getattr(selection, kind)
        if fn is None:
            continue
        functions = fn.args[0] if isinstance(fn, functools.partial) else (fn,)
        codes.extend(f.__code__ for f in functions)
    return codes


def outcome(make: Any, objects: list[PolicyObject]) -> Any:
    try:
        return make(objects)
    except Exception as e:  # compared: both must refuse alike
        return (type(e), str(e))


def reference_set(objects: list[PolicyObject]) -> list[Any]:
    """The old compiled policies, in ``Authorizer.policies`` order."""
    return sorted((reference_policy(p) for p in objects), key=lambda c: c.ref)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    policies=SETS,
    requests=st.lists(request(), min_size=1, max_size=10),
    cut=st.sampled_from([1, 2, authz.SET_FUNCTION_RULES]),
)
def test_set_functions_decide_as_the_walk_over_the_closures(
    policies: list[tuple[dict[str, Any], bool, str]], requests: list[Request], cut: int
) -> None:
    """``cut``: the rules per generated function, small enough now and then that a set is cut
    into several (asked in turn) at every place."""
    objects = [
        PolicyObject("AuthorizationPolicy", ns, f"p{i}", spec, dry_run=dry)
        for i, (spec, dry, ns) in enumerate(policies)
    ]
    old = outcome(reference_set, objects)
    new = outcome(Authorizer.compile, objects)
    if not isinstance(new, Authorizer):
        assert new == old  # a malformed policy: the same error type and message
        return
    assert isinstance(old, list), old
    default, authz.SET_FUNCTION_RULES = authz.SET_FUNCTION_RULES, cut
    try:
        for r in requests:
            assert new.evaluate(r, POD) == reference_decision(old, r), (policies, r)
    finally:
        authz.SET_FUNCTION_RULES = default


class Calls(CallCount):
    """``CallCount`` counting every call made within ``Authorizer.evaluate`` (itself
    included), not one function's: Python functions (``count``) and built-ins
    (``builtins``)."""

    def __init__(self) -> None:
        super().__init__(Authorizer.evaluate.__code__)
        self.builtins = 0
        self._inside = False

    def _profile(self, frame: FrameType, event: str, _arg: Any) -> None:
        if event == "call" and frame.f_code is self.code:
            self._inside = True
        if not self._inside:
            return
        if event == "call":
            self.count += 1
        elif event == "c_call":
            self.builtins += 1
        elif event == "return" and frame.f_code is self.code:
            self._inside = False


def _last(count: int) -> Request:
    """A GET only the last of ``allows(count)`` lets through."""
    http = HttpAttributes("GET", f"/api/v{count - 1}/items", "web", ((b"host", b"web"),))
    return Request(
        "10.0.2.2", "10.0.0.9", 8080, f"spiffe://cluster.local/ns/front/sa/c{count - 1}", http
    )


def _calls(objects: list[PolicyObject], req: Request) -> tuple[int, int]:
    authz_ = Authorizer.compile(objects)
    authz_.evaluate(req, POD)  # the selection and its functions are made once
    with Calls() as calls:
        decision = authz_.evaluate(req, POD)
    assert decision == reference_decision(list(authz_.applicable(POD)), req)
    return calls.count, calls.builtins


@pytest.mark.parametrize("count", [1, 100])
def test_a_decision_costs_the_same_calls_whatever_the_number_of_policies(count: int) -> None:
    """``evaluate``, the selection and the one generated ALLOW function: 3 Python calls,
    where the walk made one per policy asked, and one built-in (103 and 103 at 100).
    Built-ins: the selection's ``id`` and ``dict.get``, the principal's ``removeprefix`` and
    one ``startswith`` on the path (the rules ask the principal first, so only the last
    policy's path is read). With a DENY, an AUDIT and a dry-run DENY beside them: their three
    functions more (a ``startswith`` each), and the ``Decision.__init__`` that reports what
    they said."""
    assert _calls(allows(count), _last(count)) == (3, 4)
    assert _calls(mixed(count), _last(count)) == (7, 7)


def test_the_set_functions_text_holds_no_policy_value() -> None:
    """Policy values and refs (which are policy names) are constants bound in the set
    functions' globals, never source: the set functions of every kind hold neither."""
    hostile = "x') or True or ('"
    rules = [
        {"to": [{"operation": {"paths": [hostile, f"{hostile}*", f"*{hostile}"]}}]},
        {"when": [{"key": "request.headers[x-token]", "values": [hostile]}]},
        {"from": [{"source": {"principals": [f"cluster.local/ns/{hostile}/sa/a"]}}]},
    ]
    objects = [
        PolicyObject(
            "AuthorizationPolicy", "shop", name, {"action": action, "rules": rules}, dry_run=dry
        )
        for name, action, dry in [
            ("allow-x", "ALLOW", False),
            ("deny-x", "DENY", False),
            ("audit-x", "AUDIT", False),
            ("trial-x", "DENY", True),
            ("narrow-x", "ALLOW", True),
        ]
    ]
    authz_ = Authorizer.compile(objects)
    plain = Request("10.0.0.1", "10.0.0.9", 80, None, HttpAttributes("GET", "/", "web"))
    assert authz_.evaluate(plain, POD) == reference_decision(list(authz_.applicable(POD)), plain)
    hit = Request("10.0.0.1", "10.0.0.9", 80, None, HttpAttributes("GET", hostile, "web"))
    decision = authz_.evaluate(hit, POD)
    assert (decision.allowed, decision.refused_by()) == (False, "shop/deny-x:rules[0]")
    codes = generated(authz_, POD)
    assert len(codes) == 4  # dry-run, AUDIT, DENY, ALLOW
    for code in codes:
        texts = [str(c) for c in code.co_consts] + list(code.co_names)
        assert not any(hostile in t or "-x" in t for t in texts), texts


def _large(rng: random.Random, count: int) -> list[PolicyObject]:
    """``count`` policies of a few shapes, all selecting ``POD``: ALLOWs of one principal each,
    DENYs of a path, AUDITs, a few dry-run."""
    out = []
    for i in range(count):
        action = rng.choice(["ALLOW", "ALLOW", "ALLOW", "DENY", "AUDIT"])
        rule: dict[str, Any] = rng.choice(
            [
                {"from": [{"source": {"principals": [f"cluster.local/ns/front/sa/c{i}"]}}]},
                {"to": [{"operation": {"paths": [f"/p{i}/*"], "methods": ["POST"]}}]},
                {"when": [{"key": "source.ip", "values": [f"10.{i % 250}.0.0/16"]}]},
            ]
        )
        spec = {"action": action, "rules": [rule] * rng.randint(1, 3)}
        name = f"p{i:04d}"
        out.append(PolicyObject("AuthorizationPolicy", "shop", name, spec, dry_run=i % 97 == 0))
    return out


def _requests(rng: random.Random, count: int) -> Iterator[Request]:
    for _ in range(200):
        i = rng.randrange(count)
        http = HttpAttributes(rng.choice(["GET", "POST"]), rng.choice([f"/p{i}/x", "/"]), "web")
        principal = rng.choice([None, f"spiffe://cluster.local/ns/front/sa/c{i}"])
        yield Request(f"10.{i % 250}.1.1", "10.0.0.9", 80, principal, http if i % 2 else None)


def test_two_thousand_policies_are_cut_into_functions() -> None:
    """2,000 policies of every kind select the pod: each kind's function is cut every
    ``SET_FUNCTION_RULES`` rules at most (whole policies, of 1-3 rules here, per function),
    and the decisions are the walk's."""
    rng = random.Random(17)
    authz_ = Authorizer.compile(_large(rng, 2000))
    selected = list(authz_.applicable(POD))
    assert len(selected) == 2000
    for r in _requests(rng, 2000):
        assert authz_.evaluate(r, POD) == reference_decision(selected, r)
    selection = authz_._selection(POD)
    for kind in KINDS:
        fn = getattr(selection, kind)
        of_kind = [p for p in selected if (kind == "dry") == p.dry_run]
        if kind != "dry":
            of_kind = [p for p in of_kind if p.action == kind.upper()]
        rules = sum(p.written.count for p in of_kind)
        size = authz.SET_FUNCTION_RULES
        functions = fn.args[0] if isinstance(fn, functools.partial) else (fn,)
        assert rules / size <= len(functions) <= rules / (size - 2) + 1, (kind, rules)


def test_same_shaped_runs_of_policies_share_code() -> None:
    """1,000 ALLOWs of one shape (other principals, paths): four functions, the first three
    one code object (their text is the same: constants by name, numbered per function)."""
    authz_ = Authorizer.compile(allows(1000))
    codes = generated(authz_, POD)
    assert len(codes) == 4
    assert codes[0] is codes[1] is codes[2] and codes[3] is not codes[0]
    req = _last(1000)
    assert authz_.evaluate(req, POD) == reference_decision(list(authz_.applicable(POD)), req)


def test_a_policy_of_more_rules_than_a_function_holds_is_one_function() -> None:
    """A policy is never cut: one of 600 rules (each a principal) is a function of its own
    between the policies before and after it, and decides by its 600th rule."""
    many = [
        {"from": [{"source": {"principals": [f"cluster.local/ns/front/sa/c{i}"]}}]}
        for i in range(600)
    ]
    objects = [
        PolicyObject(
            "AuthorizationPolicy",
            "shop",
            "a",
            {"action": "DENY", "rules": [{"to": [{"operation": {"ports": ["1"]}}]}]},
        ),
        PolicyObject("AuthorizationPolicy", "shop", "b", {"action": "DENY", "rules": many}),
        PolicyObject("AuthorizationPolicy", "shop", "c", {"action": "DENY", "rules": [{}]}),
    ]
    authz_ = Authorizer.compile(objects)
    last = Request("10.0.2.2", "10.0.0.9", 80, "spiffe://cluster.local/ns/front/sa/c599")
    decision = authz_.evaluate(last, POD)
    assert decision.refused_by() == "shop/b:rules[599]"
    assert decision == reference_decision(list(authz_.applicable(POD)), last)
    deny = authz_._selection(POD).deny
    assert isinstance(deny, functools.partial) and len(deny.args[0]) == 3


def test_workloads_the_same_policies_select_share_their_functions() -> None:
    """The selection is kept per policy set too: a pod of other labels that the same policies
    select gets the same functions, not a second build."""
    objects = [PolicyObject("AuthorizationPolicy", "shop", "p", {"rules": [{}]})]
    authz_ = Authorizer.compile(objects)
    other = Workload("u2", "db", "shop", "sa", "node1", ("10.0.0.8",), {"app": "db"})
    assert authz_._selection(POD) is authz_._selection(other)


def test_the_policy_set_cache_is_bounded() -> None:
    """Ten pods, each selected by a policy of its own: with a cache of 3, three sets stay."""
    objects = [
        PolicyObject(
            "AuthorizationPolicy", "shop", f"p{i}", {"selector": {"matchLabels": {"app": f"a{i}"}}}
        )
        for i in range(10)
    ]
    authz_ = Authorizer.compile(objects)
    authz_.cache_size = 3
    for i in range(10):
        pod = Workload(f"u{i}", f"w{i}", "shop", "sa", "n", (), {"app": f"a{i}"})
        assert not authz_.evaluate(Request("10.0.0.1", "10.0.0.9", 80), pod).allowed
    kept = [sel.policies for sel in authz_._by_set.values()]
    assert [tuple(p.name for p in policies) for policies in kept] == [("p7",), ("p8",), ("p9",)]


def _version(
    objects: list[PolicyObject], previous: Authorizer | None = None
) -> tuple[Authorizer, list[str]]:
    """``objects`` compiled as a new state version after ``previous``; the refs of the
    policies ``compile_policy`` compiled for it."""
    compiled: list[str] = []
    real = authz.compile_policy

    def counting(policy: PolicyObject) -> authz.CompiledPolicy:
        compiled.append(f"{policy.namespace}/{policy.name}")
        return real(policy)

    authz.compile_policy = counting  # type: ignore[assignment]
    try:
        return Authorizer.compile(objects, previous=previous), compiled
    finally:
        authz.compile_policy = real  # type: ignore[assignment]


def test_a_policys_own_functions_are_built_only_when_asked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A policy's own ``matches`` and ``first_rule`` were written by ``compile_policy``, on the
    loop that serves traffic, though decisions ask the set functions and only tests and tools
    ask them (about a fifth of a changed policy's compile). Now compiling and deciding write
    no such function; the first ask builds both, once, and they decide as the set does."""
    texts: list[str] = []
    real = authz._code

    def noting(source: str) -> CodeType:
        texts.append(source.partition("(")[0])
        return real(source)

    monkeypatch.setattr(authz, "_code", noting)
    objects = mixed(3)
    pod = Workload("u", "web", "shop", "sa", "n", (), {"app": "web"})
    version = Authorizer.compile(objects)
    get = Request("10.0.0.1", "10.0.0.9", 80, http=HttpAttributes("GET", "/admin/x", "web"))
    decided = version.evaluate(get, pod)
    assert "def matches" not in texts and "def decide" in texts
    deny = next(p for p in version.policies if p.name == "deny")
    assert deny.first_rule(get) == decided.rule == 0 and deny.matches(get)
    assert texts.count("def matches") == 1  # both built at the first ask
    assert deny.matches is deny.matches and deny.first_rule is deny.first_rule


def test_a_new_state_version_compiles_only_the_policies_that_changed() -> None:
    """A state version that changed a pod or one policy (the store keeps the unchanged
    objects) compiles only what changed; an equal object counts as unchanged."""
    deny = PolicyObject(
        "AuthorizationPolicy",
        "shop",
        "deny-admin",
        {"action": "DENY", "rules": [{"to": [{"operation": {"paths": ["/admin*"]}}]}]},
    )
    allow = PolicyObject(
        "AuthorizationPolicy",
        "shop",
        "allow-get",
        {"rules": [{"to": [{"operation": {"methods": ["GET"]}}]}]},
    )
    first, compiled = _version([deny, allow])
    assert compiled == ["shop/deny-admin", "shop/allow-get"]
    second, compiled = _version([deny, allow], first)
    assert compiled == [] and second.policies == first.policies
    equal = PolicyObject("AuthorizationPolicy", "shop", "allow-get", dict(allow.spec))
    changed = PolicyObject(
        "AuthorizationPolicy",
        "shop",
        "deny-admin",
        {"action": "DENY", "rules": [{"to": [{"operation": {"paths": ["/root*"]}}]}]},
    )
    third, compiled = _version([changed, equal], second)
    assert compiled == ["shop/deny-admin"]
    pod = Workload("u", "w", "shop", "sa", "n", (), {})
    get = HttpAttributes("GET", "/admin/x", "shop")
    assert second.evaluate(Request("10.0.0.1", "10.0.0.9", 80, http=get), pod).policy == (
        "shop/deny-admin"
    )
    decided = third.evaluate(Request("10.0.0.1", "10.0.0.9", 80, http=get), pod)
    assert decided.allowed and decided.policy == "shop/allow-get"
    root = HttpAttributes("GET", "/root", "shop")
    assert not third.evaluate(Request("10.0.0.1", "10.0.0.9", 80, http=root), pod).allowed
    _, compiled = _version([changed], third)  # a policy gone: nothing to compile
    assert compiled == []


TD = "spiffe://cluster.local"


def test_a_new_state_version_keeps_the_generated_functions_of_unchanged_policy_sets() -> None:
    """A workload's first request in a new version finds the functions its policies' set had,
    while a set with a changed policy gets new ones that decide by the change; only the last
    version's sets are asked (versions do not chain)."""
    objects = [
        PolicyObject(
            "AuthorizationPolicy",
            "shop",
            f"p{i}",
            {"rules": [{"from": [{"source": {"namespaces": [f"ns{i}"]}}]}]},
        )
        for i in range(3)
    ]
    pod = Workload("u", "w", "shop", "sa", "n", (), {})
    old = Authorizer.compile(objects)
    assert old.evaluate(Request("10.0.0.1", "10.0.0.9", 80, f"{TD}/ns/ns1/sa/x"), pod).allowed
    [before] = old._by_set.values()
    new = Authorizer.compile(objects, previous=old)
    twin = Workload("u", "w", "shop", "sa", "n", (), {})  # the new version's own object
    assert new.evaluate(Request("10.0.0.1", "10.0.0.9", 80, f"{TD}/ns/ns1/sa/x"), twin).allowed
    [after] = new._by_set.values()
    assert after is before and after.allow is before.allow
    changed = [
        *objects[:2],
        PolicyObject(
            "AuthorizationPolicy",
            "shop",
            "p2",
            {"rules": [{"from": [{"source": {"namespaces": ["other"]}}]}]},
        ),
    ]
    third = Authorizer.compile(changed, previous=new)
    assert not third.evaluate(
        Request("10.0.0.1", "10.0.0.9", 80, f"{TD}/ns/ns2/sa/x"), twin
    ).allowed
    [renewed] = third._by_set.values()
    assert renewed is not before
    assert third._earlier_sets is new._by_set  # a dict of selections, not the version
