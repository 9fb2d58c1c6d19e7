"""The agent's metric registry: one place where every component declares its metrics.

Why a module of its own: components (the proxy, traffic control, the CA client) declare their
counters at import time and increment them where the event happens, without knowing about the
HTTP server that exposes them. ``counter``/``gauge``/``histogram`` are *get-or-create*: importing
a module twice (tests reload, two agents in one test process) returns the same metric instead of
failing as a second registration of its name, and a second declaration with other labels is a
programming error reported at once. The metrics are ``agent.base.promtext``'s, not
prometheus_client's, which the agent's processes do not import (ARCHITECTURE.md, "A small
agent process").

Rules for whoever adds a metric (documented in ARCHITECTURE.md, "Metrics"):
  * names start with ``nodemesh_`` (``istio_tcp_*`` come from ``agent.telemetry.tcp``);
  * labels have a bounded set of values (a reason, a policy, a service), never a port, an address
    or a connection id;
  * values that already exist elsewhere (a length, a kernel counter) are read at scrape time by a
    collector (``agent.telemetry.agentmetrics``) instead of being mirrored on the data path.

Each agent's metrics endpoint serves this registry together with its own collectors (see
``agent.telemetry.component``), so two agents in one test process never share a collector.

Example (traffic control)::

    from agent.base.metrics import counter
    CIRCUIT_OPEN = counter("nodemesh_circuit_breaker_open_total", "Circuits opened", ["service"])
    CIRCUIT_OPEN.labels(service=host).inc()
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

from agent.base.promtext import Counter, Gauge, Histogram, Registry

REGISTRY = Registry(describe_by_collect=True)

_metrics: dict[str, Counter | Gauge | Histogram] = {}
_M = TypeVar("_M", Counter, Gauge, Histogram)


class MetricDeclarationError(ValueError):
    """Two declarations of one metric disagree (type or labels)."""


def _declare(kind: type[_M], name: str, doc: str, labels: Sequence[str], **kw: object) -> _M:
    existing = _metrics.get(name)
    if existing is not None:
        have = existing.labelnames
        if not isinstance(existing, kind) or have != tuple(labels):
            raise MetricDeclarationError(
                f"metric {name} is already declared as {type(existing).__name__}{list(have)}; "
                f"a second declaration as {kind.__name__}{list(labels)} must use the same type "
                "and labels (or another name)"
            )
        return existing
    metric = kind(name, doc, list(labels), registry=REGISTRY, **kw)  # type: ignore[arg-type]
    _metrics[name] = metric
    return metric


def counter(name: str, doc: str, labels: Sequence[str] = ()) -> Counter:
    """A counter in the agent's registry (``_total`` is appended to the exposed name if absent)."""
    return _declare(Counter, name, doc, labels)


def gauge(name: str, doc: str, labels: Sequence[str] = ()) -> Gauge:
    return _declare(Gauge, name, doc, labels)


def histogram(
    name: str, doc: str, labels: Sequence[str] = (), buckets: Sequence[float] | None = None
) -> Histogram:
    if buckets is None:
        return _declare(Histogram, name, doc, labels)
    return _declare(Histogram, name, doc, labels, buckets=tuple(buckets))
