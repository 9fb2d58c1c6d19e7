"""Benchmark: what telemetry costs the data plane, measured A/B in one run.

    sudo .venv/bin/python -m tests.bench.telemetry.bench_telemetry [--connections 2000] [--mb 200]

Runs the proxy's two-node loopback mesh (``tests/integration/proxy/mesh.py``: real NodeProxy
objects, HBONE with mTLS between them, on uvloop) and rotates rounds through three modes:
``off`` (no observer on the proxies' registries), ``metrics`` (``TelemetryComponent`` observing
both registries and a Prometheus scrape of the exposition every 0.5 s, as a busy Prometheus
would) and ``metrics+access_log`` (the same plus the JSON access log written to a file at INFO).
Per round it measures:

  - connection churn: sequential short connections (connect, 1 KB echo, close) client -> server
    across the "nodes", in microseconds per connection;
  - throughput: one connection carrying ``--mb`` MB client -> server, in MB/s.

Metrics are designed to cost nothing per chunk (the relay's byte counters are read at scrape
time), so throughput should not move, and the per-connection price is label computation,
counters and the access log line. Client, proxies and server share one event loop and one
core here, which makes the relative cost look larger than in a real agent. Numbers on a shared
VM vary; the medians of the rounds, compared with ``off``, are what to read;
``per_record`` (the observers' own cost per connection record, no sockets) varies far less.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path

import uvloop

from agent.telemetry.accesslog import ACCESS_LOGGER
from agent.telemetry.agentmetrics import AgentSources
from agent.telemetry.component import TelemetryComponent
from tests.integration.proxy.mesh import CLIENT, SERVER, Mesh, listener

CHUNK = 64 * 1024
MODES = ("off", "metrics", "metrics+access_log")


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    writer.close()


async def sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    n = 0
    while data := await reader.read(1 << 20):
        n += len(data)
    writer.write(str(n).encode())
    await writer.drain()
    writer.close()


class Front:
    """One listener standing in for the capture: each accepted connection is handed to node1's
    outbound handler with the server as original destination (``Mesh.connect`` opens a listener
    per connection, which would make later rounds slower than earlier ones)."""

    def __init__(self, mesh: Mesh, dst: tuple[str, int]) -> None:
        self.mesh, self.dst = mesh, dst
        self.sock = listener("127.0.0.1")
        self.port = int(self.sock.getsockname()[1])
        self.handlers: set[asyncio.Task[None]] = set()
        self.task = asyncio.create_task(self._accept())

    async def _accept(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            conn, _ = await loop.sock_accept(self.sock)
            conn.setblocking(False)
            task = asyncio.create_task(self.mesh.node1.outbound.handle(conn, original_dst=self.dst))
            self.handlers.add(task)
            task.add_done_callback(self.handlers.discard)

    async def open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection("127.0.0.1", self.port, local_addr=(CLIENT, 0))

    async def close(self) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task
        self.sock.close()


async def churn(front: Front, n: int) -> float:
    """Microseconds per short connection (1 KB echoed), sequential."""
    msg = b"x" * 1024
    start = time.perf_counter()
    for _ in range(n):
        reader, writer = await front.open()
        writer.write(msg)
        got = 0
        while got < len(msg):
            got += len(await reader.read(65536))
        writer.close()
        await writer.wait_closed()
    return (time.perf_counter() - start) / n * 1e6


async def throughput(front: Front, megabytes: int) -> float:
    reader, writer = await front.open()
    block = b"y" * CHUNK
    total = megabytes * 1024 * 1024
    start = time.perf_counter()
    for _ in range(total // CHUNK):
        writer.write(block)
        await writer.drain()
    writer.write_eof()
    answer = await reader.read()
    elapsed = time.perf_counter() - start
    writer.close()
    if int(answer) != total:
        raise RuntimeError(f"sink got {answer!r} bytes, sent {total}")
    return megabytes / elapsed


class Telemetry:
    """Telemetry on both proxies, the access log to a file, a scrape every 0.5 s."""

    def __init__(self, mesh: Mesh, log_file: Path) -> None:
        self.mesh = mesh
        self.components = [
            TelemetryComponent(
                store=mesh.store,
                address=("127.0.0.1", 0),
                sources=AgentSources(rejections=proxy.core.registry.rejections.copy),
            )
            for proxy in (mesh.node1, mesh.node2)
        ]
        self.handler = logging.FileHandler(log_file)
        self.scrapes = 0
        self._scraper: asyncio.Task[None] | None = None

    async def _scrape(self) -> None:
        while True:
            await asyncio.sleep(0.5)
            for c in self.components:
                c.exposition()
                self.scrapes += 1

    def enable(self, *, access_log: bool) -> None:
        for proxy, c in zip((self.mesh.node1, self.mesh.node2), self.components, strict=True):
            proxy.core.registry.observers.append(c.tcp)
        if access_log:
            logger = logging.getLogger(ACCESS_LOGGER)
            logger.addHandler(self.handler)
            logger.setLevel(logging.INFO)
        self._scraper = asyncio.create_task(self._scrape())

    async def disable(self) -> None:
        for proxy in (self.mesh.node1, self.mesh.node2):
            proxy.core.registry.observers.clear()
        logger = logging.getLogger(ACCESS_LOGGER)
        logger.removeHandler(self.handler)
        logger.setLevel(logging.WARNING)
        if self._scraper is not None:
            self._scraper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._scraper


async def run(args: argparse.Namespace, log_file: Path) -> dict[str, object]:
    mesh = Mesh()
    await mesh.start()
    try:
        echo_front = Front(mesh, (SERVER, mesh.app(SERVER, echo)))
        sink_front = Front(mesh, (SERVER, mesh.app(SERVER, sink)))
        await churn(echo_front, 200)  # warm-up: pool dial, TLS handshake, caches
        telemetry = Telemetry(mesh, log_file)
        results: dict[str, dict[str, list[float]]] = {
            mode: {"churn_us": [], "mb_s": []} for mode in MODES
        }
        per_round = args.connections // args.rounds
        for i in range(args.rounds):
            for mode in MODES[i % 3 :] + MODES[: i % 3]:  # rotated: drift spreads over modes
                if mode != "off":
                    telemetry.enable(access_log=mode == "metrics+access_log")
                results[mode]["churn_us"].append(await churn(echo_front, per_round))
                results[mode]["mb_s"].append(await throughput(sink_front, args.mb))
                if mode != "off":
                    await telemetry.disable()
        await echo_front.close()
        await sink_front.close()
        lines = log_file.read_text().count("\n")
        medians = {
            mode: {k: round(statistics.median(v), 1) for k, v in r.items()}
            for mode, r in results.items()
        }
        summary: dict[str, object] = dict(medians)
        off = medians["off"]
        for mode in MODES[1:]:
            summary[f"{mode}: churn overhead us"] = round(
                medians[mode]["churn_us"] - off["churn_us"], 1
            )
            summary[f"{mode}: throughput ratio to off"] = round(
                medians[mode]["mb_s"] / off["mb_s"], 3
            )
        summary["access_log_lines"] = lines
        summary["scrapes"] = telemetry.scrapes
        summary["rounds"] = args.rounds
        return summary
    finally:
        await mesh.close()


def observer_cost(log_file: Path, n: int = 20000) -> dict[str, float]:
    """Microseconds per connection record for the registry alone, with metrics, and with
    metrics plus the access log (to a file); milliseconds per scrape with 1000 live records.
    Deterministic work, so these vary far less than the end-to-end rounds."""
    from agent.proxy.records import Registry
    from agent.telemetry.records import OUTBOUND, ConnectionRecord
    from agent.telemetry.tcp import TcpMetrics

    def record(i: int) -> ConnectionRecord:
        return ConnectionRecord(
            OUTBOUND, f"{CLIENT}:{1024 + i % 60000}", f"{SERVER}:8080", path="hbone"
        )

    mesh_store = Mesh().store
    logger = logging.getLogger(ACCESS_LOGGER)
    handler = logging.FileHandler(log_file)
    out: dict[str, float] = {}
    for name, observe, access in (
        ("registry_only_us", False, False),
        ("metrics_us", True, False),
        ("metrics_and_access_log_us", True, True),
    ):
        registry = Registry()
        if observe:
            registry.observers.append(TcpMetrics(mesh_store, access_log=access))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        records = [record(i) for i in range(n)]
        start = time.perf_counter()
        for r in records:
            registry.remove(registry.add(r, lambda _reason: None))
        out[name] = round((time.perf_counter() - start) / n * 1e6, 2)
        logger.removeHandler(handler)
    component = TelemetryComponent(
        store=mesh_store, address=("127.0.0.1", 0), sources=AgentSources()
    )
    for i in range(1000):
        r = record(i)
        r.id = i + 1
        component.tcp.opened(r)
    start = time.perf_counter()
    for _ in range(50):
        component.exposition()
    out["scrape_1000_live_ms"] = round((time.perf_counter() - start) / 50 * 1e3, 2)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=2000, help="per mode, all rounds")
    parser.add_argument("--mb", type=int, default=200, help="MB per throughput run")
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        result: dict[str, object] = {"per_record": observer_cost(Path(tmp) / "micro.log")}
        result |= uvloop.run(run(args, Path(tmp) / "access.log"))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
