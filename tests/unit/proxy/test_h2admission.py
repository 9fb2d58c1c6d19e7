"""The destination's per-request admission (``http_inbound.RequestAdmission``, HTTP/2 and 1.1):
the verdicts, denial counts and rate limits of ``request_verdict`` (each request admitted from
nothing) for every policy set, with what does not depend on the request worked out once per
state version."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from agent.policy import authz
from agent.policy.authz import Request
from agent.proxy.http1 import RequestHead
from agent.proxy.http_inbound import RequestAdmission
from agent.state import PolicyObject
from tests.unit.proxy.admission_helpers import (
    MTLS,
    PLAIN,
    RATE_LIMIT,
    SERVER,
    admission_core,
    admission_store,
    authz_policy,
    request_verdict,
)

HEADS = [RequestHead("POST", path, "web", "rid") for path in ("/pkg.Echo/Unary", "/admin")]

DENY_ADMIN = {"action": "DENY", "rules": [{"to": [{"operation": {"paths": ["/admin"]}}]}]}
FOR_OTHER = {**DENY_ADMIN, "selector": {"matchLabels": {"app": "other"}}}
ALLOW_PKG = {"rules": [{"to": [{"operation": {"paths": ["/pkg.*"]}}]}]}
POLICY_SETS: dict[str, list[PolicyObject]] = {
    "none": [],
    "a DENY for another pod": [authz_policy("d", FOR_OTHER)],
    "a DENY on /admin": [authz_policy("d", DENY_ADMIN)],
    "a dry-run DENY": [authz_policy("d", DENY_ADMIN, dry_run=True)],
    "an ALLOW for /pkg.*": [authz_policy("a", ALLOW_PKG)],
    "an AUDIT": [authz_policy("u", {"action": "AUDIT", "rules": [{}]})],
    "STRICT": [PolicyObject("PeerAuthentication", "default", "p", {"mtls": {"mode": "STRICT"}})],
    "a rate limit": [RATE_LIMIT],
}  # fmt: skip


@pytest.mark.parametrize("connection", [MTLS, PLAIN], ids=["mtls", "plaintext"])
@pytest.mark.parametrize("name", list(POLICY_SETS))
def test_each_verdict_and_count_is_request_verdicts(connection: Request, name: str) -> None:
    """Four requests (two paths, twice: the rate limit's burst is 2) under each policy set,
    then the set replaced by the next one (a new state version): the same verdicts, denial
    counts and buckets as ``request_verdict`` gives on a core of its own."""
    store = admission_store(POLICY_SETS[name], "grpc")
    ours, theirs = admission_core(store), admission_core(store)
    admission = RequestAdmission(ours, connection, SERVER, "c -> s")
    later = POLICY_SETS["a DENY on /admin"] if name == "none" else []
    for policies in (POLICY_SETS[name], later):
        with store.update() as tx:
            tx.replace("policies", policies)
        got = [admission.verdict(h) for h in HEADS * 2]
        want = [request_verdict(theirs, connection, SERVER, h, "c -> s") for h in HEADS * 2]
        assert got == want
        assert ours.registry.denials == theirs.registry.denials


def _counting(monkeypatch: pytest.MonkeyPatch) -> Callable[[], int]:
    calls = [0]
    selects = authz.CompiledPolicy.selects

    def counted(self: authz.CompiledPolicy, *args: Any) -> bool:
        calls[0] += 1
        return selects(self, *args)

    monkeypatch.setattr(authz.CompiledPolicy, "selects", counted)
    return lambda: calls[0]


def test_the_policies_are_walked_once_per_state_version_while_none_selects_the_pod(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Ten policies for other pods: the admission asks each whether it selects the pod once
    per state version (before the Authorizer kept selections, ``request_verdict`` asked all of
    them at every request)."""
    others = [authz_policy(f"d{n}", FOR_OTHER) for n in range(10)]
    store = admission_store(others, "grpc")
    core = admission_core(store)
    walked = _counting(monkeypatch)
    admission = RequestAdmission(core, MTLS, SERVER, "c -> s")
    for _ in range(5):
        assert admission.verdict(HEADS[1]).allowed
    assert walked() == 10
    with store.update() as tx:
        tx.put_policy(authz_policy("d", DENY_ADMIN))  # now one selects it: asked per request again
    assert not admission.verdict(HEADS[1]).allowed
    assert admission.verdict(HEADS[0]).allowed
    # The new version's Authorizer works out the pod's selection once (the 11 policies of its
    # namespace); each request is then ``request_verdict``'s, which reads that selection
    # (``Authorizer``'s cache per workload) and asks no policy again.
    assert walked() == 10 + 11
