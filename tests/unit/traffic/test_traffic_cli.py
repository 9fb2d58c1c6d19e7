"""``nodemesh traffic``: the /traffic document as tables (real data from TrafficControl)."""

from __future__ import annotations

import json
import random

from agent.admin.cli import COMMANDS, format_traffic
from agent.policy.traffic.attempts import REFUSED
from agent.policy.traffic.control import TrafficControl
from tests.unit.traffic.test_traffic_control import SPLIT, put, store_with_service, svc
from tests.unit.traffic.traffic_helpers import FakeClock, traffic_policy


def test_traffic_table_shows_conditions_and_endpoint_health() -> None:
    store = store_with_service()
    put(store, traffic_policy({**SPLIT, "outlierDetection": {"consecutiveFailures": 1}}))
    tc = TrafficControl(clock=FakeClock(), rng=random.Random(1))
    traffic = tc.service(store.snapshot(), svc(store))
    attempts = traffic.admit("10.244.1.2")
    failed = attempts.next_endpoint() or ""
    attempts.failed(failed, REFUSED)
    attempts.finish()
    other = ({"10.244.2.2", "10.244.2.3"} - {failed}).pop()
    data = json.loads(json.dumps(tc.describe(store.snapshot())))  # as the admin API sends it
    table = format_traffic(data)
    assert "default/tp" in table and "Accepted" in table
    lines = {line.split()[2]: line for line in table.splitlines() if line.startswith("default/")}
    assert "EJECTED" in lines[failed] and "HEALTHY" in lines[other]
    assert " v2 " in lines["10.244.2.3"] and " v1 " in lines["10.244.2.2"]
    assert all(len(line) <= 100 for line in table.splitlines())
    assert COMMANDS["traffic"][0] == "/traffic"
    # Per Service: nothing in flight or pending now, the budget's window, one ejection.
    (totals,) = [line.split() for line in table.splitlines() if len(line.split()) == 5]
    assert totals[1:3] == ["0", "0"] and totals[4] == "1"
    budget = data["services"][totals[0]]["retry_budget"]
    assert totals[3] == f"{budget['retries']}/{budget['requests']}"
    # Returns, failed probes and capped (refused) ejections are not ejections.
    data["services"][totals[0]]["ejections"] = {
        "ejected": 2, "returned": 1, "capped": 3, "probe_failed": 1,
    }  # fmt: skip
    (totals,) = [line for line in format_traffic(data).splitlines() if "capped" in line]
    assert totals.split()[4:] == ["2", "(3", "capped)"]


def test_traffic_table_when_nothing_is_known() -> None:
    empty = {"policies": {}, "effective": {}, "services": {}}
    assert format_traffic(empty) == "no TrafficPolicy and no Service connection yet"
