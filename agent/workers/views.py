"""What the main process's ``/metrics`` and admin API read from the workers (asyncio side of
``agent.workers.merge``): each view asks every serving worker over its channel and merges.

A worker that does not answer in time (dying, or stuck) is left out of that one answer and
logged; readiness says when a worker is down, so a partial answer is never silent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping
from typing import Any

from agent.admin.tap import QueryError, parse_query
from agent.base.http import Response
from agent.workers import merge
from agent.workers.channel import ChannelClosed, RemoteError
from agent.workers.supervisor import Workers

log = logging.getLogger(__name__)

Rows = list[dict[str, object]]
ANSWER_MARGIN = 5.0  # beyond a long-poll's own wait


class WorkerViews:
    def __init__(self, workers: Callable[[], Workers | None], node: str) -> None:
        self._workers = workers  # read at each call: the supervisor exists once prepared
        self._node = node

    async def _gather(self, kind: str, args: object = None) -> dict[int, object]:
        workers = self._workers()
        return {} if workers is None else await workers.gather(kind, args)

    async def metrics(self, own: bytes) -> bytes:
        texts = [own]
        for answer in (await self._gather("metrics")).values():
            assert isinstance(answer, bytes)
            texts.append(answer)
        return merge.expositions(texts)

    async def connections(self, own: Rows) -> Rows:
        return merge.connections(own, await self._gather("connections"))

    async def routed(self) -> dict[Any, int]:
        """``/routes``: requests per (route, rule, backend), summed over the workers."""
        return merge.counts(await self._gather("routed"))

    async def traffic(self) -> dict[str, object]:
        answers = await self._gather("traffic")
        return merge.traffic({i: a for i, a in answers.items() if isinstance(a, dict)})

    async def set_level(self, level: str, logger: str) -> None:
        """``POST /logging`` in every worker (the main process changed its own already)."""
        await self._gather("logging", (level, logger))

    async def workers(self) -> Rows:
        """``/workers``: each worker's PID, state, restarts and what it accepted."""
        workers = self._workers()
        if workers is None:
            return []
        status = await workers.gather("status")
        rows = []
        for row in workers.describe():
            answer = status.get(int(str(row["worker"])))
            rows.append({**row, **(answer if isinstance(answer, dict) else {})})
        return rows

    async def requests(self, query: Mapping[str, str]) -> Response:
        """``/requests`` over every worker's ring; a long-poll answers once any worker has
        something (the others are then asked again without waiting, so that the packed cursor
        stays exact for all)."""
        try:
            since, wait, _, _ = parse_query(query)
        except QueryError as e:
            return Response.json(400, {"error": str(e)})
        workers = self._workers()
        if workers is None:
            return Response.json(200, merge.requests(self._node, {}, 0, None))
        cursors = None if since is None else merge.split_cursors(since, workers.count)

        def ask(index: int, wait_s: float) -> asyncio.Task[object]:
            q = dict(query, wait=str(wait_s))
            if cursors is not None:
                q["since"] = str(cursors[index])
            return asyncio.create_task(
                workers.call(index, "requests", q, timeout=wait_s + ANSWER_MARGIN)
            )

        asked = {ask(i, wait): i for i in workers.serving()}
        answers: dict[int, Mapping[str, object]] = {}
        pending = set(asked)
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                self._take(asked[task], task, answers)
            if pending and any(a.get("requests") for a in answers.values()):
                for task in pending:
                    task.cancel()
                again = {ask(asked[t], 0.0): asked[t] for t in pending}
                await asyncio.wait(again)
                for task, index in again.items():
                    self._take(index, task, answers)
                break
        return Response.json(200, merge.requests(self._node, answers, workers.count, cursors))

    @staticmethod
    def _take(
        index: int, task: asyncio.Task[object], answers: dict[int, Mapping[str, object]]
    ) -> None:
        with contextlib.suppress(asyncio.CancelledError):
            error = task.exception()
            if error is not None:
                if not isinstance(error, (ChannelClosed, RemoteError, TimeoutError)):
                    raise error
                log.warning("worker %d did not answer /requests: %s", index, error)
                return
            answer = task.result()
            if isinstance(answer, tuple) and answer[0] == 200 and isinstance(answer[1], dict):
                answers[index] = answer[1]
