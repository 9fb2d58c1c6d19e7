import math
import random
from collections import Counter

import pytest

from agent.policy.traffic.balancer import (
    DECAY,
    FAILURE_SAMPLE,
    INITIAL_ESTIMATE,
    EndpointLoad,
    LeastConnections,
    PeakEwma,
    RoundRobin,
    make_balancer,
    prefer_local,
)


def simulate(balancer, loads, rtts, now, n, step=0.01):
    """n sequential connections; each observes the RTT of the endpoint it picked."""
    picks: Counter[str] = Counter()
    for _ in range(n):
        chosen = balancer.pick(loads, now)
        chosen.observe(rtts[chosen.ip], now + rtts[chosen.ip])
        picks[chosen.ip] += 1
        now += step
    return picks, now


def test_peak_ewma_prefers_the_fast_endpoint():
    loads = [EndpointLoad("10.0.0.1", 0.0), EndpointLoad("10.0.0.2", 0.0)]
    picks, _ = simulate(
        PeakEwma(random.Random(1)), loads, {"10.0.0.1": 0.001, "10.0.0.2": 0.05}, 0.0, 2000
    )
    assert picks["10.0.0.2"] < 0.05 * 2000
    assert picks["10.0.0.1"] > 0.95 * 2000


def test_peak_ewma_moves_off_an_endpoint_that_slows_down():
    loads = [EndpointLoad("a", 0.0), EndpointLoad("b", 0.0)]
    rtts = {"a": 0.001, "b": 0.002}
    balancer = PeakEwma(random.Random(2))
    _, now = simulate(balancer, loads, rtts, 0.0, 500)
    rtts["a"] = 0.2  # a slows down: its first slow sample is its new estimate
    picks, _ = simulate(balancer, loads, rtts, now, 1000)
    assert picks["a"] < 0.05 * 1000


def test_peak_jumps_up_and_decays_toward_faster_samples():
    load = EndpointLoad("a", 0.0, estimate=0.01)
    load.observe(0.5, 0.0)
    assert load.estimate == 0.5
    load.observe(0.01, DECAY)  # one time constant later: about 63 % of the way down
    expected = 0.5 * 0.36787944 + 0.01 * (1 - 0.36787944)
    assert load.estimate == pytest.approx(expected, rel=1e-6)


def test_idle_estimate_decays_so_an_avoided_endpoint_is_tried_again():
    slow, fast = EndpointLoad("slow", 0.0, estimate=1.0), EndpointLoad("fast", 0.0, estimate=0.001)
    assert slow.cost(0.0) > fast.cost(0.0)
    assert slow.cost(10 * DECAY) < 0.001  # e^-10 of a second is below a millisecond


def test_cost_counts_active_connections():
    a = EndpointLoad("a", 0.0, estimate=0.01)
    b = EndpointLoad("b", 0.0, estimate=0.01)
    a.active = 3
    assert PeakEwma(random.Random(0)).pick([a, b], 0.0) is b


def test_new_endpoint_starts_at_the_initial_estimate():
    assert EndpointLoad("a", 0.0).estimate == INITIAL_ESTIMATE


def test_failure_is_sampled_as_at_least_a_second():
    load = EndpointLoad("a", 0.0, estimate=0.001)
    load.observe_failure(0.0001, 0.0)
    assert load.estimate == 1.0


def test_round_robin_is_even():
    loads = [EndpointLoad(ip, 0.0) for ip in "abc"]
    rr = RoundRobin(random.Random(3))
    picks = Counter(rr.pick(loads, 0.0).ip for _ in range(300))
    assert picks == {"a": 100, "b": 100, "c": 100}


def test_least_connections_picks_the_idlest():
    loads = [EndpointLoad(ip, 0.0) for ip in "abc"]
    loads[0].active, loads[1].active, loads[2].active = 2, 0, 1
    assert LeastConnections(random.Random(0)).pick(loads, 0.0).ip == "b"


def test_random_is_roughly_uniform():
    loads = [EndpointLoad(ip, 0.0) for ip in "ab"]
    rnd = make_balancer("RANDOM", random.Random(4))
    picks = Counter(rnd.pick(loads, 0.0).ip for _ in range(4000))
    assert abs(picks["a"] - 2000) < 4 * (4000 * 0.25) ** 0.5  # four standard deviations


def test_unknown_balancer_is_named():
    with pytest.raises(ValueError, match="unknown load balancer 'FASTEST'") as e:
        make_balancer("FASTEST", random.Random(0))
    assert "use one of LEAST_CONNECTIONS, PEAK_EWMA, RANDOM, ROUND_ROBIN" in str(e.value)


def test_prefer_local_keeps_local_endpoints_and_falls_back():
    loads = [EndpointLoad("a", 0.0), EndpointLoad("b", 0.0)]
    where = {"a": ("node1", "z1"), "b": ("node2", "z1")}
    assert [c.ip for c in prefer_local(loads, "SAME_NODE", ("node2", None), where)] == ["b"]
    assert len(prefer_local(loads, "SAME_NODE", ("node3", None), where)) == 2
    assert len(prefer_local(loads, "SAME_ZONE", ("node3", "z1"), where)) == 2
    assert len(prefer_local(loads, "SAME_ZONE", ("node3", None), where)) == 2
    assert len(prefer_local(loads, "NONE", ("node1", "z1"), where)) == 2


class _ReferenceLoad:
    """The peak EWMA's step as first written (``max`` calls, ``math.exp``): what
    ``EndpointLoad``'s inlined arithmetic must give to the bit."""

    def __init__(self, ip: str, stamp: float) -> None:
        self.ip, self.stamp, self.active, self.estimate = ip, stamp, 0, INITIAL_ESTIMATE

    def update(self, now: float, sample: float) -> float:
        elapsed = max(0.0, now - self.stamp)
        if sample > self.estimate:
            self.estimate = sample
        else:
            weight = math.exp(-elapsed / DECAY)
            self.estimate = self.estimate * weight + sample * (1.0 - weight)
        self.stamp = max(self.stamp, now)
        return self.estimate

    def cost(self, now: float) -> float:
        return self.update(now, 0.0) * (self.active + 1)


def test_peak_ewma_picks_and_estimates_equal_the_reference_step_to_the_bit():
    """Seeded picks among five endpoints with connects, failures (under and over a second),
    times that repeat and go backwards, and active counts: the same endpoint picked and the
    same estimate and stamp (``==``, not approximately) as the reference at every step."""
    ips = [f"10.0.0.{i}" for i in range(5)]
    loads = [EndpointLoad(ip, 0.0) for ip in ips]
    reference = {ip: _ReferenceLoad(ip, 0.0) for ip in ips}
    balancer, picker = PeakEwma(random.Random(7)), random.Random(7)
    draws, now = random.Random(11), 0.0
    for _ in range(3000):
        now += draws.choice([0.0, 0.0005, 0.02, 3.0, -0.001])
        chosen = balancer.pick(loads, now)
        a, b = picker.sample(list(reference.values()), 2)
        expected = a if a.cost(now) <= b.cost(now) else b
        assert chosen.ip == expected.ip
        what, sample = draws.random(), draws.expovariate(50.0)
        if what < 0.1:
            chosen.observe_failure(sample * 100, now)
            expected.update(now, max(sample * 100, FAILURE_SAMPLE))
        elif what < 0.2:
            chosen.active += 1
            expected.active += 1
        else:
            chosen.observe(sample, now + sample)
            expected.update(now + sample, sample)
        for load in loads:
            ref = reference[load.ip]
            assert (load.estimate, load.stamp, load.active) == (ref.estimate, ref.stamp, ref.active)
