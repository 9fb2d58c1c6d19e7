"""Traffic control for every Service, following the state: which policy is in force, and why.

For each state version the TrafficPolicies are compiled (``config.compile_policy``) against the
Service they target. Each policy gets an ``Accepted`` condition, exposed through ``conditions()``
for the admin API:

* ``Accepted`` - in force for its Service;
* ``Invalid`` - the agent refused it (a whole-spec or Service check failed); if an earlier
  version of the same policy was accepted, **that version stays in force**, so a bad edit never
  drops a Service back to defaults in the middle of a rollout;
* ``Conflicted`` - another policy targets the same Service; the one with the smallest name wins
  (the state keeps no creation time; every agent picks the same one);
* ``TargetNotFound`` - no such Service (yet): the policy is kept and applies when it appears;
* ``DryRun`` - annotated ``nodemesh.io/dry-run: "true"``: checked and shown, not enforced.

Per Service, a ``ServiceTraffic`` is created on first use and kept across versions (endpoint
health and RTT estimates survive policy edits and endpoint changes); a removed Service's state
is dropped. Sans-IO: the caller supplies the clock and the RNG.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from agent.policy.traffic.config import KIND, TrafficConfig, TrafficPolicyError, compile_policy
from agent.policy.traffic.service import EndpointInfo, Observer, ServiceTraffic
from agent.state import PolicyObject, Service, Snapshot

ServiceKey = tuple[str, str]


@dataclass(frozen=True, slots=True)
class Condition:
    status: str  # "True" or "False"
    reason: str
    message: str = ""
    generation: int = 0

    def describe(self) -> dict[str, object]:
        return {
            "type": "Accepted",
            "status": self.status,
            "reason": self.reason,
            "message": self.message,
            "observedGeneration": self.generation,
        }


def _target(policy: PolicyObject) -> ServiceKey:
    ref = policy.spec.get("targetRef")
    name = ref.get("name", "") if isinstance(ref, Mapping) else ""
    return (policy.namespace, str(name))


def endpoints_of(snap: Snapshot, service: Service) -> list[EndpointInfo]:
    """The Service's ready endpoints with the pod facts splits and locality need."""
    out = []
    for e in service.endpoints:
        if not e.ready:
            continue
        w = snap.workloads.get(e.workload_uid) if e.workload_uid else None
        w = w or snap.workload_by_ip.get(e.ip)
        out.append(EndpointInfo(e.ip, w.labels if w else {}, w.node if w else ""))
    return out


class TrafficControl:
    def __init__(
        self,
        *,
        defaults: TrafficConfig | None = None,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        observer: Observer | None = None,
    ) -> None:
        self.defaults = defaults or TrafficConfig()
        self.observer = observer
        self.clock = clock
        self.rng = rng or random.Random()
        self.version = -1
        self._accepted: dict[tuple[str, str], tuple[ServiceKey, TrafficConfig]] = {}
        self._effective: dict[ServiceKey, TrafficConfig] = {}
        self._conditions: dict[tuple[str, str], Condition] = {}
        self._services: dict[ServiceKey, tuple[int, ServiceTraffic]] = {}

    def update(self, snap: Snapshot) -> None:
        """Recompile the policies if the state moved on (cheap when it did not)."""
        if snap.version == self.version:
            return
        self.version = snap.version
        policies = sorted(snap.policies_of(KIND), key=lambda p: (p.namespace, p.name))
        live = {(p.namespace, p.name) for p in policies}
        self._accepted = {k: v for k, v in self._accepted.items() if k in live}
        conditions: dict[tuple[str, str], Condition] = {}
        effective: dict[ServiceKey, TrafficConfig] = {}
        for p in policies:
            conditions[(p.namespace, p.name)] = self._judge(snap, p, effective)
        self._conditions, self._effective = conditions, effective
        self._services = {k: v for k, v in self._services.items() if k in snap.services}

    def _judge(
        self, snap: Snapshot, p: PolicyObject, effective: dict[ServiceKey, TrafficConfig]
    ) -> Condition:
        key, target = (p.namespace, p.name), _target(p)
        service = snap.services.get(target)
        try:
            config = compile_policy(p, service)
        except TrafficPolicyError as e:
            previous = self._accepted.get(key)
            kept = ""
            if previous is not None and previous[0] == target and not p.dry_run:
                effective.setdefault(target, previous[1])
                kept = f"; generation {previous[1].generation} stays in force"
            return Condition("False", "Invalid", f"{e}{kept}", p.generation)
        if p.dry_run:
            return Condition("True", "DryRun", "checked, not enforced (dry-run)", p.generation)
        if target in effective:
            winner = effective[target].policy
            return Condition(
                "False",
                "Conflicted",
                f"{winner} already configures Service {target[1]}; merge the two or delete one",
                p.generation,
            )
        self._accepted[key] = (target, config)
        effective[target] = config
        if service is None:
            return Condition(
                "True",
                "TargetNotFound",
                f"no Service {target[1]} in {p.namespace} (yet)",
                p.generation,
            )
        notes = []
        if config.locality == "SAME_ZONE":
            notes.append("zones are not known to the agent: SAME_ZONE acts as NONE")
        labels = [e.labels for e in endpoints_of(snap, service)]
        empty = [
            s.name
            for s in config.subsets
            if s.weight and not any(all(m.get(k) == v for k, v in s.labels.items()) for m in labels)
        ]
        if empty:
            notes.append(
                f"subset(s) {', '.join(empty)} select no ready endpoint now; "
                "their share goes to the other subsets"
            )
        return Condition("True", "Accepted", "; ".join(notes), p.generation)

    def config_for(self, key: ServiceKey) -> TrafficConfig:
        return self._effective.get(key, self.defaults)

    def service(self, snap: Snapshot, service: Service) -> ServiceTraffic:
        """The traffic state of ``service``, synced to ``snap`` (policy and endpoints).

        Asked per request on an HTTP port: one synced at ``snap``'s version is returned at
        once (``update`` had run for that version when it was synced)."""
        key = (service.namespace, service.name)
        synced = self._services.get(key)
        if synced is not None and synced[0] == snap.version:
            return synced[1]
        self.update(snap)
        config = self.config_for(key)
        synced = self._services.get(key)  # ``update`` drops the Services ``snap`` lacks
        if synced is None:
            name = f"{service.namespace}/{service.name}"
            traffic = ServiceTraffic(
                name, config, clock=self.clock, rng=self.rng, observer=self.observer
            )
        else:
            version, traffic = synced
            if version == snap.version:
                return traffic
            traffic.reconfigure(config)
        traffic.sync(endpoints_of(snap, service))
        self._services[key] = (snap.version, traffic)
        return traffic

    def conditions(self) -> dict[str, dict[str, object]]:
        """``"<namespace>/<name>"`` of every TrafficPolicy → its Accepted condition."""
        return {f"{ns}/{name}": c.describe() for (ns, name), c in self._conditions.items()}

    def describe(self, snap: Snapshot | None = None) -> dict[str, object]:
        """Policy conditions, effective policies, and endpoint health and counters per Service
        in use (admin API); with ``snap``, brought up to date with it first."""
        if snap is not None:
            self.update(snap)
        services = {f"{ns}/{n}": t.describe() for (ns, n), (_, t) in self._services.items()}
        effective = {f"{ns}/{n}": c.describe() for (ns, n), c in self._effective.items()}
        return {"policies": self.conditions(), "effective": effective, "services": services}
