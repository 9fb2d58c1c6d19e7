"""A tunnel open's deadline (``Outbound._open_within``): a timer that cancels the opening task,
told apart from any other cancellation (a policy re-check, the drain), as ``asyncio.timeout``
did, without the context manager."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest

from agent.proxy import outbound
from agent.proxy.outbound import Outbound
from agent.proxy.resolve import Route
from agent.telemetry.records import OUTBOUND, ConnectionRecord


class _Opener:
    """What ``_open_within`` reads of ``self``: the connect timeout, and ``open``."""

    def __init__(self, limit: float, outcome: BaseException | None) -> None:
        self.core = SimpleNamespace(settings=SimpleNamespace(connect_timeout=limit))
        self.outcome = outcome
        self.started = asyncio.Event()

    async def open(self, *args: Any, **kwargs: Any) -> object:
        self.started.set()
        if self.outcome is not None:
            raise self.outcome
        await asyncio.Event().wait()  # a CONNECT nobody answers
        raise AssertionError("unreachable")


def _within(opener: _Opener) -> Any:
    route = Route("hbone", "127.0.2.1", 80, None, None, None)
    record = ConnectionRecord(OUTBOUND, "127.0.1.1:1", "127.0.2.1:80")
    return Outbound._open_within(opener, route, record, "127.0.1.1", 1, False)  # type: ignore[arg-type]


def test_an_open_past_the_connect_timeout_raises_timeout_error() -> None:
    async def main() -> None:
        task = asyncio.current_task()
        assert task is not None
        with pytest.raises(TimeoutError, match=r"within the 0\.01 s connect timeout"):
            await _within(_Opener(0.01, None))
        assert task.cancelling() == 0  # its own cancellation taken back

    asyncio.run(main())


def test_any_other_cancellation_stays_a_cancellation() -> None:
    async def main() -> None:
        opener = _Opener(60.0, None)
        task = asyncio.create_task(_within(opener))
        await opener.started.wait()
        task.cancel("policy re-check")
        with pytest.raises(asyncio.CancelledError):
            await task
        assert asyncio.get_running_loop()._scheduled == []  # type: ignore[attr-defined]

    asyncio.run(main())


def test_a_cancellation_that_crossed_the_deadline_stays_a_cancellation(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Past its deadline and cancelled (the drain) before the task ran again: the drain wins."""
    deadlines: list[outbound._Expired] = []

    class Seen(outbound._Expired):
        def __init__(self, task: asyncio.Task[object]) -> None:
            super().__init__(task)
            deadlines.append(self)

    monkeypatch.setattr(outbound, "_Expired", Seen)

    async def main() -> None:
        opener = _Opener(60.0, None)
        task = asyncio.create_task(_within(opener))
        await opener.started.wait()
        deadlines[0]()  # the deadline's timer runs ...
        task.cancel("drain")  # ... and the drain cancels in the same pass
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())


def test_a_timeout_inside_the_open_is_reported_as_the_opens() -> None:
    async def main() -> None:
        with pytest.raises(TimeoutError, match="connect timeout") as caught:
            await _within(_Opener(60.0, TimeoutError("connect did not finish")))
        assert isinstance(caught.value.__cause__, TimeoutError)

    asyncio.run(main())
