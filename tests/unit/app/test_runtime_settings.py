"""The interpreter settings a data-plane process makes once it has started (``agent.base.runtime``).

Run in a child interpreter: freezing the collector and changing the switch interval are
process-wide, and the test process must keep its own."""

from __future__ import annotations

import json
import subprocess
import sys

from agent.base import runtime

PROGRAM = """
import gc, json, sys
from agent.base import runtime
start_up = [object() for _ in range(1000)], {"config": [1, 2, 3]}
before = gc.get_freeze_count()
runtime.settle_for_data_plane()
after = gc.get_freeze_count()
unreachable = []
unreachable.append(unreachable)  # a cycle made after start-up is still collected
del unreachable
print(json.dumps({
    "frozen": after - before,
    "collected": gc.collect(),
    "threshold": gc.get_threshold(),
    "switch": sys.getswitchinterval(),
}))
"""


def test_start_up_objects_are_frozen_and_later_cycles_still_collected() -> None:
    out = subprocess.run(
        [sys.executable, "-c", PROGRAM], capture_output=True, text=True, check=True, timeout=60
    )
    seen = json.loads(out.stdout)
    assert seen["frozen"] >= 1000  # what start-up allocated is never walked again
    assert seen["collected"] >= 1
    assert seen["threshold"] == [
        runtime.GEN0_THRESHOLD,
        runtime.GEN1_THRESHOLD,
        runtime.GEN2_THRESHOLD,
    ]
    assert seen["switch"] == runtime.SWITCH_INTERVAL


TRIM = """
import json, re
from agent.base import runtime

def rss():
    return int(re.search(r"VmRSS:\\s+(\\d+)", open("/proc/self/status").read()).group(1)) * 1024

chunks = [bytearray(3000) for _ in range(20_000)]  # ~60 MiB in the C heap (not Python's arenas)
for chunk in chunks:
    chunk[::512] = b"x" * len(chunk[::512])  # touched: resident
pinned = bytearray(3000)  # allocated last: the heap's top stays in use
del chunks
freed = rss()
runtime.settle_for_data_plane()
print(json.dumps({"released": freed - rss()}))
"""


def test_the_heap_start_up_freed_goes_back_to_the_kernel() -> None:
    out = subprocess.run(
        [sys.executable, "-c", TRIM], capture_output=True, text=True, check=True, timeout=60
    )
    assert json.loads(out.stdout)["released"] > 30 << 20  # glibc, as in the image


BURSTS = """
import json, resource
from agent.base import runtime
from agent.proxy.relay import MAX_CHUNK

runtime.settle_for_data_plane()
held = bytearray(MAX_CHUNK)  # long-lived, like the relay's shared read buffer

def burst():
    # What one busy relay callback allocates and frees: a read framed into the codec's
    # output, its ciphertext, a TLS read (each a few hundred KiB, zero-filled: touched).
    chunks = [bytearray(MAX_CHUNK + 9) for _ in range(4)]
    del chunks

burst()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(100):
    burst()
print(json.dumps({"faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}))
"""


def test_transient_relay_buffers_reuse_heap_pages() -> None:
    """Without fixed heap thresholds glibc gave each burst's pages back and faulted them in
    again: 224 minor faults per burst (about one per 4 KiB page of the burst)."""
    out = subprocess.run(
        [sys.executable, "-c", BURSTS], capture_output=True, text=True, check=True, timeout=60
    )
    assert json.loads(out.stdout)["faults"] < 100  # under one per burst
