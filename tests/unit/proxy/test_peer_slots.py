"""``PeerSlots``: the per-peer connection count both inbound listeners (15008, 15006) limit, and
which of a peer's refusals are logged (the first while it stays at the limit)."""

from __future__ import annotations

from agent.base.conncaps import PeerSlots


def test_slots_are_counted_per_peer_and_a_released_peer_leaves_nothing_behind() -> None:
    slots = PeerSlots()
    for _ in range(2):
        assert not slots.at_limit("10.0.0.1", 2)
        slots.take("10.0.0.1")
    assert slots.at_limit("10.0.0.1", 2)
    assert not slots.at_limit("10.0.0.2", 2)
    slots.release("10.0.0.1")
    assert not slots.at_limit("10.0.0.1", 2)
    slots.release("10.0.0.1")
    assert dict(slots.held) == {}


def test_only_the_first_refusal_at_the_limit_is_logged_until_a_slot_is_released() -> None:
    slots = PeerSlots()
    slots.take("10.0.0.1")
    assert [slots.first_refusal("10.0.0.1") for _ in range(3)] == [True, False, False]
    assert slots.first_refusal("10.0.0.2")  # another peer is told apart
    slots.take("10.0.0.1")
    slots.release("10.0.0.1")  # one of its connections ended
    assert [slots.first_refusal("10.0.0.1") for _ in range(2)] == [True, False]
    assert not slots.first_refusal("10.0.0.2")
