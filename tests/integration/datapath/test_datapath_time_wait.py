"""A client reusing a source port while the node still holds the last connection of that
4-tuple in TIME_WAIT.

The proxy's side of a captured connection lives in the node's namespace, with the 4-tuple the
client sees. When the proxy closes first (the server ended the response), that socket waits out
TIME_WAIT there (60 s), while the client's namespace holds nothing for the tuple, so the
client's kernel may pick the same source port again. Handed straight to the listener, the new
SYN skipped the TIME_WAIT rules and the kernel refused the connection request because the tuple
was taken: every retransmission was dropped until TIME_WAIT ended, so the client's connect
timed out (the kube API drill's 10 s hang, about once in 150 connections under load).
"""

from __future__ import annotations

import pytest

from agent.lab.handle import Lab
from tests.integration.datapath.harness import NodeDatapath, serve
from tests.integration.datapath.harness import pod_ip as ip

pytestmark = [pytest.mark.root, pytest.mark.lab, pytest.mark.usefixtures("servers")]

# One connection from argv[3] (0: any) to argv[1]:argv[2]: print "<source port> <first line>"
# (or "<source port> ERR <reason>"), reading until the other side closes, so that side closes
# first and its socket is the one left in TIME_WAIT.
REUSE_CLIENT = """
import socket, sys
ip, port, source_port, timeout = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", source_port))
s.settimeout(timeout)
try:
    s.connect((ip, port))
    f = s.makefile()
    line = f.readline().strip()
    f.read()
    print(s.getsockname()[1], line)
except OSError as e:
    print(s.getsockname()[1], "ERR", type(e).__name__)
finally:
    s.close()
"""
# Well below TIME_WAIT's 60 s (the old behaviour's stall); the reconnect takes milliseconds.
CONNECT_TIMEOUT = 20.0


def _connect_from(
    lab: Lab, pod: str, ip: str, port: int, source_port: int, timeout: float = CONNECT_TIMEOUT
) -> tuple[int, str]:
    out = lab.exec(
        pod, "python3", "-c", REUSE_CLIENT, ip, str(port), str(source_port), str(timeout),
        capture_output=True, text=True, timeout=timeout + 10,
    )  # fmt: skip
    used, line = out.stdout.strip().split(" ", 1)
    return int(used), line


def _time_wait(lab: Lab, node: str, local: str, peer: str) -> bool:
    """Does ``node``'s namespace hold a TIME_WAIT socket ``local`` <-> ``peer``?"""
    out = lab.exec(node, "ss", "-Htan", capture_output=True, text=True, check=True).stdout
    return any(line.split()[:1] == ["TIME-WAIT"] and line.split()[3:5] == [local, peer]
               for line in out.splitlines())  # fmt: skip


@pytest.mark.parametrize(
    ("pod", "dst", "port", "listener", "program"),
    [
        # a meshed pod's connection, captured at its veth for the outbound listener
        ("client", "plain", 8080, "OUTBOUND", "pod_ingress"),
        # a connection from another node to the HBONE port of a local meshed pod, captured at
        # the uplink (the kernel's TIME_WAIT rule finds our own listener on that port)
        ("plain", "neighbor", 15008, "HBONE", "uplink_ingress"),
    ],
)
def test_source_port_reused_while_the_proxy_side_is_in_time_wait(
    dplab: Lab, node1: NodeDatapath, pod: str, dst: str, port: int, listener: str, program: str
) -> None:
    src_ip, dst_ip = ip(dplab, pod), ip(dplab, dst)
    used, first = _connect_from(dplab, pod, dst_ip, port, 0)
    assert first == f"{listener} {dst_ip}:{port}"
    # The precondition: the listener's side closed first and waits out TIME_WAIT in node1.
    assert _time_wait(dplab, "node1", f"{dst_ip}:{port}", f"{src_ip}:{used}")

    again, second = _connect_from(dplab, pod, dst_ip, port, used)

    assert again == used
    assert second == f"{listener} {dst_ip}:{port}", "a SYN reusing a TIME_WAIT tuple was dropped"
    assert [a[1] for a in node1.accepted] == [(src_ip, used), (src_ip, used)]
    assert node1.datapath is not None
    assert node1.datapath.counters()[program]["time_wait"] == 1


def test_a_reused_tuple_never_reaches_a_service_of_the_node(
    dplab: Lab, node1: NodeDatapath
) -> None:
    """The kernel's answer to a SYN that reopens a TIME_WAIT tuple may be the listener of its
    destination port: when the node itself serves that port (a hostNetwork daemon; a
    transparent one, which can answer for the pod's address), the pod's SYN must not be handed
    to it, past the mesh."""
    plain, client = ip(dplab, "plain"), ip(dplab, "client")
    # The node's own service on the port, transparent: it may answer for the pod's address.
    node_service = serve(dplab, "node1", 8080, transparent=True)
    try:
        used, first = _connect_from(dplab, "client", plain, 8080, 0)
        assert first == f"OUTBOUND {plain}:8080"
        assert _time_wait(dplab, "node1", f"{plain}:8080", f"{client}:{used}")

        _, second = _connect_from(dplab, "client", plain, 8080, used, timeout=3.0)
    finally:
        node_service.kill()
        node_service.wait()

    assert second != f"server {client}", "the pod's SYN reached a service of the node"
