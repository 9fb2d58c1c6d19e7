"""The central view's arithmetic: exact increases, one reporter per path, rows and columns."""

from __future__ import annotations

import pytest

from agent.view import aggregate, golden, promql, render
from agent.view.aggregate import CLOSED, OPENED, RECEIVED, SENT, Figures
from agent.view.cli import stat_target
from agent.view.screen import CLEAR_LINE, HOME, frame_text
from agent.view.series import (
    Series,
    ViewError,
    Window,
    from_exposition,
    from_prometheus_matrix,
    labels_of,
    merge_scrapes,
)

CLIENT = "spiffe://cluster.local/ns/default/sa/client"
SERVER = "spiffe://cluster.local/ns/default/sa/server"


def tcp(reporter: str, **over: str) -> dict[str, str]:
    labels = {
        "reporter": reporter,
        "source_workload": "client",
        "source_workload_namespace": "default",
        "source_principal": CLIENT,
        "destination_workload": "server",
        "destination_workload_namespace": "default",
        "destination_principal": SERVER,
        "destination_service": "server.default.svc.cluster.local",
        "connection_security_policy": "mutual_tls",
        "response_flags": "-",
    }
    return labels | over


def series(labels: dict[str, str], *samples: tuple[float, float]) -> Series:
    return Series(labels_of(labels), samples)


def test_increase_is_last_minus_baseline_before_the_window() -> None:
    s = series({}, (90, 4), (100, 5), (110, 7), (120, 12))
    assert aggregate.increase(s, 100, 120) == 7  # 12 - 5: the sample at the start is the base


def test_a_series_born_inside_the_window_counts_from_zero() -> None:
    assert aggregate.increase(series({}, (105, 3), (115, 10)), 100, 120) == 10


def test_a_counter_reset_counts_what_came_after_it() -> None:
    # 8 → 10 (+2), restart to 0 and up to 3 (+3), then 3 → 5 (+2)
    s = series({}, (95, 8), (105, 10), (110, 3), (115, 5))
    assert aggregate.increase(s, 100, 120) == 7


def test_samples_after_the_end_are_ignored() -> None:
    s = series({}, (95, 1), (110, 4), (130, 9))
    assert aggregate.increase(s, 100, 120) == 3
    assert aggregate.latest(s, 120) == 4


def window(*families: tuple[str, list[Series]], start: float = 100, end: float = 160) -> Window:
    return Window(start, end, {name: tuple(s) for name, s in families})


def test_a_path_reported_by_both_nodes_is_counted_once_by_the_destination() -> None:
    w = window(
        (OPENED, [series(tcp("source"), (150, 10)), series(tcp("destination"), (150, 10))]),
        (CLOSED, [series(tcp("source"), (150, 9)), series(tcp("destination"), (150, 8))]),
        (SENT, [series(tcp("destination"), (90, 100), (150, 700))]),
        (RECEIVED, [series(tcp("destination"), (150, 60))]),
    )
    rows = aggregate.stat(w, resource="workload")
    assert list(rows) == [("default/server",)]
    f = rows[("default/server",)]
    assert (f.opened, f.closed, f.active) == (10, 8, 2)
    assert (f.sent, f.received) == (600, 60)
    assert f.opened_per_second == pytest.approx(10 / 60)
    assert f.sent_per_second == pytest.approx(10.0)
    assert f.mtls_share == 1.0


def test_an_unmeshed_destination_is_counted_by_the_source() -> None:
    plain = tcp("source", destination_workload="db", connection_security_policy="none")
    w = window((OPENED, [series(plain, (150, 4))]))
    rows = aggregate.stat(w, resource="workload", name="db")
    assert rows[("default/db",)].opened == 4
    assert rows[("default/db",)].mtls_share == 0.0


def test_denied_connections_come_from_the_close_time_flags() -> None:
    w = window(
        (OPENED, [series(tcp("destination"), (150, 5))]),
        (
            CLOSED,
            [
                series(tcp("destination", response_flags="DENY"), (150, 3)),
                series(tcp("destination"), (150, 2)),
            ],
        ),
    )
    f = aggregate.aggregate(w, aggregate.by_edge)[
        ("default/client", CLIENT, "default/server", SERVER)
    ]
    assert (f.opened, f.denied, f.active) == (5, 3, 0)
    assert aggregate.mtls_word(f) == "yes"


def test_two_agents_with_the_same_labels_are_two_counters() -> None:
    one = tcp("destination") | {"instance": "10.100.0.1:15020"}
    two = tcp("destination") | {"instance": "10.100.0.2:15020"}
    w = window((OPENED, [series(one, (90, 5), (150, 6)), series(two, (150, 2))]))
    assert aggregate.stat(w, resource="service")[("server.default.svc.cluster.local",)].opened == 3


def test_service_filter_accepts_the_short_name() -> None:
    w = window((OPENED, [series(tcp("destination"), (150, 1))]))
    assert list(aggregate.stat(w, resource="service", name="server")) == [
        ("server.default.svc.cluster.local",)
    ]
    assert aggregate.stat(w, resource="service", name="other") == {}


def test_idle_paths_are_left_out_and_busy_ones_ranked() -> None:
    idle = series(tcp("destination", source_workload="old"), (90, 3), (150, 3))
    closed = series(tcp("destination", source_workload="old"), (90, 3), (150, 3))
    busy = series(tcp("destination", source_workload="a"), (150, 2))
    busier = series(tcp("destination", source_workload="b"), (150, 9))
    w = window((OPENED, [idle, busy, busier]), (CLOSED, [closed]))
    ranked = aggregate.top(w, limit=5)
    assert [k[0] for k, _ in ranked] == ["default/b", "default/a"]
    assert aggregate.top(w, limit=1)[0][0][0] == "default/b"


def test_mtls_word_tells_partial_and_plain_apart() -> None:
    w = window(
        (
            OPENED,
            [
                series(tcp("destination"), (150, 1)),
                series(tcp("destination", connection_security_policy="none"), (150, 1)),
            ],
        )
    )
    f = aggregate.stat(w, resource="workload")[("default/server",)]
    assert aggregate.mtls_word(f) == "partly"
    assert f.mtls_share == 0.5
    assert aggregate.mtls_word(Figures()) == "-"


def test_promql_selects_the_window_plus_lookback_with_escaped_matchers() -> None:
    assert promql.window_samples(OPENED, 60) == f"{OPENED}[360000ms]"
    assert (
        promql.window_samples(OPENED, 1.5, {"b": 'x"y', "a": "z\\"})
        == f'{OPENED}{{a="z\\\\",b="x\\"y"}}[301500ms]'
    )
    with pytest.raises(ValueError, match="positive"):
        promql.duration(-1)


def test_prometheus_matrix_parses_and_errors_name_the_cause() -> None:
    answer = {
        "status": "success",
        "data": {
            "resultType": "matrix",
            "result": [
                {
                    "metric": {"__name__": OPENED, "instance": "i", "reporter": "source"},
                    "values": [[100.5, "3"], [102.5, "4"]],
                }
            ],
        },
    }
    (s,) = from_prometheus_matrix(answer)
    assert s.labels == (("instance", "i"), ("reporter", "source"))
    assert s.samples == ((100.5, 3.0), (102.5, 4.0))
    with pytest.raises(ViewError, match="bad_data: parse error"):
        from_prometheus_matrix({"status": "error", "errorType": "bad_data", "error": "parse error"})
    with pytest.raises(ViewError, match="vector"):
        from_prometheus_matrix({"status": "success", "data": {"resultType": "vector"}})


EXPOSITION = f"""\
# HELP {OPENED[:-6]} TCP connections opened
# TYPE {OPENED[:-6]} counter
{OPENED}{{reporter="source",destination_workload="server"}} 3.0
# HELP nodemesh_open_connections Connections open in the proxy
# TYPE nodemesh_open_connections gauge
nodemesh_open_connections{{direction="outbound"}} 1.0
"""


def test_two_agent_scrapes_make_one_window() -> None:
    first = from_exposition(EXPOSITION, [OPENED, CLOSED], 100, instance="a")
    later = EXPOSITION.replace("} 3.0", "} 8.0")
    second = from_exposition(later, [OPENED, CLOSED], 110, instance="a")
    assert first[CLOSED] == []
    merged = merge_scrapes(first, second)
    (s,) = merged[OPENED]
    assert s.label("instance") == "a"
    assert aggregate.increase(s, 100, 110) == 5


def test_tables_show_tcp_columns_and_say_when_there_is_nothing() -> None:
    f = Figures(opened=3, mtls_opened=3, sent=2048 * 60, seconds=60, security={"mutual_tls"})
    lines = render.stat_lines("workload", {("default/server",): f})
    assert lines[0].split() == [
        "WORKLOAD", "CONN", "CONN/S", "ACTIVE", "SENT/S", "RECV/S", "MTLS", "DENIED",
    ]  # fmt: skip
    assert lines[1].split() == [
        "default/server",
        "3",
        "0.05",
        "0",
        "2.0KiB/s",
        "0.0B/s",
        "100%",
        "0",
    ]
    assert render.stat_lines("service", {}) == ["(no traffic in the window)"]
    assert [render.byte_rate(v) for v in (0.25, 1023, 1024, 5 * 1024**2)] == [
        "0.2B/s", "1023.0B/s", "1.0KiB/s", "5.0MiB/s",
    ]  # fmt: skip
    path = render.path_lines([(("default/a", "default/b", "b.default.svc.cluster.local"), f)])
    assert "default/a -> default/b" in path[1]


def test_a_terminal_frame_fits_the_screen() -> None:
    text = frame_text(["x" * 50, "second", "third"], width=10, height=2)
    assert text.startswith(HOME)
    assert text.count(CLEAR_LINE) == 2
    assert "x" * 11 not in text and "third" not in text


def request(reporter: str, code: str, *samples: tuple[float, float], **over: str) -> Series:
    return series(tcp(reporter, response_code=code, request_protocol="http") | over, *samples)


def bucket(le: str, *samples: tuple[float, float]) -> Series:
    return series(tcp("destination", le=le), *samples)


def test_stat_shows_request_columns_when_requests_were_seen() -> None:
    """60 s window: 50 requests (2 answered 503), latency buckets 10 ms / 100 ms / +Inf; a
    Service with TCP only gets dashes in the request columns."""
    other = {"destination_workload": "db", "destination_service": "db.default.svc.cluster.local"}
    w = window(
        (
            OPENED,
            [series(tcp("destination"), (150, 1)), series(tcp("destination", **other), (150, 4))],
        ),
        (
            golden.REQUESTS,
            [
                request("destination", "200", (90, 0), (150, 48)),
                request("destination", "503", (90, 0), (150, 2)),
            ],
        ),
        (
            golden.DURATION_BUCKETS,
            [
                bucket("10", (90, 0), (150, 40)),
                bucket("100", (90, 0), (150, 50)),
                bucket("+Inf", (90, 0), (150, 50)),
            ],
        ),
    )
    rows = aggregate.stat(w, resource="service")
    requests = golden.stat_requests(w, resource="service")
    lines = render.stat_lines("service", rows, requests)
    assert lines[0].split()[:6] == ["SERVICE", "REQ/S", "SUCCESS", "P50", "P95", "P99"]
    cells = {line.split()[0]: line.split() for line in lines[1:]}
    server = cells["server.default.svc.cluster.local"]
    assert server[1:6] == ["0.83", "96.0%", "6.2ms", "77.5ms", "95.5ms"]
    assert cells["db.default.svc.cluster.local"][1:6] == ["-"] * 5
    only = golden.stat_requests(w, resource="service", name="db")
    assert only == {}
    assert render.requests_json(requests[("server.default.svc.cluster.local",)])["requests"] == 50


def test_a_grpc_call_with_a_non_zero_status_is_a_failure_whatever_its_http_status() -> None:
    """4 requests each: gRPC 200/OK succeed, 200/UNAVAILABLE (14) and HTTP 503 fail, a call
    denied by policy (200/PERMISSION_DENIED, flag RBAC) is a success counted apart."""
    grpc = {"request_protocol": "grpc"}
    w = window(
        (
            golden.REQUESTS,
            [
                request("destination", "200", (90, 0), (150, 4), grpc_response_status="0", **grpc),
                request("destination", "200", (90, 0), (150, 4), grpc_response_status="14", **grpc),
                request("destination", "503", (90, 0), (150, 4)),
                request(
                    "destination",
                    "200",
                    (90, 0),
                    (150, 4),
                    grpc_response_status="7",
                    response_flags="RBAC",
                    **grpc,
                ),
            ],
        ),
    )
    ((key, figures),) = golden.stat_requests(w, resource="service").items()
    assert key == ("server.default.svc.cluster.local",)
    assert (figures.requests, figures.errors, figures.denied) == (16, 8, 4)
    assert figures.success_rate == 0.5


@pytest.mark.parametrize(
    ("code", "grpc_status", "flags", "failed"),
    [
        ("200", "", "-", False),
        ("200", "0", "-", False),
        ("200", "14", "-", True),
        ("503", "", "-", True),
        ("503", "0", "-", True),
        ("403", "", "RBAC", False),
        ("200", "7", "RBAC", False),
        ("429", "", "RL", False),
        ("200", "8", "RL", False),
        ("200", "8", "-", True),
    ],
)
def test_failed_is_a_5xx_or_a_non_zero_grpc_status(
    code: str, grpc_status: str, flags: str, failed: bool
) -> None:
    assert golden.failed(code, grpc_status, flags) is failed


def test_denied_counts_connections_and_requests_refused_by_policy() -> None:
    """3 connections refused by an L4 policy and 4 requests answered 403 RBAC (on allowed
    connections): ``stat``, ``edges`` and ``top`` say DENIED 7, as the dashboard's "denied 7";
    the JSON keeps them apart."""
    w = window(
        (OPENED, [series(tcp("destination"), (90, 0), (150, 5))]),
        (
            CLOSED,
            [
                series(tcp("destination", response_flags="DENY"), (90, 0), (150, 3)),
                series(tcp("destination"), (90, 0), (150, 2)),
            ],
        ),
        (
            golden.REQUESTS,
            [
                request("destination", "200", (90, 0), (150, 6)),
                request("destination", "403", (90, 0), (150, 4), response_flags="RBAC"),
            ],
        ),
    )
    stat = render.stat_lines(
        "workload",
        aggregate.stat(w, resource="workload"),
        golden.stat_requests(w, resource="workload"),
    )
    assert stat[0].split()[-1] == "DENIED" and stat[1].split()[-1] == "7"
    edges = render.edges_lines(
        aggregate.aggregate(w, aggregate.by_edge), golden.requests_by(w, aggregate.by_edge)
    )
    assert edges[0].split()[-1] == "DENIED" and edges[1].split()[-1] == "7"
    tcp_only = render.edges_lines(aggregate.aggregate(w, aggregate.by_edge))
    assert tcp_only[1].split()[-1] == "3"
    paths = render.path_lines(aggregate.top(w, 10), golden.requests_by(w, aggregate.by_path))
    assert paths[0].split()[-1] == "DENIED" and paths[1].split()[-1] == "7"


def test_stat_takes_linkerds_resource_words_and_a_namespace() -> None:
    """``linkerd viz stat deploy/web -n shop`` habits: a controller is a workload here."""
    assert stat_target("deploy/web", None) == ("workload", "web")
    assert stat_target("sts", "db") == ("workload", "db")
    assert stat_target("svc/web", None) == ("service", "web")
    assert stat_target("Service", None) == ("service", None)
    assert stat_target("workload", "shop/web") == ("workload", "shop/web")
    with pytest.raises(ViewError, match="'pods' is no resource nodemesh knows"):
        stat_target("pods", None)
    with pytest.raises(ViewError, match="deploy/web already names one"):
        stat_target("deploy/web", "api")
    rows = {("shop/web",): 1, ("other/web",): 2}
    assert aggregate.in_namespace(rows, "workload", "shop") == {("shop/web",): 1}
    services = {("web.shop.svc.cluster.local",): 1, ("web.other.svc.cluster.local",): 2}
    assert aggregate.in_namespace(services, "service", "other") == {
        ("web.other.svc.cluster.local",): 2
    }
