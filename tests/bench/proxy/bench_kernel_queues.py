"""What the agent holds in its sockets' kernel queues toward a reader that stopped.

    sudo .venv/bin/python -m tests.bench.proxy.bench_kernel_queues [--no-limit]

Both proxies in one process on loopback (``mesh.Mesh``), the scenarios of
``tests/integration/proxy/test_unsent_bound_loopback.py``: for each socket the proxy writes to,
the reader reads 16 MiB at full speed, then stops, and the sender pushes until the kernel
refuses it. Once everything is backed up, per path: the agent's socket toward the reader (bytes
unsent, its send buffer, the memory its send queue is charged, ``SK_MEMINFO_WMEM_QUEUED``), and
the agent's socket from the sender, which the agent stopped reading (its receive queue and
receive buffer, ``SK_MEMINFO_RMEM_ALLOC``/``RCVBUF``: not bounded by ``UNSENT_LOWAT``). Then the
reader resumes and every byte must arrive. ``--no-limit``: without ``limit_unsent`` (main's
behaviour before it). The numbers are in docs/performance/bulk-and-windows.md ("Kernel send
queues").
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import struct

import uvloop

from agent.proxy import sockets
from tests.integration.proxy.mesh import Mesh
from tests.integration.proxy.test_hbone_queue_stalled_pods_loopback import until
from tests.integration.proxy.test_unsent_bound_loopback import (
    PATHS,
    Run,
    socket_to,
    unsent,
    writable,
)

SO_MEMINFO = 55  # include/uapi/asm-generic/socket.h; u32[SK_MEMINFO_VARS]
RMEM_ALLOC, RCVBUF, WMEM_QUEUED = 0, 1, 5


def meminfo(sock: socket.socket) -> tuple[int, ...]:
    return struct.unpack("9I", sock.getsockopt(socket.SOL_SOCKET, SO_MEMINFO, 36))


async def measure(run: Run) -> dict[str, int]:
    try:
        return await _measure(run)
    finally:
        run.client.close()


async def _measure(run: Run) -> dict[str, int]:
    await until(run.reading_fast, "the reader read fast first")
    run.stop_reading()
    pusher = run.pusher()
    assert pusher is not None
    with run.agent_socket() as out, socket_to(pusher.writer.get_extra_info("sockname")) as src:
        await until(lambda: pusher.blocked() and not writable(out), "backed up to the sender")
        sent_side, received_side = meminfo(out), meminfo(src)
        result = {
            "unsent": unsent(out),
            "sndbuf": out.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF),
            "wmem_queued": sent_side[WMEM_QUEUED],
            "src_rmem_alloc": received_side[RMEM_ALLOC],
            "src_rcvbuf": received_side[RCVBUF],
        }
    run.resume_reading()
    sent = await asyncio.wait_for(run.sent(), 100)
    assert await asyncio.wait_for(run.received(), 100) == sent
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-limit", action="store_true", help="without limit_unsent")
    args = parser.parse_args()
    if args.no_limit:
        sockets.limit_unsent = lambda sock: None

    async def one(path: str) -> dict[str, int]:
        mesh = Mesh()
        await mesh.start()
        try:
            return await asyncio.wait_for(measure(await PATHS[path](mesh)), 200)
        finally:
            await mesh.close()

    heads = ("unsent", "sndbuf", "wmem_q", "src rmem", "src rcvbuf")
    print(f"{'path':28} " + " ".join(f"{h:>10}" for h in heads))
    for path in PATHS:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            r = runner.run(one(path))
        print(f"{path:28} " + " ".join(f"{v:10}" for v in r.values()), flush=True)


if __name__ == "__main__":
    main()
