"""Connection rate: new connections per second, each with one small exchange, then a close.

``--concurrency`` workers each loop connect → send ``--size`` bytes → read them back → close, for
``--seconds`` after ``--warmup`` seconds that are not counted. Prints the count, the rate, the
connect+exchange time percentiles in milliseconds and the errors by type (a path that refuses or
resets connections shows up there, not as a lower rate only), and ``completed``: every connection
finished, the warm-up's included (what the proxies' CPU over the whole run is divided by).

    python -m bench.programs.connrate_client --host 10.244.2.2 --port 7000 --seconds 5
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import time
from collections import Counter

import uvloop

from bench.programs import raise_nofile
from bench.programs.exchange import connect_and_echo


async def worker(
    address: tuple[str, int], message: bytes, start: float, end: float,
    times: list[float], errors: Counter[str], completed: list[int],
) -> None:  # fmt: skip
    while (now := time.monotonic()) < end:
        try:
            sock = await connect_and_echo(address, message)
        except OSError as e:
            errors[type(e).__name__] += 1
            await asyncio.sleep(0.01)  # do not spin on a refusing path
            continue
        sock.close()
        completed[0] += 1
        if now >= start:
            times.append((time.monotonic() - now) * 1000)


async def run(args: argparse.Namespace) -> dict[str, object]:
    address, message = (args.host, args.port), b"c" * args.size
    begin = time.monotonic()
    start, end = begin + args.warmup, begin + args.warmup + args.seconds
    times: list[float] = []
    errors: Counter[str] = Counter()
    completed = [0]
    await asyncio.gather(
        *(
            worker(address, message, start, end, times, errors, completed)
            for _ in range(args.concurrency)
        )
    )
    elapsed = time.monotonic() - start
    times.sort()
    return {
        "connections": len(times),
        "seconds": elapsed,
        "rate": len(times) / elapsed,
        "p50_ms": times[len(times) // 2] if times else None,
        "p99_ms": times[int(len(times) * 0.99)] if times else None,
        "errors": dict(errors),
        "completed": completed[0],
        # this client's own CPU over the whole run (warm-up included, as ``completed``): the
        # share of the machine the load generator takes, beside the proxies' on the same cores
        "client_cpu_s": _own_cpu(),
    }


def _own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--size", type=int, default=100)
    args = parser.parse_args()
    raise_nofile()
    print(json.dumps(uvloop.run(run(args))))


if __name__ == "__main__":
    main()
