"""``nodemesh proxy-status --lab`` against a real lab: every node's agent read from its own
namespace, the cluster document compared by hash, a killed agent shown as a row."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest

from agent.lab.handle import Lab
from tests.labtools import retry

pytestmark = [pytest.mark.root, pytest.mark.lab]


def proxy_status(lab: Lab) -> tuple[int, list[dict[str, Any]]]:
    done = subprocess.run(
        [sys.executable, "-m", "agent", "proxy-status", "--lab", lab.name, "-o", "json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    return done.returncode, json.loads(done.stdout)["agents"]


def test_proxy_status_across_the_labs_agents(lab: Lab) -> None:
    code, rows = proxy_status(lab)
    assert code == 0, rows
    assert [r["node"] for r in rows] == ["node1", "node2"]
    assert {r["source"] for r in rows} == {"file"}
    first = {r["resources"]["cluster-file"]["sha256"] for r in rows}
    assert len(first) == 1  # both applied the same document
    assert all(r["columns"] == {"DOCUMENT": "SYNCED"} for r in rows)

    lab.kill("agent-node2")
    lab.annotate("outsider", "nodemesh.io/mesh=enabled")

    def node1_applied_the_edit() -> list[dict[str, Any]]:
        code, rows = proxy_status(lab)
        assert code == 1  # node2 cannot be read
        assert rows[0]["resources"]["cluster-file"]["sha256"] not in first
        return rows

    rows = retry(node1_applied_the_edit)
    assert rows[0]["columns"] == {"DOCUMENT": "SYNCED"}
    assert rows[1]["node"] == "node2" and rows[1]["reachable"] is False
    assert "connection refused" in rows[1]["error"]
