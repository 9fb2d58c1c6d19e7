"""Drill: the Kubernetes API goes away and comes back having forgotten its history (410).

node1's agent watches a fake API server (``tests/fakeapi``, in node1's namespace) instead of the
cluster file. The server then answers 503 to everything and cuts every watch for a few seconds
while a pod keeps connecting across nodes; during the outage a pod is meshed in the server's
store (as if another API server replica took the write), and the server comes back compacted,
so every watch resume gets 410 Gone and must relist. What must hold: the agent keeps its last
state (ready, 0 failed connections, no datapath change, the same certificates), every resource
relists, and after the relist exactly the change made during the outage is applied.
"""

from __future__ import annotations

import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from agent.lab import netns
from agent.lab.handle import Lab
from tests.fakeapi import FakeApiServer
from tests.fakeapi.objects import pod
from tests.integration.drills.drilltools import (
    PORT,
    SERVER,
    admin,
    agent_log,
    kept_logs,
    load,
    metric,
    ready,
    serials,
    summary,
)
from tests.labtools import mesh_lab, pod_servers, retry

pytestmark = [pytest.mark.root, pytest.mark.lab]

OUTAGE = 4.0  # seconds of 503s: several retries of every reflector's backoff
OUTSIDER_ID = "spiffe://cluster.local/ns/default/sa/outsider"
# Every kernel change the reconciler makes is logged with one of these.
DATAPATH_CHANGE = re.compile(r"datapath: (pod \S+ (meshed|local)|attached|detached|pod \S+ rem)")


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    with (
        mesh_lab("dk") as lab,
        kept_logs(lab, tmp_path),
        pod_servers(lab, ("server-0",), SERVER, PORT),
    ):
        yield lab


@pytest.fixture
def api(lab: Lab) -> Iterator[FakeApiServer]:
    """A fake API server on node1's loopback holding the lab's namespace and pods."""
    server = netns.call_in(lab.netns("node1"), FakeApiServer)
    with server:
        server.create("Namespace", {"metadata": {"name": "default", "labels": {}}}, namespace="")
        for p in lab.status()["pods"]:
            annotations = {"nodemesh.io/mesh": "enabled"} if p["meshed"] else {}
            server.create(
                "Pod",
                pod(
                    p["name"], p["ip"], node=p["node"], sa=p["serviceAccount"],
                    labels={"app": p["name"]}, annotations=annotations,
                ),
            )  # fmt: skip
        yield server


def kube_mode(lab: Lab, api: FakeApiServer, tmp: Path) -> None:
    """Restart node1's agent on the fake API server instead of the cluster file."""
    kubeconfig = tmp / "kubeconfig"
    kubeconfig.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "fake", "cluster": {"server": api.url}}],
                "users": [{"name": "agent", "user": {"token": "t"}}],
                "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "agent"}}],
                "current-context": "fake",
            }
        )
    )
    lab.kill("agent-node1", signal.SIGTERM)
    lab.start("agent-node1", "--kubeconfig", str(kubeconfig), without=("--cluster-file",))


def sync_stats(lab: Lab) -> dict[str, dict[str, int]]:
    state = admin(lab, "node1", "/status")["state"]
    assert state["source"] == "kubernetes", state
    return dict(state["sync"])


def datapath_changes(lab: Lab) -> list[str]:
    return [line for line in agent_log(lab, "node1").splitlines() if DATAPATH_CHANGE.search(line)]


def test_kube_api_down_and_back_with_410(lab: Lab, api: FakeApiServer, tmp_path: Path) -> None:
    started = time.monotonic()
    kube_mode(lab, api, tmp_path)
    outsider_ip = str(lab.pod("outsider")["ip"])
    before_certs = serials(lab, "node1")
    before_datapath = admin(lab, "node1", "/datapath")["datapath"]
    before_changes = datapath_changes(lab)
    before_stats = sync_stats(lab)
    assert OUTSIDER_ID not in before_certs

    with load(lab, "client", "server-0", tmp_path) as traffic:
        api.available = False
        api.restart()  # every watch is cut and every request now gets 503
        down_at = time.monotonic()
        readiness = []
        while time.monotonic() - down_at < OUTAGE:
            readiness.append(ready(lab, "node1")[0])
            time.sleep(0.25)
        api.patch("Pod", "outsider", {"metadata": {"annotations": {"nodemesh.io/mesh": "enabled"}}})
        time.sleep(0.5)
        during_certs = serials(lab, "node1")
        during_datapath = admin(lab, "node1", "/datapath")["datapath"]
        during_changes = datapath_changes(lab)
        errors = metric(lab, "node1", "nodemesh_state_sync_events_total", event="errors")
        api.restart(forget_history=True)  # resumes from before the patch get 410 Gone
        api.available = True
        up_at = time.monotonic()
        retry(lambda: _assert_meshed_with_certificate(lab, outsider_ip), timeout=30)
        converged = time.monotonic() - up_at
        # Each reflector resumes when its own backoff (up to 10 s) ends, then relists.
        retry(lambda: _assert_relisted(before_stats, sync_stats(lab)), timeout=30)
        relisted = time.monotonic() - up_at
        attempts = traffic.stop()

    after_certs = serials(lab, "node1")
    after_datapath = admin(lab, "node1", "/datapath")["datapath"]
    # SYNs that reused a 4-tuple node1 still held in TIME_WAIT (handed to that socket, see
    # capture.h): the cause of this drill's old 10 s connect timeouts, for the report.
    reused = after_datapath["counters"]["pod_ingress"]["time_wait"]
    after_stats = sync_stats(lab)
    new_changes = datapath_changes(lab)[len(before_changes) :]

    # Last state kept while the API was down.
    assert set(readiness) == {200}, readiness
    assert attempts and all(a.ok for a in attempts), summary(attempts)
    assert during_certs == before_certs
    assert during_changes == before_changes
    for key in ("generation", "attachments", "pods"):
        assert during_datapath[key] == before_datapath[key] == after_datapath[key], key
    assert errors > 0
    # Every resource relisted after its 410; nothing else moved but the one change.
    assert {i: after_certs[i] for i in before_certs} == before_certs
    assert set(after_certs) - set(before_certs) == {OUTSIDER_ID}
    assert len(new_changes) == 1 and f"datapath: pod {outsider_ip} meshed" in new_changes[0]
    assert "watch expired" in agent_log(lab, "node1") and "relisting" in agent_log(lab, "node1")
    print(
        f"\nKubernetes API drill: API down {OUTAGE + 0.5:.1f}s (503, watches cut), back with "
        f"history compacted; {len(after_stats)} resources relisted within {relisted:.1f}s; "
        f"change made during the outage applied {converged:.2f}s after the API returned; "
        f"client->server-0 "
        f"{summary(attempts)} ({reused} reused a source port node1 held in TIME_WAIT); "
        f"readiness {len(readiness)} probes all 200; sync errors counted "
        f"{errors:.0f}; datapath changes across the outage: {len(new_changes)}; "
        f"drill {time.monotonic() - started:.1f}s"
    )


def _assert_meshed_with_certificate(lab: Lab, ip: str) -> None:
    local = admin(lab, "node1", "/workloads?local=1")["workloads"]
    assert any(w["meshed"] and ip in w["ips"] for w in local), local
    assert OUTSIDER_ID in serials(lab, "node1")


def _assert_relisted(before: dict[str, dict[str, int]], after: dict[str, dict[str, int]]) -> None:
    for resource, stats in after.items():
        assert stats["gone"] > before[resource]["gone"], (resource, stats)
        assert stats["lists"] > before[resource]["lists"], (resource, stats)
