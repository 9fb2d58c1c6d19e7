"""CPU per gRPC unary call through both node proxies, in one process, with their shells: what a
change to the HTTP/2 path costs or saves, HBONE, TLS, telemetry and the access log included.

    sudo .venv/bin/python -m tests.bench.proxy.bench_grpc_cpu vip|pod|l4|direct \
        [--calls 4000] [--rounds 5] [--connections 4] [--no-access-log] [--log FILE] [--deadline]

``tests.bench.proxy.bench_h2call`` measures the two HTTP/2 cores alone, without sockets; this
runs the real ``NodeProxy`` objects of ``tests/integration/proxy/mesh.py`` (HBONE with mTLS
between them, on uvloop, request telemetry and the access log wired as the agent wires them,
as ``bench_http_cpu`` does for HTTP/1.1), so the difference between the two is what the shells
cost. Paths: ``vip`` a Service VIP port declared ``appProtocol: grpc`` (node1 terminates h2c
and picks an endpoint per call, node2 relays frames), ``pod`` the pod's IP on that declared
port (node2 only), ``l4`` the same pod on a port nothing declares (bytes over HBONE),
``direct`` no proxy (the clients' and app's own share).

The client and the app speak h2c from prepared bytes (no ``h2``: its CPU per call would hide
the proxies'): each client sends one unary call at a time, a header block encoded without the
dynamic table (with ``--deadline`` a ``grpc-timeout`` too) and a 9-byte gRPC message; the
app answers each request stream with a head, a message and trailers (``grpc-status: 0``).
Both acknowledge SETTINGS and PING and open their windows wide at the start, so no flow
control stalls them.

Prints the process CPU time per call of each measured round (after a warm-up) and the best;
``--callgrind`` as in ``bench_http_cpu``. ``--source-calls`` then runs one more round of
``--calls`` under ``sys.setprofile`` and prints the Python calls (functions and built-ins) made
per call inside the source's session callbacks (``SourceCalls``): a count no load moves.
"""

from __future__ import annotations

import argparse
import asyncio
import struct
import sys
from collections.abc import Callable
from types import FrameType
from typing import cast

from agent.proxy.h2outbound import H2SourceSession
from agent.state import Endpoint, Service, ServicePort
from tests.bench.proxy.bench_http_cpu import _captured, police, report, rounds, telemetry
from tests.integration.proxy.mesh import CLIENT, SERVER, Mesh, free_port

VIP = "10.96.7.3"
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, SETTINGS, PING, GOAWAY, WINDOW_UPDATE = 0x0, 0x1, 0x4, 0x6, 0x7, 0x8
END_STREAM, END_HEADERS, ACK = 0x1, 0x4, 0x1
WIDE = 1 << 30  # a window increment that no run uses up


def frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return (
        struct.pack(">I", len(payload))[1:]
        + bytes((kind, flags))
        + struct.pack(">I", stream)
        + payload
    )


def block(*fields: tuple[bytes, bytes]) -> bytes:
    """HPACK literals without indexing and with new names: no dynamic table on either side."""
    out = bytearray()
    for name, value in fields:
        out += b"\x00" + bytes((len(name),)) + name + bytes((len(value),)) + value
    return bytes(out)


def opening() -> bytes:
    """SETTINGS (initial window 1 GiB) and a connection WINDOW_UPDATE of 1 GiB."""
    settings = struct.pack(">HI", 0x4, WIDE)
    return frame(SETTINGS, 0, 0, settings) + frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", WIDE))


MESSAGE = b"\x00" + struct.pack(">I", 4) + b"ping"
REPLY = b"\x00" + struct.pack(">I", 4) + b"pong"


def request_head(authority: bytes, deadline: bool = False) -> bytes:
    """A unary call's head; with ``deadline`` a ``grpc-timeout`` (10 s, as a client with a
    deadline sends on every call: the source then keeps a deadline per call)."""
    fields = [
        (b":method", b"POST"),
        (b":scheme", b"http"),
        (b":path", b"/nodemesh.bench.Echo/Unary"),
        (b":authority", authority),
        (b"content-type", b"application/grpc"),
        (b"te", b"trailers"),
        (b"user-agent", b"bench-grpc"),
    ]
    if deadline:
        fields.append((b"grpc-timeout", b"10S"))
    return block(*fields)


RESPONSE_HEAD = block((b":status", b"200"), (b"content-type", b"application/grpc"))
TRAILERS = block((b"grpc-status", b"0"), (b"grpc-message", b""))


class Frames:
    """Splits a byte stream into (type, flags, stream, payload), answering SETTINGS and PING."""

    def __init__(self, transport: asyncio.Transport) -> None:
        self.transport, self.buffer = transport, b""

    def feed(self, data: bytes) -> list[tuple[int, int, int, bytes]]:
        self.buffer += data
        out = []
        while len(self.buffer) >= 9:
            length = int.from_bytes(self.buffer[:3], "big")
            if len(self.buffer) < 9 + length:
                break
            kind, flags = self.buffer[3], self.buffer[4]
            stream = int.from_bytes(self.buffer[5:9], "big") & 0x7FFFFFFF
            payload = self.buffer[9 : 9 + length]
            self.buffer = self.buffer[9 + length :]
            if kind == SETTINGS and not flags & ACK:
                self.transport.write(frame(SETTINGS, ACK, 0))
            elif kind == PING and not flags & ACK:
                self.transport.write(frame(PING, ACK, 0, payload))
            elif kind == GOAWAY:
                raise AssertionError(f"GOAWAY from the peer: {payload!r}")
            out.append((kind, flags, stream, payload))
        return out


class App(asyncio.Protocol):
    """Answers every request stream, once its END_STREAM arrived, with head, message, trailers."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.frames, self.preface = Frames(self.transport), b""
        self.transport.write(opening())

    def data_received(self, data: bytes) -> None:
        if len(self.preface) < len(PREFACE):
            take = len(PREFACE) - len(self.preface)
            self.preface, data = self.preface + data[:take], data[take:]
        answers = []
        for kind, flags, stream, _ in self.frames.feed(data):
            if kind in (HEADERS, DATA) and flags & END_STREAM:
                answers.append(
                    frame(HEADERS, END_HEADERS, stream, RESPONSE_HEAD)
                    + frame(DATA, 0, stream, REPLY)
                    + frame(HEADERS, END_HEADERS | END_STREAM, stream, TRAILERS)
                )
        if answers:
            self.transport.write(b"".join(answers))


class Client(asyncio.Protocol):
    """``count`` unary calls, one at a time on one h2c connection; ``done`` after the last."""

    def __init__(
        self, count: int, authority: bytes, done: asyncio.Future[None], deadline: bool = False
    ) -> None:
        self.left, self.done, self.stream = count, done, 1
        self.head = request_head(authority, deadline)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.frames = Frames(self.transport)
        self.transport.write(PREFACE + opening() + self._call())

    def _call(self) -> bytes:
        return frame(HEADERS, END_HEADERS, self.stream, self.head) + frame(
            DATA, END_STREAM, self.stream, MESSAGE
        )

    def data_received(self, data: bytes) -> None:
        for kind, flags, stream, payload in self.frames.feed(data):
            if kind == DATA and stream == self.stream and payload != REPLY:
                self.done.set_exception(AssertionError(f"not the app's message: {payload!r}"))
                return
            if stream != self.stream or kind != HEADERS or not flags & END_STREAM:
                continue
            self.left -= 1
            if self.left == 0:
                self.done.set_result(None)
                return
            self.stream += 2
            self.transport.write(self._call())


class SourceCalls:
    """A ``sys.setprofile`` function counting the Python calls (functions and built-ins) made
    inside the source session's callbacks: the client's bytes (``_readable``), an endpoint's
    (``deliver``) and its timer (``_expired``), everything they call included (the proxy, the
    routing, the balancer, the reports, the writes)."""

    ENTRIES = frozenset(
        f.__code__
        for f in (H2SourceSession._readable, H2SourceSession.deliver, H2SourceSession._expired)
    )

    def __init__(self) -> None:
        self.depth = 0  # inside an entry
        self.calls = 0

    def __call__(self, frame: FrameType, event: str, _arg: object) -> None:
        if event == "call":
            if frame.f_code in self.ENTRIES:
                self.depth += 1
            if self.depth:
                self.calls += 1
        elif event == "return":
            if frame.f_code in self.ENTRIES:
                self.depth -= 1
        elif event == "c_call" and self.depth:
            self.calls += 1


def _declare(mesh: Mesh, path: str, port: int, l4_port: int) -> tuple[str, int]:
    """The Service declaring ``port`` gRPC (``l4`` dials ``l4_port``, which nothing declares)."""
    with mesh.store.update() as tx:
        grpc = ServicePort(50051, port, name="grpc", app_protocol="grpc")
        tx.put_service(
            Service("echo", "default", (VIP,), (grpc,), {"app": "server"}, (Endpoint(SERVER),))
        )
    return {"vip": (VIP, 50051), "pod": (SERVER, port), "l4": (SERVER, l4_port)}.get(
        path, (SERVER, port)
    )


async def run(args: argparse.Namespace) -> list[float]:
    loop = asyncio.get_running_loop()
    mesh = Mesh(handshake_timeout=120.0 if args.callgrind else 10.0)
    await mesh.start()
    try:
        telemetry(mesh)
        port, l4_port = free_port(SERVER), free_port(SERVER)
        dst = _declare(mesh, args.path, port, l4_port)
        if args.policed:  # as bench_http_cpu's
            police(mesh)
        servers = [await loop.create_server(App, SERVER, p) for p in (port, l4_port)]
        authority = f"{dst[0]}:{dst[1]}".encode()

        async def batch(per_connection: int) -> None:
            done: list[asyncio.Future[None]] = []
            for _ in range(args.connections):
                host, p = dst if args.path == "direct" else await _captured(mesh, dst)
                finished: asyncio.Future[None] = loop.create_future()
                client = Client(per_connection, authority, finished, args.deadline)
                made: Callable[[], Client] = lambda client=client: client  # noqa: E731
                await loop.create_connection(made, host, p, local_addr=(CLIENT, 0))
                done.append(finished)
            await asyncio.wait_for(asyncio.gather(*done), 600)

        per_round = await rounds(args, batch, args.calls)
        if args.source_calls:
            counter = SourceCalls()
            sys.setprofile(counter)
            try:
                await batch(args.calls // args.connections)
            finally:
                sys.setprofile(None)
            per_call = counter.calls / (args.calls // args.connections * args.connections)
            print(f"{args.path}: Python calls per call in the source's session: {per_call:.1f}")
        for server in servers:
            server.close()
        return per_round
    finally:
        await mesh.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("path", choices=["vip", "pod", "l4", "direct"])
    parser.add_argument("--calls", type=int, default=4000, help="per measured round")
    parser.add_argument("--deadline", action="store_true", help="grpc-timeout on every call")
    parser.add_argument("--source-calls", action="store_true", help="see the docstring")
    report(parser, run, "call")


if __name__ == "__main__":
    main()
