"""The handover between a running agent and its successor: the old side's state machine as a
script, then both shells over a real abstract Unix socket (no root needed)."""

from __future__ import annotations

import asyncio
import os
import secrets
from pathlib import Path
from typing import Any

import pytest

from agent import handover
from agent.handover import HandoverServer, Phase, Predecessor, Reply, Successor


def test_the_old_side_freezes_then_releases_and_ignores_a_late_disconnect() -> None:
    old = Predecessor(pid=100)
    assert old.receive({"op": "who"}) == Reply({"pid": 100, "phase": "serving"})
    assert old.receive({"op": "hello", "pid": 200}).action is None
    assert old.receive({"op": "freeze", "pid": 200}) == Reply({"ok": True, "pid": 100}, "freeze")
    assert old.phase is Phase.FROZEN
    assert old.receive({"op": "took_over"}) == Reply({"ok": True}, "release")
    assert old.phase is Phase.SUPERSEDED
    assert old.successor_lost() is None  # the successor holds the node: nothing to take back


def test_a_successor_lost_mid_handover_gives_the_node_back() -> None:
    old = Predecessor(pid=100)
    old.receive({"op": "freeze", "pid": 200})
    assert old.successor_lost() == "resume"
    assert old.phase is Phase.SERVING and old.successor is None


@pytest.mark.parametrize(
    ("script", "error"),
    [
        ([{"op": "took_over"}], "freeze first"),
        ([{"op": "freeze"}], "successor's pid"),
        ([{"op": "freeze", "pid": 2}, {"op": "took_over"}, {"op": "freeze", "pid": 3}], "took"),
        ([{"op": "freeze", "pid": 2}, {"op": "freeze", "pid": 3}], "agent 2 is taking over"),
        ([{"op": "rename"}], "unknown operation"),
    ],
)
def test_out_of_order_or_unknown_messages_are_answered_with_an_error(
    script: list[dict[str, Any]], error: str
) -> None:
    old = Predecessor(pid=1)
    replies = [old.receive(m) for m in script]
    assert error in str(replies[-1].message["error"]) and replies[-1].action is None


def test_decode_refuses_what_is_not_a_message() -> None:
    for line in (b"not json\n", b"[1, 2]\n"):
        with pytest.raises(handover.HandoverError):
            handover.decode(line)


class Hooks:
    def __init__(self) -> None:
        self.calls: list[str] = []

    def actions(self) -> handover.Actions:
        def hook(name: handover.Action) -> Any:
            async def run() -> None:
                self.calls.append(name)

            return run

        names: tuple[handover.Action, ...] = ("freeze", "release", "resume")
        return {name: hook(name) for name in names}


def _name() -> bytes:
    return handover.socket_name(Path(f"/sys/fs/bpf/nodemesh/test-{secrets.token_hex(4)}"))


async def _old_agent(name: bytes, hooks: Hooks) -> HandoverServer:
    sock = handover.bind(name)
    assert sock is not None
    server = HandoverServer(sock, Predecessor(os.getpid()), hooks.actions())
    await server.start()
    return server


def test_a_successor_takes_over_and_then_holds_the_name() -> None:
    async def scenario() -> tuple[list[str], Phase, bool, bool]:
        name, hooks = _name(), Hooks()
        old = await _old_agent(name, hooks)
        assert handover.bind(name) is None  # one holder per name
        new = Successor.find(name)
        assert new is not None
        assert await new.hello() == os.getpid()
        assert not old.settled.is_set()  # a SIGTERM now waits for the handover
        await new.freeze()
        await new.took_over()
        new.close()
        claimed = handover.bind(name)  # the old agent released it before answering
        await asyncio.sleep(0.05)
        settled = old.settled.is_set()
        await old.stop()
        if claimed is not None:
            claimed.close()
        return hooks.calls, old.state.phase, claimed is not None, settled

    calls, phase, claimed, settled = asyncio.run(asyncio.wait_for(scenario(), 10))
    assert calls == ["freeze", "release"]
    assert phase is Phase.SUPERSEDED and claimed and settled


def test_a_successor_that_dies_after_freeze_makes_the_old_agent_resume() -> None:
    async def scenario() -> tuple[list[str], Phase, bool]:
        name, hooks = _name(), Hooks()
        old = await _old_agent(name, hooks)
        new = Successor.find(name)
        assert new is not None
        await new.freeze()
        new.close()  # the successor process exited mid-handover
        await asyncio.wait_for(old.settled.wait(), 5)
        await old.stop()
        return hooks.calls, old.state.phase, old.settled.is_set()

    calls, phase, settled = asyncio.run(asyncio.wait_for(scenario(), 10))
    assert calls == ["freeze", "resume"] and phase is Phase.SERVING and settled


def test_find_returns_none_when_no_agent_runs_and_who_answers_the_holder() -> None:
    async def scenario() -> tuple[Successor | None, dict[str, Any] | None, dict[str, Any] | None]:
        name = _name()
        alone = Successor.find(name)
        before = await asyncio.to_thread(handover.who, name)
        old = await _old_agent(name, Hooks())
        holder = await asyncio.to_thread(handover.who, name)
        await old.stop()
        return alone, before, holder

    alone, before, holder = asyncio.run(asyncio.wait_for(scenario(), 10))
    assert alone is None and before is None
    assert holder == {"pid": os.getpid(), "phase": "serving"}


def test_the_successor_notices_when_the_old_agent_exits() -> None:
    async def scenario() -> bool:
        name = _name()
        listener = handover.bind(name)
        assert listener is not None
        new = Successor.find(name)
        assert new is not None
        accepted, _ = await asyncio.get_running_loop().sock_accept(listener)
        lost = asyncio.create_task(new.lost())
        await asyncio.sleep(0.05)
        waiting = not lost.done()
        accepted.close()  # what the kernel does when the old agent's process exits
        listener.close()
        await asyncio.wait_for(lost, 5)
        new.close()
        return waiting

    assert asyncio.run(asyncio.wait_for(scenario(), 10))
