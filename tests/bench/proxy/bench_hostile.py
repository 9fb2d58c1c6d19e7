"""What each hostile HBONE pattern makes one server connection hold (codec level, no sockets).

    .venv/bin/python -m tests.bench.proxy.bench_hostile [PATTERN ...]

For each pattern of ``tests.unit.proxy.hostile`` (a peer that never reads, an owner that never
consumes; ``offers``: what the peer would send if nothing stopped it): the bytes held by the
codec's own accounting plus the output the peer left unread (``held``), the bytes delivered to
the owner, the memory traced inside the codec (``h2``'s buffers, stream objects: tracemalloc),
and how the connection was refused. The figures before the limits (issue 15) and after are in
docs/performance/memory.md, "Hostile peers at the codec"; ``hostile.Attack`` also drives the codec
from before the limits, so the same script measured both.
"""

from __future__ import annotations

import gc
import sys
import time
import tracemalloc

from h2.errors import ErrorCodes

from tests.unit.proxy import hostile

KIB = 1024


def measure(name: str) -> str:
    pattern, total = hostile.PATTERNS[name]
    gc.collect()
    tracemalloc.start()
    attack = hostile.Attack()
    base = tracemalloc.get_traced_memory()[0]
    start = time.perf_counter()
    pattern(attack, total)
    gc.collect()
    traced = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    failed = attack.failed
    outcome = (
        f"{ErrorCodes(failed.error_code).name} ({getattr(failed, 'cause', '')})"
        if failed
        else "not refused"
    )
    return (
        f"{name:30s} offers {total // KIB:7d} KiB  held {attack.held() // KIB:7d} KiB  "
        f"delivered {attack.delivered // KIB:7d} KiB  traced {max(traced, 0) // KIB:6d} KiB  "
        f"{time.perf_counter() - start:5.1f} s  {outcome}"
    )


def main() -> None:
    for name in sys.argv[1:] or list(hostile.PATTERNS):
        print(measure(name), flush=True)


if __name__ == "__main__":
    main()
