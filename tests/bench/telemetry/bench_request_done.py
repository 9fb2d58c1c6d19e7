"""Micro-benchmark: ``Registry.request_done`` alone, as the agent wires it (``HttpMetrics`` with
the tap and the access log at INFO through ``logging.basicConfig``'s format to ``--log``, so
``AccessLogWriter`` formats and writes every line), no sockets.

    .venv/bin/python -m tests.bench.telemetry.bench_request_done [--records 20000] [--rounds 7]

Reports each record on one of a few connections (both directions, the destination's and the
source's labels), as a busy node does: the series and line shapes are found, not made. Prints
the process CPU time per record of the best round (min of rounds: the least disturbed; compare
trees alternated) and the Python calls (functions and built-ins, ``sys.setprofile``) per
record, a count no load moves.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import time
from types import FrameType

from agent.proxy.records import Registry
from agent.telemetry.accesslog import ACCESS_LOGGER
from agent.telemetry.http import HttpMetrics
from agent.telemetry.records import ConnectionRecord, RequestRecord
from tests.unit.telemetry.telemetry_helpers import inbound, make_store, outbound


def traffic() -> list[tuple[ConnectionRecord, RequestRecord]]:
    connections = [inbound(), outbound(40000), outbound(40001), inbound()]
    for i, connection in enumerate(connections):
        connection.id = i + 1
    return [
        (
            connections[i % len(connections)],
            RequestRecord(
                "GET", f"/items/{i}", "server:80", 200, 1.5 + i % 7, 10, 2000, "-", f"r{i}"
            ),
        )
        for i in range(64)
    ]


async def round_(registry: Registry, records: int) -> float:
    sample = traffic()
    done = 0
    started = time.process_time()
    while done < records:
        chunk = sample[: records - done]  # the loop gets a turn after each (the writer flushes)
        for connection, request in chunk:
            registry.request_done(connection, request)
        done += len(chunk)
        await asyncio.sleep(0)
    return (time.process_time() - started) / records


async def calls_per_record(registry: Registry, records: int) -> float:
    calls = 0

    def count(_frame: FrameType, event: str, _arg: object) -> None:
        nonlocal calls
        calls += event in ("call", "c_call")

    sample = traffic()
    sys.setprofile(count)
    try:
        for i in range(records):
            connection, request = sample[i % len(sample)]
            registry.request_done(connection, request)
    finally:
        sys.setprofile(None)
    await asyncio.sleep(0)
    return (calls - 1) / records  # less ``setprofile(None)``'s own


async def main(args: argparse.Namespace) -> None:
    stream = open(args.log, "w")  # noqa: SIM115 (open for the whole run)
    logging.basicConfig(stream=stream, level=logging.WARNING)
    logging.getLogger(ACCESS_LOGGER).setLevel(logging.INFO)
    registry = Registry()
    registry.request_observers.append(HttpMetrics(make_store()))
    await round_(registry, 2000)  # warm-up: series, shapes, seconds
    best = min([await round_(registry, args.records) for _ in range(args.rounds)])
    calls = await calls_per_record(registry, 1000)
    print(f"request_done: {best * 1e6:.2f} us per record (best of {args.rounds}), "
          f"{calls:.1f} Python calls per record")  # fmt: skip
    stream.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--log", default=os.devnull, help="where the access log goes")
    asyncio.run(main(parser.parse_args()))
