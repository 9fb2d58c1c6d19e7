"""Property test: whatever happens to connections and endpoints, the books balance.

Random interleavings of admissions, attempts that connect or fail, retries, resets, finishes,
time passing and the endpoint list changing (endpoints leaving and coming back while connections
to them are open). Invariants: open and pending counts and every endpoint's active count never go
negative, and once every connection has finished they are all zero; the outlier detector tracks
exactly the current endpoints.
"""

from __future__ import annotations

import contextlib
import random

from hypothesis import given, settings
from hypothesis import strategies as st

from agent.policy.traffic.attempts import CONNECT_FAILURE, REFUSED, Attempts
from agent.policy.traffic.config import Subset, TrafficConfig
from agent.policy.traffic.service import EndpointInfo, Rejected, ServiceTraffic
from tests.unit.traffic.traffic_helpers import FakeClock

IPS = [f"10.0.0.{i}" for i in range(1, 6)]
CONFIGS = [
    TrafficConfig(consecutive_failures=1, max_connections=4, max_pending=2),
    TrafficConfig(balancer="ROUND_ROBIN", consecutive_failures=2, max_ejection_percent=100),
    TrafficConfig(
        balancer="LEAST_CONNECTIONS",
        consecutive_failures=1,
        subsets=(Subset("a", {"v": "a"}, 70), Subset("b", {"v": "b"}, 30)),
    ),
]
Op = tuple[str, int]
OPS = st.tuples(
    st.sampled_from(["admit", "attempt", "connect", "fail", "finish", "reset", "tick", "resync"]),
    st.integers(0, 7),
)


def endpoints(mask: int) -> list[EndpointInfo]:
    chosen = [ip for i, ip in enumerate(IPS) if mask & (1 << i)] or IPS[:1]
    return [EndpointInfo(ip, {"v": "a" if i % 2 else "b"}) for i, ip in enumerate(chosen)]


def check(t: ServiceTraffic) -> None:
    assert t.active >= 0 and t.pending >= 0 and t.pending <= t.active
    assert all(load.active >= 0 for load in t.loads.values())
    assert t.outlier.out <= set(t.endpoints) == set(t.outlier.health)


@settings(max_examples=200, deadline=None)
@given(config=st.sampled_from(CONFIGS), ops=st.lists(OPS, max_size=80), seed=st.integers(0, 99))
def test_counts_balance_under_any_interleaving(
    config: TrafficConfig, ops: list[Op], seed: int
) -> None:
    clock = FakeClock()
    t = ServiceTraffic("default/web", config, clock=clock, rng=random.Random(seed))
    t.sync(endpoints(0b11111))
    live: list[Attempts] = []
    loads = set(map(id, t.loads.values()))
    all_loads = list(t.loads.values())
    for op, n in ops:
        pick = live[n % len(live)] if live else None
        if op == "admit":
            with contextlib.suppress(Rejected):
                live.append(t.admit(f"10.1.0.{n}", {"app": "c"}))
        elif pick is not None and op == "attempt" and pick.current is None and not pick._connected:
            pick.next_endpoint()
        elif pick is not None and op == "connect" and pick.current and not pick._connected:
            pick.connected(pick.current)
        elif pick is not None and op == "fail" and pick.current and not pick._connected:
            pick.failed(pick.current, REFUSED if n % 2 else CONNECT_FAILURE)
            pick.may_retry(REFUSED)
        elif pick is not None and op in ("finish", "reset"):
            pick.finish(reset_before_data=op == "reset" and pick._connected)
            live.remove(pick)
        elif op == "tick":
            clock.advance(n * 7.0)
        elif op == "resync":
            t.sync(endpoints(n * 5 + 3))
            for load in t.loads.values():
                if id(load) not in loads:
                    loads.add(id(load))
                    all_loads.append(load)
        check(t)
    for attempts in live:
        attempts.finish()
    check(t)
    assert (t.active, t.pending) == (0, 0)
    assert all(load.active == 0 for load in all_loads)
