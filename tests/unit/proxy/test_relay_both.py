"""The relay's two directions, one in the caller's task: the first failure ends the other and
is what the caller sees; cancelling the caller ends both."""

from __future__ import annotations

import asyncio

import pytest

from agent.proxy.relay import _both


async def _wait_forever(ended: list[str], name: str) -> None:
    try:
        await asyncio.Event().wait()
    finally:
        ended.append(name)


async def _fail_soon(ended: list[str], name: str) -> None:
    await asyncio.sleep(0)
    ended.append(name)
    raise ConnectionResetError(name)


def test_a_failure_of_the_other_direction_reaches_the_caller_as_itself() -> None:
    async def main() -> tuple[list[str], int]:
        ended: list[str] = []
        with pytest.raises(ConnectionResetError, match="there"):
            await _both(_wait_forever(ended, "here"), _fail_soon(ended, "there"))
        current = asyncio.current_task()
        assert current is not None
        return ended, current.cancelling()

    ended, cancelling = asyncio.run(main())
    assert ended == ["there", "here"]
    assert cancelling == 0  # the interruption was taken back: later awaits are not cancelled


def test_a_failure_of_the_callers_direction_ends_the_other() -> None:
    async def main() -> list[str]:
        ended: list[str] = []
        with pytest.raises(ConnectionResetError, match="here"):
            await _both(_fail_soon(ended, "here"), _wait_forever(ended, "there"))
        await asyncio.sleep(0)  # a later await is not cancelled
        return ended

    assert asyncio.run(main()) == ["here", "there"]


def test_cancelling_the_caller_ends_both_before_it_returns() -> None:
    async def main() -> list[str]:
        ended: list[str] = []
        relay = asyncio.create_task(
            _both(_wait_forever(ended, "here"), _wait_forever(ended, "there"))
        )
        await asyncio.sleep(0.01)
        relay.cancel()
        with pytest.raises(asyncio.CancelledError):
            await relay
        return sorted(ended)

    assert asyncio.run(main()) == ["here", "there"]


def test_a_direction_that_ends_cleanly_leaves_the_other_running() -> None:
    async def main() -> None:
        async def clean() -> None:
            await asyncio.sleep(0)

        async def later() -> None:
            await asyncio.sleep(0.01)

        await _both(clean(), later())
        await _both(later(), clean())

    asyncio.run(main())
