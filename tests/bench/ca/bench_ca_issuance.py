"""Issuance latency and throughput of the mesh CA on loopback (gRPC over TLS, real CSRs).

Run: ``.venv/bin/python -m tests.bench.ca.bench_ca_issuance [--requests 1000 --concurrency 32]``.

The CA runs in its own process (as in production) so client and server do not share a GIL; the
client is the agent's ``CaClient`` (a fresh P-256 key and CSR per request, response checked).
Latency is measured one request at a time; throughput with ``--concurrency`` requests in flight.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import statistics
import tempfile
import time
from multiprocessing.connection import Connection
from pathlib import Path

from agent.ca.inprocess import InProcessCA
from agent.identity.caclient import CaClient
from agent.identity.spiffe import SpiffeId
from agent.state import StateStore, Workload

IDENTITY = SpiffeId.parse("spiffe://cluster.local/ns/default/sa/bench")


def _serve(root: str, token: str, conn: Connection) -> None:
    store = StateStore()
    with store.update() as txn:
        txn.put_workload(Workload("default/b", "b", "default", "bench", "node1", ("10.0.0.1",)))
    ca = InProcessCA(Path(root), store, node_tokens={"node1": token})
    ca.start()
    conn.send(ca.port)
    conn.recv()  # until the parent says stop
    ca.stop()


async def _measure(client: CaClient, requests: int, concurrency: int) -> dict[str, float]:
    for _ in range(10):  # warm-up: connection, TLS session, code paths
        await client.fetch(IDENTITY)
    latencies = []
    for _ in range(min(requests, 300)):
        start = time.perf_counter()
        await client.fetch(IDENTITY)
        latencies.append(time.perf_counter() - start)
    gate = asyncio.Semaphore(concurrency)

    async def one() -> None:
        async with gate:
            await client.fetch(IDENTITY)

    start = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(requests)))
    elapsed = time.perf_counter() - start
    latencies.sort()
    return {
        "latency_p50_ms": statistics.median(latencies) * 1000,
        "latency_p99_ms": latencies[int(len(latencies) * 0.99) - 1] * 1000,
        "throughput_per_s": requests / elapsed,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        token = InProcessCA.new_token()
        parent, child = multiprocessing.Pipe()
        proc = multiprocessing.Process(target=_serve, args=(tmp, token, child))
        proc.start()
        try:
            port = parent.recv()
            (Path(tmp) / "token").write_text(token)
            client = CaClient(
                f"127.0.0.1:{port}",
                root_file=Path(tmp) / "root.pem",
                token_file=Path(tmp) / "token",
            )

            async def run() -> dict[str, float]:
                try:
                    return await _measure(client, args.requests, args.concurrency)
                finally:
                    await client.close()

            result = asyncio.run(run())
        finally:
            parent.send("stop")
            proc.join(10)
    print(
        f"CA issuance on loopback: p50 {result['latency_p50_ms']:.2f} ms, "
        f"p99 {result['latency_p99_ms']:.2f} ms (sequential); "
        f"{result['throughput_per_s']:.0f} certificates/s "
        f"({args.requests} requests, {args.concurrency} in flight)"
    )


if __name__ == "__main__":
    main()
