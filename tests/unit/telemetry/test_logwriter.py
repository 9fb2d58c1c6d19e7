"""The access log's own writer (agent.telemetry.logwriter): the bytes logging would write, one
write for the lines of a few ms, logging's levels, and a full pipe that never stalls the loop."""

from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

import pytest

from agent.telemetry import accesslog, logwriter
from agent.telemetry.http import REQUEST_LABEL_NAMES
from agent.telemetry.logwriter import AccessLogWriter
from agent.telemetry.records import RequestRecord
from tests.unit.telemetry.telemetry_helpers import outbound

AGENT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"  # agent.cli
WORKER_FORMAT = "%(asctime)s %(levelname)s %(name)s[w3]: %(message)s"  # agent.workers.worker


def hierarchy(
    stream: TextIO, fmt: str = AGENT_FORMAT, name: str = accesslog.ACCESS_LOGGER
) -> tuple[logging.Logger, logging.Logger]:
    """A root with basicConfig's handler on ``stream`` and a logger ``name`` under it, apart
    from the process's loggers (pytest's capture handlers sit on the real root)."""
    root = logging.RootLogger(logging.INFO)
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter(fmt))
    root.addHandler(handler)
    logger = logging.Logger(name)
    logger.parent = root
    return logger, root


@pytest.fixture
def log_file(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path / "agent.log"


def logged_by_logging(path: Path, fmt: str, lines: list[tuple[str, float]]) -> bytes:
    with path.open("w") as stream:
        logger, _ = hierarchy(stream, fmt)
        for text, now in lines:
            record = logger.makeRecord(logger.name, logging.INFO, "f", 1, "%s", (text,), None)
            record.created, record.msecs = now, int((now - int(now)) * 1000) + 0.0
            logger.handle(record)
    return path.read_bytes()


@pytest.mark.parametrize(
    "fmt",
    [
        AGENT_FORMAT,
        WORKER_FORMAT,
        "[%(asctime)s] %(name)s %(message)s",  # text before the time
        "%(levelname)s %(name)s: %(message)s",  # no time at all
        "%(asctime)s (%(asctime)s) %(levelname)s: %(message)s",  # the time twice
    ],
)
def test_the_lines_are_the_bytes_logging_writes(tmp_path: Path, fmt: str) -> None:
    lines = [
        ('{"a":1}', 1733456789.1239),
        ("same second, later", 1733456789.5),  # the second's prefix made once, reused
        ("same second, earlier", 1733456789.0005),
        ('{"b":"\\u00e9"}', 1733456790.0),  # the next second
        ("x", 17.9996),
        ("y", 17.001),
    ]
    with (tmp_path / "fast").open("w") as stream:
        logger, root = hierarchy(stream, fmt)
        writer = AccessLogWriter(logger, root)
        assert all(writer.write(text, now) for text, now in lines)  # no loop: written at once
    expected = logged_by_logging(tmp_path / "slow", fmt, lines)
    assert (tmp_path / "fast").read_bytes() == expected
    assert expected.count(b"\n") == len(lines)


@pytest.mark.parametrize(
    "change",
    ["logger handler", "second root handler", "own format", "handler level", "handler filter"],
)
def test_any_other_configuration_goes_through_logging(log_file: Path, change: str) -> None:
    with log_file.open("w") as stream:
        logger, root = hierarchy(stream)
        writer = AccessLogWriter(logger, root)
        assert writer.write("before", 1.0)
        handler = root.handlers[0]
        if change == "logger handler":
            logger.addHandler(logging.NullHandler())
        elif change == "second root handler":
            root.addHandler(logging.NullHandler())
        elif change == "own format":
            handler.setFormatter(logging.Formatter("%(message)s at %(asctime)s"))
        elif change == "handler level":
            handler.setLevel(logging.WARNING)
        else:
            handler.addFilter(lambda record: True)
        assert not writer.write("after", 2.0)


def test_a_new_formatter_of_the_agent_s_kind_is_taken_up(log_file: Path) -> None:
    with log_file.open("w") as stream:
        logger, root = hierarchy(stream)
        writer = AccessLogWriter(logger, root)
        handler = root.handlers[0]
        handler.setFormatter(logging.Formatter("%(message)s at %(asctime)s"))
        assert not writer.write("refused", 1.0)
        handler.setFormatter(logging.Formatter(WORKER_FORMAT))
        assert writer.write("taken", 1.0)
    assert log_file.read_text().endswith(" INFO nodemesh.access[w3]: taken\n")


def test_a_change_within_a_flush_window_holds_from_the_window_s_flush(log_file: Path) -> None:
    """The configuration is checked per flush window, not per line: a handler added while
    lines are pending applies to the lines after their flush (at most FLUSH_DELAY_S later)."""

    async def main() -> list[bool]:
        with log_file.open("w") as stream:
            logger, root = hierarchy(stream)
            writer = AccessLogWriter(logger, root)
            taken = [writer.write("opens the window", 10.0)]
            root.addHandler(logging.NullHandler())
            taken.append(writer.write("same window", 10.001))
            await asyncio.sleep(logwriter.FLUSH_DELAY_S * 4)  # the window's flush
            taken.append(writer.write("after the flush", 10.002))
        return taken

    assert asyncio.run(main()) == [True, True, False]
    assert log_file.read_text().splitlines()[-1].endswith(": same window")


@pytest.mark.parametrize("closes", ["another logger's record", "a line's time past the window"])
def test_a_change_holds_for_the_next_line_once_the_window_closes(
    log_file: Path, closes: str
) -> None:
    async def main() -> bool:
        with log_file.open("w") as stream:
            logger, root = hierarchy(stream)
            writer = AccessLogWriter(logger, root)
            assert writer.write("opens the window", 10.0)
            root.handlers[0].setLevel(logging.WARNING)
            now = 10.0
            if closes == "another logger's record":  # as POST /logging's warning
                other = logging.Logger("agent.telemetry.loglevel")
                other.parent = root
                other.warning("log level set")
            else:
                now += logwriter.FLUSH_DELAY_S  # a flush that never ran (a stalled loop)
            return writer.write("next", now)

    assert asyncio.run(main()) is False


def test_a_change_made_after_a_loop_closed_with_lines_pending_holds_for_the_next_line(
    log_file: Path,
) -> None:
    async def write(writer: AccessLogWriter, text: str) -> bool:
        return writer.write(text, 10.0)

    with log_file.open("w") as stream:
        logger, root = hierarchy(stream)
        writer = AccessLogWriter(logger, root)
        assert asyncio.run(write(writer, "first"))  # its loop closes before the flush
        root.addHandler(logging.NullHandler())  # as a test's caplog
        assert not asyncio.run(write(writer, "second"))
        writer.close()  # "first" waits for another record or the exit, as before the change
    assert log_file.read_text().endswith(": first\n")


def test_lines_of_several_loop_iterations_within_the_delay_are_one_write(
    log_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Service request's two lines come in different iterations: they share one write."""
    writes: list[bytes] = []
    real_write = os.write

    def counted(fd: int, data: bytes | memoryview) -> int:
        writes.append(bytes(data))
        return real_write(fd, data)

    monkeypatch.setattr(logwriter.os, "write", counted)

    async def main() -> int:
        with log_file.open("w") as stream:
            logger, root = hierarchy(stream)
            writer = AccessLogWriter(logger, root)
            for i in range(5):
                writer.write(f"line {i}", 10.0)
                await asyncio.sleep(0)  # each line in an iteration of its own
                await asyncio.sleep(0)
            assert log_file.read_bytes() == b""  # pending until the delay ends
            await asyncio.sleep(logwriter.FLUSH_DELAY_S * 4)
            return log_file.read_bytes().count(b"\n")

    assert asyncio.run(main()) == 5
    assert len(writes) == 1


def test_lines_pending_when_their_loop_closed_go_out_with_the_next_loop_s(
    log_file: Path,
) -> None:
    async def write(writer: AccessLogWriter, text: str) -> None:
        writer.write(text, 10.0)

    async def settle() -> None:
        await asyncio.sleep(logwriter.FLUSH_DELAY_S * 4)

    with log_file.open("w") as stream:
        logger, root = hierarchy(stream)
        writer = AccessLogWriter(logger, root)
        asyncio.run(write(writer, "first"))  # the loop closes before its flush is due
        assert log_file.read_bytes() == b""

        async def second() -> None:
            await write(writer, "second")
            await settle()

        asyncio.run(second())
        lines = log_file.read_text().splitlines()
    assert [line.split(": ", 1)[1] for line in lines] == ["first", "second"]


def test_lines_pending_for_a_stream_closed_meanwhile_are_dropped(log_file: Path) -> None:
    """A script that closed its log file before exiting: ``close`` at exit does not raise."""
    with log_file.open("w") as stream:
        logger, root = hierarchy(stream)
        writer = AccessLogWriter(logger, root)
        writer.write("late", 10.0)  # no loop: written at once
        assert log_file.read_text().endswith("late\n")

        async def main() -> None:
            writer.write("pending", 10.0)

        asyncio.run(main())
    writer.close()
    assert not writer._pending
    assert "pending" not in log_file.read_text()


def test_another_logger_s_record_follows_the_pending_lines(log_file: Path) -> None:
    async def main() -> list[str]:
        with log_file.open("w") as stream:
            logger, root = hierarchy(stream)
            writer = AccessLogWriter(logger, root)
            writer.write("access 1", 10.0)
            other = logging.Logger("agent.proxy")
            other.parent = root
            other.warning("a warning")
            writer.write("access 2", 10.0)
            await asyncio.sleep(logwriter.FLUSH_DELAY_S * 4)
        return [line.split(": ", 1)[1] for line in log_file.read_text().splitlines()]

    assert asyncio.run(main()) == ["access 1", "a warning", "access 2"]


def test_levels_stay_logging_s(log_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with log_file.open("w") as stream:
        _, root = hierarchy(stream)
        # a logger of the manager's, so that setLevel clears its cache as for nodemesh.access
        logger = logging.getLogger("test-logwriter.access")
        logger.parent = root
        monkeypatch.setattr(accesslog, "access_log", logger)
        monkeypatch.setattr(accesslog, "_writer", AccessLogWriter(logger, root))
        first, second = (
            RequestRecord("GET", "/items/42", "server:80", 200, 3.0, 10, 2000, "-", rid)
            for rid in ("r1", "r2")
        )
        labels = dict.fromkeys(REQUEST_LABEL_NAMES, "x")
        shape = accesslog.request_shape(outbound(), first, accesslog.labels_tail(labels))
        logger.setLevel(logging.WARNING)  # POST /logging?logger=nodemesh.access&level=warning
        accesslog.write_request_log(outbound(), first, shape, time.time())
        logger.setLevel(logging.INFO)
        accesslog.write_request_log(outbound(), second, shape, time.time())
    lines = log_file.read_text().splitlines()
    assert [json.loads(line.split(": ", 1)[1])["request_id"] for line in lines] == ["r2"]


def test_a_full_pipe_keeps_then_drops_lines_without_blocking(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(logwriter, "MAX_PENDING", 64 * 1024)
    read_end, write_end = os.pipe()
    fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, 4096)
    line = "x" * 200

    os.set_blocking(read_end, False)

    def lines_in(fd: int) -> int:
        try:
            return os.read(fd, 1 << 16).count(b"\n")
        except BlockingIOError:
            return 0  # nothing written since the last read

    async def main() -> tuple[int, int]:
        with os.fdopen(write_end, "w") as stream:
            logger, root = hierarchy(stream)
            writer = AccessLogWriter(logger, root)
            for _ in range(1000):  # 230 KB into a 4 KiB pipe nobody reads
                writer.write(line, 10.0)
                await asyncio.sleep(0)  # the flush runs and must return, the pipe full
            assert writer.dropped > 0
            kept = 0
            while writer.dropped and writer._pending:
                await asyncio.sleep(logwriter.FLUSH_RETRY_S * 2)
                kept += lines_in(read_end)
            kept += lines_in(read_end)
            return kept, writer.dropped

    with caplog.at_level(logging.WARNING, logger=logwriter.__name__):
        kept, dropped = asyncio.run(main())
    os.close(read_end)
    assert kept + dropped == 1000
    assert f"{dropped} lines dropped" in caplog.text


def test_a_pipes_flushes_poll_with_one_poller_made_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each flush to a pipe polls before its write (a full pipe must not block the loop), with
    the poller its route made once: no poll object made and registered per flush."""
    made: list[object] = []
    real_poll = logwriter.select.poll

    def counted() -> object:
        made.append(None)
        return real_poll()

    monkeypatch.setattr(logwriter.select, "poll", counted)
    read_end, write_end = os.pipe()

    async def main() -> None:
        with os.fdopen(write_end, "w") as stream:
            logger, root = hierarchy(stream)
            writer = AccessLogWriter(logger, root)
            for i in range(5):  # five flush windows, one line each
                writer.write(f"line {i}", 10.0 + i)
                await asyncio.sleep(logwriter.FLUSH_DELAY_S * 4)
                assert not writer._pending

    asyncio.run(main())
    assert os.read(read_end, 1 << 16).count(b"\n") == 5
    os.close(read_end)
    assert len(made) == 1
