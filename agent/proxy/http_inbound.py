"""The asyncio shell around ``Http1Proxy`` for a declared HTTP/1.1 port at the destination.

Used by both inbound paths once the connection is admitted and the pod's socket is connected:
the HBONE stream (``inbound.py``) and the plaintext listener under PERMISSIVE (``plaintext.py``);
``Downstream`` hides which. Two tasks feed the sans-IO layer, one per side; each awaits the
writes its bytes caused before reading more, so a slow pod stops the client's reads and a slow
client stops the pod's (backpressure, as in the L4 relay). A lock per direction keeps writes
in order when both tasks produce bytes for the same side. A pipelined request the layer has
parsed but cannot act on yet (``client_paused``) stops the client's reads until the upstream
side has moved the exchange before it on, so a pipelining client cannot queue without bound.

Authorization here is per request (``Core.authorize_request``): on a declared HTTP port the
connection itself was admitted without the L7 conditions, which only a request can satisfy.
The connection's ``ConnectionRecord`` keeps counting bytes for the TCP metrics; each request is
reported to ``Registry.request_done`` (Istio request metrics, access log). After an upgrade
(``101``) the connection is relayed as opaque bytes, like an L4 one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from dataclasses import replace
from typing import Protocol

from agent.policy.authz import HttpAttributes, Request
from agent.proxy.core import Core
from agent.proxy.http1 import Exchange, Http1Proxy, RequestHead, Verdict
from agent.proxy.relay import relay_sockets, relay_tunnel
from agent.proxy.tunnel import TunnelStream
from agent.state import Workload
from agent.telemetry.records import ConnectionRecord, RequestRecord

log = logging.getLogger(__name__)

HEADER_TIMEOUT = 10.0  # seconds from a request's first byte to its complete head
READ_SIZE = 64 * 1024


class Downstream(Protocol):
    """The client side of an inbound connection: an HBONE stream or a plaintext socket."""

    async def read(self) -> bytes | None: ...

    async def write(self, data: bytes) -> None: ...

    def write_eof(self) -> None: ...

    async def relay(self, upstream: socket.socket, record: ConnectionRecord) -> None: ...


class StreamDownstream:
    def __init__(self, stream: TunnelStream) -> None:
        self.stream = stream

    async def read(self) -> bytes | None:
        chunk = await self.stream.read()
        if chunk is not None:
            self.stream.consumed(len(chunk))
        return chunk

    async def write(self, data: bytes) -> None:
        await self.stream.write(data)

    def write_eof(self) -> None:
        self.stream.write_eof()

    async def relay(self, upstream: socket.socket, record: ConnectionRecord) -> None:
        await relay_tunnel(upstream, self.stream, record, outbound=False)


class SocketDownstream:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    async def read(self) -> bytes | None:
        data = await asyncio.get_running_loop().sock_recv(self.sock, READ_SIZE)
        return data or None

    async def write(self, data: bytes) -> None:
        await asyncio.get_running_loop().sock_sendall(self.sock, data)

    def write_eof(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_WR)

    async def relay(self, upstream: socket.socket, record: ConnectionRecord) -> None:
        await relay_sockets(self.sock, upstream, record)


class HttpSession:
    """One client connection on a declared HTTP/1.1 port, relayed to one pod connection."""

    def __init__(
        self,
        core: Core,
        down: Downstream,
        upstream: socket.socket,
        record: ConnectionRecord,
        request: Request,
        workload: Workload,
        *,
        header_timeout: float = HEADER_TIMEOUT,
    ) -> None:
        self.core, self.down, self.upstream = core, down, upstream
        self.record, self.request, self.workload = record, request, workload
        self.header_timeout = header_timeout
        self.where = f"{record.source} -> {record.destination}"
        self.proxy = Http1Proxy(authorize=self._authorize)
        self._up_lock = asyncio.Lock()
        self._down_lock = asyncio.Lock()
        self._resume = asyncio.Event()  # set when the upstream side moved an exchange on

    def _authorize(self, head: RequestHead) -> Verdict:
        attrs = HttpAttributes(head.method, head.path, head.host)
        request = replace(self.request, http=attrs)
        where = f"{self.where} {head.method} {head.path}"
        decision = self.core.authorize_request(request, self.workload, where)
        return Verdict(decision.allowed, decision.policy or "no-allow-match")

    async def serve(self) -> None:
        """Serve requests until either side closes; then relay raw bytes if upgraded."""
        tasks = {
            asyncio.create_task(self._client_side(), name="http-client"),
            asyncio.create_task(self._upstream_side(), name="http-upstream"),
        }
        try:
            while tasks:
                done, tasks = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    task.result()
                if self.proxy.closing or self.proxy.tunnel:
                    break
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        if self.proxy.tunnel:
            await self.down.relay(self.upstream, self.record)
        else:
            self.down.write_eof()

    async def _client_side(self) -> None:
        proxy, down = self.proxy, self.down
        while not (proxy.closing or proxy.tunnel):
            if proxy.client_paused:  # a pipelined request waits its turn: read no more yet
                self._resume.clear()
                await self._resume.wait()
                continue
            if proxy.head_started is None:
                data = await down.read()
            else:
                timeout = max(0.0, proxy.head_started + self.header_timeout - time.monotonic())
                try:
                    data = await asyncio.wait_for(down.read(), timeout)
                except TimeoutError:
                    proxy.header_timeout()
                    await self._flush()
                    return
            if data is not None:
                self.record.bytes_sent += len(data)
            proxy.receive_client(data or b"")
            await self._flush()
            if data is None:
                return

    async def _upstream_side(self) -> None:
        loop = asyncio.get_running_loop()
        proxy, record = self.proxy, self.record
        while not (proxy.closing or proxy.tunnel):
            try:
                data = await loop.sock_recv(self.upstream, READ_SIZE)
            except OSError as e:
                log.debug("%s: upstream failed: %r", self.where, e)
                proxy.upstream_failed()
                await self._flush()
                return
            if data and not record.bytes_received:
                record.first_byte = time.monotonic()
            record.bytes_received += len(data)
            proxy.receive_upstream(data)
            await self._flush()
            self._resume.set()
            if not data:
                return

    async def _flush(self) -> None:
        """Write what the last input produced, in order per side, then report it. The locks
        are taken only when there is something to write (a write may wait on backpressure,
        and the other task must not overtake it)."""
        proxy = self.proxy
        data = proxy.take_to_upstream()
        if data:
            async with self._up_lock:
                try:
                    await asyncio.get_running_loop().sock_sendall(self.upstream, data)
                except OSError as e:
                    log.debug("%s: upstream send failed: %r", self.where, e)
                    proxy.upstream_failed()
        data = proxy.take_to_client()
        if data:
            async with self._down_lock:
                await self.down.write(data)
        completed = proxy.take_completed()
        if completed:
            registry = self.core.registry
            for exchange in completed:
                registry.request_done(self.record, _request_record(exchange))
        for cause in proxy.take_rejections():
            self.core.registry.http_rejected(cause, self.where)


def _request_record(exchange: Exchange) -> RequestRecord:
    head = exchange.head
    return RequestRecord(
        method=head.method,
        path=head.path,
        authority=head.host,
        status=exchange.status,
        duration_ms=max(0.0, (exchange.ended - exchange.started) * 1000),
        request_bytes=exchange.request_bytes,
        response_bytes=exchange.response_bytes,
        response_flags=exchange.flags,
        request_id=head.request_id,
    )
