"""The registry of live connections.

Every proxied connection gets a ``ConnectionRecord`` (``agent.telemetry.records``): who talked to
whom (addresses and SPIFFE identities), which way, how many bytes each way, since when, and
whether it was mTLS. Telemetry exports the records (``snapshot()`` returns plain dicts) and the
admin API lists them.

The registry also keeps, for connections authorized at this node, the authorization ``Request``
and a way to close the connection. When the policies change, ``recheck`` evaluates every live
connection again and closes the ones the new policies no longer allow: a DENY policy applied
now takes effect on connections opened before it.

Rejections are counted by reason (``rejections``), and each is logged once, at INFO, with the
reason, so an operator can tell a policy denial from a bad peer from an unreachable pod. A
rejection inside the task that registered a record is also written to that record's ``failure``
(a context variable finds it, so the many ``reject`` call sites need no connection id).

Observers (``agent.telemetry``: metrics and the JSON access log) are told when a record opens and
when it closes; they read the byte counters, which the relay updates while the connection is
open, so a scrape sees bytes of long-lived connections before they end.
"""

from __future__ import annotations

import asyncio
import contextvars
import itertools
import logging
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from agent.policy.authz import Decision, Request
from agent.state.model import Workload
from agent.telemetry.records import (
    ConnectionObserver,
    ConnectionRecord,
    RequestObserver,
    RequestRecord,
)

log = logging.getLogger(__name__)


# The record registered by the task that is running (and its registry), for ``reject``.
_current: contextvars.ContextVar[tuple[Registry, ConnectionRecord]] = contextvars.ContextVar(
    "nodemesh_current_record"
)


@dataclass(slots=True)
class _Live:
    record: ConnectionRecord
    # How ``recheck`` closes it: a callback given the reason, or a future cancelled with the
    # reason as its message (the task serving it, or the relay's ``done`` once one took over).
    close: Callable[[str], object] | asyncio.Future[Any]
    request: Request | None = None
    workload: Workload | None = None
    closing: bool = False
    # How the registering task's context is restored when a relay takes the connection over.
    token: contextvars.Token[tuple[Registry, ConnectionRecord]] | None = None
    # What the agent's drain asks of it beyond the HBONE GOAWAY (``Registry.drain``).
    drain: Callable[[], None] | None = None


def cancel_current_task(
    loop: asyncio.AbstractEventLoop | None = None,
) -> Callable[[str], object] | asyncio.Future[Any]:
    """A ``close`` for ``Registry.add`` that cancels the task serving the connection: the task
    itself (a future, which ``recheck`` cancels with the reason as its message), not a closure
    made per connection around it; outside a task, nothing to cancel. ``loop``: the running
    loop, when the caller has it (``asyncio.current_task()`` without it looks the loop up, a
    ``getpid`` system call on Python 3.11)."""
    task = asyncio.current_task(loop)
    return task if task is not None else _no_task


def _no_task(_reason: str) -> None:
    """``cancel_current_task`` outside a task: nothing serves the connection to cancel."""


class Refused(Exception):
    """A connection was refused (already counted and logged): close the client with RST."""


class Registry:
    """Live connections, rejection counters, and the policy re-check."""

    def __init__(self) -> None:
        self._live: dict[int, _Live] = {}
        self._ids = itertools.count(1)
        self.rejections: Counter[str] = Counter()
        self.denials: Counter[str] = Counter()
        self.rate_limited: Counter[str] = Counter()  # by Service hostname
        self.total = 0
        self.observers: list[ConnectionObserver] = []
        self.request_observers: list[RequestObserver] = []

    def add(
        self,
        record: ConnectionRecord,
        close: Callable[[str], object] | asyncio.Future[Any],
        *,
        request: Request | None = None,
        workload: Workload | None = None,
    ) -> int:
        record.id = next(self._ids)
        token = _current.set((self, record))
        self._live[record.id] = _Live(record, close, request, workload, token=token)
        self.total += 1
        for observer in self.observers:  # ``_notify``, without a closure per connection
            try:
                observer.opened(record)
            except Exception:
                log.exception("connection observer %r failed", observer)
        return record.id

    def _notify(self, call: Callable[[ConnectionObserver], None]) -> None:
        """Tell the observers; a failing observer is logged, never the connection's problem."""
        for observer in self.observers:
            try:
                call(observer)
            except Exception:
                log.exception("connection observer %r failed", observer)

    def _tell(self, call: Callable[[RequestObserver], None]) -> None:
        for observer in self.request_observers:
            try:
                call(observer)
            except Exception:
                log.exception("request observer %r failed", observer)

    def request_done(
        self,
        connection: ConnectionRecord,
        request: RequestRecord,
        *,
        carried_by: ConnectionRecord | None = None,
    ) -> None:
        """One HTTP request served (or refused by policy) on ``connection``; ``carried_by``:
        the live record it is counted on when ``connection`` is a copy labelled for this
        request (the source reports each request pointed at the endpoint that served it), so
        ``nodemesh connections`` shows the client connection's requests."""
        (connection if carried_by is None else carried_by).requests += 1
        for observer in self.request_observers:  # ``_tell``, without a closure per request
            try:
                observer.requested(connection, request)
            except Exception:
                log.exception("request observer %r failed", observer)

    def http_rejected(self, cause: str, detail: str) -> None:
        """The HTTP layer refused bad input (the connection is closed)."""
        log.info("HTTP request rejected (%s): %s", cause, detail)
        self._tell(lambda o: o.rejected(cause))

    def request_denied(self, decision: Decision, detail: str) -> None:
        """Count an L7 denial (``denials``, by policy) and the dry-run policies that would
        have denied; unlike ``deny`` this leaves the connection's record alone: the
        connection keeps serving other requests."""
        if not decision.allowed:
            self.denials[decision.policy or "no-allow-match"] += 1
            log.info("HTTP request denied: %s: %s", detail, decision.reason)
        # The log line names the rule that matched (``would_deny_rules``, parallel to
        # ``would_deny``); the observers' metric keeps the policy alone (a series per policy).
        for policy, rule in zip(decision.would_deny, decision.would_deny_rules, strict=True):
            log.info("HTTP request %s: dry-run policy %s would deny it", detail, rule)
            self._tell(_would_deny(policy))

    def leave_task(self, conn_id: int) -> None:
        """The connection is about to go on without the task that registered it: its record
        stops being the task's current one, so the callbacks that carry it on (which copy the
        context they are made in) do not keep that context alive for the connection's life."""
        live = self._live.get(conn_id)
        if live is not None and live.token is not None:
            try:  # noqa: SIM105 (``contextlib.suppress`` is three calls more per connection)
                _current.reset(live.token)
            except ValueError:  # made in another context: nothing to undo
                pass
            live.token = None

    def hand_over(self, conn_id: int, done: asyncio.Future[None]) -> None:
        """The connection goes on without the task that registered it, in a relay whose
        ``done`` future closing it cancels: the task is not held any longer (and the future
        is kept, not a bound ``done.cancel`` as well, for the connection's life)."""
        live = self._live.get(conn_id)
        if live is not None:
            live.close = done

    def on_drain(self, conn_id: int, drain: Callable[[], None]) -> None:
        """At the agent's drain, ``drain`` is called (an HTTP/2 session's GOAWAY to its client,
        which no HBONE GOAWAY reaches: ``H2Core.drain``)."""
        live = self._live.get(conn_id)
        if live is not None:
            live.drain = drain

    def drain(self) -> int:
        """The agent drains: tell the live connections that asked (``on_drain``); how many."""
        told = 0
        for live in list(self._live.values()):
            if live.drain is not None:
                live.drain()
                told += 1
        return told

    def authorized(self, conn_id: int, request: Request, workload: Workload) -> None:
        """Remember what was authorized, so that ``recheck`` can evaluate it again."""
        live = self._live.get(conn_id)
        if live is not None:
            live.request, live.workload = request, workload

    def remove(self, conn_id: int) -> None:
        live = self._live.pop(conn_id, None)
        if live is not None:
            record = live.record
            for observer in self.observers:  # ``_notify``, without a closure per connection
                try:
                    observer.closed(record)
                except Exception:
                    log.exception("connection observer %r failed", observer)

    def __iter__(self) -> Iterator[ConnectionRecord]:
        return (live.record for live in list(self._live.values()))

    def __len__(self) -> int:
        return len(self._live)

    def snapshot(self) -> list[dict[str, object]]:
        return [r.describe() for r in self]

    def reject(self, reason_key: str, detail: str, *, quiet: bool = False) -> None:
        """Count and log one refused connection or stream; ``quiet``: count it only (a refusal
        like others already logged, e.g. ``conncaps.PeerSlots``)."""
        self.rejections[reason_key] += 1
        if not quiet:
            log.info("rejected (%s): %s", reason_key, detail)
        current = self._task_record()
        if current is not None and not current.failure:
            current.failure = reason_key

    def _task_record(self) -> ConnectionRecord | None:
        """The record of the connection the running task registered here, if any."""
        current = _current.get(None)
        return current[1] if current is not None and current[0] is self else None

    def deny(
        self, decision: Decision, detail: str, *, record: ConnectionRecord | None = None
    ) -> None:
        """Count a policy denial; ``record``: the denied connection, when it was never
        registered (an HBONE stream refused before relaying), is reported opened and closed."""
        self.denials[decision.policy or "no-allow-match"] += 1
        self.reject("policy_denied", f"{detail}: {decision.reason}")
        named = record if record is not None else self._task_record()
        if named is not None and not named.policy:
            named.policy = decision.refused_by()
        if record is not None:
            record.failure = record.failure or "policy_denied"
            record.id = next(self._ids)
            self.total += 1
            self._notify(lambda o: o.opened(record))
            self._notify(lambda o: o.closed(record))

    def recheck(self, evaluate: Callable[[Request, Workload], Decision]) -> int:
        """Close live connections the current policies deny; returns how many were closed."""
        closed = 0
        for live in list(self._live.values()):
            if live.request is None or live.workload is None or live.closing:
                continue
            decision = evaluate(live.request, live.workload)
            if not decision.allowed:
                self.deny(
                    decision, f"live connection {live.record.source} -> {live.record.destination}"
                )
                live.closing = True  # its handler removes (and logs) it once it has closed
                live.record.failure = live.record.failure or "policy_denied"
                live.record.policy = live.record.policy or decision.refused_by()
                if isinstance(live.close, asyncio.Future):
                    live.close.cancel(decision.reason)
                else:
                    live.close(decision.reason)
                closed += 1
        return closed


def _would_deny(policy: str) -> Callable[[RequestObserver], None]:
    return lambda o: o.would_deny(policy)
