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


def test_the_close_of_a_tasks_connection_is_found_on_the_loop_given() -> None:
    """With the loop given (the caller has it), the task is found without looking the running
    loop up (a ``getpid`` on Python 3.11)."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        assert cancel_current_task(loop) is asyncio.current_task()

    asyncio.run(main())


class _Observer:
    def __init__(self, fail: bool = False) -> None:
        self.seen: list[tuple[str, int]] = []
        self.fail = fail

    def opened(self, record: ConnectionRecord) -> None:
        self.seen.append(("opened", record.id))
        if self.fail:
            raise RuntimeError("a broken observer")

    def closed(self, record: ConnectionRecord) -> None:
        self.seen.append(("closed", record.id))
        if self.fail:
            raise RuntimeError("a broken observer")


def test_a_connections_life_in_the_registry_makes_no_closure_and_no_context_manager(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """``add``, ``leave_task`` and ``remove`` tell the observers directly (no ``lambda`` per
    connection through ``_notify``) and undo the context variable with a plain ``try`` (no
    ``contextlib.suppress``): a few calls fewer on both sides of every connection. A failing
    observer is still logged and the others still told."""
    import contextlib

    made: list[str] = []
    suppress, notify = contextlib.suppress, Registry._notify

    def counting_suppress(*exceptions: type[BaseException]) -> contextlib.suppress:
        made.append("suppress")
        return suppress(*exceptions)

    def counting_notify(self: Registry, call: object) -> None:
        made.append("_notify")
        notify(self, call)

    monkeypatch.setattr(contextlib, "suppress", counting_suppress)
    monkeypatch.setattr(Registry, "_notify", counting_notify)
    registry = Registry()
    broken, good = _Observer(fail=True), _Observer()
    registry.observers += [broken, good]

    async def main() -> None:
        conn_id = registry.add(ConnectionRecord(INBOUND, "a", "b"), cancel_current_task())
        registry.leave_task(conn_id)
        registry.remove(conn_id)

    asyncio.run(main())
    assert made == []
    assert good.seen == broken.seen == [("opened", 1), ("closed", 1)]
    assert caplog.text.count("connection observer") == 2
