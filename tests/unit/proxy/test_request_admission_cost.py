"""What a request admitted at a policed destination builds (``http_inbound.RequestAdmission`` and
``authorize``): its log text only when a line is written, no ``Decision`` of its own when
allowed with nothing to report, no rate-limit look-up where no RateLimitPolicy applies to the
pod port in the state version; and, under random policies and requests, the verdicts, log
lines, denial counts and dry-run telemetry of ``Core.authorize_request`` then ``Core.rate_limit``
(the path every request took before), byte for byte."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.policy import authz
from agent.policy.authz import HttpAttributes, Request
from agent.policy.ratelimit import limits_by_endpoint
from agent.proxy.core import Core
from agent.proxy.http1 import RequestHead, Verdict
from agent.proxy.http_inbound import ALLOWED, RequestAdmission, rate_limited
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

OK = RequestHead("GET", "/pkg.Echo/Unary", "web", "rid")
ADMIN = RequestHead("POST", "/admin", "web", "rid")


def _paths(*paths: str) -> list[dict[str, Any]]:
    return [{"to": [{"operation": {"paths": list(paths)}}]}]


POST = {"methods": ["POST"]}
ALLOW_ALL = authz_policy("allow", {"action": "ALLOW", "rules": _paths("/*")})
# What the random policy sets are drawn from: enforced and dry-run ALLOWs and DENYs, an AUDIT,
# STRICT mTLS, a rate limit.
POLICIES: list[PolicyObject] = [
    ALLOW_ALL,
    authz_policy("allow-pkg", {"rules": _paths("/pkg.*")}),
    authz_policy("deny-admin", {"action": "DENY", "rules": _paths("/admin")}),
    authz_policy("dry-deny", {"action": "DENY", "rules": _paths("/admin", "/x*")}, dry_run=True),
    authz_policy("dry-allow", {"rules": _paths("/pkg.*")}, dry_run=True),
    authz_policy("audit", {"action": "AUDIT", "rules": _paths("/pkg.*")}),
    authz_policy("deny-post", {"action": "DENY", "rules": [{"to": [{"operation": POST}]}]}),
    PolicyObject("PeerAuthentication", "default", "strict", {"mtls": {"mode": "STRICT"}}),
    RATE_LIMIT,
]


class Where(str):
    """A connection's log text that counts the request texts made from it (each f-string that
    puts it in formats it once)."""

    made = 0

    def __format__(self, spec: str) -> str:
        Where.made += 1
        return str.__format__(self, spec)


@pytest.fixture
def where() -> Iterator[Where]:
    Where.made = 0
    yield Where("c -> s")


@pytest.mark.parametrize("connection", [MTLS, PLAIN], ids=["mtls", "plaintext"])
def test_an_allowed_request_builds_no_log_text(connection: Request, where: Where) -> None:
    """Under an ALLOW policy every request meets, no request text is built (the old path built
    ``"{where} {method} {path}"`` for each); a denied request still builds its one."""
    core = admission_core(
        admission_store(
            [ALLOW_ALL, authz_policy("d", {"action": "DENY", "rules": _paths("/admin")})]
        )
    )
    admission = RequestAdmission(core, connection, SERVER, where)
    assert [admission.verdict(OK) for _ in range(5)] == [ALLOWED] * 5
    assert request_verdict(core, connection, SERVER, OK, where) is ALLOWED
    assert Where.made == 0
    assert not admission.verdict(ADMIN).allowed
    assert not request_verdict(core, connection, SERVER, ADMIN, where).allowed
    assert Where.made == 2


def test_an_allowed_request_builds_no_decision(monkeypatch: pytest.MonkeyPatch) -> None:
    """The ALLOW policy's decision for a request nothing else bears on is made once per
    selection, not per request (each request built a ``Decision`` before)."""
    made = [0]
    real = authz.Decision

    def counted(*args: Any, **kwargs: Any) -> authz.Decision:
        made[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(authz, "Decision", counted)
    core = admission_core(admission_store([ALLOW_ALL]))
    admission = RequestAdmission(core, MTLS, SERVER, "c -> s")
    assert [admission.verdict(OK) for _ in range(10)] == [ALLOWED] * 10
    assert made[0] == 1


def _counting_rate_limit(monkeypatch: pytest.MonkeyPatch) -> Callable[[], int]:
    calls = [0]
    rate_limit = Core.rate_limit

    def counted(self: Core, *args: Any) -> Any:
        calls[0] += 1
        return rate_limit(self, *args)

    monkeypatch.setattr(Core, "rate_limit", counted)
    return lambda: calls[0]


@pytest.mark.parametrize("policies", [[], [ALLOW_ALL]], ids=["free", "policed"])
def test_no_rate_limit_look_up_while_no_limit_applies(
    monkeypatch: pytest.MonkeyPatch, policies: list[PolicyObject]
) -> None:
    """No RateLimitPolicy on the pod port: no request asks ``Core.rate_limit`` (each did
    before); once one applies (a new state version), each request meets it."""
    store = admission_store(policies)
    core = admission_core(store)
    looked_up = _counting_rate_limit(monkeypatch)
    admission = RequestAdmission(core, MTLS, SERVER, "c -> s")
    assert [admission.verdict(OK) for _ in range(5)] == [ALLOWED] * 5
    assert looked_up() == 0
    with store.update() as tx:
        tx.put_policy(RATE_LIMIT)
    limit = limits_by_endpoint(store.snapshot())[("10.244.1.3", 9080)][0]
    assert [admission.verdict(OK) for _ in range(3)] == [ALLOWED, ALLOWED, rate_limited(limit, "")]
    assert looked_up() == 3
    with store.update() as tx:
        tx.replace("policies", policies)
    assert admission.verdict(OK) is ALLOWED
    assert looked_up() == 3


class Telemetry:
    """A request observer keeping the dry-run policies it is told would deny."""

    def __init__(self) -> None:
        self.would: list[str] = []

    def requested(self, *_args: Any) -> None:
        raise AssertionError("no request is reported here")

    def rejected(self, cause: str) -> None:
        raise AssertionError("no request is rejected here")

    def would_deny(self, policy: str) -> None:
        self.would.append(policy)


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[tuple[str, int, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append((record.name, record.levelno, record.getMessage()))


def _reference(core: Core, connection: Request, head: RequestHead, where: str) -> Verdict:
    """A request's verdict as every request was admitted before: the policies' decision and
    its reports with the request's text (what ``Core.authorize_request`` did), then
    ``Core.rate_limit``."""
    request = Request(
        connection.source_ip,
        connection.destination_ip,
        connection.destination_port,
        connection.principal,
        HttpAttributes(head.method, head.path, head.host, head.headers),
    )
    decision = core.policies().live(request, SERVER)
    core.request_decided(decision, f"{where} {head.method} {head.path}")
    would = ",".join(decision.would_deny_rules)
    if not decision.allowed:
        return Verdict(False, decision.refused_by(), dry_run=would)
    limit = core.rate_limit(request, core.snapshot())
    if limit is not None:
        return rate_limited(limit, would)
    return Verdict(True, dry_run=would)


HEADS = st.builds(
    RequestHead,
    st.sampled_from(["GET", "POST"]),
    st.sampled_from(["/pkg.Echo/Unary", "/admin", "/x", "/"]),
    st.just("web"),
    st.just("rid"),
)
# Each step: a request, or (None) a new state version with the next policy set.
STEPS = st.lists(st.one_of(HEADS, st.none()), min_size=1, max_size=12)
SETS = st.lists(st.lists(st.sampled_from(POLICIES), unique_by=id, max_size=5), min_size=1)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sets=SETS, steps=STEPS, plaintext=st.booleans())
def test_verdicts_logs_and_telemetry_are_the_old_paths(
    sets: list[list[PolicyObject]], steps: list[RequestHead | None], plaintext: bool
) -> None:
    """Random policy sets, changed between random requests: ``RequestAdmission`` and
    ``request_verdict`` each give the verdicts (403 and 429 bodies included), log lines,
    denial counts and dry-run telemetry of the old path, on cores of their own."""
    connection = PLAIN if plaintext else MTLS
    store = admission_store(sets[0])
    cores = [admission_core(store) for _ in range(3)]  # reference, admission, request_verdict
    seen = [Telemetry() for _ in cores]
    for core, telemetry in zip(cores, seen, strict=True):
        core.registry.request_observers.append(telemetry)  # type: ignore[arg-type]
    admission = RequestAdmission(cores[1], connection, SERVER, "c -> s")
    handler = Lines()
    root = logging.getLogger()
    root.addHandler(handler)
    old_level = root.level
    root.setLevel(logging.DEBUG)
    version = 0
    try:
        for head in steps:
            if head is None:
                version += 1
                with store.update() as tx:
                    tx.replace("policies", sets[version % len(sets)])
                continue
            outcomes = []
            for n in range(3):
                handler.lines.clear()
                if n == 0:
                    verdict = _reference(cores[0], connection, head, "c -> s")
                elif n == 1:
                    verdict = admission.verdict(head)
                else:
                    verdict = request_verdict(cores[2], connection, SERVER, head, "c -> s")
                outcomes.append((verdict, list(handler.lines), dict(cores[n].registry.denials)))
            assert outcomes[1] == outcomes[0]
            assert outcomes[2] == outcomes[0]
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
    assert seen[1].would == seen[0].would
    assert seen[2].would == seen[0].would
