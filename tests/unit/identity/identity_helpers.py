"""Helpers shared by the identity tests (imported as ``tests.unit.identity.identity_helpers``):
a mutual-TLS handshake over loopback."""

from __future__ import annotations

import asyncio
import socket
import ssl
import threading
from collections.abc import Callable, Coroutine
from typing import Any

from agent.identity.tls import peer_spiffe_id

CLIENT = "spiffe://cluster.local/ns/default/sa/client"
SERVER = "spiffe://cluster.local/ns/default/sa/server"


def _serve_once(
    listener: socket.socket, ctx: ssl.SSLContext, result: list[str | BaseException]
) -> None:
    """Blocking server side (exercises the ``SSLSocket`` path of the contexts)."""
    conn, _ = listener.accept()
    try:
        with ctx.wrap_socket(conn, server_side=True) as tls:
            result.append(peer_spiffe_id(tls))
            tls.sendall(tls.recv(5))
    except (ssl.SSLError, OSError) as e:
        result.append(e)


async def _client(port: int, ctx: ssl.SSLContext) -> str | BaseException:
    """Asyncio client side (exercises the ``SSLObject`` path of the contexts)."""
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx)
    except (ssl.SSLError, ConnectionError) as e:
        return e
    view: str | BaseException = peer_spiffe_id(writer.get_extra_info("ssl_object"))
    writer.write(b"hello")
    # In TLS 1.3 the client finishes its handshake before the server has checked the client
    # certificate: a refusal shows up as a closed connection on the first read.
    try:
        if await reader.read(5) != b"hello":
            view = ConnectionResetError("the server closed the connection")
    except (ssl.SSLError, ConnectionError) as e:
        view = e
    writer.close()
    return view


def handshake(
    client_ctx: ssl.SSLContext,
    server_ctx: ssl.SSLContext,
    run: Callable[[Coroutine[Any, Any, str | BaseException]], str | BaseException] = asyncio.run,
) -> tuple[str | BaseException, str | BaseException]:
    """Connect over loopback; each side's view of the peer's SPIFFE ID, or its error.
    ``run`` picks the event loop (the agent runs on uvloop)."""
    result: list[str | BaseException] = []
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(10)
        server = threading.Thread(target=_serve_once, args=(listener, server_ctx, result))
        server.start()
        try:
            client_view = run(_client(listener.getsockname()[1], client_ctx))
        finally:
            server.join(10)
    return client_view, result[0]
