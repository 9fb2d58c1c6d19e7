"""``relay._both``: the first failure of either direction is re-raised, and a direction that
fails while it is being cancelled leaves no exception unretrieved (asyncio logs those as
"Task exception was never retrieved", which the bench's agent logs showed under churn)."""

from __future__ import annotations

import asyncio
import gc
from typing import Any

import pytest

from agent.proxy.relay import _both


def test_a_direction_failing_while_cancelled_is_retrieved_and_the_first_failure_wins() -> None:
    unhandled: list[dict[str, Any]] = []

    async def fails_first() -> None:
        await asyncio.sleep(0)
        raise ConnectionResetError("client reset")

    async def fails_when_cancelled() -> None:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            raise BrokenPipeError("pod gone") from None

    async def main() -> None:
        asyncio.get_running_loop().set_exception_handler(lambda _l, ctx: unhandled.append(ctx))
        first = asyncio.create_task(fails_first())
        second = asyncio.create_task(fails_when_cancelled())
        with pytest.raises(ConnectionResetError):
            await _both(first, second)
        del first, second
        gc.collect()
        await asyncio.sleep(0)

    asyncio.run(main())
    assert unhandled == []
