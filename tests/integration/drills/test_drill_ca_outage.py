"""Drill: the CA is unreachable for longer than half a certificate's life.

The lab's CA is restarted with a 16 s maximum lifetime and the agents with it, so every
workload certificate is due for renewal about 7 s after it was issued. The CA is then killed
for 9 s (longer than half the lifetime, shorter than all of it) while pods keep connecting
across nodes, one of them dialling its first HBONE connection during the outage. What must
hold, by count: no connection fails, the agents stay ready and say why they are degraded
(/status, ``nodemesh_certificate_renewal_failing_seconds``, the log), the certificates served
do not change during the outage, and once the CA is back every identity is renewed before its
old certificate expires.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.lab.handle import Lab
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

TTL = 16  # seconds: certificates are due for renewal after 45-50 % of it
NODES = ("node1", "node2")
CLIENT_ID = "spiffe://cluster.local/ns/default/sa/client"


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    with (
        mesh_lab("dc") as lab,
        kept_logs(lab, tmp_path),
        pod_servers(lab, ("server-0", "server-1"), SERVER, PORT),
    ):
        yield lab


def short_lived(lab: Lab) -> None:
    """Restart the CA with a TTL-second lifetime, then the agents, so they hold such certs."""
    lab.kill("ca", signal.SIGTERM)
    lab.start("ca", "--max-ttl", f"{TTL}s", "--min-ttl", "1s")
    for node in NODES:
        lab.kill(f"agent-{node}", signal.SIGTERM)
        lab.start(f"agent-{node}")


def degraded(lab: Lab, node: str) -> list[str]:
    status = admin(lab, node, "/status")
    assert status["ready"] is True, status["not_ready"]
    return list(status["degraded"])


def test_ca_outage_longer_than_half_a_certificate_life(lab: Lab, tmp_path: Path) -> None:
    started = time.monotonic()
    short_lived(lab)
    before = {node: serials(lab, node) for node in NODES}
    expiry = min(
        c["certificate"]["not_after"]
        for node in NODES
        for c in admin(lab, node, "/certs")["certificates"]
    )
    assert all(before.values()), before

    with load(lab, "client", "server-0", tmp_path) as first:
        lab.kill("ca")  # a crash: no goodbye to the agents' channels
        down_at = time.monotonic()
        # Past half the lifetime every identity's renewal has failed; the agents stay ready
        # and say why, and a pod's first HBONE connection still gets a handshake.
        for node in NODES:
            retry(lambda n=node: _assert_all_degraded(lab, n), timeout=TTL)  # type: ignore[misc]
        with load(lab, "neighbor", "server-1", tmp_path) as late:
            while time.monotonic() - down_at < TTL / 2 + 1:
                assert {node: ready(lab, node)[0] for node in NODES} == {"node1": 200, "node2": 200}
                time.sleep(0.5)
            failing = metric(
                lab, "node1", "nodemesh_certificate_renewal_failing_seconds", identity=CLIENT_ID
            )
            refused = metric(lab, "node1", "nodemesh_ca_requests_total", outcome="UNAVAILABLE")
            during = {node: serials(lab, node) for node in NODES}
            sample = degraded(lab, "node1")[0]
            lab.start("ca", "--max-ttl", f"{TTL}s", "--min-ttl", "1s")
            outage = time.monotonic() - down_at
            for node in NODES:
                retry(lambda n=node: _assert_renewed(lab, n, before[n]), timeout=TTL)  # type: ignore[misc]
            recovered = time.monotonic() - down_at
            late_attempts = late.stop()
        first_attempts = first.stop()

    assert during == before  # the certificates held were served, not replaced
    assert failing > 0 and refused > 0
    assert sample.startswith("identity: CA unreachable since ")
    assert ", certificate for spiffe://cluster.local/ns/default/sa/" in sample
    assert " expires at " in sample
    for attempts in (first_attempts, late_attempts):
        assert attempts and all(a.ok for a in attempts), summary(attempts)
    assert metric(lab, "node1", "nodemesh_certificate_renewal_failing_seconds") == 0
    assert "certificate renewal for spiffe://" in agent_log(lab, "node1")
    assert " recovered after " in agent_log(lab, "node1")
    print(
        f"\nCA outage drill: CA down {outage:.1f}s (certificate lifetime {TTL}s, first expiry "
        f"{expiry}); renewed {recovered - outage:.1f}s after the CA was started again; "
        f"client->server-0 {summary(first_attempts)}; neighbor->server-1 (first dialled "
        f"during the outage) {summary(late_attempts)}; failing gauge {failing:.1f}s, "
        f"UNAVAILABLE answers {refused:.0f}; status line: {sample!r}; "
        f"drill {time.monotonic() - started:.1f}s"
    )


def _assert_all_degraded(lab: Lab, node: str) -> None:
    lines = degraded(lab, node)
    held = serials(lab, node)
    assert len(lines) == len(held) > 0, (lines, held)
    assert all(line.startswith("identity: CA unreachable since ") for line in lines), lines


def _assert_renewed(lab: Lab, node: str, old: dict[str, str]) -> None:
    now = serials(lab, node)
    assert now.keys() == old.keys() and all(now[i] != old[i] for i in old), (now, old)
    assert degraded(lab, node) == []
