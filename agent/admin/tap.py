"""``GET /requests``: recent HTTP requests from the ring (``agent.telemetry.tap``), long-polled.

Why long-poll and not a chunked stream: the admin server answers one request per connection
with a complete body (``agent.base.http``), which keeps it small and its limits simple. A viewer
asks ``/requests?since=CURSOR&wait=SECONDS`` and gets what came after its cursor, or, when
nothing matching has come yet, an answer as soon as something does (or an empty one after
``wait`` seconds); it asks again with the ``next`` cursor of the answer. Nothing is held for a
viewer between two asks but its cursor, on its side: a slow or gone viewer costs the agent
nothing, and when it comes back too late the answer's ``missed`` says how many it lost.

Query: ``since`` (a cursor; absent: the latest ``limit`` requests held), ``wait`` (0-10 s,
default 0), ``limit`` (1-1000, default 500), and the filter (``RequestFilter``: ``workload``,
``source``, ``destination``, ``method``, ``path``, ``status``, ``grpc_status``, ``policy``).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping
from dataclasses import fields

from agent.base.http import Response
from agent.telemetry.tap import Batch, FilterError, RequestFilter, RequestRing

MAX_WAIT = 10.0
MAX_LIMIT = 1000
DEFAULT_LIMIT = 500
PAGING = ("since", "wait", "limit")


class QueryError(ValueError):
    """A ``/requests`` query the API cannot answer; the message says what is expected."""


def _number(query: Mapping[str, str], key: str, default: float, low: float, high: float) -> float:
    text = query.get(key)
    if text is None:
        return default
    try:
        value = float(text)
    except ValueError as e:
        raise QueryError(f"{key}={text!r}: expected a number from {low:g} to {high:g}") from e
    if not low <= value <= high:
        raise QueryError(f"{key}={text!r}: expected a number from {low:g} to {high:g}")
    return value


def parse_query(query: Mapping[str, str]) -> tuple[int | None, float, int, RequestFilter]:
    """(since, wait, limit, filter) of a ``/requests`` query, or ``QueryError``."""
    known = {*PAGING, *(f.name for f in fields(RequestFilter))}
    unknown = sorted(set(query) - known)
    if unknown:
        raise QueryError(f"unknown parameter {unknown[0]!r}; known: {', '.join(sorted(known))}")
    since_text = query.get("since")
    since = None
    if since_text is not None:
        if not since_text.isdigit():
            raise QueryError(f"since={since_text!r}: expected the 'next' cursor of an answer")
        since = int(since_text)
    wait = _number(query, "wait", 0.0, 0.0, MAX_WAIT)
    limit = int(_number(query, "limit", DEFAULT_LIMIT, 1, MAX_LIMIT))
    try:
        selected = RequestFilter.from_query(query)
    except FilterError as e:
        raise QueryError(str(e)) from e
    return since, wait, limit, selected


async def requests_view(ring: RequestRing, node: str, query: Mapping[str, str]) -> Response:
    try:
        since, wait, limit, selected = parse_query(query)
    except QueryError as e:
        return Response.json(400, {"error": str(e)})
    batch = await _wait_for(ring, since, wait, limit, selected)
    return Response.json(
        200,
        {
            "node": node,
            "requests": batch.entries,
            "next": batch.next,
            "missed": batch.missed,
            "ring_size": ring.size,
        },
    )


async def _wait_for(
    ring: RequestRing, since: int | None, wait: float, limit: int, selected: RequestFilter
) -> Batch:
    """The first non-empty batch after ``since`` within ``wait`` seconds (or the empty one)."""
    batch = ring.since(since, selected, limit)
    if batch.entries or since is None or wait <= 0:
        return batch
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait
    missed = batch.missed
    while not batch.entries:
        remaining = deadline - loop.time()
        if remaining <= 0:
            break
        added = loop.create_future()

        def wake(added: asyncio.Future[None] = added) -> None:
            if not added.done():
                added.set_result(None)

        ring.on_next(wake)
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(added, remaining)
        finally:
            ring.forget(wake)
        batch = ring.since(batch.next, selected, limit)
        missed += batch.missed
    return batch._replace(missed=missed)
