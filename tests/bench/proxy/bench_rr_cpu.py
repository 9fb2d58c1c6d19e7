"""CPU and instructions per cross-node 1 KB round trip, both proxies in this process.

Not a test (nothing here asserts a timing): a harness to compare trees on a loaded machine. This
process runs node1's outbound proxy, the HBONE mTLS connection and node2's inbound proxy of the
loopback mesh (``tests.integration.proxy.mesh``); a child process stands for the pods (an echo
server on the server pod's IP, one client on the client pod's IP that connects once, then sends
1 KB and waits for its echo, one at a time, ``--requests`` times per round). So this process's
CPU is the two proxies' alone, per message: the connection is made in the warm-up.

    .venv/bin/python -m tests.bench.proxy.bench_rr_cpu [--requests 2000] [--rounds 5]
    ... --profile /tmp/rr.prof   # cProfile over the measured rounds (call counts per round trip)

Prints one JSON object: µs of CPU (user + system, ``getrusage``) per round trip in each round,
and the minimum and median. A run of another tree: run this file with that tree's interpreter
and that tree on ``PYTHONPATH`` (it imports ``agent`` and ``tests`` from there):

    cd ../other && PYTHONPATH=. .venv/bin/python /path/to/bench_rr_cpu.py

Instructions per round trip (deterministic to about 0.3 %, so trees compare on a loaded
machine): run under callgrind with instrumentation off at the start; ``--callgrind`` turns it on
for the measured rounds only (``callgrind_control``), and the difference of a 1,100- and a
100-round-trip run over 1,000 leaves out what the toggling and the round's edges cost:

    for n in 100 1100; do valgrind --tool=callgrind --instr-atstart=no \\
        --callgrind-out-file=/tmp/rr.$n .venv/bin/python -m tests.bench.proxy.bench_rr_cpu \\
        --callgrind --rounds 1 --requests $n; done
    callgrind_annotate /tmp/rr.1100 | head   # and the same of /tmp/rr.100: by function
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import os
import resource
import statistics
import subprocess
import sys

import uvloop

from agent.base.runtime import settle_for_data_plane
from tests.bench.proxy.bench_rr_counts import entry
from tests.integration.proxy.mesh import CLIENT, SERVER, Mesh

# The pods: an echo server on SERVER, and one client from CLIENT that connects to the port it is
# given on its first line, then makes N round trips for each line "N" (answers "ok").
PODS = r"""
import socket, sys, threading

CLIENT, SERVER = sys.argv[1], sys.argv[2]
srv = socket.socket()
srv.bind((SERVER, 0))
srv.listen(8)

def echo():
    while True:
        c, _ = srv.accept()
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        threading.Thread(target=serve, args=(c,), daemon=True).start()

def serve(c):
    while d := c.recv(65536):
        c.sendall(d)
    c.close()

threading.Thread(target=echo, daemon=True).start()
print(srv.getsockname()[1], flush=True)
port = int(sys.stdin.readline())
c = socket.socket()
c.bind((CLIENT, 0))
c.connect(("127.0.0.1", port))
c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
msg = b"x" * 1024
for line in sys.stdin:
    for _ in range(int(line)):
        c.sendall(msg)
        got = 0
        while got < len(msg):
            got += len(c.recv(65536))
    print("ok", flush=True)
c.close()
"""


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _callgrind(on: bool) -> None:
    command = ["callgrind_control", "-i", "on" if on else "off", str(os.getpid())]
    subprocess.run(command, check=True, capture_output=True)


async def main(args: argparse.Namespace) -> dict[str, object]:
    mesh = Mesh(handshake_timeout=120.0 if args.callgrind else 10.0)
    await mesh.start()
    pods = await asyncio.create_subprocess_exec(
        sys.executable, "-c", PODS, CLIENT, SERVER,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert pods.stdin is not None and pods.stdout is not None

    async def rr(n: int) -> None:
        assert pods.stdin is not None and pods.stdout is not None
        pods.stdin.write(f"{n}\n".encode())
        await pods.stdin.drain()
        if (await pods.stdout.readline()).strip() != b"ok":
            raise RuntimeError("the pods' process failed (its error is above)")

    try:
        echo = int(await asyncio.wait_for(pods.stdout.readline(), 30))
        port = await entry(mesh, echo)
        pods.stdin.write(f"{port}\n".encode())
        await rr(args.warmup)  # the pool's dial, the TLS handshake, the stream
        settle_for_data_plane()
        runs = []
        profile = cProfile.Profile() if args.profile else None
        for _ in range(args.rounds):
            if args.callgrind:
                _callgrind(True)
            if profile:
                profile.enable()
            before = _cpu()
            await rr(args.requests)
            runs.append((_cpu() - before) / args.requests * 1e6)
            if profile:
                profile.disable()
            if args.callgrind:
                _callgrind(False)
        if profile:
            profile.dump_stats(args.profile)
        return {
            "requests": args.requests,
            "us_per_round_trip": [round(r, 2) for r in runs],
            "min": round(min(runs), 2),
            "median": round(statistics.median(runs), 2),
        }
    finally:
        pods.stdin.close()
        await pods.wait()
        await mesh.close()


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--callgrind", action="store_true", help="toggle callgrind (see above)")
    parser.add_argument("--profile", help="write cProfile stats of the measured rounds here")
    args = parser.parse_args()
    print(json.dumps(uvloop.run(main(args))))


if __name__ == "__main__":
    cli()
