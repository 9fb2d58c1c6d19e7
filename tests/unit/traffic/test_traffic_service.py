import json
import random
from collections import Counter
from dataclasses import replace

import pytest

import agent.policy.traffic.service as service_module
from agent.policy.traffic import outlier
from agent.policy.traffic.attempts import CONNECT_FAILURE, REFUSED
from agent.policy.traffic.config import Fault, Subset, TrafficConfig
from agent.policy.traffic.outlier import EJECTED
from agent.policy.traffic.service import EndpointInfo, Rejected, ServiceTraffic
from tests.unit.traffic.traffic_helpers import FakeClock

A, B, C = "10.244.1.2", "10.244.2.2", "10.244.2.3"


def service(config=None, endpoints=(A, B), clock=None, seed=5, labels=None):
    clock = clock or FakeClock()
    t = ServiceTraffic(
        "default/server", config or TrafficConfig(), clock=clock, rng=random.Random(seed)
    )
    t.sync(
        [
            EndpointInfo(ip, (labels or {}).get(ip, {}), node="n1" if ip == A else "n2")
            for ip in endpoints
        ]
    )
    return t, clock


def connect_ok(t, clock, rtt=0.001):
    attempts = t.admit("10.244.1.9")
    ip = attempts.next_endpoint()
    clock.advance(rtt)
    attempts.connected(ip)
    return attempts, ip


def test_limits_reject_at_once_with_a_counted_reason():
    t, clock = service(TrafficConfig(max_connections=2, max_pending=1))
    first = t.admit("c")
    with pytest.raises(Rejected, match="max_pending"):
        t.admit("c")
    first.connected(first.next_endpoint())
    second, _ = connect_ok(t, clock)
    with pytest.raises(Rejected) as e:
        t.admit("c")
    assert e.value.reason == "max_connections"
    assert t.counters["rejected_max_connections"] == 1 and t.counters["rejected_max_pending"] == 1
    second.finish()
    first.finish()
    assert (t.active, t.pending) == (0, 0)
    t.admit("c")


def test_a_failed_connect_is_retried_on_another_endpoint():
    t, _ = service(TrafficConfig(retries=2))
    attempts = t.admit("c")
    first = attempts.next_endpoint()
    attempts.failed(first, REFUSED)
    assert attempts.may_retry(REFUSED)
    second = attempts.next_endpoint()
    assert {first, second} == {A, B}
    attempts.connected(second)
    attempts.finish()
    assert t.counters["retries"] == 1 and t.counters["failed_refused"] == 1
    assert all(load.active == 0 for load in t.loads.values())


def test_attempts_are_bounded():
    t, _ = service(TrafficConfig(retries=1))
    attempts = t.admit("c")
    attempts.failed(attempts.next_endpoint(), REFUSED)
    assert attempts.may_retry(REFUSED)
    attempts.failed(attempts.next_endpoint(), REFUSED)
    assert not attempts.may_retry(REFUSED)


def test_only_configured_causes_are_retried():
    t, _ = service(TrafficConfig(retry_on=frozenset({REFUSED})))
    attempts = t.admit("c")
    attempts.failed(attempts.next_endpoint(), CONNECT_FAILURE)
    assert not attempts.may_retry(CONNECT_FAILURE)


def test_retry_budget_stops_an_outage_from_amplifying():
    config = TrafficConfig(
        retries=5, budget_percent=20, min_retries_per_second=0, consecutive_failures=1000
    )
    t, _ = service(config)
    tried = 0
    for _ in range(100):
        attempts = t.admit("c")
        while (ip := attempts.next_endpoint()) is not None:
            tried += 1
            attempts.failed(ip, REFUSED)
            if not attempts.may_retry(REFUSED):
                break
        attempts.finish()
    assert t.counters["retries"] <= 20 + 1
    assert tried <= 121
    assert t.counters["retry_budget_exhausted"] >= 79


def test_overall_deadline_cuts_the_per_try_timeout_and_stops_retries():
    t, clock = service(replace(TrafficConfig(), connect_timeout=1.0, per_try_timeout=0.4))
    attempts = t.admit("c")
    assert attempts.try_timeout() == pytest.approx(0.4)
    attempts.failed(attempts.next_endpoint(), CONNECT_FAILURE)
    clock.advance(0.8)
    assert attempts.may_retry(CONNECT_FAILURE)
    attempts.next_endpoint()
    assert attempts.try_timeout() == pytest.approx(0.2)
    clock.advance(0.3)
    attempts.failed(attempts.current or "", CONNECT_FAILURE)
    assert not attempts.may_retry(CONNECT_FAILURE)
    assert t.counters["retry_deadline"] == 1


def test_refusing_endpoint_is_ejected_and_gets_no_traffic():
    t, clock = service(TrafficConfig(consecutive_failures=3), endpoints=(A, B, C))
    for _ in range(3):
        attempts = t.admit("c")
        attempts.tried.extend([B, C])  # steer the first attempt to A
        ip = attempts.next_endpoint()
        assert ip == A
        attempts.failed(ip, REFUSED)
        attempts.finish()
    assert t.outlier.health[A].state == EJECTED
    picks = Counter(connect_ok(t, clock)[1] for _ in range(200))
    assert picks[A] == 0


def test_reset_before_data_counts_toward_ejection():
    t, clock = service(
        TrafficConfig(consecutive_failures=2, balancer="ROUND_ROBIN"), endpoints=(A,)
    )
    for _ in range(2):
        attempts, _ = connect_ok(t, clock)
        attempts.finish(reset_before_data=True)
    assert t.outlier.events["capped"] == 1  # one endpoint of one: 50 % forbids ejecting it
    assert t.counters["failed_reset-before-data"] == 2


def test_panic_when_every_endpoint_is_ejected():
    t, clock = service(TrafficConfig(consecutive_failures=1, max_ejection_percent=100))
    for ip in (A, B):
        t.outlier.failure(ip, clock())
    attempts = t.admit("c")
    assert attempts.next_endpoint() in (A, B)
    assert t.counters["panic"] == 1


def test_no_endpoints():
    t, _ = service(endpoints=())
    assert t.admit("c").next_endpoint() is None
    assert t.counters["no_endpoints"] == 1


def test_split_steers_by_subset_and_changes_live():
    labels = {A: {"version": "v1"}, B: {"version": "v2"}}
    split = (Subset("v1", {"version": "v1"}, 90), Subset("v2", {"version": "v2"}, 10))
    t, clock = service(TrafficConfig(subsets=split), labels=labels, seed=8)
    n = 5000
    picks = Counter(connect_ok(t, clock)[1] for _ in range(n))
    assert abs(picks[B] - 0.1 * n) <= 4 * (n * 0.09) ** 0.5
    t.reconfigure(
        TrafficConfig(subsets=(replace(split[0], weight=50), replace(split[1], weight=50)))
    )
    picks = Counter(connect_ok(t, clock)[1] for _ in range(n))
    assert abs(picks[B] - 0.5 * n) <= 4 * (n * 0.25) ** 0.5
    assert sum(t.splitter.decisions.values()) == 2 * n  # counts survive the change


def test_endpoint_outside_every_subset_gets_nothing():
    labels = {A: {"version": "v1"}, B: {"version": "v3"}}
    t, clock = service(
        TrafficConfig(subsets=(Subset("v1", {"version": "v1"}, 100),)), labels=labels
    )
    assert {connect_ok(t, clock)[1] for _ in range(50)} == {A}


def test_locality_prefers_the_client_node():
    t, _ = service(TrafficConfig(locality="SAME_NODE"))
    picks = set()
    for _ in range(50):
        attempts = t.admit("c", source_node=("n2", None))
        picks.add(attempts.next_endpoint())
        attempts.finish()
    assert picks == {B}


def test_a_narrowed_pick_is_among_the_callers_candidates_within_the_subset_before_locality():
    """``Attempts.narrow`` (the h2 source's, when the descriptor budget is full) sees the
    chosen subset's candidates only, and its preference wins over locality; a narrow that
    keeps them all leaves the pick as the balancer makes it."""
    labels = {A: {"version": "v1"}, B: {"version": "v1"}, C: {"version": "v2"}}
    split = (Subset("v1", {"version": "v1"}, 100), Subset("v2", {"version": "v2"}, 0))
    t, _ = service(
        TrafficConfig(subsets=split, locality="SAME_NODE"), endpoints=(A, B, C), labels=labels
    )
    seen, picks = set(), set()

    def far(_key, pool):
        seen.update(load.ip for load in pool)
        return [load for load in pool if load.ip != A] or pool

    for _ in range(50):
        attempts = t.admit("c", source_node=("n1", None))  # A is on n1: locality prefers it
        attempts.narrow = far
        picks.add(attempts.next_endpoint())
        attempts.finish()
    assert seen == {A, B} and picks == {B}  # C is in the other subset: never offered
    for _ in range(20):
        attempts = t.admit("c", source_node=("n1", None))
        attempts.narrow = lambda _key, pool: pool
        picks.add(attempts.next_endpoint())
        attempts.finish()
    assert A in picks  # nothing narrowed: locality prefers A again


def test_faults_are_decided_and_counted_at_admission():
    fault = Fault(delay_percent=100.0, delay=0.25, abort_percent=100.0, abort_mode="RESET")
    t, _ = service(TrafficConfig(fault=fault))
    attempts = t.admit("c")
    assert (attempts.fault.delay, attempts.fault.abort) == (0.25, "RESET")
    assert t.counters["fault_delay"] == 1 and t.counters["fault_abort_reset"] == 1


def test_fault_delay_does_not_eat_the_connect_timeout():
    fault = Fault(delay_percent=100.0, delay=5.0)
    t, clock = service(TrafficConfig(fault=fault, connect_timeout=1.0, per_try_timeout=1.0))
    attempts = t.admit("c")
    clock.advance(5.0)
    assert attempts.try_timeout() == pytest.approx(1.0)


def test_sync_keeps_history_of_endpoints_that_stay():
    t, clock = service()
    connect_ok(t, clock, rtt=0.2)
    estimates = {ip: load.estimate for ip, load in t.loads.items()}
    t.sync([EndpointInfo(A), EndpointInfo(C)])
    assert t.loads[A].estimate == estimates[A]
    assert set(t.loads) == {A, C} and set(t.outlier.health) == {A, C}


def test_describe_is_plain_data():
    t, clock = service()
    connect_ok(t, clock)
    info = t.describe()
    json.dumps(info)
    assert info["active"] == 1 and len(info["endpoints"]) == 2


def test_endpoint_that_accepts_then_resets_is_ejected_and_probed_back():
    t, clock = service(TrafficConfig(consecutive_failures=2, base_ejection=10.0))
    for _ in range(2):
        attempts = t.admit("c")
        attempts.tried.append(B)
        ip = attempts.next_endpoint()
        attempts.connected(ip)
        attempts.finish(reset_before_data=True)
    assert t.outlier.ejected() == [A]
    clock.advance(10.0)
    probe = t.admit("c")
    probe.tried.append(B)
    assert probe.next_endpoint() == A
    other = t.admit("c")
    assert other.next_endpoint() == B  # one probe at a time
    probe.connected(A)
    assert t.outlier.ejected() == []
    assert t.outlier.events["returned"] == 1


def test_observer_hears_every_counted_event():
    events = []
    labels = {A: {"version": "v1"}, B: {"version": "v2"}}
    config = TrafficConfig(
        consecutive_failures=1,
        subsets=(Subset("v1", {"version": "v1"}, 50), Subset("v2", {"version": "v2"}, 50)),
        fault=Fault(delay_percent=100.0, delay=0.1),
    )
    t, _ = service(config, labels=labels)
    t.observer = lambda name, event, detail: events.append((name, event, detail))
    attempts = t.admit("c")
    ip = attempts.next_endpoint()
    attempts.failed(ip, REFUSED)
    assert attempts.may_retry(REFUSED)
    attempts.finish()
    kinds = {(event, detail) for _, event, detail in events}
    assert {("fault", "delay"), ("connections", ""), ("failed", "refused")} <= kinds
    assert ("outlier", "ejected") in kinds and ("retries", "") in kinds
    assert any(event == "split" for _, event, _ in events)
    assert {name for name, _, _ in events} == {"default/server"}


def test_time_to_first_byte_is_a_latency_sample():
    t, clock = service(TrafficConfig(balancer="ROUND_ROBIN"))
    attempts, ip = connect_ok(t, clock, rtt=0.001)
    assert t.loads[ip].estimate < 0.031
    attempts.finish(first_byte_at=clock() + 0.2)  # the server answered 200 ms later
    assert t.loads[ip].estimate == pytest.approx(0.201)


def test_a_request_on_a_healthy_service_makes_no_health_record_and_rolls_no_fault(monkeypatch):
    """What every HTTP request pays (admit, pick, connected, finish): the endpoints' health
    records are made by ``sync``, not one per call, and without a fault policy nothing is
    rolled; the books still balance and every admission is counted."""
    t, clock = service()
    made = Counter()
    health, decide = outlier.Health, service_module.decide
    monkeypatch.setattr(outlier, "Health", lambda *a: made.update(["health"]) or health(*a))
    monkeypatch.setattr(service_module, "decide", lambda *a: made.update(["decide"]) or decide(*a))
    for reused in (False, True) * 20:
        attempts = t.admit("10.244.1.9", may_queue=True)
        ip = attempts.next_endpoint()
        attempts.connected(ip, reused=reused)
        attempts.finish(first_byte_at=clock())
    assert made == Counter()
    assert (t.active, t.pending, t.counters["connections"]) == (0, 0, 40)
    assert all(t.outlier.health[ip].consecutive_failures == 0 for ip in (A, B))


class TickingClock:
    """Each read one second after the last: a step that read the clock twice would give the
    things it records different instants; ``reads`` counts the reads."""

    def __init__(self) -> None:
        self.now, self.reads = 1000.0, 0

    def __call__(self) -> float:
        self.reads += 1
        self.now += 1.0
        return self.now


def test_each_step_reads_the_clock_once_for_the_instant_all_it_records_shares():
    """Admission (the connect deadline, the retry budget's request), the pick (ejected
    endpoints' penalties, the balancer's decayed costs, the attempt's start that its connect
    time is measured from) and the retry decision (the deadline, the budget) each read the
    clock once; a pooled session's ``connected`` and ``finish`` read it not at all. So a
    request via a Service reads it twice, a try that connects four times."""
    clock = TickingClock()
    c = TrafficConfig(connect_timeout=30.0, per_try_timeout=5.0)
    t, _ = service(c, clock=clock)

    def reads(step):
        before = clock.reads
        out = step()
        return clock.reads - before, out

    assert reads(lambda: t.admit("c"))[0] == 1
    pooled = t.admit("c")
    admitted = clock.now
    assert pooled.deadline == admitted + c.connect_timeout
    assert t.budget.totals(admitted)[0] == 2  # the budget counted it at that same instant
    assert reads(pooled.next_endpoint) == (1, pooled.current)
    picked = clock.now
    assert [load.stamp for load in t.loads.values()] == [picked, picked]  # P2C's two costs
    assert reads(lambda: pooled.connected(pooled.current, reused=True))[0] == 0
    assert reads(pooled.finish)[0] == 0

    fresh = t.admit("c")
    ip = fresh.next_endpoint()
    picked = clock.now
    assert reads(lambda: fresh.connected(ip))[0] == 1
    assert t.loads[ip].estimate == clock.now - picked  # measured from the pick (peak: 1 s)
    assert reads(fresh.try_timeout) == (1, c.per_try_timeout)

    retried = t.admit("c")
    ip = retried.next_endpoint()
    assert reads(lambda: retried.failed(ip, CONNECT_FAILURE))[0] == 1
    spent = t.budget.totals(clock.now)[1]
    assert reads(lambda: retried.may_retry(CONNECT_FAILURE)) == (1, True)
    assert t.budget.totals(clock.now)[1] == spent + 1

    again = t.admit("c")  # an HTTP try answered 5xx, to be sent again
    again.connected(again.next_endpoint())
    assert reads(lambda: again.again(server_error=True))[0] == 1
    assert again.deadline == clock.now + c.connect_timeout


def test_a_queued_request_gets_its_deadline_from_the_instant_it_is_admitted():
    """Taken from the queue, a request reads the clock then (not ``admit``'s reading)."""
    clock = TickingClock()
    c = TrafficConfig(max_connections=1, max_pending_requests=1, connect_timeout=30.0)
    t, _ = service(c, clock=clock)
    first = t.admit("c", may_queue=True)
    waiting = t.admit("c", may_queue=True)
    assert waiting.queued and waiting.deadline == clock.now + c.connect_timeout
    first.finish()
    assert not waiting.queued and waiting.deadline == clock.now + c.connect_timeout


def test_a_request_whose_endpoint_left_is_settled_on_its_load_without_outlier_accounting():
    """The endpoint left the Service while the request ran: its count is undone on the
    ``EndpointLoad`` it was made on, and the outlier detector is not told (no ``Health`` made
    again for an endpoint it forgot), whether the request ended well or reset."""
    for reset in (False, True):
        t, clock = service(TrafficConfig(consecutive_failures=1))
        attempts, ip = connect_ok(t, clock)
        load = t.loads[ip]
        t.sync([EndpointInfo(other) for other in (A, B, C) if other != ip])
        attempts.finish(reset_before_data=reset)
        assert load.active == 0 and ip not in t.outlier.health and not t.outlier.out
        assert t.counters["failed_reset-before-data"] == int(reset)
