"""A stock ``h2`` client against the HBONE port: its header blocks are Huffman-coded and, from
the second request on, refer to its dynamic table; the proxy decodes them with its own decoder
and answers with its own encoder (``agent.proxy.hbone``), and the client decodes the answers."""

from __future__ import annotations

import asyncio

import h2.events

from tests.integration.proxy.mesh import SERVER, Mesh, mesh_test
from tests.integration.proxy.test_hbone_bad_input import h2_session, status_of


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(await reader.read(100))
    await writer.drain()
    writer.close()


@mesh_test
async def test_a_stock_h2_client_opens_several_tunnels_on_one_connection(mesh: Mesh) -> None:
    port = mesh.app(SERVER, _echo)
    conn, h2c = await h2_session(mesh)
    reader, writer = conn
    sizes = []
    for sid in (1, 3, 5):
        headers = [
            (":method", "CONNECT"),
            (":authority", f"{SERVER}:{port}"),
            ("nodemesh-service", "default/server"),
            ("x-trace", f"request {sid}"),
        ]
        writer.write(h2c.data_to_send())  # so that the block alone is measured next
        h2c.send_headers(sid, headers)
        pending = h2c.data_to_send()
        sizes.append(len(pending))
        writer.write(pending)
        assert await status_of(conn, h2c, sid) == 200
        h2c.send_data(sid, f"hello {sid}".encode(), end_stream=True)
        writer.write(h2c.data_to_send())
        data = b""
        ended = False
        while not ended:
            chunk = await asyncio.wait_for(reader.read(65536), 10)
            assert chunk, "the proxy closed the connection"
            for event in h2c.receive_data(chunk):
                if isinstance(event, h2.events.DataReceived) and event.stream_id == sid:
                    data += event.data
                    h2c.acknowledge_received_data(event.flow_controlled_length, sid)
                ended |= isinstance(event, h2.events.StreamEnded) and event.stream_id == sid
            writer.write(h2c.data_to_send())
        assert data == f"hello {sid}".encode()
    assert sizes[1] < sizes[0]  # the later blocks used the client's dynamic table
    assert mesh.node2.core.registry.total == 3
    writer.close()
