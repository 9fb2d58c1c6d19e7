"""``nodemesh requests``: recent and live HTTP requests of one agent or of every lab node.

Like ``linkerd viz tap``: one line per finished request (time, direction, source and
destination workloads, method, path, status, response flags, duration, the pod address it
went to, and what refused it: the policy, ``ns/name:rules[i]``, or the dry-run policies that
would have denied it, ``dry-run:ns/name:rules[i]``), filtered by workload (either side,
``--from``, ``--to``), the Service the requests were sent to (``svc/web``, ``--to svc/web``),
method, path prefix, status (``404`` or ``5xx``), gRPC status (``--grpc-status NOT_FOUND``,
``5`` or ``error``) and policy (``--policy [NS/]NAME``: refused by it, or a dry-run of it would
have). The filter travels to the agent (``/requests``, ``agent.admin.tap``), so only
matching requests cross the admin connection.

Without ``--once`` it prints the requests the agent still holds, then follows new ones until
interrupted (Ctrl-C) or ``--count`` lines were printed; with ``--once`` it prints what is held
and exits. ``--live`` shows only requests that started after the command did, as
``linkerd viz tap`` does (``--count N``: N new requests). It asks as the default does and
keeps a request by its start time (its finished time less its duration) against the
command's: that drops what the agent held and what was in flight when the command started,
and keeps what started and finished between the start and the first answer. The header line
is printed only on a terminal, so a pipe gets request lines only (``-o json``: one JSON
object per line, the access log's fields plus ``node``).

Requests name workloads by their canonical name, so a pod's or a Service's name given to
``--workload``/``--from``/``--to`` would match nothing and a follow would wait in silence: the
first agent's ``/workloads`` and ``/services`` turn that into a warning naming the workload.

One worker thread per agent long-polls it and queues what it gets; the main thread prints.
Why threads: in the lab every agent's admin API is loopback inside its node's network
namespace, and a thread can enter one namespace (``setns`` is per thread) and stay there, so
``nodemesh lab requests`` follows every node at once without a process per node. A viewer that
fell too far behind is told on stderr how many requests it missed.
"""

from __future__ import annotations

import argparse
import json
import queue
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TextIO
from urllib.parse import urlencode

from agent.admin.client import DEFAULT_ADMIN, AdminError, admin_address, request
from agent.admin.names import canonical_name
from agent.base.resources import KINDS, WORKLOAD, ResourceError, split_resource
from agent.telemetry.tap import FilterError, RequestFilter

POLL_WAIT = 5.0  # seconds an agent may hold a long-poll (the API allows up to 10)
TIME_STEP = 0.001  # an entry's time is rounded to the millisecond
PATH_WIDTH = 24
WHO_WIDTH = 18
UPSTREAM_WIDTH = 21  # an IPv4 ip:port at its longest; the POLICY column follows


@dataclass(frozen=True)
class Agent:
    """An admin API to read: ``enter`` runs first in the worker thread (a lab node's network
    namespace), then ``address`` is asked."""

    name: str
    address: str
    enter: Callable[[], None] | None = None


def requests_path(
    selected: RequestFilter, since: int | None, wait: float, limit: int | None = None
) -> str:
    query: dict[str, str] = dict(selected.query())
    if since is not None:
        query["since"] = str(since)
        query["wait"] = f"{wait:g}"
    if limit is not None:
        query["limit"] = str(limit)
    return "/requests?" + urlencode(query) if query else "/requests"


def started(entry: Mapping[str, Any]) -> float:
    """When a request started (epoch seconds): its finished ``time`` less its duration."""
    ended = datetime.fromisoformat(str(entry["time"])).timestamp()
    return ended - float(entry["duration_ms"]) / 1000


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _cut_path(path: str, width: int) -> str:
    """A long path loses its middle, not its end, so a gRPC call's method
    (``/pkg.Service/Method``) or a REST path's last segment stays readable."""
    if len(path) <= width:
        return path
    tail = path[path.rfind("/") :]
    if len(tail) > width // 2:
        tail = path[-(width // 2) :]
    return path[: width - 1 - len(tail)] + "…" + tail


def _who(entry: Mapping[str, Any], side: str, address: str) -> str:
    workload = entry.get(f"{side}_workload")
    if workload and workload != "unknown":
        return f"{entry.get(f'{side}_namespace')}/{workload}"
    return str(entry.get(address, "-"))


def format_header(with_node: bool) -> str:
    cols = [
        "TIME".ljust(12),
        *(["NODE".ljust(8)] if with_node else []),
        "DIR",
        "SOURCE".ljust(WHO_WIDTH),
        "DESTINATION".ljust(WHO_WIDTH),
        "METHOD".ljust(6),
        "PATH".ljust(PATH_WIDTH),
        "STATUS",
        "FLAGS",
        "MS".rjust(7),
        "UPSTREAM".ljust(UPSTREAM_WIDTH),
        "POLICY",
    ]
    return " ".join(cols)


def policy_column(entry: Mapping[str, Any]) -> str:
    """What refused the request (``policy``: an AuthorizationPolicy with flag ``RBAC``, a
    RateLimitPolicy with ``RL``) and the dry-run policies that would have denied it, marked
    ``dry-run:``; "" for the usual request, so its line ends at the upstream."""
    parts = []
    if entry.get("policy"):
        parts.append(str(entry["policy"]))
    if entry.get("dry_run_policy"):
        parts.extend(f"dry-run:{p}" for p in str(entry["dry_run_policy"]).split(","))
    return ",".join(parts)


def format_line(entry: Mapping[str, Any], node: str | None = None) -> str:
    """One request as a line under ``format_header``."""
    clock = str(entry["time"])[11:23]  # HH:MM:SS.mmm of the ISO time (UTC)
    status = str(entry["response_code"])
    if entry.get("grpc_status"):
        status += f"/{entry['grpc_status']}"
    cols = [
        clock.ljust(12),
        *([_cut(node or "-", 8).ljust(8)] if node is not None else []),
        "out" if entry["direction"] == "outbound" else "in ",
        _cut(_who(entry, "source", "source_address"), WHO_WIDTH).ljust(WHO_WIDTH),
        _cut(_who(entry, "destination", "destination_address"), WHO_WIDTH).ljust(WHO_WIDTH),
        _cut(str(entry["method"]), 6).ljust(6),
        _cut_path(str(entry["path"]), PATH_WIDTH).ljust(PATH_WIDTH),
        status.ljust(6),
        str(entry["response_flags"]).ljust(5),
        f"{float(entry['duration_ms']):7.1f}",
        str(entry.get("upstream_address") or "-").ljust(UPSTREAM_WIDTH),
        policy_column(entry),
    ]
    return " ".join(cols).rstrip()


def _name_hint(
    option: str,
    wanted: str,
    workloads: Sequence[Mapping[str, Any]],
    services: Sequence[Mapping[str, Any]],
) -> str | None:
    """Why ``option wanted`` can match no request, or None when a workload has that name."""
    namespace, _, name = wanted.rpartition("/")

    def here(item: Mapping[str, Any]) -> bool:
        return not namespace or item.get("namespace") == namespace

    workload_of = {f"{w.get('namespace')}/{w.get('name')}": w for w in workloads}
    if any(canonical_name(w) == name and here(w) for w in workloads):
        return None
    problem = f"{option} {wanted}: no workload of that name, so no request will match"
    pods = [w for w in workloads if w.get("name") == name and here(w)]
    if pods:
        owner = canonical_name(pods[0])
        return (
            f"{problem}; pod {name} is in workload {pods[0].get('namespace')}/{owner} "
            f"(requests name the workload): use {option} {owner}"
        )
    for service in services:
        if service.get("name") == name and here(service):
            owners = sorted(
                {
                    canonical_name(workload_of[e["workload"]])
                    for e in service.get("endpoints") or ()
                    if e.get("workload") in workload_of
                }
            )
            if owners:
                return (
                    f"{problem}; Service {service.get('namespace')}/{name} sends to workload "
                    f"{', '.join(owners)}: use {option} {owners[0]}"
                )
    known = sorted({f"{w.get('namespace')}/{canonical_name(w)}" for w in workloads})
    return f"{problem}; workloads: {', '.join(known) or '(none)'}"


def name_hints(
    selected: RequestFilter,
    workloads: Sequence[Mapping[str, Any]],
    services: Sequence[Mapping[str, Any]],
) -> list[str]:
    """What is wrong with the filter's workload names, given the agent's ``/workloads`` and
    ``/services``. Requests carry a workload's canonical name (``server`` for pods
    ``server-0``/``server-1``), not a pod's or a Service's: naming those matches nothing, and
    a follow would wait in silence. A warning, not a refusal: a workload may appear later."""
    named = (
        ("--workload", selected.workload),
        ("--from", selected.source),
        ("--to", selected.destination),
    )
    hints = [_name_hint(o, v, workloads, services) for o, v in named if v is not None]
    if selected.service is not None:
        namespace, _, name = selected.service.rpartition("/")
        known = sorted(f"{s.get('namespace')}/{s.get('name')}" for s in services)
        if not any(k.endswith(f"/{name}") and (not namespace or k == f"{namespace}/{name}")
                   for k in known):  # fmt: skip
            hints.append(
                f"svc/{selected.service}: no Service of that name, so no request will match; "
                f"Services: {', '.join(known) or '(none)'}"
            )
    return [h for h in hints if h is not None]


@dataclass
class _Got:
    agent: str
    answer: dict[str, Any] | None = None
    error: str | None = None
    hints: list[str] | None = None


def _hints(agent: Agent, selected: RequestFilter, timeout: float) -> _Got:
    """The filter's name hints from this agent's state (none when it cannot be read: the
    request that follows reports that)."""
    try:
        workloads = request(agent.address, "/workloads", timeout=timeout)["workloads"]
        services = request(agent.address, "/services", timeout=timeout)["services"]
    except (AdminError, OSError, KeyError, TypeError):
        return _Got(agent.name, hints=[])
    return _Got(agent.name, hints=name_hints(selected, workloads, services))


def _worker(
    agent: Agent,
    selected: RequestFilter,
    follow: bool,
    timeout: float,
    out: queue.Queue[_Got],
    stop: threading.Event,
    check_names: bool = False,
) -> None:
    try:
        if agent.enter is not None:
            agent.enter()
        if check_names:
            out.put(_hints(agent, selected, timeout))
        answer = request(agent.address, requests_path(selected, None, 0), timeout=timeout)
        out.put(_Got(agent.name, answer))
        while follow and not stop.is_set():
            path = requests_path(selected, int(answer["next"]), POLL_WAIT)
            answer = request(agent.address, path, timeout=POLL_WAIT + timeout)
            out.put(_Got(agent.name, answer))
    except (AdminError, OSError) as e:
        out.put(_Got(agent.name, error=str(e)))


def tap(
    agents: Sequence[Agent],
    selected: RequestFilter,
    *,
    follow: bool,
    live: bool = False,
    count: int | None = None,
    json_lines: bool = False,
    header: bool = False,
    timeout: float = 5.0,
    out: TextIO | None = None,
    err: TextIO | None = None,
    command: str = "nodemesh requests",
) -> int:
    """Print the agents' requests (and, with ``follow``, new ones as they come; with ``live``
    only those that started after this call) to ``out`` (default: stdout); the exit status:
    0, or 1 when an agent could not be read."""
    out = out or sys.stdout
    err = err or sys.stderr
    addresses = {a.address for a in agents if a.name == a.address}  # agents named by address
    follow = follow or live
    since = time.time() - TIME_STEP if live else None
    got: queue.Queue[_Got] = queue.Queue()
    stop = threading.Event()
    with_node = len(agents) > 1
    names = selected.workload or selected.source or selected.destination or selected.service
    for i, agent in enumerate(agents):
        threading.Thread(
            target=_worker,
            # every agent holds the whole cluster's workloads: the first one's state will do
            args=(agent, selected, follow, timeout, got, stop, bool(names) and i == 0),
            name=f"tap-{agent.name}",
            daemon=True,  # a long-poll in flight must not hold the exit
        ).start()
    if header and not json_lines:
        print(format_header(with_node), file=out, flush=True)
    printed, status = 0, 0
    pending = {a.name for a in agents}  # agents whose first answer (the backlog) is not in
    alive = set(pending)
    backlog: list[tuple[str, dict[str, Any]]] = []
    try:
        while alive and (follow or pending):
            item = got.get()
            entries: list[tuple[str, dict[str, Any]]] = []
            if item.hints is not None:
                for hint in item.hints:
                    print(f"{command}: warning: {hint}", file=err, flush=True)
                continue
            if item.error is not None or item.answer is None:
                # A lab node's name says which agent; an address the error names already.
                named = "" if item.agent in addresses else f"{item.agent}: "
                print(f"{command}: {named}{item.error}", file=err, flush=True)
                status = 1
                alive.discard(item.agent)
            else:
                if item.answer.get("missed"):
                    print(
                        f"{command}: {item.agent}: missed {item.answer['missed']} "
                        f"request(s) (the agent keeps the last {item.answer.get('ring_size')})",
                        file=err,
                        flush=True,
                    )
                entries = [
                    (item.agent, e)
                    for e in item.answer["requests"]
                    if since is None or started(e) >= since
                ]
            if pending:  # the backlogs are printed together, in time order
                pending.discard(item.agent)
                backlog += entries
                if pending:
                    continue
                entries, backlog = sorted(backlog, key=lambda a: str(a[1]["time"])), []
            for name, entry in entries:
                if json_lines:
                    line = json.dumps({"node": name, **entry}, separators=(",", ":"))
                else:
                    line = format_line(entry, name if with_node else None)
                print(line, file=out, flush=True)
                printed += 1
                if count is not None and printed >= count:
                    return status
    except KeyboardInterrupt:
        pass
    finally:
        stop.set()
    return status


def _resource(text: str) -> tuple[str, str]:
    """Linkerd's ``TYPE/NAME`` (``deploy/web``, ``svc/web``): (WORKLOAD or SERVICE, name)."""
    try:
        kind, name = split_resource(text)
    except ResourceError as e:
        raise FilterError(str(e)) from e
    if name is None:
        raise FilterError(f"{text}: name one as TYPE/NAME (deploy/web, svc/web)")
    return kind, name


def _in_namespace(name: str | None, namespace: str | None) -> str | None:
    return f"{namespace}/{name}" if name and namespace and "/" not in name else name


def _side(option: str, text: str | None) -> str | None:
    """``--from``/``--workload`` as given, or Linkerd's ``deploy/web`` as the workload ``web``:
    a ``TYPE/`` that is a resource word would otherwise be read as a namespace and match
    nothing, silently."""
    if text is None or text.partition("/")[0].lower() not in KINDS:
        return text
    kind, name = _resource(text)
    if kind != WORKLOAD:
        raise FilterError(
            f"{option} {text}: name a workload ([NS/]NAME or deploy/NAME); a Service is what a "
            "request was sent to: TYPE/NAME or --to svc/NAME"
        )
    return name


def filter_from_args(args: argparse.Namespace) -> RequestFilter:
    """The filter of the command line. Linkerd's resources: ``deploy/web`` (or
    ``--workload``) is either side's workload, ``svc/web`` (or ``--to svc/web``) the Service the
    requests were sent to, as ``linkerd viz tap svc/web`` taps what goes to it; ``-n`` is the
    namespace of the one given without its own."""
    workload, service = _side("--workload", args.workload), None
    destination = args.destination
    if destination is not None and destination.partition("/")[0].lower() in KINDS:
        kind, name = _resource(destination)
        destination, service = (name, None) if kind == WORKLOAD else (None, name)
    if args.resource is not None:
        kind, name = _resource(args.resource)
        given = f"--workload {workload}" if kind == WORKLOAD else f"--to svc/{service}"
        if (workload if kind == WORKLOAD else service) is not None:
            raise FilterError(f"{args.resource} and {given}: give one of them")
        workload, service = (name, service) if kind == WORKLOAD else (workload, name)
    if args.namespace is not None and workload is None and service is None:
        raise FilterError(f"-n {args.namespace}: name the workload too (deploy/web -n NS)")
    return RequestFilter(
        workload=_in_namespace(workload, args.namespace),
        source=_side("--from", args.source),
        destination=destination,
        service=_in_namespace(service, args.namespace),
        method=args.method,
        path=args.path,
        status=args.status,
        grpc_status=args.grpc_status,
        policy=args.policy,
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The filter and output options, shared by ``nodemesh requests`` and ``lab requests``."""
    parser.add_argument(
        "resource",
        nargs="?",
        metavar="TYPE/NAME",
        help="as linkerd viz tap: either side is this workload (deploy/web, sts/db, ds/x), or "
        "the requests were sent to this Service (svc/web)",
    )
    parser.add_argument("-n", "--namespace", help="the namespace of TYPE/NAME or --workload")
    parser.add_argument("--workload", metavar="[NS/]NAME", help="either side is this workload")
    parser.add_argument("--from", dest="source", metavar="[NS/]NAME", help="source workload")
    parser.add_argument(
        "--to",
        dest="destination",
        metavar="[NS/]NAME",
        help="destination workload, or svc/NAME: the Service the requests were sent to",
    )
    parser.add_argument("--method", help="HTTP method, e.g. POST")
    parser.add_argument("--path", metavar="PREFIX", help="path prefix, e.g. /api/")
    parser.add_argument("--status", metavar="CODE", help="status code (404) or class (5xx)")
    parser.add_argument(
        "--grpc-status",
        metavar="CODE",
        help="gRPC status: code (5), name (NOT_FOUND) or error (any but OK)",
    )
    parser.add_argument(
        "--policy",
        metavar="[NS/]NAME",
        help="refused by this AuthorizationPolicy or RateLimitPolicy, or a dry-run policy of "
        "that name would have denied it (NS/NAME:rules[N]: that rule; no-allow-match)",
    )
    when = parser.add_mutually_exclusive_group()
    when.add_argument(
        "--once", action="store_true", help="print the requests held now and exit (no follow)"
    )
    when.add_argument(
        "--live",
        action="store_true",
        help="only requests that start after the command does, not those the agent holds "
        "(as linkerd viz tap)",
    )
    parser.add_argument(
        "--count",
        type=int,
        metavar="N",
        help="exit after printing N requests (with --live: N new ones)",
    )
    parser.add_argument(
        "-o",
        "--output",
        choices=["table", "json"],
        default="table",
        help="table (default) or json: one access-log object per line, plus node",
    )
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds to wait (default 5)")


def run_agents(args: argparse.Namespace, agents: Sequence[Agent], command: str) -> int:
    try:
        selected = filter_from_args(args)
    except FilterError as e:
        print(f"{command}: {e}", file=sys.stderr)
        return 2
    if args.count is not None and args.count < 1:
        print(f"{command}: --count {args.count}: expected 1 or more", file=sys.stderr)
        return 2
    return tap(
        agents,
        selected,
        follow=not args.once,
        live=args.live,
        count=args.count,
        json_lines=args.output == "json",
        header=sys.stdout.isatty(),
        timeout=args.timeout,
        command=command,
    )


def _run(args: argparse.Namespace) -> int:
    return run_agents(args, [Agent(args.admin, args.admin)], "nodemesh requests")


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    help_text = "recent and live HTTP requests through this node's proxy (like linkerd viz tap)"
    description = (
        f"{help_text}: by default the requests the agent still holds, then new ones as they "
        "finish, until Ctrl-C or --count; --live: only requests that start after the "
        "command; --once: only the held ones."
    )
    p = subparsers.add_parser("requests", help=help_text, description=description)
    p.add_argument(
        "--admin",
        type=admin_address,
        default=DEFAULT_ADMIN,
        metavar="HOST:PORT",
        help=f"the agent's admin API (default {DEFAULT_ADMIN})",
    )
    add_arguments(p)
    p.set_defaults(func=_run)
