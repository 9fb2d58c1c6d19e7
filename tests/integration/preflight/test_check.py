"""``nodemesh check`` on this host: every real probe passes and leaves no scratch namespace."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.root


def _scratch_netns() -> set[str]:
    try:
        return {n for n in os.listdir("/run/netns") if n.startswith("nmcheck-")}
    except FileNotFoundError:
        return set()


def test_check_passes_here_and_cleans_up() -> None:
    before = _scratch_netns()
    out = subprocess.run(
        [sys.executable, "-m", "agent", "check", "--json"],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    doc = json.loads(out.stdout)
    failed = [c for c in doc["checks"] if not c["ok"]]
    assert failed == [], out.stdout
    assert out.returncode == 0
    assert _scratch_netns() == before
