"""Failure behaviour: fail-closed/fail-open without listeners, adoption by a restarted
datapath, replacement of an incompatible generation."""

from __future__ import annotations

import dataclasses
import os

import pytest

from agent.datapath.datapath import pinned_failure_modes
from agent.datapath.programs import Marks
from agent.lab.handle import Lab
from tests.integration.datapath.harness import NodeDatapath, connect
from tests.integration.datapath.harness import pod_ip as ip

pytestmark = [pytest.mark.root, pytest.mark.lab, pytest.mark.usefixtures("servers")]


def test_without_listener_meshed_pod_cannot_reach_server_in_plaintext(
    dplab: Lab, node1: NodeDatapath
) -> None:
    node1.close_listeners()
    assert connect(dplab, "client", ip(dplab, "plain"), 8080, timeout=2.0).startswith("ERR")
    counters = node1.datapath.counters()["pod_ingress"]  # type: ignore[union-attr]
    assert counters["failed_closed"] >= 1 and counters["captured"] == 0
    # traffic outside the mesh is unaffected
    outsider = ip(dplab, "outsider")
    assert connect(dplab, "outsider", ip(dplab, "plain"), 8080) == f"server {outsider}"


def test_fail_open_lets_meshed_traffic_through_uncaptured(dplab: Lab) -> None:
    harness = NodeDatapath(dplab, "node1", fail_open=True)
    try:
        harness.start(listeners=False)
        client = ip(dplab, "client")
        assert connect(dplab, "client", ip(dplab, "plain"), 8080) == f"server {client}"
        assert harness.datapath.counters()["pod_ingress"]["failed_open"] >= 1  # type: ignore[union-attr]
        assert harness.datapath.status()["failure_mode"] == "fail-open"  # type: ignore[union-attr]
        assert pinned_failure_modes()[harness.pin_dir.name] == "fail-open"  # nodemesh check
    finally:
        harness.stop()


def test_restarted_datapath_adopts_pinned_programs_and_maps(
    dplab: Lab, node1: NodeDatapath
) -> None:
    assert node1.datapath is not None
    ids = {k: v["id"] for k, v in node1.datapath.program_stats().items()}
    node1.close_listeners()
    node1.datapath.close()

    restarted = node1.start()
    assert restarted.loaded.adopted
    assert {k: v["id"] for k, v in restarted.program_stats().items()} == ids
    plain = ip(dplab, "plain")
    assert connect(dplab, "client", plain, 8080) == f"OUTBOUND {plain}:8080"


def test_incompatible_generation_is_replaced_in_place(dplab: Lab, node1: NodeDatapath) -> None:
    assert node1.datapath is not None
    old = node1.datapath.loaded.generation
    old_ids = {v["id"] for v in node1.datapath.program_stats().values()}
    node1.close_listeners()
    node1.datapath.close()

    node1.config = dataclasses.replace(node1.config, marks=Marks(hbone_port=15009))
    upgraded = node1.start()
    assert not upgraded.loaded.adopted and upgraded.loaded.generation != old
    assert not old_ids & {v["id"] for v in upgraded.program_stats().values()}
    assert os.listdir(node1.pin_dir) == [upgraded.loaded.generation]
    plain = ip(dplab, "plain")
    assert connect(dplab, "client", plain, 8080) == f"OUTBOUND {plain}:8080"
