"""``nodemesh stat``, ``edges``, ``top`` and ``dashboard``: the mesh's traffic at a glance.

Where the samples come from, first match wins:

1. ``--prometheus URL``: that Prometheus (it scrapes the agents; ``daemonset/prometheus/``);
2. ``--agent URL`` (repeatable): these agents' ``/metrics`` endpoints, scraped twice;
3. a lab (``--lab NAME``, else ``$NODEMESH_LAB`` or ``nm`` when that lab is up): its Prometheus
   when it runs, queried from the lab's switch namespace, else every node's agent, each read
   from its node's namespace;
4. the agent of this node, ``http://127.0.0.1:15020/metrics``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from agent.base.constants import ADMIN_PORT, METRICS_PORT
from agent.base.durations import parse_duration
from agent.base.resources import ResourceError, split_resource
from agent.view import aggregate, golden, httptop, render, targets
from agent.view.aggregate import TCP_FAMILIES
from agent.view.dashboard import Admin, Dashboard, server
from agent.view.golden import REQUEST_FAMILIES
from agent.view.screen import Screen
from agent.view.series import ViewError
from agent.view.sources import Agent, AgentSource, PrometheusSource, Runner, Source, http_get

LOCAL_AGENT = f"http://127.0.0.1:{METRICS_PORT}/metrics"
LOCAL_ADMIN = f"127.0.0.1:{ADMIN_PORT}"
DASHBOARD_LISTEN = "127.0.0.1:15030"


def _in_netns(name: str) -> Runner:
    from agent.lab import netns

    def run(func: Callable[[], bytes]) -> bytes:
        return netns.call_in(name, func)

    return run


def _lab_source(lab: str, *, required: bool) -> Source | None:
    from agent.lab import control, prometheus
    from agent.lab.topology import LabError

    try:
        labdir, plan = control.load(lab)
    except LabError as e:
        if required:
            raise ViewError(str(e)) from e
        return None
    prom = prometheus.status(plan, labdir)
    if prom["state"] == "running":
        return PrometheusSource(prom["url"], _in_netns(plan.switch_netns))
    return AgentSource(
        [Agent(f"http://{n.ip}:{METRICS_PORT}/metrics", _in_netns(n.netns)) for n in plan.nodes]
    )


def _lab_admins(lab: str) -> list[Admin] | None:
    """Every node's admin API of ``lab`` (loopback in the node's namespace); None: no lab."""
    from agent.lab import control
    from agent.lab.topology import LabError

    try:
        _, plan = control.load(lab)
    except LabError:
        return None
    return [Admin(n.name, f"http://{LOCAL_ADMIN}", _in_netns(n.netns)) for n in plan.nodes]


def source_of(args: argparse.Namespace) -> Source:
    if args.prometheus:
        return PrometheusSource(args.prometheus)
    if args.agent:
        return AgentSource([Agent(url) for url in args.agent])
    lab = args.lab or os.environ.get("NODEMESH_LAB") or "nm"
    found = _lab_source(lab, required=args.lab is not None)
    return found or AgentSource([Agent(LOCAL_AGENT)])


def _seconds(text: str) -> float:
    """A window, range or refresh period: a duration above zero (a 0s window has no rates,
    and a 0s ``top --interval`` asks Prometheus without pause)."""
    try:
        seconds = parse_duration(text).total_seconds()
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from e
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a duration above 0, e.g. 30s or 1m")
    return seconds


def _header(source: Source, seconds: float) -> str:
    now = dt.datetime.now(dt.UTC).strftime("%H:%M:%S UTC")
    return f"{now}  window {seconds:g}s  from {source.describe()}"


def _announce(source: Source, seconds: float) -> None:
    """Without Prometheus the first window is lived through: say so before waiting."""
    if isinstance(source, AgentSource):
        print(f"reading the {source.describe()} twice, {seconds:g}s apart", file=sys.stderr)


def stat_target(resource: str, name: str | None) -> tuple[str, str | None]:
    """(``workload`` or ``service``, the name if any) of ``stat RESOURCE [NAME]``, where
    ``RESOURCE`` may be Linkerd's (``deploy``, ``svc``) and ``TYPE/NAME``
    (``agent.base.resources``)."""
    try:
        kind, named = split_resource(resource)
    except ResourceError as e:
        raise ViewError(str(e)) from e
    if named is not None and name is not None:
        raise ViewError(f"{resource} already names one; drop {name!r}")
    return kind, named if named is not None else name


def _stat(args: argparse.Namespace) -> int:
    resource, name = stat_target(args.resource, args.name)
    if args.namespace and name is not None and "/" not in name and resource == "workload":
        name = f"{args.namespace}/{name}"
    source = source_of(args)
    _announce(source, args.window)
    window = source.window(args.window, (*TCP_FAMILIES, *REQUEST_FAMILIES))
    rows = aggregate.stat(window, resource=resource, name=name)
    requests = golden.stat_requests(window, resource=resource, name=name)
    if args.namespace:
        rows = aggregate.in_namespace(rows, resource, args.namespace)
        requests = aggregate.in_namespace(requests, resource, args.namespace)
    if name is not None and not rows and not requests:
        _check_named(args, resource, name)
    if args.json or args.output == "json":
        key = "service" if resource == "service" else "workload"
        print(
            json.dumps(
                [
                    render.figures_json(
                        [key], k, rows.get(k, aggregate.Figures(seconds=window.seconds))
                    )
                    | render.requests_json(requests.get(k))
                    for k in sorted(set(rows) | set(requests))
                ]
            )
        )
    else:
        print(_header(source, args.window))
        print("\n".join(render.stat_lines(resource, rows, requests)))
    return 0


def _check_named(args: argparse.Namespace, resource: str, name: str) -> None:
    """Refuse a NAME without rows that no workload or Service has, as kubectl refuses a missing
    object; the first agent's state says (every agent holds the whole mesh's). An agent that
    cannot be read leaves the empty table: idle and missing look alike then."""
    admin = _admins(args)[0]
    try:
        workloads = json.loads(http_get(f"{admin.url.rstrip('/')}/workloads", admin.runner))
        services = json.loads(http_get(f"{admin.url.rstrip('/')}/services", admin.runner))
        problem = targets.missing(
            resource, name, args.namespace, workloads["workloads"], services["services"]
        )
    except (ViewError, ValueError, KeyError, TypeError):
        return
    if problem is not None:
        raise ViewError(problem)


EDGE_KEYS = ["source", "sourcePrincipal", "destination", "destinationPrincipal"]


def _edges(args: argparse.Namespace) -> int:
    source = source_of(args)
    _announce(source, args.window)
    window = source.window(args.window, (*TCP_FAMILIES, golden.REQUESTS))
    rows = aggregate.aggregate(window, aggregate.by_edge)
    requests = golden.requests_by(window, aggregate.by_edge)
    if args.json or args.output == "json":
        print(
            json.dumps(
                [
                    render.figures_json(EDGE_KEYS, k, f)
                    | {"deniedRequests": requests[k].denied if k in requests else 0.0}
                    for k, f in sorted(rows.items())
                ]
            )
        )
    else:
        print(_header(source, args.window))
        print("\n".join(render.edges_lines(rows, requests)))
    return 0


class _Tapper:
    """The agents' recent requests for ``top``'s HTTP table: each frame reads what every
    agent's ring got since the last frame (``/requests?since=``, no waiting)."""

    def __init__(self, admins: Sequence[Admin], seconds: float) -> None:
        self.admins = admins
        self.window = httptop.RouteWindow(seconds)
        self._cursors: dict[str, int | None] = {a.name: None for a in admins}

    def read(self) -> list[str]:
        """Take in new requests; returns a note per agent that did not answer."""
        notes = []
        for admin in self.admins:
            cursor = self._cursors[admin.name]
            query = f"?since={cursor}&limit={TAP_LIMIT}" if cursor is not None else ""
            try:
                got = json.loads(http_get(f"{admin.url.rstrip('/')}/requests{query}", admin.runner))
            except (ViewError, ValueError) as e:
                notes.append(f"requests of {admin.name}: {e}")
                continue
            self._cursors[admin.name] = int(got["next"])
            self.window.add(got["requests"])
        self.window.expire(time.time())
        return notes


TAP_LIMIT = 1000  # the admin API's largest page


def _admins(args: argparse.Namespace) -> list[Admin]:
    """``--admin``'s agents, else every lab node's (unless the metrics come from elsewhere),
    else this node's."""
    if args.admin:
        return [Admin(a, f"http://{a}") for a in args.admin]
    if args.prometheus or args.agent:
        return [Admin(LOCAL_ADMIN, f"http://{LOCAL_ADMIN}")]
    lab = args.lab or os.environ.get("NODEMESH_LAB") or "nm"
    return _lab_admins(lab) or [Admin(LOCAL_ADMIN, f"http://{LOCAL_ADMIN}")]


def _top(args: argparse.Namespace) -> int:
    source = source_of(args)
    # Scraping the agents directly, each frame covers the time since the previous scrape.
    seconds = args.interval if isinstance(source, AgentSource) else args.window
    tapper = _Tapper(_admins(args), args.window)
    shown = 0
    with Screen(sys.stdout) as screen:
        try:
            while args.iterations is None or shown < args.iterations:
                started = time.monotonic()
                window = source.window(seconds, (*TCP_FAMILIES, golden.REQUESTS))
                paths = aggregate.top(window, args.limit)
                requests = golden.requests_by(window, aggregate.by_path)
                notes = tapper.read()
                title = f"nodemesh top: busiest paths  {_header(source, seconds)}"
                routes = tapper.window.routes(args.limit)
                screen.show(
                    [
                        title,
                        "",
                        *render.path_lines(paths, requests),
                        "",
                        f"HTTP routes, last {args.window:g}s (the agents' recent requests):",
                        *httptop.route_lines(routes, args.window),
                        *notes,
                    ]
                )
                shown += 1
                if args.iterations is None or shown < args.iterations:
                    time.sleep(max(0.0, args.interval - (time.monotonic() - started)))
        except KeyboardInterrupt:
            pass
    return 0


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}")
    return int(text)


def _listen(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise argparse.ArgumentTypeError(f"expected ADDRESS:PORT, e.g. {DASHBOARD_LISTEN}")
    return host.strip("[]"), int(port)


def _dashboard(args: argparse.Namespace) -> int:
    args.agent = None  # not an option here: the charts need the history a Prometheus keeps
    source = source_of(args)
    if isinstance(source, AgentSource):
        raise ViewError(
            "the dashboard reads a Prometheus that scrapes the agents: pass --prometheus URL, "
            "or --lab NAME for a lab whose Prometheus runs (scripts/setup.sh installs it)"
        )
    if args.admin:
        admins = [Admin(a, f"http://{a}") for a in args.admin]
    else:
        lab = args.lab or os.environ.get("NODEMESH_LAB") or "nm"
        admins = (None if args.prometheus else _lab_admins(lab)) or [
            Admin(LOCAL_ADMIN, f"http://{LOCAL_ADMIN}")
        ]
    board = Dashboard(
        source,
        admins,
        window_seconds=args.window,
        range_seconds=args.range,
        points=args.points,
        refresh_seconds=args.refresh,
    )
    host, port = args.listen
    try:
        httpd = server(board, host, port)
    except OSError as e:
        raise ViewError(f"cannot listen on {host}:{port}: {e}; choose another --listen") from e
    shown = f"[{host}]" if ":" in host else host
    print(f"nodemesh dashboard: http://{shown}:{httpd.server_address[1]}/", flush=True)
    print(f"  metrics from {source.describe()}; admin APIs: "
          + ", ".join(a.name for a in admins), flush=True)  # fmt: skip
    try:
        httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        httpd.server_close()
    return 0


def _guarded(func: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        try:
            return func(args)
        except ViewError as e:
            print(f"nodemesh {args.command}: error: {e}", file=sys.stderr)
            return 1

    return run


def _output(p: argparse.ArgumentParser, what: str) -> None:
    """``-o json`` as the other commands (and kubectl) spell it; ``--json`` as before."""
    p.add_argument(
        "-o",
        "--output",
        choices=["table", "json"],
        default="table",
        help=f"table (default) or {what}",
    )
    p.add_argument("--json", action="store_true", help="the same as -o json")


def register(subparsers: argparse._SubParsersAction[Any]) -> None:
    common = argparse.ArgumentParser(add_help=False)
    where = common.add_argument_group("where the metrics come from (first given wins)")
    where.add_argument("--prometheus", metavar="URL", help="a Prometheus that scrapes the agents")
    where.add_argument(
        "--agent",
        action="append",
        metavar="URL",
        help="an agent's metrics URL, e.g. http://NODE_IP:15020/metrics (repeatable)",
    )
    where.add_argument(
        "--lab",
        metavar="NAME",
        help="a lab's Prometheus (or its agents); default $NODEMESH_LAB or nm when up, "
        f"else the local agent {LOCAL_AGENT}",
    )

    p = subparsers.add_parser(
        "stat",
        parents=[common],
        help="golden metrics per workload or Service over a window",
        description="Per destination workload or Service, over --window: requests per second, "
        "success rate (not answered 5xx nor a non-zero gRPC status) and p50/p95/p99 latency "
        "when HTTP or gRPC requests "
        "were seen; connections opened (count and per second), active connections, bytes per "
        "second each way, the share of connections with mTLS, and what policy denied "
        "(connections and requests).",
    )
    p.add_argument(
        "resource",
        nargs="?",
        default="workload",
        metavar="RESOURCE",
        help="workload (default) or service; Linkerd's deploy, sts, ds, svc; or TYPE/NAME",
    )
    p.add_argument("name", nargs="?", help="only this workload (ns/name or name) or Service")
    p.add_argument("-n", "--namespace", help="only this namespace's workloads or Services")
    p.add_argument("--window", type=_seconds, default=60.0, help="e.g. 30s, 1m (default 1m)")
    _output(p, "json: rows as JSON (exact counts)")
    p.add_argument(
        "--admin",
        action="append",
        metavar="HOST:PORT",
        help="the agent's admin API that says whether NAME exists when it had no traffic; "
        f"default a lab node's, else {LOCAL_ADMIN}",
    )
    p.set_defaults(func=_guarded(_stat))

    p = subparsers.add_parser(
        "edges",
        parents=[common],
        help="who talks to whom, with identities and mTLS",
        description="Source and destination workloads with the principals they proved and "
        "whether their connections used mTLS, over --window.",
    )
    p.add_argument("--window", type=_seconds, default=60.0, help="e.g. 30s, 1m (default 1m)")
    _output(p, "json: rows as JSON")
    p.set_defaults(func=_guarded(_edges))

    p = subparsers.add_parser(
        "top",
        parents=[common],
        help="live view of the busiest paths (source -> destination) and HTTP routes",
        description="Redraws the busiest paths (TCP, from the metrics) and the busiest HTTP "
        "routes (source -> destination, method, path; from the agents' recent requests) every "
        "--interval on a terminal; prints plain frames when stdout is not a terminal. Ctrl-C "
        "quits.",
    )
    p.add_argument(
        "--admin",
        action="append",
        metavar="HOST:PORT",
        help=f"an agent's admin API for the HTTP routes (repeatable); default every lab "
        f"node's, else {LOCAL_ADMIN}",
    )
    p.add_argument("--window", type=_seconds, default=30.0, help="Prometheus window (default 30s)")
    p.add_argument("--interval", type=_seconds, default=2.0, help="refresh period (default 2s)")
    p.add_argument("--limit", type=int, default=20, help="paths shown (default 20)")
    p.add_argument("--iterations", type=int, help="stop after this many frames")
    p.set_defaults(func=_guarded(_top))

    board = argparse.ArgumentParser(add_help=False)
    where = board.add_argument_group("where the metrics come from (first given wins)")
    where.add_argument("--prometheus", metavar="URL", help="a Prometheus that scrapes the agents")
    where.add_argument(
        "--lab",
        metavar="NAME",
        help="a lab's Prometheus, queried from its switch namespace; default $NODEMESH_LAB or "
        "nm when up",
    )
    p = subparsers.add_parser(
        "dashboard",
        parents=[board],
        help="web page: the service graph, and per workload its metrics, policies, certificates",
        description="Serves the mesh's service graph (workloads, request or connection rates, "
        "success rate, p99, mTLS, denied traffic) and a page per workload (golden metrics over "
        "time, edges, pods, policies, certificates). Reads a Prometheus (--prometheus, or the "
        "lab's) and the agents' admin APIs (--admin, or every lab node's). Ctrl-C stops it.",
    )
    p.add_argument(
        "--listen",
        type=_listen,
        default=_listen(DASHBOARD_LISTEN),
        metavar="ADDR:PORT",
        help=f"where to serve the page (default {DASHBOARD_LISTEN}; port 0 picks one)",
    )
    p.add_argument(
        "--admin",
        action="append",
        metavar="HOST:PORT",
        help=f"an agent's admin API (repeatable); default every lab node's, else {LOCAL_ADMIN}",
    )
    p.add_argument("--window", type=_seconds, default=60.0, help="rates over (default 1m)")
    p.add_argument("--range", type=_seconds, default=600.0, help="charts span (default 10m)")
    p.add_argument(
        "--points", type=_positive, default=60, help="points per chart line (default 60)"
    )
    p.add_argument(
        "--refresh", type=_positive, default=10, help="page refresh, seconds (default 10)"
    )
    p.set_defaults(func=_guarded(_dashboard))
