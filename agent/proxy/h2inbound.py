"""The asyncio shell around ``H2Proxy`` for a port declared HTTP/2 or gRPC at the destination.

Used by both inbound paths once the connection is admitted and the pod's socket is connected,
like the HTTP/1.1 shell (``agent.proxy.http_inbound``, whose ``Downstream`` hides whether the
client is an HBONE stream or a plaintext socket). The pod is spoken to over one h2c connection
per client connection (the one the inbound path connected, with the client's address as source,
so the pod still sees its real client): every stream of the client is a stream on it.

Two tasks feed the sans-IO layer, one per side; each awaits the writes its bytes caused before
reading more, so a side that does not read stops the other's reads (on top of HTTP/2 flow
control, which ``H2Proxy`` keeps: it reopens a window only for bytes already passed on). A lock
per direction keeps writes in order when both tasks produce bytes for the same side.

Authorization and rate limiting are per request (``http_inbound.request_verdict``: a
rate-limited call is answered ``429``, or for gRPC trailers-only ``grpc-status: 8``), each
finished stream is reported to ``Registry.request_done`` with ``request_protocol`` ``grpc`` for
gRPC calls, and refusals of bad input go to ``Registry.http_rejected`` by cause.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time

from agent.policy.authz import Request
from agent.proxy.core import Core
from agent.proxy.h2proxy import H2Exchange, H2Limits, H2Proxy
from agent.proxy.http1 import RequestHead, Verdict, request_record
from agent.proxy.http_inbound import Downstream, request_verdict
from agent.state import Workload
from agent.telemetry.records import ConnectionRecord, RequestRecord

log = logging.getLogger(__name__)

READ_SIZE = 64 * 1024
HEADER_TIMEOUT = 10.0  # seconds a header block may stay open (HTTP/1.1's head timeout)


def header_wait(proxy: H2Proxy, timeout: float = HEADER_TIMEOUT) -> float | None:
    """How long the next read may wait: until the open header block's deadline, if one is."""
    if proxy.head_started is None:
        return None
    return max(0.0, proxy.head_started + timeout - time.monotonic())


class H2Session:
    """One client h2c connection on a declared HTTP/2 or gRPC port, and its pod connection."""

    def __init__(
        self,
        core: Core,
        down: Downstream,
        upstream: socket.socket,
        record: ConnectionRecord,
        request: Request,
        workload: Workload,
        *,
        limits: H2Limits | None = None,
        header_timeout: float = HEADER_TIMEOUT,
    ) -> None:
        self.core, self.down, self.upstream = core, down, upstream
        self.record, self.request, self.workload = record, request, workload
        self.where = f"{record.source} -> {record.destination}"
        self.header_timeout = header_timeout
        self.proxy = H2Proxy(self._authorize, limits=limits)
        self._up_lock = asyncio.Lock()
        self._down_lock = asyncio.Lock()

    def _authorize(self, head: RequestHead) -> Verdict:
        return request_verdict(self.core, self.request, self.workload, head, self.where)

    async def serve(self) -> None:
        """Serve streams until either side closes or the proxy is done with the connection."""
        await self._flush()  # both prefaces and SETTINGS
        tasks = {
            asyncio.create_task(self._client_side(), name="h2-client"),
            asyncio.create_task(self._upstream_side(), name="h2-upstream"),
        }
        try:
            while tasks and not self.proxy.closing:
                done, tasks = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    task.result()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        await self._flush()
        self.down.write_eof()

    async def _client_side(self) -> None:
        proxy = self.proxy
        while not proxy.closing:
            try:
                wait = header_wait(proxy, self.header_timeout)
                data = await asyncio.wait_for(self.down.read(), wait)
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
        proxy = self.proxy
        while not proxy.closing:
            try:
                data = await loop.sock_recv(self.upstream, READ_SIZE)
            except OSError as e:
                log.debug("%s: upstream failed: %r", self.where, e)
                proxy.upstream_failed()
                await self._flush()
                return
            if data and not self.record.bytes_received:
                self.record.first_byte = time.monotonic()
            self.record.bytes_received += len(data)
            proxy.receive_upstream(data)
            await self._flush()
            if not data:
                return

    async def _flush(self) -> None:
        proxy = self.proxy
        async with self._up_lock:
            data = proxy.take_to_upstream()
            if data:
                try:
                    await asyncio.get_running_loop().sock_sendall(self.upstream, data)
                except OSError as e:
                    log.debug("%s: upstream send failed: %r", self.where, e)
                    proxy.upstream_failed()
        async with self._down_lock:
            data = proxy.take_to_client()
            if data:
                await self.down.write(data)
        for exchange in proxy.take_completed():
            self.core.registry.request_done(self.record, h2_request_record(exchange))
        for cause in proxy.take_rejections():
            self.core.registry.http_rejected(cause, self.where)


def h2_request_record(exchange: H2Exchange) -> RequestRecord:
    """``request_record`` of a stream, with its protocol (``grpc`` for a gRPC call) and status."""
    return request_record(
        exchange,
        protocol="grpc" if exchange.grpc else "http",
        grpc_status=exchange.grpc_status,
    )
