"""``nodemesh lab logs TARGET``: which file a target names, ``--tail``, ``--follow`` (no root,
no lab: a state directory under tmp_path stands in for the lab's)."""

from __future__ import annotations

import io
from pathlib import Path
from types import SimpleNamespace

import pytest

from agent.cli import main
from agent.lab import control, logs
from agent.lab.record import LabDir
from agent.lab.topology import LabError


@pytest.fixture
def labdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> LabDir:
    """A lab ``t`` with nodes node1 and node2 whose components wrote these logs."""
    labdir = LabDir("t", str(tmp_path))
    labdir.create()
    labdir.log_file("ca").write_text("ca 1\nca 2\n")
    labdir.log_file("agent-node1").write_text("".join(f"node1 {i}\n" for i in range(1, 6)))
    labdir.log_file("prometheus").write_text("prom\n")
    labdir.log_file("server-0").write_text("GET /\n")
    plan = SimpleNamespace(
        lab="t", nodes=[SimpleNamespace(name="node1"), SimpleNamespace(name="node2")]
    )
    monkeypatch.setattr(control, "load", lambda name: (labdir, plan))
    return labdir


def run(capsys: pytest.CaptureFixture[bytes], *argv: str) -> tuple[int, bytes, bytes]:
    code = main(["lab", "logs", "--name", "t", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_a_node_names_its_agents_log_and_tail_keeps_the_last_lines(
    labdir: LabDir, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    assert run(capsysbinary, "node1", "--tail", "2") == (0, b"node1 4\nnode1 5\n", b"")
    assert run(capsysbinary, "agent-node1", "--tail", "1")[1] == b"node1 5\n"
    assert run(capsysbinary, "ca")[1] == b"ca 1\nca 2\n"
    assert run(capsysbinary, "server-0")[1] == b"GET /\n"


def test_a_negative_tail_means_every_line_as_in_kubectl(
    labdir: LabDir, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    """``kubectl logs --tail=-1`` is every line; it printed none here."""
    assert run(capsysbinary, "ca", "--tail", "-1") == (0, b"ca 1\nca 2\n", b"")


def test_an_unknown_target_lists_the_known_ones(
    labdir: LabDir, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    code, out, err = run(capsysbinary, "node3")
    assert (code, out) == (1, b"")
    assert err.decode().startswith(
        "nodemesh lab: error: no log for 'node3' in lab t; targets: node1, node2, ca, "
        "prometheus, server-0 ("
    )
    code, _, err = run(capsysbinary, "node2")  # planned, but its agent never wrote
    assert code == 1 and b"node2 has written no log yet" in err


def test_follow_copies_what_is_appended_and_rereads_a_truncated_file(tmp_path: Path) -> None:
    path = tmp_path / "agent-node1.log"
    path.write_bytes(b"old 1\nold 2\n")
    written: list[bytes] = []
    appends = iter([b"new 1\n", None, b"after truncation\n"])
    stop = b"stop"

    def wait() -> bool:
        step = next(appends, stop)
        if step is stop:
            return False
        if step is None:
            path.write_bytes(b"")  # truncated: the next write starts at offset 0
        else:
            with open(path, "ab") as f:
                f.write(step)
        return True

    with open(path, "rb") as f:
        assert logs.tail(f, 1) == b"old 2\n"
        logs.follow(f, written.append, wait)
    assert b"".join(written) == b"new 1\nafter truncation\n"


def test_resolve_without_logs_names_the_nodes(tmp_path: Path) -> None:
    with pytest.raises(LabError, match=r"targets: node1 \(logs are in "):
        logs.resolve(tmp_path / "absent", ["node1"], "ca", "t")
    assert logs.tail(io.BytesIO(b"a\nb\n"), 0) == b""
