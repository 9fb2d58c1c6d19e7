"""Link-local destinations (169.254.0.0/16: the cloud metadata service) are not captured.

Captured, a meshed pod's connection to 169.254.169.254 was made by the node proxy from the
node's own namespace and address, past what holds pods back from the metadata service and its
node credentials: firewall rules on the pods' addresses, or IMDSv2's hop limit of 1, which a
pod one hop away cannot meet and the node itself does. Nothing there is meshed, so the mesh
adds nothing: the pod's SYN goes on uncaptured, as an excluded port's does (counter
``exempt``), and reaches the service from the pod's own address."""

from __future__ import annotations

import pytest

from agent.lab.handle import Lab
from tests.integration.datapath.harness import NodeDatapath, connect, serve
from tests.integration.datapath.harness import pod_ip as ip

pytestmark = [pytest.mark.root, pytest.mark.lab]

METADATA = "169.254.169.254"


def test_a_meshed_pods_connection_to_a_link_local_address_is_not_captured(
    dplab: Lab, node1: NodeDatapath
) -> None:
    # The "metadata service": an address of node1's own (the lab's namespace, gone with it).
    dplab.exec("node1", "ip", "addr", "add", f"{METADATA}/32", "dev", "lo", check=True)
    server = serve(dplab, "node1", 8080)
    try:
        answer = connect(dplab, "client", METADATA, 8080)
    finally:
        server.kill()
        server.wait()
    assert answer == f"server {ip(dplab, 'client')}"  # not "OUTBOUND 169.254.169.254:8080"
    assert node1.datapath.counters()["pod_ingress"]["exempt"] == 1  # type: ignore[union-attr]
