"""DirectoryWatch wakes on a change in its directory and on ``wake()``, not otherwise."""

from __future__ import annotations

import os
import threading
from pathlib import Path

from agent.sources.filewatch import DirectoryWatch


def _waits(watch: DirectoryWatch, timeout: float) -> threading.Event:
    done = threading.Event()

    def run() -> None:
        watch.wait(timeout)
        done.set()

    threading.Thread(target=run, daemon=True).start()
    return done


def test_rename_into_the_directory_wakes_a_waiter(tmp_path: Path) -> None:
    watch = DirectoryWatch(tmp_path)
    try:
        assert watch.active
        done = _waits(watch, 60)
        (tmp_path / "cluster.yaml.tmp").write_text("x")
        os.replace(tmp_path / "cluster.yaml.tmp", tmp_path / "cluster.yaml")
        assert done.wait(10)
    finally:
        watch.close()


def test_wake_interrupts_and_a_missing_directory_falls_back_to_polling(tmp_path: Path) -> None:
    polling = DirectoryWatch(tmp_path / "absent")
    try:
        assert not polling.active
        done = _waits(polling, 60)
        polling.wake()
        assert done.wait(10)
    finally:
        polling.close()


def test_a_watch_made_while_the_process_holds_over_1024_descriptors_still_wakes(
    tmp_path: Path,
) -> None:
    """The agent raises its open-files limit (``agent.base.conncaps``), so a watch made late
    gets descriptors past 1,024, which ``select()`` refuses (ValueError)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 4096)), hard))
    held = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    try:
        watch = DirectoryWatch(tmp_path)
        try:
            done = _waits(watch, 60)
            (tmp_path / "cluster.yaml").write_text("x")
            assert done.wait(10)
        finally:
            watch.close()
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
