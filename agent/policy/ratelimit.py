"""Local rate limiting at the destination: a token bucket per pod (or per calling identity).

Why local, and why at the destination: a limit enforced by the node that runs the pod protects
that pod whatever the callers do and needs no coordination between nodes; its price is that a
Service with N pods admits up to N times the policy's rate in total, as with Envoy's and
Linkerd's local rate limits. The policy names a Service (``targetRef``); the pods behind it are
found through the Service's endpoints, on the ports it targets, so one pod behind two Services
can be limited for one and not the other.

The bucket holds at most ``burst`` tokens and gains ``requestsPerSecond`` per second; a request
takes one or is refused. It is sans-IO: the caller passes the time (``now``), so the tests drive
it with a fake clock. With ``perIdentity`` every calling SPIFFE identity gets its own bucket
(plaintext callers share the bucket of the empty identity). Identities are unbounded in number,
so the buckets of one pod are an LRU of at most ``MAX_IDENTITY_BUCKETS``: an identity evicted and
seen again starts with a full bucket, which can admit a burst more than the policy says only when
more than that many identities call one pod within a refill period.

Where the buckets live: with one proxy process (``--workers 1``) in this process
(``RateLimiter``). With ``--workers N`` a pod's connections spread over N processes, and
per-process buckets would admit up to N times the policy; there the buckets are slots of a
table in memory shared by the agent's workers (``agent.policy.sharedbuckets``), so the policy
holds per node, as a proxy's local rate limit does in Envoy or Linkerd whatever its thread
count. Both kinds do the same arithmetic (``refill``) and offer the same ``Limiter`` interface.

Across an upgrade (``agent.handover``) the successor agent continues its predecessor's buckets
instead of starting them full, which would give every limited client a fresh burst per rollout:
the predecessor hands over a table (``sharedbuckets.share``), both agents take from it while
both serve, and once the predecessor has exited a single-process successor goes back to this
class, each bucket it creates starting at the level the table held for it (``seed``). Only a
bucket's creation asks the seed, so a take on an existing bucket costs what it did.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from agent.state import Snapshot
from agent.state.model import PolicyObject, Service

KIND = "RateLimitPolicy"
MAX_IDENTITY_BUCKETS = 4096  # per pod and policy


def refill(
    tokens: float, stamp: float, rate: float, burst: float, now: float
) -> tuple[bool, float, float]:
    """One take from a bucket holding ``tokens`` at time ``stamp``: (admitted, tokens, stamp)
    after adding ``rate`` per second since ``stamp`` (at most ``burst``) and taking one token
    if there is one. A clock that went backwards adds nothing and leaves the stamp."""
    if now > stamp:
        tokens = min(burst, tokens + (now - stamp) * rate)
        stamp = now
    if tokens < 1.0:
        return False, tokens, stamp
    return True, tokens - 1.0, stamp


@dataclass(slots=True)
class TokenBucket:
    """``burst`` tokens at most, refilled at ``rate`` per second; starts full."""

    rate: float
    burst: float
    tokens: float
    stamp: float

    @classmethod
    def full(cls, rate: float, burst: float, now: float) -> TokenBucket:
        return cls(rate, burst, burst, now)

    def take(self, now: float) -> bool:
        """Take one token at time ``now`` (seconds, monotonic); False if there is none."""
        ok, self.tokens, self.stamp = refill(self.tokens, self.stamp, self.rate, self.burst, now)
        return ok


@dataclass(frozen=True, slots=True)
class RateLimit:
    """One RateLimitPolicy compiled: where it applies and how much it admits."""

    policy: str  # "<namespace>/<name>"
    service: str  # the target Service's hostname (the ``service`` label of the metric)
    requests_per_second: int
    burst: int
    per_identity: bool


def target_name(policy: PolicyObject) -> str:
    """The name of the Service a RateLimitPolicy targets (same namespace)."""
    spec: Mapping[str, Any] = policy.spec
    return str(spec["targetRef"]["name"])


def compile_limit(policy: PolicyObject, service: Service) -> RateLimit:
    """The limit of one validated RateLimitPolicy; ``burst`` defaults to the rate."""
    spec: Mapping[str, Any] = policy.spec
    rps = int(spec["requestsPerSecond"])
    return RateLimit(
        policy=f"{policy.namespace}/{policy.name}",
        service=service.hostname(),
        requests_per_second=rps,
        burst=int(spec.get("burst", rps)),
        per_identity=bool(spec["perIdentity"]),
    )


def limits_by_endpoint(snap: Snapshot) -> Mapping[tuple[str, int], tuple[RateLimit, ...]]:
    """``(pod ip, pod port)`` → the limits that apply to requests arriving there, built once per
    state version. A policy whose Service does not exist (yet) applies nowhere; a dry-run one
    is not enforced."""
    out: dict[tuple[str, int], list[RateLimit]] = {}
    for policy in snap.policies_of(KIND):
        if policy.dry_run:
            continue
        service = snap.services.get((policy.namespace, target_name(policy)))
        if service is None:
            continue
        limit = compile_limit(policy, service)
        for endpoint in service.endpoints:
            for port in service.ports:
                pod_port = port.target_port or endpoint.ports.get(port.name, 0)
                if pod_port:
                    out.setdefault((endpoint.ip, pod_port), []).append(limit)
    return {k: tuple(v) for k, v in out.items()}


class Limiter(Protocol):
    """What the proxy asks of the buckets (``Core.rate_limit``), wherever they live."""

    def admit(
        self, limits: Iterable[RateLimit], pod_ip: str, identity: str | None, now: float
    ) -> RateLimit | None: ...

    def forget(self, keep: Iterable[RateLimit]) -> None: ...


# (limit, pod IP, identity) → (tokens, stamp) a new bucket starts at, or None: full.
Seed = Callable[[RateLimit, str, str], tuple[float, float] | None]


class RateLimiter:
    """The buckets of one proxy process, keyed by (policy, pod ip, identity); sans-IO. With
    a ``seed`` (the predecessor agent's levels) a new bucket starts where the seed says."""

    def __init__(
        self, max_identity_buckets: int = MAX_IDENTITY_BUCKETS, seed: Seed | None = None
    ) -> None:
        self.max_identity_buckets = max_identity_buckets
        self.seed = seed
        self._shared: dict[tuple[RateLimit, str], TokenBucket] = {}
        self._per_identity: dict[tuple[RateLimit, str], OrderedDict[str, TokenBucket]] = {}

    def admit(
        self, limits: Iterable[RateLimit], pod_ip: str, identity: str | None, now: float
    ) -> RateLimit | None:
        """None if every limit admits the request (each takes a token), else the first one
        that refuses it (the limits before it have spent a token: a refused request still
        counts against them, as it reached the pod's proxy)."""
        for limit in limits:
            if not self._bucket(limit, pod_ip, identity or "", now).take(now):
                return limit
        return None

    def forget(self, keep: Iterable[RateLimit]) -> None:
        """Drop the buckets of limits no longer in force (a changed policy starts afresh)."""
        wanted = set(keep)
        for table in (self._shared, self._per_identity):
            for key in [k for k in table if k[0] not in wanted]:
                del table[key]

    def bucket_count(self) -> int:
        return len(self._shared) + sum(len(t) for t in self._per_identity.values())

    def levels(self) -> Iterator[tuple[RateLimit, str, str, TokenBucket]]:
        """Every bucket as (limit, pod IP, identity, bucket); identity "" for a pod's bucket
        (for a successor agent: ``sharedbuckets.share``)."""
        for (limit, pod_ip), bucket in self._shared.items():
            yield limit, pod_ip, "", bucket
        for (limit, pod_ip), table in self._per_identity.items():
            for identity, bucket in table.items():
                yield limit, pod_ip, identity, bucket

    def _new(self, limit: RateLimit, pod_ip: str, identity: str, now: float) -> TokenBucket:
        rate, burst = float(limit.requests_per_second), float(limit.burst)
        level = self.seed(limit, pod_ip, identity) if self.seed is not None else None
        if level is None or not all(map(math.isfinite, level)):
            return TokenBucket.full(rate, burst, now)
        # Clamped: a level from another process must neither overfill nor stop the refill.
        return TokenBucket(rate, burst, max(0.0, min(burst, level[0])), min(level[1], now))

    def _bucket(self, limit: RateLimit, pod_ip: str, identity: str, now: float) -> TokenBucket:
        if not limit.per_identity:
            bucket = self._shared.get((limit, pod_ip))
            if bucket is None:
                bucket = self._shared[(limit, pod_ip)] = self._new(limit, pod_ip, "", now)
            return bucket
        table = self._per_identity.setdefault((limit, pod_ip), OrderedDict())
        bucket = table.get(identity)
        if bucket is None:
            bucket = table[identity] = self._new(limit, pod_ip, identity, now)
            if len(table) > self.max_identity_buckets:
                table.popitem(last=False)
        else:
            table.move_to_end(identity)
        return bucket
