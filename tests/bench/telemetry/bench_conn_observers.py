"""Micro-benchmark: a connection's telemetry alone, at open and at close (``Registry.add`` and
``remove`` with the Istio TCP metrics observer and the access line at INFO through
``logging.basicConfig``'s format to ``--log``, so ``AccessLogWriter`` formats and writes every
line), as a cross-node connection costs both proxies: an outbound record on node1's registry
and an inbound one on node2's, each a new record with a new client port. No sockets.

Count instructions with callgrind at two record counts and take the difference, so start-up
and the warm-up cancel out (docs/performance/connection-cost.md, "The close path's telemetry
per label set (session 19)")::

    for n in 1000 3000; do PYTHONHASHSEED=0 valgrind --tool=callgrind --dump-instr=no \\
        --callgrind-out-file=/tmp/cg.$n .venv/bin/python -m \\
        tests.bench.telemetry.bench_conn_observers --records $n; done
    # (refs at 3000 - refs at 1000) / 2000 = instructions per cross-node connection

The pending lines are flushed every ``--flush-every`` connections (each writes two lines; the
agent's writer flushes after ``FLUSH_DELAY_S``, natively 3.7 lines a flush), by count, not by a
timer, so the count of flushes, and with it the instructions, does not depend on how fast the
loop runs. Prints the Python calls (functions and built-ins, ``sys.setprofile``) per
connection, a count no load moves.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from types import FrameType

from agent.proxy.records import Registry, cancel_current_task
from agent.telemetry import accesslog
from agent.telemetry.records import ConnectionRecord
from agent.telemetry.tcp import TcpMetrics
from tests.unit.telemetry.telemetry_helpers import inbound, make_store, outbound


def connect(node1: Registry, node2: Registry, port: int) -> None:
    """One cross-node connection's records, opened and closed as the proxies do."""
    source, destination = outbound(40000 + port % 20000), inbound()
    destination.source = source.source
    records: list[tuple[Registry, ConnectionRecord]] = [(node1, source), (node2, destination)]
    for registry, record in records:
        registry.add(record, cancel_current_task())
    for registry, record in records:
        record.bytes_sent, record.bytes_received = 100, 100
        registry.remove(record.id)


async def run(node1: Registry, node2: Registry, n: int, flush_every: int) -> None:
    for i in range(n):
        connect(node1, node2, i)
        if i % flush_every == flush_every - 1:
            accesslog._writer.flush(block=True)
    accesslog._writer.flush(block=True)


async def calls_per_connection(node1: Registry, node2: Registry, n: int) -> float:
    calls = 0

    def count(_frame: FrameType, event: str, _arg: object) -> None:
        nonlocal calls
        calls += event in ("call", "c_call")

    sys.setprofile(count)
    try:
        for i in range(n):
            connect(node1, node2, i)
    finally:
        sys.setprofile(None)
    accesslog._writer.flush(block=True)
    return (calls - 1) / n  # less ``setprofile(None)``'s own


async def main(args: argparse.Namespace) -> None:
    stream = open(args.log, "w")  # noqa: SIM115 (open for the whole run)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=stream
    )
    store = make_store()
    node1, node2 = Registry(), Registry()
    node1.observers.append(TcpMetrics(store))
    node2.observers.append(TcpMetrics(store))
    await run(node1, node2, 200, args.flush_every)  # warm-up: labels, shapes, seconds
    await run(node1, node2, args.records, args.flush_every)
    if args.calls:
        print(f"{await calls_per_connection(node1, node2, 1000):.1f} Python calls per connection")
    stream.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=3000, help="cross-node connections")
    parser.add_argument("--flush-every", type=int, default=2, help="connections per flush")
    parser.add_argument("--calls", action="store_true", help="print Python calls per connection")
    parser.add_argument("--log", default=os.devnull, help="where the access log goes")
    asyncio.run(main(parser.parse_args()))
