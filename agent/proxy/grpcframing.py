"""Where a gRPC stream's bytes stand in its length-prefixed messages (sans-IO).

gRPC frames every message as a 5-byte prefix (a compressed flag and a 4-byte big-endian
length) and the message; HTTP/2 DATA frames cut that stream of bytes anywhere. A proxy that
must end a call it already began to answer (the source's request timeout, after the response
head) can end it the gRPC way, trailers with ``grpc-status``, only if what the client read so far
ends on a whole message: trailers after half a message make grpcio fail the call as malformed.
``MessageEnds`` follows the prefixes of the bytes fed to it, without keeping any message.
"""

from __future__ import annotations

PREFIX = 5  # flag byte and 4-byte length


class MessageEnds:
    """Fed a stream's DATA in order; ``whole``: the bytes so far end on a message boundary."""

    __slots__ = ("_left", "_prefix")

    def __init__(self) -> None:
        self._prefix = b""  # an incomplete prefix
        self._left = 0  # bytes of the current message still to come

    def feed(self, data: bytes) -> None:
        i, n = 0, len(data)
        while i < n:
            if self._left:
                taken = min(self._left, n - i)
                self._left -= taken
                i += taken
                continue
            need = PREFIX - len(self._prefix)
            self._prefix += data[i : i + need]
            i += need
            if len(self._prefix) == PREFIX:
                self._left = int.from_bytes(self._prefix[1:])
                self._prefix = b""

    @property
    def whole(self) -> bool:
        return not self._left and not self._prefix
