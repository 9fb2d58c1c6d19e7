"""Merging the workers' metrics, connections and tapped requests into one answer."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from agent.workers import merge


def exposition(
    opened: dict[str, float], open_now: float, latencies: list[float], restarts: float | None
) -> bytes:
    registry = CollectorRegistry()
    c = Counter("conns_opened", "Opened.", ["direction"], registry=registry)
    for direction, n in opened.items():
        c.labels(direction).inc(n)
    Gauge("open_now", "Open.", registry=registry).set(open_now)
    h = Histogram("latency_seconds", "Latency.", buckets=(0.1, 1.0), registry=registry)
    for v in latencies:
        h.observe(v)
    if restarts is not None:  # agent-wide: the main process only
        Counter("worker_restarts", "Restarts.", registry=registry).inc(restarts)
    return generate_latest(registry)


def samples(text: bytes) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text.decode())
        for s in family.samples
        if not s.name.endswith("_created")
    }


def test_equal_samples_add_up_and_the_rest_is_kept() -> None:
    main = exposition({}, 0, [], restarts=2)
    w0 = exposition({"outbound": 3, "inbound": 1}, 2, [0.05, 0.5], restarts=None)
    w1 = exposition({"outbound": 4}, 5, [2.0], restarts=None)
    merged = samples(merge.expositions([main, w0, w1]))
    assert merged[("conns_opened_total", frozenset({("direction", "outbound")}))] == 7
    assert merged[("conns_opened_total", frozenset({("direction", "inbound")}))] == 1
    assert merged[("open_now", frozenset())] == 7
    assert merged[("worker_restarts_total", frozenset())] == 2
    assert merged[("latency_seconds_bucket", frozenset({("le", "0.1")}))] == 1
    assert merged[("latency_seconds_bucket", frozenset({("le", "1.0")}))] == 2
    assert merged[("latency_seconds_bucket", frozenset({("le", "+Inf")}))] == 3
    assert merged[("latency_seconds_count", frozenset())] == 3
    assert merged[("latency_seconds_sum", frozenset())] == 2.55


def test_created_times_are_the_earliest_not_a_sum() -> None:
    early = exposition({"outbound": 1}, 0, [], None)
    late = exposition({"outbound": 1}, 0, [], None)
    created = [
        {s.name: s.value for f in text_string_to_metric_families(t.decode()) for s in f.samples}
        for t in (early, late)
    ]
    merged = {
        s.name: s.value
        for f in text_string_to_metric_families(merge.expositions([late, early]).decode())
        for s in f.samples
    }
    assert merged["conns_opened_created"] == min(c["conns_opened_created"] for c in created)


def test_merged_text_keeps_help_and_type() -> None:
    text = merge.expositions([exposition({"outbound": 1}, 1, [], None)]).decode()
    assert "# HELP conns_opened_total Opened." in text
    assert "# TYPE conns_opened_total counter" in text
    assert "# TYPE latency_seconds histogram" in text


def test_connections_are_marked_with_their_worker() -> None:
    rows = merge.connections([{"id": 1}], {1: [{"id": 5}], 0: [{"id": 2}, {"id": 3}]})
    assert rows == [
        {"id": 1},
        {"id": 2, "worker": 0},
        {"id": 3, "worker": 0},
        {"id": 5, "worker": 1},
    ]


def test_cursors_pack_and_unpack() -> None:
    for cursors in ([0, 0], [5, 0], [0, 7], [2**40, 3], [1, 2, 3, 4]):
        packed = merge.join_cursors(cursors)
        assert merge.split_cursors(packed, len(cursors)) == cursors
        assert str(packed).isdigit()


def test_requests_merge_orders_by_time_and_keeps_unanswered_cursors() -> None:
    answers = {
        0: {"requests": [{"time": "t3", "path": "/c"}], "next": 10, "missed": 1, "ring_size": 5},
        2: {"requests": [{"time": "t1", "path": "/a"}], "next": 4, "missed": 0, "ring_size": 5},
    }
    out = merge.requests("node1", answers, 3, since=[9, 6, 3])
    rows = out["requests"]
    assert isinstance(rows, list)
    assert [(r["path"], r["worker"]) for r in rows] == [("/a", 2), ("/c", 0)]
    assert merge.split_cursors(out["next"], 3) == [10, 6, 4]  # type: ignore[arg-type]
    assert out["missed"] == 1 and out["ring_size"] == 10 and out["node"] == "node1"


def test_route_counts_add_up() -> None:
    rule = (("HTTPRoute", "default", "web"), 0, "default/web-v1")
    other = (("HTTPRoute", "default", "web"), 1, "default/web-v2")
    assert merge.counts({0: {rule: 3}, 1: {rule: 2, other: 1}}) == {rule: 5, other: 1}
    assert merge.counts({}) == {}


def test_traffic_keeps_each_workers_endpoints_and_sums_the_counts() -> None:
    def answer(active: int, ejected: bool) -> dict[str, object]:
        endpoint = {"ip": "10.0.0.1", "state": "EJECTED" if ejected else "HEALTHY", "active": 1}
        return {
            "policies": {"default/tp": {"reason": "Accepted"}},
            "effective": {"default/web": {"policy": "default/tp"}},
            "services": {
                "default/web": {
                    "policy": {"policy": "default/tp"},
                    "active": active,
                    "pending": 1,
                    "endpoints": [endpoint],
                    "counters": {"requests": active},
                    "ejections": {"consecutive_5xx": 1} if ejected else {},
                    "retry_budget": {"requests": 10, "retries": 1},
                    "split_decisions": {},
                }
            },
        }

    merged = merge.traffic({1: answer(2, True), 0: answer(3, False)})
    assert merged["policies"] == {"default/tp": {"reason": "Accepted"}}
    web = merged["services"]["default/web"]  # type: ignore[index]
    assert web["active"] == 5 and web["pending"] == 2
    assert [(e["worker"], e["state"]) for e in web["endpoints"]] == [(0, "HEALTHY"), (1, "EJECTED")]
    assert web["counters"] == {"requests": 5}
    assert web["ejections"] == {"consecutive_5xx": 1}
    assert web["retry_budget"] == {"requests": 20, "retries": 2}
    assert merge.traffic({}) == {"policies": {}, "effective": {}, "services": {}}
