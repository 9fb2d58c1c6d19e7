"""Fault injection per route rule: the ``nodemesh.io`` HTTPFault an ``ExtensionRef`` names.

Gateway API has no standard fault filter; ``ExtensionRef`` is its extension point, so a rule
says ``{type: ExtensionRef, extensionRef: {group: nodemesh.io, kind: HTTPFault, name: ...}}``
and the object (validated by its CRD schema, ``agent/policy/crds/httpfault.yaml``) says what to
inject. The rule is compiled against the HTTPFault of the same snapshot (``compile``), so an
edit of the object takes effect with the next state version, like an edit of the route.

An abort carries an HTTP status or a gRPC status; the latter only on a GRPCRoute (its calls are
answered trailers-only with that ``grpc-status``, HTTP 200, as Envoy's fault filter does), so
an HTTPRoute that names such a fault is refused at compile.

Per request (``decide``), with an injected random source so that tests can drive it: a request
that does not carry every listed header is untouched; otherwise the abort is drawn first
(``abort.percentage``) and an aborted request is answered at once, without the delay; a request
not aborted draws the delay (``delay.percentage``). So among N matching requests the aborts are
Binomial(N, abort%) and, among the others, the delays Binomial(N - aborts, delay%).
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from agent.policy.schema import parse_duration
from agent.state.model import PolicyObject

KIND = "HTTPFault"
GROUP = "nodemesh.io"


@dataclass(frozen=True, slots=True)
class HttpFault:
    """One HTTPFault compiled: percentages 0-100, the delay in seconds."""

    name: str  # "<namespace>/<name>"
    abort_percent: float = 0.0
    abort_status: int | None = None  # an HTTP status
    abort_grpc_status: int | None = None
    delay_percent: float = 0.0
    delay: float = 0.0
    headers: tuple[tuple[str, str], ...] = ()  # (lower-case name, exact value)


@dataclass(frozen=True, slots=True)
class FaultDecision:
    """What one request gets: a delay in seconds, or an abort with an HTTP status or (a
    GRPCRoute's gRPC call) a gRPC status."""

    delay: float = 0.0
    abort_status: int | None = None
    abort_grpc_status: int | None = None

    @property
    def aborted(self) -> bool:
        return self.abort_status is not None or self.abort_grpc_status is not None


NO_FAULT = FaultDecision()


def compile_fault(policy: PolicyObject) -> HttpFault:
    """The fault of one validated HTTPFault object."""
    spec: Mapping[str, Any] = policy.spec
    abort = spec.get("abort") or {}
    delay = spec.get("delay") or {}
    return HttpFault(
        name=f"{policy.namespace}/{policy.name}",
        abort_percent=float(abort.get("percentage", 0.0)),
        abort_status=abort.get("httpStatus"),
        abort_grpc_status=abort.get("grpcStatus"),
        delay_percent=float(delay.get("percentage", 0.0)),
        delay=parse_duration(delay["fixedDelay"]) if delay else 0.0,
        headers=tuple((h["name"].lower(), h["value"]) for h in spec.get("headers", ())),
    )


def decide(
    fault: HttpFault, headers: Sequence[tuple[str, str]], rng: random.Random
) -> FaultDecision:
    """The faults for one request with ``headers`` (lower-case names) under ``fault``."""
    if fault.headers and not all((name, value) in headers for name, value in fault.headers):
        return NO_FAULT
    aborts = fault.abort_status is not None or fault.abort_grpc_status is not None
    if aborts and rng.random() * 100.0 < fault.abort_percent:
        return FaultDecision(
            abort_status=fault.abort_status, abort_grpc_status=fault.abort_grpc_status
        )
    if fault.delay and rng.random() * 100.0 < fault.delay_percent:
        return FaultDecision(delay=fault.delay)
    return NO_FAULT
