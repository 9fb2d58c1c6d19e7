"""How the registry closes a live connection its task serves: ``cancel_current_task`` is that
task itself (no closure made per connection), and ``recheck`` cancels it with the reason."""

from __future__ import annotations

import asyncio

import pytest

from agent.policy.authz import Decision, Request
from agent.proxy.records import Registry, cancel_current_task
from agent.telemetry.records import INBOUND, ConnectionRecord
from tests.workloads import workload


def test_the_close_of_a_tasks_connection_is_the_task_itself() -> None:
    async def main() -> None:
        assert cancel_current_task() is asyncio.current_task()

    asyncio.run(main())


def test_outside_a_task_there_is_nothing_to_cancel() -> None:
    """In a callback of the loop (no task): a close that does nothing."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        got = loop.create_future()
        loop.call_soon(lambda: got.set_result(cancel_current_task()))
        close = await got
        assert callable(close) and close("reason") is None

    asyncio.run(main())


def test_recheck_cancels_the_task_serving_a_denied_connection_with_the_reason() -> None:
    registry = Registry()
    started = asyncio.Event()

    async def serve() -> None:
        record = ConnectionRecord(INBOUND, "10.0.0.1:1", "10.0.0.2:80")
        conn_id = registry.add(record, cancel_current_task())
        registry.authorized(
            conn_id, Request("10.0.0.1", "10.0.0.2", 80, None), workload("b", "node2", "10.0.0.2")
        )
        started.set()
        await asyncio.Event().wait()

    def deny(request: Request, _workload: object) -> Decision:
        return Decision(False, "denied by test", policy="ns/deny")

    async def main() -> None:
        task = asyncio.create_task(serve())
        await started.wait()
        assert registry.recheck(deny) == 1  # type: ignore[arg-type]
        with pytest.raises(asyncio.CancelledError) as cancelled:
            await task
        assert "denied by test" in str(cancelled.value)

    asyncio.run(main())
