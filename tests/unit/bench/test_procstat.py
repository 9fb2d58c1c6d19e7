"""bench.procstat: the memory of an agent's process tree when a child leaves mid-read."""

import os
import subprocess
import sys

import pytest

from bench import procstat


def test_tree_memory_leaves_out_a_child_that_exited_between_listing_and_reading(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # reaped: its pid names no process any more
    live = subprocess.Popen(
        [sys.executable, "-c", "import time; print('up', flush=True); time.sleep(30)"],
        stdout=subprocess.PIPE,
    )
    try:
        # Its program is read once it runs: between fork and exec its cmdline is empty or ours.
        assert live.stdout is not None and live.stdout.readline() == b"up\n"
        monkeypatch.setattr(procstat, "children", lambda pid: [gone.pid, live.pid])
        tree = procstat.tree_memory(os.getpid())
    finally:
        live.kill()
        live.wait()
        assert live.stdout is not None
        live.stdout.close()
    assert [p["pid"] for p in tree] == [os.getpid(), live.pid]
    assert tree[0]["role"] == "main"
    assert tree[1]["role"] == os.path.basename(sys.executable)
    assert all(p["rss_bytes"] > 0 for p in tree)
