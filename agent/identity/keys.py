"""The agent's side of the key child (``agent.identity.keysmith``): new keys and CSRs.

Why a child: generating a key and signing a CSR are the only things the agent needs
``cryptography`` for, and importing it costs about 12 MiB of RSS that every long-running agent
process would carry for a few requests a day per identity. Why not the netlink helper, which is
persistent already: it holds pyroute2 (about 33 MiB with Python), and both libraries in one
process would exceed the 40 MiB each agent process is allowed.

Why a child per burst rather than per key or for the agent's life: one that stays costs its
27 MiB all the time, one per key costs about 70 ms of CPU each (an interpreter importing
``cryptography``), which a start-up with fifty identities would pay fifty times. So the child
starts with the first request and exits once no request has come for ``linger`` seconds; a
burst of requests (start-up, a new node's pods) shares one child, and an idle agent has none.

The key comes back as PKCS#8 DER over a ``socketpair`` (the child's stdin and stdout): never a
file, never a log line. Requests are serialized (a key takes about a millisecond). A child
that does not answer within ``timeout`` is killed; every failure is a ``KeyChildError`` and the
next request starts a new child, and so does a request cancelled while waiting for its answer
(that answer must never be taken for the next request's).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import socket
import sys
from collections.abc import Coroutine, Sequence

from agent.identity.certs import CertificateError, PrivateKey
from agent.identity.spiffe import SpiffeId

log = logging.getLogger(__name__)

CHILD_MODULE = "agent.identity.keysmith"


class KeyChildError(RuntimeError):
    """No key could be had from the key child; the next request starts a new one."""


class KeyChild:
    """``await new_key(identity)``: a fresh private key and a PEM CSR naming ``identity``."""

    def __init__(
        self,
        *,
        linger: float = 5.0,
        timeout: float = 10.0,
        argv: Sequence[str] = (sys.executable, "-m", CHILD_MODULE),
    ) -> None:
        self._argv = tuple(argv)
        self._linger = linger
        self._timeout = timeout
        self._lock = asyncio.Lock()
        self._proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._idle: asyncio.TimerHandle | None = None
        self._stopping: set[asyncio.Task[None]] = set()

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    async def new_key(self, identity: SpiffeId) -> tuple[PrivateKey, str]:
        async with self._lock:
            if self._idle is not None:
                self._idle.cancel()
                self._idle = None
            reply = await self._ask_retrying(identity)
            self._idle = asyncio.get_running_loop().call_later(self._linger, self._retire)
        if "error" in reply:
            raise KeyChildError(f"the key child refused a key for {identity}: {reply['error']}")
        try:
            key = PrivateKey(base64.b64decode(str(reply["key"]), validate=True))
            csr = str(reply["csr"])
        except (KeyError, binascii.Error, CertificateError) as e:
            # the message names the error's type only: the reply may hold key material
            raise KeyChildError(
                f"the key child answered without a usable key ({type(e).__name__})"
            ) from e
        return key, csr

    async def _ask_retrying(self, identity: SpiffeId) -> dict[str, object]:
        """Ask; a child that had been running and fails (it died while idle) is replaced and
        asked once more, a child started for this request is not."""
        while True:
            proc = self._proc
            fresh = self._writer is None or proc is None or proc.returncode is not None
            try:
                return await self._ask(identity)
            except asyncio.CancelledError:
                self._abandon()  # its answer must not be read as the next request's
                raise
            except (OSError, TimeoutError, ValueError) as e:
                await self._stop(kill=True)
                if fresh or isinstance(e, TimeoutError):
                    raise KeyChildError(
                        f"the key child ({self._argv[-1]}) failed to make a key for {identity}: "
                        f"{type(e).__name__}: {e}; its stderr is in the agent's log"
                    ) from e
                log.info("identity: the key child had ended (%s); starting a new one", e)

    async def _ask(self, identity: SpiffeId) -> dict[str, object]:
        reader, writer = await self._running()
        writer.write(json.dumps({"identity": str(identity)}).encode() + b"\n")
        try:
            async with asyncio.timeout(self._timeout):
                await writer.drain()
                line = await reader.readline()
        except TimeoutError as e:
            raise TimeoutError(f"no answer within {self._timeout:g}s") from e
        if not line.endswith(b"\n"):
            raise ConnectionError("it closed the socketpair")
        reply = json.loads(line)
        if not isinstance(reply, dict):
            raise ValueError("it answered something other than a JSON object")
        return reply

    async def _running(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        proc = self._proc
        if self._reader is not None and self._writer is not None and proc is not None:
            if proc.returncode is None:
                return self._reader, self._writer
            await self._stop(kill=False)  # it died while idle: reap it, start another
        mine, theirs = socket.socketpair()
        try:
            self._proc = await asyncio.create_subprocess_exec(
                *self._argv, stdin=theirs.fileno(), stdout=theirs.fileno()
            )
        except BaseException:
            mine.close()
            raise
        finally:
            theirs.close()
        self._reader, self._writer = await asyncio.open_unix_connection(sock=mine)
        log.debug("identity: key child started (pid %d)", self._proc.pid)
        return self._reader, self._writer

    def _abandon(self) -> None:
        """Kill the child now, without waiting (a request was cut); it is reaped later."""
        proc, writer = self._proc, self._writer
        self._proc = self._reader = self._writer = None
        if writer is not None:
            writer.close()
        if proc is not None:
            if proc.returncode is None:
                proc.kill()
            self._background(self._reap(proc))

    @staticmethod
    async def _reap(proc: asyncio.subprocess.Process) -> None:
        await proc.wait()

    def _background(self, coro: Coroutine[None, None, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._stopping.add(task)
        task.add_done_callback(self._stopping.discard)

    def _retire(self) -> None:
        """No request for ``linger`` seconds: let the child go (it exits at end of input)."""
        self._idle = None
        self._background(self._retire_now())

    async def _retire_now(self) -> None:
        async with self._lock:
            await self._stop(kill=False)

    async def _stop(self, *, kill: bool) -> None:
        proc, writer = self._proc, self._writer
        self._proc = self._reader = self._writer = None
        if writer is not None:
            writer.close()
        if proc is None:
            return
        if kill and proc.returncode is None:
            proc.kill()
        try:
            async with asyncio.timeout(self._timeout):
                await proc.wait()
        except TimeoutError:
            proc.kill()
            await proc.wait()

    async def close(self) -> None:
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None
        async with self._lock:
            await self._stop(kill=False)
