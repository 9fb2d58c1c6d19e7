"""``make demo``: build the lab, walk through what the mesh does today, and clean up.

The tour is a list of steps; each takes the running lab and returns the lines it wants to show,
or raises ``StepFailed``. A capability that lands later (mTLS identities, a policy that denies
traffic, metrics) adds its step to ``STEPS``; nothing else changes. The demo exits non-zero if any
step fails, and with ``--keep`` leaves the lab up and says how to explore it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from agent.base.constants import ADMIN_PORT, METRICS_PORT
from agent.lab.cli import format_status
from agent.lab.handle import Lab
from agent.lab.netns import call_in
from agent.lab.topology import DEFAULT_LAB, LabError
from agent.sources.document import DocumentError

if TYPE_CHECKING:
    from prometheus_client.samples import Sample

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

WEB_PORT = 9080  # the server pods' port behind Service web, declared HTTP (the default topology)
# HTTP/1.1 keep-alive: every request is answered with the pod's name (argv[1]); with a second
# argument ``flaky``, requests to /flaky* get 503 (the retry step). One line per request on
# stderr, the pod's log in the lab (``nodemesh lab logs <pod>``); a connection the peer reset
# (the retry step resets sessions after a 503 head) is one line too, not a traceback.
WEB_SERVER = f"""
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
FLAKY = sys.argv[2:] == ["flaky"]
class Server(ThreadingHTTPServer):
    def handle_error(self, request, client_address):
        print(f"{{client_address[0]}}: connection ended: {{sys.exc_info()[1]!r}}", file=sys.stderr)
class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers, body: two writes; no delayed-ACK stall
    def reply(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        body = sys.argv[1].encode()
        self.send_response(503 if FLAKY and self.path.startswith("/flaky") else 200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    do_GET = do_POST = reply
Server(("0.0.0.0", {WEB_PORT}), Handler).serve_forever()
"""


class StepFailed(Exception):
    """A demo step did not show what it should; the message says what happened instead."""


@dataclass(frozen=True)
class Step:
    title: str
    run: Callable[[Lab], list[str]]


def _wait_listening(lab: Lab, pod: str, port: int = ECHO_PORT, timeout: float = 15.0) -> None:
    def probe() -> None:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()

    deadline = time.monotonic() + timeout
    while True:
        try:
            call_in(lab.netns(pod), probe)
            return
        except OSError as e:
            if time.monotonic() > deadline:
                raise StepFailed(f"the server in {pod} did not listen on {port}: {e}") from e
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


def _deny_on_servers(name: str, rule: dict[str, Any]) -> dict[str, Any]:
    """An AuthorizationPolicy ``name`` that DENYs what ``rule`` matches on the server pods."""
    return {
        "apiVersion": "nodemesh.io/v1alpha1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "selector": {"matchLabels": {"app": "server"}},
            "action": "DENY",
            "rules": [rule],
        },
    }


def policy_denial(lab: Lab) -> list[str]:
    """A DENY on the client's identity refuses client -> server-0; neighbor still passes."""
    manifest = _deny_on_servers(
        "demo-deny-client",
        {"from": [{"source": {"principals": ["cluster.local/ns/default/sa/client"]}}]},
    )
    lab.apply(manifest)
    try:
        # Wait until node2's agent has the policy: a request racing the reload could be admitted
        # and then closed mid-way (live connections are re-checked), killing the echo server.
        _await_policy(lab, "demo-deny-client", loaded=True)
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
        _await_policy(lab, "demo-deny-client", loaded=False)  # the next steps need the client


def _await_policy(lab: Lab, name: str, *, loaded: bool, timeout: float = 10.0) -> None:
    """Wait until node2's agent has (``loaded``) or no longer has policy ``name``."""
    deadline = time.monotonic() + timeout
    while (name in _node_cli(lab, "node2", "policies", "-o", "json")) != loaded:
        if time.monotonic() > deadline:
            state = "load" if loaded else "drop"
            raise StepFailed(f"node2's agent did not {state} policy {name} within {timeout:.0f}s")
        time.sleep(0.2)


def _samples(lab: Lab, node: str) -> list[Sample]:
    """Every sample of ``node``'s agent's ``/metrics``."""
    from urllib.request import urlopen

    from prometheus_client.parser import text_string_to_metric_families

    def scrape() -> str:
        with urlopen(
            f"http://{lab.node(node)['ip']}:{METRICS_PORT}/metrics", timeout=5
        ) as response:
            return str(response.read().decode())

    families = text_string_to_metric_families(call_in(lab.netns(node), scrape))
    return [sample for family in families for sample in family.samples]


def _metrics_excerpt(lab: Lab, node: str) -> list[str]:
    """Istio TCP metrics of ``node``'s agent, one line per series with its key labels."""
    lines = []
    for sample in _samples(lab, node):
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


# One curl connection to Service web: (method, path, the status the DENY below makes it get).
HTTP_CALLS = (
    ("GET", "/orders", "200"),
    ("POST", "/orders", "200"),
    ("POST", "/admin/users", "403"),
    ("GET", "/admin/users", "200"),
    ("POST", "/admin", "403"),
    ("GET", "/healthz", "200"),
)


def _curl(lab: Lab, calls: list[list[str]]) -> list[tuple[str, str, str]]:
    """One curl invocation from the client pod (one keep-alive connection), one request per
    entry of ``calls`` (curl arguments: method, headers, URL): per request the body, the status
    and how many connections curl opened for it (0: it reused the connection)."""
    args: list[str] = []
    for i, call in enumerate(calls):
        args += ["--next"] if i else []
        args += [*call, "-w", " %{http_code} %{num_connects}\\n"]
    out = lab.exec(
        "client", "curl", "-sS", "--max-time", "10", *args, capture_output=True, text=True
    )
    if out.returncode != 0:
        raise StepFailed(f"curl {calls[0][-1]}: {out.stderr.strip()}")
    results = []
    for line in out.stdout.splitlines():
        body, status, connects = line.rsplit(" ", 2)
        results.append((body, status, connects))
    return results


def _curl_one_connection(lab: Lab, url: str) -> list[tuple[str, str, str]]:
    """``HTTP_CALLS`` on one connection (``_curl``)."""
    return _curl(
        lab,
        [
            ["-X", method, *(["--data", "payload"] if method == "POST" else []), url + path]
            for method, path, _ in HTTP_CALLS
        ],
    )


def _request_counts(lab: Lab) -> dict[tuple[str, str], float]:
    """node2's ``istio_requests_total{reporter="destination"}`` by (response code, flags)."""
    counts: dict[tuple[str, str], float] = {}
    for sample in _samples(lab, "node2"):
        lb = sample.labels
        if sample.name == "istio_requests_total" and lb["reporter"] == "destination":
            key = (lb["response_code"], lb["response_flags"])
            counts[key] = counts.get(key, 0.0) + sample.value
    return counts


def http_requests(lab: Lab) -> list[str]:
    """HTTP/1.1 requests to Service web over one keep-alive connection, with an L7 DENY on
    ``POST /admin*``: per-request outcomes and node2's Istio request metrics."""
    if shutil.which("curl") is None:
        raise StepFailed("curl is not installed: run scripts/setup.sh (debian-packages.txt)")
    for pod, *flaky in (("server-0",), ("server-1", "flaky")):
        with open(lab.state_dir / "logs" / f"{pod}.log", "ab") as log:  # nodemesh lab logs POD
            _servers[f"{pod}-web"] = lab.popen(
                pod, sys.executable, "-c", WEB_SERVER, pod, *flaky, stdout=log, stderr=log
            )
        _wait_listening(lab, pod, WEB_PORT)
    operation = {"methods": ["POST"], "paths": ["/admin*"], "ports": [str(WEB_PORT)]}
    manifest = _deny_on_servers("demo-deny-admin-posts", {"to": [{"operation": operation}]})
    vip = next(s for s in lab.status()["services"] if s["name"] == "web")["clusterIP"]
    lab.apply(manifest)
    try:
        _await_policy(lab, "demo-deny-admin-posts", loaded=True)
        before = _request_counts(lab)
        results = _curl_one_connection(lab, f"http://{vip}")
        want = [status for _, _, status in HTTP_CALLS]
        if [status for _, status, _ in results] != want:
            raise StepFailed(f"statuses {[r[1] for r in results]}, expected {want}")
        if [n for _, _, n in results] != ["1"] + ["0"] * (len(HTTP_CALLS) - 1):
            raise StepFailed(f"curl did not keep one connection: {[r[2] for r in results]}")
        expected = {
            ("200", "-"): float(want.count("200")),
            ("403", "RBAC"): float(want.count("403")),
        }
        deadline = time.monotonic() + 5  # the agent counts a request once its response is out
        while True:
            after = _request_counts(lab)
            seen = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in expected}
            if seen == expected or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        if seen != expected:
            raise StepFailed(f"node2 counted {seen} requests, expected {expected}")
        lines = [
            "applied AuthorizationPolicy default/demo-deny-admin-posts "
            f"(DENY POST /admin* on port {WEB_PORT})",
            f"client -> Service web ({vip}:80), {len(HTTP_CALLS)} requests on one keep-alive "
            "connection (curl):",
        ]
        for (method, path, _), (body, status, connects) in zip(HTTP_CALLS, results, strict=True):
            how = "new connection" if connects == "1" else "same connection"
            lines.append(f"  {method:<4} {path:<12} -> {status} {body!r} ({how})")
        lines.append(f'node2 istio_requests_total{{reporter="destination"}} (:{METRICS_PORT}):')
        for sample in _samples(lab, "node2"):
            lb = sample.labels
            if sample.name == "istio_requests_total" and lb["reporter"] == "destination":
                lines.append(
                    f"  {{{lb['source_workload']} -> {lb['destination_workload']}, "
                    f"{lb['destination_service']}, protocol={lb['request_protocol']}, "
                    f"code={lb['response_code']}, flags={lb['response_flags']}}} "
                    f"{sample.value:.0f}"
                )
        return lines
    finally:
        lab.delete(manifest)
        _await_policy(lab, "demo-deny-admin-posts", loaded=False)


CANARY_REQUESTS = 40  # per batch, on one curl connection
CANARY_WEIGHTS = (75, 25)  # web-v1, web-v2


def _version_service(name: str, version: str) -> dict[str, Any]:
    port = {"port": 80, "targetPort": WEB_PORT, "name": "http", "appProtocol": "http"}
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"selector": {"app": "server", "version": version}, "ports": [port]},
    }


CANARY_ROUTE: dict[str, Any] = {
    "apiVersion": "gateway.networking.k8s.io/v1",
    "kind": "HTTPRoute",
    "metadata": {"name": "demo-canary", "namespace": "default"},
    "spec": {
        "parentRefs": [{"group": "", "kind": "Service", "name": "web", "port": 80}],
        "rules": [
            {
                "matches": [{"headers": [{"name": "x-canary", "value": "true"}]}],
                "backendRefs": [{"name": "web-v2", "port": 80}],
            },
            {
                "backendRefs": [
                    {"name": "web-v1", "port": 80, "weight": CANARY_WEIGHTS[0]},
                    {"name": "web-v2", "port": 80, "weight": CANARY_WEIGHTS[1]},
                ]
            },
        ],
    },
}


def _answered_by(lab: Lab, url: str, n: int, *extra: str) -> dict[str, int]:
    """``n`` GETs on one curl connection: how many each pod answered (all must be 200)."""
    counts: dict[str, int] = {}
    for body, status, _ in _curl(lab, [[*extra, f"{url}/{i}"] for i in range(n)]):
        if status != "200":
            raise StepFailed(f"a request to {url} got {status}: {body!r}")
        counts[body] = counts.get(body, 0) + 1
    return counts


def canary(lab: Lab) -> list[str]:
    """A Gateway API HTTPRoute on Service web: ``x-canary: true`` goes to v2 (server-1), the
    rest is split 75/25 between v1 (server-0) and v2, request by request on one connection."""
    services = [_version_service("web-v1", "v1"), _version_service("web-v2", "v2")]
    vip = next(s for s in lab.status()["services"] if s["name"] == "web")["clusterIP"]
    url = f"http://{vip}/shop"
    lab.apply([*services, CANARY_ROUTE])
    try:
        deadline = time.monotonic() + 15  # node1's agent has the route once v2 gets them all
        while True:
            flagged = _answered_by(lab, url, 10, "-H", "x-canary: true")
            if flagged == {"server-1": 10}:
                break
            if time.monotonic() > deadline:
                raise StepFailed(f"x-canary requests went to {flagged}, not all to server-1")
            time.sleep(0.5)
        split = _answered_by(lab, url, CANARY_REQUESTS)
        v2 = split.get("server-1", 0)
        expected = CANARY_REQUESTS * CANARY_WEIGHTS[1] / sum(CANARY_WEIGHTS)
        sigma = (expected * (1 - CANARY_WEIGHTS[1] / sum(CANARY_WEIGHTS))) ** 0.5
        if abs(v2 - expected) > 4 * sigma:
            raise StepFailed(f"v2 got {v2} of {CANARY_REQUESTS}, expected {expected:.0f}")
        return [
            "applied Services web-v1 (server-0), web-v2 (server-1) and HTTPRoute "
            "default/demo-canary on Service web:",
            "  x-canary: true -> web-v2; everything else -> web-v1 75 / web-v2 25",
            f"client -> Service web ({vip}:80), one keep-alive connection each (curl):",
            f"  10 requests with x-canary: true -> {flagged}",
            f"  {CANARY_REQUESTS} requests without it -> server-0 {split.get('server-0', 0)}, "
            f"server-1 {v2} (expected {expected:.0f} +- {2 * sigma:.0f})",
        ]
    finally:
        lab.delete([CANARY_ROUTE, *services])


RETRY_REQUESTS = 20
RETRY_ROUTE: dict[str, Any] = {
    "apiVersion": "gateway.networking.k8s.io/v1",
    "kind": "HTTPRoute",
    "metadata": {"name": "demo-retry", "namespace": "default"},
    "spec": {
        "parentRefs": [{"group": "", "kind": "Service", "name": "web", "port": 80}],
        "rules": [
            {
                "backendRefs": [{"name": "web", "port": 80}],
                "retry": {"attempts": 2, "codes": [503], "backoff": "10ms"},
            }
        ],
    },
}
# Round robin and no ejection, so that server-1 keeps getting first tries in both batches.
ROUND_ROBIN_WEB: dict[str, Any] = {
    "apiVersion": "nodemesh.io/v1alpha1",
    "kind": "TrafficPolicy",
    "metadata": {"name": "demo-round-robin", "namespace": "default"},
    "spec": {
        "targetRef": {"kind": "Service", "name": "web"},
        "loadBalancer": {"type": "ROUND_ROBIN"},
        "outlierDetection": {"maxEjectionPercent": 0},
    },
}


def _statuses(lab: Lab, url: str, n: int) -> dict[str, int]:
    """``n`` GETs on one curl connection: how many got each status."""
    counts: dict[str, int] = {}
    for _, status, _ in _curl(lab, [[f"{url}/{i}"] for i in range(n)]):
        counts[status] = counts.get(status, 0) + 1
    return counts


def _retries(lab: Lab) -> float:
    return sum(
        s.value
        for s in _samples(lab, "node1")
        if s.name == "nodemesh_http_retries_total" and s.labels.get("outcome") == "attempted"
    )


def http_retry(lab: Lab) -> list[str]:
    """server-1 answers 503 on /flaky: without a route the client sees those 503s; with an
    HTTPRoute ``retry`` on 503, node1's agent sends each such request again to server-0."""
    vip = next(s for s in lab.status()["services"] if s["name"] == "web")["clusterIP"]
    url = f"http://{vip}/flaky"
    lab.apply(ROUND_ROBIN_WEB)
    try:
        deadline = time.monotonic() + 10
        while "default/web" not in _traffic(lab, "node1")["effective"]:
            if time.monotonic() > deadline:
                raise StepFailed("node1's agent did not pick up TrafficPolicy demo-round-robin")
            time.sleep(0.1)
        bare = _statuses(lab, url, RETRY_REQUESTS)
        if bare.get("503", 0) == 0:
            raise StepFailed(f"without a retry no request met server-1's 503: {bare}")
        lab.apply(RETRY_ROUTE)
        try:
            deadline = time.monotonic() + 15
            while True:  # node1's agent has the route once a batch sees no 503
                before = _retries(lab)
                routed = _statuses(lab, url, RETRY_REQUESTS)
                if routed == {"200": RETRY_REQUESTS}:
                    break
                if time.monotonic() > deadline:
                    raise StepFailed(f"with the retry route: {routed}")
                time.sleep(0.5)
            retried = _retries(lab) - before
        finally:
            lab.delete(RETRY_ROUTE)
    finally:
        lab.delete(ROUND_ROBIN_WEB)
    return [
        "server-1 answers 503 on /flaky; TrafficPolicy default/demo-round-robin: round robin",
        f"client -> Service web ({vip}:80) /flaky, {RETRY_REQUESTS} requests on one connection:",
        f"  no route: {bare}",
        "  HTTPRoute default/demo-retry (retry: attempts 2, codes [503]): "
        f"{routed}, node1 retried {retried:.0f} of them "
        '(nodemesh_http_retries_total{outcome="attempted"})',
    ]


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


def central_view(lab: Lab) -> list[str]:
    """``nodemesh stat`` per Service from the lab's Prometheus, once it has scraped the HTTP
    step's requests (a 2 s scrape interval: a few seconds at most)."""
    argv = [sys.executable, "-m", "agent", "stat", "service", "--lab", lab.name, "--window", "5m"]
    deadline = time.monotonic() + 20
    while True:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
        if done.returncode != 0:
            raise StepFailed(f"nodemesh stat failed: {done.stderr.strip() or done.stdout.strip()}")
        table = done.stdout.splitlines()
        if len(table) > 2 and table[1].split()[1:2] == ["REQ/S"]:
            break
        if time.monotonic() > deadline:
            raise StepFailed(f"no request figures in Prometheus after 20 s:\n{done.stdout}")
        time.sleep(1)
    return [
        f"nodemesh stat service --lab {lab.name} --window 5m (from the lab's Prometheus):",
        *(f"  {line}" for line in table),
        f"the same as a web page: nodemesh dashboard --lab {lab.name} (make demo KEEP=1)",
    ]


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
    Step("HTTP/1.1: per-request outcomes, an L7 denial and Istio request metrics", http_requests),
    Step("HTTP routing: a canary by header and a weighted split (Gateway API)", canary),
    Step("HTTP retries: a replica answering 503 hidden by an HTTPRoute retry", http_retry),
    Step("traffic control: a failing replica is ejected, retries hide it", ejection),
    Step("the central view: golden metrics per Service", central_view),
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
    parser.add_argument(
        "--name",
        default=os.environ.get("NODEMESH_LAB", DEFAULT_LAB),  # as every `nodemesh lab` command
        help="lab name (default $NODEMESH_LAB or %(default)s)",
    )
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
        print("\n" + "\n".join(keep_hints(args.name, _web_vip(lab))))
    return 0 if ok else 1


def _web_vip(lab: Lab) -> str | None:
    """Service web's VIP while both HTTP servers the demo started still run (else None)."""
    pods = ("server-0-web", "server-1-web")
    if not all(p in _servers and _servers[p].poll() is None for p in pods):
        return None
    return next(s for s in lab.status()["services"] if s["name"] == "web")["clusterIP"]


def keep_hints(name: str, web_vip: str | None) -> list[str]:
    """What ``--keep`` prints: one request to paste (when the HTTP servers still run:
    ``web_vip``), where the README goes on, and how to explore and remove the lab."""
    nodemesh = ".venv/bin/nodemesh"
    lines = [f"the lab {name} is still up."]
    if web_vip:
        lines += [
            "The demo's HTTP servers still run in server-0 and server-1 (Service web). Paste:",
            f"  {nodemesh} lab exec --name {name} client -- curl -s -w ' %{{http_code}}\\n' "
            f"http://{web_vip}/orders",
            f"  {nodemesh} lab logs --name {name} server-0 --tail 5   # the requests it answered",
        ]
    lines += [
        f'More in README.md, "A first look" (with export NODEMESH_LAB={name} instead of "try";',
        "skip its lab up and, while the demo's servers run, its HTTP servers). Explore:",
        f"  {nodemesh} lab requests --name {name} --once    # what the agents saw",
        f"  {nodemesh} lab status --name {name}",
        f"  {nodemesh} lab exec --name {name} node1 -- ip route",
        f"  {nodemesh} lab logs --name {name} node1 --tail 20   # node1's agent",
        f"  {nodemesh} dashboard --lab {name}   # then open http://127.0.0.1:15030/",
        f"  {nodemesh} lab down --name {name}",
    ]
    return lines


if __name__ == "__main__":
    sys.exit(main())
