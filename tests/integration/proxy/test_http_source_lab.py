"""HTTP/1.1 at the source node on a real lab: one curl connection to Service ``web``.

Service ``web`` (default topology: VIP port 80 named ``http``, appProtocol ``http``) selects
server-0 and server-1 (node2) on port 9080, where each runs a Python keep-alive server that
answers with its own address. The client (node1) sends many requests on ONE connection (curl,
several URLs in one invocation): node1's outbound proxy terminates it and routes each request,
so both replicas serve; node1 reports ``reporter="source"``, node2 ``reporter="destination"``,
both with ``destination_service`` the Service dialled. Counts are exact: each test compares
the metrics before and after its own requests, once the mesh has converged.
"""

from __future__ import annotations

import re
import secrets
import shutil
import subprocess
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from urllib.request import urlopen

import pytest
from prometheus_client.parser import text_string_to_metric_families

from agent.lab.handle import Lab
from agent.lab.netns import call_in
from tests.integration.proxy.test_proxy_lab import capture
from tests.integration.traffic.test_traffic_lab import policy
from tests.labtools import mesh_lab, pod_servers, retry

pytestmark = [pytest.mark.root, pytest.mark.lab]

PORT = 9080
WEB = "web.default.svc.cluster.local"
SERVER = f"""
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers, body: two writes; no delayed-ACK stall
    def reply(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        out = self.connection.getsockname()[0].encode()
        self.send_response(404 if self.path.startswith("/missing") else 200)
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)
    do_GET = do_POST = reply
    def log_message(self, *args):
        pass
ThreadingHTTPServer(("0.0.0.0", {PORT}), Handler).serve_forever()
"""
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
PODS = ("server-0", "server-1")


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed (scripts/debian-packages.txt)")
    with mesh_lab("hs") as lab:
        yield lab


def metrics(lab: Lab, node: str) -> Samples:
    def get() -> str:
        with urlopen("http://127.0.0.1:15020/metrics", timeout=10) as response:
            text: str = response.read().decode()
            return text

    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(call_in(lab.netns(node), get))
        for s in family.samples
    }


def total(parsed: Samples, **labels: str) -> float:
    want = set(labels.items())
    return sum(v for (n, ls), v in parsed.items() if n == "istio_requests_total" and want <= ls)


def vip(lab: Lab) -> str:
    return str(next(s for s in lab.status()["services"] if s["name"] == "web")["clusterIP"])


def curl(lab: Lab, urls: list[str], pod: str = "client", *extra: str) -> list[tuple[str, str, str]]:
    """All ``urls`` in ONE curl invocation (one keep-alive connection); per request: the body
    (the answering pod's IP, or an error text), the status and the connections curl opened."""
    args = ["-sS", "--max-time", "20", "-w", "|#%{http_code} %{num_connects}#|", *extra, *urls]
    out = lab.exec(pod, "curl", *args, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return re.findall(r"(.*?)\|#(\d+) (\d+)#\|", out.stdout, re.S)


SOURCE = {"reporter": "source", "source_workload": "client", "request_protocol": "http"}
DEST = {"reporter": "destination", "destination_workload": "server", "request_protocol": "http"}


def converged(lab: Lab) -> tuple[Samples, Samples]:
    """Requests through the source HTTP layer are seen on node1, and on node2 with the
    dialled Service: node1 and node2 follow the state. Returns (node1, node2) metrics."""
    before = total(metrics(lab, "node1"), **SOURCE)

    def check() -> tuple[Samples, Samples]:
        curl(lab, [f"http://{vip(lab)}/warmup"] * 4)
        node1, node2 = metrics(lab, "node1"), metrics(lab, "node2")
        assert total(node1, **SOURCE) >= before + 4
        assert total(node2, **DEST, destination_service=WEB) > 0
        return node1, node2

    return retry(check, timeout=40)


def servers(stack: ExitStack, lab: Lab, *pods: str) -> dict[str, ExitStack]:
    """Start the server in each of ``pods``; each one's own stack stops it early."""
    out = {}
    for pod in pods:
        own = stack.enter_context(ExitStack())
        own.enter_context(pod_servers(lab, (pod,), SERVER, PORT))
        out[pod] = own
    return out


def run(lab: Lab, n: int) -> tuple[list[tuple[str, str, str]], Counter[str]]:
    """``n`` requests on one connection (every tenth a 404): the results and the split."""
    paths = [f"/missing/{i}" if i % 10 == 9 else f"/r/{i}" for i in range(n)]
    result = curl(lab, [f"http://{vip(lab)}{p}" for p in paths])
    assert [r[2] for r in result] == ["1"] + ["0"] * (n - 1)  # ONE client connection
    by_ip = {lab.pod(p)["ip"]: p for p in PODS}
    return result, Counter(by_ip[body] for body, _, _ in result)


def test_requests_of_one_connection_are_balanced_per_request_and_counted(lab: Lab) -> None:
    n = 40
    with ExitStack() as stack:
        servers(stack, lab, *PODS)
        node1_before, node2_before = converged(lab)
        result, split = run(lab, n)
        # The default balancer (peak-EWMA, P2C) favours the replica that answered faster:
        # with one sequential client the split is uneven by design (reported, not asserted).
        print(f"PEAK_EWMA: split of {n} requests on one connection: {dict(split)}")
        spec = {"loadBalancer": {"type": "ROUND_ROBIN"}}
        with policy(lab, spec, lambda e: e.get("balancer") == "ROUND_ROBIN"):
            _, even = run(lab, n)
        print(f"ROUND_ROBIN: split of {n} requests on one connection: {dict(even)}")
        assert even == {"server-0": n // 2, "server-1": n // 2}
    codes = Counter(code for _, code, _ in result)
    assert codes == {"200": n - n // 10, "404": n // 10}
    node1, node2 = metrics(lab, "node1"), metrics(lab, "node2")
    for code, count in codes.items():
        labels = {**SOURCE, "destination_service": WEB, "response_code": code}
        assert total(node1, **labels) - total(node1_before, **labels) == 2 * count
        # The far node names the Service dialled, not the first one selecting the pods
        # (``server``, which selects the same pods on port 8080).
        far = {**DEST, "destination_service": WEB, "response_code": code}
        assert total(node2, **far) - total(node2_before, **far) == 2 * count
    assert total(node2, **DEST, destination_service="server.default.svc.cluster.local") == 0
    mtls = {**SOURCE, "connection_security_policy": "mutual_tls", "response_flags": "-"}
    assert total(node1, **mtls) - total(node1_before, **mtls) == 2 * n


def test_a_dead_replica_is_avoided_and_no_live_one_is_503_uf_not_a_hang(lab: Lab) -> None:
    n = 12
    with ExitStack() as stack:
        own = servers(stack, lab, *PODS)
        converged(lab)
        own["server-1"].close()  # server-1's server is gone: its connects are refused
        result = curl(lab, [f"http://{vip(lab)}/r/{i}" for i in range(n)])
        assert [(body, code) for body, code, _ in result] == [
            (lab.pod("server-0")["ip"], "200")
        ] * n
        own["server-0"].close()
        before = metrics(lab, "node1")
        result = curl(lab, [f"http://{vip(lab)}/r/{i}" for i in range(3)])
    assert [code for _, code, _ in result] == ["503"] * 3
    assert [connects for _, _, connects in result] == ["1", "0", "0"]  # the connection stays
    assert all(body.startswith("upstream connect error") for body, _, _ in result)
    after = metrics(lab, "node1")
    failed = {**SOURCE, "response_code": "503", "response_flags": "UF"}
    assert total(after, **failed) - total(before, **failed) == 3


def test_the_wire_between_nodes_carries_no_plaintext(lab: Lab, tmp_path: Path) -> None:
    secret = "SECRET" + secrets.token_hex(8)
    control = "PLAIN" + secrets.token_hex(8)
    pcap = tmp_path / "uplink.pcap"
    server_ip = lab.pod("server-0")["ip"]
    with ExitStack() as stack:
        servers(stack, lab, *PODS)
        converged(lab)
        with capture(lab, "node1", pcap, until=control.encode()):
            result = curl(
                lab, [f"http://{vip(lab)}/{secret}"] * 4, "client", "-H", f"x-s: {secret}"
            )
            assert {code for _, code, _ in result} == {"200"}
            # outsider is not meshed: its request crosses the wire as it is
            curl(lab, [f"http://{server_ip}:{PORT}/{control}"], "outsider")
    wire = pcap.read_bytes()
    assert control.encode() in wire  # the capture sees plaintext when there is plaintext
    assert secret.encode() not in wire
    summary = subprocess.run(["tcpdump", "-nn", "-r", str(pcap)], capture_output=True, text=True)
    assert ".15008" in summary.stdout
