"""What stands between a message's arrival at a proxy callback and its write on, in Python calls.

    sudo .venv/bin/python -m tests.bench.proxy.bench_http_hops pod|svc|l4 [--requests 500]

The loopback mesh of ``bench_http_cpu`` (both proxies in one process, request telemetry wired
as the agent wires it, the access log to /dev/null), one keep-alive client sending one request
at a time (after a warm-up connection, which stays open: the HBONE connection then carries two
streams, as a node pair with more than one client connection does). ``sys.setprofile`` counts
the Python calls and built-ins made in each callback of the proxies that handles a message —
from its entry to the write that sends the message on (``socket.send``/``sendto``, or the TLS
record's ``SSLObject.write``) and after that write — per kind of callback:

  - ``dest: pod response -> TLS``: the destination's ``PodShell._readable`` (a pod's response);
  - ``source: client request -> TLS``: the source's ``_ClientConnection._readable``;
  - ``HBONE in -> socket``: ``HboneProtocol.data_received``, named by the shell whose write
    ends it: ``dest: request to pod`` (``http_inbound``), ``source: response to client``
    (``http_outbound``); the L4 relay's own write keeps the plain name;
  - ``deferred flush``: ``HboneProtocol._scheduled_flush``, the TLS write a callback left for
    the end of the loop's pass.

A callback with no such write is listed as such: its message left in a later callback. Calls
ahead of a write are time the message waits on a free core; calls after it overlap with the
next hops. Counts, not times: the load does not move them.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from types import FrameType
from typing import Any

import uvloop

from tests.bench.proxy import bench_http_cpu as harness
from tests.integration.proxy.mesh import CLIENT, SERVER, Mesh, free_port

STARTS = {  # (module, qualified name) of a callback -> what it handles
    ("agent.proxy.http_inbound", "PodShell._readable"): "dest: pod response -> TLS",
    ("agent.proxy.tunnel", "HboneProtocol.data_received"): "HBONE in -> socket",
    ("agent.proxy.http_outbound", "_ClientConnection._readable"): "source: client request -> TLS",
    ("agent.proxy.tunnel", "HboneProtocol._scheduled_flush"): "deferred flush",
}

HBONE_IN = "HBONE in -> socket"
SHELLS = {  # the shell whose write ends an ``HBONE in`` callback -> what it sent on
    "agent.proxy.http_inbound": "HBONE in -> socket (dest: request to pod)",
    "agent.proxy.http_outbound": "HBONE in -> socket (source: response to client)",
}


class Counter:
    """The ``sys.setprofile`` hook: per callback kind, calls before and after its first write."""

    def __init__(self) -> None:
        self.before: dict[str, list[int]] = {}
        self.after: dict[str, list[int]] = {}
        self.hop: str | None = None
        self.top: FrameType | None = None
        self.calls = self.later = 0
        self.written = False

    def _wrote(self, frame: FrameType) -> None:
        assert self.hop is not None
        if self.hop == HBONE_IN:  # which proxy's shell writes it says which message it is
            shell: FrameType | None = frame
            while shell is not None and shell.f_globals.get("__name__") not in SHELLS:
                shell = shell.f_back
            if shell is not None:
                self.hop = SHELLS[shell.f_globals["__name__"]]
        self.before.setdefault(self.hop, []).append(self.calls)
        self.written = True

    def __call__(self, frame: FrameType, event: str, arg: Any) -> None:
        if event == "call":
            if self.hop is None:
                key = (frame.f_globals.get("__name__"), frame.f_code.co_qualname)
                if key in STARTS:
                    self.hop, self.top, self.calls, self.later = STARTS[key], frame, 0, 0
                    self.written = False
                return
            if not self.written and frame.f_code.co_qualname == "SSLObject.write":
                self._wrote(frame)
                return
        elif event == "c_call" and self.hop is not None and not self.written:
            owner = type(getattr(arg, "__self__", None)).__name__
            if getattr(arg, "__name__", "") in ("send", "sendto") and owner == "socket":
                self._wrote(frame)
                return
        elif event == "return" and frame is self.top and self.hop is not None:
            if self.written:
                self.after.setdefault(self.hop, []).append(self.later)
            else:
                self.before.setdefault(self.hop + " (no write in it)", []).append(self.calls)
            self.hop = self.top = None
            return
        if self.hop is not None and event in ("call", "c_call"):
            if self.written:
                self.later += 1
            else:
                self.calls += 1


async def run(path: str, n: int, counter: Counter) -> None:
    loop = asyncio.get_running_loop()
    mesh = Mesh()
    await mesh.start()
    try:
        harness.telemetry(mesh)
        port = free_port(SERVER)
        dst = harness._declare(mesh, path, port)
        server = await loop.create_server(harness.App, SERVER, port)

        async def connection(requests: int) -> None:
            host, p = await harness._captured(mesh, dst)
            done: asyncio.Future[None] = loop.create_future()
            made = harness._made(harness.Client(requests, done))
            await loop.create_connection(made, host, p, local_addr=(CLIENT, 0))
            await asyncio.wait_for(done, 60)

        await connection(50)  # warm-up: sessions, caches, label series
        sys.setprofile(counter)
        try:
            await connection(n)
        finally:
            sys.setprofile(None)
        server.close()
    finally:
        await mesh.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", choices=["svc", "pod", "l4"])
    parser.add_argument("--requests", type=int, default=500)
    args = parser.parse_args()
    if os.geteuid() != 0:
        parser.error("the mesh's sockets need root (SO_MARK, IP_TRANSPARENT): run with sudo")
    with open(os.devnull, "w") as sink:
        logging.basicConfig(
            level=logging.INFO,
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
            stream=sink,
        )
        counter = Counter()
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(run(args.path, args.requests, counter))
    print(f"{args.path}: Python calls per callback, ahead of its write / after it")
    for hop in sorted(set(counter.before) | set(counter.after)):
        ahead, behind = counter.before.get(hop, []), counter.after.get(hop, [])
        mean_ahead = sum(ahead) / len(ahead) if ahead else 0.0
        mean_behind = f"{sum(behind) / len(behind):7.1f}" if behind else "      -"
        print(f"  {hop:48} x{len(ahead) / args.requests:4.1f}  {mean_ahead:7.1f} / {mean_behind}")


if __name__ == "__main__":
    main()
