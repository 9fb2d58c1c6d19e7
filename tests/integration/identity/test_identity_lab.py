"""Identity in a real lab: the CA in its own namespace, agents per node, the node check over the
lab network, and a newly meshed pod getting its certificate."""

from __future__ import annotations

import json
import sys
import time

import pytest

from agent.lab.handle import Lab

pytestmark = [pytest.mark.root, pytest.mark.lab]

# Runs inside a node's network namespace: ask the lab CA for one identity with a node's token.
FETCH = """
import asyncio, json, sys
from pathlib import Path
from agent.identity.caclient import CaClient, CaError
from agent.identity.spiffe import SpiffeId

async def main():
    address, root, token, identity = sys.argv[1:5]
    client = CaClient(address, root_file=Path(root), token_file=Path(token))
    try:
        cert = await client.fetch(SpiffeId.parse(identity))
        print(json.dumps({"ok": True, "identity": str(cert.identity)}))
    except CaError as e:
        print(json.dumps({"ok": False, "code": e.code.name if e.code else None}))
    finally:
        await client.close()

asyncio.run(main())
"""


def fetch(lab: Lab, node: str, token_node: str, identity: str) -> dict[str, object]:
    ca = lab.status()["ca"]
    out = lab.exec(
        node, sys.executable, "-c", FETCH, f"{ca['ip']}:15012",
        str(lab.state_dir / "ca" / "root.pem"), str(lab.state_dir / "tokens" / token_node),
        identity, capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    result: dict[str, object] = json.loads(out.stdout)
    return result


def identity(sa: str) -> str:
    return f"spiffe://cluster.local/ns/default/sa/{sa}"


def wait_for_log(lab: Lab, text: str, timeout: float = 30.0) -> None:
    log = lab.state_dir / "logs" / "ca.log"
    deadline = time.monotonic() + timeout
    while text not in log.read_text():
        assert time.monotonic() < deadline, f"{text!r} never appeared in {log}"
        time.sleep(0.2)


def test_agents_get_their_identities_and_nodes_stay_in_their_lane(lab: Lab) -> None:
    status = lab.status()
    if status["ca"]["state"] != "running":
        pytest.skip("this build's lab runs no CA")
    meshed = {(p["node"], p["serviceAccount"]) for p in status["pods"] if p["meshed"]}
    for node, sa in meshed:
        wait_for_log(lab, f"issued {identity(sa)} to node agent on {node}")

    assert fetch(lab, "node1", "node1", identity("client")) == {
        "ok": True,
        "identity": identity("client"),
    }
    refused = fetch(lab, "node1", "node1", identity("server"))
    assert refused == {"ok": False, "code": "PERMISSION_DENIED"}
    assert fetch(lab, "node2", "node2", identity("server"))["ok"] is True

    lab.annotate("outsider", "nodemesh.io/mesh=enabled")
    wait_for_log(lab, f"issued {identity('outsider')} to node agent on node1")
    for log in (lab.state_dir / "logs").glob("*.log"):
        assert "PRIVATE KEY" not in log.read_text()
