"""A TrafficPolicy spec compiled into the typed settings the traffic-control logic reads.

Why a compiled form: the spec arrives as validated JSON-like data (``agent.policy.schema`` applied
the CRD's defaults inside the sections that are present); the logic wants numbers in seconds and
one place that says what an *absent* section means. Here it means "the section's defaults", so a
Service without any TrafficPolicy behaves exactly like one with an empty spec: peak-EWMA
balancing, no connection limits, ejection after 5 consecutive failures (at most half of the
endpoints), 2 retries of a failed connect within a 20 % budget, a 10 s connect timeout, no idle
timeout, no faults and no split. Turning a feature off is explicit: ``maxEjectionPercent: 0``,
``attempts: 0``.

The schema checks each field on its own; ``compile_policy`` adds the checks that need the whole
spec or the Service it targets (``TrafficPolicyError`` names the field and the fix), so a bad
policy is refused by the agent and the previously accepted one stays in force.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from types import MappingProxyType
from typing import Any

from agent.state.model import PolicyObject, Service

KIND = "TrafficPolicy"
BALANCERS = ("PEAK_EWMA", "ROUND_ROBIN", "LEAST_CONNECTIONS", "RANDOM")
LOCALITIES = ("NONE", "SAME_NODE", "SAME_ZONE")
RETRY_ON = frozenset({"connect-failure", "refused", "reset-before-data"})
ABORT_MODES = ("RESET", "REFUSE")

DEFAULT_CONNECT_TIMEOUT = 10.0
DEFAULT_BASE_EJECTION = 30.0
DEFAULT_MAX_EJECTION = 300.0
DEFAULT_BUDGET_WINDOW = 10.0

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


class TrafficPolicyError(ValueError):
    """A TrafficPolicy the agent refuses; ``path`` locates the bad value inside the policy."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


def duration(text: str, path: str) -> float:
    """Seconds in a Go-style duration (``250ms``, ``1m30s``); zero is refused (never useful)."""
    seconds, number = 0.0, ""
    i = 0
    while i < len(text):
        ch = text[i]
        if ch.isdigit() or ch == ".":
            number += ch
            i += 1
            continue
        unit = "ms" if text.startswith("ms", i) else ch
        if unit not in _UNITS or not number:
            raise TrafficPolicyError(path, f"{text!r} is not a duration; use e.g. 250ms, 5s, 1m")
        seconds += float(number) * _UNITS[unit]
        number, i = "", i + len(unit)
    if number or not text:
        raise TrafficPolicyError(path, f"{text!r} is not a duration; use e.g. 250ms, 5s, 1m")
    if seconds <= 0:
        raise TrafficPolicyError(path, f"{text!r} must be longer than zero")
    return seconds


@dataclass(frozen=True, slots=True)
class Subset:
    name: str
    labels: Mapping[str, str]
    weight: int


@dataclass(frozen=True, slots=True)
class Fault:
    delay_percent: float = 0.0
    delay: float = 0.0
    abort_percent: float = 0.0
    abort_mode: str = "RESET"
    source_labels: Mapping[str, str] | None = None


@dataclass(frozen=True, slots=True)
class TrafficConfig:
    """Everything traffic control needs for one Service; the defaults are an empty spec's."""

    policy: str = ""  # "<namespace>/<name>" of the TrafficPolicy, "" for the defaults
    generation: int = 0
    balancer: str = "PEAK_EWMA"
    locality: str = "NONE"
    max_connections: int | None = None
    max_pending: int | None = None
    max_pending_requests: int | None = None  # HTTP requests waiting for a max_connections slot
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    idle_timeout: float | None = None
    consecutive_failures: int = 5
    base_ejection: float = DEFAULT_BASE_EJECTION
    max_ejection: float = DEFAULT_MAX_EJECTION
    max_ejection_percent: int = 50
    retries: int = 2
    per_try_timeout: float = DEFAULT_CONNECT_TIMEOUT
    budget_percent: int = 20
    min_retries_per_second: int = 10
    budget_window: float = DEFAULT_BUDGET_WINDOW
    retry_on: frozenset[str] = RETRY_ON
    fault: Fault | None = None
    subsets: tuple[Subset, ...] = ()
    sticky: bool = False

    def describe(self) -> dict[str, Any]:
        """Plain data for ``/config_dump`` (durations in seconds)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            name, value = f.name, getattr(self, f.name)
            if isinstance(value, frozenset):
                value = sorted(value)
            elif name == "subsets":
                value = [
                    {"name": s.name, "labels": dict(s.labels), "weight": s.weight} for s in value
                ]
            elif isinstance(value, Fault):
                value = {
                    "delay_percent": value.delay_percent,
                    "delay": value.delay,
                    "abort_percent": value.abort_percent,
                    "abort_mode": value.abort_mode,
                    "source_labels": dict(value.source_labels or {}) or None,
                }
            out[name] = value
        return out


def _fault(spec: Mapping[str, Any], path: str) -> Fault:
    delay = spec.get("delay") or {}
    abort = spec.get("abort") or {}
    selector = spec.get("sourceSelector")
    return Fault(
        delay_percent=float(delay.get("percent", 0.0)),
        delay=duration(delay["fixedDelay"], f"{path}.delay.fixedDelay") if delay else 0.0,
        abort_percent=float(abort.get("percent", 0.0)),
        abort_mode=abort.get("mode", "RESET"),
        source_labels=MappingProxyType(dict(selector["matchLabels"])) if selector else None,
    )


def _subsets(spec: Mapping[str, Any], service: Service | None, path: str) -> tuple[Subset, ...]:
    subsets = tuple(
        Subset(s["name"], MappingProxyType(dict(s["labels"])), int(s["weight"]))
        for s in spec["subsets"]
    )
    if sum(s.weight for s in subsets) != 100:
        raise TrafficPolicyError(f"{path}.subsets", "weights must sum to 100")
    seen: dict[tuple[tuple[str, str], ...], str] = {}
    for i, s in enumerate(subsets):
        key = tuple(sorted(s.labels.items()))
        if key in seen:
            raise TrafficPolicyError(
                f"{path}.subsets[{i}].labels",
                f"subset {s.name!r} has the same labels as {seen[key]!r}; give each subset its own",
            )
        seen[key] = s.name
        if service is None:
            continue
        selector = service.selector or {}
        clash = {k: v for k, v in s.labels.items() if k in selector and selector[k] != v}
        if clash:
            raise TrafficPolicyError(
                f"{path}.subsets[{i}].labels",
                f"subset {s.name!r} is unknown to Service {service.name}: its labels {clash} "
                f"contradict the Service's selector {dict(selector)}, so no endpoint can match",
            )
    return subsets


def compile_policy(policy: PolicyObject, service: Service | None = None) -> TrafficConfig:
    """The settings of one validated TrafficPolicy, checked as a whole (and against ``service``)."""
    spec: Mapping[str, Any] = policy.spec
    lb = spec.get("loadBalancer") or {}
    pool = spec.get("connectionPool") or {}
    od = spec.get("outlierDetection") or {}
    rt = spec.get("retries") or {}
    connect = (
        duration(pool["connectTimeout"], "spec.connectionPool.connectTimeout")
        if "connectTimeout" in pool
        else DEFAULT_CONNECT_TIMEOUT
    )
    per_try = (
        duration(rt["perTryTimeout"], "spec.retries.perTryTimeout")
        if "perTryTimeout" in rt
        else connect
    )
    if "maxPendingRequests" in pool and "maxConnections" not in pool:
        raise TrafficPolicyError(
            "spec.connectionPool.maxPendingRequests",
            "requests wait only while maxConnections requests are in flight; set "
            "connectionPool.maxConnections too",
        )
    if per_try > connect:
        raise TrafficPolicyError(
            "spec.retries.perTryTimeout",
            f"{rt['perTryTimeout']} exceeds the overall connect timeout ({connect}s); "
            "make it shorter or raise connectionPool.connectTimeout",
        )
    base = duration(od.get("baseEjectionTime", "30s"), "spec.outlierDetection.baseEjectionTime")
    top = duration(od.get("maxEjectionTime", "300s"), "spec.outlierDetection.maxEjectionTime")
    if top < base:
        raise TrafficPolicyError(
            "spec.outlierDetection.maxEjectionTime", "must not be shorter than baseEjectionTime"
        )
    split = spec.get("split")
    return TrafficConfig(
        policy=f"{policy.namespace}/{policy.name}",
        generation=policy.generation,
        balancer=lb.get("type", "PEAK_EWMA"),
        locality=lb.get("localityPreference", "NONE"),
        max_connections=pool.get("maxConnections"),
        max_pending=pool.get("maxPendingConnects"),
        max_pending_requests=pool.get("maxPendingRequests"),
        connect_timeout=connect,
        idle_timeout=(
            duration(pool["idleTimeout"], "spec.connectionPool.idleTimeout")
            if "idleTimeout" in pool
            else None
        ),
        consecutive_failures=int(od.get("consecutiveFailures", 5)),
        base_ejection=base,
        max_ejection=top,
        max_ejection_percent=int(od.get("maxEjectionPercent", 50)),
        retries=int(rt.get("attempts", 2)),
        per_try_timeout=per_try,
        budget_percent=int(rt.get("budgetPercent", 20)),
        min_retries_per_second=int(rt.get("minRetriesPerSecond", 10)),
        budget_window=(
            duration(rt["budgetWindow"], "spec.retries.budgetWindow")
            if "budgetWindow" in rt
            else DEFAULT_BUDGET_WINDOW
        ),
        retry_on=frozenset(rt["retryOn"]) if rt.get("retryOn") else RETRY_ON,
        fault=_fault(spec["faultInjection"], "spec.faultInjection")
        if spec.get("faultInjection")
        else None,
        subsets=_subsets(split, service, "spec.split") if split else (),
        sticky=bool(split.get("stickyBySourceIP", False)) if split else False,
    )
