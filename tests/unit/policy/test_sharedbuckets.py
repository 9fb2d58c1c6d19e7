"""The rate-limit buckets shared by an agent's workers: one table in a memfd, several processes.

The processes are real (``python -c`` with the table's descriptor inherited, as a worker gets
it); the clock is frozen (each take is given its time), so the counts are exact.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

from agent.policy.ratelimit import RateLimit
from agent.policy.sharedbuckets import (
    HEADER,
    LAYOUT,
    MAGIC,
    SET,
    WAYS,
    BucketTable,
    LevelSeed,
    SharedRateLimiter,
    TableError,
    bucket_key,
    create_table,
)

# A worker stand-in: attach the table, say so, wait for "go", take ATTEMPTS tokens from one
# bucket at a frozen time, print how many were admitted.
TAKER = """
import sys
from agent.policy.sharedbuckets import BucketTable
fd, key, burst, rate, now, attempts = sys.argv[1:]
table = BucketTable(int(fd))
print("ready", flush=True)
sys.stdin.readline()
key, rate, burst, now = int(key), float(rate), float(burst), float(now)
print(sum(table.take(key, rate, burst, now) for _ in range(int(attempts))))
"""


@pytest.fixture
def fd() -> Iterator[int]:
    fd = create_table(sets=64)
    yield fd
    os.close(fd)


def _taker(
    fd: int, key: int, burst: int, rate: float, now: float, attempts: int
) -> subprocess.Popen[str]:
    argv = [sys.executable, "-c", TAKER, str(fd), str(key), str(burst), str(rate), str(now)]
    proc = subprocess.Popen(
        [*argv, str(attempts)],
        pass_fds=[fd],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
    return proc


def _admitted(proc: subprocess.Popen[str], go: bool = True) -> int:
    out, _ = proc.communicate("go\n" if go else None, timeout=60)
    assert proc.returncode == 0
    return int(out)


def test_two_processes_together_admit_exactly_the_burst_at_a_frozen_clock(fd: int) -> None:
    burst = 20000
    procs = [_taker(fd, 77, burst, 1.0, 100.0, attempts=15000) for _ in range(2)]
    for proc in procs:  # both attached and waiting: they take at the same time
        assert proc.stdin is not None
        proc.stdin.write("go\n")
        proc.stdin.flush()
    counts = [_admitted(proc, go=False) for proc in procs]
    assert sum(counts) == burst, counts
    assert all(n > 0 for n in counts), counts


def test_a_restarted_worker_finds_the_bucket_its_predecessor_left(fd: int) -> None:
    assert _admitted(_taker(fd, 5, burst=3, rate=2.0, now=10.0, attempts=5)) == 3
    # Its successor maps the same table (the main process kept the descriptor).
    assert _admitted(_taker(fd, 5, burst=3, rate=2.0, now=10.0, attempts=5)) == 0
    assert _admitted(_taker(fd, 5, burst=3, rate=2.0, now=11.0, attempts=5)) == 2  # refilled 1 s


def test_a_full_set_evicts_the_bucket_used_longest_ago_which_then_starts_full() -> None:
    fd = create_table(sets=1)
    try:
        table = BucketTable(fd)
        for key in range(1, WAYS + 1):  # every way taken, each bucket emptied at time `key`
            assert table.take(key, 0.0, 1.0, float(key))
            assert not table.take(key, 0.0, 1.0, float(key))
        assert table.take(100, 0.0, 1.0, 20.0)  # a new bucket evicts key 1 (stamp 1)
        for key in range(2, WAYS + 1):
            assert not table.take(key, 0.0, 1.0, 21.0), key  # the others kept their state
        assert table.take(1, 0.0, 1.0, 22.0)  # seen again: full, and it evicted 100 (stamp 20)
        assert table.take(100, 0.0, 1.0, 23.0)
        table.close()
    finally:
        os.close(fd)


def test_a_descriptor_of_the_wrong_size_is_refused_naming_the_table() -> None:
    fd = os.memfd_create("not-a-table")
    try:
        os.ftruncate(fd, SET.size + 1)
        with pytest.raises(TableError, match="not a rate-limit bucket table"):
            BucketTable(fd)
    finally:
        os.close(fd)


def _limit(rps: int = 2, burst: int = 3, *, per_identity: bool = False) -> RateLimit:
    return RateLimit("default/l", "web.default.svc.cluster.local", rps, burst, per_identity)


@pytest.fixture
def limiter(fd: int) -> Iterator[SharedRateLimiter]:
    table = BucketTable(fd)
    yield SharedRateLimiter(table)
    table.close()


def test_each_pod_has_its_own_bucket_and_identities_share_it_by_default(
    limiter: SharedRateLimiter,
) -> None:
    limit = _limit(rps=1, burst=1)
    assert limiter.admit([limit], "10.244.1.3", "spiffe://a", 0.0) is None
    assert limiter.admit([limit], "10.244.1.3", "spiffe://b", 0.0) is limit
    assert limiter.admit([limit], "10.244.2.3", "spiffe://b", 0.0) is None
    assert limiter.admit([limit], "10.244.1.3", None, 1.0) is None  # refilled


def test_per_identity_buckets_are_separate(limiter: SharedRateLimiter) -> None:
    limit = _limit(1, 1, per_identity=True)
    assert limiter.admit([limit], "p", "spiffe://a", 0.0) is None
    assert limiter.admit([limit], "p", "spiffe://a", 0.0) is limit
    assert limiter.admit([limit], "p", "spiffe://b", 0.0) is None
    assert limiter.admit([limit], "p", None, 0.0) is None  # plaintext callers: one bucket
    assert limiter.admit([limit], "p", "", 0.0) is limit


def test_the_first_refusing_limit_is_named_and_a_changed_limit_starts_full(
    limiter: SharedRateLimiter,
) -> None:
    loose, tight = _limit(100, 100), _limit(1, 1)
    assert limiter.admit([loose, tight], "p", None, 0.0) is None
    assert limiter.admit([loose, tight], "p", None, 0.0) is tight
    limiter.forget([loose])
    assert limiter.admit([_limit(1, 2)], "p", None, 0.0) is None  # new values: a new bucket


def test_the_key_covers_every_value_of_the_limit_and_is_never_zero() -> None:
    base = _limit(2, 3)
    variants = [
        base,
        _limit(3, 3),
        _limit(2, 4),
        _limit(2, 3, per_identity=True),
        RateLimit("default/m", base.service, 2, 3, False),
        RateLimit(base.policy, "other.default.svc.cluster.local", 2, 3, False),
    ]
    keys = {bucket_key(limit, "10.244.1.3", "") for limit in variants}
    keys |= {bucket_key(base, "10.244.1.4", ""), bucket_key(base, "10.244.1.3", "spiffe://a")}
    assert len(keys) == len(variants) + 2 and 0 not in keys
    # The same in another process (``hash()`` would differ: it is salted per process).
    code = (
        "from agent.policy.ratelimit import RateLimit\n"
        "from agent.policy.sharedbuckets import bucket_key\n"
        "print(bucket_key(RateLimit('default/l', 'web.default.svc.cluster.local', 2, 3, False),"
        " '10.244.1.3', ''))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert int(out.stdout) == bucket_key(base, "10.244.1.3", "")


def test_the_table_says_its_layout_and_one_of_another_layout_is_refused(fd: int) -> None:
    assert os.pread(fd, HEADER.size, 0) == HEADER.pack(MAGIC, LAYOUT, 64)
    os.pwrite(fd, HEADER.pack(MAGIC, LAYOUT + 1, 64), 0)  # what another agent version made
    with pytest.raises(TableError, match=f"layout {LAYOUT + 1}, this agent reads layout"):
        BucketTable(fd)


def test_a_table_shorter_than_its_header_says_is_refused_as_truncated(fd: int) -> None:
    os.ftruncate(fd, HEADER.size + 63 * SET.size)
    with pytest.raises(TableError, match="truncated"):
        BucketTable(fd)


def test_filled_levels_are_read_back_and_taken_from(fd: int) -> None:
    table = BucketTable(fd)
    table.fill(9, 0.5, 40.0)
    assert list(LevelSeed(table).levels()) == [(9, 0.5, 40.0)]
    assert not table.take(9, 1.0, 3.0, 40.0)  # half a token: refused
    assert table.take(9, 1.0, 3.0, 40.5)  # refilled to 1
    table.close()


def test_a_level_seed_gives_each_level_the_table_held_once_and_lists_the_rest() -> None:
    """What a single-process successor takes along when it leaves the table: per bucket key,
    also when keys share a set (4 sets, 20 pods), the level the table held, once."""
    fd = create_table(sets=4)
    table = BucketTable(fd)
    limit = RateLimit("default/l", "web.default.svc.cluster.local", 1, 100, False)
    pods = [f"10.0.0.{i}" for i in range(20)]
    for n, pod in enumerate(pods):
        table.fill(bucket_key(limit, pod, ""), float(n), 50.0 + n)
    seed = LevelSeed(table)
    table.release()
    assert seed(limit, pods[7], "") == (7.0, 57.0)
    assert seed(limit, pods[7], "") is None  # given out: the in-process bucket has it now
    assert seed(limit, "10.0.0.99", "") is None  # never in the table: a full bucket
    rest = {key: (tokens, stamp) for key, tokens, stamp in seed.levels()}
    assert rest == {
        bucket_key(limit, pod, ""): (float(n), 50.0 + n) for n, pod in enumerate(pods) if n != 7
    }
