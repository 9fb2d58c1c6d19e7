"""Traces on a real lab: node2's agent exports a span per HTTP request to an OTLP receiver.

The receiver is this test's (tests/otlp.py), serving a socket made inside the lab's CA
namespace at the CA's address: every node reaches that address over the lab's bridge (the
agents already dial the CA there), and nothing is added to the host. node2's agent is restarted
with ``--otlp-endpoint`` pointing at it. client (node1) sends HTTP/1.1 with a ``traceparent`` to
Service ``web`` (10.96.0.11:80, HTTP on the server pods' :9080, both on node2), so each request
crosses node2's inbound HTTP layer, whose span must carry the caller's trace id, the caller's
span as parent and both identities. Then the receiver goes away: requests still succeed and the
failed exports are counted on node2's ``/metrics``.
"""

from __future__ import annotations

import secrets
import shutil
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.request import urlopen

import pytest
from prometheus_client.parser import text_string_to_metric_families

from agent.lab.handle import Lab
from agent.lab.netns import call_in
from agent.lab.topology import CA_IP
from tests.labtools import mesh_lab, pod_servers, retry
from tests.otlp import KIND_SERVER, OtlpReceiver

pytestmark = [pytest.mark.root, pytest.mark.lab]

PORT = 9080
WEB = "10.96.0.11"
OTLP_PORT = 4318
CLIENT_ID = "spiffe://cluster.local/ns/default/sa/client"
SERVER_ID = "spiffe://cluster.local/ns/default/sa/server"
SERVER = f"""
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
ThreadingHTTPServer(("0.0.0.0", {PORT}), Handler).serve_forever()
"""


def receiver_in(lab: Lab) -> OtlpReceiver:
    """A receiver listening at the CA's address, inside the CA's namespace."""

    def bind() -> socket.socket:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((CA_IP, OTLP_PORT))
        return sock

    return OtlpReceiver(call_in(lab.netns("ca"), bind))


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed (scripts/debian-packages.txt)")
    with mesh_lab("tr") as lab:
        try:
            with pod_servers(lab, ("server-0", "server-1"), SERVER, PORT):
                lab.kill("agent-node2", signal.SIGTERM)
                lab.start("agent-node2", "--otlp-endpoint", f"http://{CA_IP}:{OTLP_PORT}")
                yield lab
        finally:
            logs = tmp_path_factory.mktemp("traces-lab-logs")
            shutil.copytree(lab.state_dir / "logs", Path(logs), dirs_exist_ok=True)


def curl(lab: Lab, *headers: str) -> str:
    args = [a for h in headers for a in ("-H", h)]
    out = lab.exec(
        "client", "curl", "-sS", "--max-time", "10", "-o", "/dev/null", "-w", "%{http_code}",
        *args, f"http://{WEB}/traced", capture_output=True, text=True,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    return out.stdout


def node2_metric(lab: Lab, name: str) -> float:
    def get() -> str:
        with urlopen("http://127.0.0.1:15020/metrics", timeout=10) as response:
            text: str = response.read().decode()
            return text

    families = text_string_to_metric_families(call_in(lab.netns("node2"), get))
    return sum(s.value for f in families for s in f.samples if s.name == name)


def test_a_request_through_the_mesh_yields_a_span_in_the_callers_trace(lab: Lab) -> None:
    receiver = receiver_in(lab)
    try:
        trace_id, parent = secrets.token_hex(16), secrets.token_hex(8)
        traceparent = f"traceparent: 00-{trace_id}-{parent}-01"

        def exported() -> None:
            assert curl(lab, traceparent, "tracestate: lab=1") == "200"
            assert any(s.trace_id == trace_id for s in receiver.received())

        began = time.time_ns()
        retry(exported, timeout=60)
        ended = time.time_ns()
        span = next(s for s in receiver.received() if s.trace_id == trace_id)
        assert began <= span.start_ns <= span.end_ns <= ended  # the request's own wall time
        assert (span.parent_span_id, span.kind) == (parent, KIND_SERVER)
        assert span.span_id != parent
        attrs = span.attributes
        assert attrs["nodemesh.source_principal"] == CLIENT_ID
        assert attrs["nodemesh.destination_principal"] == SERVER_ID
        assert (attrs["nodemesh.source_workload"], attrs["nodemesh.destination_workload"]) == (
            "client",
            "server",
        )
        assert attrs["nodemesh.reporter"] == "destination"
        # Both Services select the server pods: the destination names the one the source told
        # it (ConnectionRecord.service) or else the first backing the pod, as its metrics do.
        assert attrs["nodemesh.destination_service"] in {
            "web.default.svc.cluster.local",
            "server.default.svc.cluster.local",
        }
        assert (attrs["http.request.method"], attrs["url.path"]) == ("GET", "/traced")
        assert attrs["http.response.status_code"] == 200
        assert attrs["nodemesh.response_flags"] == "-"
        assert attrs["nodemesh.request_id"]
        assert span.resource["k8s.node.name"] == "node2"
    finally:
        receiver.close()

    # Without a receiver: requests are served, the lost spans are counted.
    failed_before = node2_metric(lab, "nodemesh_trace_spans_failed_total")
    for _ in range(5):
        assert curl(lab, traceparent) == "200"

    def counted() -> None:
        assert node2_metric(lab, "nodemesh_trace_spans_failed_total") >= failed_before + 5
        assert node2_metric(lab, "nodemesh_trace_export_failures_total") >= 1

    retry(counted, timeout=60)
