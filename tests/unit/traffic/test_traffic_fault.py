import random

from agent.policy.traffic.config import Fault
from agent.policy.traffic.fault import NO_FAULT, decide


def test_rates_match_the_configuration():
    fault = Fault(delay_percent=30.0, delay=0.5, abort_percent=10.0, abort_mode="REFUSE")
    rng = random.Random(21)
    n = 20000
    decisions = [decide(fault, None, rng) for _ in range(n)]
    delays = sum(d.delay == 0.5 for d in decisions)
    aborts = sum(d.abort == "REFUSE" for d in decisions)
    assert abs(delays - 0.3 * n) <= 4 * (n * 0.3 * 0.7) ** 0.5
    assert abs(aborts - 0.1 * n) <= 4 * (n * 0.1 * 0.9) ** 0.5


def test_source_selector_limits_the_faults():
    fault = Fault(abort_percent=100.0, source_labels={"app": "chaos"})
    rng = random.Random(0)
    assert decide(fault, {"app": "chaos", "x": "y"}, rng).abort == "RESET"
    assert decide(fault, {"app": "web"}, rng) == NO_FAULT
    assert decide(fault, None, rng) == NO_FAULT


def test_no_fault_configured():
    assert not decide(None, {"app": "x"}, random.Random(0)).any
