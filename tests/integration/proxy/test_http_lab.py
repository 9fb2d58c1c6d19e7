"""HTTP/1.1 at the destination node on a real lab: curl through the mesh to a keep-alive server.

server-0 (node2) declares port 9090 HTTP with ``nodemesh.io/http-ports`` and runs a Python
HTTP/1.1 keep-alive server there; client (node1) calls it with curl, so every request crosses
node1's outbound capture, HBONE, and node2's inbound HTTP layer. Counts are exact: the tests
wait for the mesh to converge with one request of their own, then compare before and after.
"""

from __future__ import annotations

import secrets
import shutil
from collections.abc import Iterator
from typing import Any
from urllib.request import urlopen

import pytest
from prometheus_client.parser import text_string_to_metric_families

from agent.lab.handle import Lab
from agent.lab.netns import call_in
from tests.labtools import mesh_lab, pod_servers, retry

pytestmark = [pytest.mark.root, pytest.mark.lab]

PORT = 9090
SERVER = f"""
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers, body: two writes; no delayed-ACK stall
    def reply(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        code = 404 if self.path.startswith("/missing") else 200
        rid = self.headers.get("x-request-id")
        out = f"{{self.command}} {{self.path}} {{len(body)}} {{rid}}\\n"
        self.send_response(code)
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out.encode())
    do_GET = do_POST = reply
    def log_message(self, *args):
        pass
ThreadingHTTPServer(("0.0.0.0", {PORT}), Handler).serve_forever()
"""
Labels = frozenset[tuple[str, str]]
REQUESTS = "istio_requests_total"


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed (scripts/debian-packages.txt)")
    with mesh_lab("ht") as lab:
        lab.annotate("server-0", f"nodemesh.io/http-ports={PORT}")
        with pod_servers(lab, ("server-0",), SERVER, PORT):
            yield lab


def metrics(lab: Lab, node: str = "node2") -> dict[tuple[str, Labels], float]:
    def get() -> str:
        with urlopen("http://127.0.0.1:15020/metrics", timeout=10) as response:
            text: str = response.read().decode()
            return text

    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(call_in(lab.netns(node), get))
        for s in family.samples
    }


def total(parsed: dict[tuple[str, Labels], float], **labels: str) -> float:
    want = set(labels.items())
    return sum(v for (n, ls), v in parsed.items() if n == REQUESTS and want <= ls)


def curl(lab: Lab, *args: str) -> list[str]:
    """Run curl in the client pod; one output line per request (``-w``)."""
    out = lab.exec(
        "client", "curl", "-sS", "--max-time", "10", *args, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.splitlines()


def requests(lab: Lab, *calls: tuple[str, str], pod: str = "server-0") -> list[tuple[str, str]]:
    """(method, path) calls on ONE curl invocation (one keep-alive connection) to ``pod``: per
    call the status and how many connections curl opened for it (0 = the connection was
    reused)."""
    ip = lab.pod(pod)["ip"]
    args: list[str] = []
    for i, (method, path) in enumerate(calls):
        if i:
            args.append("--next")
        args += ["-o", "/dev/null", "-w", "%{http_code} %{num_connects}\\n", "-X", method]
        if method == "POST":
            args += ["--data", "payload"]
        args.append(f"http://{ip}:{PORT}{path}")
    return [tuple(line.split()) for line in curl(lab, *args)]  # type: ignore[misc]


DEST = {"reporter": "destination", "destination_workload": "server", "request_protocol": "http"}


def converged(lab: Lab) -> dict[tuple[str, Labels], float]:
    """One request through the HTTP layer, seen in the metrics: the annotation and any policy
    change have reached node2's agent. Returns the metrics after it."""
    before = total(metrics(lab), **DEST)

    def check() -> dict[tuple[str, Labels], float]:
        assert requests(lab, ("GET", "/warmup")) == [("200", "1")]
        now = metrics(lab)
        assert total(now, **DEST) > before
        return now

    return retry(check, timeout=40)


def test_requests_are_counted_exactly_with_their_response_codes(lab: Lab) -> None:
    before = converged(lab)
    calls = [("GET", "/a"), ("GET", "/b"), ("POST", "/c"), ("GET", "/missing"), ("GET", "/d")]
    result = requests(lab, *calls)
    assert [code for code, _ in result] == ["200", "200", "200", "404", "200"]
    assert [n for _, n in result] == ["1", "0", "0", "0", "0"]  # one keep-alive connection
    after = metrics(lab)
    ok = {**DEST, "response_code": "200", "response_flags": "-", "grpc_response_status": ""}
    assert total(after, **ok) - total(before, **ok) == 4
    missing = {**DEST, "response_code": "404"}
    assert total(after, **missing) - total(before, **missing) == 1
    principal = {**DEST, "source_principal": "spiffe://cluster.local/ns/default/sa/client"}
    assert total(after, **principal) - total(before, **principal) == 5
    duration = "istio_request_duration_milliseconds_count"
    got = sum(v for (n, ls), v in after.items() if n == duration and set(ok.items()) <= ls)
    was = sum(v for (n, ls), v in before.items() if n == duration and set(ok.items()) <= ls)
    assert got - was == 4


def test_the_pod_sees_a_request_id_the_client_did_not_send(lab: Lab) -> None:
    converged(lab)
    (line,) = curl(lab, f"http://{lab.pod('server-0')['ip']}:{PORT}/id")
    method, path, size, request_id = line.split()
    assert (method, path, size) == ("GET", "/id", "0") and len(request_id) == 36


def test_an_l7_deny_refuses_exactly_the_matching_requests_on_one_connection(lab: Lab) -> None:
    name = "deny-admin-posts-" + secrets.token_hex(3)
    manifest: dict[str, Any] = {
        "apiVersion": "nodemesh.io/v1alpha1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "action": "DENY",
            "selector": {"matchLabels": {"app": "server"}},
            "rules": [{"to": [{"operation": {"methods": ["POST"], "paths": ["/admin*"]}}]}],
        },
    }
    lab.apply(manifest)
    try:
        ip = lab.pod("server-0")["ip"]
        retry(lambda: _assert_body(lab, ip, "/admin/warm", b"RBAC: access denied"), timeout=40)
        before = metrics(lab)
        result = requests(
            lab,
            ("GET", "/admin/users"),
            ("POST", "/admin/users"),
            ("GET", "/x"),
            ("POST", "/orders"),
            ("POST", "/admin"),
            ("GET", "/y"),
        )
        assert result == [
            ("200", "1"),
            ("403", "0"),
            ("200", "0"),
            ("200", "0"),
            ("403", "0"),
            ("200", "0"),
        ]
        after = metrics(lab)
        denied = {**DEST, "response_code": "403", "response_flags": "RBAC"}
        assert total(after, **denied) - total(before, **denied) == 2
        ok = {**DEST, "response_code": "200"}
        assert total(after, **ok) - total(before, **ok) == 4
    finally:
        lab.delete(manifest)


def _assert_body(lab: Lab, ip: str, path: str, expected: bytes) -> None:
    out = lab.exec(
        "client", "curl", "-sS", "--max-time", "10", "-X", "POST", "--data", "x",
        f"http://{ip}:{PORT}{path}", capture_output=True, check=False,
    )  # fmt: skip
    assert out.stdout == expected, (out.stdout, out.stderr)


def test_same_node_requests_are_counted_once_by_each_reporter(lab: Lab) -> None:
    """``neighbor`` (node1, the client's node) declares the port too: no other proxy is on the
    path, so node1 serves it as the destination would and reports each request once with
    ``reporter="destination"`` (and once with ``reporter="source"``)."""
    lab.annotate("neighbor", f"nodemesh.io/http-ports={PORT}")
    mine = {"destination_workload": "neighbor", "request_protocol": "http"}
    here = {**mine, "reporter": "destination"}
    with pod_servers(lab, ("neighbor",), SERVER, PORT):

        def check() -> dict[tuple[str, Labels], float]:
            was = total(metrics(lab, "node1"), **here)
            assert requests(lab, ("GET", "/warmup"), pod="neighbor") == [("200", "1")]
            now = metrics(lab, "node1")
            assert total(now, **here) == was + 1
            return now

        before = retry(check, timeout=40)
        calls = [("GET", "/a"), ("POST", "/b"), ("GET", "/missing"), ("GET", "/c")]
        assert requests(lab, *calls, pod="neighbor") == [
            ("200", "1"), ("200", "0"), ("404", "0"), ("200", "0")
        ]  # fmt: skip
        after = metrics(lab, "node1")
    for reporter in ("destination", "source"):
        labels = {**mine, "reporter": reporter}
        assert total(after, **labels) - total(before, **labels) == len(calls)
        missing = {**labels, "response_code": "404"}
        assert total(after, **missing) - total(before, **missing) == 1
    principal = {**here, "source_principal": "spiffe://cluster.local/ns/default/sa/client"}
    assert total(after, **principal) - total(before, **principal) == len(calls)
