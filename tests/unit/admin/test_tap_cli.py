"""``/requests`` (long-poll) and ``nodemesh requests`` against a served admin API."""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import threading
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest

from agent.admin.api import AdminApi
from agent.admin.cli import format_connections
from agent.admin.tapcli import Agent, format_header, format_line, name_hints, run_agents, tap
from agent.base.http import HttpServer, Request
from agent.cli import build_parser, main
from agent.config import ConfigError, add_arguments, from_args
from agent.telemetry.records import RequestRecord
from agent.telemetry.tap import RequestFilter, RequestRing
from tests.unit.admin.admin_helpers import admin_with_certificate
from tests.unit.admin.test_admin_cli import live_connection
from tests.unit.telemetry.telemetry_helpers import inbound
from tests.unit.telemetry.test_tap import LABELS

OTHER = {**LABELS, "source_workload": "batch", "source_workload_namespace": "jobs"}


def rec(method: str, path: str, status: int, flags: str = "-") -> RequestRecord:
    return RequestRecord(method, path, "web:80", status, 2.25, 0, 5, flags, "rid")


class Served:
    """An admin API with a request ring, served from a loop in a thread."""

    def __init__(self) -> None:
        self.ring = RequestRing(16)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.server: HttpServer | None = None
        self.address = ""

    def add(self, record: RequestRecord, labels: dict[str, str] = LABELS) -> None:
        """Add a finished request on the loop and return once it is in the ring (its time is
        taken there: a request added "before" a command must be in before it starts)."""
        conn = replace(inbound(), upstream="10.244.2.2:9080", id=3)
        added = threading.Event()

        def add() -> None:
            self.ring.add(conn, record, labels)
            added.set()

        self.loop.call_soon_threadsafe(add)
        assert added.wait(10), "the admin loop did not run"

    def start(self) -> None:
        async def start() -> None:
            api, _cert, _drain = await admin_with_certificate()
            api.s.tap = self.ring
            self.server = HttpServer(api.handle)
            self.address = f"127.0.0.1:{await self.server.start('127.0.0.1', 0)}"

        self.thread.start()
        asyncio.run_coroutine_threadsafe(start(), self.loop).result(timeout=10)

    def stop(self) -> None:
        server = self.server
        assert server is not None

        async def shutdown() -> None:
            """Stop listening, then end the handlers still running (a long poll the CLI left):
            a loop closed under them would leave their coroutines unawaited."""
            await server.stop()
            await asyncio.sleep(0)  # connections accepted just before the close get their task
            others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in others:
                task.cancel()
            await asyncio.gather(*others, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(shutdown(), self.loop).result(timeout=10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()


@pytest.fixture
def served() -> Iterator[Served]:
    s = Served()
    s.start()
    s.add(rec("GET", "/a", 200))
    s.add(rec("POST", "/admin/x", 403, "RBAC"))
    s.add(rec("GET", "/api/v1", 503, "UC"), OTHER)
    try:
        yield s
    finally:
        s.stop()


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, list[str], str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out.splitlines(), out.err


def columns(lines: list[str]) -> list[tuple[str, str, str]]:
    """(method, path, status) of each printed line."""
    return [(line.split()[4], line.split()[5], line.split()[6]) for line in lines]


def test_once_prints_what_the_agent_holds(
    served: Served, capsys: pytest.CaptureFixture[str]
) -> None:
    code, lines, err = run(capsys, "requests", "--admin", served.address, "--once")
    assert (code, err) == (0, "")
    assert columns(lines) == [
        ("GET", "/a", "200"),
        ("POST", "/admin/x", "403"),
        ("GET", "/api/v1", "503"),
    ]
    first = lines[0].split()
    assert first[1:4] == ["in", "default/client", "default/server"]
    assert first[7:] == ["-", "2.2", "10.244.2.2:9080"]
    assert max(len(line) for line in lines) <= 130  # fixed columns + an IPv4 upstream


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--status", "5xx"], ["/api/v1"]),
        (["--status", "403"], ["/admin/x"]),
        (["--method", "post"], ["/admin/x"]),
        (["--path", "/ad"], ["/admin/x"]),
        (["--path", "/a"], ["/a", "/admin/x", "/api/v1"]),
        (["--workload", "batch"], ["/api/v1"]),
        (["--workload", "default/server"], ["/a", "/admin/x", "/api/v1"]),
        (["--from", "default/client"], ["/a", "/admin/x"]),
        (["--to", "client"], []),
        (["--method", "GET", "--status", "2xx"], ["/a"]),
        # linkerd viz tap's way to name the workload
        (["deploy/batch"], ["/api/v1"]),
        (["sts/batch", "-n", "jobs"], ["/api/v1"]),
        (["deploy/batch", "-n", "default"], []),
        (["--workload", "server", "-n", "default"], ["/a", "/admin/x", "/api/v1"]),
        (["--from", "deploy/batch"], ["/api/v1"]),  # not namespace "deploy"
        (["--to", "deploy/server", "--workload", "sts/client"], ["/a", "/admin/x"]),
        # the Service the requests were sent to, as linkerd viz tap svc/NAME
        (["svc/server"], ["/a", "/admin/x", "/api/v1"]),
        (["svc/server", "-n", "default", "--method", "POST"], ["/admin/x"]),
        (["svc/server", "-n", "jobs"], []),
        (["--to", "svc/default/server", "--from", "batch"], ["/api/v1"]),
        (["--to", "svc/web"], []),
    ],
)
def test_filters(
    args: list[str], expected: list[str], served: Served, capsys: pytest.CaptureFixture[str]
) -> None:
    code, lines, _ = run(capsys, "requests", "--admin", served.address, "--once", *args)
    assert code == 0 and [path for _, path, _ in columns(lines)] == expected


@pytest.mark.parametrize(
    ("args", "warning"),
    [
        (
            ["--to", "server-0"],
            "--to server-0: no workload of that name, so no request will "
            "match; pod server-0 is in workload default/server (requests name the workload): use "
            "--to server",
        ),
        (
            ["deploy/nosuch"],
            "--workload nosuch: no workload of that name, so no request will "
            "match; workloads: default/client, default/server",
        ),
        (["--from", "jobs/client"], "--from jobs/client: no workload of that name"),
        (["--to", "default/server", "--from", "client"], None),
        (
            ["svc/web"],
            "svc/web: no Service of that name, so no request will match; Services: default/server",
        ),
        (["svc/server"], None),
    ],
)
def test_a_workload_name_that_matches_nothing_is_explained(
    args: list[str], warning: str | None, served: Served, capsys: pytest.CaptureFixture[str]
) -> None:
    """Requests carry canonical workload names (``server`` for pods server-0/1): a pod's or
    a Service's name would match nothing in silence, and a follow would wait for ever."""
    code, _, err = run(capsys, "requests", "--admin", served.address, "--once", *args)
    assert code == 0
    if warning is None:
        assert err == ""
    else:
        assert err.startswith(f"nodemesh requests: warning: {warning}")


def test_a_service_name_points_to_the_workload_behind_it() -> None:
    workloads = [{"name": "web-7f9c", "namespace": "shop", "labels": {"app": "web"}}]
    services = [
        {"name": "frontend", "namespace": "shop", "endpoints": [{"workload": "shop/web-7f9c"}]}
    ]
    hints = name_hints(RequestFilter(destination="shop/frontend"), workloads, services)
    assert hints == [
        "--to shop/frontend: no workload of that name, so no request will match; Service "
        "shop/frontend sends to workload web: use --to web"
    ]
    assert name_hints(RequestFilter(workload="web"), workloads, services) == []


def test_json_lines_are_the_access_log_fields(
    served: Served, capsys: pytest.CaptureFixture[str]
) -> None:
    _, lines, _ = run(capsys, "requests", "--admin", served.address, "--once", "-o", "json")
    entries = [json.loads(line) for line in lines]
    assert [e["path"] for e in entries] == ["/a", "/admin/x", "/api/v1"]
    assert entries[1]["response_flags"] == "RBAC" and entries[1]["node"] == served.address
    assert entries[2]["source_identity"] == LABELS["source_principal"]


def test_follow_prints_new_requests_until_count(
    served: Served, capsys: pytest.CaptureFixture[str]
) -> None:
    later = threading.Timer(0.2, lambda: served.add(rec("DELETE", "/later", 204)))
    later.start()
    try:
        code, lines, err = run(
            capsys, "requests", "--admin", served.address, "--method", "DELETE", "--count", "1"
        )
    finally:
        later.join()
    assert (code, err) == (0, "")
    assert columns(lines) == [("DELETE", "/later", "204")]


def test_live_shows_only_requests_that_start_after_the_command(
    served: Served, capsys: pytest.CaptureFixture[str]
) -> None:
    """The fixture's requests were made before the command; while it runs, each round adds a
    request that was in flight since a minute before (its duration) and one made now: the
    first line printed must be a new one, neither a held nor an in-flight one."""
    done = threading.Event()

    def keep_sending() -> None:
        n = 0
        while not done.wait(0.02):
            served.add(replace(rec("GET", f"/inflight/{n}", 200), duration_ms=60_000.0))
            served.add(replace(rec("GET", f"/new/{n}", 200), duration_ms=0.0))
            n += 1

    sender = threading.Thread(target=keep_sending)
    sender.start()
    try:
        code, lines, err = run(
            capsys, "requests", "--admin", served.address, "--live", "--count", "2"
        )
    finally:
        done.set()
        sender.join()
    assert (code, err) == (0, "")
    paths = [path for _, path, _ in columns(lines)]
    assert len(paths) == 2 and all(p.startswith("/new/") for p in paths), paths


def test_live_and_once_exclude_each_other(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["requests", "--admin", "127.0.0.1:1", "--live", "--once"])
    assert exited.value.code == 2
    assert "argument --once: not allowed with argument --live" in capsys.readouterr().err


def test_several_agents_are_merged_in_time_order_with_their_node(served: Served) -> None:
    out = io.StringIO()
    agents = [Agent("node1", served.address), Agent("node2", served.address)]
    code = tap(agents, RequestFilter(status="5xx"), follow=False, header=True, out=out)
    lines = out.getvalue().splitlines()
    assert code == 0 and lines[0] == format_header(with_node=True)
    assert sorted(line.split()[1] for line in lines[1:]) == ["node1", "node2"]
    assert all("/api/v1" in line for line in lines[1:])


def test_an_unreachable_agent_is_an_error_naming_it(capsys: pytest.CaptureFixture[str]) -> None:
    code, lines, err = run(capsys, "requests", "--admin", "127.0.0.1:1", "--once")
    assert code == 1 and lines == []
    # Named once: the address is in the error already ("127.0.0.1:1: no ... on 127.0.0.1:1").
    assert err.startswith("nodemesh requests: no nodemesh agent answers on 127.0.0.1:1 ")


def test_lab_requests_speaks_as_itself_naming_the_node(capsys: pytest.CaptureFixture[str]) -> None:
    """``nodemesh lab requests`` runs the same tap: its messages are its own, not "nodemesh
    requests: ...", and a node's agent is named by the node."""
    args = build_parser("lab").parse_args(["lab", "requests", "--once"])
    agents = [Agent("node1", "127.0.0.1:1")]
    assert run_agents(args, agents, "nodemesh lab requests") == 1
    assert capsys.readouterr().err.startswith(
        "nodemesh lab requests: node1: no nodemesh agent answers on 127.0.0.1:1 "
    )


def test_a_failed_grpc_call_is_found_by_its_grpc_status_not_by_5xx(
    served: Served, capsys: pytest.CaptureFixture[str]
) -> None:
    served.add(replace(rec("POST", "/pkg.Svc/Get", 200), grpc_status="14"))
    served.add(replace(rec("POST", "/pkg.Svc/List", 200), grpc_status="0"))
    for args, expected in [
        (["--grpc-status", "UNAVAILABLE"], ["/pkg.Svc/Get"]),
        (["--grpc-status", "error"], ["/pkg.Svc/Get"]),
        (["--grpc-status", "0"], ["/pkg.Svc/List"]),
        (["--status", "5xx"], ["/api/v1"]),  # the call's HTTP status is 200
    ]:
        code, lines, _ = run(capsys, "requests", "--admin", served.address, "--once", *args)
        assert code == 0 and [path for _, path, _ in columns(lines)] == expected


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--status", "2x"], "expected a status code such as 404 or a class such as 5xx"),
        (["--workload", "a/b/c"], "expected NAME or NAMESPACE/NAME"),
        (["--count", "0"], "--count 0: expected 1 or more"),
        (["--status", "UNAVAILABLE"], "gRPC status is filtered apart"),
        (["--grpc-status", "NOPE"], "expected a code 0-16, its name such as NOT_FOUND, or error"),
        (["svc"], "svc: name one as TYPE/NAME (deploy/web, svc/web)"),
        (["svc/web", "--to", "svc/api"], "svc/web and --to svc/api: give one of them"),
        (["pod/web-0"], "'pod' is no resource nodemesh knows"),
        (["deploy/web", "--workload", "api"], "deploy/web and --workload api: give one of them"),
        (["-n", "shop"], "-n shop: name the workload too"),
        (["--from", "svc/web"], "--from svc/web: name a workload ([NS/]NAME or deploy/NAME)"),
    ],
)
def test_bad_filters_are_refused_before_asking(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(capsys, "requests", "--admin", "127.0.0.1:1", *args)
    assert code == 2 and message in err


def test_a_line_shows_a_grpc_status_and_addresses_of_unknown_workloads() -> None:
    entry: dict[str, Any] = {
        "time": "2026-12-06T02:05:37.123+00:00",
        "direction": "outbound",
        "source_workload": "unknown",
        "source_address": "10.0.0.9:5000",
        "destination_workload": "server",
        "destination_namespace": "default",
        "method": "POST",
        "path": "/pkg.Svc/Method" + "x" * 40,
        "response_code": 200,
        "grpc_status": "7",
        "response_flags": "-",
        "duration_ms": 12.345,
        "upstream_address": "10.244.2.3:9090",
    }
    line = format_line(entry)
    assert line.split()[:5] == ["02:05:37.123", "out", "10.0.0.9:5000", "default/server", "POST"]
    assert "/pkg.Svc/Me…xxxxxxxxxxxx 200/7  -" in line  # cut in the middle
    assert line.endswith("12.3 10.244.2.3:9090")
    # A gRPC path one character too long keeps its method: the Stream call is not cut to "Stre…".
    grpc = format_line({**entry, "path": "/nodemesh.lab.Echo/Stream"})
    assert "/nodemesh.lab.Ec…/Stream 200/7" in grpc
    assert "/api/v1/orders" in format_line({**entry, "path": "/api/v1/orders"})  # fits: whole


async def _api(ring: RequestRing) -> AdminApi:
    api, _cert, _drain = await admin_with_certificate()
    api.s.tap = ring
    return api


def test_the_api_long_polls_until_a_matching_request_comes() -> None:
    async def scenario() -> tuple[int, dict[str, Any], dict[str, Any]]:
        ring = RequestRing(8)
        api = await _api(ring)
        query = {"since": "0", "wait": "5", "method": "POST"}
        pending = asyncio.create_task(api.handle(Request("GET", "/requests", query)))
        await asyncio.sleep(0)
        ring.add(inbound(), rec("GET", "/skip", 200), LABELS)  # not matching: keeps waiting
        await asyncio.sleep(0)
        assert not pending.done()
        ring.add(inbound(), rec("POST", "/x", 201), LABELS)
        response = await asyncio.wait_for(pending, 5)
        empty = await api.handle(Request("GET", "/requests", {"since": "2", "wait": "0.05"}))
        return response.status, json.loads(response.body), json.loads(empty.body)

    status, got, empty = asyncio.run(scenario())
    assert status == 200 and [r["path"] for r in got["requests"]] == ["/x"]
    assert (got["next"], got["missed"], got["ring_size"]) == (2, 0, 8)
    assert (empty["requests"], empty["next"]) == ([], 2)


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ({"since": "abc"}, "since='abc': expected the 'next' cursor of an answer"),
        ({"wait": "60"}, "wait='60': expected a number from 0 to 10"),
        ({"limit": "0"}, "limit='0': expected a number from 1 to 1000"),
        ({"colour": "red"}, "unknown parameter 'colour'"),
        ({"status": "9xx"}, "status '9xx'"),
        ({"policy": "a/b/c"}, "policy 'a/b/c': expected NAME, NAMESPACE/NAME"),
    ],
)
def test_the_api_refuses_bad_queries(query: dict[str, str], message: str) -> None:
    async def scenario() -> tuple[int, dict[str, Any]]:
        api = await _api(RequestRing(4))
        response = await api.handle(Request("GET", "/requests", query))
        return response.status, json.loads(response.body)

    status, body = asyncio.run(scenario())
    assert status == 400 and message in body["error"]


def test_connections_show_http_request_counts() -> None:
    http = {**live_connection(), "protocol": "http/1.1", "requests": 12}
    table = format_connections({"connections": [live_connection(), http]})
    assert table.splitlines()[0].split()[-2:] == ["REQUESTS", "UPSTREAM"]
    assert table.splitlines()[1].split()[-2:] == ["-", "10.244.2.2:8080"]
    assert table.splitlines()[2].split()[-3:] == ["http/1.1", "12", "10.244.2.2:8080"]


def test_connections_show_the_policy_that_refused_one() -> None:
    """A live connection a policy change refuses stays listed until it has closed: a line
    under the table names the policy and rule."""
    refused = {**live_connection(), "failure": "policy_denied", "policy": "default/p:rules[1]"}
    table = format_connections({"connections": [live_connection(), refused]}).splitlines()
    assert len(table) == 4 and table[0].split()[-1] == "UPSTREAM"
    assert table[3] == ("default/client -> 10.244.2.2:8080: closing, refused by default/p:rules[1]")
    assert len(format_connections({"connections": [live_connection()]}).splitlines()) == 2


def test_requests_by_policy_refused_or_dry_run(capsys: pytest.CaptureFixture[str]) -> None:
    """``--policy NAME``: the requests that policy refused and those a dry-run policy of that
    name would have denied; the filter goes to the agent as ``policy=``."""
    s = Served()
    s.start()
    try:
        s.add(rec("GET", "/a", 200))
        s.add(replace(rec("POST", "/admin", 403, "RBAC"), policy="default/no-admin:rules[0]"))
        s.add(replace(rec("GET", "/try", 200), dry_run_policy="default/no-admin:rules[1]"))
        s.add(replace(rec("GET", "/other", 403, "RBAC"), policy="default/other:rules[0]"))
        code, lines, _ = run(
            capsys, "requests", "--admin", s.address, "--once", "--policy", "no-admin"
        )
        assert code == 0
        assert [path for _, path, _ in columns(lines)] == ["/admin", "/try"]
        assert lines[1].split()[-1] == "dry-run:default/no-admin:rules[1]"
        code, lines, _ = run(
            capsys,
            "requests",
            "--admin",
            s.address,
            "--once",
            "--policy",
            "default/no-admin:rules[1]",
        )
        assert [path for _, path, _ in columns(lines)] == ["/try"]
        code, _, err = run(capsys, "requests", "--admin", s.address, "--once", "--policy", "a/b/c")
        assert code == 2 and "policy 'a/b/c': expected NAME, NAMESPACE/NAME" in err
    finally:
        s.stop()


@pytest.mark.parametrize("rate", ["2", "-1", "nan"])
def test_the_agent_refuses_a_sample_rate_outside_0_to_1(rate: str) -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(
        ["--node", "n1", "--cluster-file", "c.yaml", "--access-log-sample", rate]
    )
    with pytest.raises(ConfigError, match="expected a fraction of requests to log between 0 and 1"):
        from_args(args)
    args.access_log_sample = 0.25
    assert from_args(args).access_log_sample == 0.25


def test_a_refused_request_shows_its_policy_and_a_dry_run_would_deny_is_marked() -> None:
    entry = {
        "time": "2026-12-06T02:05:37.123+00:00",
        "direction": "inbound",
        "source_workload": "client",
        "source_namespace": "default",
        "destination_workload": "server",
        "destination_namespace": "default",
        "method": "POST",
        "path": "/admin",
        "response_code": 403,
        "response_flags": "RBAC",
        "duration_ms": 0.4,
        "upstream_address": "10.244.2.3:9090",
    }
    usual = format_line({**entry, "response_code": 200, "response_flags": "-"})
    assert usual.endswith(" 10.244.2.3:9090")  # no POLICY: the line ends at its upstream
    denied = format_line({**entry, "policy": "default/no-admin"})
    assert denied.split()[6:] == ["403", "RBAC", "0.4", "10.244.2.3:9090", "default/no-admin"]
    # The column starts where the header says, whatever the upstream's length.
    start = format_header(with_node=False).index("POLICY")
    assert denied.index("default/no-admin") == start
    short = format_line({**entry, "upstream_address": "10.0.0.1:80", "policy": "default/x"})
    assert short.index("default/x") == start
    tried = format_line(
        {**entry, "response_code": 200, "response_flags": "-", "dry_run_policy": "ns/a,ns/b"}
    )
    assert tried.split()[-1] == "dry-run:ns/a,dry-run:ns/b"
    both = format_line({**entry, "policy": "default/no-admin", "dry_run_policy": "ns/a"})
    assert both.split()[-1] == "default/no-admin,dry-run:ns/a"
