"""The route-status Lease election, sans-IO (agent.sources.lease): create, renew, follow, take
over an expired or released Lease, lose a race, and stop writing before anyone may take over."""

from __future__ import annotations

import pytest

from agent.sources.lease import LeaseElection, LeaseRecord


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _election(identity: str, clock: Clock) -> LeaseElection:
    return LeaseElection(identity, duration=15.0, renew_deadline=10.0, clock=clock)


def test_an_absent_lease_is_created_and_renewed_by_its_holder() -> None:
    clock = Clock()
    me = _election("node1", clock)
    record = me.decide(None, "t0")
    assert record == LeaseRecord("node1", 15.0, "t0", "t0", 0)
    assert not me.leading()  # not before the write succeeded
    me.wrote(record, ok=True)
    assert me.leading()
    clock.now += 2
    renewal = me.decide(record, "t2")
    assert renewal == LeaseRecord("node1", 15.0, "t2", "t0", 0)


def test_a_holder_that_cannot_renew_stops_writing_at_its_deadline() -> None:
    clock = Clock()
    me = _election("node1", clock)
    record = me.decide(None, "t0")
    assert record is not None
    me.wrote(record, ok=True)
    clock.now += 9.9
    me.wrote(record, ok=False)  # an API error: not a conflict
    assert me.leading()
    clock.now += 0.1
    assert not me.leading()  # 10 s after the last renewal, 5 s before anyone may take over


def test_a_follower_takes_over_only_a_lease_unchanged_for_its_duration_by_its_own_clock() -> None:
    clock = Clock()
    other = _election("node2", clock)
    held = LeaseRecord("node1", 15.0, "t0", "t0", 3)
    assert other.decide(held, "x") is None
    clock.now += 14
    renewed = LeaseRecord("node1", 15.0, "t14", "t0", 3)  # the holder renewed: a new record
    assert other.decide(renewed, "x") is None
    clock.now += 14.9
    assert other.decide(renewed, "x") is None
    clock.now += 0.1
    takeover = other.decide(renewed, "t29")
    assert takeover == LeaseRecord("node2", 15.0, "t29", "t29", 4)
    other.wrote(takeover, ok=True)
    assert other.leading()


def test_a_released_lease_is_taken_at_once_and_a_lost_race_leaves_a_follower() -> None:
    clock = Clock()
    first, second = _election("node1", clock), _election("node2", clock)
    record = first.decide(None, "t0")
    assert record is not None
    first.wrote(record, ok=True)
    released = first.release(record, "t1")
    assert released == LeaseRecord("", 15.0, "t1", "t0", 0) and not first.leading()
    takeover = second.decide(released, "t1")
    assert takeover is not None and takeover.holder == "node2"
    second.wrote(takeover, ok=False, conflict=True)  # another agent was first
    assert not second.leading()
    assert first.release(LeaseRecord("node3", 15.0, "t", "t"), "t") is None  # not ours


def test_a_renew_deadline_not_shorter_than_the_lease_is_refused() -> None:
    with pytest.raises(ValueError, match="must be shorter than the lease"):
        LeaseElection("n", duration=10.0, renew_deadline=10.0, clock=Clock())
