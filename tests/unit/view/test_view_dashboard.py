"""The dashboard's pure parts: request figures, graph, layout, timeline, SVG and HTML pages
(escaping included), the admin join, and the server's routes against a fake source."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import socket
import threading
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from urllib.error import HTTPError
from urllib.request import urlopen

import pytest

from agent.policy.authz import selects_pod
from agent.view import cli, golden, layout, svg, timeline
from agent.view.aggregate import CLOSED, OPENED, RECEIVED, SENT
from agent.view.dashboard import Admin, Dashboard, server
from agent.view.golden import DURATION_BUCKETS, REQUESTS, histogram_quantile
from agent.view.graph import build_graph
from agent.view.inventory import AgentAnswer, canonical_name, workload_info
from agent.view.pages import Context, error_page, index_page, url_quote, workload_page
from agent.view.series import Series, ViewError, Window
from agent.view.sources import Agent, AgentSource, PrometheusSource
from tests.unit.view.test_view_aggregate import CLIENT, SERVER, series, tcp

EVIL = '<script>alert("x")</script>&'
labels = tcp  # the same label set the aggregation tests use


def request_series(
    reporter: str, code: str, flags: str, *samples: tuple[float, float], **over: str
) -> Series:
    return series(labels(reporter, response_code=code, response_flags=flags, **over), *samples)


def bucket_series(le: str, *samples: tuple[float, float], **over: str) -> Series:
    return series(labels("destination", le=le, response_code="200", **over), *samples)


def window(families: dict[str, list[Series]], start: float = 100, end: float = 160) -> Window:
    return Window(start, end, {k: tuple(v) for k, v in families.items()})


def mesh() -> Window:
    """client → server: HTTP, 60 requests in 60 s (6 answered 503, 3 refused by RBAC), latency
    buckets; neighbor → server: 4 TCP connections, 3 of them denied."""
    neighbor = {"source_workload": "neighbor", "source_principal": "spiffe://x/ns/default/sa/n"}
    return window(
        {
            OPENED: [
                series(labels("destination"), (90, 0), (160, 5)),
                series(labels("source"), (90, 0), (160, 5)),  # the other report of the path
                series(labels("destination", **neighbor), (90, 0), (160, 4)),
            ],
            CLOSED: [
                series(labels("destination"), (90, 0), (160, 5)),
                series(labels("destination", response_flags="DENY", **neighbor), (90, 0), (160, 3)),
                series(labels("destination", **neighbor), (90, 0), (160, 1)),
            ],
            SENT: [series(labels("destination"), (90, 0), (160, 600))],
            RECEIVED: [series(labels("destination"), (90, 0), (160, 1200))],
            REQUESTS: [
                request_series("destination", "200", "-", (90, 10), (130, 30), (160, 61)),
                request_series("destination", "503", "-", (90, 0), (160, 6)),
                request_series("destination", "403", "RBAC", (90, 0), (160, 3)),
                request_series("source", "200", "-", (90, 0), (160, 999)),  # not counted
            ],
            DURATION_BUCKETS: [
                bucket_series("1", (90, 0), (160, 0)),
                bucket_series("5", (90, 0), (160, 30)),
                bucket_series("10", (90, 0), (160, 60)),
                bucket_series("+Inf", (90, 0), (160, 60)),
            ],
        }
    )


# -- request figures --------------------------------------------------------------------------


def test_histogram_quantile_interpolates_inside_the_bucket_like_prometheus() -> None:
    buckets = {1.0: 0.0, 5.0: 10.0, 10.0: 20.0, math.inf: 20.0}
    assert histogram_quantile(0.5, buckets) == 5.0  # rank 10: the top of the (1, 5] bucket
    assert histogram_quantile(0.99, buckets) == pytest.approx(9.9)  # 5 + 5 * 9.8/10
    assert histogram_quantile(0.25, buckets) == pytest.approx(3.0)  # 1 + 4 * 5/10


def test_histogram_quantile_in_the_inf_bucket_is_the_largest_finite_bound() -> None:
    assert histogram_quantile(0.99, {1.0: 1.0, 5.0: 2.0, math.inf: 10.0}) == 5.0


def test_histogram_quantile_is_none_without_observations_or_an_inf_bucket() -> None:
    assert histogram_quantile(0.5, {1.0: 0.0, math.inf: 0.0}) is None
    assert histogram_quantile(0.5, {1.0: 3.0}) is None
    assert histogram_quantile(0.5, {}) is None


def test_request_figures_count_one_reporter_errors_and_rbac_denials() -> None:
    rows = golden.requests_by(mesh(), lambda s: (s.label("destination_workload"),))
    row = rows[("server",)]
    assert row.requests == 51 + 6 + 3  # the source's 999 are the same requests, not counted
    assert row.errors == 6
    assert row.denied == 3
    assert row.per_second == 1.0
    assert row.success_rate == pytest.approx(54 / 60)  # 403 is a success for the server
    assert row.quantile(0.5) == 5.0
    assert row.quantile(0.99) == pytest.approx(9.9)


def test_request_figures_use_the_source_when_the_destination_did_not_report() -> None:
    w = window({REQUESTS: [request_series("source", "200", "-", (90, 0), (160, 7))]})
    assert golden.requests_by(w, lambda s: ("all",))[("all",)].requests == 7


# -- graph --------------------------------------------------------------------------------------


def test_graph_has_an_http_edge_and_a_denied_tcp_edge() -> None:
    graph = build_graph(mesh())
    assert graph.nodes == ("default/client", "default/neighbor", "default/server")
    http, tcp = graph.edges
    assert (http.source, http.destination, http.protocol) == (
        "default/client",
        "default/server",
        "http",
    )
    assert http.rate == 1.0 and http.rate_unit == "req/s"
    assert http.denied == 3  # the RBAC refusals
    assert http.mtls == "yes"
    assert (tcp.source, tcp.protocol, tcp.rate_unit) == ("default/neighbor", "tcp", "conn/s")
    assert tcp.rate == pytest.approx(4 / 60)
    assert tcp.denied == 3
    assert graph.inbound("default/server") == (http, tcp)
    assert graph.outbound("default/client") == (http,)


def test_an_edge_with_only_requests_still_has_tcp_figures() -> None:
    w = window({REQUESTS: [request_series("destination", "200", "-", (90, 0), (160, 6))]})
    (edge,) = build_graph(w).edges
    assert edge.tcp.opened == 0 and edge.rate == 0.1 and edge.mtls == "-"


# -- layout -------------------------------------------------------------------------------------


def test_layers_follow_the_longest_chain_of_callers() -> None:
    edges = [("a", "b"), ("b", "c"), ("a", "c"), ("d", "c")]
    assert layout.layers(["a", "b", "c", "d"], edges) == {"a": 0, "b": 1, "c": 2, "d": 0}


def test_a_cycle_and_a_self_loop_do_not_loop_the_layering() -> None:
    edges = [("a", "b"), ("b", "c"), ("c", "a"), ("b", "b")]
    assert layout.layers(["a", "b", "c"], edges) == {"a": 0, "b": 1, "c": 2}


def test_layout_places_layers_left_to_right_and_orders_by_callers() -> None:
    # z calls y, a calls b: in layer 1, b goes opposite a (row 0) and y opposite z (row 1).
    where = layout.layout(["a", "b", "y", "z"], [("z", "y"), ("a", "b")])
    xa, ya = where.positions["a"]
    xb, yb = where.positions["b"]
    xy_, yy = where.positions["y"]
    xz, yz = where.positions["z"]
    assert xa == xz < xb == xy_
    assert ya == yb < yz == yy
    assert where.width == 2 * layout.MARGIN_X + layout.LAYER_GAP
    assert where.height == 2 * layout.MARGIN_Y + layout.ROW_GAP


def test_layout_of_nothing_is_empty() -> None:
    assert layout.layout([], []).positions == {}


# -- timeline -----------------------------------------------------------------------------------


def test_steps_add_up_to_the_window() -> None:
    w = mesh()
    parts = timeline.steps(w, 3)
    assert [(p.start, p.end) for p in parts] == [(100, 120), (120, 140), (140, 160)]
    with pytest.raises(ValueError, match="at least one step"):
        timeline.steps(w, 0)


def test_golden_charts_show_each_steps_rate_and_gaps_without_requests() -> None:
    w = window(
        {
            REQUESTS: [request_series("destination", "200", "-", (100, 0), (110, 20), (130, 20))],
            DURATION_BUCKETS: [
                bucket_series("5", (100, 0), (110, 20)),
                bucket_series("+Inf", (100, 0), (110, 20)),
            ],
        },
        start=100,
        end=130,
    )
    charts = {c.title: c for c in timeline.golden_charts(w, "default/server", 3)}
    inbound, outbound = charts["Requests"].lines
    assert inbound.label == "inbound"
    assert inbound.points == ((110, 2.0), (120, 0.0), (130, 0.0))
    assert outbound.points == ((110, 0.0), (120, 0.0), (130, 0.0))  # server calls no one
    success = charts["Success rate"].lines[0]
    assert success.points == ((110, 100.0), (120, None), (130, None))
    p50 = charts["Latency"].lines[0]
    assert p50.label == "inbound p50" and p50.points[0] == (110, 2.5)
    assert charts["Requests"].has_data()
    assert not charts["TCP bytes"].has_data()


def test_chart_steps_interpolate_so_the_scrape_rhythm_is_not_drawn() -> None:
    # 1 request/s scraped every 2 s at odd seconds; 5 s steps hold two or three scrapes.
    counter = request_series(
        "destination", "200", "-", *((t, float(t - 99)) for t in range(99, 132, 2))
    )
    w = window({REQUESTS: [counter]}, start=100, end=130)
    exact = [
        golden.requests_by(p, lambda s: ("all",))[("all",)].requests for p in timeline.steps(w, 6)
    ]
    assert exact == [6, 4, 6, 4, 6, 4]  # what counting whole scrapes would draw
    (inbound, _) = {c.title: c for c in timeline.golden_charts(w, "default/server", 6)}[
        "Requests"
    ].lines
    assert [v for _, v in inbound.points] == [pytest.approx(1.0)] * 6
    assert sum(exact) == golden.requests_by(w, lambda s: ("all",))[("all",)].requests == 30


def test_interpolation_takes_resets_out_and_never_extrapolates() -> None:
    s = timeline.monotonic(series({}, (100, 8), (110, 10), (120, 3), (130, 5)))
    assert s.samples == ((100, 8), (110, 10), (120, 13), (130, 15))
    assert timeline.interpolated(s, 105, 125) == 13 + 1 - 9  # 14 at 125, 9 at 105
    assert timeline.interpolated(s, 130, 200) == 0  # nothing after the last sample
    assert timeline.value_at(s, 50) == 0  # before the first sample: not counted yet


# -- SVG and pages ------------------------------------------------------------------------------


def evil_graph_window() -> Window:
    over = {"destination_workload": EVIL, "destination_workload_namespace": "ns\"'"}
    return window(
        {
            OPENED: [series(labels("destination", **over), (90, 0), (160, 2))],
            CLOSED: [
                series(labels("destination", response_flags="DENY", **over), (90, 0), (160, 2))
            ],
        }
    )


def test_graph_svg_is_well_formed_and_escapes_workload_names() -> None:
    graph = build_graph(evil_graph_window())
    where = layout.layout(graph.nodes, [(e.source, e.destination) for e in graph.edges])
    drawing = svg.graph_svg(graph, where, lambda n: "/workload?name=" + url_quote(n))
    assert "<script>" not in drawing
    root = ET.fromstring(drawing)  # well-formed XML: every value was escaped
    ns = "{http://www.w3.org/2000/svg}"
    names = [t.text for t in root.iter(ns + "text") if t.get("class") == "node-name"]
    assert names == ["client", svg.short(EVIL)]
    (edge,) = [g for g in root.iter(ns + "g") if "edge" in (g.get("class") or "").split()]
    assert edge.get("class") == "edge denied"
    assert edge.get("data-destination") == f"ns\"'/{EVIL}"
    assert edge.get("data-denied") == "2"
    assert [g.get("class") for g in edge.iter(ns + "g")][1:] == ["mtls-lock"]


def test_edges_into_one_workload_end_at_distinct_heights_in_their_sources_order() -> None:
    graph = build_graph(mesh())
    where = layout.layout(graph.nodes, [(e.source, e.destination) for e in graph.edges])
    ends = svg.spread_ends(graph, where)
    client_end = ends[("default/client", "default/server")][1]
    neighbor_end = ends[("default/neighbor", "default/server")][1]
    assert client_end == -neighbor_end < 0  # client is drawn above neighbor
    assert ends[("default/client", "default/server")][0] == 0  # client's only outbound edge


def test_edge_label_says_rate_success_p99_and_denials() -> None:
    http, tcp = build_graph(mesh()).edges
    assert svg.edge_text(http) == "1 req/s · 90.0% ok · p99 9.9ms · denied 3"
    assert svg.edge_text(tcp) == "0.07 conn/s · denied 3"


def test_a_success_rate_is_never_rounded_up_to_100_percent() -> None:
    assert [svg.percent(v) for v in (None, 1.0, 0.9996, 0.5)] == ["-", "100%", "99.9%", "50.0%"]


def test_numbers_are_short() -> None:
    assert [svg.number(v) for v in (0, 0.421, 3.5, 12.4, 1234, 3.4e6)] == [
        "0", "0.42", "3.5", "12", "1.2k", "3.4M",
    ]  # fmt: skip
    assert svg.nice_ceiling(0.7) == 1 and svg.nice_ceiling(13) == 20 and svg.nice_ceiling(0) == 1


def test_chart_svg_breaks_lines_where_values_are_undefined() -> None:
    chart = timeline.Chart(
        "Success <rate>",
        "%",
        (timeline.Line("in", ((1, 100.0), (2, 50.0), (3, None), (4, 100.0), (5, 100.0))),),
    )
    drawn = svg.chart_svg(chart)
    root = ET.fromstring(drawn)
    polylines = [e for e in root.iter("{http://www.w3.org/2000/svg}polyline")]
    assert len(polylines) == 2  # (1, 2) and (4, 5): the gap at 3 is not bridged
    assert "Success &lt;rate&gt; (%)" in drawn


CONTEXT = Context("Prometheus http://p:9090", 60, "12:00:00 UTC", 10)


def test_index_page_links_each_workload_and_escapes_everything() -> None:
    html = index_page(build_graph(evil_graph_window()), CONTEXT)
    assert EVIL not in html
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;&amp;" in html
    assert 'href="/workload?name=ns%22%27/%3Cscript%3Ealert%28%22x' in html
    assert 'href="/workload?name=default/client"' in html
    assert '<tr class="denied"' in html
    assert "setInterval" in html and "10000" in html


def test_url_quote_leaves_names_readable_and_encodes_the_rest() -> None:
    assert url_quote("default/server-0.v1_x~") == "default/server-0.v1_x~"
    assert url_quote("a b&c=é") == "a%20b%26c%3D%C3%A9"


POD = {
    "name": "server-0",
    "namespace": "default",
    "node": "node2",
    "labels": {"app": "server"},
    "identity": SERVER,
    "ips": ["10.0.2.2"],
    "meshed": True,
}
DENY = {
    "kind": "AuthorizationPolicy",
    "namespace": "default",
    "name": "deny-<neighbor>",
    "dry_run": False,
    "spec": {"selector": {"matchLabels": {"app": "server"}}, "action": "DENY"},
}
CERT = {
    "identity": SERVER,
    "state": "valid",
    "certificate": {"serial": "ab", "not_after": "2026-12-07T00:00:00+00:00", "issuer": "CN=x"},
}


def test_selects_follows_the_namespace_root_namespace_and_labels() -> None:
    assert selects_pod(DENY, POD)
    assert not selects_pod(DENY, POD | {"labels": {"app": "client"}})
    assert not selects_pod(DENY | {"namespace": "other"}, POD)
    assert selects_pod(DENY | {"namespace": "nodemesh-system", "spec": {}}, POD)
    assert selects_pod({"namespace": "default", "spec": {"action": "DENY"}}, POD)


def test_canonical_name_is_the_metrics_workload_name() -> None:
    assert canonical_name(POD) == "server"
    assert canonical_name({"name": "solo", "labels": {}}) == "solo"
    assert canonical_name({"name": "x", "labels": {"app.kubernetes.io/name": "web"}}) == "web"


def test_workload_info_joins_pods_policies_and_certificates() -> None:
    client = POD | {"name": "client", "labels": {"app": "client"}, "identity": CLIENT}
    answers = [
        AgentAnswer("node1", [POD, client], [DENY], [CERT | {"identity": CLIENT}]),
        AgentAnswer("node2", [POD, client], [DENY], [CERT]),
        AgentAnswer("node3", error="GET http://127.0.0.1:15000/workloads failed: refused"),
    ]
    info = workload_info("default/server", answers)
    assert info.pods == (POD,)
    assert info.policies == (DENY,)
    assert info.certificates == (("node2", CERT),)
    assert info.errors == ("node3: GET http://127.0.0.1:15000/workloads failed: refused",)


def test_workload_page_shows_charts_edges_policies_and_certificates() -> None:
    w = mesh()
    graph = build_graph(w)
    charts = timeline.golden_charts(w, "default/server", 6)
    info = workload_info("default/server", [AgentAnswer("node2", [POD], [DENY], [CERT])])
    html = workload_page("default/server", graph, charts, info, CONTEXT)
    assert html.count('<figure class="chart"') == len(charts) == 5
    assert "deny-&lt;neighbor&gt;" in html and "deny-<neighbor>" not in html
    assert "2026-12-07T00:00:00+00:00" in html
    long = CERT | {"certificate": {"serial": "0123456789abcdef0123"}}
    shown = dataclasses.replace(info, certificates=(("node2", long),))
    html = workload_page("default/server", graph, charts, shown, CONTEXT)
    assert '<span title="0123456789abcdef0123">0123456789abcdef…</span>' in html
    assert html.count('data-destination="default/server"') == 2  # both inbound edges' rows


def test_error_page_escapes_the_message() -> None:
    assert "&lt;b&gt;" in error_page("Prometheus said <b>", CONTEXT)


# -- the server ---------------------------------------------------------------------------------


class FakeSource:
    def __init__(self, w: Window | None) -> None:
        self.w = w
        self.asked: list[tuple[float, tuple[str, ...]]] = []

    def window(self, seconds: float, families: Sequence[str] = ()) -> Window:
        self.asked.append((seconds, tuple(families)))
        if self.w is None:
            raise ViewError("GET http://p:9090/api/v1/query failed: refused")
        return self.w

    def describe(self) -> str:
        return "fake"


def test_routes_status_codes_and_the_windows_asked_for() -> None:
    source = FakeSource(mesh())
    board = Dashboard(source, [], window_seconds=60, range_seconds=600, points=6)
    status, html = board.render("/")
    assert status == 200 and 'class="edge denied"' in html
    assert source.asked[-1] == (60, (OPENED, CLOSED, SENT, RECEIVED, REQUESTS, DURATION_BUCKETS))
    status, html = board.render("/workload?name=default%2Fserver")
    assert status == 200 and "workload default/server" in html
    assert source.asked[-1][0] == 600
    assert board.render("/workload")[0] == 400
    assert board.render("/nothing")[0] == 404
    status, html = Dashboard(FakeSource(None), []).render("/")
    assert status == 502 and "failed: refused" in html


def test_admin_that_does_not_answer_is_an_error_on_the_page_not_a_failure() -> None:
    answer = Admin("node9", "http://127.0.0.1:9").read()  # nothing listens on port 9
    assert answer.agent == "node9" and answer.error and "127.0.0.1:9" in answer.error


def test_the_server_answers_html_on_loopback() -> None:
    httpd = server(Dashboard(FakeSource(mesh()), []), "127.0.0.1", 0)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{httpd.server_address[1]}"
        with urlopen(base + "/", timeout=10) as answer:
            assert answer.headers["Content-Type"] == "text/html; charset=utf-8"
            assert b"service graph" in answer.read()
        with pytest.raises(HTTPError) as missing:
            urlopen(base + "/missing", timeout=10)
        assert missing.value.code == 404
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


def test_admin_reads_the_three_endpoints() -> None:
    bodies = {
        "/workloads": {"workloads": [POD]},
        "/policies": {"policies": [DENY]},
        "/certs": {"certificates": [CERT]},
    }
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Api(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = json.dumps(bodies[self.path]).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    api = ThreadingHTTPServer(("127.0.0.1", 0), Api)
    thread = threading.Thread(target=api.serve_forever, daemon=True)
    thread.start()
    try:
        answer = Admin("node2", f"http://127.0.0.1:{api.server_address[1]}").read()
    finally:
        api.shutdown()
        api.server_close()
        thread.join()
    assert answer == AgentAnswer("node2", [POD], [DENY], [CERT])


# -- the command --------------------------------------------------------------------------------


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers(dest="command"))
    return parser.parse_args(["dashboard", *argv])


def test_dashboard_options() -> None:
    args = parse("--prometheus", "http://p:9090", "--listen", "[::1]:0", "--range", "5m")
    assert args.listen == ("::1", 0) and args.range == 300.0 and args.points == 60
    assert parse().listen == ("127.0.0.1", 15030)
    for bad in (["--listen", "15030"], ["--listen", "host:http"], ["--points", "0"]):
        with pytest.raises(SystemExit):
            parse(*bad)


def test_dashboard_refuses_to_start_without_a_prometheus(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(cli, "source_of", lambda args: AgentSource([Agent(cli.LOCAL_AGENT)]))
    args = parse()
    assert args.func(args) == 1
    assert "the dashboard reads a Prometheus" in capsys.readouterr().err


def test_dashboard_says_when_its_address_is_taken(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(cli, "source_of", lambda args: PrometheusSource("http://127.0.0.1:9"))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        args = parse("--listen", f"127.0.0.1:{port}", "--admin", "127.0.0.1:9")
        assert args.func(args) == 1
    assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err
