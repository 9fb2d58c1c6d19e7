"""The capture listeners of a successor agent: ephemeral ports while the predecessor holds
15001/15006/15008 (the programs reach a listener through the SOCKMAP, not by port)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.root
REPO = Path(__file__).resolve().parents[3]

SCRIPT = textwrap.dedent(
    """
    from agent.datapath.listeners import ListenerPorts, open_listeners
    ports = ListenerPorts(outbound=25001, inbound=25006, hbone=25008)
    old = open_listeners(ports)
    try:
        open_listeners(ports)
    except OSError as e:
        print("alone:", "another agent" in str(e))
    new = open_listeners(ports, beside_another=True)
    print("beside:", sorted(s.getsockname()[1] in (25001, 25006, 25008) for s in new.values()))
    """
)


def test_a_successor_listens_on_other_ports_only_when_told_another_agent_holds_them() -> None:
    if os.geteuid() != 0:
        pytest.skip("IP_TRANSPARENT and a network namespace need root")
    out = subprocess.run(
        ["unshare", "--net", sys.executable, "-c", SCRIPT],
        capture_output=True, text=True, check=True, timeout=30, cwd=REPO,
    )  # fmt: skip
    assert out.stdout.split("\n")[:2] == ["alone: True", "beside: [False, False, False]"]
