"""A loopback HTTP server that answers slowly, for the tests of the clients that bound a whole
answer by a deadline (the view's GETs, the admin CLI's requests)."""

from __future__ import annotations

import contextlib
import socket
import threading
import time


class Trickler:
    """A loopback server that sends ``head`` then ``body`` a byte at a time, ``pause`` apart,
    and records whether the client went away before it finished."""

    def __init__(self, head: bytes, body: bytes, pause: float, path: str = "/metrics") -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.url = f"http://{self.address}{path}"
        self.data, self.pause = head + body, pause
        self.sent = 0
        self.client_left = threading.Event()
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self) -> None:
        conn, _ = self.listener.accept()
        with conn:
            conn.recv(65536)  # the request
            for i in range(len(self.data)):
                try:
                    conn.sendall(self.data[i : i + 1])
                except OSError:
                    self.client_left.set()
                    return
                self.sent += 1
                time.sleep(self.pause)
            # All sent: whether the client left shows as end of stream.
            conn.settimeout(30)
            with contextlib.suppress(OSError):
                if conn.recv(1) == b"":
                    self.client_left.set()

    def close(self) -> None:
        self.listener.close()
        self.thread.join(60)
