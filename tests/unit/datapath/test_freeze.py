"""A frozen datapath (another agent is taking the node over) leaves the kernel alone."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.datapath.datapath import Datapath, DatapathConfig
from agent.datapath.desired import Plan
from agent.state import StateStore


def test_a_frozen_datapath_changes_nothing_and_resume_writes_again() -> None:
    datapath = Datapath(DatapathConfig(node="node1", pin_dir=Path("/nonexistent/pins")))
    snapshot = StateStore().snapshot()
    datapath.freeze()
    assert datapath.reconcile(snapshot) == Plan()  # no program loaded: the kernel is untouched
    datapath.resume()
    with pytest.raises(RuntimeError, match="start"):
        datapath.reconcile(snapshot)  # writing again: it reaches for its programs
