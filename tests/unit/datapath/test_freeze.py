"""A frozen datapath (another agent is taking the node over) leaves the kernel alone."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.datapath.datapath import Datapath, DatapathConfig
from agent.datapath.desired import Plan


def test_a_frozen_datapath_changes_nothing_and_resume_writes_again() -> None:
    datapath = Datapath(DatapathConfig(pin_dir=Path("/nonexistent/pins")))
    datapath.freeze()
    assert datapath.reconcile([]) == Plan()  # no program loaded: the kernel is untouched
    datapath.resume()
    with pytest.raises(RuntimeError, match="start"):
        datapath.reconcile([])  # writing again: it reaches for its programs
