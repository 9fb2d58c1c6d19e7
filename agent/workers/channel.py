"""The asyncio shell around ``agent.workers.wire``: one connected socket, calls both ways.

``call(kind, args)`` sends a ``Call`` and waits for its ``Reply``; incoming calls go to the
``serve`` function given at construction (its result or its exception's text is the reply;
each call runs in its own task, so a long-polling call does not hold up the others), incoming
notes to ``note``. When the socket closes (the other process died or exited), every pending
call fails with ``ChannelClosed`` and ``closed`` is set.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import itertools
import logging
import socket
from collections.abc import Awaitable, Callable

from agent.workers.wire import Call, Decoder, Message, Note, Reply, WireError, encode

log = logging.getLogger(__name__)

Serve = Callable[[str, object], object | Awaitable[object]]
OnNote = Callable[[str, object], None]


class ChannelClosed(ConnectionError):
    """The process at the other end of the worker channel is gone."""


class RemoteError(RuntimeError):
    """The other end answered a call with an error (its text is the message)."""


class Channel:
    def __init__(self, sock: socket.socket, serve: Serve, note: OnNote) -> None:
        self._sock = sock
        self._sock.setblocking(False)
        self._serve = serve
        self._note = note
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[object]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._lock = asyncio.Lock()
        self.closed = asyncio.Event()
        self._reader: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._reader = asyncio.create_task(self._read(), name="worker-channel")

    async def send(self, message: Message) -> None:
        if self.closed.is_set():
            raise ChannelClosed("the worker channel is closed")
        data = encode(message)
        async with self._lock:  # frames must not interleave
            try:
                await asyncio.get_running_loop().sock_sendall(self._sock, data)
            except OSError as e:
                self._close()
                raise ChannelClosed(f"the worker channel broke: {e}") from e

    async def note(self, kind: str, args: object = None) -> None:
        await self.send(Note(kind, args))

    async def call(self, kind: str, args: object = None, timeout: float | None = None) -> object:
        call_id = next(self._ids)
        fut: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        self._pending[call_id] = fut
        try:
            await self.send(Call(call_id, kind, args))
            return await asyncio.wait_for(fut, timeout)
        finally:
            self._pending.pop(call_id, None)

    async def close(self) -> None:
        self._close()
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _close(self) -> None:
        if self.closed.is_set():
            return
        self.closed.set()
        self._sock.close()
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(ChannelClosed("the worker channel closed before the answer"))

    async def _read(self) -> None:
        loop = asyncio.get_running_loop()
        decoder = Decoder()
        try:
            while data := await loop.sock_recv(self._sock, 1 << 16):
                for message in decoder.feed(data):
                    self._dispatch(message)
        except (OSError, WireError) as e:
            log.warning("worker channel failed: %s", e)
        finally:
            self._close()

    def _dispatch(self, message: Message) -> None:
        if isinstance(message, Reply):
            fut = self._pending.get(message.id)
            if fut is not None and not fut.done():
                if message.error is not None:
                    fut.set_exception(RemoteError(message.error))
                else:
                    fut.set_result(message.value)
        elif isinstance(message, Call):
            task = asyncio.create_task(self._answer(message), name=f"worker-call-{message.kind}")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        else:
            try:
                self._note(message.kind, message.args)
            except Exception:
                log.exception("worker channel: handling note %r failed", message.kind)

    async def _answer(self, call: Call) -> None:
        try:
            result = self._serve(call.kind, call.args)
            value = await result if inspect.isawaitable(result) else result
            reply = Reply(call.id, value)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # the caller gets the cause as text, the channel goes on
            reply = Reply(call.id, error=f"{type(e).__name__}: {e}")
        with contextlib.suppress(ChannelClosed):  # the caller is gone: nobody to tell
            await self.send(reply)
