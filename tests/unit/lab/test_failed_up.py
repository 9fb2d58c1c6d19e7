"""A failed ``lab up`` removes the lab, logs included, so its error must not send the reader to
the log file it just removed: it shows the log's last lines instead (no root needed: building
the namespaces is replaced, the component's failure is real ``wait_ready``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from agent.lab import build, components, control
from agent.lab.record import LabDir
from agent.lab.topology import DEFAULT_TOPOLOGY, LabError


class _Exited:
    """A component process that has exited with status 2 (``Popen.poll``)."""

    def poll(self) -> int:
        return 2


def _agent_fails(plan: Any, labdir: LabDir, **_: Any) -> None:
    labdir.log_file("agent-node1").write_text("ERROR agent.app: --drain-seconds -5.0: expected\n")
    agent = components.Component("agent-node1", "x-node1", (), lambda: False)
    components.wait_ready(agent, _Exited(), labdir, timeout=1)  # type: ignore[arg-type]


def test_a_failed_up_shows_the_log_it_removed_instead_of_its_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(build, "build", lambda plan: None)
    monkeypatch.setattr(components, "start_all", _agent_fails)
    log = LabDir("uxfail", str(tmp_path)).log_file("agent-node1")
    with pytest.raises(LabError) as failed:
        control.up("uxfail", DEFAULT_TOPOLOGY, source="t", state_root=str(tmp_path))
    assert not log.exists()  # removed with the lab, as README says
    assert str(failed.value) == (
        "agent-node1 exited with status 2 before it was ready; the last lines of its log:\n"
        "    ERROR agent.app: --drain-seconds -5.0: expected"
    )


def test_a_failed_upgrade_names_the_log_it_keeps(tmp_path: Path) -> None:
    labdir = LabDir("uxfail", str(tmp_path))
    labdir.create()
    labdir.log_file("agent-node1").write_text("ERROR boom\n")
    agent = components.Component("agent-node1", "x-node1", (), lambda: False)
    with pytest.raises(LabError) as failed:
        components.wait_ready(agent, _Exited(), labdir, timeout=1)  # type: ignore[arg-type]
    log = labdir.log_file("agent-node1")
    assert str(failed.value) == (
        f"agent-node1 exited with status 2 before it was ready; see {log}:\n    ERROR boom"
    )
