"""Plain HTTP/2 (h2c, not gRPC) through the mesh on a real lab: h2load, one connection.

The default topology's Service ``grpc`` declares port 50051 ``appProtocol: grpc``, which is
HTTP/2; here both server pods run a small h2c server (the ``h2`` library) on it instead of the
gRPC one, and h2load in the client pod sends several requests on ONE connection through the
Service VIP: node1's agent terminates it and sends each request on, node2's authorizes and
counts each one as ``request_protocol="http"``. An L7 DENY on ``/admin*`` gets exactly those
requests a 403 while the others on the connection succeed.
"""

from __future__ import annotations

import secrets
import shutil
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

from agent.lab.handle import Lab
from tests.integration.proxy.test_grpc_lab import metrics, total, vip
from tests.labtools import mesh_lab, pod_servers, retry

pytestmark = [pytest.mark.root, pytest.mark.lab]

PORT = 50051
SERVER = f"""
import socket, sys, threading
import h2.config, h2.connection, h2.events
NAME = sys.argv[1].encode()
def recv(sock):
    try:
        return sock.recv(65536)
    except ConnectionResetError:  # the readiness probe's connection
        return b""
def serve(sock):
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    conn.initiate_connection()
    sock.sendall(conn.data_to_send())
    while data := recv(sock):
        for event in conn.receive_data(data):
            if isinstance(event, h2.events.RequestReceived):
                path = dict(event.headers)[b":path"]
                body = NAME + b" " + path
                conn.send_headers(event.stream_id, [(":status", "200"),
                                  ("content-length", str(len(body)))])
                conn.send_data(event.stream_id, body, end_stream=True)
            elif isinstance(event, h2.events.DataReceived):
                conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        sock.sendall(conn.data_to_send())
    sock.close()
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("0.0.0.0", {PORT}))
srv.listen(64)
while True:
    threading.Thread(target=serve, args=(srv.accept()[0],), daemon=True).start()
"""
DEST = {"reporter": "destination", "destination_workload": "server", "request_protocol": "http"}


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    if shutil.which("h2load") is None:
        pytest.skip("h2load is not installed (nghttp2-client, scripts/debian-packages.txt)")
    with mesh_lab("hc") as lab, ExitStack() as stack:
        for pod in ("server-0", "server-1"):
            program = f"import sys; sys.argv[1:] = [{pod!r}]\n" + SERVER
            stack.enter_context(pod_servers(lab, (pod,), program, PORT))
        yield lab


def h2load(lab: Lab, tmp: Path, *paths: str) -> list[str]:
    """GETs of ``paths`` in order on ONE h2c connection (``h2load -c 1 -m 1``, one request in
    flight): the status of each, in order. (curl 7.88 cannot reuse an h2c connection.)"""
    log = tmp / f"h2load-{secrets.token_hex(4)}.log"
    urls = [f"http://{vip(lab)}:{PORT}{p}" for p in paths]
    out = lab.exec(
        "client", "h2load", "-n", str(len(paths)), "-c", "1", "-m", "1", "-t", "1",
        f"--log-file={log}", *urls, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    return [line.split("\t")[1] for line in log.read_text().splitlines()]


def test_h2c_requests_on_one_connection_with_an_l7_deny(lab: Lab, tmp_path: Path) -> None:
    name = "deny-admin-" + secrets.token_hex(3)
    manifest: dict[str, Any] = {
        "apiVersion": "nodemesh.io/v1alpha1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "action": "DENY",
            "selector": {"matchLabels": {"app": "server"}},
            "rules": [{"to": [{"operation": {"paths": ["/admin*"]}}]}],
        },
    }
    lab.apply(manifest)
    try:
        retry(lambda: _assert(h2load(lab, tmp_path, "/admin/warm"), ["403"]), timeout=40)
        before, source_before = metrics(lab), metrics(lab, "node1")
        result = h2load(lab, tmp_path, "/a", "/admin/users", "/b", "/admin", "/c")
        assert result == ["200", "403", "200", "403", "200"]
        after, source_after = metrics(lab), metrics(lab, "node1")
        denied = {**DEST, "response_code": "403", "response_flags": "RBAC"}
        assert total(after, **denied) - total(before, **denied) == 2
        ok = {**DEST, "response_code": "200", "response_flags": "-", "grpc_response_status": ""}
        assert total(after, **ok) - total(before, **ok) == 3
        source = {"reporter": "source", "request_protocol": "http"}
        assert total(source_after, **source) - total(source_before, **source) == 5
    finally:
        lab.delete(manifest)


def _assert(got: list[str], want: list[str]) -> None:
    assert got == want
