"""What one ordinary HTTP/1.1 exchange costs the destination's sans-IO ``Http1Proxy`` alone:
no sockets, no loop, no telemetry; only the codec (llhttp through httptools) and the proxy's
framing, so that a change there is measured without the rest of the path's spread.

The exchanges cycle through a GET, a POST of 12 bytes by ``Content-Length`` and a chunked one,
answered by length or chunked in turn. Count instructions with callgrind at two request counts
and take the difference, so start-up and the warm-up cancel out (session 18's numbers in
docs/performance/http1-cost.md, "Tiny chunks gathered" and "Shared callbacks given to each
half", were taken this way)::

    for n in 500 5500; do PYTHONHASHSEED=0 valgrind --tool=callgrind \\
        --callgrind-out-file=/tmp/cg.$n .venv/bin/python -m tests.bench.proxy.bench_http1_alone \\
        --requests $n; done   # (refs at 5500 - refs at 500) / 5000 = instructions per request

``--profile`` prints Python calls per request instead (cProfile).
"""

from __future__ import annotations

import argparse
import cProfile
import itertools
import pstats

from agent.proxy.http1 import Http1Proxy, Verdict

REQUESTS = (
    b"GET /a HTTP/1.1\r\nHost: s\r\nUser-Agent: x\r\n\r\n",
    b"POST /b HTTP/1.1\r\nHost: s\r\nContent-Length: 12\r\n\r\nhello world!",
    b"POST /c HTTP/1.1\r\nHost: s\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"c\r\nhello world!\r\n0\r\n\r\n",
)
RESPONSES = (
    b"HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\nhello world!",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nc\r\nhello world!\r\n0\r\n\r\n",
)
WARM_UP = 200


def exchange(proxy: Http1Proxy, count: int) -> int:
    """Run ``count`` exchanges through ``proxy``; returns the bytes the client received, so a
    proxy that stopped answering shows (each exchange must answer)."""
    received = 0
    for i in range(count):
        proxy.receive_client(REQUESTS[i % len(REQUESTS)])
        proxy.take_to_upstream()
        proxy.receive_upstream(RESPONSES[i % len(RESPONSES)])
        received += len(proxy.take_to_client())
        proxy.take_completed()
    return received


def new_proxy() -> Http1Proxy:
    ids = itertools.count(1)
    return Http1Proxy(authorize=lambda head: Verdict(True), new_request_id=lambda: f"r{next(ids)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--profile", action="store_true", help="Python calls per request")
    args = parser.parse_args(argv)
    proxy = new_proxy()
    exchange(proxy, WARM_UP)
    if args.profile:
        profile = cProfile.Profile()
        profile.enable()
        got = exchange(proxy, args.requests)
        profile.disable()
        calls = pstats.Stats(profile).total_calls  # type: ignore[attr-defined]
        print(f"Python calls per request: {calls / args.requests:.1f}")
    else:
        got = exchange(proxy, args.requests)
    if got < args.requests * len(b"HTTP/1.1 200 OK\r\n"):
        raise SystemExit(f"only {got} bytes answered for {args.requests} requests")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
