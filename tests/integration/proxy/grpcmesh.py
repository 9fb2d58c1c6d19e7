"""grpcio clients and servers through ``mesh``'s two in-process nodes (loopback).

grpcio cannot choose its source address, and the proxies tell the client pod by it, so a
client's channel dials ``Capture``: a listener on 127.0.0.1 that connects each accepted
connection from the client pod's IP into node1 as if captured (``Mesh.connect``) and carries
the bytes both ways, each direction awaiting the other side's drain (so it holds at most one
read of 64 KiB: it is not a buffer that would hide the proxies' flow control).

Four paths to a server pod (``grpc_front``):

* ``vip``: Service ``front``'s VIP port, declared gRPC, whose endpoint is on node2: node1's
  HTTP/2 source (``H2SourceSession``), HBONE, node2's destination (``H2Relay``);
* ``pod``: the pod's IP and the port the Service declares, dialled directly: node1 carries the
  connection at L4 over HBONE, node2 terminates HTTP/2 (the declared pod port);
* ``near``: the VIP of a Service whose endpoint is the ``local`` pod on node1: the source's
  HTTP/2 session speaks to the pod itself;
* ``near-pod``: that pod's declared port dialled directly: node1 serves it as its destination
  (``H2Session`` with ``H2Proxy``: a same-node client is not relayed).
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import socket
import time
from collections.abc import AsyncIterator, Iterator
from concurrent import futures
from dataclasses import dataclass
from typing import Any

import grpc

from agent.state import Endpoint, Service, ServicePort
from tests.integration.proxy.mesh import CLIENT, LOCAL, SERVER, Mesh, listener

VIP = "10.96.7.4"
NEAR_VIP = "10.96.7.5"
FRONT = "front.default.svc.cluster.local"


def grpc_front(mesh: Mesh, port: int, *, near_port: int | None = None) -> None:
    """Service ``front`` (VIP port 50051, declared gRPC) to ``server`` on ``port``, and with
    ``near_port`` Service ``near`` (same, ``NEAR_VIP``) to the ``local`` pod on that port."""
    with mesh.store.update() as tx:
        grpc = ServicePort(50051, port, name="grpc", app_protocol="grpc")
        tx.put_service(
            Service("front", "default", (VIP,), (grpc,), {"app": "server"}, (Endpoint(SERVER),))
        )
        if near_port is not None:
            near = ServicePort(50051, near_port, name="grpc", app_protocol="grpc")
            near_svc = Service("near", "default", (NEAR_VIP,), (near,), {"app": "local"},
                               (Endpoint(LOCAL),))  # fmt: skip
            tx.put_service(near_svc)


class Capture:
    """A 127.0.0.1 listener whose connections enter node1 from ``CLIENT`` to ``dst``."""

    def __init__(self, mesh: Mesh, dst: tuple[str, int]) -> None:
        self.mesh, self.dst = mesh, dst
        self.sock = listener("127.0.0.1")
        self.target = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self._tasks: set[asyncio.Task[None]] = set()
        self.accepted = 0  # connections the client opened (a channel keeps one when all is well)
        self._accepting = asyncio.create_task(self._accept())

    async def _accept(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            conn, _ = await loop.sock_accept(self.sock)
            self.accepted += 1
            task = asyncio.create_task(self._carry(conn))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _carry(self, conn: socket.socket) -> None:
        reader, writer = await asyncio.open_connection(sock=conn)
        up_reader, up_writer = await self.mesh.connect(CLIENT, self.dst)
        try:
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        finally:
            writer.close()
            up_writer.close()

    async def close(self) -> None:
        self._accepting.cancel()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(self._accepting, *self._tasks, return_exceptions=True)
        self.sock.close()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()


SERVICE = "conformance.Echo"
MIB = 1 << 20
BYE = b"bye"  # ends a ``Chat`` call


def _identity(data: bytes) -> bytes:
    return data


class Pod:
    """A grpcio server with the RPC shapes the audit needs, recording what it saw."""

    def __init__(self, host: str) -> None:
        self.cancelled: queue.Queue[str] = queue.Queue()  # method of each call seen cancelled
        self.produced = 0  # messages ``Flood`` handed to grpcio
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=64),
            options=[("grpc.max_receive_message_length", 16 * MIB)],
        )
        self.server.add_generic_rpc_handlers((self._handler(),))
        self.port = self.server.add_insecure_port(f"{host}:0")
        self.server.start()

    def _watch(self, context: grpc.ServicerContext, method: str) -> list[bool]:
        """Note ``method`` in ``cancelled`` when the call ends unless the handler set the flag
        returned first. (Whether the call is active when the requests end does not tell: grpcio
        may end their iteration on a cancel before it marks the call inactive.)"""
        finished = [False]
        context.add_callback(lambda: None if finished[0] else self.cancelled.put(method))
        return finished

    def collect(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        count = size = 0
        for message in requests:
            if message == b"stop":  # the answer while the client still streams
                context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"stopped after {count}")
            count, size = count + 1, size + len(message)
        return f"{count}:{size}".encode()

    def chat(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        """Answers each message (``big:N``: N bytes; ``sleep:S``: itself after S seconds;
        ``last:N``: N bytes and the call's end, OK, while the client may still send); ``bye``
        ends the call OK: a call that ends otherwise is noted ``cancelled``."""
        finished = self._watch(context, "chat")
        for message in requests:
            if message == BYE:
                finished[0] = True
                return
            if message.startswith(b"last:"):  # N bytes, then OK before the client ended
                finished[0] = True
                yield b"l" * int(message[5:])
                return
            if message.startswith(b"big:"):
                yield b"b" * int(message[4:])
            elif message.startswith(b"sleep:"):
                time.sleep(float(message[6:]))
                yield message
            else:
                yield message

    def greet(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        """Bidirectional, the server speaking first (before the client sent a message)."""
        yield b"hello"
        yield from requests

    def flood(self, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        self._watch(context, "flood")
        chunk = b"f" * int(request)
        while context.is_active():
            self.produced += 1
            yield chunk

    def meta(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        got = [(k, v) for k, v in context.invocation_metadata() if k.startswith("x-")]
        if request == b"fail":
            context.set_trailing_metadata([("grpc-status-details-bin", b"\x08\x05details")])
            context.abort(grpc.StatusCode.NOT_FOUND, "asked to fail")
        time.sleep(0.2)  # headers late
        context.send_initial_metadata([("x-late", "yes"), ("x-late-bin", b"\x00\xff")])
        context.set_trailing_metadata(got)
        return request

    def _handler(self) -> grpc.GenericRpcHandler:
        ser = {"request_deserializer": _identity, "response_serializer": _identity}
        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "Collect": grpc.stream_unary_rpc_method_handler(self.collect, **ser),
                "Chat": grpc.stream_stream_rpc_method_handler(self.chat, **ser),
                "Greet": grpc.stream_stream_rpc_method_handler(self.greet, **ser),
                "Flood": grpc.unary_stream_rpc_method_handler(self.flood, **ser),
                "Meta": grpc.unary_unary_rpc_method_handler(self.meta, **ser),
            },
        )

    def stop(self) -> None:
        self.server.stop(None)


def method(channel: grpc.Channel, name: str) -> Any:
    kw = {"request_serializer": _identity, "response_deserializer": _identity}
    shape = {"Collect": channel.stream_unary, "Chat": channel.stream_stream,
             "Greet": channel.stream_stream,
             "Flood": channel.unary_stream, "Meta": channel.unary_unary}[name]  # fmt: skip
    return shape(f"/{SERVICE}/{name}", **kw)


@dataclass
class Path:
    """One way from the client pod to a server pod: its name, the pod, the client's dial."""

    name: str
    pod: Pod
    capture: Capture


@contextlib.asynccontextmanager
async def every_path(mesh: Mesh) -> AsyncIterator[list[Path]]:
    """A ``Pod`` on ``server`` (node2) and one on ``local`` (node1), and the four paths."""
    far, near = Pod(SERVER), Pod(LOCAL)
    grpc_front(mesh, far.port, near_port=near.port)
    dials = (("vip", far, (VIP, 50051)), ("pod", far, (SERVER, far.port)),
             ("near", near, (NEAR_VIP, 50051)), ("near-pod", near, (LOCAL, near.port)))  # fmt: skip
    paths = [Path(name, pod, Capture(mesh, dst)) for name, pod, dst in dials]
    try:
        yield paths
    finally:
        for path in paths:
            await path.capture.close()
        far.stop()
        near.stop()
