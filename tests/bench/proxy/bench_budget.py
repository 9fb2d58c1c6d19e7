"""What a peer whose streams target pods that stop reading makes the destination agent hold,
as its HBONE connections multiply: both node proxies in one process, loopback TLS.

    sudo PYTHONPATH=TREE .venv/bin/python tests/bench/proxy/bench_budget.py \
        [--connections 1,2,4,8,16] [--streams 4] [--budget 32M]

For each count of connections (dialled by node1 directly, as a peer may open them, each with
``--streams`` streams to a pod that accepts and never reads, with tiny socket buffers), once the
senders stall: the destination agent's received bytes not yet written to the pod (its own
accounting, ``held_bytes`` of every inbound connection) and, where the tree has the buffer
budget (``agent.proxy.budget``), held + promised and the budget. Runs on any tree (``PYTHONPATH``
picks it), so main and a branch can be compared; each count in a fresh process.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import subprocess
import sys
from typing import Any

import uvloop

from agent.proxy.h2wire import MIB
from agent.proxy.pool import PoolKey
from agent.proxy.tunnel import TunnelStream
from tests.integration.proxy.mesh import CLIENT, CLIENT_ID, SERVER, SERVER_ID, Mesh


def hole(mesh: Mesh) -> int:
    """A pod port that accepts and never reads (4 KiB receive buffers)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.bind((SERVER, 0))
    sock.listen(1024)
    sock.setblocking(False)
    mesh._sockets.append(sock)
    held: list[socket.socket] = []

    async def accept() -> None:
        loop = asyncio.get_running_loop()
        while True:
            conn, _ = await loop.sock_accept(sock)
            held.append(conn)

    mesh._tasks.append(asyncio.create_task(accept()))
    return int(sock.getsockname()[1])


async def flood(stream: TunnelStream) -> None:
    chunk = b"x" * (256 * 1024)
    while True:
        await stream.write(chunk)


async def held(mesh: Mesh) -> int:
    return sum(p.held_bytes() for p in mesh.node2.inbound.connections)


async def settled(mesh: Mesh) -> int:
    last, steady = -1, 0
    for _ in range(1200):
        await asyncio.sleep(0.05)
        now = await held(mesh)
        steady = steady + 1 if now == last else 0
        last = now
        if steady >= 20 and now > 0:
            break
    return last


def child(connections: int, streams: int, budget: int) -> dict[str, Any]:
    async def main() -> dict[str, Any]:
        mesh = Mesh()
        core = mesh.node2.core
        if hasattr(core, "hbone_budget"):
            from agent.proxy.budget import HboneBudget

            core.hbone_budget = HboneBudget(budget)
        await mesh.start()
        try:
            port = hole(mesh)
            key = PoolKey(CLIENT_ID, SERVER_ID, SERVER, mesh.hbone_port)
            for _ in range(connections):
                proto = await mesh.node1._dial(key, lambda _p: None)
                for _ in range(streams):
                    stream = await proto.open(f"{SERVER}:{port}", CLIENT)
                    mesh._tasks.append(asyncio.create_task(flood(stream)))
            out: dict[str, Any] = {"held_mib": await settled(mesh) / MIB}
            if hasattr(core, "hbone_budget"):
                snap = core.hbone_budget.snapshot()
                out["held_promised_mib"] = snap["committed"] / MIB
                out["budget_mib"] = snap["limit"] / MIB
                out["withheld"] = snap["withheld"]
            return out
        finally:
            await mesh.close()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", default="1,2,4,8,16")
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--budget", default="32M", help="the destination's budget (M = MiB)")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    budget = int(args.budget.rstrip("M")) * MIB
    if args.child:
        print(json.dumps(child(args.child, args.streams, budget)))
        return
    for n in (int(c) for c in args.connections.split(",")):
        argv = [sys.executable, __file__, "--child", str(n), "--streams", str(args.streams)]
        out = subprocess.run([*argv, "--budget", args.budget], capture_output=True, text=True)
        if out.returncode:
            print(out.stderr[-2000:], file=sys.stderr)
            continue
        print(f"connections {n:3} {out.stdout.strip().splitlines()[-1]}", flush=True)


if __name__ == "__main__":
    main()
