"""Finished spans to the collector: a bounded queue on the event loop, export on a thread.

Why not the SDK's ``BatchSpanProcessor`` as it is: it has the right shape (a bounded deque, a
worker thread that exports batches) but when its queue is full it logs a warning *per dropped
span* on the caller's thread (the agent's event loop, so an absent collector under load means a
log line per request) and counts drops only in OpenTelemetry's own opt-in metrics. A mesh proxy
must say how much it dropped on its ``/metrics`` and must not turn a collector outage into a log
flood. So this processor keeps the same design with the accounting nodemesh needs:

* ``on_end`` (event loop) appends to a deque of at most ``queue_size`` spans under a lock held
  for an append, and when it is full drops the *new* span and counts it: O(1), never blocks,
  never logs;
* one daemon thread takes up to ``batch_size`` spans once that many are waiting or ``delay``
  seconds after the oldest arrived, and hands them to the SDK's exporter (the OTLP exporter
  retries with backoff within its timeout, all on this thread);
* spans sent, spans in failed batches and failed batches are counted; failures are logged at
  most once per ``LOG_EVERY`` seconds with the counts since the last line.

Counters are written by one thread each (drops: the event loop; exports: the worker) and read by
the metrics scrape, so they need no lock.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence

from opentelemetry.context import Context
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

log = logging.getLogger(__name__)

LOG_EVERY = 30.0  # seconds between two export-failure log lines


class RateLimited(logging.Filter):
    """Lets one record through per ``interval`` seconds: for the OTLP exporter's own logger,
    which logs every failed or retried batch (the reason, e.g. connection refused or the HTTP
    status, is worth a line; a line per batch during an outage is not)."""

    def __init__(self, interval: float = LOG_EVERY, clock: Callable[[], float] = time.monotonic):
        super().__init__()
        self._interval, self._clock = interval, clock
        self._last = -interval
        self.suppressed = 0

    def filter(self, record: logging.LogRecord) -> bool:
        now = self._clock()
        if now - self._last < self._interval:
            self.suppressed += 1
            return False
        self._last = now
        return True


def rate_limit_logger(name: str) -> None:
    """Attach one ``RateLimited`` filter to logger ``name`` (idempotent)."""
    logger = logging.getLogger(name)
    if not any(isinstance(f, RateLimited) for f in logger.filters):
        logger.addFilter(RateLimited())


class BoundedBatchProcessor(SpanProcessor):
    """A ``SpanProcessor`` that never blocks its caller; see the module docstring."""

    def __init__(
        self,
        exporter: SpanExporter,
        *,
        queue_size: int,
        batch_size: int,
        delay: float,
        target: str,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if queue_size < 1 or not 1 <= batch_size <= queue_size or delay <= 0:
            raise ValueError(
                f"span queue {queue_size}, batch {batch_size}, delay {delay}: expected "
                "1 <= batch <= queue and a positive delay"
            )
        self._exporter = exporter
        self._queue_size, self._batch_size, self._delay = queue_size, batch_size, delay
        self._target = target  # what the log lines name (the endpoint)
        self._clock = clock
        self._spans: deque[ReadableSpan] = deque()
        self._cond = threading.Condition()
        self._in_flight = 0
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.dropped = 0  # spans refused because the queue was full
        self.exported = 0  # spans in batches the collector accepted
        self.failed = 0  # spans in batches that could not be exported
        self.failed_batches = 0
        self.failing_since: float | None = None  # clock() of the first failure of a streak
        self._last_log = -LOG_EVERY
        self._unlogged_batches = 0

    # -- SpanProcessor (event loop) ------------------------------------------------------------
    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        return

    def on_end(self, span: ReadableSpan) -> None:
        if span.context is None or not span.context.trace_flags.sampled:
            return
        with self._cond:
            if len(self._spans) >= self._queue_size:
                self.dropped += 1
                return
            self._spans.append(span)
            if len(self._spans) in (1, self._batch_size):  # start the delay; or a full batch
                self._cond.notify()

    def queued(self) -> int:
        return len(self._spans)

    # -- life cycle ----------------------------------------------------------------------------
    def start(self) -> None:
        """Start the export thread (idempotent)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="trace-export", daemon=True)
            self._thread.start()

    def shutdown(self, timeout: float = 5.0) -> None:
        """Export what is queued for at most ``timeout`` seconds, then stop the exporter
        (once: the tracer provider's own shutdown calls this again)."""
        with self._cond:
            if self._stopping:
                return
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)
        self._exporter.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        """Wait until every queued span has been handed to the exporter and answered."""
        deadline = self._clock() + timeout_millis / 1000
        with self._cond:
            self._cond.notify()
            while self._spans or self._in_flight:
                remaining = deadline - self._clock()
                if remaining <= 0 or self._thread is None:
                    return False
                self._cond.wait(min(remaining, 0.05))
                self._cond.notify()
        return True

    # -- the export thread ---------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cond:
                if not self._spans and not self._stopping:
                    self._cond.wait()
                if self._spans and len(self._spans) < self._batch_size and not self._stopping:
                    self._cond.wait(self._delay)  # let a batch fill, or the delay pass
                take = min(self._batch_size, len(self._spans))
                batch = [self._spans.popleft() for _ in range(take)]
                self._in_flight = take
                if not batch and self._stopping:
                    return
            if batch:
                self._export(batch)
            with self._cond:
                self._in_flight = 0
                self._cond.notify_all()

    def _export(self, batch: Sequence[ReadableSpan]) -> None:
        error = ""
        try:
            result = self._exporter.export(batch)
        except Exception as e:  # an exporter bug must not end the thread: count, log, go on
            result, error = SpanExportResult.FAILURE, repr(e)
        if result is SpanExportResult.SUCCESS:
            self.exported += len(batch)
            if self.failing_since is not None:
                log.info("traces: export to %s works again", self._target)
            self.failing_since = None
            return
        self.failed += len(batch)
        self.failed_batches += 1
        self._unlogged_batches += 1
        now = self._clock()
        if self.failing_since is None:
            self.failing_since = now
        if now - self._last_log >= LOG_EVERY:
            log.warning(
                "traces: %d span batch(es) could not be exported to %s%s (%d spans failed, %d "
                "dropped on a full queue so far); check that the collector listens there "
                "(next report in %.0fs at the earliest)",
                self._unlogged_batches, self._target, f": {error}" if error else "",
                self.failed, self.dropped, LOG_EVERY,
            )  # fmt: skip
            self._last_log = now
            self._unlogged_batches = 0
