"""Pure pieces: SPIFFE parsing, renewal and backoff schedules, the priority gate."""

from __future__ import annotations

import asyncio

import pytest

from agent.identity.gate import HIGH, LOW, PriorityGate
from agent.identity.rotation import Backoff, renewal_delay, retry_delay
from agent.identity.spiffe import SpiffeId, SpiffeIdError


def test_spiffe_round_trip() -> None:
    text = "spiffe://cluster.local/ns/default/sa/client"
    sid = SpiffeId.parse(text)
    assert (sid.trust_domain, sid.namespace, sid.service_account) == (
        "cluster.local",
        "default",
        "client",
    )
    assert str(sid) == text


@pytest.mark.parametrize(
    "text",
    [
        "",
        "http://cluster.local/ns/a/sa/b",
        "spiffe://cluster.local/ns/a/sa",
        "spiffe://cluster.local/ns/a/sa/b/c",
        "spiffe://cluster.local/sa/a/ns/b",
        "spiffe://Cluster.Local/ns/a/sa/b",
        "spiffe://cluster.local/ns/A/sa/b",
        "spiffe://cluster.local/ns/a/sa/b?x=1",
        "spiffe:///ns/a/sa/b",
        # ``re.match`` with ``$`` let a trailing newline through in each part
        "spiffe://cluster.local/ns/a/sa/b\n",
        "spiffe://cluster.local/ns/a\n/sa/b",
        "spiffe://cluster.local\n/ns/a/sa/b",
    ],
)
def test_spiffe_refuses_other_shapes(text: str) -> None:
    with pytest.raises(SpiffeIdError):
        SpiffeId.parse(text)


def test_renewal_at_half_the_remaining_validity_with_jitter_earlier() -> None:
    assert renewal_delay(1000.0, 1100.0, 0.0) == pytest.approx(50.0)
    assert renewal_delay(1000.0, 1100.0, 0.999) == pytest.approx(45.005)
    assert renewal_delay(1000.0, 900.0, 0.5) == 0.0


def test_backoff_doubles_from_half_a_second_to_the_cap() -> None:
    b = Backoff(initial=0.5, cap=30.0, jitter=0.0)
    assert [b.delay(n, 0.0) for n in range(1, 9)] == [0.5, 1, 2, 4, 8, 16, 30, 30]
    assert b.delay(10_000, 0.0) == 30.0
    assert Backoff(jitter=0.2).delay(1, 0.5) == pytest.approx(0.45)
    with pytest.raises(ValueError):
        b.delay(0, 0.0)


def test_retry_comes_before_the_held_certificate_expires() -> None:
    b = Backoff(initial=0.5, cap=30.0, jitter=0.0)
    assert retry_delay(b, 6, 0.0, None) == 16  # nothing held: plain backoff
    assert retry_delay(b, 6, 0.0, 3600.0) == 16  # far from expiry: plain backoff
    assert retry_delay(b, 6, 0.0, 10.0) == 5  # half the time left
    assert retry_delay(b, 6, 0.0, 0.4) == 0.5  # never below the first backoff step
    assert retry_delay(b, 1, 0.0, 10.0) == 0.5  # a shorter backoff is kept
    assert retry_delay(b, 6, 0.0, -1.0) == 16  # expired: plain backoff


def test_gate_bounds_holders_and_serves_high_priority_first() -> None:
    async def scenario() -> list[str]:
        gate = PriorityGate(2)
        order: list[str] = []
        release = asyncio.Event()
        active = 0
        peak = 0

        async def job(name: str, priority: int) -> None:
            nonlocal active, peak
            async with gate.slot(priority):
                active += 1
                peak = max(peak, active)
                order.append(name)
                await release.wait()
                active -= 1

        holders = [asyncio.create_task(job(f"hold{i}", LOW)) for i in range(2)]
        await asyncio.sleep(0)
        waiting = [asyncio.create_task(job(f"low{i}", LOW)) for i in range(3)]
        await asyncio.sleep(0)
        waiting.append(asyncio.create_task(job("urgent", HIGH)))
        await asyncio.sleep(0)
        release.set()
        await asyncio.gather(*holders, *waiting)
        assert peak == 2
        return order

    order = asyncio.run(scenario())
    assert order[:3] == ["hold0", "hold1", "urgent"]
    assert sorted(order[3:]) == ["low0", "low1", "low2"]


def test_gate_cancelled_waiter_does_not_leak_a_slot() -> None:
    async def scenario() -> None:
        gate = PriorityGate(1)
        async with gate.slot(LOW):
            waiter = asyncio.create_task(_take(gate))
            await asyncio.sleep(0)
            waiter.cancel()
            await asyncio.gather(waiter, return_exceptions=True)
        await asyncio.wait_for(_take(gate), 1)

    asyncio.run(scenario())


async def _take(gate: PriorityGate) -> None:
    async with gate.slot(HIGH):
        pass
