"""What one 1 KB round trip costs the two node proxies, in counts: both proxies in one process.

    sudo .venv/bin/python -m tests.bench.proxy.bench_rr_counts [--rounds 3] [--requests 2000]

The machine is shared, so times move with the load; counts do not. Each round runs a fresh
child process in a network namespace of its own (``unshare --net``: only its loopback, so the
kernel's TCP counters are this measurement's alone) with the in-process loopback mesh
(``tests.integration.proxy.mesh``: node1's outbound, an HBONE mTLS connection, node2's
inbound) and a helper process standing for the pods (an echo server on the server pod's IP,
a client on the client pod's IP sending 1 KB and waiting for its echo, one at a time). Per
round trip, over ``--requests`` round trips after a warm-up:

  - ``cpu_us``: the proxies' process CPU (user + system), the only time reported;
  - ``syscalls``: the proxies' system calls by name (``perf stat`` of the ``sys_enter``
    tracepoints, attached to the process for a second, separate run of round trips);
    ``epoll_wait`` is the event loop's passes that waited for I/O;
  - ``calls``: Python calls of the functions that mark the path's steps (``cProfile`` call
    counts in a third run: flushes, scheduled callbacks, reads and sends);
  - ``tcp``: TCP segments sent in the namespace (``TcpOutSegs``; the two pod legs and the
    HBONE connection, both directions: 8 carry data in a round trip), and delayed ACKs
    (``TcpExtDelayedACKs``).

The closing numbers are in docs/performance/round-trip.md ("A round trip in counts").
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import json
import os
import pstats
import resource
import socket
import statistics
import subprocess
import sys
from typing import Any

import uvloop

from tests.bench.proxy.bench_windows import HELPER
from tests.integration.proxy.mesh import CLIENT, SERVER, Mesh, listener

# Functions whose call counts per round trip show the path's steps (name as cProfile reports
# it: (file suffix or "~", function name)).
MARKERS = {
    # TLS records are not among them: uvloop's SSLProtocol calls the SSL object's ``read`` and
    # ``write`` from C, and they are the C object's own (``agent.identity.tls``), so cProfile
    # sees neither (before session 15 it counted ``ssl.py``'s wrappers). Every message is one
    # ``flush`` on the side that writes it to the tunnel, and one record.
    "flush": ("tunnel.py", "flush"),
    "scheduled_flush": ("tunnel.py", "_scheduled_flush"),
    "data_received": ("tunnel.py", "data_received"),
    "relay_readable": ("relay.py", "_readable"),
    "sock_send": ("~", "<method 'send' of '_socket.socket' objects>"),
    "sock_recv_into": ("~", "<method 'recv_into' of '_socket.socket' objects>"),
}


def cpu() -> tuple[float, float]:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime, r.ru_stime


def tcp_counters() -> dict[str, int]:
    out = subprocess.run(["nstat", "-az"], capture_output=True, text=True, check=True).stdout
    counts = {}
    for line in out.splitlines()[1:]:
        parts = line.split()
        if len(parts) >= 2 and parts[1].isdigit():
            counts[parts[0]] = int(parts[1])
    return counts


async def entry(mesh: Mesh, port: int) -> int:
    """A listener standing for the capture (nodelay as ``ProxyComponent.handle`` sets it): what
    connects to it is proxied to the server pod's echo app."""
    lst = listener("127.0.0.1")
    mesh._sockets.append(lst)
    handle = mesh.node1.outbound.handle

    async def accept_all() -> None:
        loop = asyncio.get_running_loop()
        while True:
            conn, _ = await loop.sock_accept(lst)
            conn.setblocking(False)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            mesh._tasks.append(asyncio.create_task(relay(conn)))

    async def relay(conn: socket.socket) -> None:
        rest = await handle(conn, original_dst=(SERVER, port))
        if rest is not None:
            with contextlib.suppress(Exception):
                await rest

    mesh._tasks.append(asyncio.create_task(accept_all()))
    return int(lst.getsockname()[1])


class Helper:
    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", HELPER, CLIENT, SERVER],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert self.proc.stdout is not None
        self.ports: dict[str, int] = json.loads(self.proc.stdout.readline())

    async def rr(self, port: int, n: int) -> None:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps({"jobs": [["rr", port, n]]}) + "\n")
        self.proc.stdin.flush()
        await asyncio.get_running_loop().run_in_executor(None, self.proc.stdout.readline)

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


def perf_syscalls(pid: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        ["perf", "stat", "-x", ",", "-e", "syscalls:sys_enter_*", "-p", str(pid)],
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def perf_result(proc: subprocess.Popen[str], n: int) -> dict[str, float]:
    proc.send_signal(2)
    _, err = proc.communicate()
    counts: dict[str, float] = {}
    for line in err.splitlines():
        fields = line.split(",")
        if len(fields) > 2 and fields[0].isdigit() and int(fields[0]):
            name = fields[2].removeprefix("syscalls:sys_enter_")
            counts[name] = int(fields[0]) / n
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


def marker_counts(prof: cProfile.Profile, n: int) -> dict[str, float]:
    stats = pstats.Stats(prof).stats  # type: ignore[attr-defined]
    found = dict.fromkeys(MARKERS, 0.0)
    for (path, _, name), (_, ncalls, *_) in stats.items():
        for key, (suffix, func) in MARKERS.items():
            if name == func and ((suffix == "~" and path == "~") or path.endswith(suffix)):
                found[key] += ncalls / n
    return found


async def measure(n: int) -> dict[str, Any]:
    mesh = Mesh()
    await mesh.start()
    helper = Helper()
    try:
        port = await entry(mesh, helper.ports["echo"])
        await helper.rr(port, 200)  # warm-up: the pool's dial, the TLS handshake
        before_cpu, before_tcp = cpu(), tcp_counters()
        await helper.rr(port, n)
        (user, system), after_tcp = cpu(), tcp_counters()
        user, system = user - before_cpu[0], system - before_cpu[1]
        tcp = {
            k: (after_tcp.get(k, 0) - before_tcp.get(k, 0)) / n
            for k in ("TcpOutSegs", "TcpExtDelayedACKs", "TcpExtTCPPureAcks")
        }
        perf = perf_syscalls(os.getpid())
        await asyncio.sleep(1.0)  # perf attaches
        await helper.rr(port, n)
        syscalls = perf_result(perf, n)
        prof = cProfile.Profile()
        prof.enable()
        await helper.rr(port, n)
        prof.disable()
        return {
            "cpu_us": (user + system) / n * 1e6,
            "user_us": user / n * 1e6,
            "tcp": tcp,
            "syscalls": syscalls,
            "calls": marker_counts(prof, n),
        }
    finally:
        helper.close()
        await mesh.close()


def child(n: int) -> dict[str, Any]:
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(measure(n))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.requests)))
        return
    runs = []
    for _ in range(args.rounds):
        argv = ["unshare", "--net", sys.executable, "-m", __spec__.name, "--child"]
        argv += ["--requests", str(args.requests)]
        out = subprocess.run(argv, capture_output=True, text=True, check=True)
        res = json.loads(out.stdout.strip().splitlines()[-1])
        runs.append(res)
        print(json.dumps(res), flush=True)
    print(f"\nper round trip, min / median over {args.rounds} rounds")
    for key in ("cpu_us", "user_us"):
        values = [r[key] for r in runs]
        print(f"{key:37} {min(values):7.1f} / {statistics.median(values):7.1f}")
    for group in ("tcp", "syscalls", "calls"):
        keys = dict.fromkeys(k for r in runs for k in r[group])
        for key in keys:
            values = [r[group].get(key, 0.0) for r in runs]
            print(f"{group:8} {key:28} {min(values):7.2f} / {statistics.median(values):7.2f}")


if __name__ == "__main__":
    main()
