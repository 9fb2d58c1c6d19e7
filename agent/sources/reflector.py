"""List, then watch from the list's resourceVersion, for one resource; relist on 410 Gone.

This is the loop every Kubernetes controller runs (client-go's reflector, kopf's watcher), kept
free of the ``kubernetes`` package so it can be tested against any lister:

1. ``list`` (in pages of ``page_size``) gives every object and the resourceVersion R of that
   moment; the handler *replaces* its whole kind with it, so objects deleted while we were away
   disappear and nothing is duplicated;
2. ``watch`` from R streams ADDED/MODIFIED/DELETED events (and BOOKMARKs that only advance R);
   each event moves R forward, so a watch that ends (server timeout, connection cut, API server
   restart) resumes from R without a relist;
3. a ``410 Gone`` (R was compacted away) forces step 1 again; any other failure waits with
   exponential backoff and full jitter (so a thousand agents do not reconnect in lock-step) and
   resumes the watch from R.

An *optional* resource (the Gateway API routes, whose CRDs users install themselves) that
answers 404 counts as absent, not failing: the handler gets an empty list (so routes of a CRD
that was removed disappear), the reflector reports itself synced and ``absent``, logs that once,
and looks again every ``absent_recheck`` seconds, so installing the CRDs later needs no restart.

The infinite retry wrapper (``run``) is kept trivial; ``sync`` and ``watch_once`` do the work and
are what the tests drive.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Protocol

from agent.sources.contents import Contents

log = logging.getLogger(__name__)

Raw = Mapping[str, Any]


class StreamResponse(Protocol):
    """What a lister returns: an un-preloaded urllib3 response."""

    data: bytes

    def stream(
        self, amt: int | None = ..., decode_content: bool | None = ...
    ) -> Iterator[bytes]: ...

    def close(self) -> None: ...


Lister = Callable[..., StreamResponse]


class Gone(Exception):
    """The requested resourceVersion is too old (HTTP 410): relist."""


class ApiStatusError(Exception):
    """The API server answered with an error status; ``status`` is its HTTP code."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"{status} {reason}")
        self.status = status
        self.reason = reason


class Handler(Protocol):
    def replace(self, items: list[Raw]) -> None: ...

    def event(self, kind: str, obj: Raw) -> None: ...


class Backoff:
    """Exponential backoff with full jitter: ``random(0, min(cap, base * 2**n))``."""

    def __init__(self, base: float = 0.2, cap: float = 10.0) -> None:
        self.base, self.cap, self.failures = base, cap, 0

    def next_delay(self) -> float:
        delay = random.uniform(0, min(self.cap, self.base * 2**self.failures))
        self.failures += 1
        return delay

    def reset(self) -> None:
        self.failures = 0


class Reflector:
    """Keeps one handler in step with one resource; run ``run()`` in its own thread."""

    def __init__(
        self,
        name: str,
        lister: Lister,
        handler: Handler,
        *,
        field_selector: str | None = None,
        page_size: int = 500,
        watch_timeout: int = 300,
        optional: bool = False,
        absent_recheck: float = 60.0,
        track: tuple[str, str] | None = None,
    ) -> None:
        self.name = name
        self.optional = optional
        self.absent_recheck = absent_recheck
        self.absent: str | None = None  # why an optional resource is not served
        self.lister = lister
        self.handler = handler
        self.field_selector = field_selector
        self.page_size = page_size
        self.watch_timeout = watch_timeout
        self.resource_version: str | None = None
        # what the handler took, compared across agents; ``track``: the (namespace, name) of
        # one object whose uid it keeps (``Contents``)
        self.contents = Contents(track=track)
        self.synced = threading.Event()
        self.stats = {
            "lists": 0,
            "watches": 0,
            "events": 0,
            "gone": 0,
            "errors": 0,
            "handler_errors": 0,
        }
        self._stop = threading.Event()
        self._response: StreamResponse | None = None
        self._backoff = Backoff()

    def _selector(self) -> dict[str, Any]:
        return {"field_selector": self.field_selector} if self.field_selector else {}

    def sync(self) -> None:
        """List every object (page by page) and hand them to the handler in one replace."""
        items: list[Raw] = []
        token: str | None = None
        while True:
            extra: dict[str, Any] = {"_continue": token} if token else {}
            resp = self.lister(limit=self.page_size, **self._selector(), **extra)
            page = json.loads(resp.data)
            items.extend(page.get("items") or ())
            token = page["metadata"].get("continue")
            if not token:
                break
        self.handler.replace(items)
        self.contents.replace(items)
        self.resource_version = page["metadata"]["resourceVersion"]
        self.stats["lists"] += 1
        if self.absent is not None:
            log.info("%s: now served by the API server; following it", self.name)
            self.absent = None
        self.synced.set()

    def _mark_absent(self, error: ApiStatusError) -> None:
        """An optional resource the API server does not serve: empty, synced, said once."""
        if self.absent is None:
            log.info(
                "%s: not served by the API server (%s); continuing without it, looking again "
                "every %.0f s",
                self.name,
                error,
                self.absent_recheck,
            )
            self.handler.replace([])
            self.contents.replace([])
        self.absent = str(error)
        self.resource_version = None
        self.synced.set()
        self._stop.wait(self.absent_recheck)

    def watch_once(self) -> None:
        """Watch from ``resource_version`` until the stream ends; raises ``Gone`` on 410."""
        resp = self.lister(
            watch=True,
            resource_version=self.resource_version,
            allow_watch_bookmarks=True,
            timeout_seconds=self.watch_timeout,
            **self._selector(),
        )
        self._response = resp
        self.stats["watches"] += 1
        try:
            if self._stop.is_set():  # stop() ran before _response was set: it cut nothing
                return
            for event in _lines(resp):
                self._apply(event)
        finally:
            self._response = None
            resp.close()

    def _apply(self, event: Raw) -> None:
        kind, obj = event["type"], event["object"]
        if kind == "ERROR":
            if obj.get("code") == 410:
                raise Gone(obj.get("message", "resourceVersion too old"))
            raise ApiStatusError(int(obj.get("code") or 500), str(obj.get("message")))
        if kind != "BOOKMARK":
            try:
                self.handler.event(kind, obj)
            except Exception:  # one event a handler cannot take must not stall the watch
                self.stats["handler_errors"] += 1
                log.exception("%s: cannot apply a %s event; skipping it", self.name, kind)
            else:
                self.contents.event(kind, obj)
            self.stats["events"] += 1
        self.resource_version = obj["metadata"]["resourceVersion"]
        self._backoff.reset()

    def run(self) -> None:
        while not self._stop.is_set():
            try:
                if self.resource_version is None:
                    self.sync()
                self.watch_once()
            except Gone as e:
                self.stats["gone"] += 1
                log.info("%s: watch expired (%s); relisting", self.name, e)
                self.resource_version = None
            except Exception as e:  # the loop must survive anything; it logs and backs off
                if self._stop.is_set():
                    break
                if self.optional and isinstance(e, ApiStatusError) and e.status == 404:
                    self._mark_absent(e)
                    continue
                self.stats["errors"] += 1
                delay = self._backoff.next_delay()
                log.warning(
                    "%s: %s: %s; retrying in %.1f s%s",
                    self.name,
                    type(e).__name__,
                    e,
                    delay,
                    _hint(e),
                )
                self._stop.wait(delay)

    def stop(self) -> None:
        """Ask ``run`` to return and cut the open watch so it does not wait for the server."""
        self._stop.set()
        resp = self._response
        shutdown = getattr(resp, "shutdown", None)
        if shutdown is not None:
            # Already closed or released to the pool: nothing left to cut.
            with contextlib.suppress(ValueError, RuntimeError, OSError):
                shutdown()


def _hint(error: Exception) -> str:
    status = getattr(error, "status", None)
    if status == 404:
        return " (is the resource installed? for nodemesh CRDs: kubectl apply -k daemonset/crds)"
    if status in (401, 403):
        return " (check the agent's service account and its ClusterRole: list/watch needed)"
    return ""


def _lines(resp: StreamResponse) -> Iterator[Raw]:
    """JSON objects of a watch stream, one per line, as chunks arrive."""
    buf = b""
    for chunk in resp.stream(None, decode_content=False):
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            if line.strip():
                yield json.loads(line)
    if buf.strip():
        yield json.loads(buf)
