"""The echo exchange's client socket on loopback."""

import asyncio
import socket

from bench.programs.exchange import connect_and_echo


def test_a_client_bound_to_a_source_address_takes_its_port_at_connect() -> None:
    """From a given source address the port is left to ``connect`` (IP_BIND_ADDRESS_NO_PORT):
    ``bind`` alone searched past every TIME_WAIT socket on that address, and the in-process
    connection harness, which opens tens of thousands from one address, slowed down and then
    failed with EADDRINUSE."""

    async def main() -> None:
        async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(await reader.read(100))
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(echo, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with server:
            sock = await connect_and_echo(("127.0.0.1", port), b"x" * 10, "127.0.0.1")
            try:
                assert sock.getsockopt(socket.SOL_IP, socket.IP_BIND_ADDRESS_NO_PORT) == 1
                assert sock.getsockname()[0] == "127.0.0.1"
            finally:
                sock.close()

    asyncio.run(main())
