"""Request/response latency: N sequential round trips of one message on one connection.

Each round trip sends ``--size`` bytes and waits for all of them to come back; the first
``--warmup`` round trips (connection set-up, pool dial, TLS handshake, allocator and cache warm-up)
are not recorded. Prints ``{"samples_us": [...]}``: every round-trip time in microseconds, so the
harness can compute any percentile and keep the raw data.

    python -m bench.programs.rr_client --host 10.244.2.2 --port 7000 --count 20000
"""

from __future__ import annotations

import argparse
import json
import socket
import time


def round_trips(sock: socket.socket, message: bytes, count: int) -> list[float]:
    samples = []
    for _ in range(count):
        start = time.perf_counter_ns()
        sock.sendall(message)
        got = 0
        while got < len(message):
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("the server closed the connection mid-exchange")
            got += len(chunk)
        samples.append((time.perf_counter_ns() - start) / 1000)
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--count", type=int, default=20000)
    parser.add_argument("--warmup", type=int, default=500)
    parser.add_argument("--size", type=int, default=1024)
    args = parser.parse_args()
    message = b"r" * args.size
    with socket.create_connection((args.host, args.port), timeout=30) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        round_trips(sock, message, args.warmup)
        samples = round_trips(sock, message, args.count)
    print(json.dumps({"samples_us": [round(s, 1) for s in samples]}))


if __name__ == "__main__":
    main()
