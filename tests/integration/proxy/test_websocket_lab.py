"""A WebSocket through the mesh: the upgrade on a Service port declared HTTP, then frames.

Service ``web`` (VIP port 80, declared HTTP) selects the server pods' port 9080, where each
runs a minimal RFC 6455 echo server (the handshake's ``Sec-WebSocket-Accept``, then every
frame sent back unmasked). The client pod sends the upgrade to the VIP: node1's agent
terminates HTTP, routes the request, and on the ``101`` pins the client connection to that
upstream session and relays opaque bytes; node2's agent parses the upgrade and relays after
it. What must hold: the accept key is the server's answer to this client's key, masked frames
of several sizes (7-bit, 16-bit and 64-bit lengths) come back whole and in order, either side
can close, and both reporters count the upgrade as one request answered 101.
"""

from __future__ import annotations

import sys

import pytest

from tests.integration.proxy.test_http_source_lab import metrics, total, vip
from tests.labtools import mesh_lab, pod_servers, retry

pytestmark = [pytest.mark.root, pytest.mark.lab]

PORT = 9080
GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455, 1.3
FRAMING = """
import base64, hashlib, os, socket, struct

def accept(key):
    return base64.b64encode(hashlib.sha1((key + "@GUID@").encode()).digest()).decode()

def read_exact(sock, n):
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise EOFError
        data += chunk
    return data

def read_frame(sock):
    b0, b1 = read_exact(sock, 2)
    n = b1 & 0x7F
    if n == 126:
        n = struct.unpack("!H", read_exact(sock, 2))[0]
    elif n == 127:
        n = struct.unpack("!Q", read_exact(sock, 8))[0]
    mask = read_exact(sock, 4) if b1 & 0x80 else b""
    data = read_exact(sock, n)
    if mask:
        data = bytes(c ^ mask[i % 4] for i, c in enumerate(data))
    return b0 & 0x0F, data

def frame(opcode, data, masked):
    head = bytes([0x80 | opcode])
    bit = 0x80 if masked else 0
    if len(data) < 126:
        head += bytes([bit | len(data)])
    elif len(data) < 65536:
        head += bytes([bit | 126]) + struct.pack("!H", len(data))
    else:
        head += bytes([bit | 127]) + struct.pack("!Q", len(data))
    if not masked:
        return head + data
    mask = os.urandom(4)
    return head + mask + bytes(c ^ mask[i % 4] for i, c in enumerate(data))

def read_head(sock):
    head = b""
    while not head.endswith(b"\\r\\n\\r\\n"):
        head += read_exact(sock, 1)
    return head.decode("latin-1")
""".replace("@GUID@", GUID)
SERVER = (
    FRAMING
    + f"""
import threading
def serve(conn):
    head = read_head(conn)
    key = next(l.split(":", 1)[1].strip() for l in head.split("\\r\\n")
               if l.lower().startswith("sec-websocket-key:"))
    answer = ("HTTP/1.1 101 Switching Protocols\\r\\nUpgrade: websocket\\r\\n"
              "Connection: Upgrade\\r\\nSec-WebSocket-Accept: " + accept(key) + "\\r\\n\\r\\n")
    conn.sendall(answer.encode())
    while True:
        opcode, data = read_frame(conn)
        conn.sendall(frame(opcode, data, masked=False))
        if opcode == 8:
            conn.close()
            return
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("0.0.0.0", {PORT}))
srv.listen(64)
while True:
    c, _ = srv.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"""
)
# argv: VIP. Prints "accept ok", then one line per echoed frame (its length, or "close").
CLIENT = (
    FRAMING
    + """
import sys
key = base64.b64encode(os.urandom(16)).decode()
sock = socket.create_connection((sys.argv[1], 80), timeout=10)
sock.sendall(("GET /chat HTTP/1.1\\r\\nHost: web\\r\\nUpgrade: websocket\\r\\n"
              "Connection: Upgrade\\r\\nSec-WebSocket-Key: " + key + "\\r\\n"
              "Sec-WebSocket-Version: 13\\r\\n\\r\\n").encode())
head = read_head(sock)
status = head.split("\\r\\n")[0]
got = next((l.split(":", 1)[1].strip() for l in head.split("\\r\\n")
            if l.lower().startswith("sec-websocket-accept:")), "")
verdict = "accept ok" if got == accept(key) else "accept WRONG " + got
print(status.split(" ")[1], verdict, flush=True)
for size in (5, 125, 126, 4000, 70000):
    payload = os.urandom(size)
    sock.sendall(frame(2, payload, masked=True))
    opcode, data = read_frame(sock)
    print(opcode, len(data), "same" if data == payload else "DIFFERENT", flush=True)
sock.sendall(frame(8, b"\\x03\\xe8", masked=True))
opcode, data = read_frame(sock)
print(opcode, "close", flush=True)
print("eof" if sock.recv(1) == b"" else "more", flush=True)
"""
)
SOURCE = {"reporter": "source", "response_code": "101"}
DESTINATION = {"reporter": "destination", "response_code": "101"}


def test_a_websocket_upgrades_through_both_proxies_and_echoes_frames() -> None:
    with mesh_lab("ws") as lab, pod_servers(lab, ("server-0", "server-1"), SERVER, PORT):
        address = vip(lab)

        def talk() -> list[str]:
            out = lab.exec("client", sys.executable, "-c", CLIENT, address, capture_output=True,
                           text=True, timeout=60)  # fmt: skip
            assert out.returncode == 0, out.stderr
            return out.stdout.splitlines()

        before_src = total(metrics(lab, "node1"), **SOURCE)
        before_dst = total(metrics(lab, "node2"), **DESTINATION)
        lines = retry(talk, timeout=40)
        assert lines == [
            "101 accept ok",
            "2 5 same",
            "2 125 same",
            "2 126 same",
            "2 4000 same",
            "2 70000 same",
            "8 close",
            "eof",
        ], lines

        def counted() -> None:
            assert total(metrics(lab, "node1"), **SOURCE) - before_src >= 1
            assert total(metrics(lab, "node2"), **DESTINATION) - before_dst >= 1

        retry(counted, timeout=10)
