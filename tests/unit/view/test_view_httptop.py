"""``nodemesh top``'s HTTP routes from tapped requests: one entry per request id (the
destination's), the window's horizon, ranking and columns."""

from __future__ import annotations

from typing import Any

from agent.view.httptop import RouteWindow, entry_time, route_lines


def tapped(rid: str, at: str, *, direction: str = "inbound", **over: Any) -> dict[str, Any]:
    entry = {
        "time": f"2026-12-06T10:00:{at}Z",
        "direction": direction,
        "request_id": rid,
        "source_workload": "client",
        "source_namespace": "default",
        "destination_workload": "server",
        "destination_namespace": "default",
        "source_address": "10.244.1.2:40000",
        "destination_address": "10.244.2.2:9080",
        "method": "GET",
        "path": "/orders",
        "response_code": 200,
        "duration_ms": 2.0,
    }
    return entry | over


def test_a_request_reported_by_both_nodes_counts_once_with_the_destination_figures() -> None:
    window = RouteWindow(60)
    window.add([tapped("a", "01.000", direction="outbound", duration_ms=9.0)])
    window.add([tapped("a", "01.000", duration_ms=3.0), tapped("b", "02.000", response_code=503)])
    window.add([tapped("b", "02.000", direction="outbound", response_code=200)])
    ((key, row),) = window.routes(10)
    assert key == ("default/client", "default/server", "GET", "/orders")
    assert (row.count, row.errors, row.best, row.worst, row.last) == (2, 1, 2.0, 3.0, 2.0)
    assert row.success_rate == 0.5


def test_a_grpc_call_ended_with_a_non_zero_status_is_an_error_of_its_route() -> None:
    window = RouteWindow(60)
    grpc = {"path": "/nodemesh.lab.Echo/Say", "method": "POST"}
    window.add(
        [
            tapped("ok", "01.000", grpc_status="0", **grpc),
            tapped("unavailable", "02.000", grpc_status="14", **grpc),
            tapped("http-503", "03.000", response_code=503, grpc_status="", **grpc),
            tapped("plain", "04.000", grpc_status="", **grpc),
        ]
    )
    ((_key, row),) = window.routes(10)
    assert (row.count, row.errors, row.success_rate) == (4, 2, 0.5)


def test_routes_rank_by_count_and_old_requests_leave_the_window() -> None:
    window = RouteWindow(10)
    window.add(
        [
            tapped("1", "01.000", path="/old"),
            tapped("2", "20.000", path="/a"),
            tapped("3", "21.000", path="/b"),
            tapped("4", "22.000", path="/b"),
            tapped("", "23.000", path="/b", source_workload="unknown"),  # no id, no workload
        ]
    )
    window.expire(entry_time(tapped("x", "25.000")))
    ranked = [(k[0], k[3], f.count) for k, f in window.routes(10)]
    assert ranked == [
        ("default/client", "/b", 2),
        ("10.244.1.2", "/b", 1),
        ("default/client", "/a", 1),
    ]
    lines = route_lines(window.routes(1), 10)
    assert lines[0].split() == [
        "SOURCE", "DESTINATION", "METHOD", "PATH", "COUNT", "REQ/S", "SUCCESS", "BEST", "WORST",
        "LAST",
    ]  # fmt: skip
    assert lines[1].split() == [
        "default/client", "default/server", "GET", "/b", "2", "0.20", "100.0%", "2.0ms", "2.0ms",
        "2.0ms",
    ]  # fmt: skip
    assert route_lines([], 10) == ["(no HTTP requests in the window)"]
