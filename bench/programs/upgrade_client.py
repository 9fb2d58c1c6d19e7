"""Live connections across an agent upgrade: long-lived echo streams plus steady new connections.

For each ``--target HOST:PORT:LONG:RATE`` it holds LONG connections that each send a chunk every
``--interval`` seconds and read the echo back (bytes in both directions all the time), and opens
RATE short connections per second (connect, one exchange, close). It prints ``{"ready": n}``
once every long-lived connection is open, runs until stdin closes, then half-closes the
long-lived connections, reads them to the end and prints one JSON line per target:

- ``resets``: long-lived connections that broke (reset, early end, wrong bytes);
- ``new_ok`` / ``new_failed`` (+ ``failures``: reason → count): the short connections;
- ``longest_stall_ms``: the longest wait, over all chunks of all long-lived connections, from
  sending a chunk to having its echo back (a healthy exchange takes about a millisecond);
- ``slowest_new_ms``: the slowest short connection (a SYN dropped while no agent listened
  would show here as a retransmission, about 1000 ms, not as a failure).

Every chunk starts with ``--marker``, so a capture of the node link can tell whether any of
these bytes crossed it in clear text.

    python -m bench.programs.upgrade_client --target 10.244.2.2:7000:30:5 --marker M
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections import Counter
from dataclasses import dataclass, field

import uvloop

from bench.programs import raise_nofile

CONNECT_TIMEOUT = 15.0
# How a connection breaks: reset/refused (OSError), wrong or missing bytes, and uvloop's
# RuntimeError for a write to a transport the peer's reset already closed.
BROKEN = (OSError, ValueError, RuntimeError, asyncio.IncompleteReadError)


@dataclass
class Target:
    host: str
    port: int
    long: int
    rate: float
    resets: int = 0
    failures: Counter[str] = field(default_factory=Counter)
    new_ok: int = 0
    longest_stall: float = 0.0
    slowest_new: float = 0.0
    chunks: int = 0

    @classmethod
    def parse(cls, text: str) -> Target:
        host, port, long, rate = text.rsplit(":", 3)
        return cls(host, int(port), int(long), float(rate))

    def report(self) -> dict[str, object]:
        return {
            "target": f"{self.host}:{self.port}",
            "long": self.long,
            "resets": self.resets,
            "chunks": self.chunks,
            "longest_stall_ms": round(self.longest_stall * 1000, 1),
            "new_ok": self.new_ok,
            "new_failed": sum(self.failures.values()),
            "failures": dict(self.failures),
            "slowest_new_ms": round(self.slowest_new * 1000, 1),
        }


async def exchange(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, chunk: bytes
) -> None:
    writer.write(chunk)
    await writer.drain()
    echoed = await reader.readexactly(len(chunk))
    if echoed != chunk:
        raise ValueError("the echo differs from what was sent")


async def long_lived(
    t: Target, n: int, marker: bytes, size: int, interval: float, opened: asyncio.Event
) -> None:
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(t.host, t.port), CONNECT_TIMEOUT
        )
    except (OSError, TimeoutError) as e:
        t.resets += 1
        print(f"long-lived {n} to {t.host}:{t.port} did not open: {e!r}", file=sys.stderr)
        opened.set()  # counted; the others need not wait for it
        return
    opened.set()
    seq = 0
    try:
        while not STOP.is_set():
            seq += 1
            chunk = (marker + b" %d %d " % (n, seq)).ljust(size, b".")
            started = time.monotonic()
            await exchange(reader, writer, chunk)
            t.longest_stall = max(t.longest_stall, time.monotonic() - started)
            t.chunks += 1
            await asyncio.sleep(interval)
        writer.write_eof()
        if await reader.read() != b"":
            raise ValueError("bytes after the end")
    except BROKEN as e:
        t.resets += 1
        print(f"long-lived {n} to {t.host}:{t.port} broke: {e!r}", file=sys.stderr)
    finally:
        writer.close()


async def one_new(t: Target, marker: bytes) -> None:
    started = time.monotonic()
    writer = None
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(t.host, t.port), CONNECT_TIMEOUT
        )
        await asyncio.wait_for(exchange(reader, writer, marker + b" new"), CONNECT_TIMEOUT)
        writer.write_eof()
        await asyncio.wait_for(reader.read(), CONNECT_TIMEOUT)
        t.new_ok += 1
        t.slowest_new = max(t.slowest_new, time.monotonic() - started)
    except (*BROKEN, TimeoutError) as e:
        t.failures[type(e).__name__] += 1
        print(f"new connection to {t.host}:{t.port} failed: {e!r}", file=sys.stderr)
    finally:
        if writer is not None:
            writer.close()


async def new_connections(t: Target, marker: bytes) -> None:
    pending: set[asyncio.Task[None]] = set()
    while not STOP.is_set() and t.rate > 0:
        task = asyncio.create_task(one_new(t, marker))
        pending.add(task)
        task.add_done_callback(pending.discard)
        await asyncio.sleep(1.0 / t.rate)
    await asyncio.gather(*pending)


STOP = asyncio.Event()


async def main_async(targets: list[Target], marker: bytes, size: int, interval: float) -> None:
    loop = asyncio.get_running_loop()
    opened = [asyncio.Event() for t in targets for _ in range(t.long)]
    events = iter(opened)
    streams = [
        asyncio.create_task(long_lived(t, n, marker, size, interval, next(events)))
        for t in targets
        for n in range(t.long)
    ]
    await asyncio.wait_for(asyncio.gather(*(e.wait() for e in opened)), CONNECT_TIMEOUT * 2)
    print(json.dumps({"ready": len(opened)}), flush=True)
    churn = [asyncio.create_task(new_connections(t, marker)) for t in targets]
    await loop.run_in_executor(None, sys.stdin.read)  # until the harness closes stdin
    STOP.set()
    await asyncio.gather(*streams, *churn)
    for t in targets:
        print(json.dumps(t.report()), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", action="append", required=True, metavar="HOST:PORT:LONG:RATE")
    parser.add_argument("--marker", required=True)
    parser.add_argument("--size", type=int, default=256, help="bytes per chunk")
    parser.add_argument("--interval", type=float, default=0.05, help="seconds between chunks")
    args = parser.parse_args()
    raise_nofile()
    targets = [Target.parse(t) for t in args.target]
    uvloop.run(main_async(targets, args.marker.encode(), args.size, args.interval))


if __name__ == "__main__":
    main()
