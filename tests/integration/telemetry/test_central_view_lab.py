"""The central view on a real lab: Prometheus scrapes every agent, and ``nodemesh stat``,
``edges`` and ``top`` show the connections the test made, counted exactly (denied ones too).

One lab (default topology). The client opens ``CONNECTIONS`` connections to Service ``server``
(10.96.0.10:80 → 8080 on server-0 or server-1), each sending ``PAYLOAD`` bytes and reading the
server's byte-count answer; then a DENY policy refuses neighbor's connections. The commands run
as a user runs them, from the host namespace: they find the lab's Prometheus (``--lab``) and
query it from the lab's switch namespace.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import urllib.parse
import uuid
from typing import Any
from urllib.request import urlopen

import pytest

from agent.lab.handle import Lab
from agent.lab.netns import call_in
from agent.lab.topology import CA_IP
from tests.labtools import counting_server, mesh_lab, pod_servers, retry

pytestmark = [pytest.mark.root, pytest.mark.lab]

PORT = 8080
CONNECTIONS = 7
PAYLOAD = 100
SERVICE = "10.96.0.10"
NODEMESH = [sys.executable, "-m", "agent"]
SERVER = counting_server(PORT)
ANSWER = len(str(PAYLOAD))
CLIENT = "spiffe://cluster.local/ns/default/sa/client"
SERVER_ID = "spiffe://cluster.local/ns/default/sa/server"


def prometheus_get(lab: Lab, path: str) -> Any:
    url = lab.status()["prometheus"]["url"] + path

    def get() -> bytes:
        with urlopen(url, timeout=10) as response:
            body: bytes = response.read()
            return body

    return json.loads(call_in(lab.netns("switch"), get))


def nodemesh(lab: Lab, *args: str) -> Any:
    out = subprocess.run(
        [*NODEMESH, *args, "--lab", lab.name, "--json"],
        capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    return json.loads(out.stdout)


def connect_once(lab: Lab, pod: str = "client") -> bool:
    """One connection from ``pod`` to the Service: True if answered, False if refused. The
    node's proxy accepts and then resets a refused connection: the reset may reach the client
    at any step, even before its ``connect`` returned (a refusal on its own node is that fast)."""

    def run() -> bool:
        try:
            with socket.create_connection((SERVICE, 80), timeout=10) as sock:
                sock.sendall(b"x" * PAYLOAD)
                sock.shutdown(socket.SHUT_WR)
                answer = sock.recv(64)
        except (ConnectionResetError, BrokenPipeError):
            return False
        assert answer in (b"", str(PAYLOAD).encode()), answer
        return answer != b""

    return call_in(lab.netns(pod), run)


DENY_NEIGHBOR = {
    "apiVersion": "nodemesh.io/v1alpha1",
    "kind": "AuthorizationPolicy",
    "metadata": {"name": "server-deny-neighbor", "namespace": "default"},
    "spec": {
        "selector": {"matchLabels": {"app": "server"}},
        "action": "DENY",
        "rules": [{"from": [{"source": {"principals": ["cluster.local/ns/default/sa/neighbor"]}}]}],
    },
}
DENIED = 3


def denied_connections(lab: Lab) -> tuple[int, int]:
    """Applies ``DENY_NEIGHBOR``, waits until every node's agent holds it, then makes ``DENIED``
    connections from neighbor: (connections made, connections refused).

    Waiting first matters: a connection still open when the policy arrives is closed by the
    policy re-check and counted as denied, although the server's answer may already have
    reached the client (which then counts it as answered)."""
    lab.apply(DENY_NEIGHBOR)
    retry(lambda: holds_the_deny(lab), timeout=20)
    refused = sum(not connect_once(lab, "neighbor") for _ in range(DENIED))
    return DENIED, refused


def holds_the_deny(lab: Lab) -> None:
    name = DENY_NEIGHBOR["metadata"]["name"]  # type: ignore[index]
    for node in (n["name"] for n in lab.status()["nodes"]):

        def names() -> list[str]:
            with urlopen("http://127.0.0.1:15000/policies", timeout=10) as response:
                return [p["name"] for p in json.loads(response.read())["policies"]]

        assert name in call_in(lab.netns(node), names), node


def check_targets(lab: Lab) -> None:
    """Every agent and the CA are targets, all up, and the CA's decisions are in Prometheus
    (every agent fetched its pods' certificates from it at start)."""
    targets = prometheus_get(lab, "/api/v1/targets")["data"]["activeTargets"]
    nodes = {n["ip"] for n in lab.status()["nodes"]}
    assert {t["labels"]["instance"] for t in targets} == {f"{ip}:15020" for ip in nodes} | {
        f"{CA_IP}:15014"
    }
    assert [t["health"] for t in targets] == ["up"] * (len(nodes) + 1), targets
    query = 'sum(nodemesh_ca_server_requests_total{job="nodemesh-ca",outcome="ok"})'
    result = prometheus_get(lab, "/api/v1/query?query=" + urllib.parse.quote(query))
    assert result["data"]["result"], "no CA series scraped yet"
    assert float(result["data"]["result"][0]["value"][1]) >= len(nodes)


def check_stat(lab: Lab) -> dict[str, Any]:
    rows = nodemesh(lab, "stat", "service", "server", "--window", "1m")
    assert len(rows) == 1, rows
    assert rows[0]["connectionsClosed"] >= CONNECTIONS  # converged: every close scraped
    return dict(rows[0])


def test_prometheus_stat_edges_and_top_show_the_traffic() -> None:
    with (
        mesh_lab("cv") as lab,
        pod_servers(lab, ("server-0", "server-1"), SERVER, PORT),
    ):
        prom = lab.status()["prometheus"]
        assert prom["state"] == "running", prom
        pid = prometheus_pid(lab)
        retry(lambda: check_targets(lab), timeout=20)

        assert all(connect_once(lab) for _ in range(CONNECTIONS))

        row = retry(lambda: check_stat(lab), timeout=20)
        assert row["service"] == "server.default.svc.cluster.local"
        assert row["connectionsOpened"] == CONNECTIONS
        assert row["connectionsClosed"] == CONNECTIONS
        assert row["activeConnections"] == 0
        assert row["bytesSent"] == CONNECTIONS * PAYLOAD
        assert row["bytesReceived"] == CONNECTIONS * ANSWER
        assert row["mtlsShare"] == 1.0
        assert row["deniedConnections"] == 0
        (by_workload,) = nodemesh(lab, "stat", "workload", "default/server", "--window", "1m")
        assert by_workload["connectionsOpened"] == CONNECTIONS

        made, refused = denied_connections(lab)
        edges = retry(lambda: converged_edges(lab, made), timeout=20)
        edge = edges[("default/client", "default/server")]
        assert (edge["sourcePrincipal"], edge["destinationPrincipal"]) == (CLIENT, SERVER_ID)
        assert edge["mtls"] == "yes"
        assert edge["connectionsOpened"] == CONNECTIONS
        assert edge["deniedConnections"] == 0
        denied = edges[("default/neighbor", "default/server")]
        assert refused == made  # every neighbor connection came after the policy
        assert denied["connectionsOpened"] == made
        assert denied["deniedConnections"] == refused
        assert denied["sourcePrincipal"] == "spiffe://cluster.local/ns/default/sa/neighbor"

        check_top_in_tmux(lab)
        plain = subprocess.run(
            [*NODEMESH, "top", "--lab", lab.name, "--window", "1m", "--iterations", "1"],
            capture_output=True, text=True, check=True, timeout=60,
        )  # fmt: skip
        assert plain.stdout.startswith("---\n") and "\x1b" not in plain.stdout
        assert "default/client -> default/server" in plain.stdout

        data_dir = prom["dataDir"]
        assert os.path.isdir(data_dir)
    assert not os.path.exists(data_dir)
    assert not process_alive(pid), f"Prometheus (pid {pid}) outlived lab down"


def converged_edges(lab: Lab, neighbor_closed: int) -> dict[tuple[str, str], Any]:
    edges = {(e["source"], e["destination"]): e for e in nodemesh(lab, "edges", "--window", "1m")}
    neighbor = edges.get(("default/neighbor", "default/server"))
    assert neighbor is not None and neighbor["connectionsClosed"] >= neighbor_closed, edges
    return edges


def prometheus_pid(lab: Lab) -> int:
    pids = os.listdir(os.path.join(lab.state_dir, "pids"))
    assert "prometheus" in pids
    with open(os.path.join(lab.state_dir, "pids", "prometheus"), encoding="ascii") as f:
        return int(f.read())


def process_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def check_top_in_tmux(lab: Lab) -> None:
    """``nodemesh top`` in a detached tmux session of its own server (``-L``): the pane, as a
    person would see it, shows the test's path."""
    tmux = shutil.which("tmux")
    assert tmux, "tmux is missing: run scripts/setup.sh (Debian package tmux)"
    server = f"nodemesh-test-{uuid.uuid4().hex[:8]}"
    command = " ".join([*NODEMESH, "top", "--lab", lab.name, "--window", "1m", "--interval", "1s"])
    env = {**os.environ, "TERM": os.environ.get("TERM", "xterm-256color")}
    base = [tmux, "-L", server]
    subprocess.run(
        [*base, "new-session", "-d", "-s", "top", "-x", "200", "-y", "30", command],
        check=True, env=env, timeout=30,
    )  # fmt: skip
    try:

        def pane() -> str:
            out = subprocess.run(
                [*base, "capture-pane", "-p", "-t", "top"],
                capture_output=True, text=True, check=True, timeout=10,
            )  # fmt: skip
            assert "default/client -> default/server" in out.stdout, out.stdout
            return out.stdout

        screen = retry(pane, timeout=30)
        assert "nodemesh top: busiest paths" in screen
        assert "server.default.svc.cluster.local" in screen
    finally:
        subprocess.run([*base, "kill-server"], check=False, timeout=30)
