"""Where the view's samples come from: a Prometheus server, or the agents' own ``/metrics``.

The thin I/O shell around ``agent.view.series``: HTTP GETs, each optionally made from inside a
network namespace (the lab's Prometheus and agents are only reachable from the lab's
namespaces). Two sources with one method, ``window(seconds)``:

* ``PrometheusSource`` asks ``/api/v1/query`` for each family's samples over the window (one
  query per family, evaluated at one instant), so the window is the past ``seconds``.
* ``AgentSource`` scrapes every agent, and the window is the time until its next scrape: the
  first call waits ``seconds`` between two scrapes; ``top`` calls it again and again, each call
  measuring from the previous scrape. An agent that does not answer fails the view with its
  address (a partial sum would be silently wrong).
"""

from __future__ import annotations

import functools
import http.client
import json
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from agent.base.deadline import AnswerDeadline
from agent.view import promql
from agent.view.aggregate import TCP_FAMILIES
from agent.view.series import (
    Series,
    ViewError,
    Window,
    from_exposition,
    from_prometheus_matrix,
    merge_scrapes,
)

# Seconds each socket operation (connect, one read) may wait.
TIMEOUT = 10.0
# Seconds the whole answer may take, from the connect to its last byte (headers, body, an
# error's text). ``TIMEOUT`` alone bounds each read, not their number: an endpoint that
# trickled its answer a byte every few seconds held the view for ever. Past it the view fails
# naming the URL, as it does past ``MAX_ANSWER_BYTES``.
ANSWER_DEADLINE = 15.0
# The largest answer read (an agent's ``/metrics``, a Prometheus query): one endpoint that
# answered without end (a wrong URL on a streaming server, a broken agent) once grew the
# view's memory without bound. A larger answer fails the view, naming the URL.
MAX_ANSWER_BYTES = 64 << 20
# Runs ``func`` where the address is reachable: directly, or inside a lab namespace.
Runner = Callable[[Callable[[], bytes]], bytes]


def direct(func: Callable[[], bytes]) -> bytes:
    return func()


def _watched(cls: Any, deadline: AnswerDeadline, *args: Any, **kwargs: Any) -> Any:
    """An ``http.client`` connection of ``cls`` whose sockets ``deadline`` watches from the
    moment they connect (before a TLS handshake on them)."""
    connection = cls(*args, **kwargs)
    create = connection._create_connection

    def create_watched(*a: Any, **kw: Any) -> socket.socket:
        sock: socket.socket = create(*a, **kw)
        deadline.watch(sock)
        return sock

    connection._create_connection = create_watched
    return connection


class _HTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, deadline: AnswerDeadline) -> None:
        super().__init__()
        self.deadline = deadline

    def http_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        factory = functools.partial(_watched, http.client.HTTPConnection, self.deadline)
        return self.do_open(factory, req)


class _HTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, deadline: AnswerDeadline) -> None:
        super().__init__()
        self.deadline = deadline

    def https_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        factory = functools.partial(_watched, http.client.HTTPSConnection, self.deadline)
        return self.do_open(factory, req, context=self._context)  # type: ignore[attr-defined]


def _open(url: str, watch: AnswerDeadline) -> Any:
    """The response to GET ``url``, its sockets watched by ``watch``."""
    opener = urllib.request.build_opener(_HTTPHandler(watch), _HTTPSHandler(watch))
    return opener.open(url, timeout=TIMEOUT)


def _get(url: str, deadline: float) -> bytes:
    """The answer to GET ``url`` read within ``deadline`` seconds; ``ViewError`` otherwise."""
    watch = AnswerDeadline(deadline)
    try:
        try:
            with _open(url, watch) as response:
                body = read_bounded(url, response)
        except urllib.error.HTTPError as e:
            detail = e.read(300).decode("utf-8", "replace")
            e.close()
            raise ViewError(f"GET {url}: HTTP {e.code}: {detail}") from e
    except (OSError, http.client.HTTPException, ViewError) as e:
        if watch.finish():
            raise _past_deadline(url, deadline) from e
        raise
    finally:
        passed = watch.finish()
    if passed:
        # Shut down after the last byte came: what was read may be short, so it is not used.
        raise _past_deadline(url, deadline)
    return body


def _past_deadline(url: str, deadline: float) -> ViewError:
    return ViewError(
        f"GET {url}: no whole answer within {deadline:g} s (each read came within "
        f"{TIMEOUT:g} s, but the answer kept trickling); is the agent or server overloaded, "
        "or is this an agent's /metrics or a Prometheus server?"
    )


def http_get(url: str, runner: Runner = direct, deadline: float | None = None) -> bytes:
    """GET ``url`` (from where ``runner`` runs it): at most ``MAX_ANSWER_BYTES``, within
    ``deadline`` seconds (by default ``ANSWER_DEADLINE``) from the connect to the last byte."""
    seconds = ANSWER_DEADLINE if deadline is None else deadline
    try:
        return runner(lambda: _get(url, seconds))
    except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
        raise ViewError(f"GET {url} failed: {_why(e)}") from e


def _why(error: Exception) -> str:
    """What went wrong as a reader says it ("connection refused", "timed out"), not urllib's
    wrapping of it ("<urlopen error [Errno 111] Connection refused>")."""
    reason = error.reason if isinstance(error, urllib.error.URLError) else error
    if isinstance(reason, OSError) and reason.strerror:
        return reason.strerror[:1].lower() + reason.strerror[1:]
    return str(reason) or type(reason).__name__


def read_bounded(url: str, response: Any, limit: int | None = None) -> bytes:
    """The whole answer, or ``ViewError`` once more than ``limit`` bytes came (by default
    ``MAX_ANSWER_BYTES``)."""
    limit = MAX_ANSWER_BYTES if limit is None else limit
    body: bytes = response.read(limit + 1)
    if len(body) > limit:
        raise ViewError(
            f"GET {url}: the answer is larger than {limit >> 20} MiB; is this an agent's "
            "/metrics or a Prometheus server?"
        )
    return body


class Source(Protocol):
    def window(self, seconds: float, families: Sequence[str] = TCP_FAMILIES) -> Window: ...

    def describe(self) -> str: ...


@dataclass
class PrometheusSource:
    url: str
    runner: Runner = direct
    clock: Callable[[], float] = time.time

    def describe(self) -> str:
        return f"Prometheus {self.url}"

    def query(self, expr: str, at: float) -> dict[str, Any]:
        params = urllib.parse.urlencode({"query": expr, "time": f"{at:.3f}"})
        body = http_get(f"{self.url.rstrip('/')}/api/v1/query?{params}", self.runner)
        try:
            answer: dict[str, Any] = json.loads(body)
        except json.JSONDecodeError as e:
            raise ViewError(f"{self.url} answered something that is not JSON: {e}") from e
        return answer

    def window(self, seconds: float, families: Sequence[str] = TCP_FAMILIES) -> Window:
        """The past ``seconds`` of ``families`` (full sample names, e.g. ``..._bucket``)."""
        end = self.clock()
        found: dict[str, tuple[Series, ...]] = {}
        for name in families:
            answer = self.query(promql.window_samples(name, seconds), end)
            found[name] = tuple(from_prometheus_matrix(answer))
        return Window(end - seconds, end, found)


@dataclass
class Agent:
    """One agent's metrics endpoint, and how to reach it."""

    url: str
    runner: Runner = direct


@dataclass
class AgentSource:
    agents: Sequence[Agent]
    clock: Callable[[], float] = time.time
    sleep: Callable[[float], None] = time.sleep
    _last: tuple[float, dict[str, list[Series]]] | None = None

    def describe(self) -> str:
        return "agents " + ", ".join(a.url for a in self.agents)

    def scrape(
        self, families: Sequence[str] = TCP_FAMILIES
    ) -> tuple[float, dict[str, list[Series]]]:
        at = self.clock()
        merged: dict[str, list[Series]] = {name: [] for name in families}
        for agent in self.agents:
            try:
                text = http_get(agent.url, agent.runner).decode("utf-8", "replace")
            except ViewError as e:
                raise ViewError(
                    f"{e}. The agents' metrics listen on each node's :15020: pass every "
                    "agent with --agent URL, or read a Prometheus that scrapes them "
                    "(--prometheus URL; in the lab --lab NAME)"
                ) from e
            for name, series in from_exposition(text, families, at, instance=agent.url).items():
                merged[name].extend(series)
        return at, merged

    def window(self, seconds: float, families: Sequence[str] = TCP_FAMILIES) -> Window:
        if self._last is None:
            self._last = self.scrape(families)
            self.sleep(seconds)
        start, first = self._last
        end, second = self.scrape(families)
        self._last = (end, second)
        return Window(start, end, merge_scrapes(first, second))
