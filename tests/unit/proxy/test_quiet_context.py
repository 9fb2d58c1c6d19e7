"""The shared empty context that long-waiting done callbacks run in (``agent.base.quiet``)."""

from __future__ import annotations

import asyncio
import contextvars
import threading

from agent.base.quiet import quiet_context

VAR: contextvars.ContextVar[str] = contextvars.ContextVar("test_quiet_var")


def test_one_empty_context_per_thread() -> None:
    mine = quiet_context()
    assert quiet_context() is mine and len(mine) == 0
    theirs: list[contextvars.Context] = []
    thread = threading.Thread(target=lambda: theirs.append(quiet_context()))
    thread.start()
    thread.join()
    assert theirs[0] is not mine  # loops on two threads never enter the same context at once


def test_a_done_callback_in_it_keeps_nothing_of_the_caller() -> None:
    async def main() -> None:
        seen: list[str] = []
        VAR.set("handler's")  # what a copy of the caller's context would keep alive
        done = asyncio.get_running_loop().create_future()
        for _ in range(2):  # callbacks share it, one at a time
            done.add_done_callback(lambda _f: seen.append(VAR.get("none")), context=quiet_context())
        done.set_result(None)
        await asyncio.sleep(0)
        assert seen == ["none", "none"]

    asyncio.run(main())
