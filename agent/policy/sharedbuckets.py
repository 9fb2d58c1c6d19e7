"""Token buckets shared by the worker processes of one agent (``--workers N``).

Why shared: the kernel spreads a pod's new connections over the agent's workers by flow hash,
so buckets kept per process would let a RateLimitPolicy admit up to N times its burst and rate
on a node of N workers. Envoy and Linkerd enforce a local rate limit once per proxy, whatever
its thread count, and that is what users expect of a node proxy.

How: the agent's main process creates a memfd (``create_table``) holding a fixed table of
bucket slots and passes its descriptor to every worker at exec, as it passes the listeners; each
worker maps it (``BucketTable``). The main process keeps its descriptor for the agent's life, so
a restarted worker maps the same table and finds the buckets as its predecessor left them.

Layout: a header (magic, ``LAYOUT``, ``sets``), then ``sets`` sets of ``WAYS`` slots, a slot
being (key, tokens, stamp): a 64-bit hash of (policy, Service, rate, burst, per-identity, pod
IP, identity) (0: free), the tokens left and the monotonic time they were counted at
(``CLOCK_MONOTONIC`` is one clock for every process of the host, so workers' times compare). A
key's set is its hash modulo ``sets``; a key not in its set takes a free slot, else the slot
used longest ago (the oldest stamp): an evicted bucket, seen again, starts full, as an identity
evicted from the single-process LRU does. The file is sparse and pages are allocated when
touched, so a node with few limited pods pays a few pages (4 KiB each), not the table's
``TABLE_SETS * SET.size`` bytes.

Locking: a take reads, refills and writes a set under a POSIX byte-range lock on that set
(``fcntl.lockf``). Such locks belong to a process, not to a descriptor: the workers share one
open file description (inherited), which would make an OFD lock or ``flock`` exclude nothing
between them. A worker is single-threaded and holds one table, so its own locks never meet;
the kernel releases a lock whose holder dies, so a killed worker cannot wedge a set. The
refill arithmetic is ``ratelimit.refill``, the same as the single-process buckets'.

Across an upgrade the successor agent continues the table (``agent.handover`` passes its
descriptor), and for as long as both agents serve (the old one draining), every take of either
comes out of it: workers map it, a single-process predecessor copies its buckets into a new
table and moves to it (``share``), a single-process successor takes from the table it got
(``SharedRateLimiter``). A single-process agent stays on the table until the other agent has
exited (``agent.app.TablePeers``), then goes back to in-process buckets that start at the levels
the table held (``unshare``, ``LevelSeed``), its descriptor and mapping released. Every process
that maps a table checks its header, so a table of another agent version is refused
(``TableError``), never misread.

A bucket's key carries every value of its limit, so a changed policy starts with new, full
buckets, and the slots of limits no longer in force are reused as they age. A policy deleted
and created again with the same values within ``burst / rate`` seconds finds its old bucket
(refilled for the time between), where the single-process limiter starts a full one.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import mmap
import os
import struct
from array import array
from collections.abc import Iterable, Iterator

from agent.policy.ratelimit import Limiter, RateLimit, RateLimiter, refill

log = logging.getLogger(__name__)

# The table's layout, written in its header: a successor agent maps its predecessor's table
# (``handover``), so an agent must recognise a table laid out by another version. Change it
# with any change to HEADER, SLOT, SET or the key (``bucket_key``).
LAYOUT = 1
MAGIC = b"nmbucket"
HEADER = struct.Struct("<8sII")  # magic, layout, sets
WAYS = 8
SLOT = struct.Struct("<Qdd")  # key (0: free), tokens, stamp
SET = struct.Struct("<" + "Qdd" * WAYS)
# 131,072 buckets in 3 MiB of address space: as many as 32 pods with the single-process
# limiter's 4096 identities each; only the pages of sets in use are resident.
TABLE_SETS = 1 << 14


class TableError(ValueError):
    """A descriptor that is not a bucket table of this agent's layout, named with the fix."""


def create_table(sets: int = TABLE_SETS) -> int:
    """A new, empty table in a memfd (close-on-exec: pass it to a worker with ``pass_fds``);
    its descriptor."""
    fd = os.memfd_create("nodemesh-ratelimit", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, HEADER.size + sets * SET.size)
        os.pwrite(fd, HEADER.pack(MAGIC, LAYOUT, sets), 0)
    except OSError:
        os.close(fd)
        raise
    return fd


def _check_table(fd: int) -> int:
    """The number of sets of the table behind ``fd``; TableError if it is not one of
    ``LAYOUT`` (another agent version's table, a truncated file, anything else)."""
    size = os.fstat(fd).st_size
    head = os.pread(fd, HEADER.size, 0)
    if len(head) < HEADER.size or head[:8] != MAGIC:
        raise TableError(
            f"descriptor {fd} ({size} bytes) is not a rate-limit bucket table (no "
            f"{MAGIC.decode()} header); the worker must get the fd the main process made with "
            "create_table"
        )
    _, layout, sets = HEADER.unpack(head)
    if layout != LAYOUT:
        raise TableError(
            f"the bucket table has layout {layout}, this agent reads layout {LAYOUT} (an agent "
            "of another version made it)"
        )
    if sets == 0 or size != HEADER.size + sets * SET.size:
        raise TableError(
            f"the bucket table's header says {sets} sets ({HEADER.size + sets * SET.size} "
            f"bytes) but it holds {size} bytes: truncated or not a rate-limit bucket table"
        )
    return int(sets)


def bucket_key(limit: RateLimit, pod_ip: str, identity: str) -> int:
    """The slot key of one bucket: the same in every process (``hash()`` is salted per
    process, so a keyed digest it is); never 0, which marks a free slot."""
    text = "\0".join(
        (
            limit.policy,
            limit.service,
            str(limit.requests_per_second),
            str(limit.burst),
            "1" if limit.per_identity else "0",
            pod_ip,
            identity,
        )
    )
    digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") or 1


class BucketTable:
    """One process's view of the shared table behind descriptor ``fd`` (not closed here: the
    main process owns it, a worker keeps the one it inherited)."""

    def __init__(self, fd: int) -> None:
        self._sets = _check_table(fd)
        self.fd = fd
        size = HEADER.size + self._sets * SET.size
        self._map = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)

    def take(self, key: int, rate: float, burst: float, now: float) -> bool:
        """Take one token from bucket ``key`` (``rate`` per second, at most ``burst``) at time
        ``now``; a bucket not in the table starts full."""
        base = HEADER.size + (key % self._sets) * SET.size
        fcntl.lockf(self.fd, fcntl.LOCK_EX, SET.size, base)
        try:
            slots = SET.unpack_from(self._map, base)
            keys = slots[0::3]
            try:
                way = keys.index(key)
            except ValueError:  # not in the table (first use, or evicted): a full bucket
                way = keys.index(0) if 0 in keys else _oldest(slots[2::3])
                tokens, stamp = burst, now
            else:
                tokens, stamp = slots[3 * way + 1], slots[3 * way + 2]
            ok, tokens, stamp = refill(tokens, stamp, rate, burst, now)
            SLOT.pack_into(self._map, base + way * SLOT.size, key, tokens, stamp)
        finally:
            fcntl.lockf(self.fd, fcntl.LOCK_UN, SET.size, base)
        return ok

    def fill(self, key: int, tokens: float, stamp: float) -> None:
        """Set bucket ``key`` to ``tokens`` at ``stamp`` (a level counted elsewhere), evicting
        as ``take`` does."""
        base = HEADER.size + (key % self._sets) * SET.size
        fcntl.lockf(self.fd, fcntl.LOCK_EX, SET.size, base)
        try:
            slots = SET.unpack_from(self._map, base)
            keys = slots[0::3]
            if key in keys:
                way = keys.index(key)
            else:
                way = keys.index(0) if 0 in keys else _oldest(slots[2::3])
            SLOT.pack_into(self._map, base + way * SLOT.size, key, tokens, stamp)
        finally:
            fcntl.lockf(self.fd, fcntl.LOCK_UN, SET.size, base)

    @property
    def sets(self) -> int:
        return self._sets

    def occupied(self) -> Iterator[tuple[int, tuple[float, ...]]]:
        """(set index, its slots as ``SET`` unpacks them) of every set holding a bucket, in
        order: what a process that leaves the table takes along (``LevelSeed``). Read with
        ``pread``, which leaves the holes of the sparse file unallocated where reading through
        the mapping would fill them in."""
        empty = bytes(SET.size)
        per_read = 1024  # sets: 192 KiB at a time
        for first in range(0, self._sets, per_read):
            count = min(per_read, self._sets - first)
            chunk = os.pread(self.fd, count * SET.size, HEADER.size + first * SET.size)
            for n in range(count):
                at = n * SET.size
                if chunk[at : at + SET.size] != empty:
                    yield first + n, SET.unpack_from(chunk, at)

    def close(self) -> None:
        self._map.close()

    def release(self) -> None:
        """Unmap the table and close its descriptor: for a process that owns ``fd`` and is done
        with the table (the memory goes once no other process holds it)."""
        self._map.close()
        os.close(self.fd)
        self.fd = -1


def _oldest(stamps: tuple[float, ...]) -> int:
    return min(range(len(stamps)), key=stamps.__getitem__)


class SharedRateLimiter:
    """``ratelimit.Limiter`` over a ``BucketTable``: the buckets of the node, whichever worker
    asks. The keys of pod buckets are kept per (limit, pod IP) as they are asked for, and
    dropped by ``forget`` with their limits."""

    def __init__(self, table: BucketTable) -> None:
        self.table = table
        self._keys: dict[tuple[RateLimit, str], int] = {}

    def admit(
        self, limits: Iterable[RateLimit], pod_ip: str, identity: str | None, now: float
    ) -> RateLimit | None:
        """As ``RateLimiter.admit``: None if every limit admits (each takes a token), else the
        first one that refuses."""
        for limit in limits:
            if limit.per_identity:
                key = bucket_key(limit, pod_ip, identity or "")
            else:
                key = self._keys.get((limit, pod_ip), 0)
                if not key:
                    key = self._keys[(limit, pod_ip)] = bucket_key(limit, pod_ip, "")
            if not self.table.take(key, float(limit.requests_per_second), float(limit.burst), now):
                return limit
        return None

    def forget(self, keep: Iterable[RateLimit]) -> None:
        """Forget the keys of limits no longer in force (their slots age out of the table)."""
        wanted = set(keep)
        for k in [k for k in self._keys if k[0] not in wanted]:
            del self._keys[k]


def share(limiter: Limiter) -> tuple[int, Limiter]:
    """For a successor agent: a descriptor of a table holding ``limiter``'s buckets (the caller
    sends and closes it) and the limiter this agent uses from now on.

    A shared limiter's own table is handed over as it is, so both agents take from the same
    buckets for the rest of the handover and drain. In-process buckets are written into a new
    table, and this agent moves to that table itself, so the requests its established
    connections carry afterwards still count where the successor reads them. Its limited
    requests cost the shared table's price (about 2.5 µs more) until the successor has exited
    (``agent.app.TablePeers``): it drains meanwhile, or serves again if the successor died. The
    levels this agent was seeded with and never used (``LevelSeed``: buckets only the agent
    before it touched) go into the table too, so the next agent continues them as well.
    """
    if isinstance(limiter, SharedRateLimiter):
        return os.dup(limiter.table.fd), limiter
    if not isinstance(limiter, RateLimiter):
        raise TypeError(f"cannot hand over the buckets of a {type(limiter).__name__}")
    # A new table, kept open for this process's life: its limiter locks through it.
    table = BucketTable(create_table())
    if isinstance(limiter.seed, LevelSeed):
        for key, tokens, stamp in limiter.seed.levels():
            table.fill(key, tokens, stamp)
    for limit, pod_ip, identity, bucket in limiter.levels():
        table.fill(bucket_key(limit, pod_ip, identity), bucket.tokens, bucket.stamp)
    return os.dup(table.fd), SharedRateLimiter(table)


def unshare(limiter: Limiter) -> Limiter:
    """The limiter of a single-process agent once no other agent takes from its table (its
    predecessor, or the successor it handed the table to, exited): in-process buckets again,
    each starting at the level the table holds for it, so leaving the table gives no client a
    fresh burst; the table's descriptor and mapping are released. A limiter not on a table is
    returned as it is."""
    if not isinstance(limiter, SharedRateLimiter):
        return limiter
    seed = LevelSeed(limiter.table)
    limiter.table.release()
    return RateLimiter(seed=seed)


def adopt(fd: int, predecessor: object) -> BucketTable | None:
    """The table a predecessor agent handed over, or None (``fd`` closed) when it is not one
    this agent can read; logs which, once."""
    try:
        table = BucketTable(fd)
    except (TableError, OSError) as e:
        os.close(fd)
        log.warning(
            "rate-limit buckets start full: agent %s's table is refused: %s", predecessor, e
        )
        return None
    log.info("continuing the rate-limit buckets of agent %s", predecessor)
    return table


class LevelSeed:
    """``RateLimiter``'s seed after leaving a table: the levels the table held, each given out
    once, to the bucket created for it (an in-process bucket carries it on from there).

    Kept compact, as the table's sets are: the keys, (tokens, stamp) per key, both in table
    order, and where each set's keys start: 24 bytes a bucket and 4 a set (at most the table's
    own 3 MiB, where a dict of tuples took 170 bytes a bucket, 21 MiB for a full table)."""

    def __init__(self, table: BucketTable) -> None:
        self._sets = table.sets
        self._keys = array("Q")
        self._levels = array("d")
        counts = array("I", bytes(4 * self._sets))
        for index, slots in table.occupied():
            for way in range(WAYS):
                if key := int(slots[3 * way]):
                    self._keys.append(key)
                    self._levels.extend(slots[3 * way + 1 : 3 * way + 3])
                    counts[index] += 1
        self._starts = array("I", [0])
        for count in counts:
            self._starts.append(self._starts[-1] + count)

    def __call__(self, limit: RateLimit, pod_ip: str, identity: str) -> tuple[float, float] | None:
        key = bucket_key(limit, pod_ip, identity)
        index = key % self._sets
        for i in range(self._starts[index], self._starts[index + 1]):
            if self._keys[i] == key:
                self._keys[i] = 0  # given out
                return self._levels[2 * i], self._levels[2 * i + 1]
        return None

    def levels(self) -> Iterator[tuple[int, float, float]]:
        """(key, tokens, stamp) of every level not given out yet."""
        for i, key in enumerate(self._keys):
            if key:
                yield key, self._levels[2 * i], self._levels[2 * i + 1]
