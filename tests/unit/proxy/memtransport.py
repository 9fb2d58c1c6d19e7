"""An in-memory transport for HBONE protocols in unit tests: writes reach the peer protocol on
the next loop turn, closing one end closes the other."""

from __future__ import annotations

import asyncio
from typing import Any


class MemoryTransport(asyncio.Transport):
    """Delivers writes to the peer protocol on the next loop turn."""

    def __init__(self, peer: asyncio.Protocol) -> None:
        super().__init__()
        self.peer = peer
        self.closing = False
        self.other: MemoryTransport | None = None

    def write(self, data: Any) -> None:
        if not self.closing:
            asyncio.get_running_loop().call_soon(self.peer.data_received, bytes(data))

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        if not self.closing:
            self.closing = True
            self.peer.connection_lost(None)
            if self.other is not None:
                self.other.close()

    def abort(self) -> None:
        self.close()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def get_write_buffer_size(self) -> int:
        return 0  # every write is handed on at once

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass
