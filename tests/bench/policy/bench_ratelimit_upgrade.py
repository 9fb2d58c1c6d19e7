"""What a limited request's take costs a single-process (``--workers 1``) successor agent, in
the two phases of an upgrade: while its predecessor still serves, and after it exited.

    PYTHONPATH=TREE .venv/bin/python tests/bench/policy/bench_ratelimit_upgrade.py [--rounds 7]

The predecessor is a ``sleep`` process that has filled a full-size bucket table (one pod bucket
and 100 identity buckets); the successor is built on that table with the tree's own set-up: on
a tree with ``agent.app.share_until_exit``, that (then ``leave_table`` for the second phase),
else what ``Agent.prepare`` did before it (in-process buckets seeded from the table, in both
phases). Printed, as JSON, µs of CPU time (``time.thread_time``) per ``limiter.admit`` of an
existing bucket (per pod, per identity), min over ``--rounds`` repetitions of 20,000 after as
many to warm up, and per bucket created after the predecessor exited. One clock for every take,
so each take refills as a request after the last one does. Runs on any tree, so main and a branch
can be alternated.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time
import timeit
from collections.abc import Callable
from types import SimpleNamespace

from agent import app
from agent.policy import sharedbuckets
from agent.policy.ratelimit import RateLimit, RateLimiter

POD = "10.244.1.3"
SERVICE = "web.default.svc.cluster.local"
HUGE = 10**9  # rate and burst: every take is admitted, so each is a full refill and take
POD_LIMIT = RateLimit("default/pod", SERVICE, HUGE, HUGE, False)
ID_LIMIT = RateLimit("default/identity", SERVICE, HUGE, HUGE, True)
IDS = [f"spiffe://cluster.local/ns/default/sa/c{i}" for i in range(100)]
TAKES = 20_000
CLOCK = [2.0]


def predecessors_table() -> sharedbuckets.BucketTable:
    table = sharedbuckets.BucketTable(sharedbuckets.create_table())
    old = sharedbuckets.SharedRateLimiter(table)
    for who in IDS:
        old.admit([POD_LIMIT, ID_LIMIT], POD, who, 1.0)
    return table


def successor(
    table: sharedbuckets.BucketTable, pid: int
) -> tuple[SimpleNamespace, Callable[[], None]]:
    """The successor's core, and what happens when its predecessor exits."""
    core = SimpleNamespace(limiter=None)
    share = getattr(app, "share_until_exit", None)
    if share is None:  # before: in-process buckets seeded from the table, for good
        core.limiter = RateLimiter(seed=sharedbuckets.TableSeed(table))  # type: ignore[attr-defined]
        return core, lambda: None
    from agent import handover

    watch = share(core, table, handover.HandedBuckets(table.fd, pid, os.pidfd_open(pid)))

    def exited() -> None:
        watch.close()
        app.leave_table(core, pid)  # type: ignore[arg-type]

    return core, exited


def take_cost(core: SimpleNamespace, limit: RateLimit, who: str | None, rounds: int) -> float:
    def take() -> None:
        CLOCK[0] += 1e-6
        core.limiter.admit((limit,), POD, who, CLOCK[0])

    for _ in range(TAKES):
        take()
    best = min(timeit.repeat(take, timer=time.thread_time, number=TAKES, repeat=rounds))
    return best / TAKES * 1e6


def create_cost(core: SimpleNamespace, rounds: int) -> float:
    """µs per new identity bucket (100 a round, each round a limit of its own)."""
    best = float("inf")
    for r in range(rounds):
        limit = RateLimit(f"default/new{r}", SERVICE, HUGE, HUGE, True)
        start = time.thread_time()
        for who in IDS:
            core.limiter.admit((limit,), POD, who, CLOCK[0])
        best = min(best, (time.thread_time() - start) / len(IDS) * 1e6)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    rounds = parser.parse_args().rounds
    predecessor = subprocess.Popen(["sleep", "600"])
    try:
        core, exited = successor(predecessors_table(), predecessor.pid)
        out = {
            "serving pod": take_cost(core, POD_LIMIT, None, rounds),
            "serving identity": take_cost(core, ID_LIMIT, IDS[0], rounds),
        }
        exited()
        out["exited pod"] = take_cost(core, POD_LIMIT, None, rounds)
        out["exited identity"] = take_cost(core, ID_LIMIT, IDS[0], rounds)
        out["exited new bucket"] = create_cost(core, rounds)
    finally:
        predecessor.kill()
        predecessor.wait()
    print(json.dumps({k: round(v, 3) for k, v in out.items()}))


if __name__ == "__main__":
    main()
