"""Idle connections held open: the harness asks for N, measures the proxy's memory, asks for more.

Reads one target count per line on stdin; opens connections (at most ``--parallel`` dialling at
once, each confirmed by a one-byte echo so that every proxy on the path holds its upstream half
too) until that many are open, then prints ``{"open": N, "errors": {...}}`` and waits for the next
line. End of stdin closes everything and exits.

    python -m bench.programs.idle_client --host 10.244.2.2 --port 7000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import sys
from collections import Counter

import uvloop

from bench.programs import raise_nofile
from bench.programs.exchange import connect_and_echo


async def grow(
    held: list[socket.socket], target: int, address: tuple[str, int], parallel: int,
    errors: Counter[str],
) -> None:  # fmt: skip
    gate = asyncio.Semaphore(parallel)

    async def one() -> None:
        async with gate:
            try:
                held.append(await connect_and_echo(address, b"i"))
            except OSError as e:
                errors[type(e).__name__] += 1

    # Errors are retried up to a bound, so a transient refusal does not shrink the sample.
    for _ in range(3):
        missing = target - len(held)
        if missing <= 0:
            return
        await asyncio.gather(*(one() for _ in range(missing)))


async def run(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    held: list[socket.socket] = []
    errors: Counter[str] = Counter()
    try:
        while line := await loop.run_in_executor(None, sys.stdin.readline):
            await grow(held, int(line), (args.host, args.port), args.parallel, errors)
            print(json.dumps({"open": len(held), "errors": dict(errors)}), flush=True)
    finally:
        for sock in held:
            sock.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--parallel", type=int, default=128)
    args = parser.parse_args()
    raise_nofile()
    uvloop.run(run(args))


if __name__ == "__main__":
    main()
