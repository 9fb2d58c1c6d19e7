"""The main process's views over the workers, with stand-in workers (no processes)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from typing import Any, cast

from agent.workers import merge
from agent.workers.channel import ChannelClosed
from agent.workers.supervisor import Workers
from agent.workers.views import WorkerViews


class FakeWorkers:
    """Worker 0 has a request at once; worker 1 long-polls until asked without waiting."""

    count = 3

    def __init__(self) -> None:
        self.asked: list[tuple[int, dict[str, str]]] = []

    def serving(self) -> list[int]:
        return [0, 1, 2]

    async def call(self, index: int, kind: str, args: Any = None, timeout: float = 5) -> object:
        assert kind == "requests"
        self.asked.append((index, dict(args)))
        since = int(args.get("since", "0"))
        if index == 2:
            raise ChannelClosed("worker 2 died")
        if index == 0:
            return 200, {"requests": [{"time": "t1", "path": "/a"}], "next": since + 1,
                         "missed": 0, "ring_size": 10}  # fmt: skip
        if float(args["wait"]) > 0:
            await asyncio.sleep(60)
        return 200, {"requests": [], "next": since, "missed": 0, "ring_size": 10}


def test_a_long_poll_answers_when_one_worker_has_something() -> None:
    fake = FakeWorkers()
    views = WorkerViews(lambda: cast(Workers, fake), "node1")
    since = merge.join_cursors([4, 7, 9])

    async def run() -> Mapping[str, Any]:
        response = await asyncio.wait_for(
            views.requests({"since": str(since), "wait": "10"}), timeout=5
        )
        assert response.status == 200
        return cast(Mapping[str, Any], json.loads(response.body))

    body = asyncio.run(run())
    assert [r["path"] for r in body["requests"]] == ["/a"]
    assert body["requests"][0]["worker"] == 0
    # worker 0 moved on, worker 1 was asked again without waiting, worker 2 keeps its cursor
    assert merge.split_cursors(body["next"], 3) == [5, 7, 9]
    assert (1, {"since": "7", "wait": "0.0"}) in fake.asked


def test_a_bad_query_is_refused_before_asking() -> None:
    fake = FakeWorkers()
    views = WorkerViews(lambda: cast(Workers, fake), "node1")
    response = asyncio.run(views.requests({"since": "soon"}))
    assert response.status == 400 and fake.asked == []
