"""``nodemesh lab requests`` on a real lab: the requests a client sent, with their status, filters,
and a ``request.headers`` DENY that refuses exactly the requests carrying the header.

Service ``web`` (10.96.0.11:80) declares HTTP/1.1 on the server pods' port 9080; both server
pods run a Python keep-alive HTTP server there. The client calls the Service with curl, so each
request crosses node1's capture, HBONE, and the inbound HTTP layer of the node of the endpoint
it reached; ``lab requests`` reads every node's agent, so the test need not know which one.
Each test marks its requests with a unique path prefix and filters on it, so runs and tests do
not see each other's requests.
"""

from __future__ import annotations

import json
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from agent.lab.handle import Lab
from tests.labtools import mesh_lab, pod_servers, retry

pytestmark = [pytest.mark.root, pytest.mark.lab]

PORT = 9080
WEB = "10.96.0.11"
SERVER = f"""
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers, body: two writes; no delayed-ACK stall
    def reply(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        code = 404 if "/missing" in self.path else 200
        self.send_response(code)
        self.send_header("Content-Length", "3")
        self.end_headers()
        self.wfile.write(b"ok\\n")
    do_GET = do_POST = reply
    def log_message(self, *args):
        pass
ThreadingHTTPServer(("0.0.0.0", {PORT}), Handler).serve_forever()
"""


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed (scripts/debian-packages.txt)")
    with mesh_lab("tp") as lab, pod_servers(lab, ("server-0", "server-1"), SERVER, PORT):
        yield lab


def curl(lab: Lab, *calls: tuple[str, str, tuple[str, ...]]) -> list[tuple[str, str]]:
    """(method, path, extra curl args) calls on ONE curl invocation (one keep-alive connection
    to the Service): per call the status and how many connections curl opened for it."""
    args: list[str] = []
    for i, (method, path, extra) in enumerate(calls):
        if i:
            args.append("--next")
        args += ["-o", "/dev/null", "-w", "%{http_code} %{num_connects}\\n", "-X", method, *extra]
        if method == "POST":
            args += ["--data", "payload"]
        args.append(f"http://{WEB}{path}")
    out = lab.exec(
        "client", "curl", "-sS", "--max-time", "10", *args, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    return [tuple(line.split()) for line in out.stdout.splitlines()]  # type: ignore[misc]


def lab_requests(lab: Lab, *args: str) -> list[str]:
    """``nodemesh lab requests --once ARGS`` (its stdout is a pipe: no header line)."""
    out = subprocess.run(
        [sys.executable, "-m", "agent", "lab", "requests", "--name", lab.name, "--once", *args],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert (out.returncode, out.stderr) == (0, ""), out.stderr
    return out.stdout.splitlines()


def entries(lab: Lab, *args: str, direction: str = "inbound") -> list[dict[str, Any]]:
    """The matching requests one side reported: the destination node (``inbound``) or, since
    the source node parses HTTP on Service ports too, the client's node (``outbound``)."""
    got = [json.loads(line) for line in lab_requests(lab, "-o", "json", *args)]
    return [e for e in got if e["direction"] == direction]


def converged(lab: Lab, prefix: str) -> None:
    """One request reached an agent's HTTP layer and its ring (and any policy change is in)."""

    def check() -> None:
        assert curl(lab, ("GET", f"{prefix}/warm", ())) == [("200", "1")]
        assert entries(lab, "--path", f"{prefix}/warm")

    retry(check, timeout=40)


def test_requests_lists_what_the_client_sent_and_filters_work(lab: Lab) -> None:
    prefix = "/tap-" + secrets.token_hex(3)
    converged(lab, prefix)
    sent = [
        ("GET", f"{prefix}/a", ()),
        ("POST", f"{prefix}/b", ()),
        ("GET", f"{prefix}/missing", ()),
        ("GET", f"{prefix}/c", ()),
    ]
    assert curl(lab, *sent) == [("200", "1"), ("200", "0"), ("404", "0"), ("200", "0")]
    seen = entries(lab, "--path", f"{prefix}/", "--from", "default/client")
    got = [(e["method"], e["path"], e["response_code"]) for e in seen if "/warm" not in e["path"]]
    assert got == [
        ("GET", f"{prefix}/a", 200),
        ("POST", f"{prefix}/b", 200),
        ("GET", f"{prefix}/missing", 404),
        ("GET", f"{prefix}/c", 200),
    ]
    servers = {f"{lab.pod(p)['ip']}:{PORT}" for p in ("server-0", "server-1")}
    for e in seen:
        assert e["upstream_address"] in servers
        assert e["source_identity"] == "spiffe://cluster.local/ns/default/sa/client"
        assert (e["destination_workload"], e["response_flags"], e["grpc_status"]) == (
            "server",
            "-",
            "",
        )
        assert len(e["request_id"]) == 36 and e["authority"] == WEB
    # one keep-alive connection: the four requests share it (and its connection id) at the
    # source, which reported the same requests (by request id) as the destinations did
    sent_side = entries(
        lab, "--path", f"{prefix}/", "--from", "default/client", direction="outbound"
    )
    sent_side = [e for e in sent_side if "/warm" not in e["path"]]
    assert [e["request_id"] for e in sent_side] == [
        e["request_id"] for e in seen if "/warm" not in e["path"]
    ]
    assert len({(e["node"], e["connection_id"]) for e in sent_side}) == 1
    assert {e["node"] for e in sent_side} == {"node1"}
    missing = entries(lab, "--path", f"{prefix}/", "--status", "4xx")
    assert [e["path"] for e in missing] == [f"{prefix}/missing"]
    posts = entries(lab, "--path", f"{prefix}/", "--method", "POST", "--workload", "server")
    assert [e["path"] for e in posts] == [f"{prefix}/b"]
    assert entries(lab, "--path", f"{prefix}/", "--to", "client") == []
    lines = [  # the destinations' lines ("in"): the source's are the same requests
        line
        for line in lab_requests(lab, "--path", f"{prefix}/", "--status", "200")
        if line.split()[2] == "in"
    ]
    assert len(lines) == 3 + 1  # the three 200s above and the warm-up, no header (a pipe)
    assert lines[-1].split()[3:8] == [
        "default/client",
        "default/server",
        "GET",
        f"{prefix}/c",
        "200",
    ]
    # ``nodemesh top`` (one plain frame) lists the same requests as routes, one row per
    # (source, destination, method, path), from every node's ring.
    top = subprocess.run(
        [sys.executable, "-m", "agent", "top", "--lab", lab.name, "--window", "5m",
         "--iterations", "1", "--limit", "100"],
        capture_output=True, text=True, check=True, timeout=60,
    ).stdout  # fmt: skip
    routes = {}
    for line in top.splitlines():
        cells = line.split()
        if cells[:2] == ["default/client", "default/server"] and cells[3].startswith(prefix):
            if cells[3].endswith("/warm"):  # converged()'s requests
                continue
            routes[(cells[2], cells[3])] = (cells[4], cells[6])  # COUNT, SUCCESS
    assert routes == {
        ("GET", f"{prefix}/a"): ("1", "100.0%"),
        ("POST", f"{prefix}/b"): ("1", "100.0%"),
        ("GET", f"{prefix}/missing"): ("1", "100.0%"),  # a 404 is not a failure
        ("GET", f"{prefix}/c"): ("1", "100.0%"),
    }, top


def test_a_header_deny_refuses_exactly_the_requests_carrying_it(lab: Lab) -> None:
    prefix = "/hdr-" + secrets.token_hex(3)
    name = "deny-flagged-" + secrets.token_hex(3)
    manifest: dict[str, Any] = {
        "apiVersion": "nodemesh.io/v1alpha1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "action": "DENY",
            "selector": {"matchLabels": {"app": "server"}},
            "rules": [{"when": [{"key": "request.headers[x-flagged]", "values": ["yes*"]}]}],
        },
    }
    lab.apply(manifest)
    try:
        flagged = ("-H", "X-Flagged: yes-please")

        def denied() -> None:
            assert curl(lab, ("GET", f"{prefix}/warm", flagged)) == [("403", "1")]

        retry(denied, timeout=40)
        result = curl(
            lab,
            ("GET", f"{prefix}/1", ()),
            ("GET", f"{prefix}/2", flagged),
            ("POST", f"{prefix}/3", ()),
            ("POST", f"{prefix}/4", flagged),
            ("GET", f"{prefix}/5", ("-H", "X-Flagged: no")),
        )
        assert result == [("200", "1"), ("403", "0"), ("200", "0"), ("403", "0"), ("200", "0")]
        refused = entries(lab, "--path", f"{prefix}/", "--status", "403")
        paths = [e["path"] for e in refused if "/warm" not in e["path"]]
        assert paths == [f"{prefix}/2", f"{prefix}/4"]
        assert {e["response_flags"] for e in refused} == {"RBAC"}
    finally:
        lab.delete(manifest)


def test_live_shows_a_request_made_after_the_command_not_one_before(lab: Lab) -> None:
    """``lab requests --live --count 1``: the request made before the command is held by the
    agents (``--once`` shows it) but not printed; the command prints the first request that
    comes after it started. It is followed by one request after another (each marked with
    its number) until it exits, so the test need not know when it started following."""
    prefix = "/live-" + secrets.token_hex(3)
    converged(lab, prefix)
    assert curl(lab, ("GET", f"{prefix}/before", ())) == [("200", "1")]
    retry(lambda: entries(lab, "--path", f"{prefix}/before"), timeout=10)
    command = [
        sys.executable, "-m", "agent", "lab", "requests", "--name", lab.name, "--live",
        "--count", "1", "--path", f"{prefix}/", "--from", "default/client", "-o", "json",
    ]  # fmt: skip
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as p:
        try:
            deadline = time.monotonic() + 60
            n = 0
            while p.poll() is None and time.monotonic() < deadline:
                assert curl(lab, ("GET", f"{prefix}/after/{n}", ())) == [("200", "1")]
                n += 1
            out, err = p.communicate(timeout=10)
        finally:
            if p.poll() is None:
                p.kill()
    assert (p.returncode, err) == (0, ""), err
    shown = [json.loads(line)["path"] for line in out.splitlines()]
    assert len(shown) == 1 and shown[0].startswith(f"{prefix}/after/"), shown
