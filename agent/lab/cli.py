"""``nodemesh lab``: build, inspect, change and remove a local multi-node lab."""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from agent.admin import tapcli
from agent.base.constants import CA_PORT
from agent.lab import control, logs, netns
from agent.lab.topology import DEFAULT_LAB, DEFAULT_TOPOLOGY, LabError
from agent.policy.warnings import policy_warnings, reach_warnings, service_warnings
from agent.sources.document import DocumentError
from agent.sources.fields import load_yaml_documents


def _seconds(text: str, *, zero: bool, example: str) -> float:
    """A number of seconds for ``--timeout`` (more than 0) or ``--drain-seconds`` (0 or more),
    refused while parsing: a lab built first would only fail later, less clearly ("ca was not
    ready after -1s"), or hand the value to agents that refuse it at start."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a number of seconds, e.g. {example}"
        ) from None
    if not math.isfinite(value) or value < 0 or (value == 0 and not zero):
        least = "0 or more" if zero else "more than 0"
        raise argparse.ArgumentTypeError(f"{text!r}: expected {least} seconds, e.g. {example}")
    return value


_timeout = functools.partial(_seconds, zero=False, example="60")
_drain_seconds = functools.partial(_seconds, zero=True, example="5")


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows
    )


def format_status(st: Mapping[str, Any]) -> str:
    nodes = [["NODE", "NETNS", "IP", "UPLINK", "POD CIDR", "AGENT"]] + [
        [n["name"], n["netns"], n["ip"], n["uplink"], n["podCIDR"], n["agent"]] for n in st["nodes"]
    ]
    pods = [["POD", "NAMESPACE", "NODE", "IP", "SERVICE ACCOUNT", "MESHED", "NETNS"]] + [
        [
            p["name"], p["namespace"], p["node"], p["ip"], p["serviceAccount"],
            "yes" if p["meshed"] else "no", p["netns"],
        ]
        for p in st["pods"]
    ]  # fmt: skip
    ca, prom = st["ca"], st["prometheus"]
    lines = [
        f"lab {st['lab']}  (state {st['stateDir']}, cluster file {st['clusterFile']})",
        "",
        _table(nodes),
        "",
        _table(pods),
        "",
        f"CA: {ca['ip']}:{CA_PORT} in {ca['netns']}: {ca['state']}",
        f"Prometheus: {prom['url']} in {prom['netns']}: {prom['state']}",
    ]
    for svc in st["services"]:
        lines.append(f"service {svc['namespace']}/{svc['name']}: {svc['clusterIP']}")
    return "\n".join(lines)


def _read(path: str) -> tuple[str, str]:
    if path == "-":
        return sys.stdin.read(), "<stdin>"
    try:
        return Path(path).read_text(encoding="utf-8"), path
    except OSError as e:
        raise LabError(f"cannot read {path}: {e.strerror}") from e


def _manifests(path: str) -> list[Mapping[str, Any]]:
    text, source = _read(path)
    docs = load_yaml_documents(text, source=source)
    bad = [i for i, d in enumerate(docs) if not isinstance(d, dict)]
    if bad or not docs:
        raise LabError(
            f"{source}: expected one or more nodemesh.io/v1alpha1 manifests (YAML documents)"
        )
    return docs


def _up(args: argparse.Namespace) -> int:
    text, source = _read(args.file) if args.file else (DEFAULT_TOPOLOGY, "<default topology>")
    control.up(
        args.name, text, source=source, with_components=not args.no_components,
        timeout=args.timeout, drain_seconds=args.drain_seconds,
    )  # fmt: skip
    print(format_status(control.status(args.name)))
    return 0


def _upgrade(args: argparse.Namespace) -> int:
    done = control.upgrade(
        args.name, args.node, timeout=args.timeout, drain_seconds=args.drain_seconds,
        wait=args.wait,
    )  # fmt: skip
    print(
        f"{done.node}: agent {done.new_pid} took over from {done.old_pid}, which "
        + ("has drained and exited" if args.wait else "is draining its open connections")
    )
    return 0


def _down(args: argparse.Namespace) -> int:
    if control.down(args.name):
        print(f"lab {args.name} removed")
    else:
        up = ", ".join(control.labs_up()) or "none"
        print(f"lab {args.name} was not up: nothing to remove (labs up: {up})")
    return 0


def _status(args: argparse.Namespace) -> int:
    if args.node:
        return _agent_status(args)
    st = control.status(args.name)
    print(json.dumps(st, indent=2) if args.json else format_status(st))
    return 0


def _agent_status(args: argparse.Namespace) -> int:
    """``lab status --node N``: ``nodemesh status`` of N's agent (its admin API is loopback in
    the node's namespace)."""
    from agent.admin.cli import format_status as format_agent_status
    from agent.admin.client import DEFAULT_ADMIN, AdminError, request

    _, plan = control.load(args.name)
    nodes = {n.name: n.netns for n in plan.nodes}
    if args.node not in nodes:  # a pod, ca or switch has no agent to ask
        raise LabError(f"no node {args.node!r} in lab {plan.lab}; nodes: {', '.join(nodes)}")
    try:
        st = netns.call_in(nodes[args.node], request, DEFAULT_ADMIN, "/status")
    except AdminError as e:
        print(f"nodemesh lab status --node {args.node}: {e}", file=sys.stderr)
        return 1
    print(json.dumps(st, indent=2) if args.json else format_agent_status(st))
    return 0


def _requests(args: argparse.Namespace) -> int:
    """``lab requests``: ``nodemesh requests`` of every node's agent (or ``--node``'s), merged;
    each agent is read from a thread inside its node's namespace (``agent.admin.tapcli``)."""
    _, plan = control.load(args.name)
    nodes = {n.name: n.netns for n in plan.nodes}
    unknown = [name for name in args.node or () if name not in nodes]
    if unknown:
        raise LabError(f"no node {unknown[0]!r} in lab {plan.lab}; nodes: {', '.join(nodes)}")
    agents = [
        tapcli.Agent(name, tapcli.DEFAULT_ADMIN, functools.partial(netns.enter, nodes[name]))
        for name in args.node or nodes
    ]
    return tapcli.run_agents(args, agents, "nodemesh lab requests")


def _exec(args: argparse.Namespace) -> int:
    command = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not command:
        raise LabError("nothing to run: nodemesh lab exec TARGET -- COMMAND [ARGS...]")
    if command[0] == "nodemesh" and shutil.which("nodemesh") is None:
        command = [sys.executable, "-m", "agent", *command[1:]]  # this nodemesh, venv not on PATH
    _, plan = control.load(args.name)
    target = control.resolve_target(plan, args.target)
    sys.stdout.flush()
    netns.enter(target)
    try:
        os.execvp(command[0], command)
    except OSError as e:
        print(f"nodemesh lab exec: cannot run {command[0]}: {e.strerror}", file=sys.stderr)
        return 127
    return 0  # not reached: execvp replaced this process


def _logs(args: argparse.Namespace) -> int:
    """``lab logs TARGET``: the last ``--tail`` lines of a component's log (``agent.lab.logs``),
    then with ``--follow`` what it appends, until Ctrl-C."""
    labdir, plan = control.load(args.name)
    path = logs.resolve(labdir.logs, [n.name for n in plan.nodes], args.target, plan.lab)
    out = sys.stdout.buffer
    try:
        with open(path, "rb") as f:
            out.write(logs.tail(f, args.tail))
            out.flush()
            if args.follow:

                def write(chunk: bytes) -> None:
                    out.write(chunk)
                    out.flush()

                def wait() -> bool:
                    time.sleep(FOLLOW_POLL)
                    return True

                logs.follow(f, write, wait)
    except FileNotFoundError as e:
        raise LabError(f"{args.target} has written no log yet ({path})") from e
    except KeyboardInterrupt:
        pass
    return 0


FOLLOW_POLL = 0.5  # seconds between looks at a followed log (as tail -f's default of 1 s, halved)


def _annotate(args: argparse.Namespace) -> int:
    print(control.annotate(args.name, args.pod, args.changes))
    return 0


def _apply(args: argparse.Namespace) -> int:
    manifests = _manifests(args.file)
    source = "<stdin>" if args.file == "-" else args.file
    for line in control.apply(args.name, manifests, source=source):
        print(line)
    doc = control.labdir_of(args.name).read_cluster()
    pods = [{"namespace": p.namespace, "labels": p.labels} for n in doc.nodes for p in n.pods]
    services = {(s.namespace, s.name) for s in doc.services}
    for i, m in enumerate(manifests, 1):
        spec = m.get("spec")
        if not isinstance(spec, Mapping):
            continue
        kind, meta = str(m.get("kind")), m.get("metadata") or {}
        namespace = meta.get("namespace") or "default"
        if kind == "Service":
            warnings = service_warnings(spec)
        else:
            warnings = policy_warnings(kind, spec, trust_domain=doc.trust_domain)
            warnings += reach_warnings(namespace, spec, pods, services)
        what = f"{kind} {namespace}/{meta.get('name')}"
        for warning in warnings:
            print(
                f"nodemesh lab: warning: {source}: document {i} ({what}): {warning.message}",
                file=sys.stderr,
            )
    return 0


def _delete(args: argparse.Namespace) -> int:
    manifests = _manifests(args.file)
    for line in control.delete(args.name, manifests):
        print(line)
    return 0


def _guarded(func: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Known failures become one readable message and exit status 1, not a traceback."""

    def run(args: argparse.Namespace) -> int:
        try:
            return func(args)
        except (LabError, DocumentError) as e:
            print(f"nodemesh lab: error: {e}", file=sys.stderr)
            return 1
        except PermissionError as e:  # the usual first command: `nodemesh lab up` without sudo
            print(
                f"nodemesh lab: error: {e.filename or 'the lab'}: {e.strerror or e}; the lab needs "
                "root (it builds network namespaces and keeps its state in /run/nodemesh/lab): "
                "run it as root, e.g. sudo .venv/bin/nodemesh lab ...",
                file=sys.stderr,
            )
            return 1

    return run


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--name",
        default=os.environ.get("NODEMESH_LAB", DEFAULT_LAB),
        help="lab name: 1-8 lowercase letters/digits (default $NODEMESH_LAB or %(default)s)",
    )
    lab = subparsers.add_parser(
        "lab", help="a multi-node lab of network namespaces on this machine"
    )
    sub = lab.add_subparsers(dest="lab_command", metavar="LAB_COMMAND", required=True)

    def add(
        name: str, func: Callable[[argparse.Namespace], int], help: str
    ) -> argparse.ArgumentParser:
        p = sub.add_parser(name, parents=[common], help=help, description=help)
        p.set_defaults(func=_guarded(func))
        return p

    p = add("up", _up, "build the lab and start the mesh components that exist")
    p.add_argument("-f", "--file", help="topology (cluster document) YAML; default: built-in")
    p.add_argument("--no-components", action="store_true", help="namespaces only: no CA, no agents")
    p.add_argument(
        "--timeout",
        type=_timeout,
        default=60.0,
        help="readiness wait per component (s, default 60)",
    )
    p.add_argument(
        "--drain-seconds",
        type=_drain_seconds,
        help="the agents' --drain-seconds (default: the agent's)",
    )
    p = add(
        "upgrade",
        _upgrade,
        "replace a node's agent by a new one without dropping its connections",
    )
    p.add_argument("node", help="node name, e.g. node1")
    p.add_argument(
        "--timeout", type=_timeout, default=60.0, help="wait for the takeover (s, default 60)"
    )
    p.add_argument(
        "--drain-seconds",
        type=_drain_seconds,
        help="the new agent's --drain-seconds (the old one drains with its own; an hour is fine)",
    )
    p.add_argument("--wait", action="store_true", help="also wait until the old agent has exited")
    add("down", _down, "remove everything the lab created (idempotent)")
    p = add("status", _status, "nodes, pods, IPs and mesh state")
    p.add_argument("--json", action="store_true", help="the documented, stable JSON shape")
    p.add_argument("--node", help="instead: this node's agent status (nodemesh status)")
    p = add("requests", _requests, "recent and live HTTP requests of the lab's agents")
    p.add_argument(
        "--node", action="append", help="only this node's agent (repeatable; default: every node)"
    )
    tapcli.add_arguments(p)
    p = add("exec", _exec, "run a command in a pod's or node's network namespace")
    p.add_argument("target", help="pod (name or namespace/name), node, ca or switch")
    p.add_argument("cmd", nargs=argparse.REMAINDER, help="-- COMMAND [ARGS...]")
    p = add("logs", _logs, "a component's log: a node's agent, ca, prometheus, a pod's server")
    p.add_argument(
        "target", help="node name (its agent), ca, prometheus, or a pod whose server logs here"
    )
    p.add_argument(
        "--tail", type=int, metavar="N", help="only the last N lines (default, or -1: all)"
    )
    p.add_argument("-f", "--follow", action="store_true", help="then print what it appends")
    p = add("annotate", _annotate, "set (KEY=VALUE) or remove (KEY-) pod annotations")
    p.add_argument("pod", help="pod name or namespace/name")
    p.add_argument(
        "changes",
        nargs="+",
        metavar="KEY=VALUE|KEY-",
        help="e.g. nodemesh.io/mesh=enabled, nodemesh.io/http-ports=8080, nodemesh.io/mesh-",
    )
    p = add(
        "apply",
        _apply,
        "create or replace nodemesh.io/v1alpha1 policies, Gateway API routes and v1 Services",
    )
    p.add_argument("-f", "--file", required=True, help="YAML file of manifests ('-' for stdin)")
    p = add(
        "delete",
        _delete,
        "delete nodemesh.io/v1alpha1 policies, Gateway API routes and v1 Services",
    )
    p.add_argument("-f", "--file", required=True, help="YAML file of manifests ('-' for stdin)")
