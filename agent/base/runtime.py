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
in the lab (docs/performance/memory.md, "A small agent process"). It is glibc's; with another C
library the step is skipped.

And one for throughput: **the C heap's thresholds are fixed** (``hold_heap``). Relaying moves
each chunk through transient buffers of a few hundred KiB (a relay read framed into the
codec's output, the TLS layer's ciphertext, a TLS read on the far side), allocated and freed
within one callback. glibc adapts its thresholds to what it sees freed (a freed mmap chunk
raises the mmap threshold to its size and the trim threshold to twice that), so whether such a
burst is given back to the kernel at the end of every callback depended on the largest buffers
the process had happened to free before. An agent that compiled its BPF programs itself had
freed large ones; since the compile runs in a short-lived child (c1622a1) and start-up shrank,
nothing raises them, and at e856b65 the agents' heap top was trimmed (``brk``) and grown again
up to 13 times per MiB relayed cross-node, each regrowth page-faulting its fresh pages: 17 to
350 minor faults per MiB per agent (under one before c1622a1), about a quarter more CPU per GB
(docs/performance/bulk-and-windows.md, "Bulk throughput and the C heap"). With ``MMAP_THRESHOLD``
above any buffer the data path allocates and ``TRIM_THRESHOLD`` above a few of them, such bursts
reuse the same heap pages; a larger free top is still given back, and ``malloc_trim`` above gives
start-up's back regardless.
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
# glibc's ``mallopt`` parameters (malloc.h) and the values ``hold_heap`` sets: the largest
# buffer the data path allocates is the codec's output after a WINDOW_UPDATE released a
# connection's outgoing budget (``agent.proxy.hbone_limits.OUT_BUDGET``, 1 MiB) plus a relay
# read, and one callback holds at most a few of them.
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 2 << 20  # allocations at least this large are mmap'd and unmapped on free
TRIM_THRESHOLD = 4 << 20  # free memory at the heap's top above this goes back to the kernel


def settle_for_data_plane() -> None:
    """Freeze what start-up allocated, return its freed heap to the kernel, fix the heap's
    thresholds, and set the collector's thresholds and the switch interval (see the module
    docstring). Call once, when start-up is done: objects allocated before the call are never
    collected afterwards."""
    gc.collect()
    gc.freeze()
    trim_heap()
    hold_heap()
    gc.set_threshold(GEN0_THRESHOLD, GEN1_THRESHOLD, GEN2_THRESHOLD)
    sys.setswitchinterval(SWITCH_INTERVAL)


def trim_heap() -> None:
    """Give the C heap's free pages back to the kernel (glibc's ``malloc_trim``; nothing where
    the C library has no such call)."""
    trim = getattr(ctypes.CDLL(None), "malloc_trim", None)
    if trim is not None:
        trim.argtypes = [ctypes.c_size_t]
        trim(0)


def hold_heap() -> None:
    """Fix glibc's mmap and trim thresholds (see the module docstring), so that transient
    relay buffers reuse heap pages instead of being given back and faulted in again per chunk;
    nothing where the C library has no ``mallopt``."""
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is not None:
        mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
        mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
