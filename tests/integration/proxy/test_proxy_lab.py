"""The node proxy in a real lab: agents with eBPF capture, the lab CA, pods in namespaces.

One lab serves the whole module (building one takes seconds); each test removes the policies it
applied and kills the servers it started, also on failure. Default topology: node1 runs client,
neighbor (meshed) and outsider (not meshed); node2 runs server-0 and server-1 (meshed).
"""

from __future__ import annotations

import hashlib
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from agent.lab.handle import Lab
from agent.lab.netns import call_in
from tests.labtools import mesh_lab, pod_servers, retry

pytestmark = [pytest.mark.root, pytest.mark.lab]

PORT = 8080
ECHO_PORT = 8081
CLIENT_ID = "spiffe://cluster.local/ns/default/sa/client"
SERVER_ID = "spiffe://cluster.local/ns/default/sa/server"

# A pod's server. Port 8080, per connection: read until the client half-closes, then answer with
# the peer address, the byte count and the SHA-256 of what arrived, and close. Port 8081: greet
# with the peer address at once, then echo (a connection that stays open).
SERVER = f"""
import hashlib, socket, threading
def listen(port):
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", port))
    srv.listen(64)
    return srv
def digest(conn, peer):
    h, n = hashlib.sha256(), 0
    while data := conn.recv(1 << 16):
        h.update(data)
        n += len(data)
    conn.sendall(f"{{peer[0]}} {{n}} {{h.hexdigest()}}".encode())
    conn.close()
def echo(conn, peer):
    conn.sendall(f"{{peer[0]}}\\n".encode())
    while data := conn.recv(1 << 16):
        conn.sendall(data)
    conn.close()
def serve(srv, handler):
    while True:
        conn, peer = srv.accept()
        threading.Thread(target=handler, args=(conn, peer), daemon=True).start()
threading.Thread(target=serve, args=(listen({ECHO_PORT}), echo), daemon=True).start()
serve(listen({PORT}), digest)
"""


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with (
        mesh_lab("px") as lab,
        pod_servers(lab, ("server-0", "server-1", "neighbor", "outsider"), SERVER, PORT),
    ):
        yield lab


def send(lab: Lab, src: str, dst: str, payload: bytes, port: int = PORT) -> str:
    """From pod ``src`` to pod ``dst``:8080: send, half-close, return the server's answer."""
    ip = lab.pod(dst)["ip"]

    def once() -> str:
        with socket.create_connection((ip, port), timeout=10) as s:
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)
            chunks = []
            while data := s.recv(65536):
                chunks.append(data)
            return b"".join(chunks).decode()

    return call_in(lab.netns(src), once)


def expect(lab: Lab, src: str, dst: str, payload: bytes = b"hello") -> str:
    """The peer address the server saw, after checking it got exactly ``payload``."""
    answer = send(lab, src, dst, payload)
    peer, n, digest = answer.split()
    assert (int(n), digest) == (len(payload), hashlib.sha256(payload).hexdigest())
    return peer


def refused(lab: Lab, src: str, dst: str, port: int = PORT) -> bool:
    try:
        return send(lab, src, dst, b"x", port) == ""
    except OSError:
        return True


def agent_log(lab: Lab, node: str) -> str:
    return (lab.state_dir / "logs" / f"agent-{node}.log").read_text()


def _assert_true(value: bool) -> None:
    assert value


@contextmanager
def policy(lab: Lab, kind: str, spec: dict[str, Any]) -> Iterator[None]:
    manifest = {
        "apiVersion": "nodemesh.io/v1alpha1",
        "kind": kind,
        "metadata": {"name": "t" + secrets.token_hex(3), "namespace": "default"},
        "spec": spec,
    }
    lab.apply(manifest)
    try:
        yield
    finally:
        lab.delete(manifest)


@contextmanager
def capture(
    lab: Lab,
    node: str,
    path: Path,
    *,
    interface: str = "eth0",
    expression: str = "tcp",
    until: bytes | None = None,
) -> Iterator[None]:
    """tcpdump on ``node`` (its uplink by default) for the duration of the block.

    With ``until``, the block's end waits (10 s at most) for those bytes to be in the file before
    tcpdump is stopped: SIGINT ends tcpdump without reading what the kernel still holds for it,
    so on a loaded machine the block's last packets could be missing from the capture."""
    cmd = ["tcpdump", "-i", interface, "-U", "--immediate-mode", "-w", str(path), expression]
    proc = lab.popen(node, *cmd, stderr=subprocess.PIPE)
    try:
        assert proc.stderr is not None
        proc.stderr.readline()  # "listening on eth0 ..." once it captures
        yield
        deadline = time.monotonic() + 10
        while until is not None and until not in path.read_bytes() and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=10)


def test_cross_node_is_mtls_on_the_wire_and_keeps_the_client_ip(lab: Lab, tmp_path: Path) -> None:
    secret = b"SECRET-" + secrets.token_hex(8).encode()
    control = b"PLAIN-" + secrets.token_hex(8).encode()
    pcap = tmp_path / "uplink.pcap"
    with capture(lab, "node1", pcap, until=control):
        assert expect(lab, "client", "server-0", secret) == lab.pod("client")["ip"]
        assert expect(lab, "outsider", "server-0", control) == lab.pod("outsider")["ip"]
    wire = pcap.read_bytes()
    assert control in wire  # the capture sees plaintext when there is plaintext
    assert secret not in wire
    summary = subprocess.run(["tcpdump", "-nn", "-r", str(pcap)], capture_output=True, text=True)
    assert f"{lab.pod('server-0')['ip']}.15008" in summary.stdout


def test_identities_on_both_ends_are_the_pods(lab: Lab) -> None:
    """The server end presents the server pod's identity (checked by a TLS client holding the
    client pod's certificate from the lab CA), and sees the client pod's identity (an ALLOW on
    that principal admits the client and nobody else)."""
    server_ip = lab.pod("server-0")["ip"]
    assert handshake(lab, server_ip, expect_peer=SERVER_ID) == "ok"
    assert handshake(lab, server_ip, expect_peer=CLIENT_ID).startswith("PeerIdentityError")
    only_client = {"from": [{"source": {"principals": ["cluster.local/ns/default/sa/client"]}}]}
    with policy(lab, "AuthorizationPolicy", {"action": "ALLOW", "rules": [only_client]}):
        retry(lambda: _assert_true(refused(lab, "neighbor", "server-0")))
        assert expect(lab, "client", "server-0") == lab.pod("client")["ip"]


# Runs in node1's namespace: get the client pod's certificate from the lab CA (node1's token) and
# complete an mTLS handshake with the HBONE port, requiring the server to be ``expect_peer``.
HANDSHAKE = """
import asyncio, sys
from pathlib import Path
from agent.identity.caclient import CaClient
from agent.identity.spiffe import SpiffeId
from agent.identity.tls import client_context

async def main():
    ca, root, token, server_ip, expect_peer = sys.argv[1:6]
    client = CaClient(ca, root_file=Path(root), token_file=Path(token))
    try:
        cert = await client.fetch(SpiffeId.parse("spiffe://cluster.local/ns/default/sa/client"))
    finally:
        await client.close()
    ctx = client_context(cert, expect_peer)
    ctx.set_alpn_protocols(["h2"])
    try:
        _, writer = await asyncio.open_connection(server_ip, 15008, ssl=ctx, server_hostname="")
        writer.close()
        print("ok")
    except Exception as e:
        print(type(e).__name__, e)

asyncio.run(main())
"""


def handshake(lab: Lab, server_ip: str, *, expect_peer: str) -> str:
    ca = f"{lab.status()['ca']['ip']}:15012"
    root, token = lab.state_dir / "ca" / "root.pem", lab.state_dir / "tokens" / "node1"
    args = [sys.executable, "-c", HANDSHAKE, ca, str(root), str(token), server_ip, expect_peer]
    out = lab.exec("node1", *args, capture_output=True, text=True, timeout=60, check=True)
    return out.stdout.strip()


def test_large_transfer_is_byte_exact_with_half_close(lab: Lab) -> None:
    payload = secrets.token_bytes(32 * 1024 * 1024)
    assert expect(lab, "client", "server-0", payload) == lab.pod("client")["ip"]


def test_same_node_meshed_works_without_tls(lab: Lab, tmp_path: Path) -> None:
    """No HBONE for a same-node destination: on every interface of node1, port 15008 carries
    traffic to server-0 (the control) and none to neighbor."""
    pcap = tmp_path / "hbone.pcap"
    with capture(lab, "node1", pcap, interface="any", expression="tcp port 15008"):
        assert expect(lab, "client", "neighbor") == lab.pod("client")["ip"]
        assert expect(lab, "client", "server-0") == lab.pod("client")["ip"]
    summary = subprocess.run(["tcpdump", "-nn", "-r", str(pcap)], capture_output=True, text=True)
    assert f"{lab.pod('server-0')['ip']}.15008" in summary.stdout
    assert f"{lab.pod('neighbor')['ip']}.15008" not in summary.stdout


def test_passthrough_to_a_pod_outside_the_mesh(lab: Lab) -> None:
    assert expect(lab, "client", "outsider") == lab.node("node1")["ip"]


def test_service_vip_reaches_an_endpoint_through_the_mesh(lab: Lab) -> None:
    vip = next(s for s in lab.status()["services"] if s["name"] == "server")["clusterIP"]

    def once() -> str:
        with socket.create_connection((vip, 80), timeout=10) as s:
            s.shutdown(socket.SHUT_WR)
            return s.recv(1024).decode()

    answers = [call_in(lab.netns("client"), once) for _ in range(4)]
    assert [a.split()[0] for a in answers] == [lab.pod("client")["ip"]] * 4


def test_deny_blocks_and_allow_admits_exactly_what_it_says(lab: Lab) -> None:
    from_client = {"source": {"principals": ["cluster.local/ns/default/sa/client"]}}
    deny_client = {"action": "DENY", "rules": [{"from": [from_client]}]}
    with policy(lab, "AuthorizationPolicy", deny_client):
        retry(lambda: _assert_true(refused(lab, "client", "server-0")))
        assert expect(lab, "neighbor", "server-0") == lab.pod("neighbor")["ip"]
    neighbor_to_port = {
        "from": [{"source": {"principals": ["*/sa/neighbor"]}}],
        "to": [{"operation": {"ports": [str(PORT)]}}],
    }
    allow_neighbor = {"action": "ALLOW", "rules": [neighbor_to_port]}
    with policy(lab, "AuthorizationPolicy", allow_neighbor):
        # Only the new policy refuses this one (the old state admitted it): wait for it.
        retry(lambda: _assert_true(refused(lab, "neighbor", "server-0", ECHO_PORT)))
        assert refused(lab, "client", "server-0")
        assert expect(lab, "neighbor", "server-0") == lab.pod("neighbor")["ip"]
    retry(lambda: _assert_true(expect(lab, "client", "server-0") == lab.pod("client")["ip"]))
    assert "policy_denied" in agent_log(lab, "node2")


def test_strict_refuses_the_outsider_and_permissive_admits_it(lab: Lab) -> None:
    assert expect(lab, "outsider", "server-0") == lab.pod("outsider")["ip"]
    with policy(lab, "PeerAuthentication", {"mtls": {"mode": "STRICT"}}):
        retry(lambda: _assert_true(refused(lab, "outsider", "server-0")))
        assert expect(lab, "client", "server-0") == lab.pod("client")["ip"]  # mTLS still fine
    with policy(lab, "PeerAuthentication", {"mtls": {"mode": "PERMISSIVE"}}):
        outsider_ip = lab.pod("outsider")["ip"]
        retry(lambda: _assert_true(expect(lab, "outsider", "server-0") == outsider_ip))


def test_applying_a_deny_closes_a_live_connection(lab: Lab) -> None:
    ip = lab.pod("server-0")["ip"]

    def open_conn() -> tuple[socket.socket, bytes]:
        s = socket.create_connection((ip, ECHO_PORT), timeout=30)
        return s, s.recv(1024)  # the greeting: the connection is live end to end

    sock, greeting = call_in(lab.netns("client"), open_conn)
    try:
        assert greeting == f"{lab.pod('client')['ip']}\n".encode()
        with policy(lab, "AuthorizationPolicy", {"action": "DENY", "rules": [{}]}):
            try:
                data = sock.recv(1024)  # nothing more arrives unless the connection is closed
            except ConnectionResetError:
                data = b""
            assert data == b""
    finally:
        sock.close()
