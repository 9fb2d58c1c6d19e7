"""``make demo`` names its lab as every ``nodemesh lab`` command does (no root needed here)."""

from __future__ import annotations

from pathlib import Path

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


class _Running:
    """A server process the demo started that has not exited (``Popen.poll``)."""

    def poll(self) -> None:
        return None


class _KeptLab:
    name = "nm"

    def status(self) -> dict[str, object]:
        return {"services": [{"name": "web", "namespace": "default", "clusterIP": "10.96.0.11"}]}

    def down(self) -> None:
        raise AssertionError("--keep must leave the lab up")


def test_keep_points_to_the_readme_and_gives_one_request_to_paste(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(demo.Lab, "up", staticmethod(lambda name: _KeptLab()))
    monkeypatch.setattr(demo, "format_status", lambda status: "")
    monkeypatch.setattr(demo, "STEPS", [])
    monkeypatch.setattr(demo, "_servers", {"server-0-web": _Running(), "server-1-web": _Running()})
    assert demo.main(["--keep", "--name", "nm"]) == 0
    out = capsys.readouterr().out
    assert 'README.md, "A first look"' in out
    readme = (Path(__file__).parents[3] / "README.md").read_text(encoding="utf-8")
    assert "**A first look.**" in readme  # the section the hint names
    paste = [line for line in out.splitlines() if "curl" in line]
    assert paste == [
        "  .venv/bin/nodemesh lab exec --name nm client -- curl -s -w ' %{http_code}\\n' "
        "http://10.96.0.11/orders"
    ]
    assert "lab logs --name nm server-0" in out  # the demo's servers log to the lab's logs


def test_keep_without_running_servers_offers_no_request(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(demo.Lab, "up", staticmethod(lambda name: _KeptLab()))
    monkeypatch.setattr(demo, "format_status", lambda status: "")
    monkeypatch.setattr(demo, "STEPS", [])
    monkeypatch.setattr(demo, "_servers", {})
    assert demo.main(["--keep"]) == 0
    out = capsys.readouterr().out
    assert "curl" not in out and 'README.md, "A first look"' in out
