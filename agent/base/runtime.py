"""Process-wide interpreter settings for a process that relays connections: the one place they
are made (``settle_for_data_plane``, called once the process finished starting).

Why: the proxy's latency tail is made of pauses of the event loop thread, and two of them come
from the interpreter, not from the proxy's code (measured on the bench's lab, 2 shared cores):

* **Garbage collection.** Start-up leaves some 60,000 tracked objects (modules, classes,
  configuration, certificates) that never become garbage, yet every full collection walks
  them again: 13-113 ms per generation-2 pass in the lab's agents (20-45 ms offline).
  ``gc.freeze()`` after start-up moves them to the permanent generation, so later passes walk
  only what the agent allocated since (a full pass over the start-up heap fell to under
  0.1 ms). A larger generation-0 threshold makes the young collections fewer (a bench run's
  workloads: 2-3 instead of some 30-40, plus 2-3 generation-1 passes), each longer (1.7-14 ms
  on the loaded lab): fewer sequential round trips are delayed; with many requests in flight a
  pause delays them all. Reference counting frees a relay's per-message objects at once either
  way; the collector is only there for cycles.
* **The GIL's switch interval.** Work in another thread (the datapath's reconcile pass runs
  in a worker thread: 4-8 ms of CPU, 4-19 ms wall, every 5 s) holds the GIL, and a waiting
  event loop gets it back only when the interval (5 ms by default) runs out, so one pass could
  hold a ready connection for 5 ms at a time. At 0.5 ms the loop waits at most that long; the
  switching costs nothing while only the loop thread runs.

And one for memory: start-up's transient allocations (the cluster file's YAML, the first state
and reconcile, the CA exchange) are freed by then but stay resident in the C allocator's heap.
``malloc_trim(0)`` hands those pages back: about 1.2 MiB of the main process's idle RSS, measured
in the lab (ARCHITECTURE.md, "A small agent"). It is glibc's; with another C library the step is
skipped.
"""

from __future__ import annotations

import ctypes
import gc
import sys

# Young-generation threshold: allocations (less deallocations) of tracked objects between
# generation-0 passes (CPython's default: 700).
GEN0_THRESHOLD = 10_000
# Generation-0 passes per generation-1 pass, and generation-1 passes per full pass (defaults).
GEN1_THRESHOLD = 10
GEN2_THRESHOLD = 10
SWITCH_INTERVAL = 0.0005  # seconds (CPython's default: 0.005)


def settle_for_data_plane() -> None:
    """Freeze what start-up allocated, return its freed heap to the kernel, and set the
    collector's thresholds and the switch interval (see the module docstring). Call once, when
    start-up is done: objects allocated before the call are never collected afterwards."""
    gc.collect()
    gc.freeze()
    trim_heap()
    gc.set_threshold(GEN0_THRESHOLD, GEN1_THRESHOLD, GEN2_THRESHOLD)
    sys.setswitchinterval(SWITCH_INTERVAL)


def trim_heap() -> None:
    """Give the C heap's free pages back to the kernel (glibc's ``malloc_trim``; nothing where
    the C library has no such call)."""
    trim = getattr(ctypes.CDLL(None), "malloc_trim", None)
    if trim is not None:
        trim.argtypes = [ctypes.c_size_t]
        trim(0)
