"""The asyncio shell around ``H2Proxy`` for a port declared HTTP/2 or gRPC at the destination.

Used by both inbound paths once the connection is admitted and the pod's socket is connected,
like the HTTP/1.1 shell (``agent.proxy.http_inbound``, whose ``Downstream`` hides whether the
client is an HBONE stream or a plaintext socket). The pod is spoken to over one h2c connection
per client connection (the one the inbound path connected, with the client's address as source,
so the pod still sees its real client): every stream of the client is a stream on it.

The shell is the HTTP/1.1 one's (``http_inbound.PodShell``, its base): the client's bytes are handed
to the session by the HBONE stream as they arrive (``Downstream.deliver_to``; a task reads
what the stream could not hand over, and the plaintext socket), the pod's socket is watched with
``add_reader``, and each side's writes go out at once when it takes them, else queue behind its
backpressure (``httpshell.Outbox``). While the pod's outbox holds bytes the client is not read,
and while the client's holds bytes the pod is not read, so a side that does not read stops the
other's reads (on top of HTTP/2 flow control, which ``H2Proxy`` keeps: it reopens a window only
for bytes already passed on). Why: the earlier shell (a task per side, each awaiting a lock and
its writes per read) cost a task wake-up and two lock round trips per frame burst, a large part
of a gRPC call's time at the destination.

Which sans-IO core: with ``ProxySettings.h2_relay`` (the default; ``--no-h2-relay`` turns it
off) a connection that came through HBONE (an mTLS peer: ``StreamDownstream``) is relayed frame
by frame by ``h2relay.H2Relay``, which forwards the client's frames and header blocks as they
came, at about half the CPU per call; the plaintext listener and a same-node client keep
``H2Proxy``, which parses and re-encodes all. Either reads an HBONE client's header blocks with
what a source node adds to them on top of the header list size (``h2limits.PEER_LIMITS``).

Authorization and rate limiting are per request (``http_inbound.RequestAdmission``: a
rate-limited call is answered ``429``, or for gRPC trailers-only ``grpc-status: 8``), each
finished stream is reported to ``Registry.request_done`` with ``request_protocol`` ``grpc`` for
gRPC calls, and refusals of bad input go to ``Registry.http_rejected`` by cause. Whether any
AuthorizationPolicy (or a STRICT PeerAuthentication, for a plaintext client) bears on the
connection's requests at all is worked out once per state version (``http_inbound``'s
``RequestAdmission``, which the HTTP/1.1 session shares), not per stream: where none does, a
stream's verdict is its rate limits alone.
"""

from __future__ import annotations

import asyncio

from agent.proxy.h2exchange import H2Exchange
from agent.proxy.h2limits import PEER_LIMITS
from agent.proxy.h2proxy import H2Proxy
from agent.proxy.h2relay import H2Relay
from agent.proxy.http1 import request_record
from agent.proxy.http_inbound import PodShell, StreamDownstream
from agent.telemetry.records import RequestRecord


def h2_request_record(exchange: H2Exchange) -> RequestRecord:
    """``request_record`` of a stream, with its protocol (``grpc`` for a gRPC call) and status."""
    return request_record(
        exchange,
        protocol="grpc" if exchange.grpc else "http",
        grpc_status=exchange.grpc_status,
    )


class H2Session(PodShell[H2Exchange]):
    """One client h2c connection on a declared HTTP/2 or gRPC port, and its pod connection."""

    proxy: H2Proxy | H2Relay
    _record_of = staticmethod(h2_request_record)

    def _start(self) -> None:
        self.record.protocol = "http/2"  # ``nodemesh connections``: "http/2 N", not "-" (TCP)
        relay = self.core.settings.h2_relay and isinstance(self.down, StreamDownstream)
        # A source node's blocks carry what it added to its client's (``PEER_HEADER_LIST``)
        limits = PEER_LIMITS if self.down.from_peer else None
        core = H2Relay if relay else H2Proxy
        self.proxy = core(self._authorize, limits=limits)
        self._client_eof = False
        self.core.registry.on_drain(self.record.id, self._drain)

    def _drain(self) -> None:
        """The agent drains: GOAWAY to the client, its open streams go on (``H2Core.drain``);
        a client through HBONE is a source node's session, which opens new calls on a new
        tunnel, or the client itself on a declared pod port, which reconnects."""
        self.proxy.drain()
        self._moved()

    async def serve(self) -> None:
        """Serve streams until both sides closed or the proxy is done with the connection."""
        self._moved()  # the pod's preface and SETTINGS (the client's wait for its preface)
        self._resume_upstream()
        client = asyncio.create_task(self._client_side(), name="h2-client")
        client.add_done_callback(self._client_done)
        try:
            await self._ended
        finally:
            self._reader.stop()
            self._head.cancel()
            client.cancel()
            await asyncio.gather(client, return_exceptions=True)
        await self._to_pod.idle.wait()
        await self._to_client.idle.wait()
        await self.close()

    # -- the client's side -----------------------------------------------------------------
    async def _client_side(self) -> None:
        """Read what the stream did not hand to ``send`` (the pod was not reading, or the
        transport cannot hand bytes over), and its end."""
        proxy, down = self.proxy, self.down
        down.deliver_to(self)
        try:
            while not proxy.closing:
                if self._to_pod.busy:  # the pod is not reading: neither do we
                    await self._to_pod.idle.wait()
                    continue
                data = await down.read()
                if data is not None:
                    self.record.bytes_sent += len(data)
                else:
                    self._client_eof = True
                proxy.receive_client(data or b"")
                self._moved()
                if data is None:
                    return
        finally:
            down.deliver_to(None)

    def send(self, data: bytes) -> int:
        """``Sink``: the stream's bytes as they arrive (no task wakes up for them), unless the
        pod is not reading or the connection is ending."""
        if self.proxy.closing or self._to_pod.busy or self._ended.done():
            return 0
        try:
            self.record.bytes_sent += len(data)
            self.proxy.receive_client(data)
            self._moved()
        except Exception as e:  # the session's failure, not the HBONE connection's
            self._end(e)
        return len(data)

    def _rejected_detail(self) -> str:
        """The connection and what broke which limit (``H2Proxy.refusal``), as HTTP/1.1's."""
        return f"{self.where}: {self.proxy.refusal}"

    def _after_input(self) -> bool:
        """Over when the proxy is done with the connection, or both sides closed."""
        return self.proxy.closing or (self._client_eof and self._upstream_eof)
