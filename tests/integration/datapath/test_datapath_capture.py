"""Capture decisions on a real kernel: which connections reach which listener, and which not."""

from __future__ import annotations

import subprocess

import pytest

from agent.lab.handle import Lab
from tests.integration.datapath.harness import NodeDatapath, connect
from tests.integration.datapath.harness import pod_ip as ip

pytestmark = [pytest.mark.root, pytest.mark.lab]


@pytest.mark.usefixtures("servers")
def test_meshed_client_to_other_node_arrives_at_outbound_with_original_destination(
    dplab: Lab, node1: NodeDatapath
) -> None:
    server = ip(dplab, "server")
    assert connect(dplab, "client", server, 8080) == f"OUTBOUND {server}:8080"
    counters = node1.datapath.counters()["pod_ingress"]  # type: ignore[union-attr]
    assert counters["captured"] == 1
    assert counters["owned"] >= 1  # the handshake's last ACK went to the accepted socket


@pytest.mark.usefixtures("servers")
def test_meshed_client_to_same_node_pod_arrives_at_outbound(
    dplab: Lab, node1: NodeDatapath
) -> None:
    neighbor = ip(dplab, "neighbor")
    assert connect(dplab, "client", neighbor, 8080) == f"OUTBOUND {neighbor}:8080"


@pytest.mark.usefixtures("servers", "node1")
def test_non_meshed_pod_to_non_meshed_destination_is_not_captured(dplab: Lab) -> None:
    outsider = ip(dplab, "outsider")
    assert connect(dplab, "outsider", ip(dplab, "plain"), 8080) == f"server {outsider}"
    # node2 runs no datapath here, so a meshed destination there is reached directly too
    assert connect(dplab, "outsider", ip(dplab, "server"), 8080) == f"server {outsider}"


@pytest.mark.usefixtures("servers", "node1")
def test_non_meshed_pod_to_meshed_local_pod_arrives_at_inbound(dplab: Lab) -> None:
    neighbor = ip(dplab, "neighbor")
    assert connect(dplab, "outsider", neighbor, 8080) == f"INBOUND {neighbor}:8080"


@pytest.mark.usefixtures("servers", "node1")
def test_traffic_from_another_node_to_meshed_pod_arrives_at_inbound_or_hbone(dplab: Lab) -> None:
    client = ip(dplab, "client")
    assert connect(dplab, "plain", client, 8080) == f"INBOUND {client}:8080"
    assert connect(dplab, "plain", client, 15008) == f"HBONE {client}:15008"
    # to a pod that is not meshed, the uplink leaves traffic alone
    assert connect(dplab, "plain", ip(dplab, "outsider"), 8080) == f"server {ip(dplab, 'plain')}"


@pytest.mark.usefixtures("servers", "node1")
def test_excluded_ports_bypass_capture(dplab: Lab) -> None:
    client, neighbor = ip(dplab, "client"), ip(dplab, "neighbor")
    # client excludes outbound 9090; neighbor excludes inbound 7070
    assert connect(dplab, "client", ip(dplab, "plain"), 9090) == f"server {client}"
    assert (
        connect(dplab, "client", ip(dplab, "plain"), 8080) == f"OUTBOUND {ip(dplab, 'plain')}:8080"
    )
    assert connect(dplab, "outsider", neighbor, 7070) == f"server {ip(dplab, 'outsider')}"
    assert connect(dplab, "plain", neighbor, 7070) == f"server {ip(dplab, 'plain')}"
    assert connect(dplab, "plain", neighbor, 8080) == f"INBOUND {neighbor}:8080"


@pytest.mark.usefixtures("servers")
def test_joining_and_leaving_the_mesh_is_a_map_update(dplab: Lab, node1: NodeDatapath) -> None:
    assert node1.datapath is not None
    programs_before = node1.datapath.program_stats()
    outsider, plain = ip(dplab, "outsider"), ip(dplab, "plain")

    node1.annotate("outsider", meshed=True)
    plan = node1.reconcile()
    assert [e.ip for e in plan.put] == [outsider] and not plan.attach_pod
    assert connect(dplab, "outsider", plain, 8080) == f"OUTBOUND {plain}:8080"

    node1.annotate("outsider", meshed=False)
    node1.reconcile()
    assert connect(dplab, "outsider", plain, 8080) == f"server {outsider}"
    ids = {k: v["id"] for k, v in node1.datapath.program_stats().items()}
    assert ids == {k: v["id"] for k, v in programs_before.items()}  # no reload


def test_reconcile_twice_changes_nothing_and_removes_departed_pods(
    dplab: Lab, node1: NodeDatapath
) -> None:
    assert node1.reconcile().empty
    with node1.store.update() as txn:
        txn.delete("workloads", "default/neighbor")
    plan = node1.reconcile()
    assert plan.delete == (ip(dplab, "neighbor"),)
    assert len(plan.detach) == 1  # the departed pod's interface loses its filter
    assert node1.reconcile().empty


UDP_ECHO = """
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", 5353))
print("listening", flush=True)
data, peer = s.recvfrom(100)
s.sendto(data + b" from " + peer[0].encode(), peer)
"""

UDP_ASK = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(3)
s.sendto(b"hello", (sys.argv[1], 5353))
print(s.recv(100).decode())
"""


@pytest.mark.usefixtures("node1")
def test_non_tcp_traffic_of_a_meshed_pod_is_untouched(dplab: Lab) -> None:
    echo = dplab.popen("plain", "python3", "-c", UDP_ECHO, stdout=subprocess.PIPE, text=True)
    try:
        assert echo.stdout is not None and echo.stdout.readline().strip() == "listening"
        answer = dplab.exec(
            "client", "python3", "-c", UDP_ASK, ip(dplab, "plain"),
            capture_output=True, text=True, timeout=10,
        )  # fmt: skip
        assert answer.stdout.strip() == f"hello from {ip(dplab, 'client')}"
    finally:
        echo.kill()
        echo.wait()
