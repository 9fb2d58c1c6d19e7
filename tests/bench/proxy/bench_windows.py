"""What the HBONE flow-control windows cost and buy: both node proxies in one process, loopback TLS.

    sudo .venv/bin/python -m tests.bench.proxy.bench_windows [--rounds 3] [--pairs 512K/2M,4M/16M]

For each stream/connection window pair (``HboneSettings.stream_window``/``connection_window``,
the same on both proxies), in a fresh process per measurement and with the pairs alternated
round by round (the machine is shared: the CPU time per GB is what the load cannot move; take
the minimum over rounds):

  - bulk: 1 and 4 streams client pod -> server pod (one HBONE connection), the bytes written and
    read by a helper process, so the proxies' process CPU time is the proxies' alone: CPU s/GB
    and Gbit/s;
  - rr: 1 KB request/response on one tunnel: p50 µs and proxy CPU µs per round trip;
  - fair: the same 1 KB round trips on a second tunnel of the *same* HBONE connection while a
    bulk stream fills it: p50/p99 µs (does a larger window queue the small stream behind bulk?)
    and the bulk bytes in flight meanwhile (sent by node1, not yet acknowledged by node2);
  - stall: pod receivers that never read (tiny receive buffers) on 1, 4 and 16 streams of one
    connection: what the destination proxy holds by its own accounting
    (``HboneProtocol.held_bytes``) and in Python objects (tracemalloc), once the senders stall;
  - idle: 100 idle tunnels: KiB per tunnel (tracemalloc, both proxies).

Each child holds the C heap's thresholds as the agent does once started
(``agent.base.runtime.hold_heap``, which ``settle_for_data_plane`` calls): without it glibc gave
a relayed chunk's transient buffers back to the kernel and faulted them in again, run by run or
not, and a bulk child's CPU per GB was bimodal (docs/performance/bulk-and-windows.md, "Bulk
throughput and the C heap"). Bulk reports the minor page faults per 512 MiB relayed, which show it.

Needs root (the loopback mesh sets SO_MARK); prints one line per measurement and a summary table.
The closing numbers are in docs/performance/bulk-and-windows.md ("HBONE windows").
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import resource
import socket
import statistics
import subprocess
import sys
import tracemalloc
from collections.abc import Callable, Coroutine
from typing import Any

import uvloop

from agent.base.runtime import hold_heap
from agent.proxy.h2wire import KIB, MIB, HboneSettings
from agent.proxy.hbone_limits import connection_memory_bound
from tests.integration.proxy.mesh import CLIENT, SERVER, Mesh, listener

# The helper process: pod apps (sink, echo) on the server pod's IP and clients from the client
# pod's IP. Commands on stdin, one JSON line each; answers on stdout.
HELPER = r"""
import json, socket, sys, threading, time

CLIENT, SERVER = sys.argv[1], sys.argv[2]

def listen(rcvbuf=0):
    s = socket.socket()
    if rcvbuf:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.bind((SERVER, 0))
    s.listen(128)
    return s

def sink_conn(c):
    buf = bytearray(1 << 20)
    while c.recv_into(buf):
        pass
    c.close()

def echo_conn(c):
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    while d := c.recv(65536):
        c.sendall(d)
    c.close()

def serve(s, handler):
    while True:
        c, _ = s.accept()
        threading.Thread(target=handler, args=(c,), daemon=True).start()

held = []
def hold(s):  # accepts and never reads
    while True:
        held.append(s.accept()[0])

def client(port):
    c = socket.socket()
    c.bind((CLIENT, 0))
    c.connect(("127.0.0.1", port))
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return c

rr_done = threading.Event()  # a bulk stream next to round trips stops when they are done

def send(port, total, out):
    c = client(port)
    chunk = b"z" * (256 * 1024)
    sent = 0
    while sent < total and not rr_done.is_set():
        c.sendall(chunk)
        sent += len(chunk)
    c.shutdown(socket.SHUT_WR)
    c.recv(1)  # until the far end closes: every byte went through
    out.append(sent)

def send_until_stalled(port, out):
    c = client(port)
    c.setblocking(False)
    chunk = b"s" * 65536
    sent, last = 0, time.monotonic()
    while time.monotonic() - last < 2.0:
        try:
            sent += c.send(chunk)
            last = time.monotonic()
        except BlockingIOError:
            time.sleep(0.01)
    out.append((sent, c))

def rr(port, n, out):
    c = client(port)
    msg, times = b"x" * 1024, []
    for i in range(n + 50):
        t = time.perf_counter_ns()
        c.sendall(msg)
        got = 0
        while got < len(msg):
            got += len(c.recv(65536))
        if i >= 50:
            times.append((time.perf_counter_ns() - t) / 1000)
    c.close()
    rr_done.set()
    out.append(times)

sink, echo, hole = listen(), listen(), listen(4096)
threading.Thread(target=serve, args=(sink, sink_conn), daemon=True).start()
threading.Thread(target=serve, args=(echo, echo_conn), daemon=True).start()
threading.Thread(target=hold, args=(hole,), daemon=True).start()
print(json.dumps({"sink": sink.getsockname()[1], "echo": echo.getsockname()[1],
                  "hole": hole.getsockname()[1]}), flush=True)
for line in sys.stdin:
    cmd = json.loads(line)
    out, threads = [], []
    rr_done.clear()
    start = time.perf_counter()
    for job in cmd["jobs"]:
        fn = {"send": send, "rr": rr, "stall": send_until_stalled}[job[0]]
        threads.append(threading.Thread(target=fn, args=(*job[1:], out)))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    if cmd["jobs"][0][0] == "stall":
        out = [sent for sent, _ in out]
    print(json.dumps({"wall": wall, "out": out}), flush=True)
"""


def syscalls() -> int:
    """read and write system calls of this process so far (libuv reads and writes sockets with
    them): how often the proxies go to the kernel, which the load does not change."""
    with open("/proc/self/io") as f:
        fields = dict(line.split(": ") for line in f.read().splitlines())
    return int(fields["syscr"]) + int(fields["syscw"])


def cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def minor_faults() -> int:
    """This process's minor page faults so far (a heap given back and taken again: one per page)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


class Bench:
    """The helper process's pods (clients from ``CLIENT``, apps on ``pod``) and entries into
    node1's outbound proxy; ``nodelay``: the entries' accepted sockets get ``TCP_NODELAY``, as
    ``ProxyComponent.handle`` sets it (``bench_samenode``)."""

    nodelay = False

    def __init__(self, mesh: Mesh, pod: str = SERVER) -> None:
        self.mesh, self.pod = mesh, pod
        self.helper = subprocess.Popen(
            [sys.executable, "-c", HELPER, CLIENT, pod],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert self.helper.stdout is not None
        self.ports: dict[str, int] = json.loads(self.helper.stdout.readline())

    async def entry(self, app: str) -> int:
        """A listener standing for the capture: what connects to it is proxied to ``app``."""
        lst = listener("127.0.0.1")
        self.mesh._sockets.append(lst)
        dst = (self.pod, self.ports[app])
        handle = self.mesh.node1.outbound.handle

        async def accept_all() -> None:
            loop = asyncio.get_running_loop()
            while True:
                conn, _ = await loop.sock_accept(lst)
                conn.setblocking(False)
                if self.nodelay:
                    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                self.mesh._tasks.append(asyncio.create_task(relay(conn)))

        async def relay(conn: socket.socket) -> None:
            rest = await handle(conn, original_dst=dst)
            if rest is not None:
                with contextlib.suppress(Exception):
                    await rest

        self.mesh._tasks.append(asyncio.create_task(accept_all()))
        return int(lst.getsockname()[1])

    async def run(self, *jobs: list[Any]) -> dict[str, Any]:
        assert self.helper.stdin is not None and self.helper.stdout is not None
        self.helper.stdin.write(json.dumps({"jobs": jobs}) + "\n")
        self.helper.stdin.flush()
        line = await asyncio.get_running_loop().run_in_executor(None, self.helper.stdout.readline)
        result: dict[str, Any] = json.loads(line)
        return result

    def close(self) -> None:
        self.helper.kill()
        self.helper.wait()

    def connections(self) -> int:
        return len(self.mesh.node2.inbound.connections)


async def warm(b: Bench, port: int) -> None:
    await b.run(["rr", port, 20])


async def bulk(b: Bench, streams: int) -> dict[str, float]:
    port = await b.entry("sink")
    await warm(b, await b.entry("echo"))
    total = (512 * MIB) // streams
    before, calls, faults = cpu(), syscalls(), minor_faults()
    res = await b.run(*[["send", port, total] for _ in range(streams)])
    used, calls, faults = cpu() - before, syscalls() - calls, minor_faults() - faults
    gb = sum(res["out"]) / 1e9
    assert b.connections() == 1, "all streams on one HBONE connection"
    return {
        "cpu_s_per_gb": used / gb,
        "gbps": gb * 8 / res["wall"],
        "syscalls_per_mib": calls / (sum(res["out"]) / MIB),
        "minor_faults_per_512mib": faults / (sum(res["out"]) / (512 * MIB)),
    }


async def rr(b: Bench) -> dict[str, float]:
    port = await b.entry("echo")
    await warm(b, port)
    n = 3000
    before = cpu()
    res = await b.run(["rr", port, n])
    used = cpu() - before
    times = sorted(res["out"][0])
    return {"p50_us": times[n // 2], "cpu_us_per_rr": used / n * 1e6}


async def fair(b: Bench) -> dict[str, float]:
    sink, echo = await b.entry("sink"), await b.entry("echo")
    await warm(b, echo)
    n = 2000
    (conn,) = b.mesh.node1.pool.connections()
    (far,) = b.mesh.node2.inbound.connections
    in_flight: list[int] = []

    async def sample() -> None:  # what a 1 KB request queues behind: DATA sent, not yet acked
        while True:
            await asyncio.sleep(0.002)
            # node2's window left plus what it holds, less node1's window left: sent and not
            # yet written to the pod (the connection window opens as streams need it, from
            # the buffer budget, so it is not the constant ``connection_window``)
            granted = far.codec.promised + far.codec.held_received
            in_flight.append(granted - conn.codec._h2.outbound_flow_control_window)

    sampler = asyncio.create_task(sample())
    res = await b.run(["send", sink, 4096 * MIB], ["rr", echo, n])
    sampler.cancel()
    # the rr thread ends first; the bulk one has been running all along
    times = sorted(next(o for o in res["out"] if isinstance(o, list)))
    assert b.connections() == 1, "bulk and rr on one HBONE connection"
    return {
        "p50_us": times[len(times) // 2],
        "p99_us": times[int(len(times) * 0.99)],
        "in_flight_kib": statistics.mean(in_flight) / KIB,
    }


async def stall(b: Bench, streams: int) -> dict[str, float]:
    port = await b.entry("hole")
    await warm(b, await b.entry("echo"))
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    res = await b.run(*[["stall", port] for _ in range(streams)])
    await asyncio.sleep(0.5)
    traced = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    (proto,) = b.mesh.node2.inbound.connections
    (client,) = b.mesh.node1.pool.connections()
    return {
        "dest_held_kib": proto.held_bytes() / KIB,
        "src_held_kib": client.held_bytes() / KIB,
        "traced_kib": traced / KIB,
        "sent_kib": sum(res["out"]) / KIB,
    }


async def idle(b: Bench) -> dict[str, float]:
    port = await b.entry("echo")
    await warm(b, port)
    n = 100
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    socks = []
    loop = asyncio.get_running_loop()
    for _ in range(n):
        s = socket.socket()
        s.bind((CLIENT, 0))
        s.setblocking(False)
        await loop.sock_connect(s, ("127.0.0.1", port))
        await loop.sock_sendall(s, b"x" * 1024)
        got = 0
        while got < 1024:
            got += len(await loop.sock_recv(s, 65536))
        socks.append(s)
    await asyncio.sleep(0.5)
    traced = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    for s in socks:
        s.close()
    return {"kib_per_idle_tunnel": traced / n / KIB}


TESTS: dict[str, Callable[[Bench], Coroutine[Any, Any, dict[str, float]]]] = {
    "bulk1": lambda b: bulk(b, 1),
    "bulk4": lambda b: bulk(b, 4),
    "rr": rr,
    "fair": fair,
    "stall1": lambda b: stall(b, 1),
    "stall4": lambda b: stall(b, 4),
    "stall16": lambda b: stall(b, 16),
    "idle": idle,
}


def size(text: str) -> int:
    unit = {"K": KIB, "M": MIB}[text[-1]]
    return int(text[:-1]) * unit


def child(test: str, pair: str) -> dict[str, float]:
    stream, conn = (size(p) for p in pair.split("/"))
    hbone = HboneSettings(stream_window=stream, connection_window=conn)

    async def main() -> dict[str, float]:
        mesh = Mesh()
        for node in (mesh.node1, mesh.node2):
            node.core.settings = dataclasses.replace(node.core.settings, hbone=hbone)
        await mesh.start()
        hold_heap()  # as the agent, once started (``settle_for_data_plane``)
        b = Bench(mesh)
        try:
            return await asyncio.wait_for(TESTS[test](b), 300)
        finally:
            b.close()
            await mesh.close()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--pairs", default="512K/2M,1M/4M,2M/8M,4M/16M")
    parser.add_argument("--tests", default=",".join(TESTS))
    parser.add_argument("--child", nargs=2, metavar=("TEST", "PAIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*args.child)))
        return
    pairs = args.pairs.split(",")
    results: dict[tuple[str, str], list[dict[str, float]]] = {}
    for rnd in range(args.rounds):
        for test in args.tests.split(","):
            order = pairs if rnd % 2 == 0 else pairs[::-1]  # alternate which goes first
            for pair in order:
                argv = [sys.executable, "-m", __spec__.name, "--child", test, pair]
                out = subprocess.run(argv, capture_output=True, text=True, check=True)
                res = json.loads(out.stdout.strip().splitlines()[-1])
                results.setdefault((test, pair), []).append(res)
                print(f"round {rnd} {test:8} {pair:8} {json.dumps(res)}", flush=True)
    print(f"\n{'test':8} {'pair':8} {'bound MiB':>9}  min / median over {args.rounds} rounds")
    for (test, pair), runs in results.items():
        stream, conn = (size(p) for p in pair.split("/"))
        bound = connection_memory_bound(HboneSettings(stream_window=stream, connection_window=conn))
        cells = []
        for key in runs[0]:
            values = [r[key] for r in runs]
            cells.append(f"{key} {min(values):.2f} / {statistics.median(values):.2f}")
        print(f"{test:8} {pair:8} {bound / MIB:9.1f}  " + "; ".join(cells))


if __name__ == "__main__":
    main()
