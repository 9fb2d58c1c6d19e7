"""CPU per new proxied connection, both proxies in this process (issue 18, connection rate).

Not a test (nothing here asserts a timing): a harness to measure and profile what a new
connection costs the proxies, without the lab's noise. This process runs node1's and node2's
proxies of the loopback mesh (``tests.integration.proxy.mesh``) as the agent wires them: accept
loops (``agent.acceptor``), a task per accepted connection, its socket options
(``sockets.accepted``), the Istio TCP metrics and the access log on both registries (lines to
/dev/null through the agent's
``logging.basicConfig`` format), ``settle_for_data_plane``. A child process runs the pod's echo
server and the client, which opens connections from the client pod's IP (``--concurrency`` at a
time), sends 100 bytes, reads them back and closes, as ``bench.programs.connrate_client`` does;
so this process's CPU is the two proxies' alone. Cross-node by default (client pod on node1,
echo server on node2's ``server`` pod, through HBONE); ``--same-node`` targets node1's ``local``
pod.

    sudo .venv/bin/python -m tests.integration.proxy.conncost --connections 2000 --runs 5
    ... --profile /tmp/conn.prof   # cProfile over the measured runs
    ... --split   # node2's proxy in a process of its own: CPU per side (and a profile each,
                  # the second in /tmp/conn.prof.node2)

Instructions per connection (deterministic enough to compare trees on a loaded machine): the
difference of two callgrind runs, ``--runs 1 --warmup 30`` with ``--connections`` 100 and 300,
divided by 200.

System calls per connection: ``strace -f -b execve -c -o FILE`` in front of the same command
(``-b execve`` lets the client child, and with ``--split`` node2's process, go untraced, so the
counts are this process's and its threads'), the difference of a 600- and a 100-connection run
over 500.

Between runs: every connection leaves TIME_WAIT sockets on the client pod's address (about two
per connection: the client's towards the outbound listener, the destination proxy's towards the
pod; they last 60 s). Both take their port at ``connect`` (``IP_BIND_ADDRESS_NO_PORT``), which
on loopback may take over a TIME_WAIT pair, so back-to-back runs do not slow down as they pile
up (the client's ``bind`` once searched the range past them and, near 20,000, failed with
EADDRINUSE).

Prints one JSON object: µs of CPU (user + system, from ``getrusage``) per connection in each
run, and the minimum. A run of another tree: run this file with that tree's interpreter and
that tree on ``PYTHONPATH`` (it imports ``agent`` and ``tests`` from there):

    cd ../other && PYTHONPATH=. .venv/bin/python /path/to/conncost.py
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import logging
import os
import resource
import socket
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import uvloop
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

import tests.integration.proxy.mesh as mesh_module
from agent.acceptor import accept_forever, serve_accepted
from agent.base.constants import Listener
from agent.base.runtime import settle_for_data_plane
from agent.config import AgentConfig
from agent.identity.keysmith import to_pem
from agent.proxy import sockets
from agent.proxy.inbound import InboundHbone
from agent.telemetry.tcp import TcpMetrics
from agent.wiring import connection_caps
from bench.programs.exchange import connect_and_echo
from tests.integration.proxy.mesh import CLIENT, LOCAL, SERVER, Mesh, free_port, listener


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _serve(
    mesh: Mesh,
    sock: socket.socket,
    handle: object,
    tasks: set[object],
    slot: Listener = Listener.OUTBOUND,
    inbound: InboundHbone | None = None,
) -> None:
    """The agent's accept path (``Agent._accept_loop``): the listener's gate (each node's
    caps as ``wiring.connection_caps`` makes them) and ``serve_accepted``; ``inbound``: the
    15008 handler, which charges each stream's pod socket to the caps, as the agent's does
    (``wiring.count_in_proxy``)."""
    config = AgentConfig(node="cost", pin_dir=Path("/nonexistent"))
    caps = connection_caps(config, passthrough=False)
    if inbound is not None:
        inbound.count_in(caps)
    gate = caps.gate(slot)

    async def one(conn: socket.socket, _slot: Listener) -> object:
        sockets.accepted(conn)
        return await handle(conn)  # type: ignore[operator]

    def serve(conn: socket.socket) -> None:
        task = asyncio.create_task(serve_accepted(one, conn, slot, tasks, gate))  # type: ignore[arg-type]
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    await accept_forever(sock, serve, listener=slot.name, gate=gate)


async def main(args: argparse.Namespace) -> dict[str, object]:
    mesh = Mesh()
    for node in (mesh.node1, mesh.node2):
        # Patient: under valgrind a TLS handshake or a connect takes seconds.
        s = node.core.settings
        node.core.settings = replace(s, connect_timeout=60.0, handshake_timeout=60.0)
        node.start()
        node.core.registry.observers.append(TcpMetrics(mesh.store))
    dst_ip = LOCAL if args.same_node else SERVER
    echo_port = free_port(dst_ip)
    tasks: set[object] = set()
    outbound = listener("127.0.0.1")
    mesh._sockets.append(outbound)
    env = {**os.environ, "PYTHONPATH": str(Path(mesh_module.__file__).parents[3])}
    node2: asyncio.subprocess.Process | None = None
    if args.split:  # node2's proxy in a process of its own, trusting the same root
        with tempfile.NamedTemporaryFile("wb", suffix=".pem", delete=False) as pem:
            pem.write(to_pem([mesh.ca.root]).encode() + _key_pem(mesh.ca.key))
        node2 = await asyncio.create_subprocess_exec(
            sys.executable,
            os.path.abspath(__file__),
            "--node2",
            pem.name,
            str(mesh.hbone_port),
            f"{args.profile}.node2" if args.profile else "",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            env=env,
        )
        assert node2.stdout is not None
        if (await asyncio.wait_for(node2.stdout.readline(), 30)).strip() != b"ready":
            raise RuntimeError("node2's process did not start (its error is above)")
        os.unlink(pem.name)
    else:
        hbone = listener(SERVER, mesh.hbone_port)
        mesh._sockets.append(hbone)
        inbound = mesh.node2.inbound
        mesh._tasks.append(
            asyncio.create_task(_serve(mesh, hbone, inbound.handle, tasks, Listener.HBONE, inbound))
        )

    async def captured(conn: socket.socket) -> object:
        return await mesh.node1.outbound.handle(conn, original_dst=(dst_ip, echo_port))

    mesh._tasks.append(asyncio.create_task(_serve(mesh, outbound, captured, tasks)))
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        os.path.abspath(__file__),
        "--child",
        f"{dst_ip}:{echo_port}",
        f"127.0.0.1:{outbound.getsockname()[1]}",
        str(args.concurrency),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        env=env,
    )
    assert child.stdin is not None and child.stdout is not None

    async def node2_cpu(command: str = "cpu") -> float:
        """node2's process CPU (split mode; 0 otherwise)."""
        if node2 is None:
            return 0.0
        assert node2.stdin is not None and node2.stdout is not None
        node2.stdin.write(f"{command}\n".encode())
        await node2.stdin.drain()
        return float(await node2.stdout.readline())

    async def run(n: int) -> tuple[float, float]:
        assert child.stdin is not None and child.stdout is not None
        other = await node2_cpu()
        child.stdin.write(f"{n}\n".encode())
        await child.stdin.drain()
        before = _cpu()
        reply = await child.stdout.readline()
        spent = _cpu() - before
        other = await node2_cpu() - other
        if reply.strip() != b"ok":
            raise RuntimeError(f"client child failed: {reply!r}")
        return spent / n * 1e6, other / n * 1e6

    try:
        ready = await asyncio.wait_for(child.stdout.readline(), 30)
        if ready.strip() != b"ready":
            raise RuntimeError("the client child did not start (its error is above)")
        await run(args.warmup)
        settle_for_data_plane()
        await node2_cpu("settle")
        profile = cProfile.Profile() if args.profile else None
        runs, sides = [], []
        for _ in range(args.runs):
            await asyncio.sleep(0.2)  # let the previous run's closes finish
            if profile:
                profile.enable()
            side = await run(args.connections)
            if profile:
                profile.disable()
            runs.append(sum(side))
            sides.append(side)
        if profile:
            profile.dump_stats(args.profile)
        result: dict[str, object] = {
            "path": "same-node" if args.same_node else "cross-node",
            "connections": args.connections,
            "us_per_connection": [round(r, 1) for r in runs],
            "min": round(min(runs), 1),
        }
        if node2 is not None:
            result["node1_us"] = [round(s[0], 1) for s in sides]
            result["node2_us"] = [round(s[1], 1) for s in sides]
            result["min_node1"] = round(min(s[0] for s in sides), 1)
            result["min_node2"] = round(min(s[1] for s in sides), 1)
        return result
    finally:
        child.stdin.close()
        await child.wait()
        if node2 is not None and node2.stdin is not None:
            node2.stdin.close()
            await node2.wait()
        await mesh.close()


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


async def node2_process(pem_file: str, hbone_port: int, profile_file: str) -> None:
    """``--split``: node2's proxy alone, its HBONE listener on ``hbone_port``, its test CA
    replaced by the parent's root (so that each trusts the other's certificates). Commands on
    stdin: ``cpu`` (answers this process's CPU seconds), ``settle`` (after the warm-up: from
    then on, cProfile into ``profile_file`` if one is named)."""
    profile = cProfile.Profile() if profile_file else None
    data = Path(pem_file).read_bytes()
    mesh = Mesh()
    mesh.ca.root = x509.load_pem_x509_certificate(data)
    key = serialization.load_pem_private_key(data, password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    mesh.ca.key = key
    node = mesh.node2
    node.core.settings = replace(
        node.core.settings, hbone_port=hbone_port, connect_timeout=60.0, handshake_timeout=60.0
    )
    node.start()
    node.core.registry.observers.append(TcpMetrics(mesh.store))
    hbone = listener(SERVER, hbone_port)
    mesh._sockets.append(hbone)
    tasks: set[object] = set()
    mesh._tasks.append(
        asyncio.create_task(
            _serve(mesh, hbone, node.inbound.handle, tasks, Listener.HBONE, node.inbound)
        )
    )
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    print("ready", flush=True)
    try:
        while line := await reader.readline():
            if line.strip() == b"settle":
                settle_for_data_plane()
                if profile:
                    profile.enable()
            print(_cpu(), flush=True)
    finally:
        if profile:
            profile.disable()
            profile.dump_stats(profile_file)
        await mesh.close()


# ---- the child: the pod's echo server and the client ---------------------------------------


class _Echo(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)  # type: ignore[attr-defined]


async def _client(address: tuple[str, int], message: bytes, n: list[int]) -> None:
    while n[0] > 0:
        n[0] -= 1
        (await connect_and_echo(address, message, CLIENT)).close()


async def child(echo: str, target: str, concurrency: int) -> None:
    loop = asyncio.get_running_loop()
    host, port = echo.rsplit(":", 1)
    server = await loop.create_server(_Echo, host, int(port), reuse_address=True)
    thost, tport = target.rsplit(":", 1)
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    print("ready", flush=True)
    while line := await reader.readline():
        left = [int(line)]
        try:
            await asyncio.gather(
                *(_client((thost, int(tport)), b"c" * 100, left) for _ in range(concurrency))
            )
        except OSError as e:
            print(f"error {e!r}", flush=True)
            continue
        print("ok", flush=True)
    server.close()


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=2000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=300)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--same-node", action="store_true")
    parser.add_argument("--profile", help="write cProfile stats of the measured runs here")
    parser.add_argument(
        "--split", action="store_true", help="node2's proxy in its own process: CPU per side"
    )
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--node2", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        uvloop.run(child(args.child[0], args.child[1], int(args.child[2])))
        return
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=open(os.devnull, "w"),  # noqa: SIM115 (for the process's life)
    )
    if args.node2:
        uvloop.run(node2_process(args.node2[0], int(args.node2[1]), args.node2[2]))
        return
    started = time.monotonic()
    result = uvloop.run(main(args))
    result["seconds"] = round(time.monotonic() - started, 1)
    print(json.dumps(result))


if __name__ == "__main__":
    cli()
