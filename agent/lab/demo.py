"""``make demo``: build the lab, walk through what the mesh does today, and clean up.

The tour is a list of steps; each takes the running lab and returns the lines it wants to show,
or raises ``StepFailed``. A capability that lands later (mTLS identities, a policy that denies
traffic, metrics) adds its step to ``STEPS``; nothing else changes. The demo exits non-zero if any
step fails, and with ``--keep`` leaves the lab up and says how to explore it.
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from agent.base.constants import ADMIN_PORT, METRICS_PORT
from agent.lab.cli import format_status
from agent.lab.handle import Lab
from agent.lab.netns import call_in
from agent.lab.topology import DEFAULT_LAB, LabError
from agent.sources.document import DocumentError

ECHO_PORT = 8080
# Answers each connection with who it saw connecting: the source address the pod observed.
ECHO_SERVER = f"""
import socket
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("0.0.0.0", {ECHO_PORT}))
srv.listen()
while True:
    conn, peer = srv.accept()
    conn.recv(1024)
    conn.sendall(peer[0].encode())
    conn.close()
"""


class StepFailed(Exception):
    """A demo step did not show what it should; the message says what happened instead."""


@dataclass(frozen=True)
class Step:
    title: str
    run: Callable[[Lab], list[str]]


def _wait_listening(lab: Lab, pod: str, timeout: float = 15.0) -> None:
    def probe() -> None:
        socket.create_connection(("127.0.0.1", ECHO_PORT), timeout=2).close()

    deadline = time.monotonic() + timeout
    while True:
        try:
            call_in(lab.netns(pod), probe)
            return
        except OSError as e:
            if time.monotonic() > deadline:
                raise StepFailed(f"the echo server in {pod} did not listen: {e}") from e
            time.sleep(0.1)


def _request(lab: Lab, client: str, server: str) -> str:
    """Connect from ``client`` to ``server``'s pod IP; the peer address the server saw."""
    ip = lab.pod(server)["ip"]

    def once() -> str:
        with socket.create_connection((ip, ECHO_PORT), timeout=5) as s:
            s.sendall(b"hello")
            return s.recv(1024).decode()

    try:
        seen = call_in(lab.netns(client), once)
    except OSError as e:
        raise StepFailed(f"{client} -> {server} ({ip}:{ECHO_PORT}) failed: {e}") from e
    if not seen:
        raise StepFailed(f"{client} -> {server} ({ip}:{ECHO_PORT}): connection closed, no answer")
    return seen


# The echo servers the demo started, by pod (a step may stop and restart one by its PID).
_servers: dict[str, subprocess.Popen[bytes]] = {}


def _start_echo(lab: Lab, pod: str) -> None:
    _servers[pod] = lab.popen(pod, sys.executable, "-c", ECHO_SERVER)
    _wait_listening(lab, pod)


def start_servers(lab: Lab) -> list[str]:
    lines = []
    for pod in ("server-0", "server-1", "client"):
        _start_echo(lab, pod)
        lines.append(f"echo server listening in {pod} ({lab.pod(pod)['ip']}:{ECHO_PORT})")
    return lines


def _connectivity(pairs: list[tuple[str, str]]) -> Callable[[Lab], list[str]]:
    def run(lab: Lab) -> list[str]:
        lines = []
        for client, server in pairs:
            seen = _request(lab, client, server)
            src, dst = lab.pod(client), lab.pod(server)
            lines.append(
                f"{client} ({src['node']}, {src['ip']}) -> {server} ({dst['node']}, {dst['ip']}): "
                f"answered, the server saw {seen}"
            )
        return lines

    return run


def _node_cli(lab: Lab, node: str, *args: str) -> str:
    """Run ``nodemesh <args>`` in ``node``'s namespace (its agent's admin API is on loopback)."""
    out = lab.exec(node, sys.executable, "-m", "agent", *args, capture_output=True, text=True)
    if out.returncode != 0:
        raise StepFailed(f"nodemesh {' '.join(args)} on {node}: {out.stderr.strip()}")
    return out.stdout


def mtls_identities(lab: Lab) -> list[str]:
    """A live connection client -> server-0, as both agents' admin APIs show it."""
    ip = lab.pod("server-0")["ip"]
    box: dict[str, socket.socket] = {}

    def connect() -> None:  # the echo server waits for a request: the connection stays open
        box["sock"] = socket.create_connection((ip, ECHO_PORT), timeout=5)

    call_in(lab.netns("client"), connect)
    try:
        lines = []
        for node, direction in (("node1", "outbound"), ("node2", "inbound")):
            deadline = time.monotonic() + 5
            while True:
                conns = json.loads(_node_cli(lab, node, "connections", "-o", "json"))
                live = [c for c in conns["connections"] if c["direction"] == direction]
                if live or time.monotonic() > deadline:
                    break
                time.sleep(0.1)
            if not live:
                raise StepFailed(f"{node}'s admin API lists no {direction} connection")
            c = live[0]
            lines.append(
                f"{node} {direction}: {c['source_identity']} -> {c['destination_identity']} "
                f"({c['security']}, path {c['path']})"
            )
        return lines
    finally:
        box["sock"].close()


def policy_denial(lab: Lab) -> list[str]:
    """A DENY on the client's identity refuses client -> server-0; neighbor still passes."""
    manifest = {
        "apiVersion": "nodemesh.io/v1alpha1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": "demo-deny-client", "namespace": "default"},
        "spec": {
            "selector": {"matchLabels": {"app": "server"}},
            "action": "DENY",
            "rules": [
                {"from": [{"source": {"principals": ["cluster.local/ns/default/sa/client"]}}]}
            ],
        },
    }
    lab.apply(manifest)
    try:
        # Wait until node2's agent has the policy: a request racing the reload could be admitted
        # and then closed mid-way (live connections are re-checked), killing the echo server.
        deadline = time.monotonic() + 10
        while "demo-deny-client" not in _node_cli(lab, "node2", "policies", "-o", "json"):
            if time.monotonic() > deadline:
                raise StepFailed("node2's agent did not load the policy within 10s")
            time.sleep(0.2)
        try:
            seen = _request(lab, "client", "server-0")
        except StepFailed as e:
            refused = str(e)
        else:
            raise StepFailed(f"client -> server-0 still answered ({seen}) under the DENY")
        log = (lab.state_dir / "logs" / "agent-node2.log").read_text().splitlines()
        why = next((line for line in reversed(log) if "rejected (policy_denied)" in line), "")
        neighbor = _request(lab, "neighbor", "server-0")
        return [
            "applied AuthorizationPolicy default/demo-deny-client (DENY principal .../sa/client)",
            f"client -> server-0 refused: {refused.split(': ', 1)[-1]}",
            f"node2 agent: {why.split(': ', 1)[-1]}",
            f"neighbor -> server-0 still answered, the server saw {neighbor}",
        ]
    finally:
        lab.delete(manifest)
        deadline = time.monotonic() + 10  # the next steps need the client admitted again
        while "demo-deny-client" in _node_cli(lab, "node2", "policies", "-o", "json"):
            if time.monotonic() > deadline:
                raise StepFailed("node2's agent still has the policy 10s after its deletion")
            time.sleep(0.2)


def _metrics_excerpt(lab: Lab, node: str) -> list[str]:
    """Istio TCP metrics of ``node``'s agent, one line per series with its key labels."""
    from urllib.request import urlopen

    from prometheus_client.parser import text_string_to_metric_families

    def scrape() -> str:
        with urlopen(
            f"http://{lab.node(node)['ip']}:{METRICS_PORT}/metrics", timeout=5
        ) as response:
            return str(response.read().decode())

    lines = []
    for family in text_string_to_metric_families(call_in(lab.netns(node), scrape)):
        for sample in family.samples:
            if sample.name.startswith("istio_tcp") and sample.name.endswith("_total"):
                lb = sample.labels
                lines.append(
                    f"{sample.name}{{reporter={lb['reporter']}, "
                    f"{lb['source_workload']} -> {lb['destination_workload']}, "
                    f"{lb['connection_security_policy']}, flags={lb['response_flags']}}} "
                    f"{sample.value:.0f}"
                )
    return lines


def _live_table(lab: Lab, ip: str, box: dict[str, socket.socket]) -> str:
    """Open client -> ``ip`` (kept in ``box``) until node1 lists it; a policy just deleted
    may still refuse the first attempts while the agents reload."""

    def connect() -> None:  # the echo server waits for a request: the connection stays open
        box["sock"] = socket.create_connection((ip, ECHO_PORT), timeout=5)

    deadline = time.monotonic() + 10
    while True:
        call_in(lab.netns("client"), connect)
        for _ in range(10):
            table = _node_cli(lab, "node1", "connections")
            if table.startswith("DIR"):
                return table
            time.sleep(0.1)
        box.pop("sock").close()
        if time.monotonic() > deadline:
            raise StepFailed(f"node1 lists no live connection: {table.strip()}")


def telemetry(lab: Lab) -> list[str]:
    """A live connection in node1's connection table, and node1's Istio TCP metrics."""
    box: dict[str, socket.socket] = {}
    try:
        table = _live_table(lab, lab.pod("server-0")["ip"], box)
        excerpt = _metrics_excerpt(lab, "node1")
        if not excerpt:
            raise StepFailed("node1's /metrics has no istio_tcp_* series after the traffic above")
        return [
            "nodemesh connections (node1):",
            *table.rstrip().splitlines(),
            f"metrics excerpt (node1 :{METRICS_PORT}/metrics):",
            *excerpt,
        ]
    finally:
        if "sock" in box:
            box["sock"].close()


def _traffic(lab: Lab, node: str) -> dict[str, Any]:
    """``GET /traffic`` of ``node``'s agent (traffic control: policies, endpoint health)."""
    from urllib.request import urlopen

    def get() -> dict[str, Any]:
        with urlopen(f"http://127.0.0.1:{ADMIN_PORT}/traffic", timeout=5) as response:
            return dict(json.loads(response.read()))

    return call_in(lab.netns(node), get)


def ejection(lab: Lab) -> list[str]:
    """server-1 stops answering; retries hide it from the client and the agent ejects it."""
    manifest = {
        "apiVersion": "nodemesh.io/v1alpha1",
        "kind": "TrafficPolicy",
        "metadata": {"name": "demo-resilience", "namespace": "default"},
        "spec": {
            "targetRef": {"kind": "Service", "name": "server"},
            "loadBalancer": {"type": "ROUND_ROBIN"},
            "outlierDetection": {"consecutiveFailures": 2, "baseEjectionTime": "30s"},
            "retries": {"attempts": 2},
        },
    }
    vip = next(s for s in lab.status()["services"] if s["name"] == "server")["clusterIP"]
    lab.apply(manifest)
    proc = _servers.pop("server-1")
    proc.kill()
    proc.wait()
    try:
        deadline = time.monotonic() + 10
        while "default/server" not in _traffic(lab, "node1")["effective"]:
            if time.monotonic() > deadline:
                raise StepFailed("node1's agent did not pick up TrafficPolicy demo-resilience")
            time.sleep(0.1)

        def ask() -> bool:
            try:
                with socket.create_connection((vip, 80), timeout=5) as s:
                    s.sendall(b"hello")
                    return bool(s.recv(1024))
            except OSError:
                return False

        answered = sum(call_in(lab.netns("client"), ask) for _ in range(20))
        state = _traffic(lab, "node1")["services"]["default/server"]
        server_1 = lab.pod("server-1")["ip"]
        health = next(e for e in state["endpoints"] if e["ip"] == server_1)
        if answered != 20 or health["state"] != "EJECTED":
            raise StepFailed(f"{answered}/20 answered; server-1 is {health['state']}")
        return [
            "applied TrafficPolicy default/demo-resilience (round robin, eject after 2 "
            "consecutive failures, 2 retries)",
            "stopped the echo server in server-1: its port refuses connections",
            f"client -> Service server ({vip}:80): {answered}/20 connections answered",
            f"node1 agent /traffic: server-1 ({server_1}) {health['state']} for "
            f"{health['ejected_for']:.0f}s; refused attempts "
            f"{state['counters'].get('failed_refused', 0)}, retried on server-0 "
            f"{state['counters'].get('retries', 0)} times",
        ]
    finally:
        lab.delete(manifest)
        _start_echo(lab, "server-1")


STEPS: list[Step] = [
    Step("start echo servers in three pods", start_servers),
    Step(
        "pod-to-pod TCP across nodes",
        _connectivity([("client", "server-0"), ("client", "server-1")]),
    ),
    Step("pod-to-pod TCP on the same node", _connectivity([("neighbor", "client")])),
    Step("a pod outside the mesh reaches a meshed pod", _connectivity([("outsider", "server-0")])),
    Step("mTLS: the identities of a live connection (admin API)", mtls_identities),
    Step("a policy denial", policy_denial),
    Step("telemetry: live connections and Istio TCP metrics", telemetry),
    Step("traffic control: a failing replica is ejected, retries hide it", ejection),
]


def run_tour(lab: Lab, steps: list[Step]) -> bool:
    ok = True
    for i, step in enumerate(steps, 1):
        print(f"\n[{i}/{len(steps)}] {step.title}")
        try:
            for line in step.run(lab):
                print(f"      {line}")
            print("      ok")
        except StepFailed as e:
            ok = False
            print(f"      FAILED: {e}")
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m agent.lab.demo", description=__doc__)
    parser.add_argument("--keep", action="store_true", help="leave the lab up afterwards")
    parser.add_argument("--name", default=DEFAULT_LAB, help="lab name (default %(default)s)")
    args = parser.parse_args(argv)
    print(f"nodemesh demo: building lab {args.name} (2 nodes, 5 pods) and its mesh components")
    try:
        lab = Lab.up(args.name)
    except (LabError, DocumentError) as e:
        print(f"nodemesh demo: error: {e}", file=sys.stderr)
        return 1
    try:
        print()
        print(format_status(lab.status()))
        ok = run_tour(lab, STEPS)
        print("\nsummary: " + ("every step passed" if ok else "some steps FAILED (see above)"))
    finally:
        if not args.keep:
            lab.down()
            print(f"lab {args.name} removed (make demo KEEP=1 leaves it up)")
    if args.keep:
        print(
            f"\nthe lab is still up. Explore it:\n"
            f"  .venv/bin/nodemesh lab status --name {args.name}\n"
            f"  .venv/bin/nodemesh lab exec --name {args.name} client -- ip addr\n"
            f"  .venv/bin/nodemesh lab exec --name {args.name} node1 -- ip route\n"
            f"  .venv/bin/nodemesh lab down --name {args.name}"
        )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
