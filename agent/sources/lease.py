"""One writer of route status per cluster: a ``coordination.k8s.io`` Lease, decided sans-IO.

Why: route status (``status.parents``) is a pure function of the routes and the Services, so
every agent computes the same bytes, but N agents reacting to one change send N writes (one
wins, the others get 409s), and an agent whose view lags can write a verdict that a fresher
one must then correct. One writer per cluster removes both without a new component: the agents
elect one with the Lease object Kubernetes itself uses for leader election (no new dependency,
no extra Deployment), and only the holder writes route status.

The election follows client-go's ``leaderelection`` rules, as data in, decision out:

* a Lease that does not exist is created with us as holder;
* the holder renews it (``renewTime``) every ``retry_period``;
* another agent takes it over only when the record it read has not changed for
  ``leaseDurationSeconds`` *by its own clock* (the observed time, not the writer's
  ``renewTime``, so clock skew between nodes cannot make a live holder look expired), or when
  the holder released it (``holderIdentity`` empty, as an agent that stops does);
* every write carries the ``resourceVersion`` it read, so of two agents racing for it one wins
  and the other's 409 leaves it a follower;
* a holder that could not renew for ``renew_deadline`` (shorter than the lease) stops writing
  before anyone else may take over, so two writers never overlap.

``LeaseElection`` makes these decisions; ``agent.sources.kube`` reads and writes the object.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

LEASE_NAME = "nodemesh-route-status"
LEASE_DURATION = 15.0  # seconds (client-go's default)
RENEW_DEADLINE = 10.0  # a holder that could not renew for this long stops writing
RETRY_PERIOD = 2.0  # seconds between two looks at the Lease


@dataclass(frozen=True, slots=True)
class LeaseRecord:
    """What a Lease's spec says about its holder."""

    holder: str
    duration: float
    renew_time: str
    acquire_time: str
    transitions: int = 0

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any]) -> LeaseRecord:
        return cls(
            holder=str(spec.get("holderIdentity") or ""),
            duration=float(spec.get("leaseDurationSeconds") or LEASE_DURATION),
            renew_time=str(spec.get("renewTime") or ""),
            acquire_time=str(spec.get("acquireTime") or ""),
            transitions=int(spec.get("leaseTransitions") or 0),
        )

    def spec(self) -> dict[str, Any]:
        return {
            "holderIdentity": self.holder,
            "leaseDurationSeconds": int(self.duration),
            "acquireTime": self.acquire_time,
            "renewTime": self.renew_time,
            "leaseTransitions": self.transitions,
        }


def micro_time(now: datetime.datetime | None = None) -> str:
    """Kubernetes' MicroTime for ``now`` (UTC)."""
    now = now or datetime.datetime.now(datetime.UTC)
    return now.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class LeaseElection:
    """This agent's view of the election; ``clock`` is monotonic seconds."""

    def __init__(
        self,
        identity: str,
        *,
        duration: float = LEASE_DURATION,
        renew_deadline: float = RENEW_DEADLINE,
        clock: Callable[[], float],
    ) -> None:
        if not 0 < renew_deadline < duration:
            raise ValueError(
                f"renew deadline {renew_deadline}s must be shorter than the lease ({duration}s): "
                "else a holder that cannot renew would still write after another took over"
            )
        self.identity = identity
        self.duration, self.renew_deadline = duration, renew_deadline
        self.clock = clock
        self._observed: LeaseRecord | None = None
        self._observed_at = 0.0
        self._renewed_at: float | None = None  # when our last write as holder succeeded

    def leading(self) -> bool:
        """May this agent write route status now?"""
        renewed = self._renewed_at
        return renewed is not None and self.clock() < renewed + self.renew_deadline

    def decide(self, current: LeaseRecord | None, wall: str) -> LeaseRecord | None:
        """The Lease as just read (None: it does not exist) → the record to write (create it,
        renew it, take it over), or None: another agent holds it."""
        now = self.clock()
        if current != self._observed:
            self._observed, self._observed_at = current, now
        if current is None:
            return LeaseRecord(self.identity, self.duration, wall, wall)
        if current.holder == self.identity:
            return LeaseRecord(
                self.identity, self.duration, wall, current.acquire_time or wall,
                current.transitions,
            )  # fmt: skip
        if current.holder and now < self._observed_at + current.duration:
            self._renewed_at = None  # someone else holds it
            return None
        return LeaseRecord(self.identity, self.duration, wall, wall, current.transitions + 1)

    def wrote(self, record: LeaseRecord, *, ok: bool, conflict: bool = False) -> None:
        """The outcome of writing ``record``: ``ok``; or a ``conflict`` (409: another agent
        changed it first, so we do not hold it); or another failure, after which a holder
        keeps writing only until its renew deadline."""
        if ok:
            self._observed, self._observed_at = record, self.clock()
            self._renewed_at = self.clock() if record.holder == self.identity else None
        elif conflict:
            self._renewed_at = None

    def release(self, current: LeaseRecord | None, wall: str) -> LeaseRecord | None:
        """The record that gives the Lease up (we are stopping), if we hold it."""
        self._renewed_at = None
        if current is None or current.holder != self.identity:
            return None
        return LeaseRecord("", self.duration, wall, current.acquire_time, current.transitions)
