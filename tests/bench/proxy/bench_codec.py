"""CPU cost of the HBONE codec alone (no sockets, no TLS): what the DATA fast path changed.

    .venv/bin/python -m tests.bench.proxy.bench_codec [--messages 20000] [--mib 500]

A client and a server ``HboneConnection`` back to back in memory, one open tunnel:
  - 1 KB round trip: client sends 1 KB, server receives it, server sends 1 KB back, client
    receives it (four codec operations, each side acknowledging what it received);
  - bulk: 256 KiB writes from the client, fed to the server in 64 KiB reads (as a TLS transport
    hands them over), WINDOW_UPDATEs returned to the client.
Reports µs per round trip and ms per MiB. No root needed; prints timings only (the closing
numbers are in docs/performance/round-trip.md).
"""

from __future__ import annotations

import argparse
import time

from agent.proxy import hbone_events as ev
from agent.proxy.hbone import HboneConnection


def connected() -> tuple[HboneConnection, HboneConnection, int]:
    client, server = HboneConnection(client_side=True), HboneConnection(client_side=False)

    def pump() -> None:
        while True:
            c2s, s2c = client.data_to_send(), server.data_to_send()
            if not (c2s or s2c):
                return
            server.receive(c2s)
            client.receive(s2c)

    sid = client.open_tunnel("10.0.0.2:80", client_ip="10.0.0.1")
    pump()
    server.respond(sid, 200)
    pump()
    return client, server, sid


def deliver(to: HboneConnection, data: bytes | bytearray, sid: int) -> None:
    for event in to.receive(data):
        if isinstance(event, ev.DataReceived):
            to.consumed(sid, len(event.data))


def round_trips(messages: int) -> float:
    client, server, sid = connected()
    msg = b"x" * 1024
    start = time.perf_counter()
    for _ in range(messages):
        client.send(sid, msg)
        deliver(server, client.data_to_send(), sid)
        server.send(sid, msg)
        deliver(client, server.data_to_send(), sid)
    return (time.perf_counter() - start) / messages * 1e6


def bulk(mib: int) -> float:
    client, server, sid = connected()
    chunk = b"y" * (256 * 1024)
    start = time.perf_counter()
    for _ in range(mib * 4):
        client.send(sid, chunk)
        wire = client.data_to_send()
        for i in range(0, len(wire), 65536):
            deliver(server, wire[i : i + 65536], sid)
        client.receive(server.data_to_send())
    return (time.perf_counter() - start) / mib * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=20000)
    parser.add_argument("--mib", type=int, default=500)
    args = parser.parse_args()
    print(f"1 KB round trip (4 codec operations): {round_trips(args.messages):.1f} us")
    per_mib = bulk(args.mib)
    print(f"bulk: {per_mib:.2f} ms per MiB (codec only: {8 * 1.048576 / per_mib:.1f} Gbit/s)")


if __name__ == "__main__":
    main()
