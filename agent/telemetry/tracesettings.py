"""What ``--otlp-endpoint``, ``--trace-sample`` and ``--trace-tcp`` configure.

A module of its own so that reading the flags (``agent.config``) does not import the
OpenTelemetry SDK: ``agent.telemetry.traces`` is imported only by an agent that exports spans.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TraceSettings:
    """``--otlp-endpoint`` (the full OTLP/HTTP traces URL), ``--trace-sample``, ``--trace-tcp``;
    and the export queue's bounds (the SDK's defaults: 2048 spans, batches of 512, 1 s)."""

    endpoint: str
    sample_rate: float = 1.0
    tcp: bool = False
    queue_size: int = 2048
    batch_size: int = 512
    delay: float = 1.0
