"""How a grpcio client sees a server's reset or crash after its answer began, on every path of
``grpcmesh`` (both agents, the destination alone, the source alone, a same-node destination).

The server is a bare ``h2`` one (grpcio's server cannot choose its reset codes): each call is
answered a head and one whole message, then the stream is reset with the code the method names
(``/t.S/Reset8``), or the pod's process dies (``/t.S/Crash``: its connections closed).
"""

from __future__ import annotations

import asyncio
import contextlib

import grpc
import pytest
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import ConnectionTerminated, RequestReceived

from tests.integration.proxy.grpcmesh import NEAR_VIP, VIP, Capture, grpc_front
from tests.integration.proxy.mesh import LOCAL, SERVER, Mesh, mesh_test

pytestmark = pytest.mark.root

MESSAGE = b"\0\0\0\0\x02hi"  # one whole gRPC message

# The reset, and what grpcio reports of it: the gRPC spec's mapping (PROTOCOL-HTTP2.md,
# "Errors"). Before session 20 every one of them reached the client as INTERNAL_ERROR.
RESETS = {
    ErrorCodes.CANCEL: "CANCELLED",
    ErrorCodes.REFUSED_STREAM: "UNAVAILABLE",
    ErrorCodes.ENHANCE_YOUR_CALM: "RESOURCE_EXHAUSTED",
    ErrorCodes.INADEQUATE_SECURITY: "PERMISSION_DENIED",
}


async def _bare_pod(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    conn = H2Connection(H2Configuration(client_side=False))
    conn.initiate_connection()
    writer.write(conn.data_to_send())
    with contextlib.suppress(ConnectionError):
        while data := await reader.read(65536):
            for event in conn.receive_data(data):
                if isinstance(event, ConnectionTerminated):
                    return
                if not isinstance(event, RequestReceived):
                    continue
                sid = event.stream_id
                path = dict(event.headers)[b":path"].decode()
                head = [(":status", "200"), ("content-type", "application/grpc")]
                conn.send_headers(sid, head)
                conn.send_data(sid, MESSAGE)
                writer.write(conn.data_to_send())
                await asyncio.sleep(0.1)  # the message on its way before the end
                if path.endswith("/Crash"):
                    writer.transport.abort()
                    return
                conn.reset_stream(sid, int(path.rsplit("Reset", 1)[1]))
            writer.write(conn.data_to_send())


def _ended(target: str, names: list[str]) -> list[tuple[str, str]]:
    """Call each method; what the client read first, and the code its call ended with."""
    got = []
    with grpc.insecure_channel(target) as channel:
        for name in names:
            call = channel.unary_stream(f"/t.S/{name}")(b"", timeout=10)
            first = next(call)
            with pytest.raises(grpc.RpcError) as failed:
                next(call)
            got.append((first.hex(), failed.value.code().name))  # type: ignore[attr-defined]
    return got


@mesh_test
async def test_a_servers_reset_or_crash_after_its_answer_began_reaches_grpc_as_meant(
    mesh: Mesh,
) -> None:
    """The server's reset code passes every agent (both cores and the source), so grpcio
    reports what the server meant; its crash is ``UNAVAILABLE`` (a transport failure) through
    the source, which ends the call with trailers ``grpc-status: 14`` after the whole message:
    also when the pod is on the far node, whose destination says "lost the pod" by a reset
    CONNECT_ERROR (before, INTERNAL_ERROR: grpcio ``INTERNAL``, read as the server's bug).
    Dialled at the pod's declared port (no source HTTP layer) the crash stays ``INTERNAL``."""
    far, near = mesh.app(SERVER, _bare_pod), mesh.app(LOCAL, _bare_pod)
    grpc_front(mesh, far, near_port=near)
    dials = {"vip": (VIP, 50051), "pod": (SERVER, far),
             "near": (NEAR_VIP, 50051), "near-pod": (LOCAL, near)}  # fmt: skip
    names = [f"Reset{int(code)}" for code in RESETS] + ["Crash"]
    for path, dst in dials.items():
        capture = Capture(mesh, dst)
        try:
            got = await asyncio.to_thread(_ended, capture.target, names)
        finally:
            await capture.close()
        crash = "UNAVAILABLE" if path in ("vip", "near") else "INTERNAL"
        expected = [(MESSAGE[5:].hex(), code) for code in [*RESETS.values(), crash]]
        assert got == expected, path
