"""``make demo`` names its lab as every ``nodemesh lab`` command does (no root needed here)."""

from __future__ import annotations

import pytest

from agent.lab import demo
from agent.lab.topology import LabError


def test_the_demo_builds_the_lab_named_by_nodemesh_lab(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    asked: list[str] = []

    def up(name: str) -> None:
        asked.append(name)
        raise LabError(f"lab {name!r} already exists")

    monkeypatch.setattr(demo.Lab, "up", staticmethod(up))
    monkeypatch.setenv("NODEMESH_LAB", "mine")
    assert demo.main([]) == 1
    assert asked == ["mine"]  # not the default "nm", which `nodemesh lab down` would then miss
    assert "building lab mine" in capsys.readouterr().out
    assert demo.main(["--name", "other"]) == 1 and asked[-1] == "other"
