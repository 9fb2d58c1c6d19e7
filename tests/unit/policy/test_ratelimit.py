"""RateLimitPolicy: the token bucket, the limiter's buckets, where a policy applies, validation."""

from __future__ import annotations

from typing import Any

import pytest

from agent.policy.ratelimit import RateLimit, RateLimiter, TokenBucket, limits_by_endpoint
from agent.policy.schema import PolicyError, validate_policy
from agent.state import Endpoint, PolicyObject, Service, ServicePort, StateStore

WEB = Service(
    "web",
    "default",
    ("10.96.0.11",),
    (ServicePort(80, 9080, "http"),),
    endpoints=(Endpoint("10.244.1.3"), Endpoint("10.244.2.3")),
)


def _manifest(**spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "nodemesh.io/v1alpha1",
        "kind": "RateLimitPolicy",
        "metadata": {"name": "web-limit", "namespace": "default"},
        "spec": {"targetRef": {"kind": "Service", "name": "web"}, **spec},
    }


def _limit(rps: int = 2, burst: int = 3, *, per_identity: bool = False) -> RateLimit:
    return RateLimit("default/l", "web.default.svc.cluster.local", rps, burst, per_identity)


def test_a_bucket_admits_its_burst_then_refills_at_the_rate() -> None:
    bucket = TokenBucket.full(rate=2.0, burst=3.0, now=10.0)
    assert [bucket.take(10.0) for _ in range(4)] == [True, True, True, False]
    assert not bucket.take(10.4)  # 0.8 of a token
    assert bucket.take(10.5)  # one whole token after half a second at 2/s
    assert not bucket.take(10.5)
    # Idle for a minute: full again, never more than the burst.
    assert [bucket.take(70.0) for _ in range(4)] == [True, True, True, False]


def test_a_clock_going_backwards_adds_no_tokens() -> None:
    bucket = TokenBucket.full(rate=100.0, burst=1.0, now=5.0)
    assert bucket.take(5.0)
    assert not bucket.take(4.0)
    assert not bucket.take(5.0)


def test_each_pod_has_its_own_bucket_and_identities_share_it_by_default() -> None:
    limiter, limit = RateLimiter(), _limit(rps=1, burst=1)
    assert limiter.admit([limit], "10.244.1.3", "spiffe://a", 0.0) is None
    assert limiter.admit([limit], "10.244.1.3", "spiffe://b", 0.0) is limit
    assert limiter.admit([limit], "10.244.2.3", "spiffe://b", 0.0) is None


def test_per_identity_buckets_are_separate_and_bounded_as_an_lru() -> None:
    limiter, limit = RateLimiter(max_identity_buckets=2), _limit(1, 1, per_identity=True)
    assert limiter.admit([limit], "p", "spiffe://a", 0.0) is None
    assert limiter.admit([limit], "p", "spiffe://b", 0.0) is None
    assert limiter.admit([limit], "p", None, 0.0) is None  # plaintext callers: one more bucket
    assert limiter.bucket_count() == 2  # a, the least recently used, was forgotten
    assert limiter.admit([limit], "p", "spiffe://b", 0.0) is limit  # b's bucket was kept
    assert limiter.admit([limit], "p", "spiffe://a", 0.0) is None  # a starts afresh, full


def test_the_first_refusing_limit_is_named_and_forget_drops_old_buckets() -> None:
    limiter, loose, tight = RateLimiter(), _limit(100, 100), _limit(1, 1)
    assert limiter.admit([loose, tight], "p", None, 0.0) is None
    assert limiter.admit([loose, tight], "p", None, 0.0) is tight
    limiter.forget([loose])
    assert limiter.bucket_count() == 1
    assert limiter.admit([tight], "p", None, 0.0) is None  # a new, full bucket


def test_a_policy_applies_to_the_pod_ports_its_service_targets() -> None:
    policy = validate_policy(_manifest(requestsPerSecond=20, burst=40), path="t")
    store = StateStore()
    with store.update() as txn:
        txn.put_service(WEB)
        txn.put_policy(policy)
        txn.put_policy(
            PolicyObject(
                "RateLimitPolicy",
                "default",
                "ghost",
                {**policy.spec, "targetRef": {"group": "", "kind": "Service", "name": "missing"}},
            )
        )
    table = limits_by_endpoint(store.snapshot())
    expected = (RateLimit("default/web-limit", "web.default.svc.cluster.local", 20, 40, False),)
    assert table == {("10.244.1.3", 9080): expected, ("10.244.2.3", 9080): expected}


def test_a_dry_run_policy_is_not_enforced() -> None:
    manifest = _manifest(requestsPerSecond=1)
    manifest["metadata"]["annotations"] = {"nodemesh.io/dry-run": "true"}
    store = StateStore()
    with store.update() as txn:
        txn.put_service(WEB)
        txn.put_policy(validate_policy(manifest, path="t"))
    assert limits_by_endpoint(store.snapshot()) == {}


def test_validation_applies_defaults_and_names_the_bad_field() -> None:
    spec = validate_policy(_manifest(requestsPerSecond=5), path="t").spec
    assert spec["perIdentity"] is False and "burst" not in spec
    with pytest.raises(PolicyError, match=r"t\.spec\.requestsPerSecond: is required"):
        validate_policy(_manifest(), path="t")
    with pytest.raises(PolicyError, match=r"t\.spec\.burst: 0 is below the minimum 1"):
        validate_policy(_manifest(requestsPerSecond=5, burst=0), path="t")
    with pytest.raises(PolicyError, match=r"t\.spec\.rps: unknown field"):
        validate_policy(_manifest(requestsPerSecond=5, rps=5), path="t")
    bad_target = _manifest(requestsPerSecond=5)
    bad_target["spec"]["targetRef"]["kind"] = "Deployment"
    with pytest.raises(PolicyError, match=r"targetRef\.kind: 'Deployment' is not allowed"):
        validate_policy(bad_target, path="t")


def test_a_seeded_limiter_starts_new_buckets_at_the_seed_level_clamped() -> None:
    limit = RateLimit("default/l", "web", 1, 3, False)
    levels = {"a": (0.0, 10.0), "b": (9.0, 10.0), "c": (0.0, 1e9), "d": (float("nan"), 10.0)}
    limiter = RateLimiter(seed=lambda _limit, pod, _identity: levels.get(pod))
    assert limiter.admit([limit], "a", None, 10.0) is limit  # empty, as the seed says
    assert limiter.admit([limit], "a", None, 11.0) is None  # refilled from the seed's stamp
    assert [limiter.admit([limit], "b", None, 10.0) for _ in range(4)][-1] is limit  # 3, not 9
    assert limiter.admit([limit], "c", None, 10.0) is limit  # a stamp ahead of now: now
    assert limiter.admit([limit], "c", None, 11.0) is None  # ... so it refills
    assert all(limiter.admit([limit], "d", None, 10.0) is None for _ in range(3))  # NaN: full
    assert limiter.admit([limit], "unknown", None, 10.0) is None  # not in the seed: full
