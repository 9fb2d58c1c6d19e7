"""``nodemesh lab upgrade`` under load: 100 long-lived streams and steady new connections over
HBONE, same-node and plaintext paths while node1's and then node2's agent is replaced.

Counts only (resets, failed new connections, escapes from capture): the stall is a timing and
is reported by ``make bench`` (its "upgrade" section runs the same ``bench.upgrade``).
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.lab import components, control, netns
from agent.lab.handle import Lab
from agent.lab.topology import LabError
from bench import upgrade
from tests.labtools import mesh_lab, retry

pytestmark = [pytest.mark.root, pytest.mark.lab]


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with mesh_lab("up", drain_seconds=upgrade.DRAIN_SECONDS) as built:
        yield built


@pytest.fixture(scope="module")
def measured(lab: Lab) -> dict[str, Any]:
    return upgrade.run(lab, upgrade.UpgradeSettings())


@pytest.mark.parametrize("node", ["node1", "node2"])
def test_an_upgrade_resets_nothing_fails_nothing_and_leaks_nothing(
    measured: dict[str, Any], node: str
) -> None:
    phase = measured["phases"][node]
    summary = {k: phase[k] for k in ("resets", "new_failed", "escapes", "link")}
    assert phase["long_lived"] == 100
    assert phase["new_ok"] > 0, phase["flows"]
    assert {r["path"] for r in phase["flows"]} == {"hbone", "local", "plaintext"}
    assert (phase["resets"], phase["new_failed"], phase["escapes"]) == (0, 0, 0), summary
    # The old agent drained until its last connection closed, not until its hour was up.
    assert phase["upgrade"]["old_agent_exited"], phase["upgrade"]


@pytest.mark.parametrize("node", ["node1", "node2"])
def test_readiness_metrics_and_admin_never_looked_down_during_an_upgrade(
    measured: dict[str, Any], node: str
) -> None:
    probes = measured["phases"][node]["probes"]
    assert probes["down"] == {}, probes["reasons"]
    assert set(probes["ok"]) == {"readiness", "metrics", "admin"}


def test_the_baseline_without_an_upgrade_is_clean_too(measured: dict[str, Any]) -> None:
    phase = measured["phases"]["baseline"]
    assert (phase["resets"], phase["new_failed"], phase["escapes"]) == (0, 0, 0)


def test_after_the_old_agents_exited_the_new_ones_hold_the_datapath(
    lab: Lab, measured: dict[str, Any]
) -> None:
    """The old agents' exit removed none of the pins, filters, rule or listeners in use."""
    labdir, plan = control.load(lab.name)
    for node in plan.nodes:
        new_pid = measured["phases"][node.name]["upgrade"]["new_pid"]
        assert labdir.pids()[f"agent-{node.name}"] == new_pid
        assert components.agent_ready(node)
        status, body = netns.http_get(node.netns, "127.0.0.1", 15000, "/datapath", timeout=5)
        datapath = json.loads(body)["datapath"]
        assert status == 200 and set(datapath["listeners"]) == {"outbound", "inbound", "hbone"}
        assert "eth0" in datapath["attachments"] and datapath["pods"] > 0
        rules = lab.exec(node.name, "ip", "rule", capture_output=True, text=True, check=True)
        assert "lookup 1539" in rules.stdout


def test_an_upgrade_to_new_programs_keeps_the_old_agents_flows() -> None:
    """The new agent compiles another generation (here: another capture mark), swaps every
    filter and unpins the old generation while the old agent still serves its connections
    through the programs' socket lookup."""
    with mesh_lab("ug", drain_seconds=upgrade.DRAIN_SECONDS) as lab:
        labdir, _ = control.load(lab.name)
        argv = labdir.command("agent-node1")
        assert argv is not None
        labdir.record_command(
            "agent-node1", (*argv, "--capture-mark", "0x2539", "--route-table", "2539")
        )
        settings = upgrade.UpgradeSettings(long_lived=40, settle_seconds=2.0)
        phase = upgrade.run(lab, settings, nodes=("node1",))["phases"]["node1"]
        pins = sorted(p.name for p in Path(lab.node("node1")["pinDir"]).iterdir())
    assert (phase["resets"], phase["new_failed"], phase["escapes"]) == (0, 0, 0), phase["link"]
    assert phase["long_lived"] == 40 and phase["upgrade"]["old_agent_exited"]
    assert len(pins) == 1, pins  # only the new generation is left pinned


def test_a_sigterm_before_the_takeover_waits_for_it(lab: Lab, measured: dict[str, Any]) -> None:
    """On a cluster the old pod can be deleted before the new agent is ready (the kubelet's
    probe of the new pod reached the old agent): the old agent keeps serving, readiness
    included, until the new one has taken over, and only then drains. The CA is paused so that
    the new agent cannot be ready (no certificates) when the old one gets SIGTERM."""
    del measured  # runs after the measurement, on the same lab
    labdir, plan = control.load(lab.name)
    node = next(n for n in plan.nodes if n.name == "node2")
    component = components.agent_component(plan, labdir, node)
    old, ca = labdir.pids()[component.name], labdir.pids()["ca"]
    log = labdir.log_file(component.name)
    prober = upgrade.Prober(lab, "node2")
    prober.start()
    os.kill(ca, signal.SIGSTOP)
    try:
        seen = len(log.read_text(encoding="utf-8", errors="replace"))
        new = components.start(component, labdir)
        retry(lambda: _assert_logged(log, seen, "started beside this one"), timeout=60)
        os.kill(old, signal.SIGTERM)
        retry(lambda: _assert_logged(log, seen, "stop requested while another agent takes over"))
        time.sleep(1.0)
        assert components.alive(old)
    finally:
        os.kill(ca, signal.SIGCONT)
    components.wait_taken_over(component, new, labdir, node, timeout=120)
    time.sleep(1.0)
    probes = prober.report()
    components.wait_exit(old)
    assert probes["down"] == {}, probes["reasons"]
    assert components.agent_ready(node)


def _assert_logged(log: Path, offset: int, text: str) -> None:
    assert text in log.read_text(encoding="utf-8", errors="replace")[offset:], text


def test_a_new_agent_that_cannot_start_leaves_the_old_one_in_charge(
    lab: Lab, measured: dict[str, Any]
) -> None:
    del measured  # runs after the measurement, on the same lab
    labdir, plan = control.load(lab.name)
    node = next(n for n in plan.nodes if n.name == "node1")
    argv = labdir.command("agent-node1")
    assert argv is not None
    old = labdir.pids()["agent-node1"]
    labdir.record_command("agent-node1", (*argv, "--route-table", "254"))  # refused by the agent
    try:
        with pytest.raises(LabError, match="exited with status 2"):
            lab.upgrade("node1", timeout=60)
        assert labdir.pids()["agent-node1"] == old
        assert components.alive(old) and components.agent_ready(node)
    finally:
        labdir.record_command("agent-node1", argv)
