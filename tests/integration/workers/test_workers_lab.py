"""``nodemesh agent --workers 2`` in a real lab: capture spreads flows over the workers, the main
process's admin API and ``/metrics`` cover both, a killed worker comes back, nothing outlives
``lab down``.

node1's agent (the client's) is restarted with ``--workers 2``: each connection of the client is
a new SYN captured to node1's outbound listener group, so the kernel picks a worker per flow.
(At node2 all of them arrive in one pooled HBONE connection, which one worker serves.)
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import secrets
import signal
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from typing import Any
from urllib.request import Request, urlopen

import pytest
from prometheus_client.parser import text_string_to_metric_families

from agent.lab.handle import Lab
from agent.lab.netns import call_in
from tests.labtools import counting_server, mesh_lab, pod_servers, retry

pytestmark = [pytest.mark.root, pytest.mark.lab]

PORT = 8080
HOLD_PORT = 8082
FLOWS = 40
# Per connection: echo what arrives until the client closes (connections that stay open).
HOLD_SERVER = f"""
import socket, threading
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("0.0.0.0", {HOLD_PORT}))
srv.listen(64)
def echo(conn):
    while data := conn.recv(1 << 16):
        conn.sendall(data)
    conn.close()
while True:
    conn, _ = srv.accept()
    threading.Thread(target=echo, args=(conn,), daemon=True).start()
"""


# Service web (10.96.0.11:80) declares HTTP/1.1 on the server pods' port 9080: node1's agent
# records each request at the source (the tap).
WEB = "10.96.0.11"
HTTP_PORT = 9080
HTTP_SERVER = f"""
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers, body: two writes; no delayed-ACK stall
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "3")
        self.end_headers()
        self.wfile.write(b"ok\\n")
    def log_message(self, *args):
        pass
ThreadingHTTPServer(("0.0.0.0", {HTTP_PORT}), Handler).serve_forever()
"""


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with (
        mesh_lab("wk") as lab,
        pod_servers(lab, ["server-0"], counting_server(PORT), PORT),
        pod_servers(lab, ["server-1"], HOLD_SERVER, HOLD_PORT),
        pod_servers(lab, ["server-0", "server-1"], HTTP_SERVER, HTTP_PORT),
    ):
        lab.kill("agent-node1", signal.SIGTERM)
        lab.start("agent-node1", "--workers", "2")
        yield lab


def fetch(lab: Lab, node: str, url: str) -> bytes:
    def get() -> bytes:
        with urlopen(url, timeout=10) as response:
            body: bytes = response.read()
            return body

    return call_in(lab.netns(node), get)


def admin(lab: Lab, path: str) -> Any:
    return json.loads(fetch(lab, "node1", f"http://127.0.0.1:15000{path}"))


def metric(lab: Lab, name: str, **labels: str) -> float:
    text = fetch(lab, "node1", "http://127.0.0.1:15020/metrics").decode()
    want = set(labels.items())
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name and want <= set(s.labels.items())
    )


def send(lab: Lab, payload: bytes) -> bytes:
    ip = lab.pod("server-0")["ip"]

    def once() -> bytes:
        with socket.create_connection((ip, PORT), timeout=10) as s:
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)
            return s.recv(100)

    return call_in(lab.netns("client"), retry, once)


def accepted(lab: Lab) -> dict[int, int]:
    return {
        w["worker"]: w.get("accepted", {}).get("OUTBOUND", 0)
        for w in admin(lab, "/workers")["workers"]
    }


def test_capture_spreads_new_flows_over_the_workers(lab: Lab) -> None:
    before = accepted(lab)
    for _ in range(FLOWS):
        assert send(lab, b"x" * 1000) == b"1000"
    after = accepted(lab)
    gained = {w: after[w] - before.get(w, 0) for w in after}
    assert sorted(gained) == [0, 1]
    assert sum(gained.values()) == FLOWS
    assert all(n > 0 for n in gained.values()), gained


def test_connections_and_metrics_cover_both_workers(lab: Lab) -> None:
    ip = lab.pod("server-1")["ip"]
    with ExitStack() as held:

        def open_one() -> socket.socket:
            s = held.enter_context(socket.create_connection((ip, HOLD_PORT), timeout=10))
            s.sendall(b"ping")
            assert s.recv(4) == b"ping"
            return s

        for _ in range(16):
            call_in(lab.netns("client"), open_one)

        def listed() -> set[int]:
            rows = [
                r
                for r in admin(lab, "/connections")["connections"]
                if r.get("destination_address") == f"{ip}:{HOLD_PORT}"
            ]
            assert len(rows) == 16
            return {int(r["worker"]) for r in rows}

        assert retry(listed) == {0, 1}
        open_now = metric(lab, "nodemesh_open_connections", direction="outbound")
        assert open_now >= 16
        assert admin(lab, "/status")["counts"]["connections"] >= 16


def test_the_tap_covers_both_workers(lab: Lab) -> None:
    mark = "/wk" + secrets.token_hex(4)

    def get(path: str) -> int:
        conn = http.client.HTTPConnection(WEB, 80, timeout=10)  # a new connection each time
        try:
            conn.request("GET", path)
            response = conn.getresponse()
            response.read()
            return response.status
        finally:
            conn.close()

    start = admin(lab, f"/requests?path={mark}")
    assert start["requests"] == []
    for i in range(FLOWS):
        assert call_in(lab.netns("client"), retry, lambda i=i: get(f"{mark}/{i}")) == 200

    def seen() -> set[int]:
        rows = admin(lab, f"/requests?path={mark}&since={start['next']}")["requests"]
        assert sorted(r["path"] for r in rows) == sorted(f"{mark}/{i}" for i in range(FLOWS))
        return {int(r["worker"]) for r in rows}

    assert retry(seen) == {0, 1}
    # Traffic control learns per worker: /traffic shows each worker's endpoints of the Service.
    web = admin(lab, "/traffic")["services"]["default/web"]
    assert {e["worker"] for e in web["endpoints"]} == {0, 1}
    # A long-poll from the last cursor answers with the next request, whichever worker has it.
    cursor = admin(lab, f"/requests?path={mark}")["next"]
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(admin, lab, f"/requests?path={mark}&since={cursor}&wait=10")
        time.sleep(0.5)
        assert call_in(lab.netns("client"), get, f"{mark}/last") == 200
        assert [r["path"] for r in waiting.result()["requests"]] == [f"{mark}/last"]


def test_log_level_changes_reach_every_worker(lab: Lab) -> None:
    def post() -> bytes:
        url = "http://127.0.0.1:15000/logging?level=debug&logger=agent.proxy"
        with urlopen(Request(url, method="POST"), timeout=10) as response:
            body: bytes = response.read()
            return body

    try:
        assert json.loads(call_in(lab.netns("node1"), post))["levels"]["agent.proxy"] == "debug"
        assert [w["levels"]["agent.proxy"] for w in admin(lab, "/workers")["workers"]] == [
            "debug",
            "debug",
        ]
    finally:
        reset = "http://127.0.0.1:15000/logging?level=info&logger=agent.proxy"
        call_in(
            lab.netns("node1"), lambda: urlopen(Request(reset, method="POST"), timeout=10).close()
        )


def test_killed_worker_is_restarted_and_counted(lab: Lab) -> None:
    workers = {w["worker"]: w for w in admin(lab, "/workers")["workers"]}
    victim = workers[0]["pid"]
    restarts = metric(lab, "nodemesh_worker_restarts_total", worker="0")
    os.kill(victim, signal.SIGKILL)

    def back() -> dict[str, Any]:
        w = {w["worker"]: w for w in admin(lab, "/workers")["workers"]}[0]
        assert w["up"] and w["pid"] not in (None, victim)
        return w

    assert retry(back)["restarts"] == workers[0]["restarts"] + 1
    assert metric(lab, "nodemesh_worker_restarts_total", worker="0") == restarts + 1
    retry(lambda: fetch(lab, "node1", "http://127.0.0.1:15021/healthz/ready"))
    for _ in range(10):
        assert send(lab, b"y" * 10) == b"10"


def test_upgrade_between_agents_with_workers(lab: Lab) -> None:
    """``lab upgrade`` starts the new agent with the recorded command line (``--workers 2``):
    it opens its groups on ephemeral ports beside the old agent's, takes the node over, and the
    old agent's workers keep serving their connections until its drain ends."""
    ip = lab.pod("server-1")["ip"]
    old_workers = [w["pid"] for w in admin(lab, "/workers")["workers"]]
    held = call_in(lab.netns("client"), socket.create_connection, (ip, HOLD_PORT), 10)
    try:
        held.sendall(b"before")
        assert held.recv(6) == b"before"
        upgrade = lab.upgrade("node1")
        before = accepted(lab)
        assert before == {0: 0, 1: 0}  # the new agent's workers, fresh
        for _ in range(FLOWS):
            assert send(lab, b"z" * 10) == b"10"
        after = accepted(lab)
        assert sum(after.values()) == FLOWS and all(n > 0 for n in after.values()), after
        new_workers = [w["pid"] for w in admin(lab, "/workers")["workers"]]
        assert not set(new_workers) & set(old_workers)
        held.sendall(b"after")  # still the old agent's worker
        assert held.recv(5) == b"after"
    finally:
        held.close()

    def gone() -> None:
        with contextlib.suppress(ChildProcessError):  # this process started it: reap it
            os.waitpid(upgrade.old_pid, os.WNOHANG)
        assert [p for p in [upgrade.old_pid, *old_workers] if os.path.exists(f"/proc/{p}")] == []

    retry(gone, timeout=30)


def test_lab_down_leaves_no_worker(lab: Lab) -> None:
    pids = [w["pid"] for w in admin(lab, "/workers")["workers"]]
    assert all(isinstance(p, int) for p in pids)
    lab.down()  # the fixture's own down then finds nothing to remove
    assert [p for p in pids if os.path.exists(f"/proc/{p}")] == []
