"""One empty context per thread, for callbacks that wait as long as a connection lives.

Why: ``Future.add_done_callback`` copies the caller's context unless it is given one. For a
callback that waits for a connection's end (the relay's clean-up, the accept loop forgetting the
connection) that copy lives as long as the connection: 64 bytes, plus whatever context variables
the caller had set, which the copy keeps alive (the handler task's registry record, say). A
callback that neither reads nor sets a context variable does not need the copy, so such
callbacks share one empty context. One per thread, because a context cannot be entered twice at
once: a thread's event loop runs one callback at a time, but loops on other threads (tests,
tools) run theirs concurrently. A callback run in it must not set a context variable, or the
next one would see it.
"""

from __future__ import annotations

import contextvars
import threading


class _PerThread(threading.local):
    def __init__(self) -> None:
        self.context = contextvars.Context()


_PER_THREAD = _PerThread()


def quiet_context() -> contextvars.Context:
    """This thread's shared empty context (see the module docstring), for
    ``add_done_callback(..., context=quiet_context())``."""
    return _PER_THREAD.context
