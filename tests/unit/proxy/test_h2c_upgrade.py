"""An ``Upgrade: h2c`` is never proposed to the pod (h2c smuggling).

After a ``101`` the destination relays the connection as opaque bytes, which is right for a
WebSocket and wrong for h2c: the pod would then serve HTTP/2 requests on it that no policy saw
(a client allowed ``/public`` upgrades there and asks for ``/admin``). Envoy strips an h2c
upgrade and serves the request as HTTP/1.1; so does the destination here. A WebSocket upgrade
is still proposed (``test_http_inbound``)."""

from __future__ import annotations

import asyncio

import pytest

from agent.state import PolicyObject
from tests.unit.proxy.test_http_inbound import _core, _read_until, _run, _session

ALLOW_PUBLIC = PolicyObject(
    "AuthorizationPolicy",
    "default",
    "public",
    {"rules": [{"to": [{"operation": {"paths": ["/public*"]}}]}]},
)


@pytest.mark.parametrize(
    ("upgrade", "proposed"),
    [
        (b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMA\r\n", None),
        (b"Connection: upgrade\r\nUpgrade: H2C\r\nHTTP2-Settings: AAMAAABk\r\n", None),
        # offered beside another protocol: only h2c is taken out, as Envoy does
        (b"Connection: upgrade\r\nUpgrade: foo, h2c\r\n", b"upgrade: foo"),
        (b"Connection: upgrade\r\nUpgrade: websocket\r\nUpgrade: h2c\r\n", b"upgrade: websocket"),
    ],
)  # fmt: skip
def test_an_h2c_upgrade_is_never_proposed_to_the_pod(
    upgrade: bytes, proposed: bytes | None
) -> None:
    async def main() -> None:
        client, pod, task, seen = await _session(_core(ALLOW_PUBLIC))
        loop = asyncio.get_running_loop()
        await loop.sock_sendall(client, b"GET /public HTTP/1.1\r\nHost: s\r\n" + upgrade + b"\r\n")
        head = (await _read_until(pod, lambda d: d.endswith(b"\r\n\r\n"))).lower()
        assert b"h2c" not in head and b"http2-settings" not in head
        if proposed is None:  # nothing else offered: a plain request
            assert b"upgrade" not in head
        else:
            assert proposed in head.split(b"\r\n")
        await loop.sock_sendall(pod, b"HTTP/1.1 204 No Content\r\n\r\n")
        assert (await _read_until(client, lambda d: d.endswith(b"\r\n\r\n"))).startswith(
            b"HTTP/1.1 204"
        )
        # The pod declined (204): the connection still speaks HTTP/1.1, the next request is
        # authorized, and refused.
        await loop.sock_sendall(client, b"GET /admin HTTP/1.1\r\nHost: s\r\n\r\n")
        denied = await _read_until(client, lambda d: d.endswith(b"RBAC: access denied"))
        assert denied.startswith(b"HTTP/1.1 403")
        task.cancel()
        for s in (client, pod, *seen.sockets):
            s.close()

    _run(main)
