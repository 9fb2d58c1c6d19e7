"""CPU inside the HTTP/2 proxies per gRPC-like unary call, in one process and without sockets:
what a change to ``H2Proxy``, ``H2Relay`` or their HPACK and framing costs or saves, measured
where the machine's load cannot move it.

    .venv/bin/python -m tests.bench.proxy.bench_h2call [--path vip|port] [--no-relay]
        [--calls 1000] [--runs 7]

An in-memory ``h2`` client sends unary calls one at a time (gRPC's request head with a
``grpc-timeout`` that changes per call, a 17-byte message) to the source's ``H2Proxy`` (``--path
vip``; ``port``: straight to the destination, the declared pod port's path), which forwards them
to the destination (``H2Relay``, or ``H2Proxy`` with ``--no-relay``) and on to an in-memory ``h2``
pod that answers each with a head, a message and trailers. Both proxies allow everything (no
policy objects are built). Prints the CPU time (``time.process_time``) spent inside each proxy
per call, the minimum over ``--runs`` runs (the least disturbed; compare trees alternated).

Instructions instead of time: ``--callgrind src`` (or ``dst``) calls that proxy through a
``ctypes`` callback, so that callgrind run with ``--toggle-collect=ffi_call*`` counts only what
happens inside it (plus a constant few thousand instructions of ``ctypes`` per call into it).
The difference of two runs, divided by the difference of their calls, is instructions per call,
whatever else the machine does::

    for n in 200 800; do valgrind --tool=callgrind --toggle-collect='ffi_call*' \\
        --callgrind-out-file=/tmp/cg.$n .venv/bin/python -m tests.bench.proxy.bench_h2call \\
        --runs 1 --calls $n --callgrind src; done
    # (summary of cg.800 - summary of cg.200) / 600
"""

from __future__ import annotations

import argparse
import ctypes
import time
from collections.abc import Callable
from typing import Any

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.events import DataReceived, Event, StreamEnded

from agent.proxy.h2exchange import Choice, PickRequest
from agent.proxy.h2proxy import H2Proxy
from agent.proxy.h2relay import H2Relay
from agent.proxy.http1 import RequestHead, Verdict

MESSAGE = b"\x00\x00\x00\x00\x0c" + b"hello, world"
REQUEST = [
    (b":method", b"POST"),
    (b":scheme", b"http"),
    (b":path", b"/echo.Echo/Unary"),
    (b":authority", b"echo.default.svc.cluster.local:50051"),
    (b"content-type", b"application/grpc"),
    (b"te", b"trailers"),
    (b"grpc-accept-encoding", b"identity,deflate,gzip"),
    (b"user-agent", b"grpc-python/1.60.0 grpc-c/37.0.0 (linux; chttp2)"),
]
RESPONSE = [
    (b":status", b"200"),
    (b"content-type", b"application/grpc"),
    (b"grpc-accept-encoding", b"identity,deflate,gzip"),
]
TRAILERS = [(b"grpc-status", b"0"), (b"grpc-message", b"")]
_CALLBACK = ctypes.CFUNCTYPE(None)


def _allow(_head: RequestHead) -> Verdict:
    return Verdict(True)


def _pick(_request: PickRequest) -> Choice:
    return Choice("pod")


def _peer(*, client_side: bool) -> H2Connection:
    conn = H2Connection(H2Configuration(client_side=client_side, header_encoding=None))
    conn.initiate_connection()
    return conn


class Exchange:
    """One client connection through the proxies to one pod, pumped until nothing moves."""

    def __init__(self, *, via_source: bool, relay: bool, callgrind: str | None) -> None:
        self.dst: H2Proxy | H2Relay = H2Relay(_allow) if relay else H2Proxy(_allow)
        self.src = H2Proxy(_allow, pick=_pick) if via_source else None
        self.client, self.pod = _peer(client_side=True), _peer(client_side=False)
        self.cpu = {"src": 0.0, "dst": 0.0}
        self.callgrind = callgrind
        self.done = 0

    def _in(self, side: str, f: Callable[..., Any], *args: Any) -> Any:
        """``f(*args)``, counted as ``side``'s: its CPU time, or under callgrind its
        instructions (called from C, inside ``ffi_call``)."""
        if side == self.callgrind:
            box: list[Any] = []
            _CALLBACK(lambda: box.append(f(*args)))()
            return box[0]
        start = time.process_time()
        out = f(*args)
        self.cpu[side] += time.process_time() - start
        return out

    def pump(self) -> None:
        src, dst = self.src, self.dst
        moved = True
        while moved:
            moved = False
            out = self.client.data_to_send()
            if out:
                moved = True
                if src is not None:
                    self._in("src", src.receive_client, out)
                else:
                    self._in("dst", dst.receive_client, out)
            if src is not None:
                src.take_new_upstreams()
                out = self._in("src", src.take_to_upstream, 0)
                if out:
                    moved = True
                    self._in("dst", dst.receive_client, out)
                out = self._in("dst", dst.take_to_client)
                if out:
                    moved = True
                    self._in("src", src.receive_upstream, out, 0)
                out = self._in("src", src.take_to_client)
                self._in("src", src.take_completed)
            else:
                out = self._in("dst", dst.take_to_client)
            if out:
                moved = True
                self._client_events(self.client.receive_data(out))
            out = self._in("dst", dst.take_to_upstream)
            if out:
                moved = True
                self._pod_events(self.pod.receive_data(out))
            out = self.pod.data_to_send()
            if out:
                moved = True
                self._in("dst", dst.receive_upstream, out)
            self._in("dst", dst.take_completed)

    def _client_events(self, events: list[Event]) -> None:
        for e in events:
            if isinstance(e, DataReceived) and e.flow_controlled_length:
                self.client.acknowledge_received_data(e.flow_controlled_length, e.stream_id)
            elif isinstance(e, StreamEnded):
                self.done += 1

    def _pod_events(self, events: list[Event]) -> None:
        for e in events:
            if isinstance(e, DataReceived) and e.flow_controlled_length:
                self.pod.acknowledge_received_data(e.flow_controlled_length, e.stream_id)
            elif isinstance(e, StreamEnded):
                self.pod.send_headers(e.stream_id, RESPONSE)
                self.pod.send_data(e.stream_id, MESSAGE)
                self.pod.send_headers(e.stream_id, TRAILERS, end_stream=True)

    def call(self, i: int) -> None:
        sid = self.client.get_next_available_stream_id()
        timeout = (b"grpc-timeout", b"%dm" % (4000 + i % 997))
        self.client.send_headers(sid, [*REQUEST, timeout])
        self.client.send_data(sid, MESSAGE, end_stream=True)
        self.pump()


def run(calls: int, *, via_source: bool, relay: bool, callgrind: str | None) -> dict[str, float]:
    """CPU µs per call inside each proxy over ``calls`` calls on one connection."""
    exchange = Exchange(via_source=via_source, relay=relay, callgrind=callgrind)
    exchange.pump()
    exchange.cpu = {"src": 0.0, "dst": 0.0}
    for i in range(calls):
        exchange.call(i)
    if exchange.done != calls:
        raise RuntimeError(f"{exchange.done} of {calls} calls ended: the exchange is broken")
    return {side: cpu / calls * 1e6 for side, cpu in exchange.cpu.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--path", choices=("vip", "port"), default="vip")
    parser.add_argument("--no-relay", action="store_true", help="H2Proxy at the destination")
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--callgrind", choices=("src", "dst"), help="count only that proxy")
    args = parser.parse_args()
    results = [
        run(
            args.calls,
            via_source=args.path == "vip",
            relay=not args.no_relay,
            callgrind=args.callgrind,
        )
        for _ in range(args.runs)
    ]
    src = min(r["src"] for r in results)
    dst = min(r["dst"] for r in results)
    both = min(r["src"] + r["dst"] for r in results)
    where = "relay" if not args.no_relay else "proxy"
    print(f"{args.path}, destination {where}: source {src:.1f}, destination {dst:.1f}, "
          f"both {both:.1f} µs CPU per call (min of {args.runs} runs of {args.calls})")  # fmt: skip


if __name__ == "__main__":
    main()
