"""Telemetry and the admin API on a real lab: agents with capture, the lab CA, real traffic.

One lab serves the module; each test stops what it started (servers, policies), also on
failure. node1 runs client, neighbor (meshed) and outsider (not meshed); node2 runs server-0
and server-1 (meshed) behind Service ``server`` (10.96.0.10:80 → 8080).
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any
from urllib.request import Request, urlopen

import pytest
from prometheus_client.parser import text_string_to_metric_families

from agent.lab.handle import Lab
from agent.lab.netns import call_in
from tests.labtools import counting_server, mesh_lab, pod_servers, retry

pytestmark = [pytest.mark.root, pytest.mark.lab]

PORT = 8080
NODEMESH = os.path.join(os.path.dirname(sys.executable), "nodemesh")
SERVER = counting_server(PORT)
Labels = frozenset[tuple[str, str]]


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with mesh_lab("tm") as lab, pod_servers(lab, ("server-0", "server-1"), SERVER, PORT):
        yield lab


def fetch(lab: Lab, node: str, url: str) -> bytes:
    """GET ``url`` from inside ``node``'s network namespace (the admin API is loopback there)."""

    def get() -> bytes:
        with urlopen(url, timeout=10) as response:
            body: bytes = response.read()
            return body

    return call_in(lab.netns(node), get)


def metrics(lab: Lab, node: str) -> dict[tuple[str, Labels], float]:
    text = fetch(lab, node, "http://127.0.0.1:15020/metrics").decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def total(parsed: dict[tuple[str, Labels], float], name: str, **labels: str) -> float:
    want = set(labels.items())
    return sum(v for (n, ls), v in parsed.items() if n == name and want <= ls)


def admin(lab: Lab, node: str, path: str) -> Any:
    return json.loads(fetch(lab, node, f"http://127.0.0.1:15000{path}"))


TO_SERVER = {
    "source_workload": "client",
    "destination_workload": "server",
    "destination_service": "server.default.svc.cluster.local",
}


@contextmanager
def open_connection(lab: Lab, src: str, ip: str, port: int) -> Iterator[socket.socket]:
    sock = call_in(lab.netns(src), lambda: socket.create_connection((ip, port), timeout=10))
    try:
        yield sock
    finally:
        sock.close()


def test_bytes_follow_a_live_connection_and_counts_follow_its_close(lab: Lab) -> None:
    before1, before2 = metrics(lab, "node1"), metrics(lab, "node2")
    sent_before = total(before1, "istio_tcp_sent_bytes_total", reporter="source", **TO_SERVER)
    in_before = total(before2, "istio_tcp_received_bytes_total", reporter="destination")
    payload = secrets.token_bytes(300_000)
    with open_connection(lab, "client", "10.96.0.10", 80) as sock:
        sock.sendall(payload)

        def while_open() -> None:
            now = metrics(lab, "node1")
            sent = total(now, "istio_tcp_sent_bytes_total", reporter="source", **TO_SERVER)
            assert sent - sent_before == len(payload)
            assert total(now, "nodemesh_open_connections", direction="outbound") >= 1

        retry(while_open)
        rows = admin(lab, "node1", "/connections")["connections"]
        mine = [r for r in rows if r["destination_address"] == "10.96.0.10:80"]
        assert len(mine) == 1 and mine[0]["bytes_sent"] == len(payload)
        assert mine[0]["security"] == "mutual_tls" and mine[0]["source_workload"] == "client"
        sock.shutdown(socket.SHUT_WR)
        assert sock.recv(64) == str(len(payload)).encode()
    after1 = retry(lambda: _closed(lab, "node1", before1))
    assert total(after1, "istio_tcp_received_bytes_total", reporter="source", **TO_SERVER) - (
        total(before1, "istio_tcp_received_bytes_total", reporter="source", **TO_SERVER)
    ) == len(str(len(payload)))
    after2 = metrics(lab, "node2")
    # node2 saw the same bytes as the reporting destination, over mTLS
    inbound = total(
        after2, "istio_tcp_received_bytes_total", reporter="destination",
        connection_security_policy="mutual_tls",
    )  # fmt: skip
    assert inbound - in_before == len(str(len(payload)))  # received = server → client


def _closed(lab: Lab, node: str, before: dict[tuple[str, Labels], float]) -> Any:
    now = metrics(lab, node)
    opened = total(now, "istio_tcp_connections_opened_total", **TO_SERVER)
    closed = total(now, "istio_tcp_connections_closed_total", **TO_SERVER)
    assert opened - total(before, "istio_tcp_connections_opened_total", **TO_SERVER) == 1
    assert closed - total(before, "istio_tcp_connections_closed_total", **TO_SERVER) == 1
    return now


def test_a_denied_connection_counts_the_denial_and_its_response_flag(lab: Lab) -> None:
    name = "deny" + secrets.token_hex(3)
    manifest = {
        "apiVersion": "nodemesh.io/v1alpha1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"action": "DENY", "selector": {"matchLabels": {"app": "server"}}, "rules": [{}]},
    }
    before = metrics(lab, "node2")
    lab.apply(manifest)
    try:

        def denied() -> None:
            with open_connection(lab, "client", lab.pod("server-0")["ip"], PORT) as sock:
                sock.shutdown(socket.SHUT_WR)
                with suppress(ConnectionResetError):  # refused: EOF or RST, never an answer
                    assert sock.recv(64) == b""
            now = metrics(lab, "node2")
            key = "nodemesh_policy_denials_total"
            assert total(now, key, policy=f"default/{name}") > total(before, key)
            flag = {"reporter": "destination", "response_flags": "DENY"}
            closed = "istio_tcp_connections_closed_total"
            assert total(now, closed, **flag) > total(before, closed, **flag)

        retry(denied)
    finally:
        lab.delete(manifest)


def test_admin_endpoints_answer_from_the_node_and_not_from_a_pod(lab: Lab) -> None:
    status = admin(lab, "node1", "/status")
    assert status["node"] == "node1" and status["ready"] is True
    assert status["counts"]["local_meshed"] == 2
    dump = admin(lab, "node1", "/config_dump")
    assert dump["datapath"]["failure_mode"] == "fail-closed"
    assert "eth0" in dump["datapath"]["attachments"]
    certs = admin(lab, "node1", "/certs")["certificates"]
    assert {c["identity"] for c in certs} == {
        "spiffe://cluster.local/ns/default/sa/client",
        "spiffe://cluster.local/ns/default/sa/neighbor",
    }
    paths = [p for p in admin(lab, "node1", "/")["endpoints"] if p != "/quitquitquit"]
    bodies = [fetch(lab, "node1", f"http://127.0.0.1:15000{p}") for p in paths]
    assert all(b"PRIVATE KEY" not in b for b in bodies)
    node_ip = lab.node("node1")["ip"]
    for pod in ("client", "outsider"):
        assert call_in(lab.netns(pod), lambda: _http_answer(node_ip, 15000)) == b""
    # the same pod does reach the node's metrics port: the refusal above is the address
    assert call_in(lab.netns("outsider"), lambda: _http_answer(node_ip, 15020)).startswith(b"HTTP")


def _http_answer(ip: str, port: int) -> bytes:
    """What ``GET /`` on ``ip:port`` answers: b"" when refused, reset or closed unanswered (a
    meshed pod's connect may succeed: the node proxy accepts it, then refuses to relay it)."""
    try:
        with socket.create_connection((ip, port), timeout=5) as sock:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            return sock.recv(64)
    except OSError:
        return b""


def test_cli_through_lab_exec(lab: Lab) -> None:
    table = lab.exec("node1", NODEMESH, "status", capture_output=True, text=True)
    assert table.returncode == 0 and "ready:        yes" in table.stdout
    raw = lab.exec("node1", NODEMESH, "certs", "-o", "json", capture_output=True, text=True)
    assert raw.returncode == 0 and len(json.loads(raw.stdout)["certificates"]) == 2
    nowhere = lab.exec("client", NODEMESH, "status", capture_output=True, text=True)
    assert nowhere.returncode == 1 and "connection refused" in nowhere.stderr
    # as the issue words it: the bare name works without the venv on PATH
    bare = subprocess.run(
        [NODEMESH, "lab", "exec", "--name", lab.name, "node1", "--", "nodemesh", "status"],
        capture_output=True,
        text=True,
    )
    assert bare.returncode == 0 and "node:         node1" in bare.stdout
    shortcut = subprocess.run(
        [NODEMESH, "lab", "status", "--name", lab.name, "--node", "node2", "--json"],
        capture_output=True,
        text=True,
    )
    assert shortcut.returncode == 0 and json.loads(shortcut.stdout)["node"] == "node2"


def test_quitquitquit_drains_the_agent(lab: Lab) -> None:
    """Last in this module: it stops node2's agent the way SIGTERM would."""
    pid = int((lab.state_dir / "pids" / "agent-node2").read_text())
    answer = call_in(lab.netns("node2"), lambda: _post("http://127.0.0.1:15000/quitquitquit"))
    assert answer == {"draining": True}

    def gone() -> None:
        assert not Path(f"/proc/{pid}").exists() or "zombie" in _state(pid)

    retry(gone, timeout=30)
    log = (lab.state_dir / "logs" / "agent-node2.log").read_text()
    assert "agent draining" in log


def _post(url: str) -> Any:
    with urlopen(Request(url, method="POST"), timeout=10) as response:
        return json.loads(response.read())


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/status").read_text().lower()
    except OSError:
        return "zombie"
