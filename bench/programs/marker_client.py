"""Path check: send a known plaintext marker through the path, read it back, hold the connection.

The harness captures the node-to-node link meanwhile and looks for the marker (it must appear on a
direct path and must not on an encrypted one); while the connection is held it can also ask the
agents' admin API how they carried it. Prints ``{"echoed": N}`` once the marker came back, then
keeps the connection open until stdin reaches end of file. A failed attempt (the path is still
starting: an agent fetching its first certificate) is retried for ``--patience`` seconds.

    python -m bench.programs.marker_client --host 10.244.2.2 --port 7000 --marker HEX --size 65536
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--marker", required=True, help="the text to repeat")
    parser.add_argument("--size", type=int, default=65536)
    parser.add_argument("--patience", type=float, default=60.0)
    args = parser.parse_args()
    unit = args.marker.encode()
    payload = (unit * (args.size // len(unit) + 1))[: args.size]
    deadline = time.monotonic() + args.patience
    while True:
        try:
            sock = exchange(args.host, args.port, payload)
            break
        except OSError as e:
            if time.monotonic() > deadline:
                raise SystemExit(f"marker exchange with {args.host}:{args.port} failed: {e}") from e
            time.sleep(0.5)
    with sock:
        print(json.dumps({"echoed": len(payload)}), flush=True)
        sys.stdin.read()


def exchange(host: str, port: int, payload: bytes) -> socket.socket:
    """Send ``payload`` and read it back, interleaved so that neither side's buffer fills."""
    sock = socket.create_connection((host, port), timeout=30)
    try:
        echoed = 0
        for at in range(0, len(payload), 8192):
            chunk = payload[at : at + 8192]
            sock.sendall(chunk)
            while echoed < at + len(chunk):
                data = sock.recv(65536)
                if not data:
                    raise ConnectionError(f"path closed after {echoed} of {len(payload)} bytes")
                echoed += len(data)
    except BaseException:
        sock.close()
        raise
    return sock


if __name__ == "__main__":
    main()
